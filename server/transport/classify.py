"""``slimserve.v1.Classifier``: encoded images in, top-k labels out. Thin; logic is in the data plane."""

from __future__ import annotations

from collections.abc import Callable

from protos import classifier_pb2 as pb
from protos import classifier_pb2_grpc as pb_grpc
from protos.errors import Unavailable
from server.dataplane import DataPlane, RequestTrack
from server.transport.rpc import tracked


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, plane: DataPlane, is_ready: Callable[[], bool]) -> None:
        self.plane = plane
        self._is_ready = is_ready

    @tracked("Classify")
    async def Classify(self, request: pb.ClassifyRequest, track: RequestTrack) -> pb.ClassifyResponse:
        if not self._is_ready():
            raise Unavailable("the server is not ready")
        return await classify(self.plane, request, track)


async def classify(plane: DataPlane, request: pb.ClassifyRequest, track: RequestTrack) -> pb.ClassifyResponse:
    """One Classify call, whichever transport carried it (gRPC here, HTTP in ``rest.py``)."""
    model, variant = plane.resolve(request.model_name, request.variant, track)
    images = await plane.classify(model, variant, list(request.images), request.top_k, track)
    return pb.ClassifyResponse(
        model_name=model.name,
        variant=variant.name,
        results=[
            pb.ImageClassification(
                classes=[pb.Class(label=label, index=index, score=score) for label, index, score in image.classes]
            )
            for image in images
        ],
    )
