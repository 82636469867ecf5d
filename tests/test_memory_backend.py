"""Behaviour specific to :class:`tagcache.backends.memory.MemoryBackend`.

The generic backend contract is covered by the shared contract suite; these
tests cover bounds, LRU eviction, lazy expiry and reclamation (driven by a
fake clock), leases, namespaces and key listing.
"""

from __future__ import annotations

import pytest

from tagcache.backends.base import Backend, Lookup
from tagcache.backends.memory import MemoryBackend
from tagcache.exceptions import ConfigurationError


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend(clock: FakeClock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


async def _info_extra(backend: MemoryBackend, name: str) -> object:
    return (await backend.info()).extra[name]


# -- sanity ------------------------------------------------------------------


def test_is_a_backend(backend: MemoryBackend) -> None:
    assert isinstance(backend, Backend)


async def test_set_get_invalidate(backend: MemoryBackend) -> None:
    await backend.set("ns", "k", b"v", 60, ["t1", "t2"])
    assert await backend.get("ns", "k") == b"v"
    await backend.invalidate("ns", ["t2"])
    assert await backend.get("ns", "k") is None
    info = await backend.peek("ns", "k")
    assert info is not None
    assert info.valid is False
    assert info.tags == ("t1", "t2")


async def test_fetch_fill_then_hit_returns_latest_payload(backend: MemoryBackend) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.payload is None
    assert len(miss.tokens) == 1
    assert miss.lease is not None
    assert await backend.fill("ns", "k", b"v1", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.fetch("ns", "k", ["t"], 5) == Lookup(b"v1")
    await backend.set("ns", "k", b"v2", 60, ["t"])
    assert await backend.fetch("ns", "k", ["t"], 5) == Lookup(b"v2")


async def test_payload_is_isolated_from_caller_buffer(backend: MemoryBackend) -> None:
    buffer = bytearray(b"abc")
    await backend.set("ns", "k", buffer, None, [])  # type: ignore[arg-type]  # a caller passing a buffer
    buffer[0] = ord("X")
    assert await backend.get("ns", "k") == b"abc"


# -- configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_entries": 0},
        {"max_entries": -1},
        {"max_entries": 1.5},
        {"max_entries": True},
        {"max_bytes": 0},
        {"max_bytes": -10},
        {"max_bytes": "1MB"},
        {"clock": 12.0},
    ],
)
def test_invalid_configuration(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="MemoryBackend"):
        MemoryBackend(**kwargs)  # type: ignore[arg-type]  # deliberately wrong types


def test_configuration_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="max_entries must be a positive"):
        MemoryBackend(max_entries=0)


async def test_info_reports_limits_and_sizes(backend: MemoryBackend) -> None:
    await backend.set("ns", "key", b"12345", 60, ["a", "b"])
    await backend.fetch("ns", "other", ["c"], 5)
    info = await backend.info()
    assert info.keys == 1
    assert info.memory_bytes == len(b"12345") + len("key")
    assert info.evictions == 0
    assert info.extra == {"max_entries": 10_000, "max_bytes": 64 * 2**20, "tokens": 3, "leases": 1}
    unlimited = await MemoryBackend(max_bytes=None).info()
    assert unlimited.extra["max_bytes"] is None


# -- LRU bounds ----------------------------------------------------------------


async def test_lru_evicts_least_recently_used(clock: FakeClock) -> None:
    backend = MemoryBackend(max_entries=3, clock=clock)
    for key in ("a", "b", "c"):
        await backend.set("ns", key, key.encode(), 60, [])
    assert await backend.get("ns", "a") == b"a"  # a is now the most recently used
    await backend.set("ns", "d", b"d", 60, [])
    assert await backend.get("ns", "b") is None
    assert [await backend.get("ns", k) for k in ("a", "c", "d")] == [b"a", b"c", b"d"]
    info = await backend.info()
    assert info.keys == 3
    assert info.evictions == 1
    await backend.set("ns", "e", b"e", 60, [])
    await backend.set("ns", "f", b"f", 60, [])
    assert await backend.keys("ns", "*", None) == ["d", "e", "f"]
    assert (await backend.info()).evictions == 3


