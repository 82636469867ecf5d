"""Shared fixtures: real Redis servers and one cache per backend kind.

Real Redis comes from ``TAGCACHE_TEST_REDIS_URL`` when set; otherwise a
throwaway ``redis-server`` is started on a free loopback port. With neither,
real-Redis tests are skipped with a reason — unless ``TAGCACHE_REQUIRE_REDIS=1``
(set in CI), which turns the skip into a failure.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tagcache import Cache
from tagcache.backends import Backend, MemoryBackend

from tests.redis_server import RedisProcess, redis_server, redis_server_available

BACKEND_KINDS = ("memory", "fakeredis", "redis")
_REQUIRE = os.environ.get("TAGCACHE_REQUIRE_REDIS", "") not in ("", "0")
_counter = itertools.count()


def no_redis(reason: str) -> None:
    """Skip, or fail when real Redis is required."""
    if _REQUIRE:
        pytest.fail(f"TAGCACHE_REQUIRE_REDIS is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis server for the whole test session."""
    url = os.environ.get("TAGCACHE_TEST_REDIS_URL")
    if url:
        yield url
        return
    if not redis_server_available():
        no_redis("no real Redis: set TAGCACHE_TEST_REDIS_URL or put redis-server on PATH")
    with redis_server() as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., str]]:
    """Start dedicated throwaway servers (e.g. with a small maxmemory); returns a URL."""
    if not redis_server_available():
        no_redis("redis-server is not on PATH, needed for a dedicated server")
    import contextlib

    stack = contextlib.ExitStack()

    def start(*args: str) -> str:
        port = stack.enter_context(redis_server(*args))
        return f"redis://127.0.0.1:{port}/0"

    with stack:
        yield start


@pytest.fixture
def redis_process() -> Iterator[Callable[..., RedisProcess]]:
    """Start dedicated ``redis-server`` processes a test may pause, kill and restart.

    ``redis_process(*args)`` starts one (extra ``redis-server`` arguments such as
    ``"--maxmemory", "3mb"``) and returns it; all are stopped after the test.
    """
    if not redis_server_available():
        no_redis("redis-server is not on PATH, needed for a dedicated server")
    started: list[RedisProcess] = []

    def start(*args: str) -> RedisProcess:
        server = RedisProcess(*args)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


def unique_namespace(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid()}-{next(_counter)}"


@pytest.fixture(params=BACKEND_KINDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_backend(
    backend_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Backend]]:
    """A factory of backends of the parametrized kind; all are closed after the test.

    ``clock`` is honoured by the memory backend only (Redis keeps its own time).
    """
    made: list[Any] = []
    fake_server: Any = None
    url = request.getfixturevalue("redis_url") if backend_kind == "redis" else None

    def factory(*, clock: Callable[[], float] | None = None, **options: Any) -> Backend:
        nonlocal fake_server
        backend: Any
        if backend_kind == "memory":
            backend = MemoryBackend(clock=clock, **options) if clock else MemoryBackend(**options)
        elif backend_kind == "fakeredis":
            import fakeredis

            from tagcache.backends.redis import RedisBackend

            if fake_server is None:
                fake_server = fakeredis.FakeServer(version=7)
            client = fakeredis.FakeAsyncRedis(server=fake_server)
            made.append(client)
            backend = RedisBackend(client, **options)
        else:
            from tagcache.backends.redis import RedisBackend

            assert url is not None
            # Tests about timeouts use the defaults on servers of their own; here a
            # loaded CI machine must not turn a slow reply into a failed test.
            options.setdefault("socket_timeout", 5.0)
            backend = RedisBackend.from_url(url, **options)
        made.append(backend)
        return backend

    yield factory
    for obj in reversed(made):
        await obj.aclose()


@pytest.fixture
async def cache(make_backend: Callable[..., Backend]) -> AsyncIterator[Cache]:
    """A cache with a unique namespace over the parametrized backend kind."""
    c = Cache(make_backend(), namespace=unique_namespace())
    try:
        yield c
    finally:
        await c.clear()
        await c.aclose()
