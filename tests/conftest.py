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

from tests.redis_cluster import Cluster, cluster_binaries_available, redis_cluster
from tests.redis_server import RedisProcess, redis_server, redis_server_available

BACKEND_KINDS = ("memory", "fakeredis", "redis", "cluster", "l1")
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


def local_cluster(primaries: int, replicas_per_primary: int) -> Iterator[Cluster]:
    """A local Redis Cluster for a fixture to yield (stopped after), or a skip saying why."""
    if not cluster_binaries_available():
        no_redis("redis-server and redis-cli are needed for a local Redis Cluster")
    with redis_cluster(primaries, replicas_per_primary) as cluster:
        yield cluster


@pytest.fixture(scope="session", name="redis_cluster")
def session_cluster() -> Iterator[Cluster]:
    """A local Redis Cluster of 3 primaries for the whole test session (stopped at its end)."""
    yield from local_cluster(3, 0)


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: Cluster) -> str:
    """``redis+cluster://`` URL of the session's local Redis Cluster."""
    return f"redis+cluster://127.0.0.1:{redis_cluster.port}/"


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
    url = request.getfixturevalue("redis_url") if backend_kind in ("redis", "l1") else None
    if backend_kind == "cluster":
        url = request.getfixturevalue("redis_cluster_url")

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
        elif backend_kind == "l1":
            from tagcache.backends.local import LocalCache, LocalLayer
            from tagcache.backends.redis import RedisBackend

            assert url is not None
            remote = RedisBackend.from_url(url, **{"socket_timeout": 5.0, **options})
            backend = LocalLayer(remote, remote.invalidation_feed(), LocalCache(ttl=60))
        elif backend_kind == "cluster":
            from tagcache.backends.cluster import RedisClusterBackend

            assert url is not None
            options.setdefault("socket_timeout", 5.0)
            backend = RedisClusterBackend.from_url(url, **options)
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


# ---------------------------------------------------------------- SQLAlchemy databases


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def sa_database(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A real database for the test session: SQLite on a temporary file, and PostgreSQL
    when ``TAGCACHE_TEST_POSTGRES_URL`` is set (see ``tests/sa_databases.py``)."""
    pytest.importorskip("sqlalchemy")
    from tests.sa_databases import database

    with database(request.param) as db:
        yield db


@pytest.fixture
async def sa_engine(sa_database: Any) -> AsyncIterator[Any]:
    """An async engine on ``sa_database`` with the tables of ``tests/sa_models.py`` created empty."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.sa_models import Base

    engine = create_async_engine(sa_database.async_url)
    if sa_database.kind == "sqlite":
        _sqlite_foreign_keys(engine.sync_engine)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def sa_sync_engine(sa_database: Any, sa_engine: Any) -> Iterator[Any]:
    """A sync engine on the same database as ``sa_engine`` (tables created by it)."""
    from sqlalchemy import create_engine

    engine = create_engine(sa_database.sync_url)
    if sa_database.kind == "sqlite":
        _sqlite_foreign_keys(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def _sqlite_foreign_keys(engine: Any) -> None:
    """Make SQLite enforce foreign keys (and their ON DELETE actions), as PostgreSQL does."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
