"""``Cache-Control`` policies, ETags and conditional ``GET``/``HEAD`` as pure ASGI middleware.

::

    from tagcache.integrations.starlette.cache_control import CacheControlMiddleware

    app.add_middleware(
        CacheControlMiddleware,
        policies={
            r"/static/.*": "public, max-age=31536000, immutable",
            r"/api/v1/users/\\d+": "public, max-age=300, stale-while-revalidate=60",
            r"/api/v1/auth/.*": "no-store",
        },
    )

What it does, per request:

- **Policies.** Each key is a regular expression matched against the whole request path
  (``re.fullmatch`` on ``scope["path"]``); the first listed match wins. A *caching* policy
  (one without ``no-store`` or ``private``) is applied to ``GET``/``HEAD`` responses with a
  status below 400 only; a ``no-store`` or ``private`` policy is applied to every method and
  status. A response that already carries ``Cache-Control`` keeps it unless ``override`` is
  set (globally or in the pattern's :class:`Policy`).
- **ETags.** A ``200`` response to ``GET``/``HEAD`` whose body comes in a single message of at
  most ``max_etag_body`` bytes, and which has no ``ETag`` yet, gets a strong ETag (BLAKE2b of
  the body, see :func:`~tagcache.integrations.starlette.http.make_etag`), or a weak one when
  the response has a ``Content-Encoding``. Streamed (``more_body``) and larger bodies are
  passed through as they come, without an ETag. An ETag the application set is kept.
- **Conditional requests.** For ``GET``/``HEAD`` responses that would be 2xx,
  ``If-None-Match`` (weak comparison, lists, ``*``) and, only when ``If-None-Match`` is
  absent, ``If-Modified-Since`` against ``Last-Modified`` turn the response into a ``304 Not
  Modified`` with an empty body. The 304 keeps the response's header fields except the
  representation metadata RFC 9110 (section 15.4.5) says not to send: ``Content-Type``,
  ``Content-Length``, ``Content-Encoding``, ``Content-Language``, ``Content-Range``,
  ``Content-Disposition``, digests, ``Transfer-Encoding``, ``Trailer``, and
  ``Last-Modified`` when there is an ``ETag``. ``ETag``, ``Cache-Control``, ``Expires``,
  ``Vary``, ``Content-Location`` and ``Date`` are kept, and so are fields that are not about
  the representation (``Set-Cookie``, CORS fields), so a session refresh is not lost.

What it deliberately does not do:

- It never answers ``412 Precondition Failed``: for unsafe methods (``POST``, ``PUT``, ...)
  a precondition must be judged *before* the handler acts, and a middleware only sees the
  response after the action has happened. Evaluate ``If-Match``/``If-Unmodified-Since`` in
  the handler. Unsafe requests only get the ``no-store``/``private`` policies.
- It does not store responses; it only labels them.

Placement: add this middleware *after* ``GZipMiddleware`` (``add_middleware`` calls wrap
outward, so the last one added sees the compressed body), so the ETag is computed over the
bytes actually sent and is weak for a content-coded body. Added before it (inside), the
strong ETag of the identity body would be sent with the gzip body.

The middleware is pure ASGI: non-``http`` scopes are passed through untouched, response
headers stay a list of pairs (duplicate ``Set-Cookie``/``Vary`` survive), the body is never
held beyond the first message, and background tasks run after the response was sent. The
rule matching a path is remembered (up to 4,096 paths of up to 256 characters, then the memo
starts over), so a repeated path costs one dictionary lookup instead of one ``fullmatch`` per
pattern; ``GET``/``HEAD`` add one scan of the request headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tagcache.integrations.starlette.http import etag_matches, make_etag, parse_cache_control, parse_http_date

__all__ = ["DEFAULT_MAX_ETAG_BODY", "CacheControlMiddleware", "Policy", "PolicySpec"]

DEFAULT_MAX_ETAG_BODY: Final = 1024 * 1024
"""Largest single-message body (bytes) the middleware hashes for an ETag by default."""

# Representation metadata a 304 must not repeat (RFC 9110, section 15.4.5). Last-Modified is
# handled separately: it stays when there is no ETag, to help caches update.
_NOT_IN_304: Final = frozenset(
    {
        b"content-type",
        b"content-length",
        b"content-encoding",
        b"content-language",
        b"content-range",
        b"content-disposition",
        b"content-md5",
        b"content-digest",
        b"repr-digest",
        b"digest",
        b"transfer-encoding",
        b"trailer",
    }
)

# Per-responder states.
_BEFORE_START: Final = 0  # nothing sent yet
_HOLDING: Final = 1  # start message held until the first body message
_PASSING: Final = 2  # everything else goes straight through
_DROPPING: Final = 3  # a 304 was sent: the application's body is discarded

# The path -> rule memo: at most this many paths, each at most this long, then it starts over.
_MEMO_SIZE: Final = 4096
_MEMO_PATH_LENGTH: Final = 256


@dataclass(frozen=True)
class Policy:
    """The long form of a policy value, for per-method directives or a per-pattern override.

    ``cache_control`` applies to every method not listed in ``methods`` (``None``: no header).
    ``methods`` maps a method to its own directives, e.g.
    ``{"GET": "public, max-age=60", "POST": "no-store"}``; ``HEAD`` falls back to the ``GET``
    entry, so both get the same ``Cache-Control``. ``override`` replaces a ``Cache-Control``
    set by the application for this pattern (``None``: the middleware's ``override``).

    The usual rules still hold: caching directives are applied to ``GET``/``HEAD`` responses
    with a status below 400 only, ``no-store``/``private`` ones to every method and status.
    A plain mapping with these keys is accepted wherever a :class:`Policy` is.
    """

    cache_control: str | None = None
    methods: Mapping[str, str] = field(default_factory=dict)
    override: bool | None = None


PolicySpec: TypeAlias = str | Policy | Mapping[str, Any]
"""A policy value: a ``Cache-Control`` string, a :class:`Policy`, or a mapping of its fields."""


class _Directive:
    """One compiled ``Cache-Control`` value with what the middleware needs to know about it."""

    __slots__ = ("caching", "no_store", "override", "value")

    def __init__(self, value: str, *, override: bool) -> None:
        text = value.strip()
        if any(c in text for c in "\r\n\0"):
            raise ValueError(f"Cache-Control policy {value!r} contains a control character")
        parsed = parse_cache_control(text)
        if not parsed:
            raise ValueError(f"Cache-Control policy {value!r} has no directive")
        self.value: bytes = text.encode("latin-1")
        self.no_store: bool = "no-store" in parsed
        self.caching: bool = not (self.no_store or "private" in parsed)
        self.override = override


def _compile_rule(pattern: str, spec: PolicySpec, default_override: bool) -> dict[str, _Directive | None]:
    """Compile one policy value into ``{method: directive}``; key ``""`` is the fallback."""
    if isinstance(spec, str):
        return {"": _Directive(spec, override=default_override)}
    if isinstance(spec, Mapping):
        try:
            spec = Policy(**spec)
        except TypeError as exc:
            raise TypeError(f"policy for {pattern!r}: {exc}") from None
    if not isinstance(spec, Policy):
        raise TypeError(f"policy for {pattern!r} must be a str, Policy or mapping, got {type(spec).__name__}")
    override = default_override if spec.override is None else spec.override
    rule: dict[str, _Directive | None] = {
        "": None if spec.cache_control is None else _Directive(spec.cache_control, override=override)
    }
    for method, value in spec.methods.items():
        rule[method.upper()] = _Directive(value, override=override)
    if "GET" in rule and "HEAD" not in rule:
        rule["HEAD"] = rule["GET"]
    return rule


class CacheControlMiddleware:
    """Set ``Cache-Control`` per route pattern, add ETags and answer conditional ``GET``/``HEAD``.

    :param app: the ASGI application to wrap.
    :param policies: ``{path regex: policy}`` (or an iterable of pairs), tried in order with
        ``re.fullmatch`` on the request path; the first match wins. A policy is a
        ``Cache-Control`` string, or a :class:`Policy` (or a mapping of its fields) for
        per-method directives and a per-pattern ``override``.
    :param etag: add an ETag to single-message ``200`` responses to ``GET``/``HEAD`` that have
        none.
    :param max_etag_body: largest body, in bytes, hashed for an ETag.
    :param override: replace a ``Cache-Control`` the application already set (default: keep
        it).

    See the module documentation for the exact rules, and for where to place it relative to
    compression middleware.
    """

    def __init__(
        self,
        app: ASGIApp,
        policies: Mapping[str, PolicySpec] | Iterable[tuple[str, PolicySpec]] | None = None,
        *,
        etag: bool = True,
        max_etag_body: int = DEFAULT_MAX_ETAG_BODY,
        override: bool = False,
    ) -> None:
        if max_etag_body < 0:
            raise ValueError(f"max_etag_body must be >= 0, got {max_etag_body}")
        pairs: Iterable[tuple[str, PolicySpec]]
        if policies is None:
            pairs = ()
        elif isinstance(policies, Mapping):
            pairs = policies.items()
        else:
            pairs = policies
        self.app = app
        self.etag = etag
        self.max_etag_body = max_etag_body
        self.override = override
        self._rules: tuple[tuple[re.Pattern[str], dict[str, _Directive | None]], ...] = tuple(
            (re.compile(pattern), _compile_rule(pattern, spec, override)) for pattern, spec in pairs
        )
        self._memo: dict[str, dict[str, _Directive | None] | None] = {}

    def _rule_for(self, path: str) -> dict[str, _Directive | None] | None:
        """The first rule whose pattern matches the whole ``path``, remembered per path."""
        memo = self._memo
        try:
            return memo[path]
        except KeyError:
            pass
        found: dict[str, _Directive | None] | None = None
        for pattern, rule in self._rules:
            if pattern.fullmatch(path):
                found = rule
                break
        if len(path) <= _MEMO_PATH_LENGTH:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[path] = found
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        method: str = scope["method"]
        rule = self._rule_for(scope["path"]) if self._rules else None
        directive = None if rule is None else rule.get(method, rule[""])

        if method == "GET" or method == "HEAD":
            if_none_match: bytes | None = None
            if_modified_since: bytes | None = None
            for name, value in scope["headers"]:
                if name == b"if-none-match":
                    # A list-valued field may come in several lines; they combine with commas.
                    if_none_match = value if if_none_match is None else if_none_match + b"," + value
                elif name == b"if-modified-since":
                    # Several lines make the field invalid, and an invalid one is ignored.
                    if_modified_since = value if if_modified_since is None else b""
            if directive is None and not self.etag and if_none_match is None and if_modified_since is None:
                await self.app(scope, receive, send)
                return
            responder = _Responder(
                self,
                send,
                directive,
                method == "HEAD",
                None if if_none_match is None else if_none_match.decode("latin-1"),
                None if if_modified_since is None else if_modified_since.decode("latin-1"),
            )
            await self.app(scope, receive, responder.send)
        elif directive is not None and not directive.caching:
            await self.app(scope, receive, _UnsafeResponder(send, directive).send)
        else:
            await self.app(scope, receive, send)


def _with_directive(
    headers: list[tuple[bytes, bytes]], has_cache_control: bool, directive: _Directive
) -> list[tuple[bytes, bytes]]:
    """``headers`` with the policy's ``Cache-Control`` in place of the application's, as a new list."""
    if has_cache_control:
        headers = [pair for pair in headers if pair[0].lower() != b"cache-control"]
    return [*headers, (b"cache-control", directive.value)]


class _UnsafeResponder:
    """Per-request state for other methods: add a ``no-store``/``private`` policy, nothing else."""

    __slots__ = ("directive", "send_next", "started")

    def __init__(self, send: Send, directive: _Directive) -> None:
        self.send_next = send
        self.directive = directive
        self.started = False

    async def send(self, message: Message) -> None:
        if not self.started and message["type"] == "http.response.start":
            self.started = True
            headers = message.get("headers", [])
            has_cache_control = any(name.lower() == b"cache-control" for name, _ in headers)
            if not has_cache_control or self.directive.override:
                headers = _with_directive(list(headers), has_cache_control, self.directive)
                message = {**message, "headers": headers}
        await self.send_next(message)


class _Responder:
    """Per-request state for ``GET``/``HEAD``: wraps ``send`` to rewrite the start message, maybe hold it.

    The whole exchange runs in :meth:`send` and plain (non-``async``) helpers, so a response
    costs the application's own ``send`` calls and no extra coroutine frames.
    """

    __slots__ = (
        "directive",
        "etag",
        "head",
        "headers",
        "if_modified_since",
        "if_none_match",
        "last_modified",
        "owner",
        "send_next",
        "start",
        "state",
        "status",
        "weak",
        "zero_length",
    )

    # Set when the start message arrives (_on_start), read only after it.
    start: Message
    headers: list[tuple[bytes, bytes]]
    status: int
    etag: str | None
    last_modified: str | None
    weak: bool
    zero_length: bool

    def __init__(
        self,
        owner: CacheControlMiddleware,
        send: Send,
        directive: _Directive | None,
        head: bool,
        if_none_match: str | None,
        if_modified_since: str | None,
    ) -> None:
        self.owner = owner
        self.send_next = send
        self.directive = directive
        self.head = head
        self.if_none_match = if_none_match
        self.if_modified_since = if_modified_since
        self.state = _BEFORE_START

    async def send(self, message: Message) -> None:
        state = self.state
        if state == _PASSING:
            await self.send_next(message)
        elif state == _HOLDING:
            # The first message after a held start: hash a complete small body, else pass through.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                body: bytes = message.get("body", b"")
                # A HEAD response with an empty body but a non-zero length (e.g. FileResponse)
                # says nothing about the GET body: hashing it would give HEAD a different ETag.
                if len(body) <= self.owner.max_etag_body and (body or not self.head or self.zero_length):
                    etag = make_etag(body, weak=self.weak)
                    self.etag = etag
                    self.headers = [*self.headers, (b"etag", etag.encode("latin-1"))]
                    if self.head and body:
                        message = {**message, "body": b""}
            await self.send_next(self._final_start())
            await self.send_next(message if self.state == _PASSING else _empty_body())
        elif state == _BEFORE_START:
            if message["type"] == "http.response.start":
                start = self._on_start(message)
                if start is not None:
                    await self.send_next(start)
                    if self.state == _DROPPING:
                        await self.send_next(_empty_body())
            else:  # e.g. http.response.early_hint, or a type this middleware does not know
                await self.send_next(message)
        # _DROPPING: a 304 went out; the application's body (and trailers) are discarded.

    def _on_start(self, message: Message) -> Message | None:
        """Read the start message; return what to send now, or ``None`` to hold it for the ETag."""
        status: int = message["status"]
        headers: list[tuple[bytes, bytes]] = message.get("headers", [])
        if not isinstance(headers, (list, tuple)):  # any iterable is allowed; we read it twice
            headers = list(headers)
        has_cache_control = False
        etag: bytes | None = None
        last_modified: bytes | None = None
        encoded = False
        zero_length = False
        for name, value in headers:
            name = name.lower()
            if name == b"cache-control":
                has_cache_control = True
            elif name == b"etag":
                etag = value
            elif name == b"last-modified":
                last_modified = value
            elif name == b"content-encoding":
                encoded = value.strip().lower() != b"identity"
            elif name == b"content-length":
                zero_length = value.strip() == b"0"

        directive = self.directive
        no_store = False
        if (
            directive is not None
            and (not directive.caching or status < 400)
            and (not has_cache_control or directive.override)
        ):
            headers = _with_directive(headers, has_cache_control, directive)
            no_store = directive.no_store

        self.start = message
        self.headers = headers
        self.status = status
        self.etag = None if etag is None else etag.decode("latin-1")
        self.last_modified = None if last_modified is None else last_modified.decode("latin-1")
        self.weak = encoded
        self.zero_length = zero_length
        if etag is None and status == 200 and not no_store and self.owner.etag:
            self.state = _HOLDING
            return None
        return self._final_start()

    def _final_start(self) -> Message:
        """The start message to send: the response's own (rewritten), or a 304 instead."""
        if self._not_modified():
            self.state = _DROPPING
            drop_last_modified = self.etag is not None
            headers = [
                (name, value)
                for name, value in self.headers
                if (lowered := name.lower()) not in _NOT_IN_304
                and not (drop_last_modified and lowered == b"last-modified")
            ]
            return {"type": "http.response.start", "status": 304, "headers": headers}
        self.state = _PASSING
        return {**self.start, "headers": self.headers}

    def _not_modified(self) -> bool:
        """Evaluate If-None-Match / If-Modified-Since (RFC 9110, section 13.2.2, steps 3-4)."""
        if not 200 <= self.status < 300:
            return False
        if self.if_none_match is not None:
            if self.etag is None:
                return self.if_none_match.strip() == "*"
            return etag_matches(self.if_none_match, self.etag)
        if self.if_modified_since is not None and self.last_modified is not None:
            since = parse_http_date(self.if_modified_since)
            modified = parse_http_date(self.last_modified)
            return since is not None and modified is not None and modified <= since
        return False


def _empty_body() -> Message:
    """The body message of a 304: empty and final."""
    return {"type": "http.response.body", "body": b"", "more_body": False}