async def test_fetch_hit_counts_as_use(clock: FakeClock) -> None:
    backend = MemoryBackend(max_entries=2, clock=clock)
    await backend.set("ns", "a", b"a", 60, [])
    await backend.set("ns", "b", b"b", 60, [])
    assert (await backend.fetch("ns", "a", [], 5)).payload == b"a"
    await backend.set("ns", "c", b"c", 60, [])
    assert await backend.get("ns", "a") == b"a"
    assert await backend.get("ns", "b") is None


async def test_overwrite_counts_as_use_not_as_new_entry(clock: FakeClock) -> None:
    backend = MemoryBackend(max_entries=2, clock=clock)
    await backend.set("ns", "a", b"a", 60, [])
    await backend.set("ns", "b", b"b", 60, [])
    await backend.set("ns", "a", b"a2", 60, [])
    assert (await backend.info()).evictions == 0
    await backend.set("ns", "c", b"c", 60, [])
    assert await backend.get("ns", "a") == b"a2"
    assert await backend.get("ns", "b") is None


async def test_peek_does_not_touch_lru_order(clock: FakeClock) -> None:
    backend = MemoryBackend(max_entries=2, clock=clock)
    await backend.set("ns", "a", b"a", 60, [])
    await backend.set("ns", "b", b"b", 60, [])
    assert await backend.peek("ns", "a") is not None
    await backend.set("ns", "c", b"c", 60, [])
    assert await backend.peek("ns", "a") is None
    assert await backend.get("ns", "b") == b"b"


async def test_invalid_entry_get_does_not_touch_lru_order(clock: FakeClock) -> None:
    backend = MemoryBackend(max_entries=2, clock=clock)
    await backend.set("ns", "a", b"a", 60, ["t"])
    await backend.set("ns", "b", b"b", 60, [])
    await backend.invalidate("ns", ["t"])
    assert await backend.get("ns", "a") is None
    await backend.set("ns", "c", b"c", 60, [])
    assert await backend.peek("ns", "a") is None
    assert await backend.get("ns", "b") == b"b"


async def test_entry_limit_is_shared_by_namespaces(clock: FakeClock) -> None:
    backend = MemoryBackend(max_entries=2, clock=clock)
    await backend.set("one", "k", b"1", 60, [])
    await backend.set("two", "k", b"2", 60, [])
    await backend.set("three", "k", b"3", 60, [])
    assert await backend.get("one", "k") is None
    assert await backend.get("two", "k") == b"2"
    assert await backend.get("three", "k") == b"3"


async def test_max_bytes_budget_evicts_lru(clock: FakeClock) -> None:
    backend = MemoryBackend(max_bytes=100, clock=clock)
    payload = b"x" * 38  # 40 bytes with a two-character key
    await backend.set("ns", "k1", payload, 60, [])
    await backend.set("ns", "k2", payload, 60, [])
    assert (await backend.info()).memory_bytes == 80
    await backend.set("ns", "k3", payload, 60, [])
    info = await backend.info()
    assert info.memory_bytes == 80
    assert info.keys == 2
    assert info.evictions == 1
    assert await backend.get("ns", "k1") is None
    # A larger entry can push out several.
    await backend.set("ns", "k4", b"y" * 90, 60, [])
    info = await backend.info()
    assert info.keys == 1
    assert info.memory_bytes == 92
    assert info.evictions == 3
    assert await backend.get("ns", "k4") == b"y" * 90


async def test_delete_and_overwrite_release_bytes(clock: FakeClock) -> None:
    backend = MemoryBackend(max_bytes=1000, clock=clock)
    await backend.set("ns", "k", b"x" * 100, 60, [])
    await backend.set("ns", "k", b"x" * 10, 60, [])
    assert (await backend.info()).memory_bytes == 11
    assert await backend.delete("ns", "k")
    assert (await backend.info()).memory_bytes == 0


