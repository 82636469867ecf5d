"""The database: engine, session factory, tables, and a count of the SQL statements sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

from fastapi import Request
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from .models import Base
from .settings import Settings

_WRITE_LOCK: Final = "fastapi_app.write_lock"


class Database:
    """One engine and session factory per app.

    ``statements`` counts every SQL statement sent to the database (SQLAlchemy's
    ``before_cursor_execute`` event; transaction control such as ``COMMIT`` is not a
    statement there): the figure the demo calls database load, and the
    ``example_db_statements_total`` metric.
    """

    def __init__(self, settings: Settings) -> None:
        url = make_url(settings.database_url)
        self.dialect = url.get_backend_name()
        self.schema = settings.database_schema
        options: dict[str, Any] = {
            "pool_size": settings.db_pool_size,
            "max_overflow": settings.db_max_overflow,
        }
        if self.dialect == "sqlite":
            # A pool of connections to the file, as newer SQLAlchemy releases choose by
            # themselves (2.0.24 and older pick NullPool for aiosqlite, which takes no size).
            options["poolclass"] = AsyncAdaptedQueuePool
        if self.schema is not None:
            # The models name no schema; this puts every table in ours.
            options["execution_options"] = {"schema_translate_map": {None: self.schema}}
        self.engine = create_async_engine(url, **options)
        # SQLite: the app's writes queue on one lock (see writing()), reached from each session.
        info = {_WRITE_LOCK: asyncio.Lock()} if self.dialect == "sqlite" else {}
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False, info=info)
        self.statements = 0
        event.listen(self.engine.sync_engine, "before_cursor_execute", self._count)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

    def _count(self, *_: Any) -> None:
        self.statements += 1

    async def create_tables(self) -> None:
        """Create the schema (if any) and the missing tables."""
        async with self.engine.begin() as conn:
            if self.schema is not None:
                quoted = self.engine.dialect.identifier_preparer.quote_schema(self.schema)
                await conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {quoted}"))
            await conn.run_sync(Base.metadata.create_all)

    async def drop_tables(self, *, drop_schema: bool = False) -> None:
        """Drop this app's tables (and its schema with ``drop_schema=True``), nothing else."""
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            if drop_schema and self.schema is not None:
                quoted = self.engine.dialect.identifier_preparer.quote_schema(self.schema)
                await conn.execute(text(f"DROP SCHEMA IF EXISTS {quoted} CASCADE"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def writing(session: AsyncSession) -> AbstractAsyncContextManager[Any]:
    """Hold around a write, from its first read to its commit: on SQLite, the database's
    write lock of this process; elsewhere nothing.

    SQLite lets one connection write at a time; the others poll for its lock (the busy
    handler, with growing sleeps), and under a steady stream of writes one can lose
    every round for its whole timeout and fail with "database is locked". Queued here
    instead, writes run one after the other, first come first served (and never lose an
    optimistic-locking race to another write of this process). PostgreSQL has row
    locks and the ``version`` check: writes run concurrently.
    """
    lock = session.info.get(_WRITE_LOCK)
    return lock if isinstance(lock, asyncio.Lock) else contextlib.nullcontext()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE
    cursor.close()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: one session per request, closed after the response."""
    database: Database = request.app.state.db
    async with database.sessions() as session:
        yield session
