"""A server-side HTTP response cache for Starlette and FastAPI apps: whole rendered
responses stored in the cache backend, with tags, served by a pure ASGI middleware.

::

    from tagcache.integrations.starlette.responses import ResponseCache, ResponseCacheMiddleware

    responses = ResponseCache(cache, ttl=60)
    app.add_middleware(
        ResponseCacheMiddleware,
        responses=responses,
        rules={r"/api/v1/users/(?P<user_id>\\d+)": ["users", "user:{user_id}"]},
    )

    @app.get("/api/v1/projects/{project_id}")
    @responses.cached(tags=["projects", "project:{project_id}"])
    async def get_project(project_id: int): ...

    await cache.invalidate_tags(["project:42"])   # the next GET runs the endpoint again

A ``GET`` whose path matches a rule (``re.fullmatch``) or whose route's endpoint is
marked with :meth:`ResponseCache.cached` is read through the cache's engine: on a
miss the app runs in the request's own task, its final response (after FastAPI's
``response_model`` filtering, after inner middleware) is buffered, sent, and stored
with the tags of the rule and the route plus one tag per URL path; on a hit the
stored response is sent with an ``Age`` header, or a ``304`` when the request's
``If-None-Match`` matches the stored ``ETag``. ``HEAD`` is answered from a fresh
``GET`` entry and never creates one. A successful ``POST``/``PUT``/``PATCH``/``DELETE``
invalidates the entries of its URL. See :class:`ResponseCache` for what is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import string
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, Final, TypeVar

from starlette.routing import Host, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tagcache.cache import Cache
from tagcache.exceptions import BackendError, ConfigurationError, SerializationError, TagCacheError
from tagcache.integrations.starlette.http import etag_matches, make_etag, parse_cache_control, parse_http_date
from tagcache.readthrough import LoadPolicy, LoadRequest, Uncached
from tagcache.tags import MAX_TAG_LENGTH, check_tags, ttl_seconds

__all__ = ["ResponseCache", "ResponseCacheMiddleware"]

logger: Final = logging.getLogger("tagcache")

F = TypeVar("F", bound=Callable[..., Any])

#: Statuses a response may be stored with (RFC 9110's heuristically cacheable ones).
_STORABLE_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
#: Methods whose success invalidates the entries of their URL.
_UNSAFE: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Request headers not passed to the app when the response may be stored: the cache
#: wants the full response, and answers the condition itself from the stored ETag.
_CONDITIONAL: Final = frozenset({b"if-none-match", b"if-modified-since"})
#: Response headers never stored (hop-by-hop ones, and those recomputed when serving).
_NOT_STORED: Final = frozenset(
    {
        b"age",
        b"connection",
        b"content-length",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Headers a 304 carries (RFC 9110 15.4.5), besides ``Age``.
_NOT_MODIFIED_HEADERS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)
#: How long a URL's response shape (its Vary names and cache policy) is remembered, at least.
_META_TTL: Final = 86400.0
#: Distinct (stale windows, fail-open) policies kept; more are built per request.
_MAX_POLICIES: Final = 256
#: Reasons logged once each, at most.
_MAX_LOGGED: Final = 256
#: Paths whose marked route was learned from a response (routes the app's router does not
#: list itself, e.g. FastAPI's included routers), at most.
_MAX_LEARNED: Final = 65536


# ---------------------------------------------------------------------------- HTTP helpers


def _header_values(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k.lower() == name]


def _directives(values: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control directives of every header line (see :func:`parse_cache_control`)."""
    return parse_cache_control(", ".join(values))


def _delta(arg: str | None) -> int | None:
    """A delta-seconds argument, or ``None`` when missing or invalid."""
    if arg is None or not arg.isdigit() or not arg.isascii():
        return None
    return int(arg)


def _url_tag(path: str) -> str:
    """The tag every entry stored for ``path`` carries (whatever its query and host)."""
    tag = "url:" + path
    if len(tag) <= MAX_TAG_LENGTH and tag.isprintable():
        return tag
    return "url#" + hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _fields(template: str) -> set[str]:
    """The replacement fields a tag template names (``"user:{user_id}"`` -> ``{"user_id"}``)."""
    names: set[str] = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            if not field.isidentifier():
                raise ConfigurationError(
                    f"tag template {template!r}: use plain names in braces ({{user_id}}), got {{{field}}}"
                )
            names.add(field)
    return names


def _templates(tags: Iterable[str], what: str) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise ConfigurationError(f"{what}: tags must be a list of strings, not one string {tags!r}")
    result = tuple(tags)
    for tag in result:
        if not isinstance(tag, str) or not tag:
            raise ConfigurationError(f"{what}: a tag template must be a non-empty string, got {tag!r}")
        _fields(tag)
    return result


# ---------------------------------------------------------------------------- stored form


