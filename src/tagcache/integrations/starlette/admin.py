"""Management endpoints for a :class:`~tagcache.Cache`, as an ASGI app to mount.

::

    from tagcache.integrations.starlette.admin import cache_admin

    async def require_admin(request: Request) -> bool:
        return request.headers.get("x-admin-token") == settings.admin_token

    app.mount("/api/v1/cache", cache_admin(cache, authorize=require_admin))

Works mounted in a Starlette or a FastAPI app (it needs only Starlette, extra
``tagcache[starlette]``). The endpoints, relative to the mount point:

* ``GET /stats`` — the cache's :class:`~tagcache.CacheStats` (``as_dict()``), its namespace,
  and ``functions``: per cached function, its :class:`~tagcache.FunctionStats`.
* ``POST /clear`` — :meth:`~tagcache.Cache.clear`: removes this namespace's entries, nothing else.
* ``POST /clear-tags`` with the JSON body ``{"tags": ["user:1", ...]}`` —
  :meth:`~tagcache.Cache.invalidate_tags`.
* ``GET /keys?pattern=user:*&limit=100`` — :meth:`~tagcache.Cache.keys` (Redis glob syntax).
* ``GET /key/{key}`` — :meth:`~tagcache.Cache.peek`: TTL left, tags, validity and the value,
  redacted unless ``reveal_values=True``. Keys may contain ``/`` and ``:``.

Every request is first passed to ``authorize``; a request it refuses gets 403 (or
the :class:`~starlette.exceptions.HTTPException` it raised, such as a 401 with a
``WWW-Authenticate`` header) before routing and before its body is read. Every
response carries ``Cache-Control: no-store``. POST endpoints require
``Content-Type: application/json``, which a cross-site HTML form cannot send.
Errors are JSON ``{"detail": "..."}``: 422 for bad input, 501 when the backend
cannot list or show keys, 503 when the backend fails.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from starlette.types import Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tagcache.integrations.starlette.admin needs Starlette: pip install 'tagcache[starlette]'"
    ) from exc

from tagcache.cache import Cache
from tagcache.exceptions import (
    BackendError,
    ConfigurationError,
    TagCacheError,
    UnsupportedOperationError,
)
from tagcache.tags import glob_to_regex

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_PATTERN_LENGTH",
    "MAX_PATTERN_STARS",
    "MAX_TAGS_PER_REQUEST",
    "Authorize",
    "DEFAULT_LIMIT",
    "REDACTED",
    "CacheAdmin",
    "cache_admin",
]

logger: Final = logging.getLogger("tagcache")

#: A function deciding whether a request may use the endpoints: sync or async,
#: returning a truthy value to allow it. It may raise
#: :class:`starlette.exceptions.HTTPException` (a 401 with ``WWW-Authenticate``, a 403).
Authorize = Callable[[Request], object]

#: Most tags one ``POST /clear-tags`` may invalidate.
MAX_TAGS_PER_REQUEST: Final = 1000
#: Largest request body read, in bytes (a body of MAX_TAGS_PER_REQUEST long tags fits).
MAX_BODY_BYTES: Final = 2 * 1024 * 1024
#: Longest pattern ``GET /keys`` accepts, in characters.
MAX_PATTERN_LENGTH: Final = 256
#: Most unescaped ``*`` wildcards in one pattern: each multiplies the cost of glob
#: matching on keys that almost match, in Redis and in the regular expressions of
#: the other backends.
MAX_PATTERN_STARS: Final = 4
#: Default ``limit`` of ``GET /keys`` (bounded by ``max_limit``).
DEFAULT_LIMIT: Final = 100

REDACTED: Final = "<redacted>"

_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_LIMIT: Final = re.compile(r"[0-9]{1,9}")
_NO_STORE: Final = (b"cache-control", b"no-store")
_NOSNIFF: Final = (b"x-content-type-options", b"nosniff")


class _Problem(Exception):
    """An error answered with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: Any, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"detail": message}, status_code=status, headers=dict(headers or {}))


