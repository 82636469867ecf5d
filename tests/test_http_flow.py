"""The whole request flow in one FastAPI app: CacheControlMiddleware (ETag, 304) outside
ResponseCacheMiddleware outside an endpoint reading through QueryCache from a real
database. An update committed through the session invalidates the query, a tag
invalidates the stored response, and the browser's next conditional request gets the
new body and a new ETag — never a stale 304."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import httpx
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tagcache import Cache
from tagcache.backends import MemoryBackend
from tagcache.integrations.sqlalchemy import QueryCache
from tagcache.integrations.starlette import (
    CacheControlMiddleware,
    ResponseCache,
    ResponseCacheMiddleware,
    cache_admin,
)

from tests.conftest import unique_namespace
from tests.sa_databases import SQLCounter
from tests.sa_models import User


@pytest.fixture
async def flow(sa_engine: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Cache, Any]]:
    async with AsyncSession(sa_engine) as s:
        s.add(
            User(
                id=42,
                name="Ada",
                email="ada@example.com",
                created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
            )
        )
        await s.commit()
    cache = Cache(MemoryBackend(), namespace=unique_namespace("flow"))
    factory = async_sessionmaker(sa_engine, expire_on_commit=False)
    qc = QueryCache(cache, default_ttl=300)
    qc.invalidate_on_commit(factory)
    responses = ResponseCache(cache, ttl=60)
    app = FastAPI()
    app.add_middleware(ResponseCacheMiddleware, responses=responses)
    app.add_middleware(CacheControlMiddleware, policies={r"/users/\d+": "public, max-age=0, must-revalidate"})

    @app.get("/users/{user_id}")
    @responses.cached(tags=["users", "user:{user_id}"])
    async def get_user(user_id: int) -> dict[str, Any]:
        async with factory() as session:
            user = (await qc.get_or_execute(session, select(User).where(User.id == user_id))).scalar_one()
            return {"id": user.id, "name": user.name}

    @app.put("/users/{user_id}")
    async def rename(user_id: int, body: dict[str, str]) -> dict[str, str]:
        async with factory() as session:
            user = await session.get(User, user_id)
            assert user is not None
            user.name = body["name"]
            await session.commit()  # invalidates the query cache's entries over "users"
        await cache.invalidate_tags([f"user:{user_id}"])  # and the stored responses
        return {"status": "ok"}

    async def allow(request: Any) -> bool:
        return request.headers.get("x-admin") == "yes"

    app.mount("/cache", cache_admin(cache, authorize=allow))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, cache, sa_engine
    qc.close()
    await cache.aclose()


async def test_browser_server_query_database(flow: tuple[httpx.AsyncClient, Cache, Any]) -> None:
    client, cache, engine = flow
    first = await client.get("/users/42")
    assert first.status_code == 200 and first.json() == {"id": 42, "name": "Ada"}
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "public, max-age=0, must-revalidate"

    with SQLCounter(engine.sync_engine) as sql:
        again = await client.get("/users/42", headers={"if-none-match": etag})
        assert again.status_code == 304 and again.content == b""
        hit = await client.get("/users/42")
        assert hit.status_code == 200 and hit.json() == {"id": 42, "name": "Ada"}
        assert "age" in hit.headers and hit.headers["etag"] == etag
    assert sql.count == 0  # served by the response cache: no query at all

    renamed = await client.put("/users/42", json={"name": "Grace"})
    assert renamed.status_code == 200

    fresh = await client.get("/users/42", headers={"if-none-match": etag})
    assert fresh.status_code == 200, "a stale 304 after the update"
    assert fresh.json() == {"id": 42, "name": "Grace"}
    assert fresh.headers["etag"] != etag

    stats = await client.get("/cache/stats", headers={"x-admin": "yes"})
    assert stats.status_code == 200 and stats.json()["hits"] >= 1
    assert stats.headers["cache-control"] == "no-store"
    assert (
        await client.post("/cache/clear", headers={"content-type": "application/json"})
    ).status_code == 403
    assert (await cache.stats()).hits >= 1
