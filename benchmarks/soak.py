"""Soak test: a `slimserve serve` process under concurrency 64 for N minutes, good and bad requests mixed.

    .venv/bin/python -m benchmarks.soak --minutes 10

Every request kind has the status it must get (OK for good ones, the right error for bad ones). The
report counts unexpected statuses, lost good requests (good requests that did not succeed), and the
server's resident memory (VmRSS from /proc) at the end of the warm-up, at the end, and at its peak;
the goal is less than 5% growth after warm-up. A 20-second variant runs in the tests
(tests/integration/test_soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import yaml
from PIL import Image

from benchmarks.common import slimserve_process
from clients.codec import build_classify_request, build_infer_request
from clients.loadgen import open_channel
from compression.models.digits.data import encode_png, load_splits, normalize
from protos import classifier_pb2_grpc
from protos import grpc_service_pb2_grpc as pb_grpc
from server.config.settings import default_config

OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix: how to send it and the status it must get."""

    name: str
    expected: grpc.StatusCode
    weight: int
    send: Callable[[], Awaitable[object]]

    @property
    def good(self) -> bool:
        return self.expected == OK


@dataclass
class SoakResult:
    duration_s: float
    concurrency: int
    sent: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    """``"kind: STATUS"`` -> count, for requests that did not get their kind's status."""
    lost_good: int = 0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    rss_peak_kib: int = 0

    @property
    def rss_growth(self) -> float:
        """Resident memory growth from the end of the warm-up to the end, as a fraction."""
        return (self.rss_end_kib - self.rss_warm_kib) / self.rss_warm_kib if self.rss_warm_kib else float("nan")

    def format(self) -> str:
        total = sum(self.sent.values())
        lines = [
            f"{total} requests in {self.duration_s:.0f} s at concurrency {self.concurrency} "
            f"({total / self.duration_s:.0f}/s): " + ", ".join(f"{k} {n}" for k, n in sorted(self.sent.items())),
            f"unexpected statuses: {sum(self.unexpected.values())}"
            + (
                " (" + ", ".join(f"{k} x{n}" for k, n in sorted(self.unexpected.items())) + ")"
                if self.unexpected
                else ""
            ),
            f"lost good requests: {self.lost_good}",
            f"server RSS: {self.rss_warm_kib / 1024:.1f} MiB after warm-up, {self.rss_end_kib / 1024:.1f} MiB "
            f"at the end ({self.rss_growth:+.1%}), peak {self.rss_peak_kib / 1024:.1f} MiB",
        ]
        return "\n".join(lines)


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def request_mix(channel: grpc.aio.Channel) -> list[Kind]:
    """Good and bad requests over ModelInfer and Classify, each with the status it must get."""
    split = load_splits()["test"]
    kserve, classifier = pb_grpc.GRPCInferenceServiceStub(channel), classifier_pb2_grpc.ClassifierStub(channel)
    infer = partial(kserve.ModelInfer, timeout=CALL_TIMEOUT_S)
    classify = partial(classifier.Classify, timeout=CALL_TIMEOUT_S)
    raw_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    gif = io.BytesIO()
    Image.fromarray(split.images[0]).save(gif, "GIF")
    images = normalize(split.images[:8])

    def tensor(array: np.ndarray, model: str = "digits") -> object:
        return build_infer_request(model, "input", array, datatype="FP32")

    def images_request(*encoded: bytes) -> object:
        return build_classify_request(list(encoded), model="digits", top_k=3, variant="")

    return [
        Kind("infer batch 1", OK, 4, partial(infer, tensor(images[:1]))),
        Kind("infer batch 8", OK, 2, partial(infer, tensor(images))),
        Kind("classify", OK, 3, partial(classify, images_request(*map(encode_png, split.images[:4])))),
        Kind("infer wrong shape", INVALID, 1, partial(infer, tensor(np.zeros((1, 3, 28, 28), np.float32)))),
        Kind("infer unknown model", NOT_FOUND, 1, partial(infer, tensor(images[:1], model="nope"))),
        Kind("infer malformed message", INVALID, 1, partial(raw_infer, b"\x0a\x02\xff\xfe", timeout=CALL_TIMEOUT_S)),
        Kind("classify corrupt image", INVALID, 1, partial(classify, images_request(b"\x89PNG\r\n\x1a\n junk"))),
        Kind("classify GIF", INVALID, 1, partial(classify, images_request(gif.getvalue()))),
    ]


async def soak(address: str, pid: int, *, duration_s: float, concurrency: int, warmup_s: float) -> SoakResult:
    """Drive the mix at ``concurrency`` for ``warmup_s`` + ``duration_s``; only the latter is counted."""
    result = SoakResult(duration_s, concurrency)
    async with open_channel(address) as channel:
        mix = request_mix(channel)
        schedule = [kind for kind in mix for _ in range(kind.weight)]
        started = time.monotonic()
        measure_from, stop_at = started + warmup_s, started + warmup_s + duration_s

        async def worker(offset: int) -> None:
            for kind in itertools.islice(itertools.cycle(schedule), offset, None):
                if (start := time.monotonic()) >= stop_at:
                    return
                try:
                    await kind.send()
                    code = OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                if start < measure_from:
                    continue
                result.sent[kind.name] += 1
                if code != kind.expected:
                    result.unexpected[f"{kind.name}: {code.name}"] += 1
                    result.lost_good += kind.good

        async def watch_memory() -> None:
            await asyncio.sleep(warmup_s)
            result.rss_warm_kib = result.rss_peak_kib = rss_kib(pid)
            while time.monotonic() < stop_at:
                result.rss_end_kib = rss_kib(pid)
                result.rss_peak_kib = max(result.rss_peak_kib, result.rss_end_kib)
                await asyncio.sleep(0.5)

        workers = [worker(i) for i in range(concurrency)]
        await asyncio.gather(watch_memory(), *workers)
    return result


def soak_new_server(
    *, duration_s: float, concurrency: int = 64, warmup_s: float = 60.0, log_path: Path | None = None
) -> SoakResult:
    """Start `slimserve serve` on the digits model (no compression search), soak it, stop it."""
    with tempfile.TemporaryDirectory(prefix="slimserve-soak-") as folder:
        config = default_config()
        model = config.models[0].model_copy(update={"compression": None})
        path = Path(folder) / "deploy.yaml"
        path.write_text(yaml.safe_dump(config.model_copy(update={"models": [model]}).model_dump(mode="json")))
        with slimserve_process(path, log_path=log_path) as server:
            run = soak(
                server.address, server.process.pid, duration_s=duration_s, concurrency=concurrency, warmup_s=warmup_s
            )
            return asyncio.run(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="measured duration")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before counting and the RSS baseline")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--log", type=Path, help="write the server's log here")
    args = parser.parse_args(argv)
    result = soak_new_server(
        duration_s=args.minutes * 60, concurrency=args.concurrency, warmup_s=args.warmup, log_path=args.log
    )
    print(result.format())
    return 0 if not result.unexpected and result.rss_growth < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
