"""Settings, read from the environment once at start-up (or built directly in tests and the demo)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

#: The embedded defaults: no server needed. The memory backend holds 10,000 entries by
#: default; warming every user's pages needs about four per user (and the response
#: cache two per page read), so it is sized up (its 64 MiB byte limit still holds).
DEFAULT_CACHE_URL = "memory://?max_entries=1000000"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./tagcache-example.db"


def _flag(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false, yes/no, on/off), got {value!r}")


@dataclass(frozen=True)
class Settings:
    """Everything the app reads from its environment.

    Environment variables: ``REDIS_URL`` (default ``memory://``), ``DATABASE_URL``
    (default an SQLite file ``./tagcache-example.db``), ``DATABASE_SCHEMA`` (PostgreSQL
    schema for the tables, default the connection's own), ``ADMIN_TOKEN`` (bearer token
    of the cache management API; unset: the API refuses every request), ``CACHING``
    (``0`` turns every cache layer off), ``WARM_ALL`` (warm every user's pages at start-up,
    default ``1``), ``WARM_USERS`` (the most recently active users whose pages are refreshed
    every ten minutes, and warmed at start-up when ``WARM_ALL=0``), ``CREATE_TABLES``
    (create missing tables at start-up).
    """

    #: ``memory://`` (one process) or ``redis://host:port/db``.
    cache_url: str = DEFAULT_CACHE_URL
    #: An async SQLAlchemy URL: ``sqlite+aiosqlite:///file.db`` or ``postgresql+asyncpg://...``.
    database_url: str = DEFAULT_DATABASE_URL
    #: Put the tables in this schema (PostgreSQL), through ``schema_translate_map``.
    database_schema: str | None = None
    #: Connections kept open to the database (and extra ones allowed under load).
    db_pool_size: int = 10
    db_max_overflow: int = 20
    #: Bearer token for ``/api/v1/cache/*``; ``None`` refuses every request there.
    admin_token: str | None = None
    #: ``False``: no response cache, no function or query caching, no warming. The same
    #: endpoints and SQL run; the demo's baseline.
    caching: bool = True
    #: Warm the pages of every user at start-up (user page, project pages), before the
    #: first request is served: a few seconds for 10,000 users (see ``warming.py``).
    warm_all: bool = True
    #: How many users' pages the periodic warming job refreshes (the most recently
    #: active ones); also what start-up warms when ``warm_all`` is off.
    warm_users: int = 1000
    #: Create the tables if they do not exist when the app starts.
    create_tables: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); unset variables keep the defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("REDIS_URL"):
            values["cache_url"] = env["REDIS_URL"]
        if env.get("DATABASE_URL"):
            values["database_url"] = env["DATABASE_URL"]
        if env.get("DATABASE_SCHEMA"):
            values["database_schema"] = env["DATABASE_SCHEMA"]
        if env.get("ADMIN_TOKEN"):
            values["admin_token"] = env["ADMIN_TOKEN"]
        if "CACHING" in env:
            values["caching"] = _flag(env["CACHING"])
        if "WARM_ALL" in env:
            values["warm_all"] = _flag(env["WARM_ALL"])
        if env.get("WARM_USERS"):
            values["warm_users"] = int(env["WARM_USERS"])
        if "CREATE_TABLES" in env:
            values["create_tables"] = _flag(env["CREATE_TABLES"])
        return cls(**values)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields changed: ``settings.with_overrides(caching=False)``."""
        return replace(self, **changes)
