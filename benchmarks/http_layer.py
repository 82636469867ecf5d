"""The Starlette integration's cost, measured in the same run as its baseline.

1. In process: a Starlette endpoint answering ~1 KB of JSON, wrapped in
   ``CacheControlMiddleware(policies={...}, etag=True)``, against the same endpoint
   setting the same ``Cache-Control`` and an ETag computed the same way (``make_etag``,
   BLAKE2b of the body) itself. The ASGI apps are called directly (a minimal scope,
   ``receive`` and ``send``, no HTTP client), alternating request by request, each request
   timed; per round, the median request of each app; the figure is the median over the
   rounds of the difference: the µs the middleware adds per request.
2. Over the wire: the same two apps on uvicorn (uvloop and httptools when installed),
   each in its own process on a free loopback port, driven by 50 keep-alive connections
   of a small asyncio protocol client (one request in flight per connection). Timed
   windows of the two servers alternate; median of the rounds; requests/s and the
   ratio. The client's ceiling is measured against a server that answers every request
   with canned bytes, and the CPU time of the client and of the server is recorded in
   every window, to show the servers, not the client, set the pace; httpx.AsyncClient
   (50 connections) is timed against the plain server for comparison.
3. ``ResponseCache`` hits (``MemoryBackend``; Redis with ``--redis URL``) against the
   uncached endpoint, which runs a query of a few ms on PostgreSQL (a table created in a
   schema of this run's own, dropped at the end), through ``httpx.ASGITransport``, one
   caller; alternating batches, median of the rounds, the ratio.

    python benchmarks/http_layer.py
    python benchmarks/http_layer.py --database postgresql+asyncpg://postgres@127.0.0.1:5432/test \\
        --redis redis://127.0.0.1:6379/0 --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import starlette
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from tagcache import Cache
from tagcache.backends import MemoryBackend
from tagcache.integrations.starlette import (
    CacheControlMiddleware,
    ResponseCache,
    ResponseCacheMiddleware,
)
from tagcache.integrations.starlette.http import make_etag

from _common import median, table

try:
    import uvloop
except ImportError:  # pragma: no cover - depends on the environment
    uvloop = None  # type: ignore[assignment]
try:
    import httptools
except ImportError:  # pragma: no cover - depends on the environment
    httptools = None  # type: ignore[assignment]

CACHE_CONTROL = "public, max-age=60"
POLICIES = {r"/items/\d+": CACHE_CONTROL, r"/auth/.*": "no-store"}
PATH = "/items/1"
#: A schema of this run's own: the database may be shared.
SCRIPT = os.path.abspath(__file__)
SCHEMA = f"bench_http_{os.getpid()}_{secrets.token_hex(3)}"


# ---------------------------------------------------------------------- the endpoint


def item_payload(item_id: int) -> dict[str, Any]:
    """About 1 KB as JSON: a record with a few nested rows."""
    payload = {
        "id": item_id,
        "name": f"item-{item_id:06d}",
        "owner": {"id": 42, "name": "user-000042", "email": "user000042@example.com"},
        "tags": ["alpha", "beta", "gamma", "delta"],
        "lines": [
            {"sku": f"SKU-{item_id:04d}-{n:02d}", "qty": n + 1, "price": 9.5 + n, "note": "x" * 44}
            for n in range(8)
        ],
    }
    size = len(orjson.dumps(payload))
    assert 900 <= size <= 1200, size
    return payload


async def item_plain(request: Request) -> Response:
    """The endpoint without the middleware: it sets the same headers itself."""
    response = JSONResponse(item_payload(request.path_params["item_id"]))
    response.headers["cache-control"] = CACHE_CONTROL
    response.headers["etag"] = make_etag(response.body, weak=False)
    return response


async def item_bare(request: Request) -> Response:
    """The endpoint the middleware wraps."""
    return JSONResponse(item_payload(request.path_params["item_id"]))


def plain_app() -> Starlette:
    return Starlette(routes=[Route("/items/{item_id:int}", item_plain)])


def middleware_app() -> Starlette:
    app = Starlette(routes=[Route("/items/{item_id:int}", item_bare)])
    app.add_middleware(CacheControlMiddleware, policies=POLICIES, etag=True)
    return app


# ---------------------------------------------------------------------- 1. in process


SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": PATH,
    "raw_path": PATH.encode(),
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"accept", b"*/*"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}
REQUEST_MESSAGE: Message = {"type": "http.request", "body": b"", "more_body": False}


async def receive() -> Message:
    return REQUEST_MESSAGE


async def call_once(app: ASGIApp) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through ``app``: status, headers, body."""
    out: list[Message] = []

    async def send(message: Message) -> None:
        out.append(message)

    await app(dict(SCOPE), receive, send)
    start = out[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in out[1:])


