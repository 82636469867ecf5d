"""The app factory: ``create_app(settings)``.

Request flow, outermost first::

    CacheControlMiddleware   Cache-Control per route, ETag, 304 for If-None-Match
      ResponseCacheMiddleware  whole GET responses of the marked routes, with tags
        FastAPI routes           routes.py
          services               @cache.cached functions (services.py)
            loader                 per-session batching of their reads (loader.py)
              QueryCache             select() results, invalidated on commit
                the database         SQLAlchemy 2 async (SQLite/aiosqlite or PostgreSQL/asyncpg)

plus ``/api/v1/cache/*`` (the protected management API) and ``/metrics/`` (Prometheus).

Run it: ``uvicorn --factory fastapi_app.app:create_app`` from ``examples/`` (see README.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Final

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from tagcache.integrations.prometheus import CacheCollector, metrics_app
from tagcache.integrations.starlette import CacheControlMiddleware, ResponseCacheMiddleware, cache_admin

from . import routes
from .caching import CachingOff, cache, queries, responses
from .db import Database
from .security import bearer_token
from .settings import Settings
from .warming import build_warmer, start_up_jobs

logger: Final = logging.getLogger("fastapi_app")

#: Cache-Control per path (full match, first match wins). Pages are "no-cache": browsers
#: and CDNs may keep them but revalidate every time, and the ETag makes that a 304
#: served by the response cache. The server-side cache is what saves the database;
#: a max-age here would let browsers show a page older than a write that returned.
POLICIES: Final = {
    r"/api/v1/users(/\d+(/projects/\d+)?)?": "no-cache",
    r"/api/v1/cache/.*": "no-store",
    r"/metrics/?": "no-store",
    r"/api/v1/health": "no-store",
}


class DatabaseCollector(Collector):
    """``example_db_statements_total``: SQL statements this app sent to its database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("example_db_statements", "SQL statements sent to the database.")
        family.add_metric([], float(self.db.statements))
        yield family


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    db: Database = app.state.db
    if settings.create_tables:
        await db.create_tables()
    cache.configure(settings.cache_url)
    cache.reset_stats()  # counters (and the metrics) count from this start
    if settings.admin_token is None:
        logger.warning("ADMIN_TOKEN is not set: the cache management API refuses every request")
    try:
        if not settings.caching:
            yield
            return
        # Commits of this app's sessions invalidate the cached queries over what they wrote,
        # and the execution option {"tagcache": True} takes effect for them.
        queries.invalidate_on_commit(db.sessions)
        warmer = build_warmer(db, settings)
        # Before the first request is served: every user's pages (settings.warm_all).
        app.state.warming = await warmer.run_once(start_up_jobs(settings))
        async with warmer.running():  # then every ten minutes, in the background
            yield
    finally:
        queries.close()
        await cache.aclose()
        await db.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. ``settings`` defaults to ``Settings.from_env()``.

    With ``settings.caching`` off the same routes, services and SQL run, but nothing
    is cached: no response cache, the query cache's execution option is inert (the
    session factory is not registered), and ``@cache.cached`` functions run their body
    every time (``tagcache.testing.caching_disabled()`` around each request).
    """
    settings = Settings.from_env() if settings is None else settings
    app = FastAPI(title="tagcache example", lifespan=lifespan)
    app.state.settings = settings
    app.state.db = db = Database(settings)
    app.state.warming = None

    app.include_router(routes.router)

    registry = CollectorRegistry()  # per app, so that tests and the demo can build several
    CacheCollector(cache, registry=registry)
    registry.register(DatabaseCollector(db))
    app.state.metrics_registry = registry
    app.mount("/metrics", metrics_app(registry))
    app.mount("/api/v1/cache", cache_admin(cache, authorize=bearer_token(settings.admin_token)))

    # add_middleware: the last added is the outermost.
    if settings.caching:
        app.add_middleware(ResponseCacheMiddleware, responses=responses, rules=routes.RESPONSE_RULES)
    app.add_middleware(CacheControlMiddleware, policies=POLICIES, etag=True)
    if not settings.caching:
        app.add_middleware(CachingOff)
    return app
