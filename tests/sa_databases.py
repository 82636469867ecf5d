"""Real databases for the SQLAlchemy integration tests.

SQLite always, on a temporary file (never ``:memory:``, whose single shared
connection hides transaction isolation). PostgreSQL when
``TAGCACHE_TEST_POSTGRES_URL`` is set (e.g. ``postgresql://postgres@127.0.0.1:5432/test``):
a database of its own is created for the test session on that server and
dropped afterwards. ``TAGCACHE_REQUIRE_POSTGRES=1`` (set in CI) turns a missing
or unreachable server into a failure instead of a skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

DIALECTS = ("sqlite", "postgresql")
_REQUIRE_PG = os.environ.get("TAGCACHE_REQUIRE_POSTGRES", "") not in ("", "0")


@dataclass(frozen=True)
class Database:
    """One test database: its kind and URLs for the async and the sync drivers."""

    kind: str
    async_url: str
    sync_url: str


def no_postgres(reason: str) -> None:
    """Skip, or fail when PostgreSQL is required."""
    if _REQUIRE_PG:
        pytest.fail(f"TAGCACHE_REQUIRE_POSTGRES is set but {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def sqlite_database() -> Iterator[Database]:
    with tempfile.TemporaryDirectory(prefix="tagcache-sa-") as tmp:
        path = Path(tmp) / "test.db"
        yield Database("sqlite", f"sqlite+aiosqlite:///{path}", f"sqlite+pysqlite:///{path}")


@contextlib.contextmanager
def postgres_database() -> Iterator[Database]:
    url = os.environ.get("TAGCACHE_TEST_POSTGRES_URL")
    if not url:
        no_postgres("TAGCACHE_TEST_POSTGRES_URL is not set")
        raise AssertionError("unreachable")
    try:
        import psycopg
    except ImportError:
        no_postgres("psycopg is not installed")
        raise
    base = make_url(url)
    name = f"tagcache_test_{secrets.token_hex(4)}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        no_postgres(f"PostgreSQL at {base.render_as_string()} cannot be reached: {exc}")
        raise
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    own = base.set(database=name)
    try:
        yield Database(
            "postgresql",
            own.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False),
            own.set(drivername="postgresql+psycopg").render_as_string(hide_password=False),
        )
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database(kind: str) -> Iterator[Database]:
    if kind == "sqlite":
        with sqlite_database() as db:
            yield db
    else:
        with postgres_database() as db:
            yield db


class SQLCounter:
    """Counts the statements an engine sends to the database (``before_cursor_execute``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []

    def _seen(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        self.statements.append(statement)

    def __enter__(self) -> SQLCounter:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)

    async def __aenter__(self) -> SQLCounter:  # usable beside sessions in one ``async with``
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()

    @property
    def count(self) -> int:
        return len(self.statements)
