"""`slimserve-client`: classify images or benchmark a running slimserve server.

    slimserve-client classify seven.png two.jpg --top-k 3
    slimserve-client bench --mode infer --batch 8 --concurrency 4 --duration 10
    slimserve-client bench --mode classify --image seven.png
    slimserve-client variant --set original --pin

Exit status: 0 on success; 1 when a call fails (printed as
`error: <STATUS>: <details>`) or a benchmark gets no successful reply;
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from clients.client import DEFAULT_ADDRESS, SlimserveClient, auth_metadata
from clients.loadgen import LoadResult, classify_call, infer_call, open_channel, run_load
from clients.tls import Tls
from protos import admin_pb2, classifier_pb2

TOKEN_ENV = "SLIMSERVE_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port")
    common.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token sent as `authorization` metadata (default: ${TOKEN_ENV})",
    )
    common.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    common.add_argument("--ca-cert", type=Path, help="PEM CA that signed the server's certificate (implies --tls)")
    common.add_argument("--client-cert", type=Path, help="PEM client certificate for mutual TLS (implies --tls)")
    common.add_argument("--client-key", type=Path, help="PEM key of --client-cert")
    common.add_argument("--model", default="digits", help="model name")

    parser = argparse.ArgumentParser(
        prog="slimserve-client",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )

    classify = add_command("classify", help="classify image files")
    classify.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG or PNG files")
    classify.add_argument("--top-k", type=int, default=3, help="classes per image")
    classify.add_argument("--variant", default="", help='model variant, e.g. "original"; "" = the active one')

    bench = add_command("bench", help="closed-loop load test")
    bench.add_argument("--mode", choices=["infer", "classify"], default="infer", help="RPC to drive")
    bench.add_argument("--concurrency", type=_at_least(int, 1), default=4, help="requests in flight")
    bench.add_argument("--duration", type=_at_least(float, 0.001), default=10.0, help="seconds measured")
    bench.add_argument("--warmup", type=_at_least(float, 0.0), default=2.0, help="seconds not measured")
    bench.add_argument("--batch", type=_at_least(int, 1), default=1, help="images per request")
    bench.add_argument("--image", type=Path, help="image file sent in classify mode (required there)")

    variant = add_command("variant", help="show or override which variant answers by default")
    change = variant.add_mutually_exclusive_group()
    change.add_argument("--set", dest="set_variant", metavar="VARIANT", help='e.g. "original" or "compressed"')
    change.add_argument("--unpin", action="store_true", help="hand the choice back to the guardrail")
    variant.add_argument("--pin", action="store_true", help="with --set: the guardrail leaves the choice alone")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench" and args.mode == "classify" and args.image is None:
        parser.error("bench --mode classify needs --image")
    try:
        if args.command == "classify":
            return _classify(args)
        if args.command == "variant":
            return _variant(args)
        return _bench(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


def channel_tls(args: argparse.Namespace) -> Tls | None:
    """The TLS settings the flags ask for; None = plaintext."""
    if not (args.tls or args.ca_cert or args.client_cert or args.client_key):
        return None
    return Tls.from_files(root_cert=args.ca_cert, client_cert=args.client_cert, client_key=args.client_key)


def format_classification(path: object, result: classifier_pb2.ImageClassification) -> str:
    """`path: label (score) label (score) ...`, scores with three decimals."""
    return f"{path}: " + " ".join(f"{c.label} ({c.score:.3f})" for c in result.classes)


def batched_shape(metadata_shape: Sequence[int], batch: int) -> list[int]:
    """The concrete input shape for `batch` items, from a metadata shape whose first dimension is -1."""
    shape = list(metadata_shape)
    if not shape or shape[0] != -1:
        raise ValueError(f"input shape {shape} has no batch dimension")
    if any(d < 0 for d in shape[1:]):
        raise ValueError(f"input shape {shape} has variable dimensions besides the batch")
    return [batch, *shape[1:]]


def _classify(args: argparse.Namespace) -> int:
    images = [path.read_bytes() for path in args.images]
    with SlimserveClient(args.address, token=args.token, tls=channel_tls(args)) as client:
        response = client.classify(images, model=args.model, top_k=args.top_k, variant=args.variant)
    for path, result in zip(args.images, response.results, strict=True):
        print(format_classification(path, result))
    return 0


def format_variant_state(state: admin_pb2.VariantState) -> str:
    agreement = f"{state.window_agreement:.3f}" if state.HasField("window_agreement") else "n/a"
    lines = [
        f"model {state.model_name}: default variant {state.default_variant}"
        + (" (pinned)" if state.pinned else " (guardrail active)"),
        f"variants: {', '.join(state.variants)}",
        f"live agreement {agreement} over {state.window_samples} compared images; {state.rollbacks} rollbacks",
    ]
    if state.last_rollback_reason:
        lines.append(f"last rollback: {state.last_rollback_reason}")
    return "\n".join(lines)


def _variant(args: argparse.Namespace) -> int:
    if args.pin and not args.set_variant:
        raise ValueError("--pin needs --set VARIANT")
    with SlimserveClient(args.address, token=args.token, tls=channel_tls(args)) as client:
        if args.set_variant or args.unpin:
            state = client.set_variant(args.model, args.set_variant or "", pin=args.pin)
        else:
            state = client.variant_state(args.model)
    print(format_variant_state(state))
    return 0


def _bench(args: argparse.Namespace) -> int:
    input_name, shape = "", []
    if args.mode == "infer":
        with SlimserveClient(args.address, token=args.token, tls=channel_tls(args)) as client:
            metadata = client.model_metadata(args.model)
        if len(metadata.inputs) != 1:
            raise ValueError(f"model {args.model!r} has {len(metadata.inputs)} inputs; bench sends one")
        input_name, shape = metadata.inputs[0].name, batched_shape(metadata.inputs[0].shape, args.batch)
    image = args.image.read_bytes() if args.mode == "classify" else b""

    auth = auth_metadata(args.token)

    async def load() -> LoadResult:
        async with open_channel(args.address, channel_tls(args)) as channel:
            if args.mode == "infer":
                call = infer_call(channel, args.model, input_name, shape, metadata=auth)
            else:
                call = classify_call(channel, [image] * args.batch, model=args.model, metadata=auth)
            return await run_load(call, concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup)

    result = asyncio.run(load())
    print(f"{args.mode} {args.model} batch {args.batch}: {result.format()}")
    return 0 if result.count else 1


def _at_least(convert: type, low: float):
    """An argparse type: `convert(text)`, rejected below `low`."""

    def parse(text: str):
        value = convert(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in its error messages
    return parse


if __name__ == "__main__":
    sys.exit(main())