async def test_oversized_payload_is_not_stored(clock: FakeClock) -> None:
    backend = MemoryBackend(max_bytes=100, clock=clock)
    await backend.set("ns", "small", b"s", 60, [])
    await backend.set("ns", "big", b"old", 60, [])
    await backend.set("ns", "big", b"x" * 100, 60, ["t"])  # 103 bytes with its key
    assert await backend.get("ns", "big") is None  # the older value is gone too
    assert await backend.get("ns", "small") == b"s"
    info = await backend.info()
    assert info.evictions == 1
    assert info.keys == 1
    assert info.memory_bytes == len("small") + 1


async def test_oversized_fill_is_not_stored(clock: FakeClock) -> None:
    backend = MemoryBackend(max_bytes=50, clock=clock)
    miss = await backend.fetch("ns", "k", [], 5)
    assert miss.lease is not None
    assert not await backend.fill("ns", "k", b"x" * 60, 60, [], miss.tokens, miss.lease)
    assert await backend.get("ns", "k") is None
    assert (await backend.info()).evictions == 1
    assert (await backend.fetch("ns", "k", [], 5)).lease is not None  # the lease was released


# -- expiry --------------------------------------------------------------------


async def test_entry_expires(backend: MemoryBackend, clock: FakeClock) -> None:
    await backend.set("ns", "k", b"v", 10, ["t"])
    clock.advance(9.5)
    assert await backend.get("ns", "k") == b"v"
    info = await backend.peek("ns", "k")
    assert info is not None
    assert info.ttl == pytest.approx(0.5)
    assert await backend.keys("ns", "*", None) == ["k"]
    clock.advance(0.5)
    assert await backend.get("ns", "k") is None
    assert (await backend.fetch("ns", "k", ["t"], 5)).payload is None
    assert await backend.peek("ns", "k") is None
    assert await backend.keys("ns", "*", None) == []
    assert await backend.delete("ns", "k") is False


async def test_entry_without_ttl_never_expires(backend: MemoryBackend, clock: FakeClock) -> None:
    await backend.set("ns", "k", b"v", None, ["t"])
    clock.advance(10 * 365 * 86400)
    await backend.set("ns", "other", b"o", 1, ["u"])  # a write reclaims expired records
    assert await backend.get("ns", "k") == b"v"
    info = await backend.peek("ns", "k")
    assert info is not None
    assert info.ttl is None
    assert info.valid


async def test_tokens_of_entry_without_ttl_never_expire(backend: MemoryBackend, clock: FakeClock) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 1)  # the token starts with a short expiry
    assert miss.lease is not None
    assert await backend.fill("ns", "k", b"v", None, ["t"], miss.tokens, miss.lease)
    await backend.set("ns", "short", b"s", 1, ["t"])  # must not shorten the token's life
    clock.advance(10 * 365 * 86400)
    await backend.set("ns", "other", b"o", 1, [])
    assert await backend.get("ns", "k") == b"v"
    assert await _info_extra(backend, "tokens") == 1


async def test_write_extends_token_to_outlive_entry(backend: MemoryBackend, clock: FakeClock) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 1)  # token lives about a few seconds
    assert miss.lease is not None
    assert await backend.fill("ns", "k", b"v", 1000, ["t"], miss.tokens, miss.lease)
    clock.advance(999)
    await backend.set("ns", "other", b"o", 5, [])
    assert await backend.get("ns", "k") == b"v"


async def test_expired_token_is_replaced(backend: MemoryBackend, clock: FakeClock) -> None:
    first = await backend.fetch("ns", "k", ["t"], 1)
    assert first.lease is not None
    clock.advance(3600)
    second = await backend.fetch("ns", "k", ["t"], 1)
    assert second.lease is not None
    assert second.tokens != first.tokens
    assert await backend.fill("ns", "k", b"v", 60, ["t"], second.tokens, second.lease)


