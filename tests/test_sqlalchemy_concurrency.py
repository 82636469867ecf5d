"""QueryCache under concurrency and on bad days: 0 stale reads with writers committing,
a paused Redis, a request cancelled while its statement runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tagcache import Cache
from tagcache.integrations.sqlalchemy import CommitInvalidationError, QueryCache

from tests.conftest import unique_namespace
from tests.redis_server import RedisProcess
from tests.sa_databases import SQLCounter
from tests.sa_models import Label

# Redis socket timeout of the paused-server test, and what a loaded machine may add.
SOCKET_TIMEOUT = 0.3
MARGIN = 2.0


async def _seed(engine: Any) -> None:
    async with AsyncSession(engine) as s:
        s.add_all([Label(id=1, name="0"), Label(id=2, name="other")])
        await s.commit()


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["READ COMMITTED", "REPEATABLE READ"])
async def test_no_stale_reads_with_writers_committing(sa_engine: Any, redis_url: str, isolation: str) -> None:
    if sa_engine.dialect.name != "postgresql":
        pytest.skip("concurrent readers and writers: PostgreSQL")
    await _seed(sa_engine)
    cache = Cache.from_url(redis_url + "?socket_timeout=5", namespace=unique_namespace("sa-stale"))
    qc = QueryCache(cache, default_ttl=300)
    # Readers at the isolation level under test; writers at PostgreSQL's default.
    factory = async_sessionmaker(
        sa_engine.execution_options(isolation_level=isolation), expire_on_commit=False
    )
    writers = async_sessionmaker(sa_engine, expire_on_commit=False)
    qc.invalidate_on_commit(factory)
    qc.invalidate_on_commit(writers)
    committed = 0  # the highest version whose commit() has returned
    stale: list[tuple[str, int, int]] = []
    reads = 0
    statements = {
        "pk lookup": lambda: select(Label.name).where(Label.id == 1),
        "table": lambda: select(Label.name).order_by(Label.id),
        "aggregate": lambda: select(func.max(Label.name)).where(Label.id == 1),
    }

    async def writer(rounds: int) -> None:
        nonlocal committed
        for _ in range(rounds):
            async with writers() as s:
                label = await s.get(Label, 1, with_for_update=True)
                assert label is not None
                version = int(label.name) + 1
                label.name = str(version)
                await s.commit()
            committed = max(committed, version)

    async def reader(n: int, rounds: int) -> None:
        nonlocal reads
        for i in range(rounds):
            name, stmt = list(statements.items())[(n + i) % len(statements)]
            floor = committed
            async with factory() as s:
                if i % 4 == 3:
                    await s.execute(select(1))  # a transaction with a snapshot already
                value = (await qc.get_or_execute(s, stmt())).scalars().first()
            reads += 1
            if int(value) < floor:
                stale.append((name, int(value), floor))

    try:
        await asyncio.gather(writer(60), writer(60), *(reader(n, 150) for n in range(8)))
    finally:
        qc.close()
        await cache.clear()
        await cache.aclose()
    assert reads == 8 * 150
    assert committed == 120
    assert stale == []
    hits = (await cache.stats()).hits
    assert hits > 0  # the cache was used, not bypassed throughout


async def test_paused_redis_statements_run_uncached_and_commits_report(
    sa_engine: Any, redis_process: Callable[..., RedisProcess]
) -> None:
    await _seed(sa_engine)
    server = redis_process()
    url = f"{server.url}?socket_timeout={SOCKET_TIMEOUT}&breaker_cooldown=0.2"
    cache = Cache.from_url(url, namespace=unique_namespace("sa-pause"))
    qc = QueryCache(cache)
    factory = async_sessionmaker(sa_engine, expire_on_commit=False)
    qc.invalidate_on_commit(factory)
    stmt = select(Label.name).where(Label.id == 1)
    try:
        async with factory() as s:
            assert (await qc.get_or_execute(s, stmt)).scalar_one() == "0"
        server.pause()
        try:
            took = []
            for _ in range(20):
                started = time.monotonic()
                async with factory() as s:
                    assert (await qc.get_or_execute(s, stmt)).scalar_one() == "0"
                took.append(time.monotonic() - started)
            assert max(took) < SOCKET_TIMEOUT + MARGIN
            # after the breaker opened, calls do not wait for Redis at all
            assert sorted(took)[len(took) // 2] < SOCKET_TIMEOUT
            async with factory() as s:
                label = await s.get(Label, 1)
                assert label is not None
                label.name = "1"
                with pytest.raises(CommitInvalidationError, match="is committed"):
                    await s.commit()
        finally:
            server.resume()
        # Back: the failed invalidation is re-applied before this process reads again,
        # so the entry cached before the pause is never served.
        async with factory() as s:
            assert (await qc.get_or_execute(s, stmt)).scalar_one() == "1"

        async def replayed() -> bool:
            async with factory() as s:
                assert (await qc.get_or_execute(s, stmt)).scalar_one() == "1"
            return (await cache.stats()).pending_invalidations == 0

        # the replay waits for the breaker's next probe (0.2 s): poll the condition
        for _ in range(200):
            if await replayed():
                break
            await asyncio.sleep(0.05)
        assert (await cache.stats()).pending_invalidations == 0
        async with factory() as s, SQLCounter(sa_engine.sync_engine) as sql:
            assert (await qc.get_or_execute(s, stmt)).scalar_one() == "1"
            assert sql.count == 0  # cached again once the replay went through
    finally:
        qc.close()
        await cache.aclose()


async def test_cancelled_while_the_statement_runs_leaves_no_lease_and_no_busy_connection(
    sa_engine: Any, redis_url: str
) -> None:
    if sa_engine.dialect.name != "postgresql":
        pytest.skip("a statement that runs long enough to be cancelled: PostgreSQL pg_sleep")
    await _seed(sa_engine)
    # A long lease: a lease left behind would make the second caller wait for it.
    cache = Cache.from_url(
        redis_url + "?socket_timeout=5", namespace=unique_namespace("sa-cancel"), lease_ttl=60.0
    )
    qc = QueryCache(cache)
    factory = async_sessionmaker(sa_engine)
    stmt = select(Label.name, func.pg_sleep(0.5)).where(Label.id == 1)
    started = asyncio.Event()

    def seen(*args: Any) -> None:
        started.set()

    event.listen(sa_engine.sync_engine, "before_cursor_execute", seen)

    async def call() -> Any:
        async with factory() as s:
            return (await qc.get_or_execute(s, stmt)).first()

    try:
        task = asyncio.ensure_future(call())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        event.remove(sa_engine.sync_engine, "before_cursor_execute", seen)
        # A second caller loads at once (no lease left to wait for) and stores.
        row = await asyncio.wait_for(call(), 20)
        assert row[0] == "0"
        assert sa_engine.sync_engine.pool.checkedout() == 0
        async with factory() as s:  # connections in the pool are usable
            assert (await s.execute(select(Label.name).where(Label.id == 2))).scalar_one() == "other"
    finally:
        await cache.clear()
        await cache.aclose()
