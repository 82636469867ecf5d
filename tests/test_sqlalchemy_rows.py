"""Result payloads: a decoded hit must behave like executing the statement (miss)."""

from __future__ import annotations

import copy
import random
import time as _time
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import String, false, func, inspect, select, type_coerce
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, aliased, joinedload, selectin_polymorphic, selectinload
from sqlalchemy.types import TypeDecorator

from tagcache.integrations.sqlalchemy.errors import NotCacheable
from tagcache.integrations.sqlalchemy.rows import decode_result, encode_result

from tests.sa_databases import SQLCounter
from tests.sa_models import Employee, Label, Manager, Plan, Project, User

PARIS = ZoneInfo("Europe/Paris")


async def seed(engine: Any) -> None:
    async with AsyncSession(engine) as s:
        red, blue = Label(id=1, name="red"), Label(id=2, name="blue")
        for i in range(1, 51):
            s.add(
                User(
                    id=i,
                    name=f"user{i:02}",
                    email=f"u{i}@example.com",
                    is_active=i % 3 != 0,
                    plan=Plan.PRO if i % 2 else Plan.FREE,
                    created_at=datetime(2024, 3, 31, 1, 30, i, 123456, tzinfo=timezone.utc),
                    birthday=date(1990, 1, i % 28 + 1) if i % 4 else None,
                    wakes_at=time(7, i % 60, 5, 500) if i % 5 else None,
                    session_length=timedelta(days=i, seconds=7, microseconds=9) if i % 2 else None,
                    external_id=uuid.UUID(int=i),
                    avatar=bytes([i, 0, 255]) if i % 2 else None,
                    settings={"theme": "dark", "n": i, "tags": ["a", {"x": 1.5}], "ok": True}
                    if i % 3
                    else None,
                    bio=f"bio {i}",
                )
            )
        await s.flush()
        s.add_all([red, blue])
        s.add(Project(id=1, owner_id=1, title="alpha", budget=Decimal("1.50"), labels=[red, blue]))
        s.add(Project(id=2, owner_id=1, title="beta", budget=Decimal("20.00"), labels=[blue]))
        s.add(Project(id=3, owner_id=2, title="gamma", budget=Decimal("-3.10")))
        s.add(Manager(id=1, name="boss", reports=7))
        s.add(Employee(id=2, name="worker"))
        await s.commit()


@pytest.fixture
async def engine(sa_engine: Any) -> Any:
    await seed(sa_engine)
    return sa_engine


def describe(value: Any, depth: int = 3) -> Any:
    """A comparable picture of a value: exact types and reprs, ORM objects by loaded state."""
    if hasattr(value, "_sa_instance_state"):
        if depth == 0:
            return (type(value).__name__, inspect(value).identity)
        state = {k: describe(v, depth - 1) for k, v in vars(value).items() if not k.startswith("_sa_")}
        return (type(value).__name__, sorted(state.items()))
    if type(value).__name__ in ("Row",):
        return ("Row", [describe(v, depth) for v in value])
    if type(value).__name__ == "RowMapping":
        return ("RowMapping", [(k, describe(v, depth)) for k, v in value.items()])
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        return (type(value).__name__, [describe(v, depth) for v in value])
    if isinstance(value, dict):
        return ("dict", [(k, describe(v, depth)) for k, v in value.items()])
    return (type(value).__name__, repr(value))


CONSUMERS: dict[str, Callable[[Any], Any]] = {
    "all": lambda r: r.all(),
    "scalars": lambda r: r.scalars().all(),
    "mappings": lambda r: r.mappings().all(),
    "first": lambda r: r.first(),
    "keys": lambda r: list(r.keys()),
    "tuples": lambda r: [tuple(row) for row in r],
}


async def make_payload(engine: Any, stmt: Any, max_rows: int = 1000) -> Any:
    async with AsyncSession(engine) as s:
        frozen = (await s.execute(stmt)).freeze()
        payload = encode_result(frozen, stmt, max_rows=max_rows)
    # what the cache stores: exactly JSON
    return orjson.loads(orjson.dumps(payload))


