"""QueryCache against real databases (SQLite on a file, PostgreSQL when configured),
over the memory backend and a real Redis: hit/miss equivalence, commit-time
invalidation, the bypass rules, the execution-option opt-in, sync sessions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, selectinload, sessionmaker

from tagcache import Cache, ConfigurationError
from tagcache.backends import MemoryBackend
from tagcache.integrations.sqlalchemy import CommitInvalidationError, QueryCache

from tests.conftest import unique_namespace
from tests.sa_databases import SQLCounter
from tests.sa_models import Label, Plan, Project, User

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["memory", "redis"])
async def qc_cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    if request.param == "memory":
        cache = Cache(MemoryBackend(), namespace=unique_namespace("sa"))
    else:
        url = request.getfixturevalue("redis_url")
        cache = Cache.from_url(url + "?socket_timeout=5", namespace=unique_namespace("sa"))
    try:
        yield cache
    finally:
        await cache.clear()
        await cache.aclose()


@pytest.fixture
async def seeded(sa_engine: Any) -> Any:
    async with AsyncSession(sa_engine) as s:
        labels = [Label(id=i, name=f"label{i}") for i in range(1, 4)]
        s.add_all(labels)
        for i in range(1, 6):
            s.add(
                User(
                    id=i,
                    name=f"user{i}",
                    email=f"u{i}@example.com",
                    is_active=i % 2 == 1,
                    plan=Plan.PRO if i == 1 else Plan.FREE,
                    created_at=NOW,
                    projects=[
                        Project(id=i * 10 + j, title=f"p{i}-{j}", budget=Decimal("1.50"), labels=labels[:j])
                        for j in range(1, 3)
                    ],
                )
            )
        await s.commit()
    return sa_engine


@pytest.fixture
def factory(seeded: Any) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(seeded, expire_on_commit=False)


@pytest.fixture
async def qc(qc_cache: Cache, factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[QueryCache]:
    q = QueryCache(qc_cache, default_ttl=300)
    q.invalidate_on_commit(factory)
    try:
        yield q
    finally:
        q.close()


def snapshot(result: Any) -> list[Any]:
    """A comparable picture of a result's rows: ORM objects by their column values."""
    out = []
    for row in result:
        out.append(tuple(_plain(v) for v in row))
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "__table__"):
        return (type(value).__name__, value.id)
    return (type(value).__name__, value)


SHAPES: dict[str, Callable[[], Any]] = {
    "entities": lambda: select(User).where(User.is_active).order_by(User.id),
    "columns": lambda: select(User.id, User.name, User.created_at).order_by(User.id),
    "join": lambda: select(User.name, Project.title).join(Project).order_by(Project.id),
    "aggregate": lambda: (
        select(User.name, func.count(Project.id).label("n"))
        .join(Project)
        .group_by(User.name)
        .order_by(User.name)
    ),
    "subquery": lambda: select(User).where(
        User.id.in_(select(Project.owner_id).where(Project.title.like("p1-%")))
    ),
    "selectinload": lambda: select(User).options(selectinload(User.projects).selectinload(Project.labels)),
}


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_hit_equals_the_miss_and_runs_no_sql(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any, shape: str
) -> None:
    stmt = SHAPES[shape]
    async with factory() as s:
        miss = snapshot(await qc.get_or_execute(s, stmt()))
        plain = snapshot(await s.execute(stmt()))
    assert miss == plain
    async with factory() as s:
        with SQLCounter(seeded.sync_engine) as sql:
            result = await qc.get_or_execute(s, stmt())
            rows = result.all()
        assert sql.count == 0, sql.statements
        assert snapshot(rows) == plain
        if shape == "selectinload":
            with SQLCounter(seeded.sync_engine) as sql:
                titles = [[(p.title, [lb.name for lb in p.labels]) for p in u.projects] for (u,) in rows]
            assert sql.count == 0
            assert titles[0] == [("p1-1", ["label1"]), ("p1-2", ["label1", "label2"])]