async def interleaved_round(plain: ASGIApp, wrapped: ASGIApp, n: int) -> tuple[float, float]:
    """One round: ``n`` requests to each app, alternating one by one; the median µs of each.

    Alternating request by request puts both apps under the same machine load at every
    moment, and the median of each keeps a garbage collection or a preemption from moving
    the figure; the timer's own cost is the same on both sides and cancels in the difference.
    """
    sent = 0

    async def send(message: Message) -> None:
        nonlocal sent
        sent += 1

    clock = time.perf_counter_ns
    plain_ns: list[int] = []
    wrapped_ns: list[int] = []
    gc.collect()
    for i in range(n):
        first, second, first_ns, second_ns = (
            (plain, wrapped, plain_ns, wrapped_ns) if i % 2 else (wrapped, plain, wrapped_ns, plain_ns)
        )
        scope = dict(SCOPE)
        t0 = clock()
        await first(scope, receive, send)
        t1 = clock()
        scope = dict(SCOPE)
        await second(scope, receive, send)
        t2 = clock()
        first_ns.append(t1 - t0)
        second_ns.append(t2 - t1)
    assert sent == 4 * n
    return median(plain_ns) / 1000, median(wrapped_ns) / 1000


async def in_process(ops: int, rounds: int) -> dict[str, Any]:
    plain, wrapped = plain_app(), middleware_app()
    a, b = await call_once(plain), await call_once(wrapped)
    if a[0] != 200 or a[0] != b[0] or a[2] != b[2]:
        raise SystemExit("in process: the two apps do not answer the same")
    for name in (b"cache-control", b"etag", b"content-type", b"content-length"):
        if a[1].get(name) != b[1].get(name):
            raise SystemExit(f"in process: the two apps differ in {name.decode()}: {a[1]} / {b[1]}")
    await interleaved_round(plain, wrapped, ops // 5 or 1)  # warm-up
    plain_us: list[float] = []
    wrapped_us: list[float] = []
    for _ in range(rounds):
        p, w = await interleaved_round(plain, wrapped, ops)
        plain_us.append(p)
        wrapped_us.append(w)
    added = [w - p for p, w in zip(plain_us, wrapped_us, strict=True)]
    return {
        "ops": ops,
        "rounds": rounds,
        "plain_us": median(plain_us),
        "middleware_us": median(wrapped_us),
        "added_us": median(added),
        "added_us_range": [min(added), max(added)],
        "rounds_us": {"plain": plain_us, "middleware": wrapped_us},
    }


# ---------------------------------------------------------------------- 2. over the wire


CANNED_BODY = orjson.dumps(item_payload(1))


def serve(kind: str, port: int) -> None:
    """Run one server (a subprocess of the benchmark) until it is killed."""
    if kind == "canned":
        serve_canned(port)
        return
    app = plain_app() if kind == "plain" else middleware_app()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop" if uvloop is not None else "asyncio",
        http="httptools" if httptools is not None else "h11",
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def serve_canned(port: int) -> None:
    """A server answering every request with the same bytes: the client's ceiling."""
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: "
        + CACHE_CONTROL.encode()
        + b"\r\netag: "
        + make_etag(CANNED_BODY, weak=False).encode()
        + b"\r\ncontent-length: "
        + str(len(CANNED_BODY)).encode()
        + b"\r\n\r\n"
        + CANNED_BODY
    )

    class Canned(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(response * data.count(b"\r\n\r\n"))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", port, backlog=1024)
        await server.serve_forever()

    run(main())


def run(coro: Awaitable[Any]) -> Any:
    if uvloop is not None:
        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    kind: str
    port: int
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """utime + stime of the server process, from /proc (Linux)."""
        try:
            with open(f"/proc/{self.process.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")


def spawn(kind: str) -> Server:
    """Start a server process (this script with ``--serve``) on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, SCRIPT, "--serve", kind, "--port", str(port)], stdin=subprocess.DEVNULL
    )
    return Server(kind, port, process)


async def start_server(kind: str) -> Server:
    server = spawn(kind)
    port, process = server.port, server.process
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {kind} server exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return server
    process.kill()
    raise SystemExit(f"the {kind} server did not start in 30 s")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


REQUEST_BYTES = f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\nUser-Agent: bench\r\n\r\n".encode()


class Load:
    """State shared by the connections of one window."""

    def __init__(self) -> None:
        self.running = True
        self.done = 0
        self.bad = 0
        self.first: bytes | None = None


class Connection(asyncio.Protocol):
    """One keep-alive connection: a request, its whole response, the next request."""

    def __init__(self, load: Load, finished: asyncio.Future[None]) -> None:
        self.load = load
        self.finished = finished
        self.buffer = b""
        self.need = -1
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(REQUEST_BYTES)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if self.need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            head = buffer[:end].lower()
            at = head.find(b"\r\ncontent-length:") + 17
            stop = head.find(b"\r\n", at)
            length = int(head[at:] if stop < 0 else head[at:stop])
            self.need = end + 4 + length
            if not head.startswith(b"http/1.1 200"):
                self.load.bad += 1
        if len(buffer) < self.need:
            self.buffer = buffer
            return
        load = self.load
        if load.first is None:
            load.first = buffer
        load.done += 1
        self.buffer, self.need = b"", -1
        if load.running:
            self.transport.write(REQUEST_BYTES)
        elif not self.finished.done():
            self.finished.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc or ConnectionError("the server closed the connection"))


@dataclass
class Window:
    rps: float
    client_cpu: float  # share of one core
    server_cpu: float  # share of one core
    first: bytes = b""


async def drive(server: Server, connections: int, warmup: float, seconds: float) -> Window:
    """Requests/s of ``server`` under ``connections`` concurrent keep-alive connections."""
    loop = asyncio.get_running_loop()
    load = Load()
    finished: list[asyncio.Future[None]] = []
    transports = []
    for _ in range(connections):
        fut: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda fut=fut: Connection(load, fut), "127.0.0.1", server.port
        )
        finished.append(fut)
        transports.append(transport)
    try:
        await asyncio.sleep(warmup)
        n0, t0, c0, s0 = load.done, time.perf_counter(), time.process_time(), server.cpu_seconds()
        await asyncio.sleep(seconds)
        n1, t1, c1, s1 = load.done, time.perf_counter(), time.process_time(), server.cpu_seconds()
        load.running = False
        await asyncio.wait_for(asyncio.gather(*finished), 30)
    finally:
        for transport in transports:
            transport.close()
    if load.bad:
        raise SystemExit(f"{server.kind}: {load.bad} responses were not 200")
    wall = t1 - t0
    return Window((n1 - n0) / wall, (c1 - c0) / wall, (s1 - s0) / wall, load.first or b"")


async def httpx_rps(server: Server, connections: int, seconds: float) -> float:
    """Requests/s of ``httpx.AsyncClient`` with ``connections`` concurrent callers."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    done = 0
    url = f"http://127.0.0.1:{server.port}{PATH}"
    async with httpx.AsyncClient(limits=limits) as client:
        stop = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                (await client.get(url)).raise_for_status()
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(connections)))
        return done / (time.perf_counter() - start)


