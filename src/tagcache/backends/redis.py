"""The Redis backend: the tag index as Lua scripts over redis-py's asyncio client.

Layout (``b`` is the key's bucket, ``crc32(key) % buckets``)::

    tc:{<ns>:<b>}:e:<key>   entry: a hash with the payload ("p") and its stamp
                            ("t"): the bucket's generation, then the tags, each
                            with the token it had when the value was read
    tc:{<ns>:<b>}:t:<tag>   the tag's current version token in bucket b
    tc:{<ns>:<b>}:t:\\x01gen  the bucket's generation: the token of a reserved tag
                            (no user tag has a control character) every entry
                            carries, "<run_id>:<random>" (see below)
    tc:{<ns>:<b>}:v:        the bucket's invalidation epoch (replaced by every
                            invalidation; fills of tags known from the result
                            check it)
    tc:{<ns>:<b>}:l:<key>   the fill lease on key
    tc:{<ns>:<b>}:w:<key>   the mark "someone waits for key to be filled"

Every key a script touches shares the ``{<ns>:<b>}`` hash tag, so each
script runs in one Redis Cluster slot. The scripts live in ``lua/`` next to
this module; they are loaded once per server with ``SCRIPT LOAD``, called
with ``EVALSHA`` and reloaded transparently after ``NOSCRIPT`` (a
``SCRIPT FLUSH``, a restart or a failover).

Each script's first line is its Redis 7 shebang with its flags: those that
may add data (fetch, lease, set, fill) keep the default, so a server out of
memory under ``noeviction`` refuses them before they write anything
(without the shebang Redis checks memory only until a script's first write,
and these begin with a ``DEL``); read (which deletes stale entries),
release, delete and verify only free memory and are ``allow-oom``; peek is
``no-writes``. A
server that rejects the shebang (fakeredis; Redis before 7) is detected when
the scripts load, and the backend sends the same scripts without it, by
their own SHAs, from then on.

Nothing read from Redis is trusted: an entry of another type, or whose stamp
is not well-formed pairs, reads as foreign data (``get`` returns ``b""``); a
token, generation or epoch of another type or shape is replaced like a
missing one; a lease of another type or shape, or without an expiry (a
tagcache lease always has one), is taken over. A read that finds an entry
stale (a stamped token no longer current) deletes it in the same script.

Restarts and failovers. A server restarted from an RDB or AOF file, or a
replica that took over with a lag, can bring back tag tokens and entries
that an invalidation had already removed. Every entry carries its bucket's
generation, created by the first write as the server's ``run_id`` (its
first 16 hex digits, from ``INFO server``; new with every server process)
and a random part. Before a
backend's first command, after any reconnect or ``NOSCRIPT``, and before the
first command of a namespace it has not used yet, ``verify.lua`` runs for
each bucket the backend knows, in the pipeline that loads the scripts: a
generation this server process did not make is dropped, with the bucket's
invalidation epoch. Every entry written before is then a miss (one cold
cache), and fills that snapshot the old generation store nothing (the
lease returned by a miss carries the generation, ``<lease>/<generation>``).
The script is atomic, so of many processes only the first drops it. Where
``INFO`` is unavailable (an ACL that denies it; fakeredis) nothing is
checked, which is logged once (a warning, unless the server has no ``INFO``
command at all).

Speed comes from two things. Requests are written to connections the
backend holds (taken from the client's pool and kept) and read back with
redis-py's parser directly, skipping the per-command work of
``execute_command``. And reads (``get`` and ``fetch``) travel together: a
read sent while no other read is in flight goes out at once; reads issued
while one is in flight are queued and sent as one pipeline (all ``get``\\ s of
one bucket as a single script call, all ``fetch``\\ es of one bucket as another,
``fetch_many.lua``, whose hits cost about what gets cost) one loop tick after
the in-flight one completes, so callers woken by that reply can join.

Event loops: everything bound to an event loop (connections, queued reads,
the pub/sub link, background tasks) lives in a per-loop state; a backend
used under a new loop starts a fresh one (see :class:`RedisBackend`).

Waiting for another caller's fill sends nothing to Redis. A ``fetch`` that
finds the lease held marks the key as waited for (the ``w:`` key, living as
long as the lease); a ``fill``, ``release``, ``set`` or ``delete`` of a marked
key drops the mark and publishes the mark key's name on the namespace's
channel ``tc:{<ns>}:fills`` in the same script, so keys nobody waits for never
publish. Each backend holds one pub/sub connection (opened by the first
:meth:`RedisBackend.watch`, outside the client's pool) subscribed to the
channels of the namespaces watched, and a task that reads it and wakes the
local watchers of the key named. ``PUBLISH`` reaches every node of a Redis
Cluster, so the channels need no hash slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import re
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from hashlib import sha1
from importlib import resources
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_exceptions
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tagcache.backends._signals import KeySignal, SignalWatch
from tagcache.backends.base import BackendInfo, EntryInfo, FillWatch, Lookup
from tagcache.backends.breaker import CircuitBreaker
from tagcache.backends.feed import RedisFeed
from tagcache.exceptions import BackendError, BackendUnavailableError, ConfigurationError
from tagcache.tags import glob_escape, glob_to_regex

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_SOCKET_TIMEOUT",
    "RedisBackend",
    "bucket_hash_tag",
    "bucket_index",
    "check_connection_options",
    "is_cluster_reply",
]

logger: Final = logging.getLogger("tagcache")

# Errors of the client and the transport that become BackendError (by _translate, at
# the boundary of each public method; an error reply is raised there to be translated).
_ERRORS: Final = (RedisError, OSError, asyncio.TimeoutError)
# Of those, the ones that say the server is unreachable or not answering: they
# count towards opening the circuit breaker (an error reply does not).
_TRANSPORT: Final = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
#: Seconds a reply may take before the call fails (and counts towards the breaker).
DEFAULT_SOCKET_TIMEOUT: Final = 0.5
#: Seconds opening a connection (including its handshake) may take.
DEFAULT_CONNECT_TIMEOUT: Final = 0.5
# Lease releases that did not get through are retried after this many seconds
# (doubling up to the breaker's cool-down), for at most _RETRY_FOR seconds.
_RETRY_FIRST: Final = 0.05
_RETRY_FOR: Final = 60.0
# Options of RedisBackend.from_url read from the URL's query (not redis-py's).
_URL_OPTIONS: Final = ("breaker_failures", "breaker_cooldown")
# Redis Cluster replies saying a command ran nowhere (MovedError is an AskError); older
# redis-py parses them as plain ResponseErrors outside its cluster client: their prefixes.
_CLUSTER_REPLIES: Final = (AskError, ClusterCrossSlotError, ClusterDownError, TryAgainError)
_CLUSTER_PREFIXES: Final = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN", "CROSSSLOT")
# SCAN batch size and the most keys one UNLINK removes.
_SCAN_COUNT: Final = 500
# A token a fetch creates lives this much longer than the lease.
_TOKEN_MARGIN_MS: Final = 5000
# Commands shorter than this are written without waiting for the stream to drain.
_FAST_WRITE_MAX: Final = 16384
# Idle connections kept beyond this are handed back to the client's pool.
_KEEP_IDLE: Final = 8
# Per bucket, the packed token keys of this many tag tuples are kept (see _Bucket.fetch_keys).
_TAG_KEYS_KEPT: Final = 4096
# Small numbers packed as arguments (see _count).
_COUNTS: Final = [b"$%d\r\n%d\r\n" % (len(b"%d" % n), n) for n in range(64)]


def _count(n: int) -> bytes:
    """``n`` packed as a command argument."""
    return _COUNTS[n] if n < 64 else _bulk(b"%d" % n)


def _load_script(name: str, flagged: bool) -> bytes:
    """The source of script ``name``: its shebang line (the Redis 7 flags) when
    ``flagged``, then the shared helpers of ``common.lua``, then its body."""
    base = resources.files("tagcache.backends") / "lua"
    common = (base / "common.lua").read_text(encoding="utf-8")
    shebang, _, body = (base / f"{name}.lua").read_text(encoding="utf-8").partition("\n")
    if not shebang.startswith("#!lua"):
        raise RuntimeError(f"{name}.lua must start with its '#!lua' line")
    return ((shebang + "\n" if flagged else "") + common + "\n" + body).encode()


# verify first: _load_scripts loads and runs it before the others.
_SCRIPT_NAMES: Final = (
    "verify",
    "read",
    "fetch",
    "fetch_many",
    "lease",
    "set",
    "fill",
    "release",
    "delete",
    "peek",
)

# Lease tokens: 16 random hex digits of this process (drawn again in a forked
# child, so two processes never share them) and 16 of a counter. A token is
# also the fresh value of the tag tokens its request creates.
_lease_prefix = os.urandom(8).hex().encode()
_lease_count = itertools.count(1)


def _new_lease() -> bytes:
    """A lease token (32 hex digits) no other request of any process gets."""
    return b"%b%016x" % (_lease_prefix, next(_lease_count))


def _reseed_leases() -> None:
    global _lease_prefix, _lease_count
    _lease_prefix = os.urandom(8).hex().encode()
    _lease_count = itertools.count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_leases)


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def _pack(*args: bytes) -> bytes:
    """Encode one command in the Redis protocol."""
    return b"*%d\r\n%b" % (len(args), b"".join([b"$%d\r\n%b\r\n" % (len(a), a) for a in args]))


def _evalsha_head(sha: bytes, nargs: int, nkeys: int) -> bytes:
    """The packed start of ``EVALSHA <sha> <nkeys>`` for a command of ``nargs`` arguments in all."""
    return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (nargs, sha, _bulk(b"%d" % nkeys))


class _Scripts:
    """One variant of the scripts, with their SHAs and the packed heads of frequent calls.

    :data:`_FLAGGED` starts each script with its ``#!lua flags=...`` line, so Redis 7
    checks memory before running a script that may add data (``deny-oom``);
    :data:`_PLAIN` leaves that line out, for servers that reject it (fakeredis).
    """

    __slots__ = ("fetch_heads", "lease_heads", "read_heads", "read_one", "shas", "sources", "verify_head")

    def __init__(self, flagged: bool) -> None:
        self.sources = {name: _load_script(name, flagged) for name in _SCRIPT_NAMES}
        self.shas = {name: sha1(src).hexdigest().encode() for name, src in self.sources.items()}
        read = self.shas["read"]
        # EVALSHA read 1 <entry key> <token prefix> 1, less the key and what follows.
        self.read_one = _evalsha_head(read, 6, 1)
        # EVALSHA read <n> <n entry keys> <token prefix>, by n (batched reads), less the keys.
        self.read_heads = [_evalsha_head(read, n + 4, n) for n in range(128)]
        # fetch and lease by number of tags: entry, lease, mark and generation keys, the
        # tags' token keys and the invalidation epoch; five arguments.
        self.fetch_heads = [_evalsha_head(self.shas["fetch"], n + 13, n + 5) for n in range(16)]
        self.lease_heads = [_evalsha_head(self.shas["lease"], n + 13, n + 5) for n in range(16)]
        # EVALSHA verify 2 <generation key> <epoch key>, less the keys.
        self.verify_head = _evalsha_head(self.shas["verify"], 5, 2)


_FLAGGED: Final = _Scripts(flagged=True)
_PLAIN: Final = _Scripts(flagged=False)
# Script name by SHA, of both variants (to rewrite a command built before a switch).
_SCRIPT_OF: Final = {sha: name for scripts in (_FLAGGED, _PLAIN) for name, sha in scripts.shas.items()}
# Where the SHA of an EVALSHA starts, after "*<n>\r\n".
_SHA_MARK: Final = b"$7\r\nEVALSHA\r\n$40\r\n"
# The reserved tag of a bucket's generation token (see common.lua): tags never
# contain control characters.
_GENERATION: Final = b"\x01gen"


def _miss_lookup(reply: list[Any], lease: bytes) -> Lookup:
    """The Lookup of a fetch or lease reply ``[granted, token1, ..., epoch, generation]``.

    A granted lease is returned as ``<lease>/<generation>``: the generation at
    miss time travels with it to :meth:`RedisBackend.fill`, which stores only
    under the same generation.
    """
    return Lookup(
        None,
        tuple(t.decode() for t in reply[1:-2]),
        (lease + b"/" + reply[-1]).decode() if reply[0] == 1 else None,
        reply[-2].decode(),
    )


def _load_failures(loaded: list[Any], verified: list[Any]) -> list[ResponseError]:
    """The error replies among script loads and ``verify`` calls."""
    return [reply for reply in (*loaded, *verified) if isinstance(reply, ResponseError)]


def _ttl_ms(ttl: float | None) -> bytes:
    """A TTL argument for the scripts: ``-1`` for none, ``0`` for already expired, else ms (>= 1)."""
    if ttl is None:
        return b"-1"
    if ttl <= 0:
        return b"0"
    return b"%d" % max(1, round(ttl * 1000))


def _too_many_connections(exc: BaseException) -> bool:
    # redis-py >= 5.3 raises MaxConnectionsError; older versions a ConnectionError.
    max_error = getattr(redis_exceptions, "MaxConnectionsError", None)
    if max_error is not None and isinstance(exc, max_error):
        return True
    return isinstance(exc, RedisConnectionError) and "Too many connections" in str(exc)


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (as raised by a call) says the server was not reached or did not
    answer — the request may or may not have been executed — rather than answering."""
    if isinstance(exc, BackendUnavailableError):
        return True
    cause = exc.__cause__ if isinstance(exc, BackendError) else exc
    return isinstance(cause, _TRANSPORT) or isinstance(exc, asyncio.TimeoutError)


