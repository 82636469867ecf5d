"""The server-side response cache: ResponseCache and ResponseCacheMiddleware on FastAPI
and plain Starlette apps, through httpx's ASGI transport or direct ASGI calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tagcache import Cache
from tagcache.integrations.starlette.responses import ResponseCache, ResponseCacheMiddleware
from tagcache.testing import memory_cache

from tests.conftest import unique_namespace


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def stored_bodies(cache: Cache) -> list[bytes]:
    """The bodies of the responses stored in ``cache``."""
    bodies = []
    for key in await cache.keys("http:*", limit=None):
        value = await cache.get(key)
        if value is not None:
            bodies.append(value["b"])
    return bodies


async def turns(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition()`` holds (background work of the engine)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached after 1000 loop turns")


# ---------------------------------------------------------------------------- a FastAPI app


class Project(BaseModel):
    id: int
    name: str
    secret: str


def fastapi_app(responses: ResponseCache, calls: dict[str, int], **options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        ResponseCacheMiddleware,
        responses=responses,
        rules={r"/api/v1/users/(?P<user_id>\d+)": ["users", "user:{user_id}"]},
        **options,
    )
    versions: dict[int, int] = {}
    app.state.versions = versions

    @app.get("/api/v1/projects/{project_id}", response_model=Project, response_model_exclude={"secret"})
    @responses.cached(tags=["projects", "project:{project_id}"])
    async def get_project(project_id: int, request: Request) -> Any:
        calls["project"] = calls.get("project", 0) + 1
        return Project(id=project_id, name=f"p{project_id}v{versions.get(project_id, 1)}", secret="hunter2")

    @app.post("/api/v1/projects/{project_id}")
    async def update_project(project_id: int) -> dict[str, Any]:
        versions[project_id] = versions.get(project_id, 1) + 1
        return {"ok": True}

    @app.get("/api/v1/users/{user_id}")
    async def get_user(user_id: int) -> dict[str, Any]:
        calls["user"] = calls.get("user", 0) + 1
        return {"id": user_id, "calls": calls["user"]}

    @app.get("/api/v1/plain")
    async def plain() -> dict[str, Any]:
        calls["plain"] = calls.get("plain", 0) + 1
        return {"calls": calls["plain"]}

    return app


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> Cache:
    return memory_cache(namespace=unique_namespace("resp"), clock=clock)


async def test_a_marked_fastapi_route_is_stored_once_rendered_and_served_with_age(
    cache: Cache, clock: Clock
) -> None:
    responses = ResponseCache(cache, ttl=60, clock=clock)
    calls: dict[str, int] = {}
    async with client(fastapi_app(responses, calls)) as http:
        first = await http.get("/api/v1/projects/1")
        clock.now += 7
        second = await http.get("/api/v1/projects/1")
    assert calls["project"] == 1
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == {"id": 1, "name": "p1v1"}
    assert "age" not in first.headers
    assert second.headers["age"] == "7"
    assert first.headers["etag"] == second.headers["etag"]
    assert first.headers["etag"].startswith('"') and first.headers["etag"].endswith('"')
    assert second.headers["content-length"] == str(len(second.content))
    # What is stored is the final, filtered response: no excluded field.
    bodies = await stored_bodies(cache)
    assert len(bodies) == 1
    assert b"hunter2" not in bodies[0]
    assert b'"name":"p1v1"' in bodies[0]


async def test_a_marked_route_of_an_included_router_is_learned_from_its_first_response(
    cache: Cache,
) -> None:
    # FastAPI keeps an included APIRouter as one nested route: the app's router does not
    # list the marked endpoint, the router chooses it only when the request runs.
    responses = ResponseCache(cache, ttl=60)
    calls: dict[str, int] = {}
    versions: dict[int, int] = {}
    api, inner = APIRouter(prefix="/api"), APIRouter(prefix="/v1")

    @inner.get("/projects/{project_id}")
    @responses.cached(tags=["project:{project_id}"])
    async def get_project(project_id: int) -> dict[str, Any]:
        calls[f"p{project_id}"] = calls.get(f"p{project_id}", 0) + 1
        return {"id": project_id, "version": versions.get(project_id, 1)}

    @inner.get("/plain/{n}")
    async def plain(n: int) -> dict[str, Any]:
        calls["plain"] = calls.get("plain", 0) + 1
        return {"n": n}

    api.include_router(inner)
    app = FastAPI()
    app.include_router(api)
    app.add_middleware(ResponseCacheMiddleware, responses=responses)
    async with client(app) as http:
        # The first response teaches the path (it is not stored: its read came before any
        # snapshot of the tags); the second is read through the cache; then hits.
        for _ in range(4):
            assert (await http.get("/api/v1/projects/1")).json() == {"id": 1, "version": 1}
        assert calls["p1"] == 2
        # Its tags come from the path parameters, as for a route the router lists.
        versions[1] = 2
        await cache.invalidate_tags(["project:1"])
        assert (await http.get("/api/v1/projects/1")).json() == {"id": 1, "version": 2}
        assert (await http.get("/api/v1/projects/1")).json() == {"id": 1, "version": 2}
        assert calls["p1"] == 3
        # Another path of the same route is learned for itself; unmarked routes never are.
        for _ in range(3):
            await http.get("/api/v1/projects/2")
            await http.get("/api/v1/plain/1")
        assert (calls["p2"], calls["plain"]) == (2, 3)


async def test_stats_count_one_miss_then_hits_for_stored_responses(cache: Cache) -> None:
    responses = ResponseCache(cache, ttl=60)
    calls: dict[str, int] = {}
    async with client(fastapi_app(responses, calls)) as http:
        for _ in range(3):
            assert (await http.get("/api/v1/projects/1")).status_code == 200
    stats = await cache.stats()
    assert calls["project"] == 1
    assert (stats.misses, stats.hits) == (1, 2)  # the URL's bookkeeping reads are not counted
    (function,) = cache.function_stats().items()
    assert function[0] == "tagcache.ResponseCache"
    assert (function[1].misses, function[1].hits) == (1, 2)


async def test_the_etag_is_deterministic_and_changes_with_the_body(cache: Cache) -> None:
    calls: dict[str, int] = {}
    async with client(fastapi_app(ResponseCache(cache), calls)) as http:
        one = (await http.get("/api/v1/projects/1")).headers["etag"]
        other_cache = memory_cache(namespace=unique_namespace("resp"))
        async with client(fastapi_app(ResponseCache(other_cache), {})) as http2:
            assert (await http2.get("/api/v1/projects/1")).headers["etag"] == one
        assert (await http.get("/api/v1/projects/2")).headers["etag"] != one


async def test_invalidating_a_route_tag_runs_the_endpoint_again_with_a_fresh_etag(cache: Cache) -> None:
    calls: dict[str, int] = {}
    app = fastapi_app(ResponseCache(cache), calls)
    async with client(app) as http:
        old = await http.get("/api/v1/projects/1")
        await http.get("/api/v1/projects/2")
        app.state.versions[1] = 2  # changed behind the app's back
        assert (await http.get("/api/v1/projects/1")).json()["name"] == "p1v1"
        await cache.invalidate_tags(["project:1"])
        new = await http.get("/api/v1/projects/1")
        await http.get("/api/v1/projects/2")
        assert calls["project"] == 3
        assert new.json()["name"] == "p1v2"
        assert new.headers["etag"] != old.headers["etag"]
        await cache.invalidate_tags(["projects"])
        await http.get("/api/v1/projects/2")
        assert calls["project"] == 4


async def test_rules_tag_paths_with_regex_groups(cache: Cache) -> None:
    calls: dict[str, int] = {}
    async with client(fastapi_app(ResponseCache(cache), calls)) as http:
        assert (await http.get("/api/v1/users/42")).json() == {"id": 42, "calls": 1}
        assert (await http.get("/api/v1/users/42")).json() == {"id": 42, "calls": 1}
        await http.get("/api/v1/users/7")
        await cache.invalidate_tags(["user:42"])
        assert (await http.get("/api/v1/users/42")).json() == {"id": 42, "calls": 3}
        assert (await http.get("/api/v1/users/7")).json() == {"id": 7, "calls": 2}
        # Neither a rule nor a marked route: not cached.
        await http.get("/api/v1/plain")
        await http.get("/api/v1/plain")
    assert calls["plain"] == 2


async def test_the_query_string_is_part_of_the_key_in_any_order(cache: Cache) -> None:
    calls: dict[str, int] = {}
    async with client(fastapi_app(ResponseCache(cache), calls)) as http:
        await http.get("/api/v1/users/1?a=1&b=2")
        await http.get("/api/v1/users/1?b=2&a=1")
        assert calls["user"] == 1
        await http.get("/api/v1/users/1?a=2")
        assert calls["user"] == 2
        await cache.invalidate_tags(["user:1"])  # every query of the path
        await http.get("/api/v1/users/1?a=2")
        await http.get("/api/v1/users/1?a=1&b=2")
        assert calls["user"] == 4


async def test_a_successful_unsafe_request_invalidates_its_url(cache: Cache) -> None:
    calls: dict[str, int] = {}
    async with client(fastapi_app(ResponseCache(cache), calls)) as http:
        await http.get("/api/v1/projects/1")
        await http.get("/api/v1/projects/2")
        assert (await http.post("/api/v1/projects/1")).status_code == 200
        assert (await http.get("/api/v1/projects/1")).json()["name"] == "p1v2"
        await http.get("/api/v1/projects/2")
    assert calls["project"] == 3


# ---------------------------------------------------------------------------- conditional requests


async def test_if_none_match_gets_a_304_with_the_headers_of_the_200(cache: Cache, clock: Clock) -> None:
    calls: dict[str, int] = {}
    async with client(fastapi_app(ResponseCache(cache, clock=clock), calls)) as http:
        first = await http.get("/api/v1/projects/1")
        etag = first.headers["etag"]
        clock.now += 3
        for header in (etag, "W/" + etag, f'"nope", {etag}', "*"):
            hit = await http.get("/api/v1/projects/1", headers={"if-none-match": header})
            assert hit.status_code == 304, header
            assert hit.content == b""
            assert hit.headers["etag"] == etag
            assert hit.headers["age"] == "3"
            assert "content-length" not in hit.headers
            assert "content-type" not in hit.headers
        miss = await http.get("/api/v1/projects/1", headers={"if-none-match": '"other"'})
        assert miss.status_code == 200
        assert miss.json() == first.json()
    assert calls["project"] == 1


LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"


async def test_if_modified_since_is_evaluated_on_hits_against_the_stored_last_modified(
    cache: Cache, clock: Clock
) -> None:
    responses = ResponseCache(cache, clock=clock)
    calls: list[int] = []

    @responses.cached()
    async def dated(request: StarletteRequest) -> Response:
        calls.append(1)
        return PlainTextResponse("dated", headers={"last-modified": LAST_MODIFIED})

    app = Starlette(routes=[Route("/dated", dated)])
    app.add_middleware(ResponseCacheMiddleware, responses=responses)
    async with client(app) as http:
        first = await http.get("/dated", headers={"if-modified-since": LAST_MODIFIED})
        assert first.status_code == 304  # the miss is stored whole and answered conditionally
        later = "Mon, 07 Nov 1994 08:49:37 GMT"
        earlier = "Sat, 05 Nov 1994 08:49:37 GMT"
        for header, status in (
            ({"if-modified-since": LAST_MODIFIED}, 304),
            ({"if-modified-since": later}, 304),
            ({"if-modified-since": earlier}, 200),
            ({"if-modified-since": "not a date"}, 200),
            # If-None-Match, when present, decides alone.
            ({"if-modified-since": later, "if-none-match": '"other"'}, 200),
            ({"if-modified-since": earlier, "if-none-match": first.headers["etag"]}, 304),
        ):
            hit = await http.get("/dated", headers=header)
            assert hit.status_code == status, header
            assert hit.headers["etag"] == first.headers["etag"]
            assert (hit.content == b"") if status == 304 else (hit.text == "dated")
        twice = await http.get("/dated", headers=[("if-modified-since", later), ("if-modified-since", later)])
        assert twice.status_code == 200  # two lines make the field invalid: ignored
    assert len(calls) == 1


async def test_a_conditional_first_request_still_stores_the_full_response(cache: Cache) -> None:
    calls: dict[str, int] = {}
    async with client(fastapi_app(ResponseCache(cache), calls)) as http:
        etag = (await http.get("/api/v1/projects/9")).headers["etag"]
        await cache.invalidate_tags(["project:9"])
        revalidated = await http.get("/api/v1/projects/9", headers={"if-none-match": etag})
        assert revalidated.status_code == 304
        full = await http.get("/api/v1/projects/9")
        assert full.status_code == 200 and full.json()["id"] == 9
    assert calls["project"] == 2


async def test_head_is_served_from_the_get_entry_but_never_creates_it(cache: Cache) -> None:
    calls: dict[str, int] = {}
    async with client(fastapi_app(ResponseCache(cache), calls)) as http:
        head = await http.head("/api/v1/projects/1")
        assert head.status_code in (200, 405)  # FastAPI routes GET only; the app answered
        assert calls.get("project", 0) == 0 or calls["project"] == 1
        before = calls.get("project", 0)
        get = await http.get("/api/v1/projects/1")
        assert calls["project"] == before + 1  # the HEAD stored nothing
        head = await http.head("/api/v1/projects/1")
        assert calls["project"] == before + 1
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["etag"] == get.headers["etag"]
        assert head.headers.get("cache-control") == get.headers.get("cache-control")
        assert head.headers["content-length"] == str(len(get.content))


# ---------------------------------------------------------------------------- a plain Starlette app


def starlette_app(
    responses: ResponseCache,
    endpoint: Callable[[StarletteRequest], Any],
    path: str = "/thing",
    **options: Any,
) -> Starlette:
    app = Starlette(routes=[Route(path, endpoint, methods=["GET", "POST"])])
    app.add_middleware(ResponseCacheMiddleware, responses=responses, **options)
    return app


def counting(make: Callable[[StarletteRequest, int], Response]) -> tuple[Callable[..., Any], list[int]]:
    calls: list[int] = []

    async def endpoint(request: StarletteRequest) -> Response:
        calls.append(1)
        return make(request, len(calls))

    return endpoint, calls


@pytest.mark.parametrize(
    ("headers", "request_headers"),
    [
        ({"cache-control": "no-store"}, {}),
        ({"cache-control": "private, max-age=60"}, {}),
        ({"cache-control": "no-cache"}, {}),
        ({"cache-control": "max-age=0"}, {}),
        ({"cache-control": 'max-age="0"'}, {}),
        ({"set-cookie": "a=1"}, {}),
        ({"vary": "*"}, {}),
        ({"content-type": "text/event-stream"}, {}),
        ({}, {"authorization": "Bearer x"}),
    ],
)
async def test_responses_that_must_not_be_stored_are_not(
    cache: Cache, headers: dict[str, str], request_headers: dict[str, str]
) -> None:
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}", headers=headers))
    app = starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})
    async with client(app) as http:
        assert (await http.get("/thing", headers=request_headers)).text == "n=1"
        assert (await http.get("/thing", headers=request_headers)).text == "n=2"
    assert len(calls) == 2
    assert await stored_bodies(cache) == []


async def test_statuses_other_than_200_are_not_stored_by_default(cache: Cache) -> None:
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}", status_code=404))
    async with client(starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})) as http:
        await http.get("/thing")
        await http.get("/thing")
    assert len(calls) == 2
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}", status_code=404))
    app = starlette_app(ResponseCache(cache, statuses=(200, 404)), endpoint, rules={"/thing": []})
    async with client(app) as http:
        await http.get("/thing")
        assert (await http.get("/thing")).status_code == 404
    assert len(calls) == 1


async def test_authorization_requests_use_only_public_responses(cache: Cache) -> None:
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}", headers={"cache-control": "public"}))
    async with client(starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})) as http:
        assert (await http.get("/thing", headers={"authorization": "Bearer a"})).text == "n=1"
        assert (await http.get("/thing", headers={"authorization": "Bearer b"})).text == "n=1"
        assert (await http.get("/thing")).text == "n=1"
    # A response stored from an anonymous request without public: not for Authorization.
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}"))
    other = memory_cache(namespace=unique_namespace("resp"))
    async with client(starlette_app(ResponseCache(other), endpoint, rules={"/thing": []})) as http:
        assert (await http.get("/thing")).text == "n=1"
        assert (await http.get("/thing")).text == "n=1"
        assert (await http.get("/thing", headers={"authorization": "Bearer a"})).text == "n=2"
    assert len(calls) == 2


async def test_requests_differing_in_a_vary_header_never_share_an_entry(cache: Cache) -> None:
    def make(request: StarletteRequest, n: int) -> Response:
        lang = request.headers.get("accept-language")
        return PlainTextResponse(f"{lang}:{n}", headers={"vary": "Accept-Language"})

    endpoint, calls = counting(make)
    async with client(starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})) as http:
        first = (await http.get("/thing", headers={"accept-language": "fr"})).text
        assert first.startswith("fr:")
        # The second one learns nothing new: stored now.
        stored = (await http.get("/thing", headers={"accept-language": "fr"})).text
        assert (await http.get("/thing", headers={"accept-language": "fr"})).text == stored
        de = (await http.get("/thing", headers={"accept-language": "de"})).text
        assert de.startswith("de:")
        assert (await http.get("/thing", headers={"accept-language": "de"})).text == de
        empty = (await http.get("/thing", headers={"accept-language": ""})).text
        absent = (await http.get("/thing")).text
        assert empty.startswith(":") and absent.startswith("None:")
        assert (await http.get("/thing", headers={"accept-language": ""})).text == empty
        assert (await http.get("/thing")).text == absent
        assert (await http.get("/thing", headers={"accept-language": "fr"})).text == stored
    assert len(calls) == 5  # fr twice (its Vary learnt, then stored), de, empty, absent


async def test_a_client_cannot_bypass_the_cache_unless_allowed(cache: Cache) -> None:
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}"))
    async with client(starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})) as http:
        await http.get("/thing")
        for headers in (
            {"cache-control": "no-cache"},
            {"pragma": "no-cache"},
            {"cache-control": "max-age=0"},
        ):
            assert (await http.get("/thing", headers=headers)).text == "n=1"
    other = memory_cache(namespace=unique_namespace("resp"))
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}"))
    app = starlette_app(ResponseCache(other, honor_client_no_cache=True), endpoint, rules={"/thing": []})
    async with client(app) as http:
        await http.get("/thing")
        assert (await http.get("/thing", headers={"cache-control": "no-cache"})).text == "n=2"
        assert (await http.get("/thing")).text == "n=2"  # the entry was replaced
    assert len(calls) == 2


async def test_the_response_lifetime_bounds_the_ttl(cache: Cache, clock: Clock) -> None:
    endpoint, _ = counting(lambda r, n: PlainTextResponse(f"n={n}", headers={"cache-control": "max-age=10"}))
    async with client(
        starlette_app(ResponseCache(cache, ttl=60, clock=clock), endpoint, rules={"/thing": []})
    ) as http:
        # The first response teaches the URL's policy (a TTL other than the default)
        # and is not stored; the next one is stored with it.
        assert (await http.get("/thing")).text == "n=1"
        assert (await http.get("/thing")).text == "n=2"
        clock.now += 9
        assert (await http.get("/thing")).text == "n=2"
        clock.now += 2
        assert (await http.get("/thing")).text == "n=3"


# ---------------------------------------------------------------------------- stale responses


async def test_stale_while_revalidate_serves_stale_at_once_and_refreshes_once(
    cache: Cache, clock: Clock
) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    async def endpoint(request: StarletteRequest) -> Response:
        calls.append(1)
        if len(calls) == 3:
            await gate.wait()  # the background refresh is slow
        headers = {"cache-control": "max-age=60, stale-while-revalidate=30"}
        return PlainTextResponse(f"n={len(calls)}", headers=headers)

    async with client(
        starlette_app(ResponseCache(cache, clock=clock), endpoint, rules={"/thing": []})
    ) as http:
        # The first response teaches the URL's policy; the second is stored with it.
        assert [(await http.get("/thing")).text for _ in range(3)] == ["n=1", "n=2", "n=2"]
        clock.now += 61
        stale = [await http.get("/thing") for _ in range(3)]
        assert [r.text for r in stale] == ["n=2"] * 3
        assert stale[0].headers["age"] == "61"
        await turns(lambda: len(calls) == 3)
        assert len(calls) == 3  # one refresh, in the background, without a client
        sets = (await cache.stats()).sets
        gate.set()
        for _ in range(1000):
            if (await cache.stats()).sets > sets:
                break
            await asyncio.sleep(0)
        fresh = await http.get("/thing")
        assert fresh.text == "n=3"
        assert fresh.headers["age"] == "0"
    assert len(calls) == 3


async def test_stale_if_error_serves_the_stale_copy_on_a_5xx(cache: Cache, clock: Clock) -> None:
    failing = False

    def make(request: StarletteRequest, n: int) -> Response:
        if failing:
            return PlainTextResponse("boom", status_code=503)
        return PlainTextResponse(f"n={n}", headers={"cache-control": "max-age=60, stale-if-error=300"})

    endpoint, calls = counting(make)
    async with client(
        starlette_app(ResponseCache(cache, clock=clock), endpoint, rules={"/thing": []})
    ) as http:
        await http.get("/thing")
        clock.now += 61
        assert (await http.get("/thing")).text == "n=2"  # stored with the learnt policy
        clock.now += 61
        failing = True
        stale = await http.get("/thing")
        assert stale.status_code == 200 and stale.text == "n=2"
        clock.now += 301  # past the window: the 5xx goes to the client
        gone = await http.get("/thing")
        assert gone.status_code == 503 and gone.text == "boom"
    assert len(calls) == 4


async def test_must_revalidate_never_serves_stale(cache: Cache, clock: Clock) -> None:
    failing = False

    def make(request: StarletteRequest, n: int) -> Response:
        if failing:
            return PlainTextResponse("boom", status_code=500)
        return PlainTextResponse(f"n={n}", headers={"cache-control": "max-age=60, must-revalidate"})

    endpoint, calls = counting(make)
    rc = ResponseCache(cache, clock=clock, stale_while_revalidate=100, stale_if_error=100)
    async with client(starlette_app(rc, endpoint, rules={"/thing": []})) as http:
        await http.get("/thing")
        await http.get("/thing")
        clock.now += 61
        failing = True
        assert (await http.get("/thing")).status_code == 500
    assert len(calls) == 3  # stored at the first call (no stale window to learn)


# ---------------------------------------------------------------------------- streaming, sizes, bad days


async def call_asgi(
    app: Any, path: str = "/thing", method: str = "GET", send: Callable[[dict[str, Any]], Any] | None = None
) -> list[dict[str, Any]]:
    """Call ``app`` directly; return the messages it sent."""
    messages: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def record(message: dict[str, Any]) -> None:
        messages.append(message)
        if send is not None:
            await send(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    await app(scope, receive, record)
    return messages


async def test_a_body_over_max_body_streams_through_unstored(cache: Cache) -> None:
    release = asyncio.Event()
    first_seen = asyncio.Event()
    calls: list[int] = []

    async def chunks() -> Any:
        yield b"x" * 20
        await release.wait()  # the app is not done until the client got the first chunk
        yield b"y" * 20

    async def endpoint(request: StarletteRequest) -> Response:
        calls.append(1)
        return StreamingResponse(chunks(), media_type="text/plain")

    app = starlette_app(ResponseCache(cache, max_body=10), endpoint, rules={"/thing": []})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            first_seen.set()
            release.set()

    messages = await asyncio.wait_for(call_asgi(app, send=send), 5)
    assert first_seen.is_set()
    assert b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body") == (
        b"x" * 20 + b"y" * 20
    )
    assert "etag" not in {k.decode() for k, _ in messages[0]["headers"]}
    await call_asgi(app, send=send)
    assert len(calls) == 2
    assert await stored_bodies(cache) == []


async def test_background_tasks_run_after_the_response_is_sent(cache: Cache) -> None:
    sent = asyncio.Event()
    seen: list[bool] = []

    async def task() -> None:
        seen.append(sent.is_set())

    async def endpoint(request: StarletteRequest) -> Response:
        return JSONResponse({"a": 1}, background=BackgroundTask(task))

    app = starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            sent.set()

    await call_asgi(app, send=send)
    assert seen == [True]
    assert await stored_bodies(cache) == [b'{"a":1}']


async def test_a_client_that_disconnects_leaves_nothing_stored(cache: Cache) -> None:
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}"))
    app = starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})
    count = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        if count > 1:
            raise OSError("client went away")

    with pytest.raises(OSError, match="went away"):
        await call_asgi(app, send=send)
    assert await stored_bodies(cache) == []
    await call_asgi(app)
    await call_asgi(app)
    assert len(calls) == 2


async def test_concurrent_requests_share_one_app_call(cache: Cache) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    async def endpoint(request: StarletteRequest) -> Response:
        calls.append(1)
        await gate.wait()
        return PlainTextResponse("shared")

    app = starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})
    async with client(app) as http:
        pending = [asyncio.ensure_future(http.get("/thing")) for _ in range(5)]
        await turns(lambda: len(calls) == 1)
        gate.set()
        done = await asyncio.gather(*pending)
    assert [r.text for r in done] == ["shared"] * 5
    assert len(calls) == 1


async def test_a_paused_redis_lets_requests_through_to_the_app(redis_process: Any) -> None:
    server = redis_process()
    cache = Cache.from_url(server.url + "?socket_timeout=0.3", namespace=unique_namespace("resp"))
    endpoint, calls = counting(lambda r, n: PlainTextResponse(f"n={n}"))
    app = starlette_app(ResponseCache(cache), endpoint, rules={"/thing": []})
    try:
        async with client(app) as http:
            assert (await http.get("/thing")).text == "n=1"
            assert (await http.get("/thing")).text == "n=1"  # stored in Redis
            server.pause()
            try:
                started = time.monotonic()
                answer = await http.get("/thing")
                elapsed = time.monotonic() - started
            finally:
                server.resume()
            assert answer.status_code == 200 and answer.text == "n=2"
            assert elapsed < 2.5
        assert len(calls) == 2
    finally:
        await cache.aclose()


# ---------------------------------------------------------------------------- on a real server


@pytest.mark.parametrize("date", [False, True])
async def test_on_uvicorn_every_response_has_one_date_and_a_hit_its_original_one_with_date(
    cache: Cache, clock: Clock, date: bool
) -> None:
    """``date=True`` with uvicorn's ``date_header=False``; the default with uvicorn's own ``Date``."""
    import email.utils

    from tests.test_starlette_cache_control import serve

    clock.now = time.time()
    responses = ResponseCache(cache, ttl=60, clock=clock, date=date)
    calls: list[int] = []

    @responses.cached(tags=["items"])
    async def item(request: StarletteRequest) -> Response:
        calls.append(1)
        return PlainTextResponse("item")

    app = Starlette(routes=[Route("/item", item)])
    app.add_middleware(ResponseCacheMiddleware, responses=responses)
    async with serve(app, date_header=not date) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        miss = await http.get("/item")
        clock.now += 7
        hit = await http.get("/item")
        head = await http.head("/item")
    assert len(calls) == 1
    assert hit.headers["age"] == head.headers["age"] == "7"
    for response in (miss, hit, head):
        assert len(response.headers.get_list("date")) == 1
    if date:
        assert hit.headers["date"] == head.headers["date"] == miss.headers["date"]
        assert email.utils.parsedate_to_datetime(miss.headers["date"]).timestamp() == int(clock.now - 7)
