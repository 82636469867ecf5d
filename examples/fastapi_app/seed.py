"""Sample data: ``python -m fastapi_app.seed --users 10000`` (from ``examples/``).

Uses the same settings as the app (``DATABASE_URL``, ``DATABASE_SCHEMA``); creates the
tables if needed and refuses to add users to a database that already has some.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, insert, select

from .db import Database
from .models import Project, User
from .settings import Settings

# fmt: off
_WORDS = (
    "apollo", "atlas", "beacon", "cedar", "delta", "ember", "falcon", "garnet", "harbor", "indigo",
    "juniper", "kepler", "lumen", "meridian", "nimbus", "onyx", "polaris", "quartz", "raven", "sierra",
    "tundra", "umber", "vertex", "willow", "xenon", "yonder", "zephyr",
)
_FIRST = ("ada", "alan", "barbara", "claude", "donald", "edsger", "frances", "grace", "john", "ken", "radia")
_LAST = (
    "lovelace", "turing", "liskov", "shannon", "knuth", "dijkstra", "allen", "hopper", "backus", "thompson",
)
# fmt: on


@dataclass(frozen=True)
class Seeded:
    """What was inserted: user ids ``1..users`` and, per user, the ids of their projects."""

    users: int
    projects: dict[int, list[int]]

    @property
    def project_count(self) -> int:
        return sum(len(p) for p in self.projects.values())


async def seed(db: Database, users: int, *, seed: int = 1, batch: int = 2000) -> Seeded:
    """Insert ``users`` users (ids 1..users) with 0 to 8 projects each (about 3 on average).

    Deterministic for a given ``seed``. Bulk inserts through Core: no ORM events, so
    nothing is invalidated (seed before the app serves, or clear the cache after).
    """
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    user_rows: list[dict[str, object]] = []
    project_rows: list[dict[str, object]] = []
    projects: dict[int, list[int]] = {}
    next_project = 1
    for user_id in range(1, users + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        user_rows.append(
            {
                "id": user_id,
                "name": f"{first.title()} {last.title()}",
                "email": f"{first}.{last}.{user_id}@example.com",
                "bio": f"{first.title()} works on {' and '.join(rng.sample(_WORDS, 3))}. " * 2,
                "last_active_at": now - timedelta(seconds=rng.randrange(90 * 24 * 3600)),
                "version": 1,
            }
        )
        owned = projects[user_id] = []
        for _ in range(min(8, int(rng.expovariate(1 / 3)))):
            words = rng.sample(_WORDS, 2)
            project_rows.append(
                {
                    "id": next_project,
                    "owner_id": user_id,
                    "name": f"{words[0]}-{words[1]}",
                    "description": f"The {words[0]} {words[1]} project: " + " ".join(rng.sample(_WORDS, 8)),
                    "status": "active" if rng.random() < 0.8 else "archived",
                    "version": 1,
                }
            )
            owned.append(next_project)
            next_project += 1
    async with db.engine.begin() as conn:
        for start in range(0, len(user_rows), batch):
            await conn.execute(insert(User), user_rows[start : start + batch])
        for start in range(0, len(project_rows), batch):
            await conn.execute(insert(Project), project_rows[start : start + batch])
    if db.dialect == "postgresql":  # explicit ids: move the sequences past them
        async with db.engine.begin() as conn:
            for table, last_id in (("users", users), ("projects", next_project - 1)):
                if last_id:
                    await conn.execute(
                        select(func.setval(func.pg_get_serial_sequence(_qualified(db, table), "id"), last_id))
                    )
    return Seeded(users, projects)


def _qualified(db: Database, table: str) -> str:
    return table if db.schema is None else f'"{db.schema}".{table}'


async def _main(users: int, seed_value: int) -> None:
    db = Database(Settings.from_env())
    try:
        await db.create_tables()
        async with db.sessions() as session:
            existing = (await session.execute(select(func.count()).select_from(User))).scalar_one()
        if existing:
            raise SystemExit(f"the database already has {existing} users; not seeding")
        seeded = await seed(db, users, seed=seed_value)
        print(f"seeded {seeded.users} users and {seeded.project_count} projects")
    finally:
        await db.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(_main(args.users, args.seed))
