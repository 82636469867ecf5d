"""``CacheControlMiddleware``: policies, ETags, conditional GET/HEAD, streaming and background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import textwrap
import zlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
import pytest
import uvicorn
from httplint import HttpRequestLinter, HttpResponseLinter, levels
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tagcache.integrations.starlette.cache_control import CacheControlMiddleware, Policy
from tagcache.integrations.starlette.http import (
    etag_matches,
    make_etag,
    parse_cache_control,
    parse_http_date,
)

USERS = "public, max-age=300, stale-while-revalidate=60"
POLICIES = {
    r"/static/.*": "public, max-age=31536000, immutable",
    r"/api/v1/users/\d+": USERS,
    r"/api/v1/auth/.*": "no-store",
}
LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"
SERVER_DATE = "Mon, 07 Nov 1994 08:49:37 GMT"
TIMEOUT = 10.0


async def user(request: Request) -> Response:
    return PlainTextResponse(f"user {request.path_params['id']}")


async def anything(request: Request) -> Response:
    return PlainTextResponse("ok")


async def status(request: Request) -> Response:
    code = int(request.path_params["code"])
    return PlainTextResponse("body", status_code=code, headers={"etag": '"fixed"'})


async def cookies(request: Request) -> Response:
    response = PlainTextResponse("with cookies", headers={"vary": "Accept", "expires": LAST_MODIFIED})
    response.headers.append("vary", "Cookie")
    response.headers["content-location"] = "/cookies.txt"
    response.headers["content-language"] = "en"
    response.headers["date"] = SERVER_DATE
    response.headers["last-modified"] = LAST_MODIFIED
    response.set_cookie("a", "1")
    response.set_cookie("b", "2")
    return response


async def dated(request: Request) -> Response:
    return PlainTextResponse("dated", headers={"last-modified": LAST_MODIFIED})


async def own_validators(request: Request) -> Response:
    return PlainTextResponse("own", headers={"etag": 'W/"v1"', "cache-control": "max-age=5"})


async def sized(request: Request) -> Response:
    return Response(b"x" * int(request.path_params["size"]))


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"

    return StreamingResponse(chunks(), headers={"last-modified": LAST_MODIFIED})


async def streamed_with_etag(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"

    return StreamingResponse(chunks(), headers={"etag": '"s1"'})


ROUTES = [
    Route("/api/v1/users/{id:int}", user, methods=["GET", "POST"]),
    Route("/api/v1/users/{id:int}/avatar", user),
    Route("/api/v1/auth/login", anything, methods=["GET", "POST"]),
    Route("/static/{path:path}", anything),
    Route("/status/{code:int}", status, methods=["GET", "POST"]),
    Route("/cookies", cookies),
    Route("/dated", dated),
    Route("/own", own_validators),
    Route("/sized/{size:int}", sized),
    Route("/stream", stream),
    Route("/streamed-etag", streamed_with_etag),
    Route("/plain", anything),
]


def make_app(**options: Any) -> Starlette:
    app = Starlette(routes=ROUTES)
    app.add_middleware(CacheControlMiddleware, **{"policies": POLICIES, **options})
    return app


@contextlib.asynccontextmanager
async def client_for(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app()) as c:
        yield c


# --- pure ASGI ---------------------------------------------------------------------------


async def test_non_http_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    middleware = CacheControlMiddleware(inner, policies=POLICIES)
    for scope in ({"type": "lifespan"}, {"type": "websocket", "path": "/static/x", "headers": []}):
        await middleware(scope, receive, send)
        assert seen.pop() == (scope, receive, send)


def http_scope(
    method: str = "GET", path: str = "/plain", headers: list[tuple[bytes, bytes]] | None = None
) -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": headers or []}


async def run_raw(app: ASGIApp, scope: Scope, **options: Any) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await CacheControlMiddleware(app, **{"policies": POLICIES, **options})(scope, receive, send)
    return sent


async def test_unknown_message_types_pass_through() -> None:
    early = {"type": "http.response.early_hint", "links": ["</s.css>; rel=preload"]}
    trailers = {"type": "http.response.trailers", "headers": [(b"x-checksum", b"1")], "more_trailers": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(early)
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"abc"})
        await send(trailers)

    sent = await run_raw(app, http_scope(path="/static/a"))
    assert sent[0] is early
    assert sent[1]["trailers"] is True
    assert (b"cache-control", b"public, max-age=31536000, immutable") in sent[1]["headers"]
    assert (b"etag", make_etag(b"abc", weak=False).encode()) in sent[1]["headers"]
    assert sent[2]["body"] == b"abc"
    assert sent[3] is trailers


async def test_pathsend_while_the_start_is_held_passes_through_without_etag() -> None:
    pathsend = {"type": "http.response.pathsend", "path": "/tmp/file"}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"9")]})
        await send(pathsend)

    sent = await run_raw(app, http_scope())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.pathsend"]
    assert sent[1] is pathsend
    assert all(name != b"etag" for name, _ in sent[0]["headers"])


async def test_the_applications_header_list_is_not_mutated() -> None:
    headers = [(b"content-type", b"text/plain")]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"abc"})

    for _ in range(2):
        sent = await run_raw(app, http_scope(path="/static/a"))
        assert len(sent[0]["headers"]) == 3
    assert headers == [(b"content-type", b"text/plain")]


async def test_duplicate_set_cookie_and_vary_survive(client: httpx.AsyncClient) -> None:
    response = await client.get("/cookies")
    assert response.headers.get_list("set-cookie") == [
        "a=1; Path=/; SameSite=lax",
        "b=2; Path=/; SameSite=lax",
    ]
    assert response.headers.get_list("vary") == ["Accept", "Cookie"]


# --- policies ----------------------------------------------------------------------------


async def test_policy_matches_the_whole_path(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/users/1")).headers["cache-control"] == USERS
    assert "cache-control" not in (await client.get("/api/v1/users/1/avatar")).headers
    assert "cache-control" not in (await client.get("/plain")).headers
    static = await client.get("/static/css/site.css")
    assert static.headers["cache-control"] == "public, max-age=31536000, immutable"


async def test_first_listed_match_wins() -> None:
    policies = {r"/api/v1/users/1": "max-age=1", r"/api/v1/users/\d+": "max-age=2"}
    async with client_for(make_app(policies=policies)) as client:
        assert (await client.get("/api/v1/users/1")).headers["cache-control"] == "max-age=1"
        assert (await client.get("/api/v1/users/2")).headers["cache-control"] == "max-age=2"
    async with client_for(make_app(policies=list(reversed(policies.items())))) as client:
        assert (await client.get("/api/v1/users/1")).headers["cache-control"] == "max-age=2"


async def test_rules_are_right_for_many_and_long_paths() -> None:
    """The per-path rule memo starts over when full and skips long paths: answers stay right."""

    async def receive_nothing() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    middleware = CacheControlMiddleware(app, policies=POLICIES, etag=False)
    long_user = "/api/v1/users/" + "7" * 300
    for n in range(5000):
        for path, expected in (
            (f"/api/v1/users/{n}", USERS.encode()),
            (f"/api/v1/users/{n}/avatar", None),
            (long_user, USERS.encode()),
            (long_user + "/avatar", None),
        ):
            if n % 50 and path.startswith(long_user):
                continue
            sent: list[Message] = []

            async def send(message: Message, sent: list[Message] = sent) -> None:
                sent.append(message)

            await middleware(http_scope(path=path), receive_nothing, send)
            assert dict(sent[0]["headers"]).get(b"cache-control") == expected, path
    assert len(middleware._memo) <= 4096
    assert all(len(path) <= 256 for path in middleware._memo)


async def test_caching_policy_only_for_get_and_head_below_400() -> None:
    policies = {r"/status/\d+": "public, max-age=60", r"/api/v1/users/\d+": USERS}
    async with client_for(make_app(policies=policies)) as client:
        assert (await client.get("/status/200")).headers["cache-control"] == "public, max-age=60"
        assert (await client.head("/status/200")).headers["cache-control"] == "public, max-age=60"
        assert (await client.get("/status/301")).headers["cache-control"] == "public, max-age=60"
        for code in (400, 404, 500):
            assert "cache-control" not in (await client.get(f"/status/{code}")).headers
        assert "cache-control" not in (await client.post("/status/200")).headers
        assert "cache-control" not in (await client.post("/api/v1/users/1")).headers


async def test_no_store_and_private_policies_apply_to_every_method_and_status() -> None:
    policies = {r"/status/4\d\d": "Private", r"/status/\d+": "no-store", r"/api/v1/auth/.*": "no-store"}
    async with client_for(make_app(policies=policies)) as client:
        for response in (
            await client.post("/api/v1/auth/login"),
            await client.get("/api/v1/auth/login"),
            await client.get("/status/500"),
            await client.post("/status/201"),
        ):
            assert response.headers["cache-control"] == "no-store"
        assert (await client.post("/status/404")).headers["cache-control"] == "Private"


async def test_no_store_responses_get_no_computed_etag(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/auth/login")
    assert response.headers["cache-control"] == "no-store"
    assert "etag" not in response.headers


async def test_existing_cache_control_is_kept_unless_override() -> None:
    policies = {r"/own": "public, max-age=60"}
    async with client_for(make_app(policies=policies)) as client:
        assert (await client.get("/own")).headers.get_list("cache-control") == ["max-age=5"]
    async with client_for(make_app(policies=policies, override=True)) as client:
        assert (await client.get("/own")).headers.get_list("cache-control") == ["public, max-age=60"]
    per_pattern = {r"/own": Policy(cache_control="no-cache", override=True)}
    async with client_for(make_app(policies=per_pattern)) as client:
        assert (await client.get("/own")).headers.get_list("cache-control") == ["no-cache"]


async def test_policy_object_and_mapping_give_per_method_directives() -> None:
    for spec in (
        Policy(methods={"get": "public, max-age=60", "POST": "no-store"}),
        {"methods": {"GET": "public, max-age=60", "POST": "no-store"}},
    ):
        async with client_for(make_app(policies={r"/api/v1/users/\d+": spec})) as client:
            assert (await client.get("/api/v1/users/1")).headers["cache-control"] == "public, max-age=60"
            assert (await client.head("/api/v1/users/1")).headers["cache-control"] == "public, max-age=60"
            assert (await client.post("/api/v1/users/1")).headers["cache-control"] == "no-store"
    fallback = Policy(cache_control="private", methods={"GET": "max-age=9"})
    async with client_for(make_app(policies={r"/api/v1/users/\d+": fallback})) as client:
        assert (await client.get("/api/v1/users/1")).headers["cache-control"] == "max-age=9"
        assert (await client.post("/api/v1/users/1")).headers["cache-control"] == "private"


def test_invalid_configuration_is_rejected_at_construction() -> None:
    app = Starlette()
    with pytest.raises(ValueError, match="no directive"):
        CacheControlMiddleware(app, policies={"/x": " , "})
    with pytest.raises(ValueError, match="control character"):
        CacheControlMiddleware(app, policies={"/x": "max-age=1\r\nx-evil: 1"})
    with pytest.raises(TypeError, match="must be a str, Policy or mapping"):
        CacheControlMiddleware(app, policies={"/x": 60})  # type: ignore[arg-type]  # wrong on purpose
    with pytest.raises(TypeError, match="policy for '/x'"):
        CacheControlMiddleware(app, policies={"/x": {"max_age": 1}})
    with pytest.raises(ValueError, match="max_etag_body"):
        CacheControlMiddleware(app, max_etag_body=-1)
    with pytest.raises(re.error):
        CacheControlMiddleware(app, policies={"/x(": "no-store"})


# --- ETags -------------------------------------------------------------------------------


async def test_etag_is_a_quoted_blake2b_of_the_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/users/7")
    digest = hashlib.blake2b(b"user 7", digest_size=16).hexdigest()
    assert response.headers["etag"] == f'"{digest}"' == make_etag(b"user 7", weak=False)
    assert (await client.get("/api/v1/users/8")).headers["etag"] != response.headers["etag"]


async def test_etag_is_weak_for_a_content_coded_body() -> None:
    app = Starlette(routes=ROUTES)
    app.add_middleware(GZipMiddleware, minimum_size=1)
    app.add_middleware(CacheControlMiddleware, policies=POLICIES)
    async with client_for(app) as client:
        gzipped = await client.get("/api/v1/users/7", headers={"accept-encoding": "gzip"})
        identity = await client.get("/api/v1/users/7", headers={"accept-encoding": "identity"})
    assert gzipped.headers["content-encoding"] == "gzip"
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # what GZipMiddleware sends
    coded = compressor.compress(b"user 7") + compressor.flush()
    assert gzipped.headers["etag"] == make_etag(coded, weak=True)
    assert identity.headers["etag"] == make_etag(b"user 7", weak=False)


async def test_etag_only_for_single_message_200_get_head_within_the_limit() -> None:
    async with client_for(make_app(max_etag_body=100)) as client:
        assert "etag" in (await client.get("/sized/100")).headers
        assert "etag" in (await client.head("/sized/100")).headers
        assert "etag" not in (await client.get("/sized/101")).headers
        assert (await client.get("/sized/101")).content == b"x" * 101
        assert "etag" not in (await client.get("/stream")).headers
        assert (await client.get("/stream")).content == b"onetwo"
        assert "etag" not in (await client.post("/api/v1/users/1")).headers
    async with client_for(make_app(etag=False)) as client:
        assert "etag" not in (await client.get("/plain")).headers


async def test_etag_not_added_to_non_200(client: httpx.AsyncClient) -> None:
    async def created(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("made", status_code=201)(scope, receive, send)

    async with client_for(CacheControlMiddleware(created)) as c:
        response = await c.get("/")
    assert response.status_code == 201
    assert "etag" not in response.headers


async def test_an_application_etag_is_kept_and_used_for_preconditions(client: httpx.AsyncClient) -> None:
    response = await client.get("/own")
    assert response.headers.get_list("etag") == ['W/"v1"']
    assert (await client.get("/own", headers={"if-none-match": '"v1"'})).status_code == 304
    assert (await client.get("/own", headers={"if-none-match": '"v2"'})).status_code == 200


async def test_head_with_empty_body_and_nonzero_length_gets_no_made_up_etag() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b""})

    sent = await run_raw(app, http_scope("HEAD"))
    assert all(name != b"etag" for name, _ in sent[0]["headers"])


def test_etag_is_the_same_across_processes_with_different_hash_seeds() -> None:
    script = textwrap.dedent(
        """
        import asyncio, httpx
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route
        from tagcache.integrations.starlette.cache_control import CacheControlMiddleware

        async def view(request):
            return JSONResponse({"b": [1, 2], "a": "x"})

        app = Starlette(routes=[Route("/", view)])
        app.add_middleware(CacheControlMiddleware)

        async def main():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                print((await client.get("/")).headers["etag"])

        asyncio.run(main())
        """
    )
    etags = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        etags.add(done.stdout.strip())
    assert len(etags) == 1
    (etag,) = etags
    assert etag.startswith('"') and etag.endswith('"') and len(etag) == 34


# --- conditional requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "{etag}",
        "W/{etag}",
        '"other", {etag}',
        '"a,b", W/{etag} , "c"',
        "*",
    ],
)
async def test_if_none_match_gives_304(client: httpx.AsyncClient, header: str) -> None:
    etag = (await client.get("/api/v1/users/1")).headers["etag"]
    response = await client.get("/api/v1/users/1", headers={"if-none-match": header.format(etag=etag)})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == USERS


async def test_if_none_match_lines_combine(client: httpx.AsyncClient) -> None:
    etag = (await client.get("/plain")).headers["etag"]
    headers = [("if-none-match", '"nope"'), ("if-none-match", etag)]
    assert (await client.get("/plain", headers=headers)).status_code == 304


async def test_if_none_match_without_match_gives_the_full_response(client: httpx.AsyncClient) -> None:
    for header in ('"nope"', 'W/"nope", "also-not"', "nope", ""):
        response = await client.get("/api/v1/users/1", headers={"if-none-match": header})
        assert response.status_code == 200
        assert response.text == "user 1"


async def test_304_carries_only_what_rfc_9110_allows(client: httpx.AsyncClient) -> None:
    full = await client.get("/cookies")
    response = await client.get("/cookies", headers={"if-none-match": full.headers["etag"]})
    assert response.status_code == 304
    assert response.content == b""
    headers = response.headers
    for name in ("etag", "expires", "content-location", "date"):
        assert headers[name] == full.headers[name]
    assert headers.get_list("vary") == ["Accept", "Cookie"]
    assert len(headers.get_list("set-cookie")) == 2  # not representation metadata: kept
    for name in ("content-length", "content-type", "content-language", "last-modified"):
        assert name not in headers


async def test_304_from_a_policy_route_keeps_cache_control(client: httpx.AsyncClient) -> None:
    etag = (await client.get("/static/app.js")).headers["etag"]
    response = await client.get("/static/app.js", headers={"if-none-match": etag})
    assert response.status_code == 304
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"


async def test_if_modified_since(client: httpx.AsyncClient) -> None:
    same = await client.get("/dated", headers={"if-modified-since": LAST_MODIFIED})
    assert same.status_code == 304
    assert "etag" in same.headers
    assert "last-modified" not in same.headers  # there is an ETag
    later = await client.get("/dated", headers={"if-modified-since": "Sun, 06 Nov 1994 08:49:38 GMT"})
    assert later.status_code == 304
    earlier = await client.get("/dated", headers={"if-modified-since": "Sun, 06 Nov 1994 08:49:36 GMT"})
    assert earlier.status_code == 200
    assert earlier.text == "dated"
    asctime = await client.get("/dated", headers={"if-modified-since": "Sun Nov  6 08:49:37 1994"})
    assert asctime.status_code == 304


async def test_if_modified_since_keeps_last_modified_when_there_is_no_etag() -> None:
    async with client_for(make_app(etag=False)) as client:
        response = await client.get("/dated", headers={"if-modified-since": LAST_MODIFIED})
    assert response.status_code == 304
    assert response.headers["last-modified"] == LAST_MODIFIED
    assert "etag" not in response.headers


async def test_if_modified_since_ignored_when_if_none_match_present(client: httpx.AsyncClient) -> None:
    headers = {"if-none-match": '"nope"', "if-modified-since": LAST_MODIFIED}
    assert (await client.get("/dated", headers=headers)).status_code == 200


@pytest.mark.parametrize("date", ["yesterday", "Sun, 32 Nov 1994 08:49:37 GMT", ""])
async def test_invalid_if_modified_since_is_ignored(client: httpx.AsyncClient, date: str) -> None:
    response = await client.get("/dated", headers={"if-modified-since": date})
    assert response.status_code == 200
    assert response.text == "dated"


async def test_several_if_modified_since_lines_are_ignored(client: httpx.AsyncClient) -> None:
    headers = [("if-modified-since", LAST_MODIFIED), ("if-modified-since", LAST_MODIFIED)]
    assert (await client.get("/dated", headers=headers)).status_code == 200


async def test_if_modified_since_without_last_modified_gives_200(client: httpx.AsyncClient) -> None:
    response = await client.get("/plain", headers={"if-modified-since": "Fri, 01 Jan 2100 00:00:00 GMT"})
    assert response.status_code == 200


@pytest.mark.parametrize("code", [301, 404, 500])
async def test_only_2xx_become_304(client: httpx.AsyncClient, code: int) -> None:
    for header in ('"fixed"', "*"):
        response = await client.get(f"/status/{code}", headers={"if-none-match": header})
        assert response.status_code == code
        assert response.text == "body"


async def test_unsafe_methods_are_never_answered_304_or_412(client: httpx.AsyncClient) -> None:
    for headers in ({"if-none-match": '"fixed"'}, {"if-none-match": "*"}, {"if-match": '"other"'}):
        response = await client.post("/status/200", headers=headers)
        assert response.status_code == 200
        assert response.text == "body"


async def test_a_streamed_response_with_its_own_etag_can_become_304(client: httpx.AsyncClient) -> None:
    response = await client.get("/streamed-etag", headers={"if-none-match": '"s1"'})
    assert response.status_code == 304
    assert response.content == b""
    assert (await client.get("/stream", headers={"if-modified-since": LAST_MODIFIED})).status_code == 304
    assert (await client.get("/stream", headers={"if-none-match": "*"})).status_code == 304


async def test_head_gets_the_same_cache_control_and_etag_as_get(client: httpx.AsyncClient) -> None:
    get = await client.get("/api/v1/users/3")
    head = await client.head("/api/v1/users/3")
    assert head.status_code == 200
    assert head.content == b""
    for name in ("cache-control", "etag", "content-length"):
        assert head.headers[name] == get.headers[name]
    conditional = await client.head("/api/v1/users/3", headers={"if-none-match": get.headers["etag"]})
    assert conditional.status_code == 304
    assert conditional.headers["etag"] == get.headers["etag"]


# --- helpers -----------------------------------------------------------------------------


def test_parse_cache_control() -> None:
    assert parse_cache_control('Public, MAX-AGE="60", No-Cache="Set-Cookie, X-A"') == {
        "public": None,
        "max-age": "60",
        "no-cache": "Set-Cookie, X-A",
    }
    assert parse_cache_control("max-age=1, max-age=2") == {"max-age": "1"}
    assert parse_cache_control(' s-maxage = 10 ,, private="a\\"b" junk, x=') == {
        "s-maxage": "10",
        "private": 'a"b',
        "x": "",
    }
    assert parse_cache_control("") == {}
    assert parse_cache_control('max-age="unterminated') == {"max-age": "unterminated"}


async def test_policy_directives_are_case_insensitive_and_may_be_quoted() -> None:
    policies = {r"/api/v1/users/\d+": 'NO-STORE, max-age="0"', r"/status/\d+": 'Max-Age="60"'}
    async with client_for(make_app(policies=policies)) as client:
        # Recognised as no-store: applied to POST too, and no ETag is computed.
        response = await client.post("/api/v1/users/1")
        assert response.headers["cache-control"] == 'NO-STORE, max-age="0"'
        assert "etag" not in (await client.get("/api/v1/users/1")).headers
        # A caching policy: GET only.
        assert (await client.get("/status/200")).headers["cache-control"] == 'Max-Age="60"'
        assert "cache-control" not in (await client.post("/status/200")).headers


def test_etag_matches() -> None:
    assert etag_matches('"a"', '"a"')
    assert etag_matches('W/"a"', '"a"')
    assert etag_matches('"a"', 'W/"a"')
    assert etag_matches('"x", "a,b"', '"a,b"')
    assert etag_matches(" * ", '"anything"')
    assert not etag_matches('"a"', '"b"')
    assert not etag_matches("a", '"a"')
    assert not etag_matches("", '"a"')
    assert not etag_matches('"a,b"', '"a"')


def test_make_etag() -> None:
    assert make_etag(b"", weak=False) == '"' + hashlib.blake2b(b"", digest_size=16).hexdigest() + '"'
    assert make_etag(b"x", weak=True) == "W/" + make_etag(b"x", weak=False)


def test_parse_http_date() -> None:
    for value in (LAST_MODIFIED, "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"):
        assert parse_http_date(value) == 784111777
    for value in ("", "garbage", "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT"):
        assert parse_http_date(value) is None


# --- httplint ----------------------------------------------------------------------------


def with_server_date(app: ASGIApp) -> ASGIApp:
    """Add ``Date`` like an HTTP server does (uvicorn, hypercorn), since ASGITransport does not."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_date(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"date", SERVER_DATE.encode())],
                }
            await send(message)

        await app(scope, receive, send_with_date)

    return wrapped


