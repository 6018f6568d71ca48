"""``slimserve.v1.Admin``: see and override which variant answers by default. Thin; logic is in the guardrail."""

from __future__ import annotations

import grpc

from protos import admin_pb2 as pb
from protos import admin_pb2_grpc as pb_grpc
from protos.errors import NotFound
from server.dataplane import DataPlane
from server.transport.rpc import aborts_on_error
from server.variants.guardrail import Guardrail, GuardrailState


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @aborts_on_error
    async def GetVariant(self, request: pb.GetVariantRequest, context: grpc.aio.ServicerContext) -> pb.VariantState:
        return self._state(request.model_name, self._guardrail(request.model_name).state())

    @aborts_on_error
    async def SetVariant(self, request: pb.SetVariantRequest, context: grpc.aio.ServicerContext) -> pb.VariantState:
        state = self._guardrail(request.model_name).override(request.variant, request.pin)
        return self._state(request.model_name, state)

    def _guardrail(self, model_name: str) -> Guardrail:
        self.plane.registry.get(model_name)  # NOT_FOUND names the models this server serves
        shadow = self.plane.shadows.get(model_name)
        if shadow is None:
            raise NotFound(f"model {model_name!r} is still loading")
        return shadow.guardrail

    def _state(self, model_name: str, state: GuardrailState) -> pb.VariantState:
        return pb.VariantState(
            model_name=model_name,
            default_variant=state.default_variant,
            pinned=state.pinned,
            variants=list(self.plane.registry.get(model_name).variants),
            window_agreement=state.window_agreement,
            window_samples=state.window_samples,
            rollbacks=state.rollbacks,
            last_rollback_reason=state.last_rollback_reason,
        )