class _Record:
    """A stored response. Its cached form is a plain dict (see :meth:`dump`)."""

    __slots__ = ("body", "etag", "headers", "shared", "status", "stored_at", "ttl")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        stored_at: float,
        ttl: float,
        etag: str,
        shared: bool,
    ) -> None:
        self.status = status
        #: Response headers as stored: no Content-Length or Age, an ETag always.
        self.headers = headers
        self.body = body
        self.stored_at = stored_at
        self.ttl = ttl
        self.etag = etag
        #: The response says ``public`` or ``s-maxage``: it may answer requests with Authorization.
        self.shared = shared

    def dump(self) -> dict[str, Any]:
        return {
            "s": self.status,
            "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
            "b": self.body,
            "t": self.stored_at,
            "l": self.ttl,
            "e": self.etag,
            "p": self.shared,
        }

    @classmethod
    def load(cls, value: object) -> _Record | None:
        """The record in a cached value; ``None`` for anything else (foreign or older data)."""
        if not isinstance(value, dict):
            return None
        try:
            status, body, etag, shared = value["s"], value["b"], value["e"], value["p"]
            stored_at, ttl = float(value["t"]), float(value["l"])
            if type(status) is not int or not isinstance(body, bytes) or not isinstance(etag, str):
                return None
            headers = [(str(k).encode("latin-1"), str(v).encode("latin-1")) for k, v in value["h"]]
        except (KeyError, TypeError, ValueError):
            return None
        return cls(status, headers, body, stored_at, ttl, etag, bool(shared))


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a URL's responses look like to the cache: the request headers their
    ``Vary`` names and their cache policy. Known before a lookup (the key and the
    engine's policy need them), so kept in a small entry of its own per URL when it
    differs from the defaults."""

    vary: tuple[str, ...]
    ttl: float
    swr: float
    sie: float

    def dump(self) -> dict[str, Any]:
        return {"v": list(self.vary), "l": self.ttl, "w": self.swr, "e": self.sie}

    @classmethod
    def load(cls, value: object) -> _Shape | None:
        if not isinstance(value, dict):
            return None
        try:
            vary = tuple(str(v) for v in value["v"])
            return cls(vary, float(value["l"]), float(value["w"]), float(value["e"]))
        except (KeyError, TypeError, ValueError):
            return None


class _ServerError(Exception):
    """Raised by a load whose app answered 5xx, so the engine can serve a stale copy
    (``stale_if_error``); carries the buffered response, sent when there is none."""

    def __init__(self, start: Message, body: bytes) -> None:
        super().__init__(f"the app answered {start['status']}")
        self.start = start
        self.body = body

    async def send_to(self, send: Send) -> None:
        await send(self.start)
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


# ---------------------------------------------------------------------------- public API


class _RouteSpec:
    __slots__ = ("tags", "ttl")

    def __init__(self, tags: tuple[str, ...], ttl: float | None) -> None:
        self.tags = tags
        self.ttl = ttl


class ResponseCache:
    """Whole HTTP responses stored in a :class:`~tagcache.Cache`, with tags; served and
    stored by :class:`ResponseCacheMiddleware`.

    Args:
        cache: where responses are stored (its namespace, codec, backend).
        ttl: seconds a stored response stays fresh, unless the route says otherwise
            (:meth:`cached`) or the response's own ``s-maxage`` (else ``max-age``,
            else ``Expires``) is shorter: a copy is never served older than the
            response allows.
        max_body: largest body, in bytes, buffered for storing; a larger response is
            sent as it comes and not stored.
        stale_while_revalidate: seconds after expiry during which a stored response
            is served at once while one background load refreshes it, when the
            response's ``Cache-Control`` does not say (its ``stale-while-revalidate=N``
            wins).
        stale_if_error: seconds after expiry during which a stored response is served
            when the app fails or answers 5xx, when the response does not say (its
            ``stale-if-error=N`` wins). Neither window applies to responses with
            ``no-cache``, ``must-revalidate``, ``proxy-revalidate`` or ``s-maxage``
            unless they name the window themselves (and never under the first three).
        statuses: the statuses stored (default ``{200}``); a subset of 200, 203, 204,
            300, 301, 308, 404, 405, 410, 414 and 501.
        honor_client_no_cache: a request's ``Cache-Control: no-cache`` (or
            ``Pragma: no-cache``, ``max-age=0``) makes the app run and the entry be
            replaced. Off by default: any client could otherwise force load on
            the app's sources.
        fail_open: when the backend fails, run the app instead of failing the
            request (default: the cache's ``fail_open``, itself ``True`` by default).
        clock: Unix time in seconds for ``Age`` (default :func:`time.time`); give
            the cache's fake clock in tests.
        date: send ``Date`` from the middleware: a response that has none gets the
            current time, and a stored response keeps the time it was generated, so a
            hit carries its original ``Date`` with its ``Age``, as an HTTP cache's hit
            does. Off by default, because ASGI servers add ``Date: <now>`` to every
            response (a second ``Date`` would be wrong); turn it on together with the
            server's switch (uvicorn ``--no-date-header`` / ``date_header=False``,
            hypercorn ``include_date_header = false``). With the server's ``Date``, a
            hit of age N says ``Date: <now>`` and ``Age: N``: caches downstream still
            compute its age right (RFC 9111, section 4.2.3), but linters such as
            httplint take the pair for a ``Date`` rewritten by an intermediary.

    What is stored: the final response to a ``GET`` (not ``HEAD``) whose status is in
    ``statuses``, whose ``Cache-Control`` has none of ``no-store``, ``private`` and
    ``no-cache`` and whose lifetime is not zero, which sets no cookie, has no
    ``Vary: *``, no trailers and is not an event stream, and whose request carried no
    ``Authorization`` (unless the response says ``public`` or ``s-maxage``; only
    such entries answer requests with ``Authorization``). The key is the host, path
    and sorted query string (method-independent, so ``HEAD`` reads ``GET`` entries),
    plus the values of the request headers the response's ``Vary`` names (an absent
    header differs from an empty one). A stored response without ``ETag`` gets a
    strong one hashed from its body.
    """

    def __init__(
        self,
        cache: Cache,
        ttl: float | timedelta = 60,
        *,
        max_body: int = 1024 * 1024,
        stale_while_revalidate: float | timedelta = 0,
        stale_if_error: float | timedelta = 0,
        statuses: Iterable[int] = (200,),
        honor_client_no_cache: bool = False,
        fail_open: bool | None = None,
        clock: Callable[[], float] | None = None,
        date: bool = False,
    ) -> None:
        if not isinstance(cache, Cache):
            raise ConfigurationError(f"ResponseCache needs a tagcache.Cache, got {cache!r}")
        self.cache = cache
        self.ttl = self._positive(ttl, "ttl")
        if type(max_body) is not int or max_body < 0:
            raise ConfigurationError(f"max_body must be a non-negative int (bytes), got {max_body!r}")
        self.max_body = max_body
        self.stale_while_revalidate = (
            ttl_seconds(stale_while_revalidate, what="stale_while_revalidate") or 0.0
        )
        self.stale_if_error = ttl_seconds(stale_if_error, what="stale_if_error") or 0.0
        chosen = frozenset(statuses)
        if not chosen or not chosen <= _STORABLE_STATUSES:
            raise ConfigurationError(
                f"statuses must be a non-empty subset of {sorted(_STORABLE_STATUSES)}, got {sorted(chosen)}"
            )
        self.statuses = chosen
        if not isinstance(honor_client_no_cache, bool):
            raise ConfigurationError(
                f"honor_client_no_cache must be True or False, got {honor_client_no_cache!r}"
            )
        self.honor_client_no_cache = honor_client_no_cache
        if fail_open is not None and not isinstance(fail_open, bool):
            raise ConfigurationError(f"fail_open must be True, False or None, got {fail_open!r}")
        self._fail_open = fail_open
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a function returning seconds, got {clock!r}")
        self.clock: Callable[[], float] = clock if clock is not None else time.time
        if not isinstance(date, bool):
            raise ConfigurationError(f"date must be True or False, got {date!r}")
        self.date = date
        self._date_second = -1
        self._date_value = b""
        self._routes: dict[Any, _RouteSpec] = {}
        self._policies: dict[tuple[float, float, bool], LoadPolicy] = {}
        self._logged: set[str] = set()
        #: This response cache's counters in ``cache.function_stats()``.
        self.stats = cache.function_counters("tagcache.ResponseCache")

    @staticmethod
    def _positive(ttl: object, what: str) -> float:
        seconds = ttl_seconds(ttl, what=what)
        if not seconds or seconds <= 0:
            raise ConfigurationError(f"{what} must be a positive number of seconds, got {ttl!r}")
        return seconds

    def http_date(self, at: float | None = None) -> bytes:
        """``at`` (default: now, by :attr:`clock`) as an IMF-fixdate, the form of ``Date``."""
        when = self.clock() if at is None else at
        second = int(when)
        if at is not None:
            return formatdate(second, usegmt=True).encode("ascii")
        if second != self._date_second:  # formatted once per second, as servers do
            self._date_value = formatdate(second, usegmt=True).encode("ascii")
            self._date_second = second
        return self._date_value

    @property
    def fail_open(self) -> bool:
        """Whether a failing backend lets requests through to the app."""
        return self.cache.fail_open if self._fail_open is None else self._fail_open

    def cached(self, *, tags: Iterable[str] = (), ttl: float | timedelta | None = None) -> Callable[[F], F]:
        """Mark a route's endpoint so :class:`ResponseCacheMiddleware` stores its ``GET`` responses.

        ``tags`` are templates formatted with the route's path parameters
        (``"project:{project_id}"``); ``ttl`` overrides the cache-wide one. The
        endpoint is returned unchanged (same function, signature and sync/async
        nature) and registered here: put this decorator *below* the route
        decorator (``@app.get(...)`` on top), so the router holds the marked
        function. The middleware matches each request against the app's routes and
        stores the final rendered response, after ``response_model`` filtering.
        """
        templates = _templates(tags, "cached()")
        seconds = None if ttl is None else self._positive(ttl, "ttl")
        spec = _RouteSpec(templates, seconds)

        def mark(endpoint: F) -> F:
            try:
                self._routes[endpoint] = spec
            except TypeError as exc:
                raise ConfigurationError(f"cannot mark {endpoint!r}: it is not hashable") from exc
            return endpoint

        return mark

    def route_spec(self, endpoint: object) -> _RouteSpec | None:
        """The marking of ``endpoint`` by :meth:`cached`, or ``None``."""
        try:
            return self._routes.get(endpoint)
        except TypeError:
            return None

    # ------------------------------------------------------------------ internals

    def _policy(self, swr: float, sie: float) -> LoadPolicy:
        fail_open = self.fail_open
        policy = self._policies.get((swr, sie, fail_open))
        if policy is None:
            policy = LoadPolicy(stale_while_revalidate=swr, stale_if_error=sie, fail_open=fail_open)
            if len(self._policies) < _MAX_POLICIES:
                self._policies[(swr, sie, fail_open)] = policy
        return policy

    def _log_once(self, reason: str) -> None:
        if reason in self._logged or len(self._logged) >= _MAX_LOGGED:
            return
        self._logged.add(reason)
        logger.warning("tagcache: response cache: %s", reason)


class _Target:
    """A cacheable URL: its tags (checked), TTL and the digest of its identity."""

    __slots__ = ("path", "tags", "ttl", "url")

    def __init__(self, path: str, url: bytes, tags: tuple[str, ...], ttl: float) -> None:
        self.path = path
        self.url = url
        self.tags = tags
        self.ttl = ttl

    def shape_key(self) -> str:
        return "http-shape:" + self.url.hex()

    def entry_key(self, vary: Sequence[str], headers: Sequence[tuple[bytes, bytes]]) -> str:
        if not vary:
            return "http:" + self.url.hex()
        h = hashlib.blake2b(digest_size=16)
        for name in vary:
            values = [v for k, v in headers if k.lower() == name.encode("latin-1")]
            h.update(name.encode("latin-1") + b"\x00")
            h.update(b"\x01" + b", ".join(values) + b"\x00" if values else b"\x00\x00")
        return "http:" + self.url.hex() + ":" + h.hexdigest()


class _IdleReceive:
    """``receive`` for a load with no client (a background refresh): an empty request
    body, then a disconnect once the response is complete."""

    __slots__ = ("_done", "_sent")

    def __init__(self, done: asyncio.Event) -> None:
        self._done = done
        self._sent = False

    async def __call__(self) -> Message:
        if not self._sent:
            self._sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._done.wait()
        return {"type": "http.disconnect"}


class _Exchange:
    """One GET request's state, handed to the loader (and kept by the engine for a
    background refresh, which must not reach the client: :meth:`take` gives the
    client's ``send`` once, while the request is being answered)."""

    __slots__ = (
        "_send",
        "authorized",
        "error",
        "headers",
        "ran",
        "receive",
        "scope",
        "sent",
        "shape",
        "snapshot",
        "target",
    )

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, target: _Target, shape: _Shape, authorized: bool
    ) -> None:
        self.scope = scope
        self.receive = receive
        self._send: Send | None = send
        self.target = target
        self.shape = shape
        self.authorized = authorized
        #: The request's headers as the client sent them.
        self.headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        #: The scope a load without client runs the app with (copied per load).
        self.snapshot: Scope = dict(scope, headers=self.app_headers())
        #: Something was sent to the client.
        self.sent = False
        #: The loader ran for this request with its client (it answered the client).
        self.ran = False
        #: An error raised after the response to the client began (re-raised by the middleware).
        self.error: BaseException | None = None

    def app_headers(self) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in self.headers if k.lower() not in _CONDITIONAL]

    def take(self) -> Send | None:
        send, self._send = self._send, None
        return send

    def detach(self) -> None:
        self._send = None


