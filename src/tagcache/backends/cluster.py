"""The Redis Cluster backend: one :class:`~tagcache.backends.redis.RedisBackend` per primary,
each operation routed to the primary holding its bucket's slot.

::

    cache = Cache.from_url("redis+cluster://127.0.0.1:7000/", namespace="app")
    # or
    backend = RedisClusterBackend([("127.0.0.1", 7000)], buckets=64)

Layout: a namespace is split into ``buckets`` buckets (64 by default); every key of
a bucket carries the hash tag ``{<namespace>:<bucket>}``, so each script touches one
slot and no command can meet a ``CROSSSLOT`` error. A key's bucket is
``crc32(key) % buckets``; the buckets spread the namespace over the cluster's slots,
hence over its primaries.

What each operation costs:

- reads and writes of one key go to the primary of its bucket, through that
  primary's own :class:`RedisBackend`: its connections, its batching of concurrent
  reads (reads issued in the same tick for keys on different primaries travel as
  one batch per primary), its scripts, its circuit breaker, its pub/sub connection
  for fill signals;
- :meth:`invalidate` writes one token per bucket, pipelined per primary: one round
  trip to each primary, concurrently, whatever the number of entries;
- :meth:`clear`, :meth:`keys` and :meth:`info` visit every primary.

Topology: the slot map is read (``CLUSTER SLOTS``) from the seed nodes at the first
call, and again, in the background, when a call meets a redirection (``MOVED``,
``ASK``, ``TRYAGAIN``, ``CLUSTERDOWN``; the call is retried once on the new owner)
or a failing primary (so a promoted replica takes over the slots of a dead primary
as soon as the cluster has promoted it). Each primary has its own breaker: a dead
primary makes the calls of its buckets fail at once (the cache then fails open for
them), while the other primaries keep serving. A failing primary also makes
:meth:`invalidate` fail: the cache keeps the invalidation and replays it, bypassing
its entries meanwhile, so nothing stale is served. When a replica takes over, the
server check every backend runs first (``verify.lua``) sees a server that did not
write the bucket's data: entries written before are misses, never stale hits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

try:
    import redis.asyncio as aioredis
    from redis.asyncio.connection import Connection, SSLConnection
    from redis.crc import key_slot
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Redis Cluster backend needs redis-py: pip install 'tagcache[redis]'") from exc

from tagcache.backends.base import BackendInfo, EntryInfo, FillWatch, Lookup
from tagcache.backends.breaker import CircuitBreaker
from tagcache.backends.feed import RedisFeed
from tagcache.backends.redis import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_SOCKET_TIMEOUT,
    RedisBackend,
    bucket_hash_tag,
    bucket_index,
    check_connection_options,
    is_cluster_reply,
)
from tagcache.exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    PartialInvalidationError,
)

__all__ = ["DEFAULT_CLUSTER_BUCKETS", "RedisClusterBackend"]

logger: Final = logging.getLogger("tagcache")

T = TypeVar("T")

DEFAULT_CLUSTER_BUCKETS: Final = 64
"""Buckets per namespace on a Redis Cluster (spread over the slots, hence the primaries)."""

#: Slots of a Redis Cluster.
_SLOTS: Final = 16384
#: Least seconds between two background reads of the slot map.
_REFRESH_INTERVAL: Final = 0.25
#: Connection options passed on to every primary's pool (the rest are tagcache's own).
_PASSED_ON: Final = frozenset(
    {
        "username",
        "password",
        "credential_provider",
        "client_name",
        "socket_keepalive",
        "socket_keepalive_options",
        "health_check_interval",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
    }
)
#: TLS query parameters of a ``rediss+cluster://`` URL: those of redis-py's ``rediss://``
#: URLs, passed on to every connection under the same names.
_TLS_URL_OPTIONS: Final = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
_URL_OPTIONS: Final = frozenset(
    {
        "buckets",
        "max_connections",
        "socket_timeout",
        "socket_connect_timeout",
        "breaker_failures",
        "breaker_cooldown",
        *_TLS_URL_OPTIONS,
    }
)
#: The values of ``ssl_cert_reqs`` (redis-py's names for ``ssl.CERT_NONE`` and the others).
_CERT_REQS: Final = ("none", "optional", "required")
#: The values of ``ssl_check_hostname`` in a URL.
_BOOLEANS: Final = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _tls_option(name: str, raw: str) -> str | bool:
    """The value of the TLS query parameter ``name`` given as ``raw`` in a URL."""
    if name == "ssl_cert_reqs":
        if raw.lower() not in _CERT_REQS:
            raise ConfigurationError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {raw!r}")
        return raw.lower()
    if name == "ssl_check_hostname":
        if raw.lower() not in _BOOLEANS:
            raise ConfigurationError(f"ssl_check_hostname must be true/false, 1/0 or yes/no, got {raw!r}")
        return _BOOLEANS[raw.lower()]
    if not raw:
        raise ConfigurationError(f"{name} must be the path of a PEM file, got an empty value")
    return raw


def _redirected(exc: BaseException) -> bool:
    """Whether ``exc`` (a :class:`BackendError` or its cause) is a cluster redirection."""
    cause = exc.__cause__ if isinstance(exc, BackendError) else exc
    return is_cluster_reply(cause)


def _node_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says the primary itself is failing (down, paused, unreachable)."""
    if isinstance(exc, BackendUnavailableError):
        return True
    cause = exc.__cause__ if isinstance(exc, BackendError) else exc
    return isinstance(cause, (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Primary:
    """One primary: its address and the single-server backend talking to it."""

    __slots__ = ("address", "backend", "name")

    #: Set right after construction: its bucket filter refers to this object.
    backend: RedisBackend

    def __init__(self, name: str, address: tuple[str, int]) -> None:
        self.name = name
        self.address = address


class _ClusterWatch:
    """A :class:`FillWatch` on a key whose primary is known once the watch is entered."""

    __slots__ = ("inner", "key", "ns", "owner")

    def __init__(self, owner: RedisClusterBackend, ns: str, key: str) -> None:
        self.owner = owner
        self.ns = ns
        self.key = key
        self.inner: FillWatch | None = None

    async def __aenter__(self) -> FillWatch:
        primary = await self.owner._primary_of(self.ns, self.key.encode())
        inner = primary.backend.watch(self.ns, self.key)
        await inner.__aenter__()
        self.inner = inner
        return self

    async def wait(self, timeout: float) -> bool:
        if self.inner is None:
            raise RuntimeError("enter the watch (async with backend.watch(...)) before waiting on it")
        return await self.inner.wait(timeout)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            await inner.__aexit__(exc_type, exc, tb)


class RedisClusterBackend:
    """The :class:`~tagcache.backends.Backend` over a Redis Cluster.

    :param startup_nodes: ``(host, port)`` of one or more nodes of the cluster (the
        rest is discovered), or a ``redis.asyncio.RedisCluster`` client, whose
        startup nodes and connection options (password, TLS) are used. The backend
        opens connections of its own to each primary; it never closes a client given.
    :param buckets: buckets per namespace (default 64); must stay fixed for a
        namespace's data.
    :param max_connections: most connections per primary used at once.
    :param socket_timeout: seconds a reply may take (default 0.5), on every connection.
    :param connect_timeout: seconds opening a connection may take (default 0.5).
    :param breaker_failures: consecutive failed calls that open a primary's breaker.
    :param breaker_cooldown: seconds an open breaker waits before its probe.
    :param ssl: connect with TLS (``rediss+cluster://``).
    :param connection_kwargs: further options for every connection (``password``,
        ``username``, ``ssl_ca_certs``, ...).

    See the module documentation for routing, topology changes and failures.
    """

    def __init__(
        self,
        startup_nodes: Iterable[tuple[str, int]] | Any,
        *,
        buckets: int = DEFAULT_CLUSTER_BUCKETS,
        max_connections: int = 50,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        breaker_failures: int = 3,
        breaker_cooldown: float = 1.0,
        ssl: bool = False,
        **connection_kwargs: Any,
    ) -> None:
        if type(buckets) is not int or not 1 <= buckets <= 4096:
            raise ConfigurationError(f"buckets must be an int from 1 to 4096, got {buckets!r}")
        check_connection_options(max_connections, socket_timeout, connect_timeout)
        # Checked now, so a bad setting fails here rather than at the first call.
        CircuitBreaker(breaker_failures, breaker_cooldown)
        connection_class: type[Connection] = SSLConnection if ssl else Connection
        if isinstance(startup_nodes, aioredis.RedisCluster):
            manager = startup_nodes.nodes_manager
            seeds = [(node.host, int(node.port)) for node in manager.startup_nodes.values()]
            given = dict(manager.connection_kwargs)
            if given.get("connection_class") is SSLConnection:
                connection_class = SSLConnection
            connection_kwargs = {
                **{k: v for k, v in given.items() if k in _PASSED_ON and v is not None},
                **connection_kwargs,
            }
        else:
            try:
                seeds = [(str(host), int(port)) for host, port in startup_nodes]
            except (TypeError, ValueError):
                raise ConfigurationError(
                    "startup_nodes must be (host, port) pairs or a redis.asyncio.RedisCluster, "
                    f"got {startup_nodes!r:.80}"
                ) from None
        if not seeds:
            raise ConfigurationError("RedisClusterBackend needs at least one startup node (host, port)")
        unknown = sorted(set(connection_kwargs) - _PASSED_ON)
        if unknown:
            raise ConfigurationError(
                f"unknown connection option(s) {unknown} for RedisClusterBackend; known: {sorted(_PASSED_ON)}"
            )
        self._seeds: list[tuple[str, int]] = list(dict.fromkeys(seeds))
        self._buckets = buckets
        self._max = max_connections
        self._socket_timeout = float(socket_timeout)
        self._connect_timeout = float(connect_timeout)
        self._breaker_failures = breaker_failures
        self._breaker_cooldown = breaker_cooldown
        self._connection_class = connection_class
        self._connection_kwargs = connection_kwargs
        # slot -> the primary holding it (None before the first read of the slot map).
        self._owners: list[_Primary | None] | None = None
        self._primaries: dict[str, _Primary] = {}
        # The primaries holding slots now (those of _owners).
        self._serving: list[_Primary] = []
        # Namespace -> the slot of each of its buckets.
        self._slots: dict[str, tuple[int, ...]] = {}
        self._refresh_lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = -float("inf")
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisClusterBackend:
        """A backend for ``redis+cluster://[user:password@]host:port[,host:port...]/`` (or
        ``rediss+cluster://`` for TLS).

        Query parameters: ``buckets``, ``max_connections``, ``socket_timeout``,
        ``socket_connect_timeout``, ``breaker_failures``, ``breaker_cooldown``, and with
        ``rediss+cluster://`` those of redis-py's ``rediss://`` URLs for TLS:
        ``ssl_ca_certs`` (the CA file to verify the nodes with, e.g. a private CA),
        ``ssl_certfile`` and ``ssl_keyfile`` (a client certificate), ``ssl_cert_reqs``
        (``none``, ``optional`` or ``required``, the default) and ``ssl_check_hostname``
        (``true``, the default, or ``false``; also ``1``/``0``, ``yes``/``no``). They win
        over the keyword arguments, which are those of the constructor; the TLS ones
        reach every connection (to each primary, and the invalidation feed's).

        ::

            RedisClusterBackend.from_url("rediss+cluster://10.0.0.1:7000/?ssl_ca_certs=/etc/redis/ca.pem")

        :raises ConfigurationError: for an unknown parameter or a bad value (naming it and
            what it accepts), and for TLS options without ``rediss+cluster://``.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis+cluster", "rediss+cluster"):
            raise ConfigurationError(
                f"unsupported Redis Cluster URL {url!r}: use redis+cluster:// or rediss+cluster://"
            )
        userinfo, _, hosts = parts.netloc.rpartition("@")
        seeds: list[tuple[str, int]] = []
        for item in hosts.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host:
                host, port = port, "6379"
            try:
                seeds.append((host.strip("[]"), int(port)))
            except ValueError:
                raise ConfigurationError(f"invalid host:port {item!r} in Redis Cluster URL {url!r}") from None
        if parts.path not in ("", "/", "/0"):
            raise ConfigurationError(f"a Redis Cluster has database 0 only; drop {parts.path!r} from {url!r}")
        if userinfo:
            user, sep, password = userinfo.partition(":")
            if sep:
                options.setdefault("password", unquote(password))
            if user:
                options.setdefault("username", unquote(user))
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - _URL_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown parameter(s) {unknown} in Redis Cluster URL {url!r}; known: {sorted(_URL_OPTIONS)}"
            )
        converters: dict[str, tuple[str, Callable[[str], Any]]] = {
            "buckets": ("buckets", int),
            "max_connections": ("max_connections", int),
            "socket_timeout": ("socket_timeout", float),
            "socket_connect_timeout": ("connect_timeout", float),
            "breaker_failures": ("breaker_failures", int),
            "breaker_cooldown": ("breaker_cooldown", float),
        }
        tls = scheme == "rediss+cluster"
        plain_tls = sorted({n for n in [*query, *options] if n in _TLS_URL_OPTIONS or n.startswith("ssl_")})
        if plain_tls and not tls:
            raise ConfigurationError(
                f"TLS option(s) {plain_tls} with a redis+cluster:// URL, which connects without TLS: "
                "use rediss+cluster://"
            )
        for name, raw in query.items():
            if name in _TLS_URL_OPTIONS:
                options[name] = _tls_option(name, raw)
                continue
            keyword, convert = converters[name]
            try:
                options[keyword] = convert(raw)
            except ValueError:
                raise ConfigurationError(f"{name} in {url!r} must be a number, got {raw!r}") from None
        return cls(seeds, ssl=tls, **options)

    @property
    def buckets(self) -> int:
        """Buckets per namespace (each has its own tag tokens)."""
        return self._buckets

    def invalidation_feed(self) -> RedisFeed:
        """A :class:`~tagcache.backends.feed.RedisFeed` over the cluster's nodes (a ``PUBLISH``
        on any node reaches the subscribers of all), for :class:`~tagcache.LocalCache`."""
        known = [p.address for p in self._primaries.values()]
        addresses = list(dict.fromkeys([*self._seeds, *known]))
        return RedisFeed(
            [{"host": host, "port": port, **self._connection_kwargs} for host, port in addresses],
            connection_class=self._connection_class,
            socket_timeout=self._socket_timeout,
            connect_timeout=self._connect_timeout,
        )

    # -- topology ---------------------------------------------------------------

    def _space(self, ns: str) -> tuple[int, ...]:
        slots = self._slots.get(ns)
        if slots is None:
            if not ns or "{" in ns or "}" in ns:
                raise ConfigurationError(
                    f"Redis namespace {ns!r} must be non-empty and must not contain '{{' or '}}'"
                )
            slots = self._slots[ns] = tuple(key_slot(bucket_hash_tag(ns, b)) for b in range(self._buckets))
        return slots

    def _holds(self, primary: _Primary) -> Callable[[str, int], bool]:
        """The bucket filter of ``primary``'s backend: the buckets of its slots, now."""

        def holds(ns: str, b: int) -> bool:
            owners = self._owners
            return owners is not None and owners[self._space(ns)[b]] is primary

        return holds

    def _new_primary(self, name: str, address: tuple[str, int]) -> _Primary:
        host, port = address
        pool = aioredis.BlockingConnectionPool(
            host=host,
            port=port,
            max_connections=self._max,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._connect_timeout,
            connection_class=self._connection_class,
            **self._connection_kwargs,
        )
        primary = _Primary(name, address)
        primary.backend = RedisBackend(
            aioredis.Redis(connection_pool=pool),
            buckets=self._buckets,
            max_connections=self._max,
            owns_client=True,
            socket_timeout=self._socket_timeout,
            connect_timeout=self._connect_timeout,
            breaker=CircuitBreaker(self._breaker_failures, self._breaker_cooldown, name=f"Redis at {name}"),
            bucket_filter=self._holds(primary),
        )
        return primary

    async def _read_slots(self, address: tuple[str, int]) -> list[tuple[int, int, tuple[str, int]]]:
        """``(first slot, last slot, primary address)`` ranges, from ``CLUSTER SLOTS`` of one node."""
        host, port = address
        pool = aioredis.ConnectionPool(
            host=host,
            port=port,
            max_connections=1,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._connect_timeout,
            connection_class=self._connection_class,
            **self._connection_kwargs,
        )
        client = aioredis.Redis(connection_pool=pool)
        try:
            reply: Any = await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        finally:
            await client.aclose()
            await pool.disconnect()
        ranges = []
        for item in reply:
            first, last, node = int(item[0]), int(item[1]), item[2]
            node_host = _text(node[0]) or host  # an empty host means the node asked
            ranges.append((first, last, (node_host, int(node[1]))))
        return ranges

    async def _discover(self) -> None:
        """Read the slot map from the first seed (or known primary) that answers."""
        loop = asyncio.get_running_loop()
        if self._refresh_lock is None or self._lock_loop is not loop:  # a lock per event loop
            self._refresh_lock, self._lock_loop = asyncio.Lock(), loop
        async with self._refresh_lock:
            if self._owners is not None and time.monotonic() - self._refreshed_at < _REFRESH_INTERVAL:
                return  # another caller just read it
            candidates = list(dict.fromkeys([*(p.address for p in self._primaries.values()), *self._seeds]))
            failures: list[str] = []
            last: Exception | None = None
            for address in candidates:
                try:
                    ranges = await self._read_slots(address)
                except Exception as exc:  # try the next node; all failures are reported
                    failures.append(f"{address[0]}:{address[1]}: {type(exc).__name__}: {exc}")
                    last = exc
                    continue
                if ranges:
                    self._apply(ranges)
                    return
                failures.append(f"{address[0]}:{address[1]}: no slots assigned")
            raise BackendError(
                "Redis Cluster: no node answered CLUSTER SLOTS (" + "; ".join(failures) + ")"
            ) from last

    def _apply(self, ranges: Sequence[tuple[int, int, tuple[str, int]]]) -> None:
        owners: list[_Primary | None] = [None] * _SLOTS
        for first, last, address in ranges:
            name = f"{address[0]}:{address[1]}"
            primary = self._primaries.get(name)
            if primary is None:
                primary = self._primaries[name] = self._new_primary(name, address)
            for slot in range(first, last + 1):
                owners[slot] = primary
        previous = self._owners
        self._owners = owners
        self._serving = list({id(p): p for p in owners if p is not None}.values())
        self._refreshed_at = time.monotonic()
        if previous is not None and any(a is not b for a, b in zip(previous, owners, strict=True)):
            logger.warning(
                "tagcache: Redis Cluster slot map changed; primaries now: %s",
                ", ".join(sorted({p.name for p in owners if p is not None})),
            )

    def _refresh_soon(self) -> None:
        """Read the slot map again in the background (at most every 0.25 s)."""
        if self._closed or time.monotonic() - self._refreshed_at < _REFRESH_INTERVAL:
            return
        task = self._refresh_task
        if task is not None and not task.done():
            return
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self._discover()
        except Exception as exc:  # the next failing call tries again
            logger.debug("tagcache: reading the Redis Cluster slot map failed: %s", exc)

    async def _primary_of(self, ns: str, kb: bytes) -> _Primary:
        owners = self._owners
        if owners is None:
            await self._discover()
            owners = self._owners
            assert owners is not None
        slots = self._slots.get(ns) or self._space(ns)
        primary = owners[slots[bucket_index(kb, self._buckets)]]
        if primary is None:
            raise BackendError(f"Redis Cluster: no primary holds the slot of key {kb!r}'s bucket")
        return primary

    def _known_primary(self, ns: str, key: str) -> _Primary | None:
        """``key``'s primary when the slot map and the namespace are known already, else ``None``."""
        owners, slots = self._owners, self._slots.get(ns)
        if owners is None or slots is None:
            return None
        return owners[slots[bucket_index(key.encode(), self._buckets)]]

    async def _routed(self, ns: str, key: str, call: Callable[[RedisBackend], Awaitable[T]]) -> T:
        """Run ``call`` on the backend of ``key``'s primary; after a redirection, read the
        slot map and run it once more on the new owner (a redirected command ran nowhere)."""
        primary = await self._primary_of(ns, key.encode())
        try:
            return await call(primary.backend)
        except BackendError as exc:
            self._failed(exc)
        return await self._redirected_call(ns, key, call)

    def _failed(self, exc: BackendError) -> None:
        """Re-raise ``exc`` unless it is a redirection; read the slot map soon if the
        primary seems to be failing (a replica may be taking over)."""
        if not _redirected(exc):
            if _node_failed(exc):
                self._refresh_soon()
            raise exc

    async def _redirected_call(self, ns: str, key: str, call: Callable[[RedisBackend], Awaitable[T]]) -> T:
        """After a redirection: read the slot map now and run ``call`` on the new owner."""
        self._refreshed_at = -float("inf")
        await self._discover()
        return await call((await self._primary_of(ns, key.encode())).backend)

    async def _everywhere(self, call: Callable[[RedisBackend], Awaitable[T]]) -> list[T]:
        """Run ``call`` on every primary's backend concurrently; raise the first failure.

        After a redirection (the slot map changed: a primary ran ``call`` on buckets it
        no longer holds, and those commands ran nowhere), the slot map is read again and
        ``call`` runs once more everywhere; every use of this is safe to repeat."""
        if self._owners is None:
            await self._discover()
        for attempt in range(2):
            primaries = self._current_primaries()
            results = await asyncio.gather(*(call(p.backend) for p in primaries), return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            if not failures:
                return results  # type: ignore[return-value]  # no exception among them
            if attempt == 0 and all(isinstance(f, BackendError) and _redirected(f) for f in failures):
                self._refreshed_at = -float("inf")
                await self._discover()
                continue
            for failure in failures:
                if isinstance(failure, BackendError) and (_redirected(failure) or _node_failed(failure)):
                    self._refresh_soon()
            raise failures[0]
        raise AssertionError("unreachable")  # pragma: no cover

    def _current_primaries(self) -> list[_Primary]:
        """The primaries holding slots, as of the last read of the slot map."""
        return self._serving

    # -- the Backend protocol -----------------------------------------------------

    async def get(self, ns: str, key: str) -> bytes | None:
        """See :meth:`RedisBackend.get`."""
        primary = self._known_primary(ns, key)  # the hit path: no closure, one frame less
        if primary is None:
            return await self._routed(ns, key, lambda b: b.get(ns, key))
        try:
            return await primary.backend.get(ns, key)
        except BackendError as exc:
            self._failed(exc)
        return await self._redirected_call(ns, key, lambda b: b.get(ns, key))

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """See :meth:`RedisBackend.fetch`."""
        primary = self._known_primary(ns, key)
        if primary is None:
            return await self._routed(ns, key, lambda b: b.fetch(ns, key, tags, lease_ttl))
        try:
            return await primary.backend.fetch(ns, key, tags, lease_ttl)
        except BackendError as exc:
            self._failed(exc)
        return await self._redirected_call(ns, key, lambda b: b.fetch(ns, key, tags, lease_ttl))

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """See :meth:`RedisBackend.lease`."""
        return await self._routed(ns, key, lambda b: b.lease(ns, key, tags, lease_ttl))

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        """See :meth:`RedisBackend.set`."""
        await self._routed(ns, key, lambda b: b.set(ns, key, payload, ttl, tags))

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
        """See :meth:`RedisBackend.fill`."""
        return await self._routed(
            ns, key, lambda b: b.fill(ns, key, payload, ttl, tags, tokens, lease, epoch)
        )

    async def release(self, ns: str, key: str, lease: str) -> None:
        """See :meth:`RedisBackend.release`."""
        await self._routed(ns, key, lambda b: b.release(ns, key, lease))

    async def delete(self, ns: str, key: str) -> bool:
        """See :meth:`RedisBackend.delete`."""
        return await self._routed(ns, key, lambda b: b.delete(ns, key))

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        """Delete the tags' tokens in every bucket: one pipelined round trip per primary,
        all primaries at once.

        When some primaries fail and others applied it, raises
        :class:`~tagcache.PartialInvalidationError` naming the buckets of the failed
        ones (the cache re-applies it there, with :meth:`invalidate_scope`, and keeps
        serving the other buckets); when all fail, the first failure."""
        if tags:
            await self._invalidate(ns, tags, range(self._buckets))

    async def invalidate_scope(self, ns: str, tags: Sequence[str], scope: frozenset[int]) -> None:
        """:meth:`invalidate` on the buckets in ``scope`` only, on their primaries now."""
        if tags and scope:
            await self._invalidate(ns, tags, sorted(scope))

    def scope_of(self, ns: str, key: str) -> int:
        """The bucket of ``key`` in namespace ``ns`` (what :meth:`invalidate_scope` takes)."""
        return bucket_index(key.encode(), self._buckets)

    async def _invalidate(self, ns: str, tags: Sequence[str], buckets: Sequence[int]) -> None:
        """Invalidate ``tags`` in ``buckets``: each primary gets the buckets it holds, as of
        one reading of the slot map, so every bucket goes to exactly one primary."""
        space = self._space(ns)
        if self._owners is None:
            await self._discover()
        for attempt in range(2):
            owners = self._owners
            assert owners is not None
            parts: dict[int, tuple[_Primary, list[int]]] = {}
            orphans: list[int] = []
            for b in buckets:
                primary = owners[space[b]]
                if primary is None:
                    orphans.append(b)
                else:
                    parts.setdefault(id(primary), (primary, []))[1].append(b)
            plan = list(parts.values())
            results = await asyncio.gather(
                *(p.backend.invalidate(ns, tags, buckets=part) for p, part in plan), return_exceptions=True
            )
            failed = [
                (part, r) for (_, part), r in zip(plan, results, strict=True) if isinstance(r, BaseException)
            ]
            if not failed and not orphans:
                return
            errors = [r for _, r in failed]
            if attempt == 0 and (
                orphans or all(isinstance(e, BackendError) and _redirected(e) for e in errors)
            ):
                self._refreshed_at = -float("inf")
                await self._discover()
                continue
            for error in errors:
                if isinstance(error, BackendError) and (_redirected(error) or _node_failed(error)):
                    self._refresh_soon()
            for error in errors:
                if not isinstance(error, Exception):
                    raise error  # cancelled: where it was applied is not known
            scope = frozenset(orphans).union(*(part for part, _ in failed))
            first: BaseException = errors[0] if errors else BackendError("Redis Cluster: no primary holds it")
            if len(failed) == len(plan):
                if isinstance(first, BackendError):
                    raise first
                raise BackendError(f"Redis Cluster: invalidation failed: {first}") from first
            raise PartialInvalidationError(
                f"invalidation of {list(tags)} in namespace {ns!r} failed on {len(scope)} of its "
                f"{self._buckets} buckets ({type(first).__name__}: {first}); applied on the others",
                scope,
            ) from first
        raise AssertionError("unreachable")  # pragma: no cover

    def watch(self, ns: str, key: str) -> FillWatch:
        """See :meth:`RedisBackend.watch`; the watch is made on the key's primary."""
        return _ClusterWatch(self, ns, key)

    async def peek(self, ns: str, key: str) -> EntryInfo | None:
        """See :meth:`RedisBackend.peek`."""
        return await self._routed(ns, key, lambda b: b.peek(ns, key))

    async def clear(self, ns: str) -> int:
        """Remove every key of namespace ``ns`` on every primary; return the entries removed."""
        self._space(ns)
        return sum(await self._everywhere(lambda b: b.clear(ns)))

    async def keys(self, ns: str, pattern: str, limit: int | None) -> list[str]:
        """Keys of ``ns`` matching ``pattern`` on every primary, up to ``limit`` in all."""
        if limit is not None and limit <= 0:
            return []
        self._space(ns)
        found: dict[str, None] = {}
        for keys in await self._everywhere(lambda b: b.keys(ns, pattern, limit)):
            found.update(dict.fromkeys(keys))
        listed = list(found)
        return listed if limit is None else listed[:limit]

    async def info(self) -> BackendInfo:
        """Key counts, memory and evictions added up over the primaries; ``extra`` has
        the first primary's settings and ``primaries``, the number of primaries."""
        infos = await self._everywhere(lambda b: b.info())

        def total(values: Iterable[int | None]) -> int | None:
            known = [v for v in values if v is not None]
            return sum(known) if known else None

        extra: dict[str, object] = dict(infos[0].extra) if infos else {}
        for name in ("expired_keys", "keyspace_hits", "keyspace_misses", "maxmemory"):
            figures = [i.extra.get(name) for i in infos]
            if all(isinstance(f, int) for f in figures):
                extra[name] = sum(f for f in figures if isinstance(f, int))
        extra["primaries"] = len(infos)
        return BackendInfo(
            keys=total(i.keys for i in infos),
            memory_bytes=total(i.memory_bytes for i in infos),
            evictions=total(i.evictions for i in infos),
            extra=extra,
        )

    def health(self) -> Mapping[str, object]:
        """The breakers of the primaries: ``breaker`` is ``"open"`` when any is open, else
        ``"half-open"`` when any is, else ``"closed"``; ``breaker_opened`` adds up the times
        they opened; ``primaries`` maps each primary to its breaker's state."""
        states = {p.name: p.backend.breaker.state for p in self._current_primaries()}
        worst = "closed"
        for state in ("half-open", "open"):
            if state in states.values():
                worst = state
        return {
            "breaker": worst,
            "breaker_opened": sum(p.backend.breaker.opened for p in self._primaries.values()),
            "primaries": states,
            "socket_timeout": self._socket_timeout,
            "connect_timeout": self._connect_timeout,
        }

    async def aclose(self) -> None:
        """Close the connections to every primary. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task = self._refresh_task
        if task is not None and not task.done():
            task.cancel()
        for primary in list(self._primaries.values()):
            await primary.backend.aclose()

    async def __aenter__(self) -> RedisClusterBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