def _json_response(content: Any) -> Response:
    """A JSON response; objects JSON cannot represent (from a codec other than JSON) become text."""
    try:
        body = json.dumps(content, ensure_ascii=False, allow_nan=False, default=str, separators=(",", ":"))
    except ValueError:  # NaN or infinity in a revealed value: not valid JSON
        body = json.dumps(content, ensure_ascii=False, default=str, separators=(",", ":"))
        body = json.dumps(json.loads(body, parse_constant=str), ensure_ascii=False, separators=(",", ":"))
    return Response(body, media_type="application/json")


def _count_stars(pattern: str) -> int:
    stars = 0
    escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "*":
            stars += 1
    return stars


def _check_pattern(pattern: str) -> str:
    """Return ``pattern`` if ``GET /keys`` accepts it, else raise (answered with 422)."""
    if not pattern:
        raise _Problem(422, "pattern must not be empty; omit it to list every key ('*')")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _Problem(
            422, f"pattern is {len(pattern)} characters, more than the limit of {MAX_PATTERN_LENGTH}"
        )
    match = _CONTROL.search(pattern)
    if match is not None:
        raise _Problem(
            422, f"pattern contains the control character {match.group()!r} at index {match.start()}"
        )
    if _count_stars(pattern) > MAX_PATTERN_STARS:
        raise _Problem(422, f"pattern has more than {MAX_PATTERN_STARS} '*' wildcards")
    try:
        glob_to_regex(pattern)
    except re.error as exc:
        raise _Problem(422, f"pattern is not a valid glob: {exc}") from None
    return pattern


def _handled(
    endpoint: Callable[[CacheAdmin, Request], Awaitable[Response]],
) -> Callable[[CacheAdmin, Request], Awaitable[Response]]:
    """Answer the :class:`_Problem` an endpoint raises with its status and message."""

    async def run(self: CacheAdmin, request: Request) -> Response:
        try:
            return await endpoint(self, request)
        except _Problem as problem:
            return _error(problem.status, problem.message)

    run.__doc__ = endpoint.__doc__
    return run