async def test_fill_fails_when_snapshot_token_expired(backend: MemoryBackend, clock: FakeClock) -> None:
    # The lease outlives the token's margin only if the token was not refreshed;
    # simulate it with a long lease on one key and a short-lived token from another fetch.
    long = await backend.fetch("ns", "k", [], 3600)
    assert long.lease is not None
    short = await backend.fetch("ns", "other", ["t"], 1)
    clock.advance(600)
    assert not await backend.fill("ns", "k", b"v", 60, ["t"], short.tokens, long.lease)
    assert await backend.get("ns", "k") is None


async def test_expired_records_are_reclaimed_after_a_write(backend: MemoryBackend, clock: FakeClock) -> None:
    for i in range(100):
        await backend.set("ns", f"e{i}", b"x" * 10, 5 + i % 3, [f"tag{i}", "shared"])
        await backend.fetch("ns", f"miss{i}", [f"m{i}"], 2)
    info = await backend.info()
    assert info.keys == 100
    assert info.extra["tokens"] == 201
    assert info.extra["leases"] == 100
    clock.advance(60)
    # Reads never reclaim; the figures still count the expired records.
    assert await backend.get("ns", "e0") is None
    assert (await backend.info()).keys == 99
    await backend.set("ns", "fresh", b"f", 60, ["new"])
    info = await backend.info()
    assert info.keys == 1
    assert info.memory_bytes == len("fresh") + 1
    assert info.extra["tokens"] == 1
    assert info.extra["leases"] == 0
    assert info.evictions == 0  # expiry is not eviction


async def test_unused_tokens_of_deleted_entries_are_reclaimed(
    backend: MemoryBackend, clock: FakeClock
) -> None:
    await backend.set("ns", "k", b"v", None, ["t"])
    await backend.set("ns", "k2", b"v", None, ["t"])
    assert await backend.delete("ns", "k")
    clock.advance(3600)
    await backend.set("ns", "other", b"o", 60, [])
    assert await _info_extra(backend, "tokens") == 1  # k2 still carries it
    assert await backend.get("ns", "k2") == b"v"
    assert await backend.delete("ns", "k2")
    clock.advance(3600)
    await backend.set("ns", "other", b"o", 60, [])
    assert await _info_extra(backend, "tokens") == 0


async def test_unused_token_outlives_pending_lease(backend: MemoryBackend, clock: FakeClock) -> None:
    await backend.set("ns", "k", b"v", None, ["t"])
    await backend.invalidate("ns", ["t"])
    await backend.set("ns", "k", b"v", None, ["t"])
    miss = await backend.fetch("ns", "loading", ["t"], 120)
    assert miss.lease is not None
    assert await backend.delete("ns", "k")  # the token is no longer carried by any entry
    clock.advance(100)
    await backend.set("ns", "other", b"o", 60, [])
    assert await backend.fill("ns", "loading", b"l", 60, ["t"], miss.tokens, miss.lease)


async def test_expired_entry_can_be_rewritten(backend: MemoryBackend, clock: FakeClock) -> None:
    await backend.set("ns", "k", b"old", 1, ["t"])
    clock.advance(1)
    await backend.set("ns", "k", b"new", 1, ["t"])
    assert await backend.get("ns", "k") == b"new"
    clock.advance(5)
    await backend.set("ns", "x", b"x", 60, [])
    assert (await backend.info()).keys == 1


async def test_zero_ttl_stores_nothing(backend: MemoryBackend) -> None:
    await backend.set("ns", "k", b"old", 60, [])
    await backend.set("ns", "k", b"new", 0, [])
    assert await backend.get("ns", "k") is None
    assert (await backend.info()).keys == 0


# -- leases --------------------------------------------------------------------


async def test_second_fetch_gets_no_lease_but_same_tokens(backend: MemoryBackend) -> None:
    first = await backend.fetch("ns", "k", ["a", "b"], 5)
    second = await backend.fetch("ns", "k", ["a", "b"], 5)
    assert first.lease is not None
    assert second.lease is None
    assert second.tokens == first.tokens
    assert len(set(first.tokens)) == 2
    reordered = await backend.fetch("ns", "k", ["b", "a"], 5)
    assert reordered.tokens == first.tokens[::-1]


