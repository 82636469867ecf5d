"""The management endpoints of ``tagcache.integrations.starlette.admin``, mounted in a
Starlette app and in a FastAPI app and driven through httpx."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Mount
from starlette.types import Message

from tagcache import Cache, ConfigurationError
from tagcache.backends import MemoryBackend
from tagcache.exceptions import BackendError
from tagcache.integrations.starlette.admin import (
    MAX_PATTERN_LENGTH,
    MAX_TAGS_PER_REQUEST,
    CacheAdmin,
    cache_admin,
)

from tests.conftest import unique_namespace

PREFIX = "/api/v1/cache"
TOKEN = "s3cret"
JSON = {"content-type": "application/json"}
# Keys with the characters a path must carry through: "/" and ":".
ENTRIES = {"user:1": {"name": "Ada"}, "page/home:en": "<h1>hi</h1>", "plain": 42}


def _check_no_store(response: httpx.Response) -> None:
    assert response.headers.get("cache-control") == "no-store", (response.request.url, response.headers)


def mount(admin: CacheAdmin, framework: str) -> Any:
    if framework == "fastapi":
        from fastapi import FastAPI

        app = FastAPI()
        app.mount(PREFIX, admin)
        return app
    return Starlette(routes=[Mount(PREFIX, app=admin)])


@pytest.fixture(params=["starlette", "fastapi"])
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def cache() -> AsyncIterator[Cache]:
    c = Cache(MemoryBackend(), namespace=unique_namespace("admin"))
    for key, value in ENTRIES.items():
        await c.set(key, value, ttl=600, tags=["users" if key.startswith("user") else "pages"])
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
def client_for(framework: str) -> Callable[[CacheAdmin], httpx.AsyncClient]:
    """``client_for(admin)``: a client of an app (of the parametrized framework) mounting
    ``admin``; every response it gets is checked for ``Cache-Control: no-store``."""

    def make(admin: CacheAdmin) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=mount(admin, framework)),
            base_url="http://testserver",
            event_hooks={"response": [_async_check]},
        )

    return make


async def _async_check(response: httpx.Response) -> None:
    _check_no_store(response)


def by_token(request: Request) -> bool:
    return request.headers.get("x-admin-token") == TOKEN


async def by_token_async(request: Request) -> bool:
    return request.headers.get("x-admin-token") == TOKEN


AUTH = {"x-admin-token": TOKEN}


async def assert_untouched(cache: Cache) -> None:
    """Every entry is still there and valid, and no operation ran."""
    for key, value in ENTRIES.items():
        view = await cache.peek(key)
        assert view is not None, key
        assert (view.value, view.valid) == (value, True)
    counters = cache.engine.counters
    assert (counters.invalidations, counters.deletes, counters.errors) == (0, 0, 0)


# ------------------------------------------------------------------ construction


def test_authorize_is_required(cache: Cache) -> None:
    with pytest.raises(ConfigurationError, match="authorize"):
        cache_admin(cache)
    with pytest.raises(ConfigurationError, match="authorize"):
        cache_admin(cache, allow_unauthenticated=False)
    with pytest.raises(ConfigurationError, match="authorize"):
        cache_admin(cache, allow_unauthenticated=1)  # type: ignore[arg-type]  # only True opts in
    with pytest.raises(ConfigurationError, match="authorize"):
        cache_admin(cache, authorize="admin")  # type: ignore[arg-type]


@pytest.mark.parametrize("max_limit", [0, -1, 1.5, "10", True])
def test_max_limit_must_be_a_positive_int(cache: Cache, max_limit: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_limit"):
        cache_admin(cache, authorize=by_token, max_limit=max_limit)


async def test_allow_unauthenticated_logs_a_warning_and_serves_everyone(
    cache: Cache, client_for: Callable[[CacheAdmin], httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        admin = cache_admin(cache, allow_unauthenticated=True)
    warnings = [r for r in caplog.records if r.name == "tagcache" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert cache.namespace in warnings[0].getMessage()
    assert "allow_unauthenticated" in warnings[0].getMessage()
    async with client_for(admin) as client:
        assert (await client.get(f"{PREFIX}/stats")).status_code == 200


def test_an_authorized_admin_logs_no_warning(cache: Cache, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tagcache"):
        cache_admin(cache, authorize=by_token)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_admin_does_not_import_fastapi() -> None:
    code = (
        "import sys, tagcache.integrations.starlette.admin as a, tagcache.integrations.prometheus\n"
        "assert 'fastapi' not in sys.modules, 'fastapi imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------ authorization

#: One request per endpoint, plus a bad body, a bad query, an unknown path and a wrong method.
REQUESTS: Sequence[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/stats", {}),
    ("POST", "/clear", {"headers": JSON, "content": b"{}"}),
    ("POST", "/clear", {}),
    ("POST", "/clear-tags", {"json": {"tags": ["users", "pages"]}}),
    ("POST", "/clear-tags", {"json": {"tags": "users"}}),
    ("POST", "/clear-tags", {"headers": JSON, "content": b"{not json"}),
    ("POST", "/clear-tags", {"headers": {"content-type": "text/plain"}, "content": b"x"}),
    ("GET", "/keys", {}),
    ("GET", "/keys?limit=0&pattern=", {}),
    ("GET", "/key/user:1", {}),
    ("GET", "/key/page/home:en", {}),
    ("GET", "/no-such-endpoint", {}),
    ("DELETE", "/clear", {}),
]


@pytest.mark.parametrize("authorize", [by_token, by_token_async], ids=["sync", "async"])
@pytest.mark.parametrize(("method", "path", "kwargs"), REQUESTS)
async def test_unauthorized_requests_get_403_and_touch_nothing(
    cache: Cache,
    client_for: Callable[[CacheAdmin], httpx.AsyncClient],
    authorize: Callable[[Request], Any],
    method: str,
    path: str,
    kwargs: dict[str, Any],
) -> None:
    async with client_for(cache_admin(cache, authorize=authorize, reveal_values=True)) as client:
        for headers in ({}, {"x-admin-token": "wrong"}):
            extra = {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}
            response = await client.request(method, f"{PREFIX}{path}", **extra)
            assert response.status_code == 403, response.text
            assert "detail" in response.json()
            assert "Ada" not in response.text
    await assert_untouched(cache)


@pytest.mark.parametrize("authorize", [by_token, by_token_async], ids=["sync", "async"])
async def test_sync_and_async_authorize_allow_the_right_caller(
    cache: Cache, client_for: Callable[[CacheAdmin], httpx.AsyncClient], authorize: Callable[[Request], Any]
) -> None:
    async with client_for(cache_admin(cache, authorize=authorize)) as client:
        assert (await client.get(f"{PREFIX}/stats")).status_code == 403
        assert (await client.get(f"{PREFIX}/stats", headers=AUTH)).status_code == 200


async def test_authorize_sees_the_request(
    cache: Cache, client_for: Callable[[CacheAdmin], httpx.AsyncClient]
) -> None:
    seen: list[tuple[str, str]] = []

    def record(request: Request) -> bool:
        seen.append((request.method, request.url.path))
        return True

    async with client_for(cache_admin(cache, authorize=record)) as client:
        await client.get(f"{PREFIX}/keys")
    assert seen == [("GET", f"{PREFIX}/keys")]


async def test_a_401_raised_by_authorize_passes_through_with_its_headers(
    cache: Cache, client_for: Callable[[CacheAdmin], httpx.AsyncClient]
) -> None:
    challenge = 'Bearer realm="cache-admin"'

    async def require_bearer(request: Request) -> bool:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            raise HTTPException(401, "credentials needed", headers={"WWW-Authenticate": challenge})
        return True

    async with client_for(cache_admin(cache, authorize=require_bearer)) as client:
        for method, path, kwargs in REQUESTS:
            response = await client.request(method, f"{PREFIX}{path}", **kwargs)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == challenge
            assert response.json() == {"detail": "credentials needed"}
        ok = await client.get(f"{PREFIX}/stats", headers={"authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    await assert_untouched(cache)


async def test_a_403_raised_by_authorize_passes_through(
    cache: Cache, client_for: Callable[[CacheAdmin], httpx.AsyncClient]
) -> None:
    def forbid(request: Request) -> bool:
        raise HTTPException(403, "admins only")

    async with client_for(cache_admin(cache, authorize=forbid)) as client:
        response = await client.post(f"{PREFIX}/clear", json={})
    assert (response.status_code, response.json()) == (403, {"detail": "admins only"})
    await assert_untouched(cache)


async def test_a_refused_request_is_answered_before_its_body_is_read(cache: Cache) -> None:
    admin = cache_admin(cache, authorize=lambda request: False)
    received: list[Any] = []
    sent: list[Message] = []

    async def receive() -> dict[str, Any]:
        received.append(True)
        return {"type": "http.request", "body": b'{"tags": ["users"]}', "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/clear-tags",
        "raw_path": b"/clear-tags",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "server": ("testserver", 80),
    }
    await admin(scope, receive, send)
    assert received == []
    assert sent[0]["status"] == 403
    assert (b"cache-control", b"no-store") in sent[0]["headers"]
    await assert_untouched(cache)


async def test_authorize_cannot_read_the_body(
    cache: Cache, client_for: Callable[[CacheAdmin], httpx.AsyncClient]
) -> None:
    async def reads_body(request: Request) -> bool:
        await request.body()
        return True

    async with client_for(cache_admin(cache, authorize=reads_body)) as client:
        with pytest.raises(RuntimeError, match="Receive channel"):
            await client.post(f"{PREFIX}/clear", json={})
    await assert_untouched(cache)


# ------------------------------------------------------------------ endpoints


@pytest.fixture
def admin_client(
    cache: Cache, client_for: Callable[[CacheAdmin], httpx.AsyncClient]
) -> Callable[..., httpx.AsyncClient]:
    """``admin_client(**options)``: an authorized client of ``cache_admin(cache, **options)``."""

    def make(**options: Any) -> httpx.AsyncClient:
        client = client_for(cache_admin(cache, authorize=by_token, **options))
        client.headers.update(AUTH)
        return client

    return make


async def test_stats(cache: Cache, admin_client: Callable[..., httpx.AsyncClient]) -> None:
    await cache.get("user:1")
    await cache.get("user:1")
    await cache.get("absent")
    async with admin_client() as client:
        response = await client.get(f"{PREFIX}/stats")
    assert response.status_code == 200
    body = response.json()
    assert body["namespace"] == cache.namespace
    assert (body["hits"], body["misses"], body["sets"]) == (2, 1, 3)
    assert body["hit_ratio"] == pytest.approx(2 / 3)
    assert (body["invalidations"], body["errors"], body["stale_on_error"]) == (0, 0, 0)
    assert body["keys"] == 3
    assert "memory_bytes" in body
    assert body["functions"] == {}
    assert response.headers["content-type"].startswith("application/json")


async def test_stats_lists_cached_functions(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    @cache.cached(ttl=60)
    async def profile(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    for user_id in (1, 1, 1, 2):
        await profile(user_id)
    async with admin_client() as client:
        body = (await client.get(f"{PREFIX}/stats")).json()
    functions = body["functions"]
    assert list(functions) == [f"{__name__}.test_stats_lists_cached_functions.<locals>.profile"]
    (figures,) = functions.values()
    assert (figures["hits"], figures["misses"], figures["hit_ratio"]) == (2, 2, 0.5)
    assert (body["hits"], body["misses"]) == (2, 2)


async def test_clear_removes_this_namespace_only(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    other = Cache(cache.backend, namespace=unique_namespace("other"), owns_backend=False)
    await other.set("user:1", "other's")
    async with admin_client() as client:
        response = await client.post(f"{PREFIX}/clear", headers=JSON)
        assert (response.status_code, response.json()) == (200, {"namespace": cache.namespace, "cleared": 3})
        response = await client.post(f"{PREFIX}/clear", json={})
        assert response.json()["cleared"] == 0
    assert await cache.keys() == []
    assert await other.get("user:1") == "other's"


@pytest.mark.redis
async def test_clear_on_redis_leaves_other_namespaces_and_foreign_keys(
    redis_url: str, client_for: Callable[[CacheAdmin], httpx.AsyncClient]
) -> None:
    import redis.asyncio as redis

    mine = Cache.from_url(redis_url, namespace=unique_namespace("admin"))
    other = Cache.from_url(redis_url, namespace=unique_namespace("other"))
    raw = redis.Redis.from_url(redis_url)
    foreign = f"foreign:{unique_namespace()}"
    try:
        for key in ("user:1", "a/b:c", "x"):
            await mine.set(key, key, tags=["t"])
            await other.set(key, key, tags=["t"])
        await raw.set(foreign, b"not tagcache's")
        async with client_for(cache_admin(mine, authorize=by_token)) as client:
            response = await client.post(f"{PREFIX}/clear", json={}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["cleared"] == 3
        assert await mine.keys() == []
        assert sorted(await other.keys()) == ["a/b:c", "user:1", "x"]
        assert await other.get("a/b:c") == "a/b:c"
        assert await raw.get(foreign) == b"not tagcache's"
    finally:
        await raw.delete(foreign)
        await raw.aclose()
        for c in (mine, other):
            await c.clear()
            await c.aclose()


async def test_clear_tags(cache: Cache, admin_client: Callable[..., httpx.AsyncClient]) -> None:
    async with admin_client() as client:
        response = await client.post(f"{PREFIX}/clear-tags", json={"tags": ["users", "users", "unknown"]})
    assert response.status_code == 200, response.text
    assert response.json() == {"namespace": cache.namespace, "invalidated": ["unknown", "users"]}
    assert await cache.get("user:1") is None
    assert await cache.get("plain") == 42


BAD_BODIES: Sequence[tuple[str, bytes]] = [
    ("bare string tags", json.dumps({"tags": "users"}).encode()),
    ("non-string tag", json.dumps({"tags": [1]}).encode()),
    ("null tag", json.dumps({"tags": ["users", None]}).encode()),
    ("missing field", b"{}"),
    ("empty body", b""),
    ("empty list", json.dumps({"tags": []}).encode()),
    ("too many", json.dumps({"tags": [f"t{i}" for i in range(MAX_TAGS_PER_REQUEST + 1)]}).encode()),
    ("unknown field", json.dumps({"tags": ["users"], "all": True}).encode()),
    ("a list body", json.dumps(["users"]).encode()),
    ("a string body", b'"users"'),
    ("invalid json", b'{"tags": ['),
    ("not utf-8", b'{"tags": ["\xff\xfe"]}'),
    ("deep nesting", b"[" * 100_000),
    ("control character in a tag", json.dumps({"tags": ["users\n"]}).encode()),
    ("empty tag", json.dumps({"tags": [""]}).encode()),
    ("tag too long", json.dumps({"tags": ["x" * 300]}).encode()),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[case for case, _ in BAD_BODIES])
async def test_clear_tags_rejects_bad_input_with_422(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient], case: str, body: bytes
) -> None:
    async with admin_client() as client:
        response = await client.post(f"{PREFIX}/clear-tags", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail
    await assert_untouched(cache)


async def test_clear_rejects_a_body_with_parameters(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with admin_client() as client:
        for body in (b'{"all": true}', b"[1]", b"{oops"):
            response = await client.post(f"{PREFIX}/clear", content=body, headers=JSON)
            assert response.status_code == 422, response.text
    await assert_untouched(cache)


@pytest.mark.parametrize("endpoint", ["/clear", "/clear-tags"])
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"],
)
async def test_posts_without_a_json_content_type_get_415(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient], endpoint: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    async with admin_client() as client:
        response = await client.post(f"{PREFIX}{endpoint}", content=b'{"tags": ["users"]}', headers=headers)
    assert response.status_code == 415, response.text
    await assert_untouched(cache)


async def test_json_content_type_with_parameters_is_accepted(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with admin_client() as client:
        response = await client.post(
            f"{PREFIX}/clear-tags",
            content=b'{"tags": ["pages"]}',
            headers={"content-type": "Application/JSON; charset=utf-8"},
        )
    assert response.status_code == 200, response.text
    assert await cache.get("plain") is None


async def test_an_oversized_body_gets_413(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with admin_client() as client:
        response = await client.post(f"{PREFIX}/clear-tags", content=b" " * (3 * 2**20), headers=JSON)
    assert response.status_code == 413
    await assert_untouched(cache)


async def test_keys(cache: Cache, admin_client: Callable[..., httpx.AsyncClient]) -> None:
    async with admin_client(max_limit=2) as client:
        everything = (await client.get(f"{PREFIX}/keys")).json()
        users = (await client.get(f"{PREFIX}/keys", params={"pattern": "user:*"})).json()
        pages = (await client.get(f"{PREFIX}/keys", params={"pattern": "page/*", "limit": "2"})).json()
    assert everything["limit"] == 2  # the default is bounded by max_limit too
    assert everything["count"] == 2
    assert everything["truncated"] is True
    assert set(everything["keys"]) <= set(ENTRIES)
    assert users == {
        "namespace": cache.namespace,
        "pattern": "user:*",
        "limit": 2,
        "count": 1,
        "truncated": False,
        "keys": ["user:1"],
    }
    assert pages["keys"] == ["page/home:en"]


async def test_keys_default_limit(cache: Cache, admin_client: Callable[..., httpx.AsyncClient]) -> None:
    async with admin_client() as client:
        body = (await client.get(f"{PREFIX}/keys")).json()
    assert (body["limit"], body["count"], body["truncated"]) == (100, 3, False)
    assert sorted(body["keys"]) == sorted(ENTRIES)


@pytest.mark.parametrize(
    "limit", ["0", "-1", "11", "1000000", "1.5", "abc", "", " 5", "1e2", "99999999999999999999"]
)
async def test_keys_limit_is_bounded_and_checked(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient], limit: str
) -> None:
    async with admin_client(max_limit=10) as client:
        response = await client.get(f"{PREFIX}/keys", params={"limit": limit})
        assert response.status_code == 422, response.text
        assert "limit" in response.json()["detail"]
        assert (await client.get(f"{PREFIX}/keys", params={"limit": "10"})).status_code == 200


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "user:\x00*",
        "user:\n",
        "\x7f",
        "a" * (MAX_PATTERN_LENGTH + 1),
        "*a*b*c*d*e",
    ],
    ids=["empty", "nul", "newline", "del", "too long", "too many stars"],
)
async def test_keys_rejects_bad_patterns_with_422(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient], pattern: str
) -> None:
    async with admin_client() as client:
        response = await client.get(f"{PREFIX}/keys", params={"pattern": pattern})
    assert response.status_code == 422, response.text
    assert "pattern" in response.json()["detail"]


async def test_a_reversed_range_is_a_pattern_as_redis_reads_it(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    await cache.set("k:m", 1)
    async with admin_client() as client:
        response = await client.get(f"{PREFIX}/keys", params={"pattern": "k:[z-a]"})
    assert response.status_code == 200, response.text
    assert response.json()["keys"] == ["k:m"]


async def test_escaped_stars_do_not_count_as_wildcards(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    await cache.set("a*b*c*d*e*f", 1)
    async with admin_client() as client:
        response = await client.get(f"{PREFIX}/keys", params={"pattern": r"a\*b\*c\*d\*e\*f"})
    assert response.status_code == 200, response.text
    assert response.json()["keys"] == ["a*b*c*d*e*f"]


async def test_key_view_redacts_values_by_default(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with admin_client() as client:
        response = await client.get(f"{PREFIX}/key/user:1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["value"] == "<redacted>"
    assert "Ada" not in response.text
    assert body["key"] == "user:1"
    assert body["tags"] == ["users"]
    assert body["valid"] is True
    assert 590 < body["ttl"] <= 600
    assert body["value_type"] == "dict"
    assert body["value_size"] == len(json.dumps({"name": "Ada"}))


async def test_key_view_reveals_values_when_asked(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    await cache.invalidate_tags(["pages"])
    async with admin_client(reveal_values=True) as client:
        user = (await client.get(f"{PREFIX}/key/user:1")).json()
        page = (await client.get(f"{PREFIX}/key/page/home:en")).json()
    assert user["value"] == {"name": "Ada"}
    assert (page["key"], page["value"], page["valid"]) == ("page/home:en", "<h1>hi</h1>", False)


async def test_key_view_of_an_absent_key_is_404(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with admin_client() as client:
        response = await client.get(f"{PREFIX}/key/user:2")
        assert response.status_code == 404
        assert "detail" in response.json()
        # Percent-encoded characters are decoded into the key.
        assert (await client.get(f"{PREFIX}/key/page%2Fhome%3Aen")).status_code == 200


async def test_key_view_rejects_invalid_keys_with_422(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with admin_client() as client:
        for path in ("/key/", "/key/" + "k" * 1025, "/key/a%00b", "/key/a%1Fb", "/key/a%C2%85b"):
            response = await client.get(f"{PREFIX}{path}")
            assert response.status_code == 422, (path, response.text)


async def test_unknown_paths_and_methods(
    cache: Cache, admin_client: Callable[..., httpx.AsyncClient]
) -> None:
    async with admin_client() as client:
        assert (await client.get(f"{PREFIX}/nope")).status_code == 404
        assert (await client.get(f"{PREFIX}/clear")).status_code == 405
        assert (await client.post(f"{PREFIX}/stats", json={})).status_code == 405
    await assert_untouched(cache)


# ------------------------------------------------------------------ backend failures


class FailingBackend(MemoryBackend):
    """A memory backend whose management operations fail as a broken Redis would."""

    async def clear(self, ns: str) -> int:
        raise BackendError("connection refused (test)")

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        raise BackendError("connection refused (test)")

    async def keys(self, ns: str, pattern: str, limit: int | None) -> list[str]:
        raise BackendError("connection refused (test)")

    async def peek(self, ns: str, key: str) -> Any:
        raise BackendError("connection refused (test)")


async def test_backend_failures_are_503(client_for: Callable[[CacheAdmin], httpx.AsyncClient]) -> None:
    cache = Cache(FailingBackend(), namespace=unique_namespace("failing"))
    async with client_for(cache_admin(cache, authorize=by_token)) as client:
        client.headers.update(AUTH)
        responses = [
            await client.post(f"{PREFIX}/clear", json={}),
            await client.post(f"{PREFIX}/clear-tags", json={"tags": ["t"]}),
            await client.get(f"{PREFIX}/keys"),
            await client.get(f"{PREFIX}/key/k"),
        ]
        stats = await client.get(f"{PREFIX}/stats")
    for response in responses:
        assert response.status_code == 503, response.text
        assert "connection refused (test)" in response.json()["detail"]
    assert stats.status_code == 200
    assert stats.json()["pending_invalidations"] == 1


class _CoreOnly:
    """A backend with the core operations only: it can neither list keys nor peek."""


for _name in ("get", "fetch", "lease", "set", "fill", "release", "delete", "invalidate", "clear", "aclose"):

    async def _unused(self: Any, *args: Any, _name: str = _name) -> Any:
        raise AssertionError(f"{_name} should not be called")

    setattr(_CoreOnly, _name, _unused)


async def test_backends_without_keys_or_peek_give_501(
    client_for: Callable[[CacheAdmin], httpx.AsyncClient],
) -> None:
    cache = Cache(_CoreOnly(), namespace=unique_namespace("core"))  # type: ignore[arg-type]  # core ops only
    async with client_for(cache_admin(cache, authorize=by_token)) as client:
        client.headers.update(AUTH)
        keys = await client.get(f"{PREFIX}/keys")
        key = await client.get(f"{PREFIX}/key/k")
    assert keys.status_code == 501
    assert "cannot list keys" in keys.json()["detail"]
    assert key.status_code == 501
    assert "cannot show an entry" in key.json()["detail"]


async def test_an_unconfigured_cache_gives_503(client_for: Callable[[CacheAdmin], httpx.AsyncClient]) -> None:
    cache = Cache(namespace=unique_namespace("unconfigured"))
    async with client_for(cache_admin(cache, authorize=by_token)) as client:
        response = await client.post(f"{PREFIX}/clear", json={}, headers=AUTH)
    assert response.status_code == 503
    assert "configure" in response.json()["detail"]


async def test_served_alone_without_a_mount(cache: Cache) -> None:
    admin = cache_admin(cache, authorize=by_token)
    transport = httpx.ASGITransport(app=admin)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=AUTH) as client:
        ok = await client.get("/key/page/home:en")
        missing = await client.get("/nope")
    assert ok.status_code == 200
    assert missing.status_code == 404
    for response in (ok, missing):
        _check_no_store(response)


async def test_revealed_values_json_cannot_represent_are_shown_as_text(
    client_for: Callable[[CacheAdmin], httpx.AsyncClient],
) -> None:
    import datetime

    from tagcache import PickleCodec

    cache = Cache(
        MemoryBackend(), namespace=unique_namespace("pickle"), codec=PickleCodec(secret_key=b"k" * 32)
    )
    when = datetime.datetime(2024, 5, 1, 12, 0)
    await cache.set("odd", {"when": when, "ratio": float("nan"), "raw": b"\x00"})
    async with client_for(cache_admin(cache, authorize=by_token, reveal_values=True)) as client:
        response = await client.get(f"{PREFIX}/key/odd", headers=AUTH)
    assert response.status_code == 200, response.text
    value = response.json()["value"]
    assert value["when"] == str(when)
    assert value["ratio"] == "NaN"
    assert response.json()["value_type"] == "dict"
    await cache.aclose()


async def test_a_circular_value_is_shown_as_its_repr(
    client_for: Callable[[CacheAdmin], httpx.AsyncClient],
) -> None:
    from tagcache import PickleCodec

    cache = Cache(
        MemoryBackend(), namespace=unique_namespace("pickle"), codec=PickleCodec(secret_key=b"k" * 32)
    )
    loop: list[Any] = [1]
    loop.append(loop)
    await cache.set("loop", loop)
    async with client_for(cache_admin(cache, authorize=by_token, reveal_values=True)) as client:
        response = await client.get(f"{PREFIX}/key/loop", headers=AUTH)
    assert response.status_code == 200, response.text
    assert (response.json()["value"], response.json()["value_size"]) == ("[1, [...]]", None)
    await cache.aclose()
