"""Small HTTP helpers shared by the Starlette/ASGI integration (RFC 9110, RFC 9111).

Everything here is pure and framework-free:

- :func:`parse_cache_control` splits a ``Cache-Control`` field value into directives;
- :func:`make_etag` computes a deterministic, quoted entity tag from a body;
- :func:`etag_matches` evaluates an ``If-None-Match`` field value against an entity tag;
- :func:`parse_http_date` reads an HTTP-date (``Last-Modified``, ``If-Modified-Since``).
"""

from __future__ import annotations

import calendar
import hashlib
from datetime import datetime
from email.utils import parsedate_tz

__all__ = ["etag_matches", "make_etag", "parse_cache_control", "parse_http_date"]

_WS = " \t"


def parse_cache_control(value: str) -> dict[str, str | None]:
    """Parse a ``Cache-Control`` field value into ``{directive: argument}``.

    Directive names are lower-cased (they are case-insensitive); a directive without an
    argument maps to ``None``. Arguments may be tokens or quoted strings (``max-age="60"``
    gives ``"60"``; backslash escapes inside quotes are undone); their case is kept, since
    ``private="Set-Cookie"`` names fields. Quoted arguments may contain commas. When a
    directive appears twice the first occurrence wins. Malformed members are skipped rather
    than rejected, so the function never raises on any ``str`` input::

        >>> parse_cache_control('Public, MAX-AGE="60", no-cache="Set-Cookie, X-A"')
        {'public': None, 'max-age': '60', 'no-cache': 'Set-Cookie, X-A'}
    """
    directives: dict[str, str | None] = {}
    pos, end = 0, len(value)
    while pos < end:
        if value[pos] in " \t,":
            pos += 1
            continue
        start = pos
        while pos < end and value[pos] not in "=, \t":
            pos += 1
        name = value[start:pos].lower()
        while pos < end and value[pos] in _WS:
            pos += 1
        argument: str | None = None
        if pos < end and value[pos] == "=":
            pos += 1
            while pos < end and value[pos] in _WS:
                pos += 1
            if pos < end and value[pos] == '"':
                pos += 1
                chars: list[str] = []
                while pos < end and value[pos] != '"':
                    if value[pos] == "\\" and pos + 1 < end:
                        pos += 1
                    chars.append(value[pos])
                    pos += 1
                pos += 1  # the closing quote
                argument = "".join(chars)
            else:
                start = pos
                while pos < end and value[pos] != ",":
                    pos += 1
                argument = value[start:pos].rstrip(_WS)
        # Skip anything left before the next comma (e.g. garbage after a quoted string).
        while pos < end and value[pos] != ",":
            pos += 1
        if name and name not in directives:
            directives[name] = argument
    return directives


def make_etag(body: bytes, *, weak: bool) -> str:
    """Return a quoted entity tag for ``body``: ``"<hex>"``, or ``W/"<hex>"`` when ``weak``.

    The tag is the 128-bit BLAKE2b digest of the bytes, so it is the same in every process
    and across restarts (unlike Python's salted ``hash()``) and changes whenever the body
    does. Use ``weak=True`` when the bytes are a content-coded (e.g. gzip) form of the
    representation, so the tag is never strong-equal to that of the identity body.
    """
    digest = hashlib.blake2b(body, digest_size=16).hexdigest()
    return f'W/"{digest}"' if weak else f'"{digest}"'


def _entity_tags(field_value: str) -> list[str]:
    """Split a list of entity tags (``If-None-Match``/``If-Match``) into its members.

    Commas inside quotes belong to the tag (``etagc`` allows them). Members come back
    stripped, quotes and ``W/`` prefix included.
    """
    members: list[str] = []
    pos, end = 0, len(field_value)
    while pos < end:
        if field_value[pos] in " \t,":
            pos += 1
            continue
        start = pos
        if field_value.startswith("W/", pos):
            pos += 2
        if pos < end and field_value[pos] == '"':
            closing = field_value.find('"', pos + 1)
            pos = end if closing == -1 else closing + 1
        while pos < end and field_value[pos] != ",":
            pos += 1
        members.append(field_value[start:pos].rstrip(_WS))
    return members


def _opaque(tag: str) -> str:
    """The opaque part of an entity tag: the tag without its ``W/`` weakness indicator."""
    return tag[2:] if tag.startswith("W/") else tag


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Say whether an ``If-None-Match`` field value matches the current ``etag``.

    Uses the *weak* comparison RFC 9110 (section 13.1.2) requires for ``If-None-Match``:
    ``W/"x"`` and ``"x"`` match each other. ``if_none_match`` may be a comma-separated list
    (one matching member is enough) or ``*``, which matches any current representation.
    Entity tags are compared with their quotes, so an unquoted (malformed) member never
    matches a quoted tag.
    """
    target = _opaque(etag.strip())
    return any(member == "*" or _opaque(member) == target for member in _entity_tags(if_none_match))


def parse_http_date(value: str) -> int | None:
    """Parse an HTTP-date into POSIX seconds, or return ``None`` when it is not a valid date.

    Accepts the three forms RFC 9110 (section 5.6.7) requires recipients to read:
    IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete RFC 850 form and
    asctime. A date without a zone (asctime) is taken as UTC.
    """
    try:
        parsed = parsedate_tz(value)
        if parsed is None:
            return None
        datetime(*parsed[:6])  # rejects out-of-range fields such as 32 Nov
    except (ValueError, IndexError, TypeError, OverflowError):
        return None
    return calendar.timegm(parsed[:6]) - (parsed[9] or 0)