async def assert_hit_equals_miss(engine: Any, stmt: Any, *, one: bool = False) -> Any:
    payload = await make_payload(engine, stmt)
    consumers = dict(CONSUMERS)
    if one:
        consumers["one"] = lambda r: r.one()
    for name, consume in consumers.items():
        async with AsyncSession(engine) as miss_session, AsyncSession(engine) as hit_session:
            miss = consume(await miss_session.execute(stmt))
            with SQLCounter(engine.sync_engine) as counter:
                hit = consume(decode_result(payload, hit_session.sync_session, stmt))
                described = describe(hit)
            assert counter.count == 0, counter.statements
            assert described == describe(miss), name
    return payload


SHAPES: dict[str, Callable[[], Any]] = {
    "entity": lambda: select(User).order_by(User.id),
    "columns": lambda: select(User.id, User.name).order_by(User.id),
    "all_column_types": lambda: select(*[getattr(User, k) for k in TYPED_COLUMNS]).order_by(User.id),
    "two_entities": lambda: select(User, Project).join(User.projects).order_by(Project.id),
    "aggregate": lambda: (
        select(User.name, func.count(Project.id), func.sum(Project.budget).label("total"))
        .join(User.projects)
        .group_by(User.name)
        .order_by(User.name)
    ),
    "subquery": lambda: _subquery_stmt(),
    "aliased_subquery": lambda: _aliased_subquery_stmt(),
    "selectinload": lambda: (
        select(User).options(selectinload(User.projects).selectinload(Project.labels)).order_by(User.id)
    ),
    "joinedload": lambda: select(Project).options(joinedload(Project.owner)).order_by(Project.id),
    "polymorphic": lambda: select(Employee).order_by(Employee.id),
    "polymorphic_loaded": lambda: (
        select(Employee).options(selectin_polymorphic(Employee, [Manager])).order_by(Employee.id)
    ),
    "outer_join_none": lambda: (
        select(User, Project).outerjoin(User.projects).where(User.id <= 3).order_by(User.id, Project.id)
    ),
    "empty_entity": lambda: select(User).where(User.id < 0),
    "empty_columns": lambda: select(User.id, User.plan).where(false()),
}

TYPED_COLUMNS = [
    "id",
    "name",
    "is_active",
    "plan",
    "created_at",
    "birthday",
    "wakes_at",
    "session_length",
    "external_id",
    "avatar",
    "settings",
    "project_count",
]


def _aliased_subquery_stmt() -> Any:
    recent = aliased(User, select(User).where(User.id < 5).subquery())
    return select(recent).order_by(recent.id)


def _subquery_stmt() -> Any:
    sub = (
        select(Project.owner_id, func.count().label("n"), func.max(Project.budget).label("top"))
        .group_by(Project.owner_id)
        .subquery()
    )
    return select(User.name, sub.c.n, sub.c.top).join(sub, sub.c.owner_id == User.id).order_by(User.id)


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_hit_equals_miss(engine: Any, shape: str) -> None:
    await assert_hit_equals_miss(engine, SHAPES[shape]())


async def test_one(engine: Any) -> None:
    await assert_hit_equals_miss(engine, select(User).where(User.id == 3), one=True)
    await assert_hit_equals_miss(engine, select(User.name, User.plan).where(User.id == 4), one=True)


async def test_describe_sees_differences(engine: Any) -> None:
    """The comparison used above can fail: a changed value or type is seen."""
    stmt = select(User).where(User.id == 1)
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as miss_session, AsyncSession(engine) as hit_session:
        miss = (await miss_session.execute(stmt)).scalars().all()
        hit = decode_result(payload, hit_session.sync_session, stmt).scalars().all()
        assert describe(hit) == describe(miss)
        hit[0].__dict__["birthday"] = datetime(1990, 1, 2)
        assert describe(hit) != describe(miss)