async def test_hit_objects_are_the_sessions_identities(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession]
) -> None:
    stmt = select(User).where(User.id == 1)
    async with factory() as s:
        await qc.get_or_execute(s, stmt)
    async with factory() as s:
        (user,) = (await qc.get_or_execute(s, stmt)).scalars().all()
        assert user is await s.get(User, 1)
        assert user.plan is Plan.PRO
        assert user.created_at.replace(tzinfo=None) == NOW.replace(tzinfo=None)  # SQLite keeps no zone
    async with factory() as s:
        mine = await s.get(User, 1)
        assert mine is not None
        mine.name = "changed in memory"
        hit = (await qc.get_or_execute(s, select(User).where(User.id == 1))).scalar_one()
        assert hit is mine and hit.name == "changed in memory"  # unchanged, as on a miss


async def test_mappings_one_first_keys_match(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession]
) -> None:
    stmt = select(User.id, User.name.label("who")).where(User.id == 2)
    async with factory() as s:
        miss = await qc.get_or_execute(s, stmt)
        assert list(miss.keys()) == ["id", "who"]
        miss_map = miss.mappings().one()
    async with factory() as s:
        hit = await qc.get_or_execute(s, stmt)
        assert list(hit.keys()) == ["id", "who"]
        assert hit.mappings().one() == miss_map == {"id": 2, "who": "user2"}
        assert (await qc.get_or_execute(s, stmt)).first() == (2, "user2")


async def test_commit_invalidates_every_statement_over_the_table(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    shapes = ["entities", "aggregate", "join", "columns"]
    async with factory() as s:
        for shape in shapes:
            await qc.get_or_execute(s, SHAPES[shape]())
    async with factory() as s:
        project = await s.get(Project, 11)
        assert project is not None
        project.title = "renamed"  # projects only: the join and the aggregate read it
        await s.commit()
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        join = snapshot(await qc.get_or_execute(s, SHAPES["join"]()))
        await qc.get_or_execute(s, SHAPES["aggregate"]())
        assert sql.count == 2
        assert ("str", "renamed") in [row[1] for row in join]
        await qc.get_or_execute(s, SHAPES["columns"]())  # users only: still cached
        assert sql.count == 2
    async with factory() as s:
        s.add(User(id=99, name="new", email="n@example.com", created_at=NOW))
        await s.commit()
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        ids = [row[0] for row in (await qc.get_or_execute(s, SHAPES["columns"]())).all()]
        assert 99 in ids and sql.count == 1
    async with factory() as s:
        await s.delete(await s.get(User, 99))
        await s.commit()
    async with factory() as s:
        ids = [row[0] for row in (await qc.get_or_execute(s, SHAPES["columns"]())).all()]
        assert 99 not in ids


async def test_a_reader_right_after_commit_sees_the_new_data(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession]
) -> None:
    stmt = select(User.name).where(User.id == 3)
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one() == "user3"
    async with factory() as s:
        await s.execute(update(User).where(User.id == 3).values(name="bulk"))
        async with factory() as other:  # bulk update: invalidated at commit, not before
            assert (await qc.get_or_execute(other, stmt)).scalar_one() == "user3"
        await s.commit()
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one() == "bulk"


async def test_rollback_of_flushed_changes_invalidates_nothing(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    stmt = select(User.name).order_by(User.id)
    async with factory() as s:
        await qc.get_or_execute(s, stmt)
    async with factory() as s:
        user = await s.get(User, 1)
        assert user is not None
        user.name = "flushed, then rolled back"
        await s.flush()
        # the session's own flushed write is visible to it: the cache is bypassed
        names = (await qc.get_or_execute(s, stmt)).scalars().all()
        assert names[0] == "flushed, then rolled back"
        async with factory() as other:  # and never to others
            assert (await qc.get_or_execute(other, stmt)).scalars().all()[0] == "user1"
        await s.rollback()
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        assert (await qc.get_or_execute(s, stmt)).scalars().all()[0] == "user1"
        assert sql.count == 0  # still the cached entry


async def test_pending_changes_bypass_the_cache(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession]
) -> None:
    stmt = select(func.count(User.id))
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one() == 5
        s.add(User(id=50, name="pending", email="p@example.com", created_at=NOW))
        assert (await qc.get_or_execute(s, stmt)).scalar_one() == 6  # autoflushed, own write
        await s.rollback()


