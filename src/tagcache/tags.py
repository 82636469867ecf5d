"""Validation rules and helpers shared by the cache and every backend.

Keys and tags are plain ``str`` data: glob characters (``*?[]``) in them are
stored and matched literally, never treated as patterns. Only
:meth:`tagcache.Cache.keys` takes a pattern, in Redis glob syntax, which
:func:`glob_to_regex` translates for backends that are not Redis.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Iterable
from datetime import timedelta
from typing import Final

from tagcache.exceptions import InvalidKeyError, InvalidTagError, InvalidTTLError

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_TAG_LENGTH",
    "MAX_TAGS",
    "MAX_TTL",
    "check_key",
    "check_tags",
    "glob_escape",
    "glob_to_regex",
    "new_token",
    "ttl_seconds",
]

#: Longest accepted key, in characters. Longer keys are usually a mistake
#: (a serialized object used as a key); hash such data first.
MAX_KEY_LENGTH: Final = 1024
#: Longest accepted tag, in characters.
MAX_TAG_LENGTH: Final = 256
#: Most tags one entry may carry.
MAX_TAGS: Final = 64
#: Longest accepted TTL, in seconds: 10 years (of 365 days). Anything longer
#: is almost always a unit mistake (milliseconds passed as seconds), and far
#: larger values overflow the backends' expiry arithmetic. Pass ``None`` for
#: an entry that does not expire.
MAX_TTL: Final = 10 * 365 * 24 * 60 * 60

# Characters keys and tags must not contain: C0 and C1 control characters and DEL, which break
# log lines and line-based protocols (the Redis scripts also use "\n" as a separator of tags),
# and lone surrogates, which cannot be encoded as UTF-8 and so cannot be sent to Redis.
_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _forbidden_char(text: str, what: str, control_hint: str = "") -> str | None:
    """Describe the first forbidden character in ``text`` (a key or tag), or return None."""
    match = _FORBIDDEN.search(text)
    if match is None:
        return None
    char = match.group()
    if "\ud800" <= char <= "\udfff":
        return (
            f"{what} {text!r:.80} contains the lone surrogate {char!r} at index {match.start()}, "
            "which cannot be encoded as UTF-8; build it from valid Unicode text (text decoded "
            "with errors='surrogateescape' is not: decode strictly, or with errors='replace')"
        )
    return (
        f"{what} {text!r:.80} contains the control character {char!r} at index {match.start()}{control_hint}"
    )


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid cache key, else raise :class:`InvalidKeyError`."""
    if type(key) is not str:
        if isinstance(key, str):  # a str subclass (e.g. an enum member): use its text
            key = str.__str__(key)
        else:
            raise InvalidKeyError(
                f"cache keys must be str, got {type(key).__name__} ({key!r:.80}); "
                "convert the key with str() or build it with an f-string"
            )
    assert isinstance(key, str)
    if not key:
        raise InvalidKeyError("cache key is empty; pass a non-empty string such as 'user:123'")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"cache key is {len(key)} characters, more than the limit of {MAX_KEY_LENGTH} "
            f"(key starts {key[:40]!r}); hash long inputs, e.g. with hashlib.sha256"
        )
    problem = _forbidden_char(key, "cache key", "; keys may contain any printable text")
    if problem is not None:
        raise InvalidKeyError(problem)
    return key


def _check_tag(tag: object) -> str:
    if type(tag) is not str:
        if isinstance(tag, str):
            tag = str.__str__(tag)
        else:
            raise InvalidTagError(
                f"tags must be str, got {type(tag).__name__} ({tag!r:.80}); "
                "build tags with an f-string such as f'user:{user_id}'"
            )
    assert isinstance(tag, str)
    if not tag:
        raise InvalidTagError("a tag is empty; tags must be non-empty strings")
    if len(tag) > MAX_TAG_LENGTH:
        raise InvalidTagError(
            f"tag {tag[:40]!r}... is {len(tag)} characters, more than the limit of {MAX_TAG_LENGTH}"
        )
    problem = _forbidden_char(tag, "tag")
    if problem is not None:
        raise InvalidTagError(problem)
    return tag