def _describe(pool: Any) -> str:
    """``Redis at host:port`` (or the socket path) of a connection pool, for messages."""
    options = getattr(pool, "connection_kwargs", {})
    if "path" in options:
        return f"Redis at {options['path']}"
    return f"Redis at {options.get('host', 'localhost')}:{options.get('port', 6379)}"


def _translate(op: str, key: str | None, exc: BaseException) -> BackendError:
    """The one translation of a client or transport error (raised, or an error reply
    read back) into :class:`tagcache.BackendError`: ``Redis <op> of key '<key>' failed:
    <Type>: <message>``, with ``exc`` as ``__cause__``. A :class:`~tagcache.BackendError`
    (such as :class:`~tagcache.BackendUnavailableError` while the breaker is open) is
    returned as it is.

    Used at the boundary of every public method, as ``except _ERRORS as exc: raise
    _translate(op, key, exc) from exc`` around its work (free in CPython when nothing
    is raised, so the hot paths pay nothing), and for the futures of batched reads,
    which carry the error object.
    """
    if isinstance(exc, BackendError):
        return exc
    where = f" of key {key!r}" if key is not None else ""
    err = BackendError(f"Redis {op}{where} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _write_small(conn: AbstractConnection, cmd: bytes) -> bool:
    """Write the small command ``cmd`` straight to ``conn``'s stream; return ``False``,
    having written nothing, when the caller must send it with ``send_packed_command``.

    The only use of a redis-py internal, the connection's ``_writer`` stream (absent,
    or ``None`` while disconnected: then the fallback reconnects).
    ``send_packed_command`` wraps its write in ``asyncio.wait_for`` (a task per call)
    whenever ``socket_timeout`` is set, only to guard a drain that a write this small
    does not need; the read that follows still honours ``socket_timeout``. A
    connection due a health check takes the fallback too, which runs it.
    """
    if conn.health_check_interval or len(cmd) >= _FAST_WRITE_MAX:
        return False
    writer = getattr(conn, "_writer", None)
    if writer is None:
        return False
    writer.writelines((cmd,))
    return True


def _set_timeouts(conn: AbstractConnection, socket: float | None, connect: float | None) -> None:
    """Set the timeouts ``conn`` applies to each later read and reconnect (attributes
    every redis-py connection has and reads at each use)."""
    conn.socket_timeout = socket
    conn.socket_connect_timeout = connect


class _Bucket:
    """Pre-encoded prefixes of one bucket of one namespace."""

    __slots__ = (
        "channel",
        "entry",
        "epoch",
        "epoch_arg",
        "generation_arg",
        "lease",
        "mark",
        "read_one",
        "read_one_args",
        "tag_keys",
        "token",
        "token_arg",
    )

    def __init__(self, ns: bytes, b: int, scripts: _Scripts) -> None:
        base = b"tc:{%b:%d}:" % (ns, b)
        self.entry = base + b"e:"
        self.token = base + b"t:"
        self.lease = base + b"l:"
        self.mark = base + b"w:"
        # The invalidation epoch: a random value every invalidate replaces.
        self.epoch = base + b"v:"
        self.epoch_arg = _bulk(self.epoch)
        # The generation: the token of a reserved tag every entry carries (see verify.lua).
        self.generation_arg = _bulk(self.token + _GENERATION)
        self.channel = _channel(ns)
        self.token_arg = _bulk(self.token)
        # The start of a single get (see _Scripts.read_one), of the backend's script variant.
        self.read_one = scripts.read_one
        self.read_one_args = self.token_arg + _bulk(b"1")
        # Tags (a tuple) -> the packed token keys of a fetch, then the epoch key.
        self.tag_keys: dict[tuple[str, ...], bytes] = {}

    def fetch_keys(self, tags: Sequence[str]) -> bytes:
        """The packed token keys of ``tags``, then the epoch key (the end of a fetch's keys)."""
        if type(tags) is tuple:
            packed = self.tag_keys.get(tags)
            if packed is not None:
                return packed
        packed = b"".join([_bulk(self.token + t.encode()) for t in tags]) + self.epoch_arg
        if type(tags) is tuple:
            if len(self.tag_keys) >= _TAG_KEYS_KEPT:
                self.tag_keys.clear()
            self.tag_keys[tags] = packed
        return packed


def check_connection_options(
    max_connections: object, socket_timeout: object, connect_timeout: object
) -> None:
    """Raise :class:`~tagcache.ConfigurationError` for a pool size or timeout tagcache cannot use."""
    if type(max_connections) is not int or max_connections < 1:
        raise ConfigurationError(f"max_connections must be a positive int, got {max_connections!r}")
    for what, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
            raise ConfigurationError(
                f"{what} must be a positive number of seconds (at most 3600), got {value!r}: "
                "tagcache always bounds how long a call may wait for Redis"
            )


def is_cluster_reply(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a Redis Cluster redirection or refusal (``MOVED``, ``ASK``,
    ``TRYAGAIN``, ``CLUSTERDOWN``, ``CROSSSLOT``): the command ran nowhere."""
    if isinstance(exc, _CLUSTER_REPLIES):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_CLUSTER_PREFIXES)


def bucket_index(key: bytes, buckets: int) -> int:
    """The bucket of a namespace that ``key`` (encoded) belongs to, out of ``buckets``."""
    return 0 if buckets == 1 else zlib.crc32(key) % buckets


def bucket_hash_tag(ns: str, b: int) -> bytes:
    """The hash tag of bucket ``b`` of namespace ``ns``: every key of the bucket has it,
    so the bucket lives in one Redis Cluster slot (``redis.crc.key_slot`` of it)."""
    return b"{%b:%d}" % (ns.encode(), b)


def _channel(ns: bytes) -> bytes:
    """The channel on which fills of waited-for keys of namespace ``ns`` are signalled."""
    return b"tc:{%b}:fills" % ns


class _Space:
    """Per namespace: its buckets and how to recognise its keys in a SCAN."""

    __slots__ = ("buckets", "key_re", "scan_prefix")

    def __init__(self, ns: str, buckets: int, scripts: _Scripts) -> None:
        raw = ns.encode()
        self.buckets = [_Bucket(raw, b, scripts) for b in range(buckets)]
        escaped = glob_escape(ns).encode()
        self.scan_prefix = b"tc:{%b:%b}:" % (escaped, b"0" if buckets == 1 else b"*")
        # Groups: the kind of key, the rest (the cache key, tag, ...), the bucket.
        self.key_re = re.compile(re.escape(b"tc:{" + raw + b":") + rb"([0-9]+)\}:([etlwv]):(.*)\Z", re.S)


class _Link:
    """The backend's pub/sub connection, its reader task and its channels
    (channel -> future done when the subscription is confirmed), in the
    :class:`_LoopState` it belongs to."""

    __slots__ = ("channels", "conn", "reader", "state")

    def __init__(self, conn: AbstractConnection, state: _LoopState) -> None:
        self.conn = conn
        self.state = state
        self.reader: asyncio.Task[None] | None = None
        self.channels: dict[bytes, asyncio.Future[None]] = {}


class _FetchGroup:
    """The fetches of one key with the same tags queued for the next batch: one group
    of a fetch_many.lua call (its hit is read and returned once for them all)."""

    __slots__ = ("args", "futs", "kb", "keys", "nkeys", "tags")

    def __init__(self, keys: bytes, nkeys: int, tags: Sequence[str], kb: bytes) -> None:
        # The packed keys (entry, lease, mark, tag tokens, epoch) and how many.
        self.keys = keys
        self.nkeys = nkeys
        self.tags = tags
        self.kb = kb
        # Per caller: its future and its packed arguments (lease, lease ms, token ms).
        self.futs: list[asyncio.Future[Any]] = []
        self.args: list[bytes] = []


def _needs_name(pool: Any) -> bool:
    """Whether ``pool.get_connection`` requires a command name (older redis-py)."""
    name = inspect.signature(pool.get_connection).parameters.get("command_name")
    return name is not None and name.default is inspect.Parameter.empty


class _LoopState:
    """Everything a :class:`RedisBackend` holds that belongs to one event loop:
    the connections (from ``pool``) and the callers waiting for one, the read
    batching, the pub/sub link and the fill signals, the background tasks.

    A backend keeps one; when it is called under another loop it starts a new
    one and forgets the old (see :meth:`RedisBackend._move_to`). Code running
    under a loop keeps using the state it started with, so work of an old
    loop never touches the new loop's connections.
    """

    __slots__ = (
        "busy",
        "held",
        "idle",
        "link",
        "link_lock",
        "loop",
        "needs_name",
        "pool",
        "queued_cmds",
        "queued_fetches",
        "queued_gets",
        "retries",
        "signals",
        "tasks",
        "waiters",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop | None, pool: Any) -> None:
        # None until the backend's first call (then the loop of that call).
        self.loop = loop
        self.pool = pool
        self.needs_name = _needs_name(pool)
        # Connections held: idle ones, how many in all, callers waiting for one.
        self.idle: list[AbstractConnection] = []
        self.held = 0
        self.waiters: deque[asyncio.Future[AbstractConnection]] = deque()
        # Read batching: whether a read is in flight (or a batch is scheduled),
        # and the reads queued meanwhile: gets per bucket (key -> futures),
        # fetches per bucket (by key, or key and tags when a key is fetched
        # with other tags too) and other read commands with their futures.
        self.busy = False
        self.queued_gets: dict[_Bucket, dict[bytes, list[asyncio.Future[Any]]]] = {}
        self.queued_fetches: dict[_Bucket, dict[object, _FetchGroup]] = {}
        self.queued_cmds: list[tuple[bytes, asyncio.Future[Any]]] = []
        # Background tasks, and retries of lease releases that did not get through.
        self.tasks: set[asyncio.Task[Any]] = set()
        self.retries: set[asyncio.Task[None]] = set()
        # Waiting for fills: the signals of watched keys (by mark key), the
        # pub/sub connection (None until the first watch, or after it broke)
        # and a lock so one watch at a time opens it or subscribes.
        self.signals: dict[bytes, KeySignal] = {}
        self.link: _Link | None = None
        self.link_lock = asyncio.Lock()


def _abort(conn: Any) -> None:
    """Close ``conn``'s socket without awaiting anything: its event loop may be closed
    (the socket is then closed when the transport is collected)."""
    writer = getattr(conn, "_writer", None)
    if writer is not None:
        with contextlib.suppress(Exception):  # a closed loop refuses the callback; nothing to do
            writer.transport.abort()


def _abort_pool(pool: Any) -> None:
    """:func:`_abort` every connection of ``pool`` (a pool of a loop no longer in use)."""
    for name in ("_available_connections", "_in_use_connections"):
        for conn in list(getattr(pool, name, ())):
            _abort(conn)


class _RedisFillWatch(SignalWatch[bytes]):
    """A :class:`~tagcache.backends.base.FillWatch` on one key of a :class:`RedisBackend`."""

    __slots__ = ("_backend", "_channel", "_key", "_state")

    def __init__(
        self, backend: RedisBackend, state: _LoopState, key: str, mark: bytes, channel: bytes
    ) -> None:
        super().__init__(state.signals, mark)
        self._backend = backend
        self._state = state
        self._key = key
        self._channel = channel

    async def __aenter__(self) -> _RedisFillWatch:
        """Register interest in the key, then make sure the namespace's channel is subscribed.

        Only the first watch of a namespace (or the first after the pub/sub
        connection was lost) waits for a ``SUBSCRIBE`` confirmation.

        :raises BackendError: when the subscription cannot be made.
        """
        self._join()
        try:
            await self._backend._subscribe(self._state, self._channel, self._key)
        except BaseException:
            self._leave()
            raise
        return self


class RedisBackend:
    """The Redis implementation of :class:`tagcache.backends.Backend`.

    :param client: a ``redis.asyncio.Redis`` client; it may use
        ``decode_responses=True`` (the backend reads raw bytes itself) and
        any connection pool.
    :param buckets: how many buckets a namespace is split into (``1`` on a
        single Redis; more spreads a namespace over Redis Cluster slots).
        Must stay fixed for a namespace's data.
    :param max_connections: most connections of the client's pool this
        backend uses at once; further callers queue, none get an error.
        Up to a few idle ones are kept by the backend between calls.
    :param owns_client: close ``client`` (and its pool) in :meth:`aclose`.
    :param socket_timeout: seconds a reply may take (default 0.5). The
        backend sets it on every connection it uses, whatever the client's
        own setting or the redis-py version, so a server that hangs costs a
        bounded wait.
    :param connect_timeout: seconds opening a connection, handshake
        included, may take (default 0.5).
    :param breaker: the :class:`~tagcache.backends.breaker.CircuitBreaker`
        guarding the server; by default one that opens after 3 consecutive
        failed calls and probes again after 1 s. While it is open every
        call raises :class:`tagcache.BackendUnavailableError` at once.
    :param bucket_filter: ``(namespace, bucket) -> bool``, whether this server
        holds that bucket (``None``: all of them). Set by
        :class:`~tagcache.backends.cluster.RedisClusterBackend` for the backend
        of each primary of a Redis Cluster, so :meth:`invalidate` and the
        server checks touch only the buckets of the server's own slots.

    Reads: an entry key holding foreign data (a type other than a hash)
    makes :meth:`get` return ``b""``, which the cache counts as an error
    and a miss; :meth:`fetch` treats it as a miss (so the loaded value
    replaces it) and :meth:`peek` as absent.

    Every failure of the client or the connection is raised as
    :class:`tagcache.BackendError` naming the operation and key, with the
    original exception as ``__cause__``. The backend is an async context
    manager that calls :meth:`aclose` on exit.

    A lease granted to a :meth:`fetch` or :meth:`lease` whose caller was
    cancelled, or failed, before it read the reply is released by the backend
    in the background (after the request, on the same queue of reads), so a
    cancelled request never leaves a key locked until its lease expires.

    Event loops: a backend may be used by one event loop at a time, and by
    several one after the other (successive ``asyncio.run`` calls, a test
    runner's loop per test), so it can be created once, at module level. A
    new loop gets new connections: the first call under it (one identity
    check per call) drops what belonged to the previous loop — its
    connections are aborted without awaiting that loop, which may be closed;
    its background tasks (lease releases still retrying among them) are
    cancelled — and takes connections from a fresh pool of the client's pool
    class and options (the client's own pool serves the first loop only).
    Using one backend from two loops running at the same time, in two
    threads, is not supported.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        buckets: int = 1,
        max_connections: int = 50,
        owns_client: bool = False,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        breaker: CircuitBreaker | None = None,
        bucket_filter: Callable[[str, int], bool] | None = None,
    ) -> None:
        if type(buckets) is not int or buckets < 1:
            raise ConfigurationError(f"buckets must be a positive int, got {buckets!r}")
        check_connection_options(max_connections, socket_timeout, connect_timeout)
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise ConfigurationError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        pool = getattr(client, "connection_pool", None)
        if pool is None:
            raise ConfigurationError(
                f"RedisBackend needs a redis.asyncio.Redis client with a connection pool, "
                f"got {type(client).__name__}"
                + (
                    "; for a Redis Cluster use tagcache.backends.RedisClusterBackend(client) "
                    "or a redis+cluster:// URL"
                    if isinstance(client, aioredis.RedisCluster)
                    else ""
                )
            )
        self._client = client
        # The client's pool, used under the backend's first event loop.
        self._home_pool: Any = pool
        self._socket_timeout = float(socket_timeout)
        self._connect_timeout = float(connect_timeout)
        self._breaker = breaker if breaker is not None else CircuitBreaker(name=_describe(pool))
        self._buckets = buckets
        self._bucket_filter = bucket_filter
        self._owns = owns_client
        self._spaces: dict[str, _Space] = {}
        # Most connections held at once (per event loop).
        self._max = max_connections
        self._scripts_loaded = False
        # What belongs to the event loop in use (see _state): connections, read
        # batching, pub/sub, background tasks.
        self._st = _LoopState(None, pool)
        # Whether the client's pool was left behind with an event loop no longer used.
        self._home_left = False
        # Times a connection failed (each may hide a restart; see _recheck).
        self._rechecks = 0
        self._closed = False
        # lease_ttl -> the packed lease and token lifetimes of fetch calls.
        self._fetch_tails: dict[float, bytes] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        buckets: int = 1,
        max_connections: int = 50,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        breaker: CircuitBreaker | None = None,
        **kwargs: Any,
    ) -> RedisBackend:
        """Create a backend over its own client for a ``redis://``, ``rediss://`` or ``unix://`` URL.

        The client uses a ``redis.asyncio.BlockingConnectionPool`` of
        ``max_connections`` (callers queue for a connection instead of
        failing); further ``kwargs`` go to the pool (``password``, ...).
        :meth:`aclose` closes the client and the pool.

        Query parameters of the URL win over the keyword arguments:
        redis-py's own (``?max_connections=200&socket_timeout=0.2``,
        ``socket_connect_timeout``, ...) and the breaker's
        (``?breaker_failures=5&breaker_cooldown=2``).
        """
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError(f"unsupported Redis URL {url!r}: use redis://, rediss:// or unix://")
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        tls_options = sorted(
            {name for name, _ in query if name.startswith("ssl_")}
            | {n for n in kwargs if n.startswith("ssl_")}
        )
        if tls_options and scheme != "rediss":
            raise ConfigurationError(
                f"{', '.join(tls_options)} need a TLS connection: use a rediss:// URL, not {scheme}://"
            )
        ours = {name: value for name, value in query if name in _URL_OPTIONS}
        if ours:
            url = urlunsplit(parts._replace(query=urlencode([(n, v) for n, v in query if n not in ours])))
            if breaker is not None:
                raise ConfigurationError(
                    f"pass either breaker= or the URL's {', '.join(sorted(ours))}, not both"
                )
            try:
                failures = int(ours.get("breaker_failures", 3))
                cooldown = float(ours.get("breaker_cooldown", 1.0))
            except ValueError:
                raise ConfigurationError(
                    f"breaker_failures must be an int and breaker_cooldown a number of seconds, got {ours}"
                ) from None
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_connect_timeout,
                **kwargs,
            )
        except ValueError as exc:  # a query parameter redis-py cannot parse
            raise ConfigurationError(f"invalid Redis URL {url!r}: {exc}") from exc
        if ours:
            breaker = CircuitBreaker(failures, cooldown, name=_describe(pool))
        options = pool.connection_kwargs
        client = aioredis.Redis(connection_pool=pool)
        return cls(
            client,
            buckets=buckets,
            # The URL's ?max_connections=N sized the pool: use all of it.
            max_connections=int(getattr(pool, "max_connections", max_connections)),
            owns_client=True,
            socket_timeout=options.get("socket_timeout") or socket_timeout,
            connect_timeout=options.get("socket_connect_timeout") or socket_connect_timeout,
            breaker=breaker,
        )

    @property
    def _idle(self) -> list[AbstractConnection]:
        """The idle connections held under the current event loop (for tests)."""
        return self._st.idle

    @property
    def _held(self) -> int:
        """How many connections are held under the current event loop (for tests)."""
        return self._st.held

    @property
    def buckets(self) -> int:
        """Buckets per namespace (each has its own tag tokens)."""
        return self._buckets

    def invalidation_feed(self) -> RedisFeed:
        """A :class:`~tagcache.backends.feed.RedisFeed` over this backend's server, with
        connections of its own (for :class:`~tagcache.LocalCache`)."""
        home = self._home_pool
        options = {
            k: v
            for k, v in home.connection_kwargs.items()
            if k not in ("socket_timeout", "socket_connect_timeout", "retry", "redis_connect_func")
        }
        return RedisFeed(
            [options],
            connection_class=home.connection_class,
            socket_timeout=self._socket_timeout,
            connect_timeout=self._connect_timeout,
        )

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding this backend's server."""
        return self._breaker

    def health(self) -> dict[str, object]:
        """The breaker's state and the timeouts in force, read from process memory.

        See :class:`~tagcache.backends.base.HealthReporting`.
        """
        breaker = self._breaker
        return {
            "breaker": breaker.state,
            "breaker_opened": breaker.opened,
            "breaker_open_since": breaker.open_since,
            "socket_timeout": self._socket_timeout,
            "connect_timeout": self._connect_timeout,
        }

    async def __aenter__(self) -> RedisBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- layout --------------------------------------------------------------

    def _space(self, ns: str) -> _Space:
        space = self._spaces.get(ns)
        if space is None:
            if not ns or "{" in ns or "}" in ns:
                raise ConfigurationError(
                    f"Redis namespace {ns!r} must be non-empty and must not contain '{{' or '}}'"
                )
            space = self._spaces[ns] = _Space(ns, self._buckets, self._scripts)
            # Its buckets are checked against the server before its first command.
            self._scripts_loaded = False
        return space

    def _bucket(self, ns: str, key: bytes) -> _Bucket:
        space = self._spaces.get(ns) or self._space(ns)
        if self._buckets == 1:
            return space.buckets[0]
        return space.buckets[bucket_index(key, self._buckets)]

    def _own_buckets(self, ns: str, space: _Space) -> list[_Bucket]:
        """The buckets of ``space`` this server holds: all of them, unless ``bucket_filter`` says."""
        keep = self._bucket_filter
        if keep is None:
            return space.buckets
        return [bucket for b, bucket in enumerate(space.buckets) if keep(ns, b)]

    # -- event loops -----------------------------------------------------------

    def _state(self) -> _LoopState:
        """The state of the running event loop (a fresh one when the loop changed)."""
        st = self._st
        loop = asyncio.get_running_loop()
        return st if st.loop is loop else self._move_to(loop)

    def _move_to(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        """Make ``loop`` the backend's event loop: the first call adopts it; a later
        change starts a fresh state, with a fresh pool of the client's pool class, and
        forgets the old one without awaiting anything of the old loop (which may be
        closed): its tasks are cancelled, its connections' sockets aborted."""
        old = self._st
        if old.loop is None:
            old.loop = loop
            return old
        st = self._st = _LoopState(loop, self._fresh_pool())
        # New connections: check the server again before the first command.
        self._scripts_loaded = False
        for task in (*old.tasks, *old.retries, *([old.link.reader] if old.link and old.link.reader else [])):
            with contextlib.suppress(RuntimeError):  # its loop is closed: it will never run again
                task.cancel()
        for conn in old.idle:
            _abort(conn)
        if old.link is not None:
            _abort(old.link.conn)
        if old.pool is self._home_pool:
            self._home_left = True
            if self._owns:
                _abort_pool(old.pool)
        else:
            _abort_pool(old.pool)
        old.idle, old.link = [], None
        return st

    def _fresh_pool(self) -> Any:
        """A new, empty pool like the client's (same class, connection class, options)."""
        home = self._home_pool
        options = dict(home.connection_kwargs)
        size = getattr(home, "max_connections", self._max)
        if isinstance(home, aioredis.BlockingConnectionPool):
            options["timeout"] = home.timeout
        try:
            return type(home)(connection_class=home.connection_class, max_connections=size, **options)
        except TypeError:  # a pool class of other parameters (Sentinel, ...): a plain pool
            options.pop("timeout", None)
            return aioredis.ConnectionPool(
                connection_class=home.connection_class, max_connections=size, **options
            )

    # -- connections -----------------------------------------------------------

    async def _acquire(self, st: _LoopState) -> AbstractConnection:
        if st.idle:
            return st.idle.pop()
        if self._closed:
            raise RedisConnectionError("the backend is closed")
        if st.held < self._max:
            st.held += 1
            try:
                # The pool may open (and handshake) a connection here with the
                # client's own timeouts, possibly none: bound it by ours.
                got = st.pool.get_connection("EVALSHA") if st.needs_name else st.pool.get_connection()
                conn: AbstractConnection = await asyncio.wait_for(
                    got, self._connect_timeout + self._socket_timeout
                )
            except BaseException as exc:
                st.held -= 1
                # The client's pool is smaller than max_connections: wait for
                # one of ours, unless we hold none.
                if not (_too_many_connections(exc) and st.held > 0):
                    raise
            else:
                # Every reply and reconnect on a connection the backend holds
                # waits at most the backend's timeouts, whatever the client says.
                _set_timeouts(conn, self._socket_timeout, self._connect_timeout)
                return conn
        waiter: asyncio.Future[AbstractConnection] = asyncio.get_running_loop().create_future()
        st.waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(st, waiter.result())
            raise

    def _release(self, st: _LoopState, conn: AbstractConnection) -> None:
        waiters = st.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if len(st.idle) < _KEEP_IDLE and not self._closed:
            st.idle.append(conn)
        else:
            st.held -= 1
            self._spawn(st, self._give_back(st, conn))

    async def _give_back(self, st: _LoopState, conn: AbstractConnection) -> None:
        pool = st.pool
        options = pool.connection_kwargs
        _set_timeouts(conn, options.get("socket_timeout"), options.get("socket_connect_timeout"))
        result = pool.release(conn)
        if inspect.isawaitable(result):
            await result

    @staticmethod
    def _spawn(st: _LoopState, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        st.tasks.add(task)
        task.add_done_callback(st.tasks.discard)

    # The script variant in use: flagged until a server rejects the shebang, then
    # plain for good; whether a server has run the flagged variant yet; whether a
    # server whose run_id cannot be read was reported. Class defaults, set per
    # instance by _load_scripts.
    _scripts: _Scripts = _FLAGGED
    _flags_proven: bool = False
    _blind_reported: bool = False

    async def _load_scripts(self, conn: AbstractConnection) -> None:
        """Check every bucket this backend knows against the server, then load the scripts.

        Runs before the backend's first command, after any reconnect, after
        ``NOSCRIPT`` and before the first command of a namespace used for the
        first time. ``verify.lua`` drops the generation of each bucket whose
        generation this server process did not make (it was restarted from
        disk, or a replica took over): entries written before are misses from
        then on. It runs in the same pipeline, before the other scripts load.

        The flagged scripts (Redis 7 ``#!lua flags=...``) are tried first. A
        server that rejects them gets the plain ones, and this backend uses
        the plain SHAs from then on. fakeredis accepts any ``SCRIPT LOAD`` and
        fails only when the script runs, so the first load runs ``verify``
        alone first and loads the others only once it ran.
        """
        known, rechecks = len(self._spaces), self._rechecks
        buckets = [(ns, b) for ns, space in list(self._spaces.items()) for b in self._own_buckets(ns, space)]
        failure: ResponseError | None = None
        for _attempt in range(3):
            scripts = self._scripts
            probe = scripts is _FLAGGED and not self._flags_proven
            verifies = [scripts.verify_head + b.generation_arg + b.epoch_arg for _, b in buckets]
            if probe and not verifies:
                verifies = [_evalsha_head(scripts.shas["verify"], 3, 0)]  # runs without keys
            rest = _SCRIPT_NAMES[1:]
            loaded, verified = await self._send_loads(conn, scripts, verifies, () if probe else rest)
            if probe and not _load_failures(loaded, verified):
                loaded, _ = await self._send_loads(conn, scripts, [], rest, with_verify=False)
            failures = _load_failures(loaded, verified)
            if not failures:
                if scripts is _FLAGGED:
                    self._flags_proven = True
                self._verified(buckets, verified)
                # Else a namespace came meanwhile, or a connection failed (perhaps a
                # restart after the check): check again before the next command.
                if len(self._spaces) == known and self._rechecks == rechecks:
                    self._scripts_loaded = True
                return
            failure = failures[0]
            if all(isinstance(f, NoScriptError) for f in failures):
                continue  # the script cache was flushed between our commands: again
            cluster = next((f for f in failures if is_cluster_reply(f)), None)
            if cluster is not None:
                raise cluster  # a Redis Cluster redirection (MOVED, ...): nothing about the scripts
            if scripts is not _FLAGGED:
                raise failure
            self._use_scripts(_PLAIN)  # the server rejects the shebang
        assert failure is not None
        raise failure

    async def _send_loads(
        self,
        conn: AbstractConnection,
        scripts: _Scripts,
        verifies: list[bytes],
        names: Sequence[str],
        *,
        with_verify: bool = True,
    ) -> tuple[list[Any], list[Any]]:
        """In one round trip: ``SCRIPT LOAD`` of verify (unless not ``with_verify``), the
        ``verifies`` calls, then ``SCRIPT LOAD`` of ``names``. Returns the replies of the
        loads (a ``ResponseError`` where one failed) and those of the calls."""
        first = ("verify",) if with_verify else ()
        cmds = [_pack(b"SCRIPT", b"LOAD", scripts.sources[name]) for name in first]
        cmds += verifies
        cmds += [_pack(b"SCRIPT", b"LOAD", scripts.sources[name]) for name in names]
        await conn.send_packed_command(cmds)
        replies = await self._read_replies(conn, len(cmds))
        loaded = replies[: len(first)] + replies[len(first) + len(verifies) :]
        for name, sha in zip((*first, *names), loaded, strict=True):
            if not isinstance(sha, ResponseError) and sha != scripts.shas[name]:
                raise ResponseError(f"SCRIPT LOAD of {name} returned {sha!r}")
        return loaded, replies[len(first) : len(first) + len(verifies)]

    def _use_scripts(self, scripts: _Scripts) -> None:
        """Switch this backend to the script variant ``scripts`` (heads built from now on,
        and those the buckets keep)."""
        self._scripts = scripts
        for space in self._spaces.values():
            for bucket in space.buckets:
                bucket.read_one = scripts.read_one

    def _current_sha(self, cmd: bytes) -> bytes:
        """``cmd`` with the SHA of the script variant in use, when it is an ``EVALSHA``
        of a script built before the backend switched variants (for ``NOSCRIPT`` retries)."""
        at = cmd.find(_SHA_MARK, 0, 32)
        if at < 0:
            return cmd
        start = at + len(_SHA_MARK)
        sha = cmd[start : start + 40]
        name = _SCRIPT_OF.get(sha)
        if name is None or self._scripts.shas[name] == sha:
            return cmd
        return cmd[:start] + self._scripts.shas[name] + cmd[start + 40 :]

    def _verified(self, buckets: list[tuple[str, _Bucket]], replies: list[Any]) -> None:
        """Report what ``verify`` found: generations dropped, or a server whose run_id it
        cannot read (restarts and failovers then go undetected)."""
        dropped = sorted({ns for (ns, _), reply in zip(buckets, replies, strict=False) if reply == 1})
        if dropped:
            logger.warning(
                "tagcache: the Redis server did not write the cached data of namespace(s) %s "
                "(it restarted from disk, or a replica took over): entries written before are "
                "treated as misses",
                ", ".join(dropped),
            )
        blind = next((reply for reply in replies if type(reply) is bytes), None)
        if blind is not None and not self._blind_reported:
            self._blind_reported = True
            # Emulators without INFO (fakeredis) are not worth a warning.
            log = logger.debug if b"unknown command" in blind.lower() else logger.warning
            log(
                "tagcache: cannot read the Redis server's run_id (%s): a restart from disk or a "
                "failover to a replica is not detected; allow INFO for tagcache's Redis user",
                blind.decode(errors="replace"),
            )

    @staticmethod
    async def _read_replies(conn: AbstractConnection, count: int) -> list[Any]:
        replies: list[Any] = []
        for _ in range(count):
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except ResponseError as exc:  # the reply was read whole: the connection is fine
                replies.append(exc)
        return replies

    async def _roundtrip(self, cmds: list[bytes], *, retry: bool = True) -> list[Any]:
        """Write ``cmds`` in one go on a held connection and return their replies in order.

        Error replies are returned as ``ResponseError`` values. ``NOSCRIPT``
        replies make the scripts load again and their commands be resent. A
        connection error on a connection used before is retried once on a new
        connection (the old one may have been closed by the server). Any
        exception, cancellation included, disconnects the connection: its
        state is unknown, and no later caller may read a stale reply from it.

        Guarded by the circuit breaker: while it is open this raises
        :class:`~tagcache.BackendUnavailableError` without touching the
        network; a transport failure (refused, reset, timed out) counts
        towards opening it, and any answer closes it again.
        """
        breaker = self._breaker
        probe = False if breaker.closed else breaker.check()
        try:
            replies = await self._exchange(cmds, retry)
        except _TRANSPORT as exc:
            self._transport_failed(exc)
            raise
        except BaseException:
            if probe:
                breaker.abandon()
            raise
        if breaker.failing or not breaker.closed:
            breaker.success()
        return replies

    def _recheck(self) -> None:
        """Check the server again (verify, load the scripts) before the next command."""
        self._scripts_loaded = False
        self._rechecks += 1

    def _transport_failed(self, exc: BaseException, calls: int = 1) -> None:
        """Count a transport failure of ``calls`` calls towards the breaker. The next
        round trip checks the server again first: a reconnect may reach a restarted server."""
        self._recheck()
        if not self._closed and not _too_many_connections(exc):
            breaker = self._breaker
            was_closed = breaker.closed
            breaker.failure(exc, calls)
            if was_closed and not breaker.closed:
                # Callers waiting for another caller's fill would wait up to their
                # lease_ttl for a signal that cannot come now: wake them to re-check
                # (and fail open at once).
                for signal in list(self._st.signals.values()):
                    signal.fire()

    async def _exchange(self, cmds: list[bytes], retry: bool) -> list[Any]:
        """The body of :meth:`_roundtrip`, without the breaker."""
        st = self._st
        if st.loop is not asyncio.get_running_loop():
            # Work of an earlier loop that runs again after the backend moved on.
            raise RedisError("the backend is in use by another event loop")
        while True:
            conn = st.idle.pop() if st.idle else await self._acquire(st)
            try:
                if not self._scripts_loaded:
                    await self._load_scripts(conn)
                await conn.send_packed_command(cmds)
                replies = await self._read_replies(conn, len(cmds))
                redo = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                if redo:
                    await self._load_scripts(conn)
                    await conn.send_packed_command([self._current_sha(cmds[i]) for i in redo])
                    for i, reply in zip(redo, await self._read_replies(conn, len(redo)), strict=True):
                        replies[i] = reply
            except RedisConnectionError:
                await conn.disconnect(nowait=True)
                self._release(st, conn)
                if retry and not self._closed:
                    retry = False
                    self._recheck()  # the server may have restarted
                    continue
                raise
            except BaseException:
                await conn.disconnect(nowait=True)
                self._release(st, conn)
                raise
            self._release(st, conn)
            return replies

    async def _roundtrip_one(self, st: _LoopState, cmd: bytes) -> Any:
        """:meth:`_roundtrip` for one command, streamlined for the common case (the
        scripts are loaded and a connection is idle); anything else takes the general path."""
        if not st.idle or not self._scripts_loaded or not self._breaker.closed:
            return (await self._roundtrip([cmd]))[0]
        conn = st.idle.pop()
        try:
            if not _write_small(conn, cmd):
                await conn.send_packed_command(cmd, conn.health_check_interval != 0)
            reply = await conn.read_response(disable_decoding=True)
        except ResponseError as exc:  # read whole: the connection is fine
            self._release(st, conn)
            if isinstance(exc, NoScriptError):
                return (await self._roundtrip([cmd]))[0]
            return exc
        except RedisConnectionError:
            await conn.disconnect(nowait=True)
            self._release(st, conn)
            if self._closed:
                raise
            # Perhaps an idle connection the server closed; perhaps a restart.
            self._recheck()
            return (await self._roundtrip([cmd], retry=False))[0]
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            self._release(st, conn)
            if isinstance(exc, _TRANSPORT):
                self._transport_failed(exc)
            raise
        self._release(st, conn)
        if self._breaker.failing:
            self._breaker.success()
        return reply

    async def _call(self, op: str, key: str | None, cmds: list[bytes], *, tolerate: int = 0) -> list[Any]:
        """Run ``cmds`` in one round trip; raise BackendError for any failure or error reply
        (but the first ``tolerate`` replies are returned even as ``ResponseError`` values).

        The boundary of every public method that is not a read (see :func:`_translate`).
        """
        self._state()  # a new event loop: move to it first
        try:
            replies = await self._roundtrip(cmds)
            for reply in replies[tolerate:]:
                if isinstance(reply, ResponseError):
                    raise reply
        except _ERRORS as exc:
            raise _translate(op, key, exc) from exc
        return replies

    # -- batched reads -----------------------------------------------------------

    async def _read(self, op: str, key: str, cmd: bytes) -> Any:
        """Send one read command now if no read is in flight, else queue it for the next batch.

        The boundary of :meth:`fetch`, :meth:`lease` and :meth:`release` (see
        :func:`_translate`); a queued read's future carries a translated error already.
        """
        if not self._breaker.closed and self._breaker.refuses():
            raise self._breaker.error()
        st = self._st
        loop = asyncio.get_running_loop()
        if st.loop is not loop:
            st = self._move_to(loop)
        try:
            if st.busy:
                fut: asyncio.Future[Any] = loop.create_future()
                st.queued_cmds.append((cmd, fut))
                reply = await fut
            else:
                st.busy = True
                failed = None
                try:
                    reply = await self._roundtrip_one(st, cmd)
                except _ERRORS as exc:
                    failed = exc
                    raise
                finally:
                    self._done_direct(st, failed)
            if isinstance(reply, ResponseError):
                raise reply
        except _ERRORS as exc:
            raise _translate(op, key, exc) from exc
        return reply

    def _done_direct(self, st: _LoopState, failed: BaseException | None = None) -> None:
        """After a read sent at once: send what queued meanwhile, or fail it with
        the read's transport error (the server did not answer the read in front
        of it; sending more would make each wait as long again)."""
        if failed is not None and isinstance(failed, _TRANSPORT):
            self._fail_queued(st, failed)
        if st.queued_gets or st.queued_fetches or st.queued_cmds:
            self._spawn(st, self._run_batches(st))
        else:
            st.busy = False

    async def _run_batches(self, st: _LoopState) -> None:
        """Send the queued reads, one batch per round trip, until no more are queued."""
        try:
            while st.queued_gets or st.queued_fetches or st.queued_cmds:
                gets, st.queued_gets = st.queued_gets, {}
                fetches, st.queued_fetches = st.queued_fetches, {}
                cmds, st.queued_cmds = st.queued_cmds, []
                await self._send_batch(st, gets, fetches, cmds)
                # One tick, so callers woken by the replies can queue again.
                await asyncio.sleep(0)
        finally:
            st.busy = False
            if st.queued_gets or st.queued_fetches or st.queued_cmds:
                if self._closed:
                    self._fail_queued(st)
                else:
                    st.busy = True
                    self._spawn(st, self._run_batches(st))

    async def _send_batch(
        self,
        st: _LoopState,
        gets: dict[_Bucket, dict[bytes, list[asyncio.Future[Any]]]],
        fetches: dict[_Bucket, dict[object, _FetchGroup]],
        cmds: list[tuple[bytes, asyncio.Future[Any]]],
    ) -> None:
        """Send one batch: a read.lua call per bucket of ``gets``, a fetch_many.lua call
        per bucket of ``fetches`` (fetch.lua for a lone fetch), then ``cmds``; in one
        round trip, and hand each caller its reply."""
        packed: list[bytes] = []
        scripts = self._scripts
        heads = scripts.read_heads
        for bucket, by_key in gets.items():
            n = len(by_key)
            head = heads[n] if n < len(heads) else _evalsha_head(scripts.shas["read"], n + 4, n)
            packed.append(b"".join([head, *[_bulk(bucket.entry + k) for k in by_key], bucket.token_arg]))
        fetch_many = scripts.shas["fetch_many"]
        for bucket, groups in fetches.items():
            nkeys = 1 + sum([g.nkeys for g in groups.values()])
            nargv = 1 + sum([2 + 3 * len(g.futs) for g in groups.values()])
            packed.append(
                b"".join(
                    [
                        _evalsha_head(fetch_many, 3 + nkeys + nargv, nkeys),
                        bucket.generation_arg,
                        *[g.keys for g in groups.values()],
                        bucket.token_arg,
                        *[
                            b"%b%b%b" % (_count(g.nkeys - 4), _count(len(g.futs)), b"".join(g.args))
                            for g in groups.values()
                        ],
                    ]
                )
            )
        packed.extend(cmd for cmd, _ in cmds)
        try:
            replies = await self._roundtrip(packed)
        except BaseException as exc:
            for by_key in gets.values():
                for kb, futs in by_key.items():
                    self._fail(futs, "get", kb, exc)
            for groups in fetches.values():
                for g in groups.values():
                    self._fail(g.futs, "fetch", g.kb, exc)
            for _, fut in cmds:
                self._fail([fut], "read", None, exc)
            if isinstance(exc, _TRANSPORT):
                self._fail_queued(st, exc)  # queued behind a batch the server did not answer
            if isinstance(exc, Exception):
                return
            raise
        for by_key, reply in zip(gets.values(), replies, strict=False):
            if isinstance(reply, ResponseError):
                for kb, futs in by_key.items():
                    self._fail(futs, "get", kb, reply)
                continue
            for (_, futs), value in zip(by_key.items(), reply, strict=True):
                result = b"" if type(value) is int else value
                for fut in futs:
                    if not fut.done():
                        fut.set_result(result)
        at = len(gets)
        for groups, reply in zip(fetches.values(), replies[at:], strict=False):
            if isinstance(reply, ResponseError):
                for g in groups.values():
                    self._fail(g.futs, "fetch", g.kb, reply)
                continue
            for g, value in zip(groups.values(), reply, strict=True):
                if type(value) is bytes:  # a hit: one Lookup (immutable) for the group's callers
                    hit = Lookup(value)
                    for fut in g.futs:
                        if not fut.done():
                            fut.set_result(hit)
                    continue
                for fut, miss in zip(g.futs, value, strict=True):
                    if not fut.done():
                        fut.set_result(miss)
        for (_, fut), reply in zip(cmds, replies[at + len(fetches) :], strict=True):
            if not fut.done():
                fut.set_result(reply)

    @staticmethod
    def _fail(futs: list[asyncio.Future[Any]], op: str, key: bytes | None, exc: BaseException) -> None:
        for fut in futs:
            if not fut.done():
                text = None if key is None else key.decode(errors="replace")
                # A BackendError (the breaker is open) is passed on as it is.
                fut.set_exception(_translate(op, text, exc))

    def _fail_queued(self, st: _LoopState, exc: BaseException | None = None) -> None:
        """Fail every queued read with ``exc`` (by default: the backend is closed)."""
        closed = exc if exc is not None else RedisConnectionError("the backend is closed")
        if exc is not None and isinstance(exc, _TRANSPORT):
            # Each queued read is a call the server failed, like the one in front of it.
            queued = sum(len(f) for by_key in st.queued_gets.values() for f in by_key.values())
            queued += sum(len(g.futs) for groups in st.queued_fetches.values() for g in groups.values())
            if queued + len(st.queued_cmds):
                self._transport_failed(exc, queued + len(st.queued_cmds))
        for by_key in st.queued_gets.values():
            for kb, futs in by_key.items():
                self._fail(futs, "get", kb, closed)
        for groups in st.queued_fetches.values():
            for g in groups.values():
                self._fail(g.futs, "fetch", g.kb, closed)
        for _, fut in st.queued_cmds:
            self._fail([fut], "read", None, closed)
        st.queued_gets, st.queued_fetches, st.queued_cmds = {}, {}, []

    # -- Backend -----------------------------------------------------------------

    async def get(self, ns: str, key: str) -> bytes | None:
        """Return the payload of ``key`` if present and all its tag tokens match, else ``None``.

        One round trip, shared with the other reads queued while one is in
        flight. Returns ``b""`` when the entry key holds foreign data (a
        Redis type other than a hash).
        """
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        if not self._breaker.closed and self._breaker.refuses():
            raise self._breaker.error()  # open: fail now rather than queue behind a probe
        st = self._st
        loop = asyncio.get_running_loop()
        if st.loop is not loop:
            st = self._move_to(loop)
        if st.busy:
            fut: asyncio.Future[Any] = loop.create_future()
            by_key = st.queued_gets.get(bucket)
            if by_key is None:
                st.queued_gets[bucket] = {kb: [fut]}
            else:
                futs = by_key.get(kb)
                if futs is None:
                    by_key[kb] = [fut]
                else:
                    futs.append(fut)
            result: bytes | None = await fut
            return result
        st.busy = True
        try:
            ek = bucket.entry + kb
            reply = await self._roundtrip_one(
                st, b"%b$%d\r\n%b\r\n%b" % (bucket.read_one, len(ek), ek, bucket.read_one_args)
            )
            if type(reply) is bytes or reply is None:
                return reply
            if type(reply) is int:  # foreign data under the entry key
                return b""
            raise reply  # an error reply
        except _ERRORS as exc:  # the boundary (see _translate)
            raise _translate("get", key, exc) from exc
        finally:
            self._done_direct(st)

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """Read ``key``; on a miss, snapshot the tokens of ``tags`` and try to take the fill lease.

        One round trip, batched like :meth:`get`: fetches issued while a read
        is in flight travel in the next batch, those of one bucket as a single
        script call (``fetch_many.lua``), so a hit costs about what a
        :meth:`get` costs. Missing tokens are created to live ``lease_ttl``
        plus a few seconds; existing ones are extended to that if shorter.
        Foreign data under the entry key is a miss. When another caller holds
        the lease, the key is marked as waited for in the same step (see
        :meth:`watch`); of several fetches of a missing key in one batch the
        first gets the lease, like sequential ones.
        """
        breaker = self._breaker
        if not breaker.closed and breaker.refuses():
            raise breaker.error()  # open: nothing is sent, no lease can be granted
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        st = self._st
        loop = asyncio.get_running_loop()
        if st.loop is not loop:
            st = self._move_to(loop)
        lease = _new_lease()
        try:
            if st.busy:
                fut: asyncio.Future[Any] = loop.create_future()
                groups = st.queued_fetches.get(bucket)
                if groups is None:
                    groups = st.queued_fetches[bucket] = {}
                ident: object = kb
                group = groups.get(kb)
                if group is not None and group.tags is not tags and group.tags != tags:
                    ident = (kb, tuple(tags))  # the key fetched with other tags too: a group apart
                    group = groups.get(ident)
                if group is None:
                    # entry, lease and mark keys have prefixes of one length
                    head = b"$%d\r\n" % (len(bucket.entry) + len(kb))
                    keys = b"".join(
                        (
                            head,
                            bucket.entry,
                            kb,
                            b"\r\n",
                            head,
                            bucket.lease,
                            kb,
                            b"\r\n",
                            head,
                            bucket.mark,
                            kb,
                            b"\r\n",
                            bucket.fetch_keys(tags),
                        )
                    )
                    group = groups[ident] = _FetchGroup(keys, len(tags) + 4, tags, kb)
                group.futs.append(fut)
                group.args.append(b"".join((b"$32\r\n", lease, b"\r\n", self._fetch_tail(lease_ttl))))
                reply = await fut
            else:
                st.busy = True
                failed = None
                try:
                    reply = await self._roundtrip_one(
                        st, self._miss_cmd("fetch", bucket, kb, tags, lease_ttl, lease)
                    )
                except _ERRORS as exc:
                    failed = exc
                    raise
                finally:
                    self._done_direct(st, failed)
                if isinstance(reply, ResponseError):
                    raise reply
        except _ERRORS as exc:  # the boundary (see _translate)
            self._lost_lease(ns, key, lease)
            raise _translate("fetch", key, exc) from exc
        except BaseException:  # cancelled, or a queued fetch failed (translated already)
            self._lost_lease(ns, key, lease)
            raise
        if type(reply) is Lookup:  # a hit of a batch
            return reply
        if type(reply) is bytes:
            return Lookup(reply)
        return _miss_lookup(reply, lease)

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """Snapshot the tokens of ``tags`` and try to take the fill lease, whether or not
        ``key`` holds a value (to refresh an entry before or after it goes stale).

        One round trip. Tokens are created and extended as by :meth:`fetch`.
        Returns ``Lookup(None, tokens, lease_or_None)``; never marks the key
        as waited for.
        """
        lease = _new_lease()
        kb = key.encode()
        cmd = self._miss_cmd("lease", self._bucket(ns, kb), kb, tags, lease_ttl, lease)
        try:
            reply = await self._read("lease", key, cmd)
        except BaseException:
            self._lost_lease(ns, key, lease)
            raise
        return _miss_lookup(reply, lease)

    def _fetch_tail(self, lease_ttl: float) -> bytes:
        """The packed lease and token lifetimes (ms) of a fetch or lease with ``lease_ttl``."""
        tail = self._fetch_tails.get(lease_ttl)
        if tail is None:
            lease_ms = max(1, round(lease_ttl * 1000))
            tail = _bulk(b"%d" % lease_ms) + _bulk(b"%d" % (lease_ms + _TOKEN_MARGIN_MS))
            if len(self._fetch_tails) < 64:
                self._fetch_tails[lease_ttl] = tail
        return tail

    def _miss_cmd(
        self,
        script: str,
        bucket: _Bucket,
        kb: bytes,
        tags: Sequence[str],
        lease_ttl: float,
        lease: bytes,
    ) -> bytes:
        """``EVALSHA`` of fetch or lease: entry, lease, mark, generation, token and epoch
        keys; the token prefix, ``lease``, the lease and token lifetimes and the fresh
        token of what the call creates (``lease`` again: unique)."""
        scripts = self._scripts
        heads = scripts.fetch_heads if script == "fetch" else scripts.lease_heads
        ek, lk, wk = bucket.entry + kb, bucket.lease + kb, bucket.mark + kb
        return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n%b%b%b$32\r\n%b\r\n%b$32\r\n%b\r\n" % (
            heads[len(tags)]
            if len(tags) < len(heads)
            else _evalsha_head(scripts.shas[script], len(tags) + 13, len(tags) + 5),
            len(ek),
            ek,
            len(lk),
            lk,
            len(wk),
            wk,
            bucket.generation_arg,
            bucket.fetch_keys(tags),
            bucket.token_arg,
            lease,
            self._fetch_tail(lease_ttl),
            lease,
        )

    def _lost_lease(self, ns: str, key: str, lease: bytes) -> None:
        """The caller of a fetch or lease request with ``lease`` was cancelled or failed
        before reading the reply: the server may have granted the lease anyway.
        Release it in the background so the key's other callers, here and
        elsewhere, do not wait for it to expire."""
        self._release_later(ns, key, lease.decode(), delay=0.0)

    def _release_later(self, ns: str, key: str, lease: str, delay: float = _RETRY_FIRST) -> None:
        if not self._closed:
            st = self._state()
            task = asyncio.get_running_loop().create_task(self._release_retrying(ns, key, lease, delay))
            st.retries.add(task)
            task.add_done_callback(st.retries.discard)

    async def _release_retrying(self, ns: str, key: str, lease: str, delay: float) -> None:
        """Release ``lease`` until the server confirms it, backing off up to the breaker's
        cool-down, for at most :data:`_RETRY_FOR` seconds (a lease lives no longer)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _RETRY_FOR
        while not self._closed:
            if delay:
                await asyncio.sleep(delay)
            try:
                await asyncio.wait_for(
                    self._read("release", key, self._release_cmd(ns, key, lease)),
                    2 * self._socket_timeout + self._connect_timeout,
                )
            except Exception as exc:
                if loop.time() >= give_up or not _unreachable(exc):
                    logger.debug("tagcache: gave up releasing a lease on key %r: %s", key, exc)
                    return
                delay = min(max(2 * delay, _RETRY_FIRST), self._breaker.cooldown)
            else:
                return

    def watch(self, ns: str, key: str) -> FillWatch:
        """Return a :class:`~tagcache.backends.base.FillWatch` on ``key``: enter it, read
        the key again, then ``wait``.

        Entering subscribes this backend's pub/sub connection to the
        namespace's channel and waits for the confirmation, the first time
        only; waiting sends nothing to Redis. A :meth:`fetch` that finds the
        lease held by another caller marks the key, and the next
        :meth:`fill`, :meth:`release`, :meth:`set` or :meth:`delete` of a
        marked key (from any process) publishes the signal that wakes every
        watcher of the key in every process.
        """
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        return _RedisFillWatch(self, self._state(), key, bucket.mark + kb, bucket.channel)

    async def _subscribe(self, st: _LoopState, channel: bytes, key: str) -> None:
        """Make sure the pub/sub connection of ``st`` is subscribed to ``channel`` (confirmed)."""
        link = st.link
        if link is not None:
            fut = link.channels.get(channel)
            if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                return
        if not self._breaker.closed:
            raise self._breaker.error()
        try:
            async with st.link_lock:
                if self._closed:
                    raise RedisConnectionError("the backend is closed")
                link = st.link
                if link is None:
                    link = await self._open_link(st)
                fut = link.channels.get(channel)
                if fut is None:
                    fut = link.channels[channel] = asyncio.get_running_loop().create_future()
                    try:
                        await link.conn.send_packed_command(_pack(b"SUBSCRIBE", channel), False)
                    except BaseException:
                        self._break_link(link)
                        raise
            timeout = self._socket_timeout
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                self._break_link(link)
                raise
        except _ERRORS as exc:  # the boundary of watch (see _translate)
            raise _translate("watch", key, exc) from exc

    async def _open_link(self, st: _LoopState) -> _Link:
        """Open the pub/sub connection of ``st`` (outside the pool: it never carries
        commands) and start its reader."""
        kwargs = dict(st.pool.connection_kwargs)
        # Reads on it wait for messages for as long as it takes.
        kwargs["socket_timeout"] = None
        kwargs["health_check_interval"] = 0
        conn: Any = st.pool.connection_class(**kwargs)
        try:
            # Connecting includes a handshake read: bound it (the connection's
            # own socket_timeout is off, for waiting on messages).
            await asyncio.wait_for(conn.connect(), self._connect_timeout + self._socket_timeout)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        link = _Link(conn, st)
        link.reader = asyncio.get_running_loop().create_task(self._read_link(link))
        st.link = link
        return link

    async def _read_link(self, link: _Link) -> None:
        """Read the pub/sub connection: confirm subscriptions, wake the watchers of signalled keys."""
        conn, channels, signals = link.conn, link.channels, link.state.signals
        try:
            while True:
                reply = await conn.read_response(disable_decoding=True, push_request=True)
                if type(reply) is not list or len(reply) < 3:
                    continue
                kind = reply[0]
                if kind == b"message":
                    signal = signals.get(reply[2])
                    if signal is not None:
                        signal.fire()
                elif kind == b"subscribe":
                    fut = channels.get(reply[1])
                    if fut is not None and not fut.done():
                        fut.set_result(None)
        except Exception:
            # Lost (killed, server restart, ...): the next watch opens a new one.
            self._break_link(link)

    def _break_link(self, link: _Link) -> None:
        """Forget ``link``: fail pending subscriptions, wake every watcher (a signal may
        have been lost) and close the connection."""
        st = link.state
        if st.link is link:
            st.link = None
        lost = RedisConnectionError("the pub/sub connection was lost")
        for fut in link.channels.values():
            if not fut.done():
                fut.set_exception(lost)
                fut.exception()  # retrieved: no warning when no watch awaits it any more
        for signal in list(st.signals.values()):
            signal.fire()
        self._spawn(st, self._close_link(link))

    @staticmethod
    async def _close_link(link: _Link) -> None:
        reader = link.reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(BaseException):  # cancelled or failed: it is gone either way
                await reader
        await link.conn.disconnect(nowait=True)

    def _write_cmd(
        self,
        script: str,
        bucket: _Bucket,
        kb: bytes,
        args: list[bytes],
        tags: Sequence[str],
        extra_key: bytes | None = None,
    ) -> bytes:
        """``EVALSHA`` of a write script: entry, lease, mark, generation and token keys
        (and ``extra_key``); the channel, then ``args``."""
        keys = 4 + len(tags) + (extra_key is not None)
        return b"".join(
            [
                _evalsha_head(self._scripts.shas[script], 3 + keys + 1 + len(args), keys),
                _bulk(bucket.entry + kb),
                _bulk(bucket.lease + kb),
                _bulk(bucket.mark + kb),
                bucket.generation_arg,
                *[_bulk(bucket.token + t.encode()) for t in tags],
                *([_bulk(extra_key)] if extra_key is not None else []),
                _bulk(bucket.channel),
                *[_bulk(a) for a in args],
            ]
        )

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        """Store ``payload`` unconditionally, stamped with the current tokens of ``tags``.

        One round trip. Missing tokens are created; every token is extended
        to outlive the entry (an entry without expiry makes its tokens
        persist). Clears any lease on ``key``. A ``ttl`` of zero stores
        nothing but removes the previous entry. Signals the key's watchers.
        """
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        args = [bytes(payload), _ttl_ms(ttl), os.urandom(8).hex().encode(), *[t.encode() for t in tags]]
        await self._call("set", key, [self._write_cmd("set", bucket, kb, args, tags)])

    async def fill(
        self,
        ns: str,
        key: str,
        payload: bytes,
        ttl: float | None,
        tags: Sequence[str],
        tokens: Sequence[str],
        lease: str,
        epoch: str | None = None,
    ) -> bool:
        """Compare-and-set after a miss: store only if ``lease`` is still this caller's
        and every tag's current token equals ``tokens`` (and, with ``epoch``, no tag
        was invalidated since the miss). Releases the lease either way.

        One round trip. Returns ``True`` if the payload was stored. Signals
        the key's watchers whenever the lease was still this caller's. Also
        stores only under the bucket's generation at miss time (which the
        lease carries, see :func:`_miss_lookup`): never after the server
        restarted from disk or a replica took over in between.
        """
        if len(tags) != len(tokens):
            await self.release(ns, key, lease)
            return False
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        token, _, generation = lease.partition("/")
        args = [
            bytes(payload),
            _ttl_ms(ttl),
            token.encode(),
            generation.encode(),
            *[t.encode() for t in tags],
            *[t.encode() for t in tokens],
        ]
        cmd = self._write_cmd("fill", bucket, kb, args, tags)
        if epoch is not None:
            # One more key and argument: the epoch and its snapshot (see fill.lua).
            cmd = self._write_cmd("fill", bucket, kb, [*args, epoch.encode()], tags, extra_key=bucket.epoch)
        replies = await self._call("fill", key, [cmd])
        return bool(replies[0] == 1)

    def _release_cmd(self, ns: str, key: str, lease: str) -> bytes:
        """``EVALSHA`` of release: lease and mark keys, the lease token (``lease`` less
        the generation it carries), the channel."""
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        return b"".join(
            [
                _evalsha_head(self._scripts.shas["release"], 7, 2),
                _bulk(bucket.lease + kb),
                _bulk(bucket.mark + kb),
                _bulk(lease.partition("/")[0].encode()),
                _bulk(bucket.channel),
            ]
        )

    async def release(self, ns: str, key: str, lease: str) -> None:
        """Give up ``lease`` on ``key`` without writing; a lease held by someone else is kept.

        Releasing signals the key's watchers. When the server cannot be
        reached (or the breaker is open) the error is raised and the release
        is retried in the background until it gets through (for up to a
        minute): a request sent to a server that hangs may still be executed
        when it recovers, and its lease must not outlive it.
        """
        cmd = self._release_cmd(ns, key, lease)
        # Queued with the reads, so it follows any fetch of this lease still in flight.
        try:
            await self._read("release", key, cmd)
        except BaseException as exc:
            if not isinstance(exc, BackendError) or _unreachable(exc):
                self._release_later(ns, key, lease)
            raise

    async def delete(self, ns: str, key: str) -> bool:
        """Remove ``key`` and its lease, and signal its watchers (one round trip).

        Returns ``True`` if an entry was stored.
        """
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        cmd = b"".join(
            [
                _evalsha_head(self._scripts.shas["delete"], 7, 3),
                _bulk(bucket.entry + kb),
                _bulk(bucket.lease + kb),
                _bulk(bucket.mark + kb),
                _bulk(bucket.channel),
            ]
        )
        replies = await self._call("delete", key, [cmd])
        return bool(replies[0])

    async def invalidate(
        self, ns: str, tags: Sequence[str], *, buckets: Collection[int] | None = None
    ) -> None:
        """Invalidate every entry carrying any of ``tags`` by deleting the tags' tokens
        (and the bucket's invalidation epoch, so fills snapshot before it fail).

        One round trip: one ``DEL`` per bucket, pipelined. Entries are not
        touched; they become misses, deleted by the next read that finds
        them, or expire by their TTL. ``buckets`` restricts it to those bucket
        numbers (all of them, whatever ``bucket_filter`` says): how
        :class:`~tagcache.backends.RedisClusterBackend` gives each primary its part.
        """
        if not tags:
            return
        encoded = [t.encode() for t in tags]
        space = self._space(ns)
        if buckets is None:
            chosen = self._own_buckets(ns, space)
        else:
            chosen = [space.buckets[b] for b in sorted(buckets)]
        if chosen:
            await self._call(
                "invalidate", None, [_pack(b"DEL", *[b.token + t for t in encoded], b.epoch) for b in chosen]
            )

    async def peek(self, ns: str, key: str) -> EntryInfo | None:
        """Return the stored entry with its remaining TTL, tags and validity, or ``None``.

        One round trip; writes nothing. Foreign data under the entry key (a
        type other than hash, or a hash that is not a well-formed entry) reads
        as ``None``.
        """
        kb = key.encode()
        bucket = self._bucket(ns, kb)
        head = _evalsha_head(self._scripts.shas["peek"], 5, 1)
        cmd = b"".join([head, _bulk(bucket.entry + kb), bucket.token_arg])
        reply = (await self._call("peek", key, [cmd]))[0]
        if not reply:
            return None
        payload, pttl, stamp, valid = reply
        if pttl == -2:
            return None
        # "tag\ntoken" pairs (well-formed: peek.lua checked), the generation's among them.
        tags = stamp.split(b"\n")[0::2] if stamp else []
        return EntryInfo(
            payload=payload,
            ttl=None if pttl < 0 else pttl / 1000,
            tags=tuple(t.decode(errors="replace") for t in tags if t != _GENERATION),
            valid=valid == 1,
        )

    async def _scan(self, op: str, ns: str, match: bytes) -> AsyncIterator[list[tuple[bytes, bytes, bytes]]]:
        """Yield batches of keys of ``ns`` (``(kind, key bytes, rest)``) matching ``match``."""
        space = self._space(ns)
        cursor = b"0"
        while True:
            reply = (
                await self._call(
                    op, None, [_pack(b"SCAN", cursor, b"MATCH", match, b"COUNT", b"%d" % _SCAN_COUNT)]
                )
            )[0]
            cursor, found = reply[0], reply[1]
            batch = []
            for raw in found:
                m = space.key_re.match(raw)
                if m is not None:
                    batch.append((m.group(2), raw, m.group(3)))
            yield batch
            if cursor in (b"0", 0):
                return

    async def clear(self, ns: str) -> int:
        """Remove every key of namespace ``ns`` (entries, tokens, leases); return entries removed.

        Uses ``SCAN`` with ``MATCH`` on the namespace prefix and ``UNLINK``
        in batches; keys of other namespaces and foreign keys are never touched.
        """
        space = self._space(ns)
        removed = 0
        async for batch in self._scan("clear", ns, space.scan_prefix + b"*"):
            # One UNLINK per bucket (one Cluster slot each), entries apart: their count is returned.
            entries: dict[bytes, list[bytes]] = {}
            others: dict[bytes, list[bytes]] = {}
            for kind, raw, _ in batch:
                bucket = raw[: raw.index(b"}")]
                (entries if kind == b"e" else others).setdefault(bucket, []).append(raw)
            cmds = [_pack(b"UNLINK", *group) for group in entries.values()]
            n_entry_cmds = len(cmds)
            cmds += [_pack(b"UNLINK", *group) for group in others.values()]
            if cmds:
                replies = await self._call("clear", None, cmds)
                removed += sum(int(r) for r in replies[:n_entry_cmds])
        return removed

    async def keys(self, ns: str, pattern: str, limit: int | None) -> list[str]:
        """Return up to ``limit`` (``None``: all) stored keys of ``ns`` matching the Redis glob ``pattern``.

        Uses ``SCAN`` with ``MATCH``; keys of entries whose tags were
        invalidated are listed until a read deletes them or they expire.
        """
        if limit is not None and limit <= 0:
            return []
        space = self._space(ns)
        match = glob_to_regex(pattern).match
        found: dict[str, None] = {}
        async for batch in self._scan("keys", ns, space.scan_prefix + b"e:" + pattern.encode()):
            for kind, _, rest in batch:
                if kind != b"e":
                    continue
                text = rest.decode(errors="replace")
                if self._buckets > 1 and not match(text):
                    continue
                found[text] = None
                if limit is not None and len(found) >= limit:
                    return list(found)
        return list(found)

    async def info(self) -> BackendInfo:
        """Return the database's key count (``DBSIZE``), ``used_memory`` and ``evicted_keys``.

        None of the three is per namespace: ``keys`` counts every key of the database
        (every namespace, tagcache's own bookkeeping keys, other programs'
        keys). ``entries`` per namespace is ``None``: counting them would need
        a ``SCAN`` of the whole database. ``extra`` holds ``maxmemory``,
        ``maxmemory_policy``, ``expired_keys``, ``keyspace_hits``,
        ``keyspace_misses`` and ``redis_version`` where the server reports them.
        """
        cmds = [
            _pack(b"INFO", b"memory"),
            _pack(b"INFO", b"stats"),
            _pack(b"INFO", b"server"),
            _pack(b"DBSIZE"),
        ]
        replies = await self._call("info", None, cmds, tolerate=3)
        fields: dict[str, str] = {}
        for text in replies[:3]:
            if isinstance(text, ResponseError):  # INFO is not available everywhere (e.g. fakeredis)
                continue
            for line in (text.decode() if isinstance(text, bytes) else str(text)).splitlines():
                name, sep, value = line.partition(":")
                if sep and not line.startswith("#"):
                    fields[name.strip()] = value.strip()

        def number(name: str) -> int | None:
            value = fields.get(name)
            return int(value) if value is not None and value.lstrip("-").isdigit() else None

        extra: dict[str, object] = {}
        for name in ("maxmemory", "expired_keys", "keyspace_hits", "keyspace_misses"):
            if (figure := number(name)) is not None:
                extra[name] = figure
        for name in ("maxmemory_policy", "redis_version"):
            if name in fields:
                extra[name] = fields[name]
        return BackendInfo(
            keys=int(replies[3]),
            memory_bytes=number("used_memory"),
            evictions=number("evicted_keys"),
            extra=extra,
        )

    async def aclose(self) -> None:
        """Hand the held connections back to the client's pool; close the client if owned.

        Reads still queued fail with :class:`tagcache.BackendError`. The
        pub/sub connection is closed and its reader stopped; watchers still
        waiting are woken. Safe to call twice, and under any event loop: the
        connections of an earlier loop are dropped without it (see
        :meth:`_move_to`).
        """
        if self._closed:
            return
        self._closed = True
        st = self._state()
        for task in list(st.retries):  # their leases expire by themselves
            task.cancel()
        if not st.busy:
            self._fail_queued(st)
        idle, st.idle = st.idle, []
        st.held -= len(idle)
        for conn in idle:
            await self._give_back(st, conn)
        async with st.link_lock:
            link = st.link
            if link is not None:
                self._break_link(link)
        while st.tasks:
            await asyncio.gather(*st.tasks, return_exceptions=True)
        if st.pool is not self._home_pool:
            await st.pool.disconnect()  # a pool of our own, for this loop
        if self._owns and not self._home_left:
            close = getattr(self._client, "aclose", None) or self._client.close
            await close()
            await self._home_pool.disconnect()
        # Else the client's pool stayed with an earlier loop; _move_to aborted its connections.
