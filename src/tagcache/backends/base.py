"""The :class:`Backend` protocol: the small storage interface under :class:`tagcache.Cache`.

A backend stores opaque payloads (``bytes``, already encoded by the cache's
codec) and implements the tag index described in ``docs/design.md``:

* every tag has a random **version token**; an entry stores the token each of
  its tags had when its value was read from the source;
* a read returns the payload only if every stored token still equals the tag's
  current token (a missing token is a mismatch, so eviction can only cause a
  miss, never a false hit);
* invalidating a tag replaces or removes its token: O(1) in the number of
  entries that carry it;
* a fill after a miss is a compare-and-set against the token snapshot taken at
  miss time, guarded by a per-key **lease**.

Every key a backend writes has a TTL, except an entry written with
``ttl=None`` and the tokens of its tags, which persist until invalidated,
deleted or evicted.

All methods take the cache's ``ns`` (namespace) first, so one backend (one
connection pool) can serve several caches. Keys and tags arrive already
validated (:mod:`tagcache.tags`); TTLs arrive as positive seconds or ``None``.
Backends raise :class:`tagcache.BackendError` for storage failures, chaining
the original exception.

:class:`Backend` holds only the operations every backend must implement.
Everything else is an optional capability, a small protocol of its own that
tagcache detects with ``isinstance`` and does without when it is missing:

* :class:`SupportsWatch`: wait for another caller's fill without polling;
* :class:`SupportsPeek`: :meth:`tagcache.Cache.peek`;
* :class:`SupportsKeys`: :meth:`tagcache.Cache.keys`;
* :class:`SupportsInfo`: backend figures in :meth:`tagcache.Cache.stats`;
* :class:`NowaitReads`: synchronous reads, for an in-process store;
* :class:`HealthReporting`: health figures in :meth:`tagcache.Cache.stats`.

:class:`tagcache.testing.BackendContract` is the executable definition of
this interface: subclass it in a test module to check a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, runtime_checkable

__all__ = [
    "Backend",
    "BackendInfo",
    "EntryInfo",
    "FillWatch",
    "HealthReporting",
    "InvalidationFeed",
    "LocalReads",
    "Lookup",
    "NowaitReads",
    "SupportsInfo",
    "SupportsInvalidationFeed",
    "SupportsKeys",
    "SupportsPeek",
    "SupportsWatch",
]


class Lookup:
    """The result of :meth:`Backend.fetch`.

    On a hit, ``payload`` is set and the other fields are empty. On a miss,
    ``payload`` is ``None``, ``tokens`` holds the current token of each
    requested tag (in the order requested; created when missing) and
    ``lease`` is this caller's lease on the key, or ``None`` when another
    caller holds it.

    A value object: compared by its fields, never changed after construction.
    A plain slotted class rather than a frozen dataclass, because one is built
    on every read-through call, hits included (a quarter of the cost).
    """

    __slots__ = ("epoch", "lease", "payload", "tokens")

    def __init__(
        self,
        payload: bytes | None,
        tokens: tuple[str, ...] = (),
        lease: str | None = None,
        epoch: str = "",
    ) -> None:
        self.payload = payload
        self.tokens = tokens
        self.lease = lease
        #: On a miss: the namespace's (bucket's) invalidation epoch, a random value
        #: replaced by every :meth:`Backend.invalidate`. A fill given it stores only
        #: if no tag at all was invalidated since (see :meth:`Backend.fill`).
        self.epoch = epoch

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Lookup):
            return NotImplemented
        return (self.payload, self.tokens, self.lease, self.epoch) == (
            other.payload,
            other.tokens,
            other.lease,
            other.epoch,
        )

    def __hash__(self) -> int:
        return hash((self.payload, self.tokens, self.lease, self.epoch))

    def __repr__(self) -> str:
        return (
            f"Lookup(payload={self.payload!r}, tokens={self.tokens!r}, "
            f"lease={self.lease!r}, epoch={self.epoch!r})"
        )


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """What :meth:`Backend.peek` reports about a stored entry."""

    payload: bytes
    #: Seconds until the entry expires, ``None`` if it has no expiry.
    ttl: float | None
    #: The tags the entry carries.
    tags: tuple[str, ...]
    #: ``True`` when every tag token still matches, i.e. a ``get`` would hit.
    valid: bool


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """Figures a backend knows about itself; ``None`` where it does not know.

    Figures are backend-wide: one backend may serve several namespaces (and a
    Redis database may hold other programs' keys). Only ``entries`` is split
    by namespace, and only where the backend can count without a scan.
    """

    #: Keys the whole backend holds, every namespace together. For Redis this is
    #: the database's ``DBSIZE``: all namespaces, tagcache's tag tokens, leases and
    #: generation keys, and any other program's keys in the same database.
    keys: int | None = None
    #: Bytes of memory used by stored data.
    memory_bytes: int | None = None
    #: Entries evicted to stay within memory limits.
    evictions: int | None = None
    #: Backend-specific figures.
    extra: Mapping[str, object] = field(default_factory=dict)
    #: Entries stored per namespace, where the backend can count them without a
    #: scan (:class:`~tagcache.backends.MemoryBackend` can); ``None`` otherwise
    #: (:class:`~tagcache.backends.RedisBackend`: counting one namespace's keys
    #: would be a ``SCAN`` of the whole database). A namespace with no entries
    #: may be absent (read it as ``0``).
    entries: Mapping[str, int] | None = None


class FillWatch(Protocol):
    """Interest in the next fill of one key, from :meth:`Backend.watch`.

    Used by a caller that found the key's lease held by another caller (in
    this or another process): it enters the watch, reads the key once more
    (so nothing signalled before the watch was ready is missed), then waits.
    Waiting sends nothing to the server.
    """

    async def wait(self, timeout: float) -> bool:
        """Wait until the key is signalled (filled, fill failed, lease released,
        set or deleted) after the watch was entered or since the previous
        ``wait`` returned ``True``. Return ``False`` after ``timeout`` seconds
        without a signal (the lease holder may have died: its lease expires)."""

    async def __aenter__(self) -> FillWatch:
        """Make the signal channel ready (on Redis: the subscription is confirmed)
        and register interest in the key."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Drop the interest in the key."""


