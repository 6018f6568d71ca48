"""Check that servers answer the benchmark's resnet18 with the logits of in-process torch.

    .venv/bin/python -m benchmarks.peers.check mlserver torchserve slimserve

Starts each server as the serving benchmark does, sends one request with a fixed 3x224x224 input and
compares the logits with the shared state_dict run in this process (``np.allclose``). Exits 1 on a
mismatch or a server that is not set up.
"""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np
import torch

from benchmarks.peers.servers import BUILD_DIR, INPUT_SHAPE, PEERS, WEIGHTS, Batching, Server, slimserve
from benchmarks.peers.weights import build_resnet18
from clients.client import CHANNEL_OPTIONS
from clients.loadgen import random_input

BATCHING = Batching(max_batch_size=16, max_delay_ms=2.0)


def reference(array: np.ndarray) -> np.ndarray:
    """``array``'s logits from the shared weights, in this process."""
    with torch.inference_mode():
        return build_resnet18(WEIGHTS)(torch.from_numpy(array)).numpy()


def verify(server: Server, address: str, array: np.ndarray) -> bool:
    """Whether the running ``server`` answers ``array`` with the in-process logits; prints the comparison."""
    expected = reference(array)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        logits = server.infer(channel, array)
    scale = float(np.abs(expected).max())
    same_shape = logits.shape == expected.shape
    close = same_shape and np.allclose(logits, expected, rtol=1e-4, atol=1e-4 * scale)
    difference = float(np.abs(logits - expected).max()) if same_shape else float("nan")
    print(
        f"{server.name}: {'OK' if close else 'MISMATCH'}, logits {list(logits.shape)}, "
        f"max |difference| {difference:.2e} (max |logit| {scale:.2f})",
        file=sys.stderr,
    )
    return close


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("servers", nargs="+", choices=[*PEERS, "slimserve"])
    args = parser.parse_args()
    array = random_input((1, *INPUT_SHAPE), seed=1)
    ok = True
    for name in args.servers:
        server = slimserve() if name == "slimserve" else PEERS[name]()
        if (why := server.missing()) is not None:
            print(f"{name}: {why}", file=sys.stderr)
            ok = False
            continue
        with server.serve(BATCHING, BUILD_DIR / "logs" / f"check-{name}.log") as address:
            ok = verify(server, address, array) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
