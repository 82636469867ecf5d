"""An in-process :class:`~tagcache.backends.base.Backend`, with the same semantics as the Redis backend.

Everything lives in plain dictionaries of one process: nothing is shared
between processes, and nothing survives a restart. Use it for tests, for
single-process applications, or as a fast local cache.

How it works:

* Per namespace, an entry per key (payload, tags, the tag tokens it was
  stamped with, absolute expiry), a version token per tag and a lease per key.
  Namespaces are fully separate.
* Reads compare the tokens an entry was stamped with against the current ones;
  invalidating a tag drops its token, so its cost does not depend on how many
  entries carry the tag.
* The number of entries and their payload and key bytes are bounded across all
  namespaces; the least recently used entries are evicted to make room.
* Expiry is lazy: an expired entry, token or lease is treated as absent
  wherever it is touched. To keep memory bounded by live data without timers
  or full scans, every record with an expiry is also filed in a bucket for its
  expiry second; each write reclaims the buckets whose second has passed, each
  bucket once (amortised O(1) per record).

All time decisions use the ``clock`` given to the constructor
(:func:`time.monotonic` by default), so tests can drive time by hand.

Callers waiting for another caller's fill (:meth:`MemoryBackend.watch`) are
woken directly by the ``fill``, ``release``, ``set`` or ``delete`` of the key.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import TracebackType

from tagcache.backends._signals import KeySignal, SignalWatch
from tagcache.backends.base import BackendInfo, EntryInfo, FillWatch, Lookup
from tagcache.exceptions import ConfigurationError
from tagcache.tags import glob_to_regex, new_token

__all__ = ["MemoryBackend"]

#: Seconds a token created or refreshed by :meth:`MemoryBackend.fetch` lives
#: beyond the lease, so a fill that holds a valid lease never finds the
#: snapshot token expired.
_TOKEN_MARGIN = 5.0


class _Token:
    """The current version token of one tag of one namespace."""

    __slots__ = ("expires", "ns", "refs", "tag", "value")

    def __init__(self, ns: str, tag: str, value: str, expires: float | None) -> None:
        self.ns = ns
        self.tag = tag
        self.value = value
        self.expires = expires
        # Stored entries stamped with this record. A token without expiry
        # that no entry carries any more gets an expiry, so such tokens
        # cannot pile up.
        self.refs = 0


class _Lease:
    """The fill lease on one key of one namespace."""

    __slots__ = ("expires", "key", "ns", "value")

    def __init__(self, ns: str, key: str, value: str, expires: float) -> None:
        self.ns = ns
        self.key = key
        self.value = value
        self.expires = expires


class _Entry:
    """A stored payload with the token records it was stamped with."""

    __slots__ = ("expires", "hit", "key", "ns", "payload", "size", "stamp", "tags")

    def __init__(
        self,
        ns: str,
        key: str,
        payload: bytes,
        tags: tuple[str, ...],
        stamp: tuple[tuple[str, _Token], ...],
        expires: float | None,
        size: int,
    ) -> None:
        self.ns = ns
        self.key = key
        self.payload = payload
        self.tags = tags
        # (tag, token record) pairs. The entry is valid while every tag's
        # current record is the very same object: a replaced or dropped
        # token is a different object (or none), an extended one is not.
        self.stamp = stamp
        self.expires = expires
        self.size = size
        # The (immutable) Lookup that fetch returns on a hit, built on first use.
        self.hit: Lookup | None = None


_Record = _Entry | _Token | _Lease


class _Space:
    """Everything stored for one namespace."""

    __slots__ = ("entries", "epoch", "leases", "ns", "tokens")

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.entries: dict[str, _Entry] = {}
        self.tokens: dict[str, _Token] = {}
        self.leases: dict[str, _Lease] = {}
        # The invalidation epoch: replaced by every invalidate (see Backend.fill).
        self.epoch = new_token()


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"MemoryBackend {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ConfigurationError(f"MemoryBackend {name} must be a positive number, got {value}")
    return value


class MemoryBackend:
    """In-process storage for :class:`tagcache.Cache`, bounded and LRU-evicting.

    :param max_entries: most entries held, over all namespaces. When a write
        would exceed it, the least recently used entries are evicted.
    :param max_bytes: most bytes of payloads plus keys held, over all
        namespaces, or ``None`` for no byte limit. A single entry larger than
        this is not stored (and counted as an eviction).
    :param clock: a monotonic clock in seconds; every expiry decision uses it.
    :raises ConfigurationError: for a non-positive limit or a clock that is
        not callable.

    Tokens a ``fetch`` creates live ``lease_ttl`` plus a few seconds; a write
    extends the tokens of its tags to outlive the entry (forever for an entry
    without expiry), and never shortens them. The backend raises no errors in
    normal operation. It is also an async context manager that calls
    :meth:`aclose` on exit.

    Every method runs without awaiting, so each one is atomic with respect to
    other tasks of the event loop. The backend is not meant to be shared
    between threads.
    """

    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_bytes: int | None = 64 * 2**20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = _positive_int(max_entries, "max_entries")
        self._max_bytes = None if max_bytes is None else _positive_int(max_bytes, "max_bytes")
        if not callable(clock):
            raise ConfigurationError(
                f"MemoryBackend clock must be a callable returning seconds, got {type(clock).__name__}"
            )
        self._clock = clock
        self._spaces: dict[str, _Space] = {}
        # Every entry of every namespace, least recently used first.
        self._lru: OrderedDict[_Entry, None] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        # Expiry second -> records expiring within it; a min-heap of those
        # seconds (possibly with stale duplicates, see _file).
        self._buckets: dict[int, set[_Record]] = {}
        self._heap: list[int] = []
        # The longest lease granted so far: an unused token is kept at least
        # this long (plus a margin) so it outlives every snapshot of it.
        self._lease_horizon = 0.0
        # (ns, key) -> the signals of a key being watched.
        self._watched: dict[tuple[str, str], KeySignal] = {}

    # -- reads -------------------------------------------------------------

    async def get(self, ns: str, key: str) -> bytes | None:
        """Return the payload of ``key`` if present and all its tag tokens match, else ``None``."""
        return self.get_nowait(ns, key)

    def get_nowait(self, ns: str, key: str) -> bytes | None:
        """Return the payload of ``key`` if present and all its tag tokens match, else ``None``.

        The synchronous form of :meth:`get` (see :class:`~tagcache.backends.base.NowaitReads`).
        """
        space = self._spaces.get(ns)
        if space is None:
            return None
        entry = space.entries.get(key)
        if entry is None:
            return None
        expires = entry.expires
        if expires is not None:
            now = self._clock()
            if now >= expires:
                self._drop_entry(space, entry, now)
                return None
        tokens = space.tokens
        for tag, token in entry.stamp:
            if tokens.get(tag) is not token:
                return None
        self._lru.move_to_end(entry)
        return entry.payload

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """Read ``key``; on a miss, snapshot the tokens of ``tags`` and try to take the fill lease.

        Missing tokens are created, and existing ones extended, to live at
        least ``lease_ttl`` plus a few seconds. The lease, if granted, expires
        after ``lease_ttl`` seconds; ``lease`` is ``None`` when another caller
        holds an unexpired lease on ``key``.
        """
        now = self._clock()
        space = self._spaces.get(ns)
        if space is not None:
            entry = space.entries.get(key)
            if entry is not None:
                expires = entry.expires
                if expires is not None and now >= expires:
                    self._drop_entry(space, entry, now)
                else:
                    tokens = space.tokens
                    for tag, token in entry.stamp:
                        if tokens.get(tag) is not token:
                            break
                    else:
                        self._lru.move_to_end(entry)
                        hit = entry.hit
                        if hit is None:
                            hit = entry.hit = Lookup(entry.payload)
                        return hit
        return self._miss(ns, key, tags, lease_ttl, now)

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """Snapshot the tokens of ``tags`` and try to take the fill lease, whether or not
        ``key`` holds a value (to refresh an entry before or after it goes stale).

        Tokens are created and extended as by :meth:`fetch`. Returns
        ``Lookup(None, tokens, lease_or_None)``.
        """
        return self._miss(ns, key, tags, lease_ttl, self._clock())

    def watch(self, ns: str, key: str) -> FillWatch:
        """Return a :class:`~tagcache.backends.base.FillWatch` on ``key``: enter it, read
        the key again, then ``wait``.

        The next :meth:`fill` or :meth:`release` by the lease holder, or
        :meth:`set` or :meth:`delete` of the key, wakes its watchers.
        """
        return SignalWatch(self._watched, (ns, key))

    def _miss(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float, now: float) -> Lookup:
        """Snapshot the tokens of ``tags`` (created or extended) and try to take the lease on ``key``."""
        self._reclaim(now)
        if lease_ttl > self._lease_horizon:
            self._lease_horizon = lease_ttl
        space = self._space(ns)
        token_expires = now + lease_ttl + _TOKEN_MARGIN
        snapshot = tuple(self._token(space, tag, now, token_expires).value for tag in tags)
        lease = space.leases.get(key)
        if lease is not None:
            if now < lease.expires:
                return Lookup(None, snapshot, None, space.epoch)
            self._drop_lease(space, lease)
        value = new_token()
        lease = _Lease(ns, key, value, now + lease_ttl)
        space.leases[key] = lease
        self._file(lease, lease.expires)
        return Lookup(None, snapshot, value, space.epoch)

    async def peek(self, ns: str, key: str) -> EntryInfo | None:
        """Return the stored entry with its remaining TTL, tags and validity, or ``None``.

        Does not count as a use: the entry's place in the LRU order is kept.
        """
        space = self._spaces.get(ns)
        if space is None:
            return None
        entry = space.entries.get(key)
        if entry is None:
            return None
        ttl: float | None = None
        if entry.expires is not None:
            ttl = entry.expires - self._clock()
            if ttl <= 0:
                return None
        return EntryInfo(entry.payload, ttl, entry.tags, self._stamp_valid(space, entry))

    async def keys(self, ns: str, pattern: str, limit: int | None) -> list[str]:
        """Return up to ``limit`` (``None``: all) unexpired keys of ``ns`` that match the glob ``pattern``.

        ``pattern`` uses Redis glob syntax. Entries whose tags were invalidated are listed until
        they expire, as in Redis.
        """
        space = self._spaces.get(ns)
        if space is None or (limit is not None and limit <= 0):
            return []
        now = self._clock()
        match = None if pattern == "*" else glob_to_regex(pattern).match
        found: list[str] = []
        for key, entry in space.entries.items():
            if entry.expires is not None and now >= entry.expires:
                continue
            if match is None or match(key):
                found.append(key)
                if limit is not None and len(found) >= limit:
                    break
        return found

    async def info(self) -> BackendInfo:
        """Return sizes and the eviction count.

        ``keys`` (entries of every namespace), ``entries`` (per namespace) and
        ``memory_bytes`` (payload plus key lengths) count what is held,
        including expired entries not reclaimed yet; ``extra`` holds the
        limits and the number of tag tokens and leases held.
        """
        return BackendInfo(
            keys=len(self._lru),
            memory_bytes=self._bytes,
            evictions=self._evictions,
            entries={ns: len(space.entries) for ns, space in self._spaces.items() if space.entries},
            extra={
                "max_entries": self._max_entries,
                "max_bytes": self._max_bytes,
                "tokens": sum(len(space.tokens) for space in self._spaces.values()),
                "leases": sum(len(space.leases) for space in self._spaces.values()),
            },
        )

    # -- writes ------------------------------------------------------------

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        """Store ``payload`` unconditionally, stamped with the current tokens of ``tags``.

        Missing tokens are created; every token is extended to outlive the
        entry. Clears any lease on ``key``, so an in-flight fill of an older
        value fails. A ``ttl`` of zero or less stores nothing but still
        removes the previous entry.
        """
        now = self._clock()
        self._reclaim(now)
        space = self._space(ns)
        lease = space.leases.get(key)
        if lease is not None:
            self._drop_lease(space, lease)
        self._store(space, ns, key, payload, ttl, tags, now)
        if self._watched:
            self._signal(ns, key)

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

        Returns ``True`` if the payload was stored.
        """
        now = self._clock()
        self._reclaim(now)
        space = self._spaces.get(ns)
        if space is None:
            return False
        held = space.leases.get(key)
        if held is None or held.value != lease:
            return False
        self._drop_lease(space, held)
        stored = (
            now < held.expires
            and (epoch is None or epoch == space.epoch)
            and self._tokens_equal(space, tags, tokens, now)
            and self._store(space, ns, key, payload, ttl, tags, now)
        )
        if self._watched:
            self._signal(ns, key)
        return stored

    async def release(self, ns: str, key: str, lease: str) -> None:
        """Give up ``lease`` on ``key`` without writing; a lease held by someone else is kept.

        Releasing wakes the key's watchers.
        """
        self._reclaim(self._clock())
        space = self._spaces.get(ns)
        if space is None:
            return
        held = space.leases.get(key)
        if held is not None and held.value == lease:
            self._drop_lease(space, held)
            if self._watched:
                self._signal(ns, key)

    async def delete(self, ns: str, key: str) -> bool:
        """Remove ``key`` and its lease, and wake its watchers.

        Returns ``True`` if an unexpired entry was stored.
        """
        now = self._clock()
        self._reclaim(now)
        if self._watched:
            self._signal(ns, key)
        space = self._spaces.get(ns)
        if space is None:
            return False
        lease = space.leases.get(key)
        if lease is not None:
            self._drop_lease(space, lease)
        entry = space.entries.get(key)
        if entry is None:
            return False
        self._drop_entry(space, entry, now)
        return entry.expires is None or now < entry.expires

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        """Invalidate every entry carrying any of ``tags`` by dropping the tags' tokens.

        O(1) per tag: entries are not touched; they become misses and are
        reclaimed by expiry or eviction.
        """
        self._reclaim(self._clock())
        space = self._spaces.get(ns)
        if space is None:
            return
        space.epoch = new_token()
        for tag in tags:
            record = space.tokens.get(tag)
            if record is not None:
                self._drop_token(space, record)

    async def clear(self, ns: str) -> int:
        """Remove every entry, token and lease of namespace ``ns``; return the unexpired entries removed."""
        now = self._clock()
        self._reclaim(now)
        space = self._spaces.pop(ns, None)
        if space is None:
            return 0
        removed = 0
        lru = self._lru
        for entry in space.entries.values():
            del lru[entry]
            self._bytes -= entry.size
            if entry.expires is None or now < entry.expires:
                removed += 1
            self._unfile(entry, entry.expires)
        for token in space.tokens.values():
            self._unfile(token, token.expires)
        for lease in space.leases.values():
            self._unfile(lease, lease.expires)
        return removed

    async def aclose(self) -> None:
        """Drop everything held in every namespace. Safe to call twice.

        The eviction count and the limits are kept; the backend stays usable.
        """
        self._spaces.clear()
        self._lru.clear()
        self._bytes = 0
        self._buckets.clear()
        self._heap.clear()
        for signal in list(self._watched.values()):
            signal.fire()

    async def __aenter__(self) -> MemoryBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"MemoryBackend(entries={len(self._lru)}, max_entries={self._max_entries}, "
            f"max_bytes={self._max_bytes})"
        )

    # -- internals ---------------------------------------------------------

    def _space(self, ns: str) -> _Space:
        space = self._spaces.get(ns)
        if space is None:
            space = self._spaces[ns] = _Space(ns)
        return space

    def _signal(self, ns: str, key: str) -> None:
        """Wake the watchers of ``key``, if any."""
        signal = self._watched.get((ns, key))
        if signal is not None:
            signal.fire()

    @staticmethod
    def _tokens_equal(space: _Space, tags: Sequence[str], tokens: Sequence[str], now: float) -> bool:
        """Whether every tag's current, unexpired token equals the snapshot ``tokens``."""
        if len(tags) != len(tokens):
            return False
        current = space.tokens
        for tag, token in zip(tags, tokens, strict=True):
            record = current.get(tag)
            if (
                record is None
                or record.value != token
                or (record.expires is not None and now >= record.expires)
            ):
                return False
        return True

    @staticmethod
    def _stamp_valid(space: _Space, entry: _Entry) -> bool:
        tokens = space.tokens
        return all(tokens.get(tag) is token for tag, token in entry.stamp)

    def _token(self, space: _Space, tag: str, now: float, expires: float | None) -> _Token:
        """Return the live token of ``tag``, created if missing, living at least until ``expires``."""
        record = space.tokens.get(tag)
        if record is not None and record.expires is not None and now >= record.expires:
            self._drop_token(space, record)
            record = None
        if record is None:
            record = _Token(space.ns, tag, new_token(), expires)
            space.tokens[tag] = record
            if expires is not None:
                self._file(record, expires)
            return record
        old = record.expires
        if old is not None and (expires is None or expires > old):
            record.expires = expires
            if expires is None or int(expires) != int(old):
                self._unfile(record, old)
                if expires is not None:
                    self._file(record, expires)
        return record

    def _store(
        self,
        space: _Space,
        ns: str,
        key: str,
        payload: bytes,
        ttl: float | None,
        tags: Sequence[str],
        now: float,
    ) -> bool:
        """Replace the entry of ``key``; return whether the new one was stored."""
        old = space.entries.get(key)
        if old is not None:
            self._drop_entry(space, old, now)
        if ttl is not None and ttl <= 0:
            return False
        size = len(payload) + len(key)
        max_bytes = self._max_bytes
        if max_bytes is not None and size > max_bytes:
            self._evictions += 1
            return False
        expires = None if ttl is None else now + ttl
        stamp = tuple((tag, self._token(space, tag, now, expires)) for tag in tags)
        for _, token in stamp:
            token.refs += 1
        entry = _Entry(ns, key, bytes(payload), tuple(tags), stamp, expires, size)
        space.entries[key] = entry
        self._lru[entry] = None
        self._bytes += size
        if expires is not None:
            self._file(entry, expires)
        lru = self._lru
        if len(lru) > self._max_entries or (max_bytes is not None and self._bytes > max_bytes):
            # The new entry is last and fits on its own, so it is never evicted here.
            while len(lru) > self._max_entries or (max_bytes is not None and self._bytes > max_bytes):
                victim = next(iter(lru))
                self._drop_entry(self._spaces[victim.ns], victim, now)
                if victim.expires is None or now < victim.expires:
                    self._evictions += 1
        return True

    def _drop_entry(self, space: _Space, entry: _Entry, now: float) -> None:
        del space.entries[entry.key]
        del self._lru[entry]
        self._bytes -= entry.size
        if entry.expires is not None:
            self._unfile(entry, entry.expires)
        self._unstamp(space, entry, now)

    def _unstamp(self, space: _Space, entry: _Entry, now: float) -> None:
        """Release ``entry``'s hold on its tokens; a token left without expiry and unused gets one."""
        tokens = space.tokens
        for tag, token in entry.stamp:
            token.refs -= 1
            if token.refs <= 0 and token.expires is None and tokens.get(tag) is token:
                token.expires = now + self._lease_horizon + _TOKEN_MARGIN
                self._file(token, token.expires)

    def _drop_token(self, space: _Space, token: _Token) -> None:
        del space.tokens[token.tag]
        if token.expires is not None:
            self._unfile(token, token.expires)

    def _drop_lease(self, space: _Space, lease: _Lease) -> None:
        del space.leases[lease.key]
        self._unfile(lease, lease.expires)

    # Expiry buckets. A record expiring at ``t`` is filed under ``int(t)``;
    # every record in bucket ``s`` expires before ``s + 1``, so the whole
    # bucket is reclaimed once the clock reaches ``s + 1``.

    def _file(self, record: _Record, expires: float) -> None:
        second = int(expires)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            heap = self._heap
            heapq.heappush(heap, second)
            # Emptied buckets are deleted but their seconds stay in the heap;
            # rebuild it when such leftovers dominate, so it stays O(live buckets).
            if len(heap) > 2 * len(self._buckets) + 64:
                heap[:] = self._buckets
                heapq.heapify(heap)
        bucket.add(record)

    def _unfile(self, record: _Record, expires: float | None) -> None:
        if expires is None:
            return
        second = int(expires)
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(record)
            if not bucket:
                del self._buckets[second]

    def _reclaim(self, now: float) -> None:
        """Drop every record filed under a second that has fully passed."""
        heap = self._heap
        if not heap or heap[0] + 1 > now:
            return
        buckets = self._buckets
        spaces = self._spaces
        while heap and heap[0] + 1 <= now:
            bucket = buckets.pop(heapq.heappop(heap), None)
            if not bucket:
                continue
            for record in bucket:
                space = spaces.get(record.ns)
                if space is None:
                    continue
                if isinstance(record, _Entry):
                    if space.entries.get(record.key) is record:
                        del space.entries[record.key]
                        del self._lru[record]
                        self._bytes -= record.size
                        self._unstamp(space, record, now)
                elif isinstance(record, _Token):
                    if space.tokens.get(record.tag) is record:
                        del space.tokens[record.tag]
                elif space.leases.get(record.key) is record:
                    del space.leases[record.key]
                if not (space.entries or space.tokens or space.leases):
                    del spaces[record.ns]