def check_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    """Validate ``tags`` and return them sorted and without duplicates.

    A bare ``str`` is rejected: ``tags="users"`` would otherwise become five
    one-letter tags.
    """
    if tags is None:
        return ()
    if isinstance(tags, (str, bytes)):
        raise InvalidTagError(
            f"tags must be a list of strings, got the bare string {tags!r:.80}; write tags=[{tags!r:.80}]"
        )
    if isinstance(tags, tuple) and not tags:
        return ()
    try:
        result = tuple(sorted({_check_tag(tag) for tag in tags}))
    except TypeError as exc:
        raise InvalidTagError(f"tags must be an iterable of strings, got {type(tags).__name__}") from exc
    if len(result) > MAX_TAGS:
        raise InvalidTagError(
            f"{len(result)} tags given, more than the limit of {MAX_TAGS} per entry; "
            "use a coarser tag that covers them"
        )
    return result


def _show_ttl(ttl: object) -> str:
    # repr() of an int of more than 4300 digits raises ValueError, and messages cut values at 80
    # characters anyway: an int too long to show is described by its size instead.
    if isinstance(ttl, int) and ttl.bit_length() > 256:
        return f"an int of {ttl.bit_length()} bits"
    return f"{ttl!r:.80}"


def ttl_seconds(ttl: object, *, what: str = "ttl") -> float | None:
    """Normalise a TTL (seconds as int/float, or ``timedelta``, or ``None``) to seconds.

    ``None`` means no expiry. Zero is accepted and means "already expired":
    such a write stores nothing. ``what`` names the setting in error messages.

    Raises:
        InvalidTTLError: ``ttl`` is of another type, NaN, infinite, negative,
            or longer than :data:`MAX_TTL`.
    """
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, int) and not isinstance(ttl, bool):
        # Clamped first: float() of an int beyond the float range raises OverflowError.
        seconds = float(max(-1, min(ttl, MAX_TTL + 1)))
    elif isinstance(ttl, float):
        seconds = ttl
    else:
        raise InvalidTTLError(
            f"{what} must be seconds (int or float), a datetime.timedelta or None, "
            f"got {type(ttl).__name__} ({_show_ttl(ttl)})"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidTTLError(
            f"{what} must be a finite number of seconds, got {_show_ttl(ttl)}; use None for no expiry"
        )
    if seconds < 0:
        raise InvalidTTLError(f"{what} must not be negative, got {_show_ttl(ttl)}")
    if seconds > MAX_TTL:
        raise InvalidTTLError(
            f"{what} is {_show_ttl(ttl)}, longer than the limit of {MAX_TTL} seconds (10 years); "
            "pass None for no expiry"
        )
    return float(seconds)


def new_token() -> str:
    """Return a fresh random 64-bit tag version token (16 hex digits).

    Tokens are random, never counters: a counter that is evicted restarts at
    a value an old entry may still carry.
    """
    return secrets.token_hex(8)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a Redis glob pattern (``*``, ``?``, ``[abc]``, ``[^a]``, ``[a-z]``,
    ``\\x`` escapes) into a compiled regular expression matching whole strings."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            members: list[str] = []
            prev: str | None = None  # the previous single character, which may start a range
            while j < n and pattern[j] != "]":
                ch = pattern[j]
                if ch == "\\" and j + 1 < n:
                    j += 1
                    ch = pattern[j]
                    members.append(re.escape(ch))
                    prev = ch
                elif ch == "-" and prev is not None and j + 1 < n and pattern[j + 1] != "]":
                    j += 1
                    end = pattern[j]
                    if end == "\\" and j + 1 < n:
                        j += 1
                        end = pattern[j]
                    low, high = sorted((prev, end))  # Redis accepts [z-a] as [a-z]
                    members[-1] = re.escape(low) + "-" + re.escape(high)
                    prev = None
                else:
                    members.append(re.escape(ch))
                    prev = ch
                j += 1
            if j >= n:  # no closing bracket: Redis treats the rest literally
                out.append(re.escape(pattern[i:]))
                break
            if members:
                out.append("[" + ("^" if negate else "") + "".join(members) + "]")
            else:  # "[]" matches nothing, "[^]" any one character, as in Redis
                out.append("." if negate else "(?!)")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("(?s:" + "".join(out) + r")\Z")


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters in ``text`` so it matches only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