async def test_values_round_trip_exactly(engine: Any) -> None:
    stmt = select(User).order_by(User.id)
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        users = decode_result(payload, s.sync_session, stmt).scalars().all()
        u = users[0]
        assert type(u.plan) is Plan and u.plan is Plan.PRO
        assert isinstance(u.external_id, uuid.UUID) and u.external_id == uuid.UUID(
            int=1
        )  # asyncpg: a subclass
        assert u.avatar == bytes([1, 0, 255]) and type(u.avatar) is bytes
        assert u.session_length == timedelta(days=1, seconds=7, microseconds=9)
        assert u.settings == {"theme": "dark", "n": 1, "tags": ["a", {"x": 1.5}], "ok": True}
        assert u.wakes_at == time(7, 1, 5, 500)
        assert u.project_count == 2
        assert users[3].birthday is None and users[0].birthday == date(1990, 1, 2)
        projects = (
            decode_result(
                await make_payload(engine, select(Project).order_by(Project.id)),
                s.sync_session,
                select(Project).order_by(Project.id),
            )
            .scalars()
            .all()
        )
        assert [str(p.budget) for p in projects] == ["1.50", "20.00", "-3.10"]


async def test_time_zones_and_in_memory_values_kept(engine: Any) -> None:
    """Aware datetimes keep their zone (fixed offset or named), naive stay naive."""
    values = [
        datetime(2024, 10, 27, 2, 30, tzinfo=PARIS, fold=1),
        datetime(2024, 10, 27, 2, 30, tzinfo=PARIS),
        datetime(2024, 1, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
        datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc),
        datetime(2024, 1, 1, 12, 0),
    ]
    stmt = select(User).where(User.id <= len(values)).order_by(User.id)
    async with AsyncSession(engine) as s:
        users = (await s.execute(stmt)).scalars().all()
        for u, v in zip(users, values, strict=True):
            u.created_at = v
            u.session_length = timedelta(days=-2, microseconds=1)
        await s.flush()  # the session's objects now hold these values; the result returns them
        frozen = (await s.execute(stmt)).freeze()
        payload = orjson.loads(orjson.dumps(encode_result(frozen, stmt, max_rows=10)))
    async with AsyncSession(engine) as s:
        hit = decode_result(payload, s.sync_session, stmt).scalars().all()
        for u, v in zip(hit, values, strict=True):
            assert u.created_at == v
            assert u.created_at.tzinfo == v.tzinfo and u.created_at.utcoffset() == v.utcoffset()
            assert u.created_at.fold == v.fold
            assert u.session_length == timedelta(days=-2, microseconds=1)


async def test_deferred_column_stays_unloaded(engine: Any) -> None:
    stmt = select(User).order_by(User.id)
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        u = decode_result(payload, s.sync_session, stmt).scalars().first()
        assert u is not None
        assert "bio" not in u.__dict__
        assert "project_count" in u.__dict__
        assert await s.run_sync(lambda _: u.bio) == "bio 1"  # loads on access, as on a miss


async def test_identity_and_no_sql(engine: Any) -> None:
    stmt = select(User, Project).join(User.projects).order_by(Project.id)
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        with SQLCounter(engine.sync_engine) as counter:
            rows = decode_result(payload, s.sync_session, stmt).all()
            assert rows[0][0] is rows[1][0]  # one user owning two projects: one object
            assert rows[0][0] is await s.get(User, 1)
            assert rows[2][1] is await s.get(Project, 3)
            assert inspect(rows[0][0]).persistent
            assert not s.dirty and not s.new
        assert counter.count == 0


async def test_existing_object_is_returned_unchanged(engine: Any) -> None:
    stmt = select(User).where(User.id <= 2).order_by(User.id)
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        mine = await s.get(User, 1)
        assert mine is not None
        mine.name = "changed in memory"
        s.expire(mine, ["email"])
        with SQLCounter(engine.sync_engine) as counter:
            hit = decode_result(payload, s.sync_session, stmt).scalars().all()
            assert hit[0] is mine
            assert mine.name == "changed in memory"  # not overwritten
            assert mine in s.dirty
            assert mine.email == "u1@example.com"  # unloaded: filled in from the payload
        assert counter.count == 0