class _Capture:
    """The ``send`` a load gives the app: buffers a storable response (up to
    ``max_body``) and passes everything else through to the client, if any."""

    def __init__(self, middleware: ResponseCacheMiddleware, exchange: _Exchange, client: Send | None) -> None:
        self.mw = middleware
        self.x = exchange
        self.client = client
        #: None until the response starts; then "store", "error" (5xx kept for
        #: stale-if-error) or "pass".
        self.mode: str | None = None
        self.reason = "the app sent no response"
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        #: A passed-through response turned into a 304 (its body is dropped).
        self.not_modified = False
        self.done = asyncio.Event()
        self.record: _Record | None = None
        self.shape: _Shape | None = None

    async def _to_client(self, message: Message) -> None:
        if self.client is not None:
            self.x.sent = True
            await self.client(message)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.mode == "pass":
            if kind == "http.response.body":
                more = bool(message.get("more_body", False))
                if not more:
                    self.done.set()
                if self.not_modified:  # a 304 in place of the response: no body
                    if not more:
                        await self._to_client({"type": "http.response.body", "body": b"", "more_body": False})
                    return
            await self._to_client(message)
            return
        if self.complete:
            return  # nothing follows the last part of a response
        if kind == "http.response.start" and self.mode is None:
            self.start = message
            self.mode = self.mw._decide(self, message)
            if self.mode == "pass":
                start = self.mw._conditional_start(self.x, message)
                self.not_modified = start is not message
                await self._to_client(start)
            return
        if kind == "http.response.body" and self.mode is not None:
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            self.chunks.append(body)
            self.size += len(body)
            if self.size > self.mw.responses.max_body:
                await self._pass(f"body over max_body={self.mw.responses.max_body}", more)
                return
            if more:
                return
            self.complete = True
            self.done.set()
            if self.mode == "store":
                await self._finish()
            return
        # A message this cache does not know (or out of order): pass it through.
        await self._pass(f"message {kind!r}", True)
        await self._to_client(message)

    async def _pass(self, reason: str, more: bool) -> None:
        """Give up buffering: send what is held and pass the rest through."""
        self.reason = reason
        self.mode = "pass"
        start, chunks = self.start, self.chunks
        self.chunks = []
        if not more:
            self.done.set()
        if start is not None:
            await self._to_client(start)
            if chunks or not more:
                await self._to_client(
                    {"type": "http.response.body", "body": b"".join(chunks), "more_body": more}
                )

    async def _finish(self) -> None:
        """The response is complete and storable: build its record and answer the client."""
        assert self.start is not None
        rc = self.mw.responses
        status = int(self.start["status"])
        body = b"".join(self.chunks)
        self.chunks = []
        headers = [
            (bytes(k).lower(), bytes(v))
            for k, v in self.start.get("headers", ())
            if k.lower() not in _NOT_STORED
        ]
        stored_at = rc.clock()
        if rc.date and not any(k == b"date" for k, _ in headers):
            headers.append((b"date", rc.http_date(stored_at)))
        etags = [v for k, v in headers if k == b"etag"]
        if etags:
            etag = etags[0].decode("latin-1")
        else:
            etag = make_etag(body, weak=False)
            headers.append((b"etag", etag.encode("latin-1")))
        directives = _directives(_header_values(headers, b"cache-control"))
        shape = self.mw._shape_of(self.x.target, headers, directives)
        assert shape is not None  # _decide checked it
        shared = "public" in directives or "s-maxage" in directives
        self.record = _Record(status, headers, body, stored_at, shape.ttl, etag, shared)
        self.shape = shape
        if self.client is not None:
            self.x.sent = True
            await self.mw._serve(self.record, self.x.headers, self.client, head=False, age=None)

    async def result(self) -> Any:
        """What the load returns once the app returned."""
        if self.mode in ("store", "error") and not self.complete:
            # The app returned in the middle of its response: give the client what it sent.
            await self._pass("the app returned before its response was complete", True)
        if self.mode == "error" and self.start is not None:
            raise _ServerError(self.start, b"".join(self.chunks))
        if self.mode != "store" or self.record is None:
            return Uncached(None, self.reason)
        shape = self.shape
        if shape is not None and shape != self.x.shape:
            # The key or the policy this load ran under was not the response's:
            # remember the response's shape; the next request stores it.
            await self.mw._write_shape(self.x.target, shape)
            return Uncached(None, "the response's Vary or cache policy changed")
        return self.record.dump()


