"""What one KServe v2 infer request costs in each asyncio HTTP framework: the choice behind server/transport/rest.py.

    python3 -m venv build/bench-http
    build/bench-http/bin/pip install aiohttp starlette uvicorn httptools falcon blacksheep numpy
    build/bench-http/bin/python -m benchmarks.http_frameworks           # --rounds 40 --block 40 --concurrency 1 8

The candidates live in their own venv (``build/``, not slimserve's ``.venv``); a framework that is not
installed there is skipped. Every server answers the same minimal v2-infer-like handler (:func:`answer`):
read a 602,112-byte request (one 3x224x224 FP32 image, Triton's binary tensor extension: a JSON header
of ``Inference-Header-Content-Length`` bytes, then the raw tensor), parse the JSON header, view the tensor
with ``numpy.frombuffer``, and answer a small JSON header plus 4,000 bytes of binary logits. So the rows
differ only in what the framework does around the handler: HTTP parsing, routing, reading the body,
building the response. The servers are

- aiohttp: ``web.AppRunner`` + ``web.TCPSite``, no access log, as slimserve runs it;
- Starlette on uvicorn, ``loop="asyncio"`` (the stdlib event loop that grpc.aio runs on), once with
  uvicorn's pure-Python h11 parser and once with httptools (a C parser; no effect on the event loop);
- Falcon (ASGI) and BlackSheep, on the same uvicorn (asyncio loop, httptools);
- a bare ``asyncio.BufferedProtocol`` that parses just enough HTTP/1.1 for this request into one reused
  buffer: the floor, what the handler and the event loop cost without a framework.

Each server runs in its own process on a free loopback port. One client process (an asyncio keep-alive
HTTP/1.1 client that parses only the status line and Content-Length, the same for every server) sends the
requests at each concurrency (one connection per worker), in alternating blocks: every round visits every
server once, starting one server later than the round before, so that all of them see the same drift of
this shared machine. Reported per server and concurrency: p50 and p99 latency, requests/s, the server
process's own CPU time per request (user + system, from /proc), and each figure over aiohttp's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.processes import spawned_server

SHAPE = (1, 3, 224, 224)
TENSOR_BYTES = int(np.prod(SHAPE)) * 4  # 602,112
CLASSES = 1000
INFERENCE_HEADER = "Inference-Header-Content-Length"
PATH = "/v2/models/bench/infer"
BODY_LIMIT = 64 << 20
LOGITS = np.linspace(-1.0, 1.0, CLASSES, dtype=np.float32).tobytes()
ANSWER_HEADER = json.dumps(
    {
        "model_name": "bench",
        "model_version": "1",
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [1, CLASSES], "parameters": {"binary_data_size": 4000}}
        ],
    },
    separators=(",", ":"),
).encode()
FRAMEWORKS = ["aiohttp", "starlette-h11", "starlette-httptools", "falcon", "blacksheep", "asyncio-protocol"]
LABELS = {
    "aiohttp": "aiohttp (AppRunner/TCPSite)",
    "starlette-h11": "Starlette on uvicorn (h11)",
    "starlette-httptools": "Starlette on uvicorn (httptools)",
    "falcon": "Falcon ASGI on uvicorn (httptools)",
    "blacksheep": "BlackSheep on uvicorn (httptools)",
    "asyncio-protocol": "bare asyncio.BufferedProtocol (floor)",
}
BASELINE = "aiohttp"


def answer(body: bytes | memoryview, header_length: str | None) -> tuple[bytes, int]:
    """The handler every server runs: parse the JSON header, view the tensor, answer header + logits."""
    json_end = int(header_length) if header_length is not None else len(body)
    header = json.loads(bytes(body[:json_end]))
    tensor = header["inputs"][0]
    size = int(tensor["parameters"]["binary_data_size"])
    if size != TENSOR_BYTES or len(body) - json_end != size:
        raise ValueError(f"expected {TENSOR_BYTES} bytes of tensor, got {len(body) - json_end} ({size} declared)")
    array = np.frombuffer(body, dtype=np.float32, count=size // 4, offset=json_end).reshape(tensor["shape"])
    if array.shape != SHAPE:
        raise ValueError(f"shape {array.shape}")
    return ANSWER_HEADER + LOGITS, len(ANSWER_HEADER)


# --- the servers, each in its own process ------------------------------------------------------------------


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        payload, json_length = answer(await request.read(), request.headers.get(INFERENCE_HEADER))
        headers = {INFERENCE_HEADER: str(json_length)}
        return web.Response(body=payload, headers=headers, content_type="application/octet-stream")

    app = web.Application(client_max_size=BODY_LIMIT)
    app.add_routes([web.post("/v2/models/{model}/infer", infer)])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def _starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def infer(request: Request) -> Response:
        payload, json_length = answer(await request.body(), request.headers.get(INFERENCE_HEADER))
        headers = {INFERENCE_HEADER: str(json_length)}
        return Response(payload, headers=headers, media_type="application/octet-stream")

    return Starlette(routes=[Route("/v2/models/{model}/infer", infer, methods=["POST"])])


def _falcon_app() -> Any:
    import falcon
    import falcon.asgi

    class Infer:
        async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model: str) -> None:
            payload, json_length = answer(await req.stream.read(), req.get_header(INFERENCE_HEADER))
            resp.data = payload
            resp.content_type = "application/octet-stream"
            resp.set_header(INFERENCE_HEADER, str(json_length))

    app = falcon.asgi.App()
    app.add_route("/v2/models/{model}/infer", Infer())
    return app


def _blacksheep_app() -> Any:
    from blacksheep import Application, Content, Request, Response

    app = Application()

    async def infer(request: Request, model: str) -> Response:
        header = request.get_first_header(INFERENCE_HEADER.encode())
        payload, json_length = answer(await request.read() or b"", header.decode() if header else None)
        headers = [(INFERENCE_HEADER.encode(), str(json_length).encode())]
        return Response(200, headers, Content(b"application/octet-stream", payload))

    # NOTE: BlackSheep binds parameters by their annotations, which `from __future__ import annotations`
    # leaves as names it cannot resolve for a nested function: give it the classes.
    infer.__annotations__ = {"request": Request, "model": str, "return": Response}
    app.router.add_post("/v2/models/{model}/infer", infer)
    return app


async def _serve_uvicorn(app: Any, port: int, http: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="asyncio", http=http, log_level="warning", access_log=False
    )
    await uvicorn.Server(config).serve()


class _Floor(asyncio.BufferedProtocol):
    """Just enough HTTP/1.1 for this benchmark's keep-alive requests (Content-Length bodies, no chunking),
    received into one preallocated buffer: the body reaches the handler without a copy."""

    def __init__(self) -> None:
        self._buffer = bytearray(2 << 20)  # 2 MiB: a head and a 602 KB body, with room
        self._filled = 0
        self._body_at = 0  # where the body starts, once the head has been read
        self._length = 0
        self._json_length: str | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        searched_from = max(0, self._filled - 3)
        self._filled += nbytes
        if not self._body_at:
            end = self._buffer.find(b"\r\n\r\n", searched_from, self._filled)
            if end < 0:
                return
            self._body_at = end + 4
            self._json_length = None
            for line in bytes(self._buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self._length = int(value)
                elif name == INFERENCE_HEADER.lower().encode():
                    self._json_length = value.strip().decode()
        end = self._body_at + self._length
        if self._filled < end:
            return
        if self._filled > end:
            raise ValueError("pipelined requests are not supported")
        payload, json_length = answer(memoryview(self._buffer)[self._body_at : end], self._json_length)
        self._filled = self._body_at = 0
        assert self._transport is not None
        self._transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"{INFERENCE_HEADER}: {json_length}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )


async def _serve_floor(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Floor, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def _run_server(name: str, port: int) -> None:
    if name == "aiohttp":
        asyncio.run(_serve_aiohttp(port))
    elif name == "asyncio-protocol":
        asyncio.run(_serve_floor(port))
    elif name.startswith("starlette"):
        asyncio.run(_serve_uvicorn(_starlette_app(), port, name.removeprefix("starlette-")))
    elif name == "falcon":
        asyncio.run(_serve_uvicorn(_falcon_app(), port, "httptools"))
    elif name == "blacksheep":
        asyncio.run(_serve_uvicorn(_blacksheep_app(), port, "httptools"))
    else:
        raise ValueError(name)


def available(name: str) -> bool:
    """Whether ``name``'s packages import in this interpreter."""
    needs = {
        "aiohttp": ["aiohttp"],
        "starlette-h11": ["starlette", "uvicorn", "h11"],
        "starlette-httptools": ["starlette", "uvicorn", "httptools"],
        "falcon": ["falcon", "uvicorn", "httptools"],
        "blacksheep": ["blacksheep", "uvicorn", "httptools"],
        "asyncio-protocol": [],
    }[name]
    try:
        for module in needs:
            __import__(module)
    except ImportError:
        return False
    return True