async def test_expired_objects_are_filled(engine: Any) -> None:
    """After a commit every object is expired; a hit refreshes them without SQL, as a miss would."""
    stmt = select(User).options(selectinload(User.projects)).where(User.id == 1)
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        mine = await s.get(User, 1)
        await s.commit()
        with SQLCounter(engine.sync_engine) as counter:
            hit = decode_result(payload, s.sync_session, stmt).scalars().one()
            assert hit is mine
            assert mine is not None and mine.name == "user01"
            assert [p.title for p in mine.projects] == ["alpha", "beta"]
        assert counter.count == 0


async def test_eager_relationships_loaded_on_hit(engine: Any) -> None:
    stmt = SHAPES["selectinload"]()
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        with SQLCounter(engine.sync_engine) as counter:
            users = decode_result(payload, s.sync_session, stmt).scalars().all()
            assert [p.title for p in users[0].projects] == ["alpha", "beta"]
            assert [lb.name for lb in users[0].projects[0].labels] == ["red", "blue"]
            assert users[5].projects == []
            assert users[0].projects[0] is await s.get(Project, 1)
        assert counter.count == 0
    stmt = SHAPES["joinedload"]()
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        with SQLCounter(engine.sync_engine) as counter:
            projects = decode_result(payload, s.sync_session, stmt).scalars().all()
            assert projects[0].owner is projects[1].owner
            assert projects[0].owner.name == "user01"
            assert projects[2].owner.plan is Plan.FREE
        assert counter.count == 0


async def test_polymorphic(engine: Any) -> None:
    stmt = SHAPES["polymorphic_loaded"]()
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        with SQLCounter(engine.sync_engine) as counter:
            boss, worker = decode_result(payload, s.sync_session, stmt).scalars().all()
            assert type(boss) is Manager and type(worker) is Employee
            assert "reports" in boss.__dict__ and boss.reports == 7
        assert counter.count == 0
    # Without the subclass load the miss leaves `reports` to load on access: so does the hit.
    stmt = SHAPES["polymorphic"]()
    payload = await make_payload(engine, stmt)
    async with AsyncSession(engine) as s:
        boss = decode_result(payload, s.sync_session, stmt).scalars().first()
        assert type(boss) is Manager and "reports" not in boss.__dict__
        assert await s.run_sync(lambda _: boss.reports) == 7


def test_sync_session(sa_sync_engine: Any, engine: Any) -> None:
    stmt = select(User, Project).outerjoin(User.projects).where(User.id.in_([1, 3])).order_by(User.id)
    with Session(sa_sync_engine) as s:
        payload = orjson.loads(orjson.dumps(encode_result(s.execute(stmt).freeze(), stmt, max_rows=10)))
        miss = describe(s.execute(stmt).all())
    with Session(sa_sync_engine) as s, SQLCounter(sa_sync_engine) as counter:
        hit = decode_result(payload, s, stmt).all()
        assert describe(hit) == miss
        assert hit[2][1] is None
        assert hit[0][0] is s.get(User, 1)
        assert counter.count == 0


async def test_decode_speed(engine: Any) -> None:
    stmt = select(User).order_by(User.id)
    payload = await make_payload(engine, stmt)
    best = float("inf")
    for _ in range(30):
        async with AsyncSession(engine) as s:
            t0 = _time.perf_counter()
            decode_result(payload, s.sync_session, stmt).scalars().all()
            best = min(best, _time.perf_counter() - t0)
    print(f"decode of 50 users: {best * 1e6:.0f} us")
    assert best < 0.005  # generous bound for slow machines; typical is far lower


