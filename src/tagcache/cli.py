"""The ``tagcache`` command line: look at and act on one namespace of a cache.

::

    tagcache --url redis://127.0.0.1:6379/0 --namespace app stats
    tagcache --url redis://127.0.0.1:6379/0 --namespace app invalidate products product:42
    tagcache --url redis://127.0.0.1:6379/0 --namespace app keys 'user:*' --limit 20
    tagcache --url redis://127.0.0.1:6379/0 --namespace app peek user:1
    tagcache --url redis://127.0.0.1:6379/0 --namespace app clear --yes

Also ``python -m tagcache``. ``--url`` and ``--namespace`` default to the
``TAGCACHE_URL`` and ``TAGCACHE_NAMESPACE`` environment variables. Every
command goes through :class:`tagcache.Cache`, whose operations are scoped to
its namespace: nothing outside the namespace is read or changed. See
``docs/cli.md`` for the output, exit codes and safety rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final
from urllib.parse import unquote, urlsplit, urlunsplit

from tagcache.backends.local import LocalCache
from tagcache.cache import Cache, EntryView
from tagcache.exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    InvalidKeyError,
    InvalidTagError,
    TagCacheError,
)
from tagcache.tags import MAX_TAGS, check_key, check_tags

__all__ = ["build_parser", "main"]

#: The command did what was asked.
EXIT_OK: Final = 0
#: The backend failed (unreachable, timed out, an error reply) or the operation is not supported.
EXIT_FAILURE: Final = 1
#: The command line is wrong (unknown option, missing ``--url``, invalid tag, key, pattern or
#: namespace, ``clear`` without ``--yes``); nothing was sent to the backend.
EXIT_USAGE: Final = 2
#: ``peek``: no entry under the key (absent or expired).
EXIT_ABSENT: Final = 3
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED: Final = 130

URL_ENV: Final = "TAGCACHE_URL"
NAMESPACE_ENV: Final = "TAGCACHE_NAMESPACE"
DEFAULT_LIMIT: Final = 100
#: Longest value ``peek`` prints in text mode (``--json`` prints it whole).
TEXT_VALUE_CHARS: Final = 4000

#: URL schemes of shared backends: their changes are published to the applications' L1s.
_SHARED_SCHEMES: Final = frozenset({"redis", "rediss", "unix", "redis+cluster", "rediss+cluster"})
# Cache.keys refuses these in a pattern; checked here so nothing is sent.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_QUERY_SECRET: Final = re.compile(r"(?i)((?:^|&)(?:password|pass|secret|token)=)([^&]*)")


class _Usage(Exception):
    """A command-line mistake found before contacting the backend (exit 2)."""


# ---------------------------------------------------------------------- the parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, accepted before or after the command's name.

    On the subcommands their default is ``SUPPRESS``, so an option given before
    the command is not overwritten by the subcommand's own default.
    """
    unset: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--url",
        default=unset,
        metavar="URL",
        help=f"cache URL, as for Cache.from_url: redis://, rediss://, unix://, redis+cluster://, "
        f"memory:// (default: ${URL_ENV})",
    )
    group.add_argument(
        "--namespace",
        default=unset,
        metavar="NAME",
        help=f"the cache namespace to act on (default: ${NAMESPACE_ENV})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print one JSON document on stdout instead of text",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="also show tagcache's own log messages (breaker, retries) on stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``tagcache`` command line (``python -m tagcache``).

    Global options (``--url``, ``--namespace``, ``--json``, ``--verbose``) are
    accepted before or after the command name. Parsing only reads the command
    line: ``TAGCACHE_URL`` and ``TAGCACHE_NAMESPACE`` are applied by :func:`main`.
    """
    from tagcache import __version__

    parser = argparse.ArgumentParser(
        prog="tagcache",
        description="Inspect and act on one namespace of a tagcache cache (Redis, Redis Cluster "
        "or memory). Every command stays inside the namespace.",
        epilog="Exit codes: 0 ok, 1 backend failure, 2 usage error (nothing sent), "
        "3 peek: no such entry. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"tagcache {__version__}")
    _add_common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    stats = commands.add_parser(
        "stats",
        help="the backend's figures (keys, memory, evictions, server version)",
        description="Show the backend's figures. Hit and miss counters are per process: read "
        "them from the application, not from here.",
    )
    _add_common(stats, top=False)

    invalidate = commands.add_parser(
        "invalidate",
        help="invalidate every entry carrying any of the tags",
        description="Invalidate every entry of the namespace carrying any of TAG (one round trip "
        "per 64 tags). Tags are checked before anything is sent. Put -- before a tag starting "
        "with '-'.",
    )
    invalidate.add_argument("tags", nargs="+", metavar="TAG", help="a tag, e.g. product:42")
    _add_common(invalidate, top=False)

    keys = commands.add_parser(
        "keys",
        help="list keys of the namespace matching a glob pattern",
        description="List up to --limit keys of the namespace matching PATTERN (Redis glob: *, ?, "
        "[abc]; \\* for a literal star), sorted. Walks the namespace with SCAN, never KEYS. Keys of "
        "invalidated but unexpired entries may be listed.",
    )
    keys.add_argument("pattern", nargs="?", default="*", metavar="PATTERN", help="default: *")
    keys.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"list at most N keys (default {DEFAULT_LIMIT}); a note on stderr says when more match",
    )
    _add_common(keys, top=False)

    peek = commands.add_parser(
        "peek",
        help="show one entry: value, TTL left, tags, validity",
        description="Show the entry under KEY without counting a hit or refreshing it. Exit 3 "
        "when there is none.",
    )
    peek.add_argument("key", metavar="KEY")
    _add_common(peek, top=False)

    clear = commands.add_parser(
        "clear",
        help="remove every entry of the namespace (needs --yes)",
        description="Remove every entry of the namespace, and nothing else: other namespaces and "
        "other programs' keys are untouched. Without --yes, says what it would clear and exits 2.",
    )
    clear.add_argument("--yes", action="store_true", help="really clear the namespace")
    _add_common(clear, top=False)
    return parser


# ---------------------------------------------------------------------- secrets


def _mask_url(url: str) -> str:
    """``url`` with its password (and ``password=`` style query values) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = _QUERY_SECRET.sub(r"\1***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to hide (and memory:// stays memory://)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _secrets(url: str) -> list[str]:
    """The secrets in ``url`` (as written and percent-decoded), longest first."""
    found: set[str] = set()
    try:
        userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
        query = urlsplit(url).query
    except ValueError:
        userinfo, at, query = "", "", ""
    if at and ":" in userinfo:
        found.add(userinfo.partition(":")[2])
    for match in _QUERY_SECRET.finditer(query):
        found.add(match.group(2))
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


class _Output:
    """Where the command writes: results on stdout, messages on stderr (secrets scrubbed)."""

    def __init__(self, url: str, as_json: bool) -> None:
        self.url = url
        self.shown_url = _mask_url(url)
        self.as_json = as_json
        self._secrets = _secrets(url)

    def scrub(self, text: str) -> str:
        text = text.replace(self.url, self.shown_url)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def say(self, message: str) -> None:
        """A message (an error, a warning, a note) on stderr."""
        print(f"tagcache: {self.scrub(message)}", file=sys.stderr)

    def text(self, line: str = "") -> None:
        print(line)

    def document(self, doc: dict[str, Any]) -> None:
        print(json.dumps(doc, ensure_ascii=True, allow_nan=False))


# ---------------------------------------------------------------------- values as JSON


def _plain(value: Any) -> Any:
    """``value`` (as decoded by the JSON codec) as plain JSON data, for printing."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else json.dumps(_plain(k))): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)  # pydantic v2
    if callable(dump):
        with contextlib.suppress(Exception):
            return _plain(dump(mode="json"))
    return str(value)


# ---------------------------------------------------------------------- commands


def _reach_problem(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the server could not be reached in time."""
    kinds: tuple[type[BaseException], ...] = (
        BackendUnavailableError,
        OSError,
        TimeoutError,
        asyncio.TimeoutError,
    )
    with contextlib.suppress(ImportError):
        from redis import exceptions as redis_errors

        kinds += (redis_errors.ConnectionError, redis_errors.TimeoutError)
    if "no node answered" in str(exc):  # a Redis Cluster none of whose nodes could be read
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _report(out: _Output, command: str, namespace: str, exc: BackendError) -> None:
    if _reach_problem(exc):
        out.say(f"cannot reach {out.shown_url}: {exc}")
    else:
        out.say(f"{command} failed on {out.shown_url} (namespace {namespace!r}): {exc}")


def _ttl_text(ttl: float | None) -> str:
    if ttl is None:
        return "no expiry"
    return f"{ttl:.1f} s" if ttl < 120 else f"{ttl:.0f} s ({datetime.timedelta(seconds=round(ttl))})"


def _size_text(size: object) -> str:
    if not isinstance(size, int):
        return "unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit} ({size} B)"
        value /= 1024
    return f"{size} B"  # pragma: no cover


async def _stats(cache: Cache, out: _Output, args: argparse.Namespace) -> int:
    stats = await cache.stats()
    error = stats.backend.get("error")
    if error is not None:
        out.say(f"cannot reach {out.shown_url}: {error}")
        return EXIT_FAILURE
    if out.as_json:
        out.document({"namespace": cache.namespace, **stats.as_dict()})
        return EXIT_OK
    rows: list[tuple[str, object]] = [
        ("namespace", cache.namespace),
        ("url", out.shown_url),
        ("backend", type(cache.backend).__name__),
    ]
    if stats.keys is not None:
        rows.append(("entries", f"{stats.keys} (in this namespace)"))
    if stats.server_keys is not None:
        rows.append(("server keys", f"{stats.server_keys} (the whole database, every namespace)"))
    rows.append(("memory", _size_text(stats.memory_bytes)))
    if stats.evictions is not None:
        rows.append(("evictions", stats.evictions))
    rows.extend((name.replace("_", " "), value) for name, value in sorted(stats.backend.items()))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.text(f"{name:<{width}}  {out.scrub(str(value))}")
    return EXIT_OK


async def _invalidate(cache: Cache, out: _Output, args: argparse.Namespace) -> int:
    tags: tuple[str, ...] = args.tags
    done: list[str] = []
    try:
        for start in range(0, len(tags), MAX_TAGS):
            chunk = tags[start : start + MAX_TAGS]
            await cache.invalidate_tags(chunk)
            done.extend(chunk)
    except BackendError as exc:
        _report(out, "invalidate", cache.namespace, exc)
        if done:
            out.say(f"{len(done)} of {len(tags)} tags were invalidated before the failure: {', '.join(done)}")
        out.say(
            f"the invalidation of {', '.join(tags[len(done) :])} may not have been applied; "
            "run the command again"
        )
        return EXIT_FAILURE
    if out.as_json:
        out.document({"namespace": cache.namespace, "invalidated": list(tags)})
    else:
        out.text(
            f"invalidated {len(tags)} tag{'s' if len(tags) != 1 else ''} in namespace "
            f"{cache.namespace!r} on {out.shown_url}: {', '.join(tags)}"
        )
    return EXIT_OK


async def _keys(cache: Cache, out: _Output, args: argparse.Namespace) -> int:
    limit: int = args.limit
    found = await cache.keys(args.pattern, limit=limit + 1)
    truncated = len(found) > limit
    shown = sorted(found[:limit])
    if out.as_json:
        out.document(
            {
                "namespace": cache.namespace,
                "pattern": args.pattern,
                "limit": limit,
                "keys": shown,
                "truncated": truncated,
            }
        )
    else:
        for key in shown:
            out.text(key)
        if truncated:
            out.say(f"listing stopped at --limit {limit}: more keys match {args.pattern!r}")
        elif not shown:
            out.say(f"no key matches {args.pattern!r} in namespace {cache.namespace!r}")
    return EXIT_OK


async def _peek(cache: Cache, out: _Output, args: argparse.Namespace) -> int:
    key: str = args.key
    view: EntryView | None = await cache.peek(key)
    if view is None:
        if out.as_json:
            out.document({"namespace": cache.namespace, "key": key, "found": False})
        else:
            out.say(f"no entry {key!r} in namespace {cache.namespace!r} (absent or expired)")
        return EXIT_ABSENT
    if out.as_json:
        out.document(
            {
                "namespace": cache.namespace,
                "key": key,
                "found": True,
                "valid": view.valid,
                "ttl": view.ttl,
                "tags": list(view.tags),
                "value": _plain(view.value),
                "error": view.error,
            }
        )
        return EXIT_OK
    if view.error is not None:
        value = f"(not decoded with the JSON codec: {view.error})"
    else:
        value = json.dumps(_plain(view.value), ensure_ascii=False, indent=2)
        if len(value) > TEXT_VALUE_CHARS:
            more = len(value) - TEXT_VALUE_CHARS
            value = f"{value[:TEXT_VALUE_CHARS]}\n... ({more} more characters; --json prints it whole)"
    valid = "yes" if view.valid else "no (a tag was invalidated since it was written: reads miss it)"
    out.text(f"key    {key}")
    out.text(f"valid  {valid}")
    out.text(f"ttl    {_ttl_text(view.ttl)}")
    out.text(f"tags   {', '.join(view.tags) if view.tags else '(none)'}")
    out.text(f"value  {value}")
    return EXIT_OK


async def _clear(cache: Cache, out: _Output, args: argparse.Namespace) -> int:
    removed = await cache.clear()
    if out.as_json:
        out.document({"namespace": cache.namespace, "cleared": removed})
    else:
        out.text(
            f"cleared namespace {cache.namespace!r} on {out.shown_url}: "
            f"{removed} entr{'y' if removed == 1 else 'ies'} removed"
        )
    return EXIT_OK


_Command = Callable[[Cache, _Output, argparse.Namespace], Awaitable[int]]
_COMMANDS: Final[dict[str, _Command]] = {
    "stats": _stats,
    "invalidate": _invalidate,
    "keys": _keys,
    "peek": _peek,
    "clear": _clear,
}


# ---------------------------------------------------------------------- running


def _check_arguments(args: argparse.Namespace) -> None:
    """Validate what the command will send, so a mistake costs no round trip (raise _Usage)."""
    if args.command == "invalidate":
        for tag in args.tags:
            try:
                check_tags([tag])
            except InvalidTagError as exc:
                raise _Usage(f"invalid tag {tag!r}: {exc}; nothing was invalidated") from None
        args.tags = tuple(sorted(set(args.tags)))
    elif args.command == "peek":
        try:
            check_key(args.key)
        except InvalidKeyError as exc:
            raise _Usage(f"invalid key {args.key!r}: {exc}") from None
    elif args.command == "keys":
        pattern = args.pattern
        if not pattern or _CONTROL.search(pattern):
            raise _Usage(f"invalid pattern {pattern!r}: it must be non-empty, without control characters")


async def _execute(url: str, namespace: str, args: argparse.Namespace, out: _Output) -> int:
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    options: dict[str, Any] = {"namespace": namespace}
    if args.command in ("invalidate", "clear") and scheme in _SHARED_SCHEMES:
        # Through an L1 layer: the change is also published, so the applications' own
        # L1 copies (LocalCache) drop what it touched at once.
        options["local"] = LocalCache(max_entries=1, max_bytes=None, ttl=1.0)
    try:
        cache = Cache.from_url(url, **options)
    except ConfigurationError as exc:
        out.say(str(exc))
        return EXIT_USAGE
    try:
        return await _COMMANDS[args.command](cache, out, args)
    except BackendError as exc:
        _report(out, args.command, namespace, exc)
        return EXIT_FAILURE
    except (ConfigurationError, ValueError) as exc:  # checked above; a backend's own rule
        out.say(f"{args.command}: {exc}")
        return EXIT_USAGE
    except TagCacheError as exc:  # UnsupportedOperationError, SerializationError...
        out.say(f"{args.command} failed on {out.shown_url} (namespace {namespace!r}): {exc}")
        return EXIT_FAILURE
    finally:
        try:
            await cache.aclose()
        except TagCacheError as exc:  # the command's outcome stands; say what closing met
            out.say(f"while closing: {exc}")


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _quiet_library(verbose: bool) -> Iterator[None]:
    """Hold back the library's log messages (the command reports failures itself)."""
    if verbose:
        yield
        return
    logger = logging.getLogger("tagcache")
    drop = _DropAll()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def main(argv: list[str] | None = None) -> int:
    """Run the ``tagcache`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit code instead of exiting: ``0`` done, ``1`` the backend
    failed, ``2`` usage error (nothing was sent), ``3`` ``peek`` found no entry,
    ``130`` interrupted. Results go to stdout (one JSON document with
    ``--json``), messages to stderr, with any password in the URL masked.
    Runs its own event loop (``asyncio.run``): call it outside a running loop.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    url = args.url or os.environ.get(URL_ENV, "")
    namespace = args.namespace or os.environ.get(NAMESPACE_ENV, "")
    missing = [
        f"{flag} (or set ${env})"
        for flag, env, value in (("--url", URL_ENV, url), ("--namespace", NAMESPACE_ENV, namespace))
        if not value
    ]
    if missing:
        print(f"tagcache: missing {' and '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    out = _Output(url, args.json)
    try:
        _check_arguments(args)
    except _Usage as exc:
        out.say(str(exc))
        return EXIT_USAGE
    if args.command == "clear" and not args.yes:
        out.say(
            f"refusing to clear without --yes: it would remove every entry of namespace "
            f"{namespace!r} on {out.shown_url} (other namespaces untouched); nothing was changed"
        )
        return EXIT_USAGE
    if url.partition("://")[0].lower() == "memory":
        out.say(
            "warning: memory:// is this process's own memory, not the application's: "
            "the command sees an empty cache"
        )
    try:
        with _quiet_library(args.verbose):
            return asyncio.run(_execute(url, namespace, args, out))
    except KeyboardInterrupt:
        print("tagcache: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