async def test_delete_cascade_invalidates_the_child_table(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession]
) -> None:
    stmt = select(func.count(Project.id))
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one() == 10
    async with factory() as s:
        # Core delete: the database removes user 5's projects (ON DELETE CASCADE)
        await s.execute(delete(User).where(User.id == 5))
        await s.commit()
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one() == 8


async def test_opt_in_execution_option(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    stmt = select(User).where(User.is_active).order_by(User.id)
    async with factory() as s:
        miss = snapshot(await s.execute(stmt, execution_options={"tagcache": {"ttl": 600}}))
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        hit = await s.execute(stmt, execution_options={"tagcache": {"ttl": 600}})
        assert snapshot(hit) == miss and sql.count == 0
        # the same entry as get_or_execute: one code path, one key
        await qc.get_or_execute(s, stmt)
        assert sql.count == 0
    async with factory() as s:
        with pytest.raises(TypeError, match="unknown keys"):
            await s.execute(stmt, execution_options={"tagcache": {"tll": 5}})


async def test_textual_sql_runs_uncached_unless_tables_are_given(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stmt = select(User.id).where(text("name = 'user1'"))
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        for _ in range(3):
            async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
                assert (await qc.get_or_execute(s, stmt)).scalar_one() == 1
                assert sql.count == 1
    assert sum("without the query cache" in r.message for r in caplog.records) == 1
    async with factory() as s:
        await qc.get_or_execute(s, stmt, tables=["users"])
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        assert (await qc.get_or_execute(s, stmt, tables=["users"])).scalar_one() == 1
        assert sql.count == 0
    await qc.invalidate_tables("users")
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        await qc.get_or_execute(s, stmt, tables=["users"])
        assert sql.count == 1


async def test_for_update_is_never_cached(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    stmt = select(User).where(User.id == 1).with_for_update()
    for _ in range(2):
        async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
            await qc.get_or_execute(s, stmt)
            assert sql.count == 1


async def test_results_over_max_rows_are_returned_uncached_and_counted(
    qc_cache: Cache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    small = QueryCache(qc_cache, max_rows=3)
    stmt = select(Project.id).order_by(Project.id)
    for _ in range(2):
        async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
            assert len((await small.get_or_execute(s, stmt)).all()) == 10
            assert sql.count == 1
    stats = await qc_cache.stats()
    assert stats.not_stored == 2 and stats.errors == 0
    function = qc_cache.function_stats()["tagcache.QueryCache"]
    assert (function.misses, function.not_stored, function.errors) == (2, 2, 0)


async def test_explicit_tags_are_added(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    stmt = select(User.id).where(User.is_active)
    async with factory() as s:
        await qc.get_or_execute(s, stmt, tags=["active_users"])
    await qc.cache.invalidate_tags(["active_users"])
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        await qc.get_or_execute(s, stmt, tags=["active_users"])
        assert sql.count == 1


async def test_primary_key_lookups_survive_writes_to_other_rows(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    stmt = select(Label).where(Label.id == 1)
    async with factory() as s:
        await qc.get_or_execute(s, stmt)
    async with factory() as s:
        label = await s.get(Label, 2)
        assert label is not None
        label.name = "other row"
        await s.commit()
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        assert (await qc.get_or_execute(s, stmt)).scalar_one().name == "label1"
        assert sql.count == 0
    async with factory() as s:
        await s.execute(update(Label).values(name="bulk"))  # rows unknown: every lookup
        await s.commit()
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one().name == "bulk"
    async with factory() as s:
        label = await s.get(Label, 1)
        assert label is not None
        label.name = "this row"
        await s.commit()
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one().name == "this row"


async def test_two_databases_never_share_an_entry(qc_cache: Cache, tmp_path: Any) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.sa_models import Base

    qc = QueryCache(qc_cache)
    names = []
    for n in ("a", "b"):
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / n}.db")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with AsyncSession(engine) as s:
            s.add(Label(id=1, name=f"in {n}"))
            await s.commit()
        async with AsyncSession(engine) as s:
            names.append((await qc.get_or_execute(s, select(Label.name))).scalar_one())
        await engine.dispose()
    assert names == ["in a", "in b"]


async def test_sync_session_in_a_worker_thread(
    qc: QueryCache, qc_cache: Cache, sa_sync_engine: Any, seeded: Any
) -> None:
    maker = sessionmaker(sa_sync_engine, expire_on_commit=False)
    qc.invalidate_on_commit(maker)
    stmt = select(User.name).where(User.id == 4)

    def read() -> tuple[str, int]:
        with maker() as s, SQLCounter(sa_sync_engine) as sql:
            name = s.execute(stmt, execution_options={"tagcache": True}).scalar_one()
            return name, sql.count

    def write() -> None:
        with maker() as s:
            user = s.get(User, 4)
            assert user is not None
            user.name = "from a thread"
            s.commit()

    assert await asyncio.to_thread(read) == ("user4", 1)
    assert await asyncio.to_thread(read) == ("user4", 0)
    await asyncio.to_thread(write)
    assert await asyncio.to_thread(read) == ("from a thread", 1)


async def test_sync_session_committing_on_the_loop_thread_is_refused(
    qc: QueryCache, sa_sync_engine: Any, seeded: Any
) -> None:
    maker = sessionmaker(sa_sync_engine)
    qc.invalidate_on_commit(maker)
    with maker() as s:
        user = s.get(User, 2)
        assert user is not None
        user.name = "blocked"
        with pytest.raises(ConfigurationError, match="worker thread"):
            s.commit()
        s.rollback()


async def test_commit_raises_when_the_invalidation_fails(
    factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    from tagcache import BackendError

    class Failing(MemoryBackend):
        fail = False

        async def invalidate(self, ns: str, tags: Any) -> None:
            if self.fail:
                raise BackendError("invalidate failed (test)")
            await super().invalidate(ns, tags)

    backend = Failing()
    cache = Cache(backend, namespace=unique_namespace("sa"))
    qc = QueryCache(cache)
    qc.invalidate_on_commit(factory)
    stmt = select(User.name).where(User.id == 1)
    try:
        async with factory() as s:
            await qc.get_or_execute(s, stmt)
        backend.fail = True
        async with factory() as s:
            user = await s.get(User, 1)
            assert user is not None
            user.name = "committed anyway"
            with pytest.raises(CommitInvalidationError, match="is committed") as info:
                await s.commit()
            assert "table:users" in info.value.tags
        async with factory() as s:  # the data is committed
            assert (await s.execute(stmt)).scalar_one() == "committed anyway"
            # this process bypasses the cache until the invalidation is re-applied
            assert (await qc.get_or_execute(s, stmt)).scalar_one() == "committed anyway"
        backend.fail = False
        async with factory() as s:
            assert (await qc.get_or_execute(s, stmt)).scalar_one() == "committed anyway"
        assert (await cache.stats()).pending_invalidations == 0
    finally:
        qc.close()
        await cache.aclose()


async def test_repeatable_read_transaction_bypasses_after_its_first_statement(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    if seeded.dialect.name != "postgresql":
        pytest.skip("isolation levels: PostgreSQL")
    stmt = select(User.name).where(User.id == 1)
    async with factory() as s:
        await qc.get_or_execute(s, stmt)
    async with factory() as s:
        await s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        await s.execute(select(1))
        with SQLCounter(seeded.sync_engine) as sql:
            await qc.get_or_execute(s, stmt)
            assert sql.count == 1  # its snapshot may be older than the cache: run it


async def test_sessions_of_another_factory_are_not_watched(
    qc: QueryCache, seeded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    other = async_sessionmaker(seeded)
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        async with other() as s:
            await qc.get_or_execute(s, select(User.id))
            await qc.get_or_execute(s, select(User.id))
    assert sum("does not watch" in r.message for r in caplog.records) == 1


async def test_session_type_is_checked(qc: QueryCache) -> None:
    with pytest.raises(TypeError, match="Session or AsyncSession"):
        await qc.get_or_execute(object(), select(User))  # type: ignore[arg-type]  # the wrong type on purpose


async def test_factory_type_is_checked_and_a_session_class_accepted(qc_cache: Cache) -> None:
    q = QueryCache(qc_cache)
    with pytest.raises(TypeError, match="sessionmaker"):
        q.invalidate_on_commit(object())  # type: ignore[arg-type]  # the wrong type on purpose
    q.invalidate_on_commit(Session)
    q.close()


async def test_objects_a_session_held_with_older_values_are_not_stored(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    stmt = select(User).where(User.id.in_([1, 2])).order_by(User.id)
    async with factory() as old:
        held = await old.get(User, 1)  # loaded before another session's commit
        assert held is not None and held.name == "user1"
        async with factory() as writer:
            user = await writer.get(User, 1)
            assert user is not None
            user.name = "renamed meanwhile"
            await writer.commit()
        # As session.execute would, the miss returns the session's object unchanged...
        rows = (await qc.get_or_execute(old, stmt)).scalars().all()
        assert rows[0] is held and held.name == "user1"
    # ...but that result is not stored for others: they read the committed name.
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalars().all()[0].name == "renamed meanwhile"


async def test_a_savepoint_release_is_not_the_outer_commit(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession]
) -> None:
    stmt = select(User.name).where(User.id == 2)
    async with factory() as s:
        await qc.get_or_execute(s, stmt)
    async with factory() as s:
        async with s.begin_nested():
            user = await s.get(User, 2)
            assert user is not None
            user.name = "in a savepoint"
        # released, not committed: others still read the committed value, from the cache
        async with factory() as other:
            assert (await qc.get_or_execute(other, stmt)).scalar_one() == "user2"
        await s.commit()
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt)).scalar_one() == "in a savepoint"


async def test_the_miss_runs_in_the_callers_task(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    from sqlalchemy import event

    tasks: list[object] = []

    def seen(*args: Any) -> None:
        tasks.append(asyncio.current_task())

    event.listen(seeded.sync_engine, "before_cursor_execute", seen)
    try:
        async with factory() as s:
            await qc.get_or_execute(s, select(User.id).where(User.id > 1))
    finally:
        event.remove(seeded.sync_engine, "before_cursor_execute", seen)
    assert tasks and all(t is asyncio.current_task() for t in tasks)


async def test_a_statement_can_carry_the_option_itself(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    stmt = select(User.id).where(User.is_active).execution_options(tagcache={"tags": ["active_users"]})
    async with factory() as s:
        first = (await s.execute(stmt)).scalars().all()
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        assert (await s.execute(stmt)).scalars().all() == first
        assert sql.count == 0
    await qc.cache.invalidate_tags(["active_users"])
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        await s.execute(stmt)
        assert sql.count == 1


async def test_a_write_given_to_get_or_execute_runs_uncached_and_is_invalidated(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], caplog: pytest.LogCaptureFixture
) -> None:
    read = select(User.name).where(User.id == 1)
    async with factory() as s:
        await qc.get_or_execute(s, read)
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        async with factory() as s:
            await qc.get_or_execute(s, update(User).where(User.id == 1).values(name="via get_or_execute"))
            await s.commit()
    assert any("writes; only select() is cached" in r.message for r in caplog.records)
    async with factory() as s:
        assert (await qc.get_or_execute(s, read)).scalar_one() == "via get_or_execute"


async def test_execute_parameters_are_part_of_the_key(
    qc: QueryCache, factory: async_sessionmaker[AsyncSession], seeded: Any
) -> None:
    from sqlalchemy import bindparam

    stmt = select(User.name).where(User.id == bindparam("uid"))
    async with factory() as s:
        assert (await qc.get_or_execute(s, stmt, {"uid": 1})).scalar_one() == "user1"
        assert (await qc.get_or_execute(s, stmt, {"uid": 2})).scalar_one() == "user2"
    async with factory() as s, SQLCounter(seeded.sync_engine) as sql:
        assert (await qc.get_or_execute(s, stmt, {"uid": 2})).scalar_one() == "user2"
        assert (
            await s.execute(stmt, {"uid": 1}, execution_options={"tagcache": True})
        ).scalar_one() == "user1"
        assert sql.count == 0
