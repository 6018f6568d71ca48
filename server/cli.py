"""``slimserve``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from compression.models.loading import ModelLoadError
from server import __version__
from server.app import StartupError, serve
from server.config.settings import ConfigError, DeployConfig, default_config, format_validation_error, load_config
from server.process.allocator import keep_large_buffers_in_heap

log = logging.getLogger("slimserve")
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
CHATTY_LIBRARIES = ("onnxscript", "onnx_ir", "onnxruntime", "matplotlib", "torch", "torchao")
"""Libraries that log every pass at INFO; their warnings still show."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"slimserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve the models of a deploy config over gRPC and HTTP")
    serve_cmd.add_argument("--config", type=Path, help="YAML deploy config (default: the bundled digits model)")
    serve_cmd.add_argument("--host", help="interface to listen on (default 0.0.0.0)")
    serve_cmd.add_argument("--grpc-port", type=int, help="gRPC port (default 8001)")
    serve_cmd.add_argument("--http-port", type=int, help="KServe v2 REST port (default 8000)")
    serve_cmd.add_argument("--metrics-port", type=int, help="Prometheus /metrics HTTP port (default 8002)")
    serve_cmd.add_argument("--metrics-host", help="interface for /metrics (default: the gRPC interface)")
    serve_cmd.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    compress_cmd = commands.add_parser(
        "compress", help="run the budgeted compression search (cached) and write its reports"
    )
    compress_cmd.add_argument("--config", type=Path, help="YAML deploy config (default: the bundled digits model)")
    compress_cmd.add_argument("--model", help="only this model (default: every model with compression enabled)")
    compress_cmd.add_argument("--out", type=Path, help="also copy each model's reports and chosen artifact here")
    compress_cmd.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    return parser


def resolve_config(args: argparse.Namespace) -> DeployConfig:
    """The deploy config with command-line overrides applied (flags win over the file)."""
    config = load_config(args.config) if args.config else default_config()
    overrides = {
        key: value
        for key in ("host", "grpc_port", "http_port", "metrics_port", "metrics_host")
        if (value := getattr(args, key, None)) is not None
    }
    if overrides:
        try:
            server = config.server.model_validate({**config.server.model_dump(), **overrides})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(Path("(command-line flags)"), exc)) from exc
        config = config.model_copy(update={"server": server})
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.log_level != "DEBUG":
        for chatty in CHATTY_LIBRARIES:
            logging.getLogger(chatty).setLevel(logging.WARNING)
    # NOTE: the compression search too, so that it times candidates as the server will run them.
    keep_large_buffers_in_heap()
    try:
        config = resolve_config(args)
        if args.command == "compress":
            from server.compress_command import run_compress

            return run_compress(config, args.model, args.out)
        asyncio.run(serve(config))
    except (ConfigError, StartupError, ModelLoadError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
