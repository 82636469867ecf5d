"""The SQLAlchemy query cache against executing the query, on PostgreSQL (asyncpg),
measured in the same run.

Workload A: an indexed 50-row ORM query, ``select(Item).where(Item.group_id == g)
.order_by(Item.id).limit(50)`` with ``g`` drawn at random from a set of groups (all
warmed first). Each operation opens an ``AsyncSession``, builds and runs the
statement, takes ``.scalars().all()`` and closes the session: plain
``session.execute`` against a hit of ``QueryCache.get_or_execute`` over
``MemoryBackend`` and over Redis.

Workload B: an aggregate over the whole table (``group_id, count(*), avg(score)``
grouped by ``group_id``), plain against a hit.

Then the hit of workload A taken apart: a hit assembled by hand from the building
blocks the query cache calls (key, backend read, codec decode, rehydration into the
session), each step timed inside every operation, against ``get_or_execute`` hits
timed in the same rounds; the difference is the engine's and the query cache's own
bookkeeping.

Rounds alternate plain and cached runs; the median of the rounds is reported.
One caller (operations run one after the other). The script creates its own
schema in the database and drops it at the end.

    python benchmarks/sqlalchemy_query.py
    python benchmarks/sqlalchemy_query.py --database postgresql+asyncpg://postgres@127.0.0.1:5432/test \\
        --redis redis://127.0.0.1:6379/0 --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy
from sqlalchemy import DateTime, Numeric, String, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import Select

from tagcache import Cache
from tagcache.backends import MemoryBackend
from tagcache.integrations.sqlalchemy import QueryCache
from tagcache.integrations.sqlalchemy.rows import decode_result
from tagcache.integrations.sqlalchemy.statements import pk_lookup, read_tables, statement_key, table_tag

from _common import median, table

#: A schema of this run's own: the database may be shared.
SCHEMA = f"bench_sa_{os.getpid()}_{secrets.token_hex(3)}"
#: The lease a read-through fetch asks for on a miss (the Cache's default ``lease_ttl``).
LEASE_TTL = 10.0
#: Rows a group holds: the 50-row query reads half of one.
ROWS_PER_GROUP = 100


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    __table_args__ = ({"schema": SCHEMA},)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    email: Mapped[str] = mapped_column(String(80))
    active: Mapped[bool]
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    group_id: Mapped[int] = mapped_column(index=True)
    score: Mapped[Decimal] = mapped_column(Numeric(10, 2))


def group_query(g: int) -> Select[tuple[Item]]:
    return select(Item).where(Item.group_id == g).order_by(Item.id).limit(50)


def aggregate_query() -> Select[tuple[int, int, Decimal]]:
    return select(Item.group_id, func.count(), func.avg(Item.score)).group_by(Item.group_id)


async def create_table(engine: AsyncEngine, rows: int, groups: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(
            text(
                f'INSERT INTO "{SCHEMA}".items (id, name, email, active, created_at, group_id, score) '
                "SELECT i, 'user-' || lpad(i::text, 6, '0'), 'user' || lpad(i::text, 6, '0') || '@example.com', "
                "i % 3 <> 0, timestamptz '2026-01-01 00:00:00+00' + i * interval '1 minute', "
                "i % :groups, (i % 10000) / 100.0 + 0.25 "
                "FROM generate_series(1, :rows) AS i"
            ),
            {"rows": rows, "groups": groups},
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'ANALYZE "{SCHEMA}".items'))


async def drop_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'))


# ---------------------------------------------------------------------- operations

Op = Callable[[int], Awaitable[Sequence[Any]]]


def plain_group_op(factory: async_sessionmaker[AsyncSession]) -> Op:
    async def op(g: int) -> Sequence[Any]:
        async with factory() as session:
            result = await session.execute(group_query(g))
            return result.scalars().all()

    return op


def cached_group_op(factory: async_sessionmaker[AsyncSession], qc: QueryCache) -> Op:
    async def op(g: int) -> Sequence[Any]:
        async with factory() as session:
            result = await qc.get_or_execute(session, group_query(g))
            return result.scalars().all()

    return op


def plain_aggregate_op(factory: async_sessionmaker[AsyncSession]) -> Op:
    async def op(_: int) -> Sequence[Any]:
        async with factory() as session:
            result = await session.execute(aggregate_query())
            return result.all()

    return op


def cached_aggregate_op(factory: async_sessionmaker[AsyncSession], qc: QueryCache) -> Op:
    async def op(_: int) -> Sequence[Any]:
        async with factory() as session:
            result = await qc.get_or_execute(session, aggregate_query())
            return result.all()

    return op


async def us_per_op(op: Op, args: Sequence[int]) -> float:
    start = time.perf_counter()
    for a in args:
        await op(a)
    return (time.perf_counter() - start) / len(args) * 1e6


def item_rows(items: Sequence[Any]) -> list[tuple[Any, ...]]:
    """What an ORM result holds, comparable across sessions."""
    return [(i.id, i.name, i.email, i.active, i.created_at, i.group_id, i.score) for i in items]


def agg_rows(rows: Sequence[Any]) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in rows)


# ---------------------------------------------------------------------- caches


@dataclass
class Target:
    """One cache the cached operations run against."""

    label: str
    cache: Cache
    qc: QueryCache
    factory: async_sessionmaker[AsyncSession]
    group_times: list[float] = field(default_factory=list)
    agg_times: list[float] = field(default_factory=list)


async def make_target(label: str, cache: Cache, engine: AsyncEngine) -> Target:
    await cache.clear()
    qc = QueryCache(cache, default_ttl=300)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    qc.invalidate_on_commit(factory)
    return Target(label, cache, qc, factory)


# ---------------------------------------------------------------------- breakdown


STEPS = (
    "open and close an AsyncSession",
    "build the select()",
    "read_tables, get_bind, options, pk_lookup (SQLAlchemy's cache key made here)",
    "statement_key (the cache key)",
    "backend read (memory: get_nowait; Redis: fetch, one round trip)",
    "codec decode (payload to the columnar value)",
    "decode_result (objects into the session)",
    ".scalars().all()",
)


async def assembled_round(target: Target, seq: Sequence[int]) -> list[float]:
    """One round of workload A hits assembled by hand from the building blocks the query
    cache calls, each step timed inside every operation; µs per operation for each step."""
    cache, factory = target.cache, target.factory
    backend, engine, ns = cache.backend, cache.engine, cache.namespace
    decode = engine.decode_payload
    nowait = getattr(backend, "get_nowait", None)
    # The read the engine makes on a hit: without I/O on an in-process backend, else one
    # fetch (a read that snapshots the tags and takes the lease only on a miss).
    totals = [0.0] * len(STEPS)
    clock = time.perf_counter
    for g in seq:
        t0 = clock()
        session = factory()
        t1 = clock()
        stmt = group_query(g)
        t2 = clock()
        sync = session.sync_session
        read = read_tables(stmt, None)
        bind = sync.get_bind(clause=stmt)
        options = dict(bind.get_execution_options())
        options.update(stmt.get_execution_options())
        pk_lookup(stmt)
        t3 = clock()
        key = statement_key(stmt, bind, options)
        t4 = clock()
        if nowait is not None:
            payload = nowait(ns, key)
        else:
            tags = tuple(sorted(table_tag(t) for t in read))
            payload = (await backend.fetch(ns, key, tags, LEASE_TTL)).payload
        t5 = clock()
        if payload is None:
            raise SystemExit(f"{target.label}: a hand-assembled read missed; every group should be cached")
        value = decode(payload) if decode is not None else engine.decode_bound(key, payload)
        t6 = clock()
        result = decode_result(value, sync, stmt)
        t7 = clock()
        result.scalars().all()
        t8 = clock()
        await session.close()
        t9 = clock()
        for i, d in enumerate(
            (t1 - t0 + t9 - t8, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7)
        ):
            totals[i] += d
    return [t / len(seq) * 1e6 for t in totals]


async def breakdown(target: Target, seq: Sequence[int], rounds: int) -> dict[str, float]:
    """Workload A's hit taken apart: µs per operation for each step (median of the
    rounds), against ``get_or_execute`` hits timed in the same rounds."""
    per_step: list[list[float]] = [[] for _ in STEPS]
    hits: list[float] = []
    assembled: list[float] = []
    op = cached_group_op(target.factory, target.qc)
    for _ in range(rounds):
        hits.append(await us_per_op(op, seq))
        start = time.perf_counter()
        steps = await assembled_round(target, seq)
        assembled.append((time.perf_counter() - start) / len(seq) * 1e6)
        for i, us in enumerate(steps):
            per_step[i].append(us)
    out = {name: median(values) for name, values in zip(STEPS, per_step, strict=True)}
    out["sum of the steps"] = sum(median(v) for v in per_step)
    out["assembled hit, timed whole"] = median(assembled)
    out["get_or_execute hit, same rounds"] = median(hits)
    out["rest: the engine's load, bypass checks, QueryCache bookkeeping"] = median(hits) - median(assembled)
    return out


# ---------------------------------------------------------------------- main


def write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def fmt(us: float) -> str:
    return f"{us:,.1f}"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="Redis URL; an empty string skips Redis"
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--groups", type=int, default=200, help="groups workload A draws from")
    parser.add_argument("--ops", type=int, default=2000, help="workload A operations per round")
    parser.add_argument("--agg-ops", type=int, default=50, help="workload B operations per round (plain)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.groups, args.ops, args.agg_ops, args.rounds = 2000, 20, 200, 20, 1
    n_groups = max(1, args.rows // ROWS_PER_GROUP)
    used = list(range(min(args.groups, n_groups)))
    rng = random.Random(7)
    seq_a = rng.choices(used, k=args.ops)
    # Hits are far cheaper than the plain aggregate: run more of them for a steady figure.
    seq_b_plain = [0] * args.agg_ops
    seq_b_hit = [0] * (args.agg_ops * 10)

    engine = create_async_engine(args.database, pool_size=5)
    plain_factory = async_sessionmaker(engine, expire_on_commit=False)
    targets: list[Target] = []
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    try:
        await create_table(engine, args.rows, n_groups)
        targets.append(
            await make_target("memory", Cache(MemoryBackend(), namespace=f"bench-sa-{run_id}"), engine)
        )
        if args.redis:
            targets.append(
                await make_target("Redis", Cache.from_url(args.redis, namespace=f"bench-sa-{run_id}"), engine)
            )

        plain_a, plain_b = plain_group_op(plain_factory), plain_aggregate_op(plain_factory)
        # Warm every group in every cache, the pool and the statement caches; check
        # the cached results are the database's.
        for g in used:
            expected = item_rows(await plain_a(g))
            for t in targets:
                first = item_rows(await cached_group_op(t.factory, t.qc)(g))
                again = item_rows(await cached_group_op(t.factory, t.qc)(g))
                if not expected == first == again:
                    raise SystemExit(f"{t.label}: the cached rows of group {g} differ from the database's")
        expected_b = agg_rows(await plain_b(0))
        for t in targets:
            for _ in range(2):
                if agg_rows(await cached_aggregate_op(t.factory, t.qc)(0)) != expected_b:
                    raise SystemExit(f"{t.label}: the cached aggregate differs from the database's")
        await us_per_op(plain_a, seq_a[: min(200, len(seq_a))])
        for t in targets:
            await us_per_op(cached_group_op(t.factory, t.qc), seq_a[: min(200, len(seq_a))])
            t.cache.reset_stats()

        plain_a_times: list[float] = []
        plain_b_times: list[float] = []
        for _ in range(args.rounds):
            plain_a_times.append(await us_per_op(plain_a, seq_a))
            for t in targets:
                t.group_times.append(await us_per_op(cached_group_op(t.factory, t.qc), seq_a))
            plain_b_times.append(await us_per_op(plain_b, seq_b_plain))
            for t in targets:
                t.agg_times.append(await us_per_op(cached_aggregate_op(t.factory, t.qc), seq_b_hit))
        for t in targets:
            stats = await t.cache.stats()
            if stats.misses or stats.errors or stats.not_stored:
                raise SystemExit(
                    f"{t.label}: {stats.misses} misses, {stats.errors} errors, {stats.not_stored} not stored "
                    "during the timed runs: the figures are not hits"
                )

        steps = {t.label: await breakdown(t, seq_a, args.rounds) for t in targets}

        pb = median(plain_b_times)
        targets_x = {"memory": 3.0, "Redis": 1.5}
        rows: list[dict[str, Any]] = []
        cases = [("A: 50-row ORM query by group", plain_a_times, t.group_times, t) for t in targets]
        cases += [("B: aggregate over the table", plain_b_times, t.agg_times, t) for t in targets]
        for name, plain_times, hit_times, t in cases:
            plain, hit = median(plain_times), median(hit_times)
            per_round = [p / h for p, h in zip(plain_times, hit_times, strict=True)]
            rows.append(
                {
                    "operation": f"{name}, hit ({t.label})",
                    "plain_us": plain,
                    "tagcache_us": hit,
                    "ratio": plain / hit,
                    "round_ratios": per_round,
                    "target": targets_x[t.label] if name.startswith("A") else 10.0,
                }
            )

        print(
            f"SQLAlchemy query cache on {engine.dialect.name}+{engine.dialect.driver}: {args.rows:,} rows, "
            f"{n_groups:,} groups of {ROWS_PER_GROUP}, 1 caller; A: {args.ops:,} ops over {len(used)} groups, "
            f"B: {args.agg_ops} plain and {len(seq_b_hit)} cached ops; {args.rounds} rounds, median"
        )
        print(f"plain aggregate (workload B) alone: {pb / 1000:.2f} ms per operation (session included)")
        print()
        print(
            table(
                ["operation", "plain µs/op", "tagcache µs/op", "ratio", "target"],
                [
                    (
                        r["operation"],
                        fmt(r["plain_us"]),
                        fmt(r["tagcache_us"]),
                        f"{r['ratio']:.2f}x",
                        f">= {r['target']:g}x ({'met' if r['ratio'] >= r['target'] else 'missed'})",
                    )
                    for r in rows
                ],
            )
        )
        print()
        labels = list(steps[targets[0].label])
        for t in targets[1:]:
            labels += [s for s in steps[t.label] if s not in labels]
        breakdown_rows = [
            (s, *(fmt(steps[t.label][s]) if s in steps[t.label] else "" for t in targets)) for s in labels
        ]
        print(
            f"workload A hit, step by step: each step timed inside every operation, {args.ops:,} operations "
            f"x {args.rounds} rounds, median; µs per operation:"
        )
        print(table(["step", *(f"{t.label} µs" for t in targets)], breakdown_rows))
        print()
        for r in rows:
            low, high = min(r["round_ratios"]), max(r["round_ratios"])
            print(
                f"{r['operation']}: {r['ratio']:.2f}x faster than executing "
                f"(rounds taken one by one: {low:.2f}x-{high:.2f}x)"
            )

        if args.json:
            report = {
                "benchmark": "sqlalchemy_query",
                "date": dt.date.today().isoformat(),
                "python": platform.python_version(),
                "sqlalchemy": sqlalchemy.__version__,
                "cpus": os.cpu_count(),
                "parameters": {
                    "rows": args.rows,
                    "groups": n_groups,
                    "groups_used": len(used),
                    "ops": args.ops,
                    "agg_ops_plain": args.agg_ops,
                    "agg_ops_cached": len(seq_b_hit),
                    "rounds": args.rounds,
                    "smoke": args.smoke,
                },
                "plain_aggregate_ms": pb / 1000,
                "results": rows,
                "rounds_us": {
                    "plain_A": plain_a_times,
                    "plain_B": plain_b_times,
                    **{f"hit_A_{t.label}": t.group_times for t in targets},
                    **{f"hit_B_{t.label}": t.agg_times for t in targets},
                },
                "hit_breakdown_us": steps,
            }
            write_json(args.json, report)
            print(f"figures written to {args.json}")
        failed = [r["operation"] for r in rows if r["ratio"] < r["target"]]
        if failed and not args.smoke:
            print(f"targets missed: {len(failed)}", file=sys.stderr)
    finally:
        for t in targets:
            try:
                await t.cache.clear()
            finally:
                t.qc.close()
                await t.cache.aclose()
        await drop_schema(engine)
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