@runtime_checkable
class Backend(Protocol):
    """Storage for :class:`tagcache.Cache`: the core operations. Implement this to add a backend.

    These ten methods are all a backend must have. Implementations must behave
    like :class:`tagcache.backends.MemoryBackend`, and
    :class:`tagcache.testing.BackendContract` is the executable definition of
    that behaviour: subclass it in a test module, give it a ``backend``
    fixture returning a fresh instance, and run pytest.

    Optional capabilities are separate protocols (:class:`SupportsWatch`,
    :class:`SupportsPeek`, :class:`SupportsKeys`, :class:`SupportsInfo`,
    :class:`NowaitReads`, :class:`HealthReporting`): implement their methods
    as well and tagcache uses them. Each one says what tagcache does without it.
    """

    async def get(self, ns: str, key: str) -> bytes | None:
        """Return the payload of ``key`` if present and all its tag tokens match, else ``None``."""

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """Read ``key``; on a miss, snapshot the tokens of ``tags`` and try to take the fill lease.

        Missing tokens are created (with a TTL of at least ``lease_ttl``). The
        lease, if granted, expires after ``lease_ttl`` seconds. A backend with
        :class:`SupportsWatch` also marks the key as waited for when it finds
        the lease held by another caller.
        """

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """Snapshot the tokens of ``tags`` and try to take the fill lease, whether or not
        ``key`` holds a value (for refreshing an entry before or after it goes stale).

        Returns ``Lookup(None, tokens, lease_or_None)``, like a miss of :meth:`fetch`,
        but never marks the key as waited for.
        """

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        """Store ``payload`` unconditionally, stamped with the current tokens of ``tags``.

        Clears any lease on ``key``, so an in-flight fill of an older value fails.
        """

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
        and every tag's current token equals ``tokens``. Releases the lease either way.

        With ``epoch`` (from the :class:`Lookup` of the miss), also store only if
        the key's invalidation epoch is unchanged: no tag was invalidated since
        the miss. Used for tags known only once the value is computed, whose
        tokens could not be snapshot before.

        Returns ``True`` if the payload was stored.
        """

    async def release(self, ns: str, key: str, lease: str) -> None:
        """Give up ``lease`` on ``key`` without writing (the loader failed or was cancelled)."""

    async def delete(self, ns: str, key: str) -> bool:
        """Remove ``key`` and its lease. Returns ``True`` if an entry was stored."""

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        """Invalidate every entry carrying any of ``tags`` (replace or drop their tokens)
        and replace the namespace's invalidation epoch."""

    async def clear(self, ns: str) -> int:
        """Remove every key of namespace ``ns`` (entries, tokens, leases); return entries removed."""

    async def aclose(self) -> None:
        """Release connections and other resources. Safe to call twice."""


@runtime_checkable
class SupportsWatch(Protocol):
    """Optional capability of a backend that can wake a caller waiting for another caller's fill.

    A caller whose :meth:`Backend.fetch` finds the key's lease held by another
    caller (in this or another process) waits for that caller's fill. With
    ``watch`` it is woken as soon as the key is filled or released; without
    it, tagcache polls the key (reads it again at intervals) until it holds
    a value or its lease is free: correct, only slower to notice and costlier.
    """

    def watch(self, ns: str, key: str) -> FillWatch:
        """Return a :class:`FillWatch` on ``key``: enter it, read the key again, then wait.

        A :meth:`Backend.fetch` that finds the lease held by another caller
        notes, in the same atomic step, that the key is waited for;
        :meth:`Backend.fill` (whether it stores or not), :meth:`Backend.release`,
        :meth:`Backend.set` and :meth:`Backend.delete` of a waited-for key then
        signal its watchers.
        """


@runtime_checkable
class SupportsPeek(Protocol):
    """Optional capability of a backend that can show a stored entry without reading it as a hit.

    Without ``peek``, :meth:`tagcache.Cache.peek` raises an error saying the
    backend cannot peek; reads and writes are not affected.
    """

    async def peek(self, ns: str, key: str) -> EntryInfo | None:
        """Return the stored entry with its TTL, tags and validity, or ``None``.

        Writes nothing, and an entry whose tags were invalidated is still shown
        (with ``valid=False``) until it is removed.
        """