@dataclass
class Server:
    name: str
    port: int
    pid: int


@contextmanager
def server_process(name: str) -> Iterator[Server]:
    """``name``'s server in a fresh process on a free loopback port, until the block ends."""
    with spawned_server(_run_server, name) as (port, pid):
        yield Server(name, port, pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the client ------------------------------------------------------------------------------------------------


def request_bytes() -> bytes:
    """The whole HTTP request, as ``tritonclient.http`` sends one FP32 input with binary data."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(SHAPE),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": TENSOR_BYTES},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    tensor = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32).tobytes()
    body = header + tensor
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
        f"{INFERENCE_HEADER}: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection that sends the same request and reads Content-Length answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> None:
        self._reader, self._writer, self._request = reader, writer, request

    @classmethod
    async def open(cls, port: int, request: bytes) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer, request)

    async def call(self) -> bytes:
        self._writer.write(self._request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"answer: {head[:200]!r}")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"no Content-Length in {head!r}")
        return await self._reader.readexactly(length)

    def close(self) -> None:
        self._writer.close()


def check_answer(body: bytes) -> None:
    header_length = len(ANSWER_HEADER)
    header = json.loads(body[:header_length])
    if header["outputs"][0]["parameters"]["binary_data_size"] != 4000 or body[header_length:] != LOGITS:
        raise RuntimeError("wrong answer")


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies)


async def block(connections: list[Connection], per_worker: int, samples: Samples, pid: int) -> None:
    """``per_worker`` calls on each connection at once; latencies, wall time and server CPU time added."""

    async def worker(connection: Connection) -> None:
        for _ in range(per_worker):
            started = time.perf_counter()
            await connection.call()
            samples.latencies.append(time.perf_counter() - started)

    cpu, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    samples.seconds += time.perf_counter() - started
    samples.cpu += cpu_seconds(pid) - cpu


async def measure(
    servers: list[Server], levels: list[int], rounds: int, block_size: int
) -> dict[tuple[str, int], Samples]:
    request = request_bytes()
    results: dict[tuple[str, int], Samples] = {}
    for level in levels:
        connections = {s.name: [await Connection.open(s.port, request) for _ in range(level)] for s in servers}
        try:
            for server in servers:  # correct answers, and a warm-up
                check_answer(await connections[server.name][0].call())
                await block(connections[server.name], max(1, 2 * block_size // level), Samples(), server.pid)
            per_worker = max(1, block_size // level)
            for index in range(rounds):
                shift = index % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    samples = results.setdefault((server.name, level), Samples())
                    await block(connections[server.name], per_worker, samples, server.pid)
        finally:
            for connection in (c for cs in connections.values() for c in cs):
                connection.close()
    return results


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (the same layout as benchmarks.common.table, which needs slimserve's venv)."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line: Callable[[list[str]], str] = lambda cells: (  # noqa: E731
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    )
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else ""


def report(results: dict[tuple[str, int], Samples], names: list[str], levels: list[int]) -> str:
    rows = []
    for level in levels:
        figures = {}
        for name in names:
            samples = results[(name, level)]
            p50, p99 = np.percentile(np.asarray(samples.latencies) * 1e3, [50, 99])
            figures[name] = (p50, p99, samples.count / samples.seconds, samples.cpu / samples.count * 1e3)
        base = figures.get(BASELINE)
        for name in names:
            p50, p99, rate, cpu = figures[name]
            ratios = [_ratio(figures[name][i], base[i] if base else 0.0) for i in (0, 2, 3)]
            rows.append([LABELS[name], str(level), f"{p50:.3f}", f"{p99:.3f}", f"{rate:.0f}", f"{cpu:.3f}", *ratios])
    headers = ["server", "c", "p50 ms", "p99 ms", "req/s", "server CPU ms/req"]
    return table([*headers, "p50 ÷ aiohttp", "req/s ÷ aiohttp", "CPU ÷ aiohttp"], rows)


def versions(names: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    packages = {"numpy"}
    for name in names:
        packages |= {
            "aiohttp": {"aiohttp"},
            "starlette-h11": {"starlette", "uvicorn", "h11"},
            "starlette-httptools": {"starlette", "uvicorn", "httptools"},
            "falcon": {"falcon", "uvicorn"},
            "blacksheep": {"blacksheep", "uvicorn"},
        }.get(name, set())
    found = []
    for package in sorted(packages):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join([f"Python {sys.version.split()[0]}", *found])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=FRAMEWORKS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=40, help="blocks per server and concurrency")
    parser.add_argument("--block", type=int, default=40, help="requests per block (split among the workers)")
    args = parser.parse_args()

    names = [n for n in args.frameworks if available(n)]
    skipped = [n for n in args.frameworks if n not in names]
    if skipped:
        print(f"skipped (not installed in {sys.prefix}): {', '.join(skipped)}", file=sys.stderr)
    if not names:
        raise SystemExit("no framework to measure: see the module docstring for the venv")
    started = time.perf_counter()
    with ExitStack() as stack:
        servers = [stack.enter_context(server_process(name)) for name in names]
        results = asyncio.run(measure(servers, args.concurrency, args.rounds, args.block))
    load = os.getloadavg()
    print(
        f"\n{TENSOR_BYTES:,}-byte binary tensor per request, {args.rounds} alternating rounds of "
        f"{args.block} requests per server and concurrency, {time.perf_counter() - started:.0f} s; "
        f"{os.cpu_count()} CPUs, load average after the run {load[0]:.2f} / {load[1]:.2f}\n{versions(names)}\n"
    )
    print(report(results, names, args.concurrency))


if __name__ == "__main__":
    main()