async def test_fill_with_wrong_lease_fails_and_keeps_holder(backend: MemoryBackend) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.lease is not None
    assert not await backend.fill("ns", "k", b"bad", 60, ["t"], miss.tokens, "0000000000000000")
    assert await backend.get("ns", "k") is None
    assert await backend.fill("ns", "k", b"good", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get("ns", "k") == b"good"


async def test_fill_after_invalidate_fails_and_releases(backend: MemoryBackend) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.lease is not None
    await backend.invalidate("ns", ["t"])
    assert not await backend.fill("ns", "k", b"stale", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get("ns", "k") is None
    again = await backend.fetch("ns", "k", ["t"], 5)
    assert again.lease is not None
    assert again.tokens != miss.tokens


async def test_fill_with_mismatched_tokens_fails(backend: MemoryBackend) -> None:
    miss = await backend.fetch("ns", "k", ["t", "u"], 5)
    assert miss.lease is not None
    assert not await backend.fill("ns", "k", b"v", 60, ["t", "u"], miss.tokens[:1], miss.lease)
    miss = await backend.fetch("ns", "k", ["t", "u"], 5)
    assert miss.lease is not None
    assert not await backend.fill("ns", "k", b"v", 60, ["t", "u", "w"], [*miss.tokens, "x"], miss.lease)
    assert await backend.get("ns", "k") is None


async def test_fill_after_delete_fails(backend: MemoryBackend) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.lease is not None
    assert await backend.delete("ns", "k") is False
    assert not await backend.fill("ns", "k", b"v", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get("ns", "k") is None


async def test_fill_after_set_fails(backend: MemoryBackend) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.lease is not None
    await backend.set("ns", "k", b"newer", 60, ["t"])
    assert not await backend.fill("ns", "k", b"older", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get("ns", "k") == b"newer"


async def test_release_then_fetch_grants_again(backend: MemoryBackend) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.lease is not None
    await backend.release("ns", "k", "not-the-lease")
    assert (await backend.fetch("ns", "k", ["t"], 5)).lease is None
    await backend.release("ns", "k", miss.lease)
    assert await _info_extra(backend, "leases") == 0
    again = await backend.fetch("ns", "k", ["t"], 5)
    assert again.lease is not None
    assert again.lease != miss.lease
    assert not await backend.fill("ns", "k", b"v", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.fill("ns", "k", b"v", 60, ["t"], again.tokens, again.lease)


async def test_expired_lease_is_granted_again(backend: MemoryBackend, clock: FakeClock) -> None:
    first = await backend.fetch("ns", "k", ["t"], 5)
    assert first.lease is not None
    clock.advance(4.9)
    assert (await backend.fetch("ns", "k", ["t"], 5)).lease is None
    clock.advance(0.1)
    second = await backend.fetch("ns", "k", ["t"], 5)
    assert second.lease is not None
    assert second.tokens == first.tokens  # the token was kept alive by the fetches
    assert not await backend.fill("ns", "k", b"late", 60, ["t"], first.tokens, first.lease)
    assert await backend.fill("ns", "k", b"v", 60, ["t"], second.tokens, second.lease)


async def test_fill_with_expired_lease_fails(backend: MemoryBackend, clock: FakeClock) -> None:
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.lease is not None
    clock.advance(5)
    assert not await backend.fill("ns", "k", b"v", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get("ns", "k") is None


async def test_fetch_on_invalidated_entry_is_a_miss_with_lease(backend: MemoryBackend) -> None:
    await backend.set("ns", "k", b"old", 60, ["t"])
    await backend.invalidate("ns", ["t"])
    miss = await backend.fetch("ns", "k", ["t"], 5)
    assert miss.payload is None
    assert miss.lease is not None
    assert await backend.fill("ns", "k", b"new", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get("ns", "k") == b"new"


# -- namespaces, keys, clear ---------------------------------------------------


async def test_namespaces_are_isolated(backend: MemoryBackend) -> None:
    await backend.set("one", "k", b"1", 60, ["t"])
    await backend.set("two", "k", b"2", 60, ["t"])
    assert await backend.get("one", "k") == b"1"
    assert await backend.get("two", "k") == b"2"
    await backend.invalidate("one", ["t"])
    assert await backend.get("one", "k") is None
    assert await backend.get("two", "k") == b"2"
    one = await backend.fetch("one", "x", ["u"], 5)
    two = await backend.fetch("two", "x", ["u"], 5)
    assert one.lease is not None
    assert two.lease is not None
    assert one.tokens != two.tokens
    assert not await backend.fill("two", "x", b"v", 60, ["u"], one.tokens, one.lease)
    assert await backend.delete("two", "k")
    assert await backend.peek("one", "k") is not None


async def test_keys_glob_patterns(backend: MemoryBackend) -> None:
    for key in ("user:1", "user:2", "user:10", "post:1", "a*b", "axb", "a?c", "abc", "[x]"):
        await backend.set("ns", key, b"v", 60, [])
    await backend.set("other", "user:3", b"v", 60, [])

    async def keys(pattern: str, limit: int | None = None) -> list[str]:
        return sorted(await backend.keys("ns", pattern, limit))

    assert await keys("user:*") == ["user:1", "user:10", "user:2"]
    assert await keys("user:?") == ["user:1", "user:2"]
    assert await keys("user:[12]") == ["user:1", "user:2"]
    assert await keys("user:[^1]") == ["user:2"]
    assert await keys("a*b") == ["a*b", "axb"]
    assert await keys(r"a\*b") == ["a*b"]
    assert await keys("a?c") == ["a?c", "abc"]
    assert await keys(r"a\?c") == ["a?c"]
    assert await keys(r"\[x\]") == ["[x]"]
    assert await keys("nothing*") == []
    assert len(await keys("*")) == 9
    assert len(await keys("*", 3)) == 3
    assert await keys("user:*", 0) == []


async def test_keys_skip_expired_but_list_invalidated(backend: MemoryBackend, clock: FakeClock) -> None:
    await backend.set("ns", "short", b"v", 1, [])
    await backend.set("ns", "tagged", b"v", 60, ["t"])
    await backend.invalidate("ns", ["t"])
    clock.advance(2)
    assert await backend.keys("ns", "*", None) == ["tagged"]


async def test_clear_only_one_namespace(backend: MemoryBackend, clock: FakeClock) -> None:
    await backend.set("one", "a", b"a", 60, ["t"])
    await backend.set("one", "b", b"b", None, ["t"])
    await backend.set("one", "gone", b"g", 1, [])
    await backend.fetch("one", "loading", ["u"], 5)
    await backend.set("two", "a", b"2", 60, ["t"])
    await backend.fetch("two", "loading", ["u"], 5)
    clock.advance(1)
    assert await backend.clear("one") == 2
    assert await backend.keys("one", "*", None) == []
    assert await backend.get("one", "b") is None
    assert await backend.get("two", "a") == b"2"
    info = await backend.info()
    assert info.keys == 1
    assert info.memory_bytes == 2
    assert info.extra["tokens"] == 2
    assert info.extra["leases"] == 1
    assert (await backend.fetch("one", "loading", ["u"], 5)).lease is not None
    assert (await backend.fetch("two", "loading", ["u"], 5)).lease is None
    assert await backend.clear("missing") == 0


async def test_aclose_clears_and_is_idempotent(clock: FakeClock) -> None:
    async with MemoryBackend(clock=clock) as backend:
        await backend.set("ns", "k", b"v", 60, ["t"])
        await backend.fetch("ns", "x", ["u"], 5)
    info = await backend.info()
    assert info.keys == 0
    assert info.memory_bytes == 0
    assert info.extra["tokens"] == 0
    assert info.extra["leases"] == 0
    await backend.aclose()
    assert await backend.get("ns", "k") is None