async def test_max_rows(engine: Any) -> None:
    async with AsyncSession(engine) as s:
        stmt = select(User.id)
        frozen = (await s.execute(stmt)).freeze()
        with pytest.raises(NotCacheable, match="more than 10 rows"):
            encode_result(frozen, stmt, max_rows=10)
        assert encode_result(frozen, stmt, max_rows=50)["n"] == 50


class Point:
    def __init__(self, text: str) -> None:
        self.text = text


class PointType(TypeDecorator[Point]):
    impl = String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return Point(value)


async def test_unsupported_type_names_column_and_type(engine: Any) -> None:
    stmt = select(User.id, type_coerce(User.name, PointType()).label("where")).order_by(User.id)
    async with AsyncSession(engine) as s:
        frozen = (await s.execute(stmt)).freeze()
        with pytest.raises(NotCacheable, match=r"'where'.*test_sqlalchemy_rows\.Point"):
            encode_result(frozen, stmt, max_rows=100)
        stmt2 = select(User).where(User.id == 1)
        u = (await s.execute(stmt2)).scalar_one()
        u.__dict__["settings"] = {"when": date(2024, 1, 1)}  # not JSON: cannot be stored exactly
        with pytest.raises(NotCacheable, match=r"User\.settings.*date"):
            encode_result((await s.execute(stmt2)).freeze(), stmt2, max_rows=10)


async def test_old_mapper_payload_is_rejected(engine: Any) -> None:
    stmt = SHAPES["selectinload"]()
    payload = await make_payload(engine, stmt)
    tampered = [copy.deepcopy(payload) for _ in range(4)]
    tampered[0]["objs"][0]["fp"] = "0" * 16
    group = tampered[1]["objs"][0]
    group["keys"][group["keys"].index("email")] = "mail"
    group = tampered[2]["objs"][-1]
    i = next(i for i, c in enumerate(group["codes"]) if c == "")
    group["cols"][i] = group["cols"][i][:-1]
    tampered[3]["objs"][0]["cls"] = "tests.sa_models.Gone"
    async with AsyncSession(engine) as s:
        for bad in tampered:
            with pytest.raises(NotCacheable):
                decode_result(bad, s.sync_session, stmt)
        assert not s.identity_map  # rejected before touching the session
        rows = decode_result(payload, s.sync_session, stmt).all()
        assert rows[0][0] in s


async def test_other_statement_shape_is_rejected(engine: Any) -> None:
    payload = await make_payload(engine, select(User).where(User.id == 1))
    async with AsyncSession(engine) as s:
        for other in (select(Project), select(User.id), select(User, Project).join(User.projects)):
            with pytest.raises(NotCacheable, match="statement shape"):
                decode_result(payload, s.sync_session, other)


def _mutate(value: Any, rng: random.Random) -> Any:
    junk = [None, 0, -1, 10**6, 1.5, "", "x", "o", "dt", "[]", [], {}, [None], {"v": 1}, True]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        if rng.random() < 0.1:
            del value[key]
        else:
            value[key] = _mutate(value[key], rng)
        return value
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        value[i] = _mutate(value[i], rng)
        return value
    return rng.choice(junk)


async def test_foreign_payloads_raise_not_cacheable_only(engine: Any) -> None:
    stmt = (
        select(User, Project).outerjoin(User.projects).options(selectinload(Project.labels)).order_by(User.id)
    )
    payload = await make_payload(engine, stmt)
    rng = random.Random(1234)
    foreign: list[Any] = [None, 1, "x", [], {}, {"v": 1}, {"v": 2}, [payload], orjson.loads(b'{"a": [1, 2]}')]
    foreign += [_mutate(copy.deepcopy(payload), rng) for _ in range(400)]
    rejected = 0
    async with AsyncSession(engine) as s:
        for bad in foreign:
            try:
                decode_result(bad, s.sync_session, stmt).all()
            except NotCacheable:
                rejected += 1
            s.sync_session.expunge_all()
    assert rejected > 300