def lint(request: httpx.Request, response: httpx.Response) -> list[str]:
    req = HttpRequestLinter()
    req.process_request_topline(request.method.encode(), str(request.url).encode(), b"HTTP/1.1")
    req.process_headers(list(request.headers.raw))
    req.finish_content(True)
    linter = HttpResponseLinter(_related=req)
    linter.is_head_response = request.method == "HEAD"
    linter.process_response_topline(b"HTTP/1.1", str(response.status_code).encode(), b"")
    linter.process_headers(list(response.headers.raw))
    linter.feed_content(response.content)
    linter.finish_content(True)
    return [
        f"{note.level.name} {type(note).__name__}: {note._get_summary()}"
        for note in linter.notes
        if note.level in (levels.BAD, levels.WARN) and type(note).__name__ != "STORE_PUBLIC_UNNECESSARY"
    ]


async def test_httplint_finds_nothing_wrong() -> None:
    async with client_for(with_server_date(make_app())) as client:
        ok = await client.get("/api/v1/users/1")
        assert ok.headers["etag"] and ok.headers["cache-control"] == USERS
        not_modified = await client.get("/api/v1/users/1", headers={"if-none-match": ok.headers["etag"]})
        assert not_modified.status_code == 304
        no_store = await client.post("/api/v1/auth/login")
        assert no_store.headers["cache-control"] == "no-store"
        head = await client.head("/api/v1/users/1")
        for response in (ok, not_modified, no_store, head):
            assert lint(response.request, response) == [], response.request


