"""``python -m server.healthcheck``: exit 0 when the local slimserve answers gRPC health SERVING.

For container runtimes without native gRPC probes (Docker's HEALTHCHECK); Kubernetes uses its own
``grpc`` probes. It reads only the port (and host) from the deploy config, with plain YAML, so a probe
every few seconds does not import torch. It speaks plaintext: with ``server.tls`` on, give the container a
TCP check instead (or an exec of ``grpc_health_probe -tls``), as for Kubernetes' built-in probes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 8001
"""``ServerSettings.grpc_port``'s default (a unit test keeps them equal)."""
WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def probe_address(config: Path | None) -> str:
    """Where the server of ``config`` listens, as seen from the same host."""
    raw = yaml.safe_load(config.read_text()) if config is not None else None
    server = (raw or {}).get("server") or {}
    host = str(server.get("host", ""))
    port = int(server.get("grpc_port", DEFAULT_PORT))
    host = "127.0.0.1" if host in WILDCARDS else host
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    """True when ``address`` answers SERVING for ``service`` ("" = the whole server)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.healthcheck", description=__doc__)
    parser.add_argument("--config", type=Path, help="the deploy config the server runs with")
    parser.add_argument("--address", help="host:port to probe (default: from --config, else 127.0.0.1:8001)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    address = args.address or probe_address(args.config)
    serving = check(address, timeout_s=args.timeout)
    print(f"{address}: {'SERVING' if serving else 'not serving'}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