def _not_modified(request_headers: Sequence[tuple[bytes, bytes]], record: _Record) -> bool:
    """Whether the request's preconditions make a stored 2xx a 304 (RFC 9110, 13.2.2, steps 3-4).

    ``If-None-Match`` against the stored ETag (weak comparison); without it,
    ``If-Modified-Since`` against the stored ``Last-Modified``, ignored unless both are one
    valid HTTP-date.
    """
    inm = _header_values(request_headers, b"if-none-match")
    if inm:
        return etag_matches(", ".join(inm), record.etag)
    since = _header_values(request_headers, b"if-modified-since")
    modified = _header_values(record.headers, b"last-modified")
    if len(since) != 1 or len(modified) != 1:
        return False
    since_at, modified_at = parse_http_date(since[0]), parse_http_date(modified[0])
    return since_at is not None and modified_at is not None and modified_at <= since_at


class _Dated:
    """Wraps ``send``: a start message without ``Date`` gets the current one (``date=True``)."""

    __slots__ = ("responses", "send_next", "started")

    def __init__(self, send: Send, responses: ResponseCache) -> None:
        self.send_next = send
        self.responses = responses
        self.started = False

    async def send(self, message: Message) -> None:
        if not self.started and message["type"] == "http.response.start":
            self.started = True
            headers = message.get("headers", ())
            if not any(bytes(k).lower() == b"date" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"date", self.responses.http_date())]}
        await self.send_next(message)