# --- a real server: streaming, HEAD, background tasks ------------------------------------


async def wait_for(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, TIMEOUT)


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, *, date_header: bool = True) -> AsyncIterator[str]:
    """Run ``app`` on uvicorn on a free loopback port; yield its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", date_header=date_header
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not server.started:  # uvicorn offers no event to wait on, only this flag
            if task.done():
                task.result()
                pytest.fail("uvicorn stopped before it started")
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail("uvicorn did not start in time")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await wait_for(task)


async def test_real_server_streaming_head_and_background_tasks() -> None:
    second_chunk_allowed = asyncio.Event()
    client_has_response = asyncio.Event()
    background_done = asyncio.Event()

    async def streaming(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            await wait_for(second_chunk_allowed.wait())
            yield b"second"

        return StreamingResponse(chunks(), media_type="text/plain")

    async def after_response() -> None:
        await wait_for(client_has_response.wait())
        background_done.set()

    async def with_task(request: Request) -> Response:
        return PlainTextResponse("done", background=BackgroundTask(after_response))

    app = Starlette(
        routes=[
            Route("/static/stream", streaming),
            Route("/api/v1/users/{id:int}", user),
            Route("/api/v1/auth/task", with_task),
        ]
    )
    app.add_middleware(CacheControlMiddleware, policies=POLICIES)

    async with serve(app) as base, httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as client:
        # Streaming: the first chunk reaches the client while the app still has to produce the second.
        async with client.stream("GET", "/static/stream") as response:
            assert response.status_code == 200
            assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert "etag" not in response.headers
            chunks = response.aiter_raw()
            assert await wait_for(chunks.__anext__()) == b"first"
            assert not second_chunk_allowed.is_set()
            second_chunk_allowed.set()
            assert b"".join([chunk async for chunk in chunks]) == b"second"

        # HEAD: same Cache-Control, ETag and length as GET, no body, and 304 on a match.
        get = await client.get("/api/v1/users/5")
        head = await client.head("/api/v1/users/5")
        assert head.status_code == 200
        assert head.content == b""
        for name in ("cache-control", "etag", "content-length"):
            assert head.headers[name] == get.headers[name]
        assert "date" in head.headers
        conditional = await client.head("/api/v1/users/5", headers={"if-none-match": get.headers["etag"]})
        assert conditional.status_code == 304
        assert conditional.headers["etag"] == get.headers["etag"]
        assert "content-length" not in conditional.headers
        not_modified = await client.get("/api/v1/users/5", headers={"if-none-match": get.headers["etag"]})
        assert not_modified.status_code == 304
        assert not_modified.content == b""

        # Background task: the client has the whole response before the task finishes.
        response = await client.get("/api/v1/auth/task")
        assert response.text == "done"
        assert response.headers["cache-control"] == "no-store"
        assert not background_done.is_set()
        client_has_response.set()
        await wait_for(background_done.wait())