@runtime_checkable
class SupportsKeys(Protocol):
    """Optional capability of a backend that can list the keys of a namespace.

    Without ``keys``, :meth:`tagcache.Cache.keys` raises an error saying the
    backend cannot list keys; reads and writes are not affected.
    """

    async def keys(self, ns: str, pattern: str, limit: int | None) -> list[str]:
        """Return up to ``limit`` (``None``: all) stored keys of ``ns`` matching the
        Redis glob ``pattern``; never keys of other namespaces, tokens or leases."""


@runtime_checkable
class SupportsInfo(Protocol):
    """Optional capability of a backend that knows figures about its own size.

    Without ``info``, :meth:`tagcache.Cache.stats` reports the backend's
    figures (keys, memory, evictions) as ``None``; the cache's own counters
    are reported as usual.
    """

    async def info(self) -> BackendInfo:
        """Return what the backend knows about its size and evictions."""


@runtime_checkable
class NowaitReads(Protocol):
    """Optional capability of a backend whose reads never wait for I/O (an in-process store).

    When a backend has ``get_nowait``, :meth:`tagcache.Cache.get` calls it
    instead of awaiting :meth:`Backend.get`, saving a coroutine per hit. It
    must return exactly what :meth:`Backend.get` would.
    """

    def get_nowait(self, ns: str, key: str) -> bytes | None:
        """Synchronous :meth:`Backend.get`."""


@runtime_checkable
class HealthReporting(Protocol):
    """Optional capability of a backend that knows its own health without a round trip
    (for example the state of its circuit breaker).

    :meth:`tagcache.Cache.stats` adds what :meth:`health` returns to its report.
    """

    def health(self) -> Mapping[str, object]:
        """Return figures about the backend's health, read from process memory only.

        Backends with a circuit breaker report at least ``breaker`` (``"closed"``,
        ``"open"`` or ``"half-open"``), ``breaker_opened`` (times it opened) and
        ``breaker_open_since`` (Unix time it opened, or ``None`` while closed).
        """


@runtime_checkable
class LocalReads(Protocol):
    """Optional capability of a backend that keeps copies of some entries in process memory
    (an L1 in front of a shared store, :class:`~tagcache.backends.local.LocalLayer`).

    :meth:`get_local` answers from those copies without waiting; ``None`` means
    "not known here", not a miss: the caller then awaits :meth:`Backend.get` (or
    :meth:`Backend.fetch`), which asks the shared store.
    """

    def get_local(self, ns: str, key: str) -> bytes | None:
        """The payload of ``key`` held in process memory, or ``None``."""


@runtime_checkable
class ScopedInvalidation(Protocol):
    """Optional capability of a backend spread over several servers, whose invalidation
    can fail on some of them only (it then raises :class:`~tagcache.PartialInvalidationError`
    naming the failed part of the namespace, its *scope*: a set of bucket numbers).

    With it, a cache whose invalidation failed in part bypasses itself only for the
    keys of the failed part, and re-applies the invalidation there only.
    """

    def scope_of(self, ns: str, key: str) -> int:
        """The bucket of namespace ``ns`` that ``key`` belongs to (no I/O)."""

    async def invalidate_scope(self, ns: str, tags: Sequence[str], scope: frozenset[int]) -> None:
        """:meth:`Backend.invalidate` restricted to the buckets in ``scope``. Raises
        :class:`~tagcache.PartialInvalidationError` (a narrower scope) when it fails on
        part of them, :class:`~tagcache.BackendError` when it fails on all."""


@runtime_checkable
class InvalidationFeed(Protocol):
    """A channel through which every process using a shared store learns of its changes.

    Used by :class:`~tagcache.backends.local.LocalLayer` to keep the copies it
    holds in process memory coherent: each process publishes what it changed
    (keys written or deleted, tags invalidated, namespaces cleared) and hears
    what the others changed, pushed rather than polled.
    """

    async def publish(self, message: bytes) -> None:
        """Send ``message`` to every subscriber (this process's included). Raises
        :class:`~tagcache.BackendError` when it cannot be sent."""

    async def run(self, on_message: Callable[[bytes], None], on_state: Callable[[bool], None]) -> None:
        """Subscribe and deliver messages until cancelled, reconnecting as needed.

        ``on_state(True)`` is called once the subscription is confirmed (no
        message published from then on is missed while it lasts),
        ``on_state(False)`` as soon as it is lost or cannot be trusted (a
        connection error, a server that stops answering pings).
        """

    async def aclose(self) -> None:
        """Close the feed's connections. Safe to call twice."""


@runtime_checkable
class SupportsInvalidationFeed(Protocol):
    """Optional capability of a shared backend that can give an :class:`InvalidationFeed`
    (Redis pub/sub), needed to put a :class:`~tagcache.LocalCache` in front of it."""

    def invalidation_feed(self) -> InvalidationFeed:
        """A new feed over the backend's server(s), with connections of its own."""