class _Learner:
    """Wraps ``send`` for a GET the middleware found no cacheable target for: at the start
    of the response, the router has put the endpoint it chose in the scope."""

    __slots__ = ("middleware", "scope", "send_next")

    def __init__(self, middleware: ResponseCacheMiddleware, scope: Scope, send: Send) -> None:
        self.middleware = middleware
        self.scope = scope
        self.send_next = send

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            scope = self.scope
            endpoint = scope.get("endpoint")
            if endpoint is not None:
                self.middleware.learn(scope["path"], endpoint, scope.get("path_params") or {})
        await self.send_next(message)


class ResponseCacheMiddleware:
    """Pure ASGI middleware serving and storing responses of a :class:`ResponseCache`.

    Args:
        app: the ASGI app.
        responses: the :class:`ResponseCache` whose marked routes (:meth:`ResponseCache.cached`)
            are served.
        rules: path regexes (matched with ``re.fullmatch`` on the whole path) to tag
            templates formatted with the regex's named groups; a matching ``GET`` is
            cached with those tags (and those of a marked route, if any).
        ttl: the TTL for rule-matched paths, instead of the :class:`ResponseCache`'s
            (a marked route's own ``ttl`` wins).

    Routes are found as Starlette finds them (``scope["app"].router``, each route's
    ``matches``, into mounts), on every request: path parameters differ per request.
    A marked route the app's router does not list itself (an ``APIRouter`` included
    with FastAPI's ``include_router``, which recent FastAPI keeps as one nested route)
    is learned from the first response of each path (the endpoint the router chose,
    ``scope["endpoint"]``): that response is not stored (its read came before any
    snapshot of the tags), the path's next ``GET`` is read through the cache. Up to
    65,536 paths are learned. Scopes other than ``http`` and methods other than GET,
    HEAD and the unsafe ones pass through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        responses: ResponseCache,
        rules: Mapping[str, Iterable[str]] | None = None,
        ttl: float | timedelta | None = None,
    ) -> None:
        if not isinstance(responses, ResponseCache):
            raise ConfigurationError(f"responses must be a ResponseCache, got {responses!r}")
        self.app = app
        self.responses = responses
        self._ttl = None if ttl is None else ResponseCache._positive(ttl, "ttl")
        compiled: list[tuple[re.Pattern[str], tuple[str, ...]]] = []
        for pattern, tags in (rules or {}).items():
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise ConfigurationError(f"rule {pattern!r} is not a valid regex: {exc}") from exc
            templates = _templates(tags, f"rule {pattern!r}")
            for template in templates:
                missing = _fields(template) - set(regex.groupindex)
                if missing:
                    raise ConfigurationError(
                        f"rule {pattern!r}: tag template {template!r} names {sorted(missing)}, "
                        "which the regex has no named group for"
                    )
            compiled.append((regex, templates))
        self._rules: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(compiled)
        # Path -> the marked route routing it and its path parameters, learned from responses.
        self._learned: dict[str, tuple[_RouteSpec, dict[str, Any]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.responses.date:
            send = _Dated(send, self.responses).send
        method = scope["method"]
        if method == "GET" or method == "HEAD":
            target = self._target(scope, scope["path"])
            if target is None:
                if method == "GET" and self.responses._routes and len(self._learned) < _MAX_LEARNED:
                    send = _Learner(self, scope, send).send
                await self.app(scope, receive, send)
            elif method == "HEAD":
                await self._head(scope, receive, send, target)
            else:
                await self._get(scope, receive, send, target)
        elif method in _UNSAFE:
            await self._unsafe(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # ------------------------------------------------------------------ matching

    def _target(self, scope: Scope, path: str) -> _Target | None:
        """The cacheable target ``path`` is (for a GET), or ``None``."""
        templates: list[str] = []
        params: dict[str, Any] = {}
        ttl = None
        ruled = False
        for regex, rule_tags in self._rules:
            match = regex.fullmatch(path)
            if match is not None:
                ruled = True
                groups = {k: v for k, v in match.groupdict().items() if v is not None}
                try:
                    templates.extend(t.format_map(groups) for t in rule_tags)
                except KeyError:  # an optional group that did not take part
                    self.responses._log_once(f"rule {regex.pattern!r} matched without all its groups")
                    return None
                ttl = self._ttl
        found = self._route(scope, path)
        if found is not None:
            spec, params = found
            try:
                templates.extend(t.format_map(params) for t in spec.tags)
            except KeyError as exc:
                raise ConfigurationError(
                    f"a tag template of a cached route names {exc}, which is not a path parameter"
                ) from None
            if spec.ttl is not None:
                ttl = spec.ttl
        elif not ruled:
            return None
        tags = [_url_tag(path)]
        tags.extend(t for t in templates if t not in tags)
        try:
            checked = check_tags(tags)
        except (TagCacheError, TypeError, ValueError) as exc:
            self.responses._log_once(f"a request's tags are not usable, served without the cache: {exc}")
            return None
        url = hashlib.blake2b(digest_size=16)
        host = b", ".join(v for k, v in scope["headers"] if k.lower() == b"host")
        query = bytes(scope.get("query_string", b""))
        url.update(host + b"\x00" + path.encode("utf-8", "surrogatepass") + b"\x00")
        url.update(b"&".join(sorted(query.split(b"&"))) if query else b"")
        return _Target(path, url.digest(), checked, ttl if ttl is not None else self.responses.ttl)

    def _route(self, scope: Scope, path: str) -> tuple[_RouteSpec, dict[str, Any]] | None:
        """The marking and path parameters of the endpoint routing ``path`` for a GET."""
        app = scope.get("app")
        router = getattr(app, "router", None)
        routes = getattr(router, "routes", None)
        if not routes:
            return None
        probe: Scope = {
            "type": "http",
            "method": "GET",
            "path": path,
            "root_path": scope.get("root_path", ""),
            "headers": scope.get("headers", []),
            "query_string": scope.get("query_string", b""),
            "path_params": {},
        }
        return self._walk(routes, probe) or self._learned.get(path)

    def learn(self, path: str, endpoint: object, params: Mapping[str, Any]) -> None:
        """Remember that ``endpoint`` routed ``path`` (with ``params``), if it is marked."""
        spec = self.responses.route_spec(endpoint)
        if spec is not None and len(self._learned) < _MAX_LEARNED:
            self._learned[path] = (spec, dict(params))

    def _walk(self, routes: Iterable[Any], scope: Scope) -> tuple[_RouteSpec, dict[str, Any]] | None:
        for route in routes:
            try:
                match, child = route.matches(scope)
            except Exception:  # a route that cannot judge a probe scope: not ours
                continue
            if match is not Match.FULL:
                continue
            if isinstance(route, Mount | Host):
                inner = getattr(route, "routes", None)
                return self._walk(inner, {**scope, **child}) if inner else None
            spec = self.responses.route_spec(child.get("endpoint"))
            if spec is None:
                return None
            return spec, dict(child.get("path_params", {}))
        return None

    # ------------------------------------------------------------------ policy

    def _shape_of(
        self, target: _Target, headers: list[tuple[bytes, bytes]], directives: dict[str, str | None]
    ) -> _Shape | None:
        """The shape of a response storable as far as its Vary and lifetime go, else ``None``."""
        vary: set[str] = set()
        for value in _header_values(headers, b"vary"):
            for name in value.split(","):
                name = name.strip().lower()
                if name == "*":
                    return None
                if name:
                    vary.add(name)
        ttl = target.ttl
        lifetime: float | None = None
        if "s-maxage" in directives:
            lifetime = _delta(directives["s-maxage"]) or 0
        elif "max-age" in directives:
            lifetime = _delta(directives["max-age"]) or 0
        else:
            expires = _header_values(headers, b"expires")
            if expires:
                lifetime = self._expires_in(expires[0], _header_values(headers, b"date"))
        if lifetime is not None:
            ttl = min(ttl, lifetime)
        if ttl <= 0:
            return None
        rc = self.responses
        no_stale = any(d in directives for d in ("no-cache", "must-revalidate", "proxy-revalidate"))
        defaults = not no_stale and "s-maxage" not in directives
        swr = sie = 0.0
        if not no_stale:
            own = _delta(directives.get("stale-while-revalidate"))
            swr = float(own) if own is not None else (rc.stale_while_revalidate if defaults else 0.0)
            own = _delta(directives.get("stale-if-error"))
            sie = float(own) if own is not None else (rc.stale_if_error if defaults else 0.0)
        return _Shape(tuple(sorted(vary)), float(ttl), swr, sie)

    def _expires_in(self, expires: str, date: list[str]) -> float:
        try:
            at = parsedate_to_datetime(expires).timestamp()
            now = parsedate_to_datetime(date[0]).timestamp() if date else self.responses.clock()
        except (TypeError, ValueError, IndexError, OverflowError):
            return 0.0  # an invalid Expires means already expired
        return max(0.0, at - now)

    def _decide(self, capture: _Capture, start: Message) -> str:
        """At a load's response start: store it, keep it for stale-if-error, or pass it through."""
        x = capture.x
        status = int(start["status"])
        headers = [(bytes(k).lower(), bytes(v)) for k, v in start.get("headers", ())]
        if status >= 500 and x.shape.sie > 0:
            return "error"
        directives = _directives(_header_values(headers, b"cache-control"))
        reason = None
        if status not in self.responses.statuses:
            reason = f"status {status}"
        elif any(d in directives for d in ("no-store", "private", "no-cache")):
            reason = "Cache-Control forbids storing"
        elif any(k == b"set-cookie" for k, _ in headers):
            reason = "the response sets a cookie"
        elif x.authorized and "public" not in directives and "s-maxage" not in directives:
            reason = "the request has Authorization and the response is not public"
        elif start.get("trailers", False):
            reason = "the response has trailers"
        elif any(
            v.split(b";")[0].strip().lower() == b"text/event-stream"
            for k, v in headers
            if k == b"content-type"
        ):
            reason = "an event stream"
        elif self._shape_of(x.target, headers, directives) is None:
            reason = "Vary: * or no lifetime"
        if reason is None:
            return "store"
        capture.reason = reason
        return "pass"

    def _conditional_start(self, x: _Exchange, start: Message) -> Message:
        """A passed-through response start, turned into a 304 when the request's
        (withheld) ``If-None-Match`` matches the response's ETag."""
        status = int(start["status"])
        if not 200 <= status < 300:
            return start
        inm = _header_values(x.headers, b"if-none-match")
        etag = _header_values(start.get("headers", ()), b"etag")
        if not inm or not etag or not etag_matches(", ".join(inm), etag[0]):
            return start
        kept = [(k, v) for k, v in start.get("headers", ()) if bytes(k).lower() in _NOT_MODIFIED_HEADERS]
        return {"type": "http.response.start", "status": 304, "headers": kept}

    # ------------------------------------------------------------------ serving

    async def _serve(
        self,
        record: _Record,
        request_headers: Sequence[tuple[bytes, bytes]],
        send: Send,
        *,
        head: bool,
        age: int | None,
    ) -> None:
        # Age first: a reader that checks Date against the clock as it reads (httplint) knows it then.
        headers = list(record.headers)
        if age is not None:
            headers.insert(0, (b"age", str(age).encode("ascii")))
        if 200 <= record.status < 300 and _not_modified(request_headers, record):
            kept = [(k, v) for k, v in headers if k in _NOT_MODIFIED_HEADERS or k == b"age"]
            await send({"type": "http.response.start", "status": 304, "headers": kept})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if record.status not in (204, 304) and record.status >= 200:
            headers.append((b"content-length", str(len(record.body)).encode("ascii")))
        await send({"type": "http.response.start", "status": record.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else record.body, "more_body": False})

    def _age(self, record: _Record) -> int:
        return max(0, int(self.responses.clock() - record.stored_at))

    # ------------------------------------------------------------------ shapes

    async def _read_shape(self, target: _Target) -> _Shape:
        """The URL's remembered shape, or the default one. Raises BackendError.

        Read from the backend directly, not with ``Cache.get``: this bookkeeping read is
        not a hit or a miss of the cache's own (``stats()`` counts the response's load)."""
        cache = self.responses.cache
        key = target.shape_key()
        payload = await cache.backend.get(cache.namespace, key)
        value = None
        if payload:
            try:
                value = cache.engine.decode(key, payload)
            except SerializationError:
                value = None  # foreign or damaged: the default shape, rewritten on the next store
        shape = _Shape.load(value) if value is not None else None
        return shape if shape is not None else self._default_shape(target)

    def _default_shape(self, target: _Target) -> _Shape:
        rc = self.responses
        return _Shape((), target.ttl, rc.stale_while_revalidate, rc.stale_if_error)

    async def _write_shape(self, target: _Target, shape: _Shape) -> None:
        ttl = max(_META_TTL, 2 * (shape.ttl + max(shape.swr, shape.sie)))
        try:
            await self.responses.cache.set(target.shape_key(), shape.dump(), ttl=ttl)
        except TagCacheError as exc:
            self.responses._log_once(f"could not remember a URL's Vary and cache policy: {exc}")

    # ------------------------------------------------------------------ GET / HEAD

    def _client_no_cache(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        if not self.responses.honor_client_no_cache:
            return False
        directives = _directives(_header_values(headers, b"cache-control"))
        if "no-cache" in directives or _delta(directives.get("max-age", "x")) == 0:
            return True
        return any("no-cache" in v.lower() for v in _header_values(headers, b"pragma"))

    async def _get(self, scope: Scope, receive: Receive, send: Send, target: _Target) -> None:
        rc = self.responses
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        try:
            shape = await self._read_shape(target)
        except BackendError:
            if not rc.fail_open:
                raise
            await self.app(scope, receive, send)
            return
        authorized = any(k.lower() == b"authorization" for k, _ in headers)
        x = _Exchange(scope, receive, send, target, shape, authorized)
        request: LoadRequest[Any] = LoadRequest(
            target.entry_key(shape.vary, headers),
            self._load,
            shape.ttl,
            target.tags,
            rc._policy(shape.swr, shape.sie),
            args=(x,),
            stats=rc.stats,
        )
        engine = rc.cache.engine
        try:
            value: Any = None
            if self._client_no_cache(headers):
                try:
                    fresh = await engine.recompute(request)
                except BackendError:
                    if not rc.fail_open:
                        raise
                    fresh = None if x.sent else (await self._load(x),)
                value = fresh[0] if fresh is not None else await engine.load(request)
            else:
                value = await engine.load(request)
        except _ServerError as err:
            if not x.sent:
                await err.send_to(send)
            return
        finally:
            x.detach()
        if x.error is not None:
            raise x.error
        if x.sent:
            return  # this request's own load answered it
        if isinstance(value, Uncached) and x.ran:
            return  # this request's own load ran the app, which sent nothing
        record = None if isinstance(value, Uncached) else _Record.load(value)
        if record is None or (authorized and not record.shared):
            # A load this request shared ended unstored, or the entry is not for it.
            await self.app(scope, receive, send)
            return
        await self._serve(record, headers, send, head=False, age=self._age(record))

    async def _load(self, x: _Exchange) -> Any:
        """The loader: run the app for ``x`` (answering its client if it is still there)."""
        client = x.take()
        capture = _Capture(self, x, client)
        if client is not None:
            x.ran = True
            scope = x.scope
            original = scope["headers"]
            scope["headers"] = x.app_headers()
            receive = x.receive
        else:
            scope = dict(x.snapshot)
            receive = _IdleReceive(capture.done)
        try:
            await self.app(scope, receive, capture.send)
        except Exception as exc:
            if x.sent:
                # The client has part of a response already (or could not take it):
                # nothing is stored, the request fails with this error, and callers
                # sharing the load run the app themselves.
                x.error = exc
                return Uncached(None, f"{type(exc).__name__} after the response began")
            raise
        finally:
            if client is not None:
                scope["headers"] = original
        return await capture.result()

    async def _head(self, scope: Scope, receive: Receive, send: Send, target: _Target) -> None:
        rc = self.responses
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        record = None
        try:
            shape = await self._read_shape(target)
            if not self._client_no_cache(headers):
                record = _Record.load(await rc.cache.get(target.entry_key(shape.vary, headers)))
        except BackendError:
            if not rc.fail_open:
                raise
        authorized = any(k.lower() == b"authorization" for k, _ in headers)
        if (
            record is None
            or (authorized and not record.shared)
            or rc.clock() - record.stored_at >= record.ttl
        ):
            await self.app(scope, receive, send)
            return
        await self._serve(record, headers, send, head=True, age=self._age(record))

    # ------------------------------------------------------------------ unsafe methods

    async def _unsafe(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0
        location: list[str] = []
        done = False

        async def invalidate() -> None:
            nonlocal done
            if done or not 200 <= status < 400:
                return
            done = True
            await self._invalidate(scope, location)

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_headers = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", ())]
                location.extend(_header_values(response_headers, b"location"))
                location.extend(_header_values(response_headers, b"content-location"))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Before the last part reaches the client: its next read sees the change.
                await invalidate()
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            await invalidate()

    async def _invalidate(self, scope: Scope, locations: list[str]) -> None:
        """Invalidate the entries of the request's URL and of same-host Location and
        Content-Location URLs that this middleware may have stored."""
        host = b", ".join(v for k, v in scope["headers"] if k.lower() == b"host").decode("latin-1")
        paths = {scope["path"]}
        for value in locations:
            value = value.strip()
            for prefix in (f"http://{host}", f"https://{host}"):
                if value.startswith(prefix):
                    value = value[len(prefix) :]
            if value.startswith("/") and not value.startswith("//"):
                paths.add(value.split("?", 1)[0].split("#", 1)[0])
        tags = [_url_tag(path) for path in sorted(paths) if self._target(scope, path) is not None]
        if not tags:
            return
        try:
            await self.responses.cache.invalidate_tags(tags)
        except TagCacheError as exc:
            # The cache re-applies it before it reads again; the response is on its way.
            logger.error("tagcache: response cache: invalidating %s failed: %s", tags, exc)