class CacheAdmin:
    """The ASGI app :func:`cache_admin` returns; see the module documentation.

    Attributes ``cache``, ``reveal_values`` and ``max_limit`` are what it was built with.
    """

    def __init__(
        self,
        cache: Cache,
        *,
        authorize: Authorize | None = None,
        allow_unauthenticated: bool = False,
        reveal_values: bool = False,
        max_limit: int = 1000,
    ) -> None:
        if not isinstance(cache, Cache):
            raise ConfigurationError(f"cache_admin() needs a tagcache.Cache, got {type(cache).__name__}")
        if authorize is not None and not callable(authorize):
            raise ConfigurationError(
                f"authorize must be a function taking the Request and returning True to allow it, "
                f"got {authorize!r:.80}"
            )
        if authorize is None and allow_unauthenticated is not True:
            raise ConfigurationError(
                "cache_admin() needs authorize=, a function (sync or async) taking the Starlette "
                "Request and returning True when the caller may manage the cache (or raising "
                "HTTPException(401/403)); without it anyone could read cached values and clear the "
                "cache. To expose the endpoints without any check (only on a network you trust), "
                "pass allow_unauthenticated=True explicitly"
            )
        if type(max_limit) is not int or max_limit <= 0:
            raise ConfigurationError(f"max_limit must be a positive int, got {max_limit!r}")
        if not isinstance(reveal_values, bool):
            raise ConfigurationError(f"reveal_values must be True or False, got {reveal_values!r}")
        if authorize is None:
            logger.warning(
                "cache_admin() for the cache of namespace %r is open to every caller "
                "(allow_unauthenticated=True, no authorize=): anyone who can reach it can clear "
                "the cache%s",
                cache.namespace,
                " and read cached values" if reveal_values else " and list its keys",
            )
        self.cache = cache
        self.reveal_values = reveal_values
        self.max_limit = max_limit
        self._authorize = authorize
        self._app = Starlette(
            routes=[
                Route("/stats", self._stats, methods=["GET"]),
                Route("/clear", self._clear, methods=["POST"]),
                Route("/clear-tags", self._clear_tags, methods=["POST"]),
                Route("/keys", self._keys, methods=["GET"]),
                Route("/key/{key:path}", self._key, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authorize the request, then route it; every response gets ``Cache-Control: no-store``."""
        kind = scope["type"]
        if kind == "lifespan":  # served alone (not mounted): nothing to start or stop
            await self._app(scope, receive, send)
            return
        if kind != "http":  # no WebSocket endpoint: refuse before anything else
            await send({"type": "websocket.close", "code": 1008})
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in (b"cache-control", b"x-content-type-options")
                ]
                headers += [_NO_STORE, _NOSNIFF]
                message = {**message, "headers": headers}
            await send(message)

        refusal = await self._check(Request(scope))  # no receive: authorize cannot read the body
        if refusal is not None:
            await refusal(scope, receive, send_no_store)
            return
        await self._app(scope, receive, send_no_store)

    async def _check(self, request: Request) -> Response | None:
        """``None`` if ``authorize`` allows ``request``, else the response refusing it."""
        if self._authorize is None:
            return None
        try:
            allowed = self._authorize(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
        except HTTPException as exc:
            return _error(exc.status_code, exc.detail, exc.headers)
        if not allowed:
            return _error(403, "not allowed to manage this cache")
        return None

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail, exc.headers)

    # ------------------------------------------------------------------ helpers

    async def _run(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run a cache operation, turning its errors into :class:`_Problem`."""
        try:
            return await operation()
        except UnsupportedOperationError as exc:
            raise _Problem(501, str(exc)) from None
        except BackendError as exc:
            raise _Problem(503, f"the cache backend failed: {exc}") from None
        except ConfigurationError as exc:  # the cache has no backend yet
            raise _Problem(503, str(exc)) from None
        except (TagCacheError, ValueError) as exc:  # an invalid key, tag or pattern
            raise _Problem(422, str(exc)) from None

    async def _json_body(self, request: Request) -> Any:
        """The request's JSON body (``None`` if empty), after the content type check."""
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise _Problem(415, "this endpoint needs Content-Type: application/json")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _Problem(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _Problem(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise _Problem(422, f"the request body is not valid JSON: {exc}"[:300]) from None

    # ------------------------------------------------------------------ endpoints

    @_handled
    async def _stats(self, request: Request) -> Response:
        """GET /stats: the cache's counters and backend figures."""
        stats = await self._run(self.cache.stats)
        functions = {name: f.as_dict() for name, f in self.cache.function_stats().items()}
        return _json_response({"namespace": self.cache.namespace, **stats.as_dict(), "functions": functions})

    @_handled
    async def _clear(self, request: Request) -> Response:
        """POST /clear: remove every entry of this cache's namespace."""
        body = await self._json_body(request)
        if body is not None and body != {}:
            raise _Problem(422, "POST /clear takes no parameters: send an empty body or {}")
        removed = await self._run(self.cache.clear)
        return _json_response({"namespace": self.cache.namespace, "cleared": removed})

    @_handled
    async def _clear_tags(self, request: Request) -> Response:
        """POST /clear-tags: invalidate every entry carrying any of the body's ``tags``."""
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise _Problem(422, 'the body must be a JSON object such as {"tags": ["user:1"]}')
        unknown = sorted(set(body) - {"tags"})
        if unknown:
            raise _Problem(422, f"unknown field(s) {unknown}; the body takes only 'tags'")
        if "tags" not in body:
            raise _Problem(422, 'the field "tags" is missing: send {"tags": ["user:1", ...]}')
        tags = body["tags"]
        if not isinstance(tags, list):
            raise _Problem(
                422, f'"tags" must be a list of strings, got {type(tags).__name__}: write ["tag"], not "tag"'
            )
        if not tags:
            raise _Problem(422, '"tags" is empty: give at least one tag')
        if len(tags) > MAX_TAGS_PER_REQUEST:
            raise _Problem(
                422, f'"tags" has {len(tags)} items, more than the limit of {MAX_TAGS_PER_REQUEST}'
            )
        for index, tag in enumerate(tags):
            if not isinstance(tag, str):
                raise _Problem(422, f'"tags"[{index}] must be a string, got {type(tag).__name__}')
        await self._run(lambda: self.cache.invalidate_tags(tags))
        return _json_response({"namespace": self.cache.namespace, "invalidated": sorted(set(tags))})

    @_handled
    async def _keys(self, request: Request) -> Response:
        """GET /keys: up to ``limit`` keys of the namespace matching ``pattern``."""
        params = request.query_params
        pattern = _check_pattern(params.get("pattern", "*"))
        raw_limit = params.get("limit")
        if raw_limit is None:
            limit = min(DEFAULT_LIMIT, self.max_limit)
        else:
            if not _LIMIT.fullmatch(raw_limit) or not 0 < int(raw_limit) <= self.max_limit:
                raise _Problem(
                    422, f"limit must be an integer from 1 to {self.max_limit}, got {raw_limit!r:.40}"
                )
            limit = int(raw_limit)
        keys = await self._run(lambda: self.cache.keys(pattern, limit=limit))
        return _json_response(
            {
                "namespace": self.cache.namespace,
                "pattern": pattern,
                "limit": limit,
                "count": len(keys),
                # The listing stopped at the limit: more keys may match.
                "truncated": len(keys) >= limit,
                "keys": keys,
            }
        )

    @_handled
    async def _key(self, request: Request) -> Response:
        """GET /key/{key}: the entry's TTL left, tags, validity and (redacted) value."""
        key: str = request.path_params["key"]
        view = await self._run(lambda: self.cache.peek(key))
        if view is None:
            raise _Problem(404, f"no entry under this key in namespace {self.cache.namespace!r}")
        value: Any = view.value
        try:
            size: int | None = len(
                json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "replace")
            )
        except (
            ValueError,
            RecursionError,
        ):  # a circular or too deep structure (from a codec other than JSON)
            value, size = repr(value), None
        content: dict[str, Any] = {
            "namespace": self.cache.namespace,
            "key": key,
            "ttl": view.ttl,
            "tags": list(view.tags),
            "valid": view.valid,
            "value_type": type(view.value).__name__,
            # Bytes of the value as JSON: how large it would be if revealed.
            "value_size": size,
            "value": value if self.reveal_values else REDACTED,
        }
        if view.error is not None:
            content["error"] = view.error
        return _json_response(content)


def cache_admin(
    cache: Cache,
    *,
    authorize: Authorize | None = None,
    allow_unauthenticated: bool = False,
    reveal_values: bool = False,
    max_limit: int = 1000,
) -> CacheAdmin:
    """Return an ASGI app serving management endpoints for ``cache``; mount it::

        app.mount("/api/v1/cache", cache_admin(cache, authorize=require_admin))

    Args:
        cache: the cache to manage; every operation stays in its namespace.
        authorize: a function (sync or async) taking the Starlette
            :class:`~starlette.requests.Request` and returning a truthy value when
            the caller may use the endpoints; it may raise
            :class:`~starlette.exceptions.HTTPException` (401 with a
            ``WWW-Authenticate`` header, 403). It runs before routing and before
            the body is read: a refused request touches nothing. Required.
        allow_unauthenticated: ``True`` serves every caller without ``authorize``
            (logged as a WARNING on the ``tagcache`` logger). Without ``authorize``
            and without this, :class:`~tagcache.ConfigurationError` is raised.
        reveal_values: show cached values in ``GET /key/{key}``; by default they are
            replaced by ``"<redacted>"`` (their type and size are shown).
        max_limit: the largest ``limit`` ``GET /keys`` accepts (default 1000).

    See the module documentation for the endpoints and their answers.
    """
    return CacheAdmin(
        cache,
        authorize=authorize,
        allow_unauthenticated=allow_unauthenticated,
        reveal_values=reveal_values,
        max_limit=max_limit,
    )