def split_response(raw: bytes) -> tuple[dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


async def over_the_wire(
    connections: int, rounds: int, seconds: float, warmup: float, check_httpx: bool
) -> dict[str, Any]:
    servers = await asyncio.gather(start_server("plain"), start_server("middleware"), start_server("canned"))
    plain, wrapped, canned = servers
    try:
        # Same answers over the wire.
        a, b = await drive(plain, 1, 0.05, 0.05), await drive(wrapped, 1, 0.05, 0.05)
        ha, body_a = split_response(a.first)
        hb, body_b = split_response(b.first)
        if body_a != body_b or any(ha.get(n) != hb.get(n) for n in (b"cache-control", b"etag")):
            raise SystemExit("over the wire: the two servers do not answer the same")
        windows: dict[str, list[Window]] = {"plain": [], "middleware": []}
        for r in range(rounds):
            order = (plain, wrapped) if r % 2 == 0 else (wrapped, plain)
            for server in order:
                windows[server.kind].append(await drive(server, connections, warmup, seconds))
        ceiling = [await drive(canned, connections, warmup, seconds) for _ in range(max(1, rounds // 3))]
        httpx_ceiling = await httpx_rps(plain, connections, seconds) if check_httpx else None
    finally:
        for server in servers:
            stop_server(server)
    rps = {k: [w.rps for w in v] for k, v in windows.items()}
    per_round = [m / p for p, m in zip(rps["plain"], rps["middleware"], strict=True)]
    return {
        "server": f"uvicorn {uvicorn.__version__}, loop={'uvloop' if uvloop else 'asyncio'}, "
        f"http={'httptools' if httptools else 'h11'}, 1 worker",
        "connections": connections,
        "rounds": rounds,
        "seconds": seconds,
        "plain_rps": median(rps["plain"]),
        "middleware_rps": median(rps["middleware"]),
        "ratio": median(rps["middleware"]) / median(rps["plain"]),
        "round_ratios": per_round,
        "client_cpu": median([w.client_cpu for v in windows.values() for w in v]),
        "server_cpu": {k: median([w.server_cpu for w in v]) for k, v in windows.items()},
        "canned_rps": median([w.rps for w in ceiling]),
        "canned_client_cpu": median([w.client_cpu for w in ceiling]),
        "httpx_canned_rps": httpx_ceiling,
        "rounds_rps": rps,
    }


# ---------------------------------------------------------------------- 3. ResponseCache


async def create_table(engine: Any, rows: int) -> None:
    from sqlalchemy import text

    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
        await conn.execute(
            text(
                f'CREATE TABLE "{SCHEMA}".orders (id int PRIMARY KEY, customer int NOT NULL, '
                "amount numeric(10, 2) NOT NULL, placed timestamptz NOT NULL)"
            )
        )
        await conn.execute(
            text(
                f'INSERT INTO "{SCHEMA}".orders SELECT i, i % 200, (i % 1000) / 10.0 + 0.5, '
                "timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute' "
                "FROM generate_series(1, :rows) AS i"
            ),
            {"rows": rows},
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'ANALYZE "{SCHEMA}".orders'))


async def drop_schema(engine: Any) -> None:
    from sqlalchemy import text

    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'))


def report_endpoint(engine: Any) -> Callable[[Request], Awaitable[Response]]:
    from sqlalchemy import text

    query = text(
        f'SELECT customer, count(*) AS orders, sum(amount) AS total, max(placed) AS last FROM "{SCHEMA}".orders '
        "GROUP BY customer ORDER BY total DESC, customer LIMIT 10"
    )

    async def report(request: Request) -> Response:
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return JSONResponse(
            [
                {"customer": c, "orders": n, "total": str(total), "last": last.isoformat()}
                for c, n, total, last in rows
            ]
        )

    return report


def counted(
    endpoint: Callable[[Request], Awaitable[Response]], calls: list[int]
) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        calls.append(1)
        return await endpoint(request)

    return run


@dataclass
class CachedApp:
    label: str
    cache: Cache
    client: httpx.AsyncClient
    calls: list[int]
    times: list[float] = field(default_factory=list)


@contextlib.asynccontextmanager
async def asgi_client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        yield client


async def us_per_get(client: httpx.AsyncClient, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        response = await client.get("/report")
        if response.status_code != 200:
            raise SystemExit(f"/report answered {response.status_code}")
    return (time.perf_counter() - start) / n * 1e6


async def response_cache(
    database: str, redis_url: str | None, rows: int, plain_ops: int, hit_ops: int, rounds: int
) -> dict[str, Any]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database, pool_size=2)
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    caches: list[tuple[str, Cache]] = [("memory", Cache(MemoryBackend(), namespace=f"bench-http-{run_id}"))]
    if redis_url:
        caches.append(("Redis", Cache.from_url(redis_url, namespace=f"bench-http-{run_id}")))
    try:
        await create_table(engine, rows)
        endpoint = report_endpoint(engine)
        async with contextlib.AsyncExitStack() as stack:
            plain = await stack.enter_async_context(
                asgi_client(Starlette(routes=[Route("/report", endpoint)]))
            )
            targets: list[CachedApp] = []
            for label, cache in caches:
                await cache.clear()
                responses = ResponseCache(cache, ttl=3600)
                calls: list[int] = []
                app = Starlette(
                    routes=[Route("/report", responses.cached(tags=["orders"])(counted(endpoint, calls)))]
                )
                app.add_middleware(ResponseCacheMiddleware, responses=responses)
                client = await stack.enter_async_context(asgi_client(app))
                targets.append(CachedApp(label, cache, client, calls))
            expected = (await plain.get("/report")).content
            for t in targets:
                first, again = await t.client.get("/report"), await t.client.get("/report")
                if not expected == first.content == again.content or "age" not in again.headers:
                    raise SystemExit(f"{t.label}: the cached /report is not the database's, or not a hit")
            await us_per_get(plain, max(1, plain_ops // 5))
            for t in targets:
                await us_per_get(t.client, max(1, hit_ops // 5))
                t.calls.clear()
            plain_times: list[float] = []
            for _ in range(rounds):
                plain_times.append(await us_per_get(plain, plain_ops))
                for t in targets:
                    t.times.append(await us_per_get(t.client, hit_ops))
            for t in targets:
                # Not the cache's miss count: every request also reads the URL's (absent) shape entry.
                if t.calls:
                    raise SystemExit(f"{t.label}: the endpoint ran {len(t.calls)} times in the timed runs")
    finally:
        for _, cache in caches:
            try:
                await cache.clear()
            finally:
                await cache.aclose()
        await drop_schema(engine)
        await engine.dispose()
    p = median(plain_times)
    return {
        "rows": rows,
        "rounds": rounds,
        "plain_ops": plain_ops,
        "hit_ops": hit_ops,
        "plain_us": p,
        "hits": [
            {
                "cache": t.label,
                "hit_us": median(t.times),
                "ratio": p / median(t.times),
                "round_ratios": [a / b for a, b in zip(plain_times, t.times, strict=True)],
            }
            for t in targets
        ],
        "rounds_us": {"plain": plain_times, **{t.label: t.times for t in targets}},
    }


# ---------------------------------------------------------------------- main


def write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


async def main(args: argparse.Namespace) -> None:
    report: dict[str, Any] = {
        "benchmark": "http",
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "starlette": starlette.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
        "cpus": os.cpu_count(),
        "client_loop": "uvloop" if uvloop else "asyncio",
        "smoke": args.smoke,
    }

    inproc = await in_process(args.ops, args.rounds)
    report["in_process"] = inproc
    print(
        f"1. In process (ASGI called directly, ~1 KB JSON, {args.ops:,} requests to each app x "
        f"{args.rounds} rounds, alternating request by request; median request, median round):"
    )
    print(
        table(
            ["app", "µs/request"],
            [
                ("endpoint setting Cache-Control and ETag itself", f"{inproc['plain_us']:.2f}"),
                ("CacheControlMiddleware(etag=True) around the endpoint", f"{inproc['middleware_us']:.2f}"),
            ],
        )
    )
    low, high = inproc["added_us_range"]
    verdict = "met" if inproc["added_us"] <= 5 else "missed"
    print(
        f"added by the middleware: {inproc['added_us']:.2f} µs per request (median of the per-round "
        f"differences; rounds {low:.2f} to {high:.2f}); target <= 5 µs: {verdict}"
    )
    print()

    if args.wire_rounds:
        wire = await over_the_wire(
            args.connections, args.wire_rounds, args.seconds, args.warmup, check_httpx=not args.smoke
        )
        report["over_the_wire"] = wire
        print(
            f"2. Over the wire ({wire['server']}; {args.connections} keep-alive connections, "
            f"{args.seconds:g} s windows x {args.wire_rounds} rounds, alternating, median):"
        )
        print(
            table(
                ["server", "requests/s", "server CPU", "client CPU"],
                [
                    (
                        "endpoint setting the headers itself",
                        f"{wire['plain_rps']:,.0f}",
                        f"{wire['server_cpu']['plain']:.0%}",
                        "",
                    ),
                    (
                        "with CacheControlMiddleware",
                        f"{wire['middleware_rps']:,.0f}",
                        f"{wire['server_cpu']['middleware']:.0%}",
                        f"{wire['client_cpu']:.0%} (both)",
                    ),
                    (
                        "canned bytes (the client's ceiling)",
                        f"{wire['canned_rps']:,.0f}",
                        "",
                        f"{wire['canned_client_cpu']:.0%}",
                    ),
                ],
            )
        )
        change = 1 - wire["ratio"]
        rr = wire["round_ratios"]
        print(
            f"with the middleware: {wire['ratio']:.3f}x the requests/s ({abs(change):.1%} "
            f"{'fewer' if change >= 0 else 'more'}; rounds "
            f"{min(rr):.3f}x to {max(rr):.3f}x); target <= 10% fewer: {'met' if change <= 0.10 else 'missed'}"
        )
        if wire["httpx_canned_rps"] is not None:
            print(
                f"httpx.AsyncClient ({args.connections} connections) against the plain server: "
                f"{wire['httpx_canned_rps']:,.0f} requests/s"
            )
        print()

    rc = await response_cache(args.database, args.redis, args.rows, args.plain_ops, args.hit_ops, args.rounds)
    report["response_cache"] = rc
    print(
        f"3. ResponseCache hit against the endpoint querying PostgreSQL ({args.rows:,} rows, top 10 of 200 "
        f"customers by total; httpx.ASGITransport, 1 caller; {args.plain_ops} plain and {args.hit_ops} "
        f"cached requests x {args.rounds} rounds, median):"
    )
    print(
        table(
            ["request", "µs/request", "ratio"],
            [("uncached (the query runs)", f"{rc['plain_us']:,.1f}", "1.00x")]
            + [
                (f"ResponseCache hit ({h['cache']})", f"{h['hit_us']:,.1f}", f"{h['ratio']:.2f}x")
                for h in rc["hits"]
            ],
        )
    )
    for h in rc["hits"]:
        rr = h["round_ratios"]
        print(f"{h['cache']} hit: {h['ratio']:.2f}x faster (rounds {min(rr):.2f}x to {max(rr):.2f}x)")

    if args.json:
        write_json(args.json, report)
        print(f"figures written to {args.json}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default=None, help="Redis URL: also measure ResponseCache hits over Redis")
    parser.add_argument("--ops", type=int, default=20_000, help="in-process requests to each app per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of parts 1 and 3 (>= 7 for figures)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--wire-rounds", type=int, default=9, help="0 skips the uvicorn part")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed window per server and round")
    parser.add_argument("--warmup", type=float, default=0.5, help="untimed start of every window")
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the PostgreSQL table")
    parser.add_argument("--plain-ops", type=int, default=200, help="uncached requests per round")
    parser.add_argument("--hit-ops", type=int, default=2000, help="cached requests per round")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--serve", choices=["plain", "middleware", "canned"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.ops, args.rounds, args.wire_rounds, args.seconds, args.warmup = 500, 1, 1, 0.3, 0.1
        args.rows, args.plain_ops, args.hit_ops = 2000, 10, 50
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve:
        serve(arguments.serve, arguments.port)
    else:
        run(main(arguments))
