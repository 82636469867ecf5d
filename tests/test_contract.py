"""The backend contract: every test here runs on memory, fakeredis and real Redis.

This suite is the executable definition of how a :class:`~tagcache.backends.Backend`
behaves under :class:`~tagcache.Cache`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from tagcache import (
    Cache,
    ConfigurationError,
    InvalidKeyError,
    InvalidTagError,
    InvalidTTLError,
    SerializationError,
    ValueTooLargeError,
)
from tagcache.backends import Backend, MemoryBackend
from tagcache.testing import caching_disabled

from tests.conftest import unique_namespace
from tests.test_backend_waits import Returns, Waiting

MISSING = object()


class Clock:
    """Time for a test on any backend kind: the memory backend reads this fake clock,
    which :meth:`pass_time` moves on; Redis keeps its own time, so there it sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.real = False

    def __call__(self) -> float:
        return self.now

    def backend(self, make_backend: Callable[..., Backend]) -> Backend:
        backend = make_backend(clock=self)
        self.real = not isinstance(backend, MemoryBackend)
        return backend

    async def pass_time(self, seconds: float) -> None:
        self.now += seconds
        if self.real:
            await asyncio.sleep(seconds)


class Source:
    """A stand-in for a database row with a counter of loads."""

    def __init__(self, value: Any = "v1") -> None:
        self.value = value
        self.loads = 0

    async def load(self) -> Any:
        self.loads += 1
        return self.value


# ---------------------------------------------------------------- basics


async def test_set_then_get_returns_value(cache: Cache) -> None:
    await cache.set("user:123", {"name": "John"}, ttl=600, tags=["users", "user:123"])
    assert await cache.get("user:123") == {"name": "John"}


async def test_get_absent_returns_default(cache: Cache) -> None:
    assert await cache.get("nope") is None
    assert await cache.get("nope", default=MISSING) is MISSING


async def test_cached_none_is_told_apart_from_a_miss(cache: Cache) -> None:
    await cache.set("k", None)
    assert await cache.get("k", default=MISSING) is None


async def test_overwrite_replaces_value_and_tags(cache: Cache) -> None:
    await cache.set("k", 1, tags=["a"])
    await cache.set("k", 2, tags=["b"])
    await cache.invalidate_tags(["a"])
    assert await cache.get("k") == 2
    await cache.invalidate_tags(["b"])
    assert await cache.get("k") is None


async def test_delete_reports_whether_stored(cache: Cache) -> None:
    await cache.set("k", 1)
    assert await cache.delete("k") is True
    assert await cache.get("k", MISSING) is MISSING
    assert await cache.delete("k") is False


async def test_ttl_expires_entry(make_backend: Callable[..., Backend]) -> None:
    clock = Clock()
    cache = Cache(clock.backend(make_backend), namespace=unique_namespace())
    await cache.set("short", 1, ttl=0.3)
    await cache.set("long", 2, ttl=timedelta(seconds=60))
    assert await cache.get("short") == 1  # on Redis: read well within 0.3 s of the write
    await clock.pass_time(0.35)  # on Redis: 0.35 s at least since the write, over 0.3 s plus ms rounding
    assert await cache.get("short") is None
    assert await cache.get("long") == 2
    await cache.clear()


async def test_zero_ttl_stores_nothing_and_removes_current(cache: Cache) -> None:
    await cache.set("k", 1)
    await cache.set("k", 2, ttl=0)
    assert await cache.get("k") is None


async def test_ttl_none_never_expires_but_is_invalidated(cache: Cache) -> None:
    await cache.set("forever", 1, ttl=None, tags=["t"])
    view = await cache.peek("forever")
    assert view is not None and view.ttl is None
    await cache.invalidate_tags(["t"])
    assert await cache.get("forever") is None


async def test_default_ttl_applies_when_omitted(make_backend: Callable[..., Backend]) -> None:
    c = Cache(make_backend(), namespace=unique_namespace(), default_ttl=50)
    await c.set("k", 1)
    view = await c.peek("k")
    assert view is not None and view.ttl is not None and 40 < view.ttl <= 50
    await c.clear()


async def test_values_are_isolated_from_mutation(cache: Cache) -> None:
    value = {"items": [1, 2]}
    await cache.set("k", value)
    value["items"].append(3)
    got = await cache.get("k")
    assert got == {"items": [1, 2]}
    got["items"].append(4)
    assert await cache.get("k") == {"items": [1, 2]}


# ---------------------------------------------------------------- tags


async def test_invalidate_tag_drops_every_entry_carrying_it(cache: Cache) -> None:
    await cache.set("a", 1, tags=["users", "user:1"])
    await cache.set("b", 2, tags=["users", "user:2"])
    await cache.set("c", 3, tags=["posts"])
    await cache.invalidate_tags(["user:1"])
    assert await cache.get("a") is None
    assert await cache.get("b") == 2
    await cache.invalidate_tags(["users"])
    assert await cache.get("b") is None
    assert await cache.get("c") == 3


async def test_entry_written_after_invalidation_is_valid(cache: Cache) -> None:
    await cache.set("a", 1, tags=["t"])
    await cache.invalidate_tags(["t"])
    await cache.set("a", 2, tags=["t"])
    assert await cache.get("a") == 2


async def test_invalidating_unknown_tags_is_harmless(cache: Cache) -> None:
    await cache.invalidate_tags(["never-used"])
    await cache.invalidate_tags([])


async def test_glob_characters_in_keys_and_tags_are_data(cache: Cache) -> None:
    await cache.set("user:*", 1, tags=["t*"])
    await cache.set("user:1", 2, tags=["t1"])
    await cache.set("user:[1]", 3, tags=["t?"])
    await cache.invalidate_tags(["t*"])
    assert await cache.get("user:*") is None
    assert await cache.get("user:1") == 2
    assert await cache.get("user:[1]") == 3
    assert await cache.delete("user:?") is False
    assert await cache.get("user:1") == 2


# ---------------------------------------------------------------- get_or_set


async def test_get_or_set_loads_once_then_hits(cache: Cache) -> None:
    src = Source({"id": 1})
    assert await cache.get_or_set("k", src.load, ttl=60, tags=["t"]) == {"id": 1}
    assert await cache.get_or_set("k", src.load, ttl=60, tags=["t"]) == {"id": 1}
    assert src.loads == 1
    assert await cache.get("k") == {"id": 1}


async def test_get_or_set_reloads_after_invalidation(cache: Cache) -> None:
    src = Source("v1")
    await cache.get_or_set("k", src.load, tags=["t"])
    src.value = "v2"
    await cache.invalidate_tags(["t"])
    assert await cache.get_or_set("k", src.load, tags=["t"]) == "v2"
    assert src.loads == 2


async def test_get_or_set_loader_error_caches_nothing(cache: Cache) -> None:
    async def boom() -> int:
        raise RuntimeError("db down")

    with pytest.raises(RuntimeError, match="db down"):
        await cache.get_or_set("k", boom, tags=["t"])
    src = Source(5)
    assert await cache.get_or_set("k", src.load, tags=["t"]) == 5
    assert src.loads == 1  # the failed load released its lease


async def test_concurrent_get_or_set_share_one_load(cache: Cache) -> None:
    loads = 0
    gate = asyncio.Event()
    fetched = Returns(cache.backend, "fetch")

    async def slow() -> dict[str, int]:
        nonlocal loads
        loads += 1
        await gate.wait()
        return {"n": 1}

    callers = asyncio.gather(*(cache.get_or_set("k", slow, tags=["t"]) for _ in range(50)))
    await fetched.reach(50)  # every caller missed while the load was running
    gate.set()
    results = await callers
    assert loads == 1
    assert all(r == {"n": 1} for r in results)
    results[0]["n"] = 99  # each caller has its own copy
    assert results[1] == {"n": 1}


async def test_waiters_get_the_loader_exception(cache: Cache) -> None:
    calls = 0
    gate = asyncio.Event()
    fetched = Returns(cache.backend, "fetch")

    async def boom() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise KeyError("missing row")

    callers = asyncio.gather(*(cache.get_or_set("k", boom) for _ in range(5)), return_exceptions=True)
    await fetched.reach(5)  # every caller missed: one loads, the others joined its load
    gate.set()
    results = await callers
    assert calls == 1
    assert all(isinstance(r, KeyError) for r in results)
    assert await cache.get("k", MISSING) is MISSING


async def test_cancelled_leader_hands_over_to_a_waiter(cache: Cache) -> None:
    started = asyncio.Event()
    never = asyncio.Event()
    fetched = Returns(cache.backend, "fetch")
    calls = 0

    async def loader() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            await never.wait()  # the leader is cancelled while loading
        return "loaded"

    leader = asyncio.create_task(cache.get_or_set("k", loader))
    await started.wait()
    waiter = asyncio.create_task(cache.get_or_set("k", loader))
    await fetched.reach(2)  # the waiter missed and joined the leader's load
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await asyncio.wait_for(waiter, 5) == "loaded"
    assert calls == 2
    assert await cache.get("k") == "loaded"  # the waiter took the lease and stored


async def test_invalidation_during_load_is_not_overwritten(cache: Cache) -> None:
    src = Source("old")
    gate = asyncio.Event()
    started = asyncio.Event()

    async def slow_load() -> str:
        value = src.value  # read the source ...
        started.set()
        await gate.wait()  # ... and take a while to return
        return value

    task = asyncio.create_task(cache.get_or_set("k", slow_load, tags=["t"]))
    await started.wait()
    src.value = "new"
    await cache.invalidate_tags(["t"])
    gate.set()
    assert await task == "old"  # the caller that started before gets what it read
    assert await cache.get("k") is None  # but it was not stored
    assert await cache.get_or_set("k", src.load, tags=["t"]) == "new"


async def test_caller_after_invalidation_does_not_join_older_load(cache: Cache) -> None:
    src = Source("old")
    gate = asyncio.Event()
    started = asyncio.Event()
    waiting = Waiting(cache.backend)

    async def slow_load() -> str:
        value = src.value
        started.set()
        await gate.wait()
        return value

    first = asyncio.create_task(cache.get_or_set("k", slow_load, tags=["t"]))
    await started.wait()
    src.value = "new"
    await cache.invalidate_tags(["t"])
    second = asyncio.create_task(cache.get_or_set("k", slow_load, tags=["t"]))
    # Not joining the older load, it waits for the first caller's lease to be given back.
    await waiting.reach(1)
    gate.set()
    assert await first == "old"
    assert await second == "new"


async def test_delete_during_load_prevents_store(cache: Cache) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def slow_load() -> str:
        started.set()
        await gate.wait()
        return "loaded"

    task = asyncio.create_task(cache.get_or_set("k", slow_load))
    await started.wait()
    await cache.delete("k")
    gate.set()
    assert await task == "loaded"
    assert await cache.get("k") is None


async def test_set_during_load_wins(cache: Cache) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def slow_load() -> str:
        started.set()
        await gate.wait()
        return "loaded"

    task = asyncio.create_task(cache.get_or_set("k", slow_load))
    await started.wait()
    await cache.set("k", "explicit")
    gate.set()
    await task
    assert await cache.get("k") == "explicit"


async def test_other_process_waits_for_the_lease_holder(make_backend: Callable[..., Backend]) -> None:
    """Two caches on one backend stand for two processes: the second waits for the first's value."""
    backend = make_backend()
    ns = unique_namespace()
    one = Cache(backend, namespace=ns, owns_backend=False)
    two = Cache(backend, namespace=ns, owns_backend=False)
    gate = asyncio.Event()
    started = asyncio.Event()
    waiting = Waiting(backend)
    second_loads = Source("two")

    async def slow() -> str:
        started.set()
        await gate.wait()
        return "one"

    first = asyncio.create_task(one.get_or_set("k", slow))
    await started.wait()
    second = asyncio.create_task(two.get_or_set("k", second_loads.load))
    await waiting.reach(1)
    assert not second.done() and second_loads.loads == 0  # waiting, not loading
    gate.set()
    assert await first == "one"
    assert await asyncio.wait_for(second, 5) == "one"  # woken by the fill
    assert second_loads.loads == 0
    await one.clear()


@pytest.mark.parametrize("outcome", ["raises", "cancelled"])
async def test_waiter_in_other_process_takes_over_from_a_failed_holder(
    make_backend: Callable[..., Backend], outcome: str
) -> None:
    backend = make_backend()
    ns = unique_namespace()
    one = Cache(backend, namespace=ns, owns_backend=False)
    two = Cache(backend, namespace=ns, owns_backend=False)
    gate = asyncio.Event()
    started = asyncio.Event()
    waiting = Waiting(backend)
    second_loads = Source("two")

    async def failing() -> str:
        started.set()
        await gate.wait()
        raise RuntimeError("holder failed")

    first = asyncio.create_task(one.get_or_set("k", failing))
    await started.wait()
    second = asyncio.create_task(two.get_or_set("k", second_loads.load))
    await waiting.reach(1)  # the second "process" waits for the holder
    assert second_loads.loads == 0
    if outcome == "raises":
        gate.set()
        with pytest.raises(RuntimeError):
            await first
    else:
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    assert await asyncio.wait_for(second, 5) == "two"  # woken by the release, loaded itself
    assert second_loads.loads == 1
    assert await one.get("k") == "two"
    await one.clear()


# ---------------------------------------------------------------- clear, keys, peek, stats


async def test_clear_touches_only_this_namespace(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    a = Cache(backend, namespace=unique_namespace("a"), owns_backend=False)
    b = Cache(backend, namespace=unique_namespace("b"), owns_backend=False)
    for i in range(30):
        await a.set(f"k{i}", i, tags=["t"])
    await b.set("k0", "b")
    assert await a.clear() == 30
    assert await a.get("k0") is None
    assert await b.get("k0") == "b"
    await b.clear()


async def test_keys_lists_matching_keys_of_namespace(cache: Cache) -> None:
    for i in range(5):
        await cache.set(f"user:{i}", i)
    await cache.set("post:1", 1)
    await cache.set("user:*", "star")
    assert sorted(await cache.keys("user:*", limit=None)) == sorted(
        [f"user:{i}" for i in range(5)] + ["user:*"]
    )
    assert await cache.keys(r"user:\*") == ["user:*"]
    assert len(await cache.keys("*", limit=3)) == 3
    assert await cache.keys("nothing:*") == []


@pytest.mark.parametrize("pattern", ["user:\ud800*", "a\nb", ""])
async def test_keys_rejects_patterns_that_cannot_be_sent(cache: Cache, pattern: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        await cache.keys(pattern)


async def test_peek_shows_entry_without_counting_a_hit(cache: Cache) -> None:
    await cache.set("k", [1, 2], ttl=100, tags=["b", "a"])
    view = await cache.peek("k")
    assert view is not None
    assert view.value == [1, 2]
    assert view.tags == ("a", "b")
    assert view.valid is True
    assert view.ttl is not None and 90 < view.ttl <= 100
    assert (await cache.stats()).hits == 0
    await cache.invalidate_tags(["a"])
    view = await cache.peek("k")
    assert view is None or view.valid is False
    assert await cache.peek("absent") is None


async def test_stats_count_operations(cache: Cache) -> None:
    await cache.set("k", 1, tags=["a", "b"])
    await cache.get("k")
    await cache.get("k")
    await cache.get("missing")
    await cache.invalidate_tags(["a", "b"])
    await cache.delete("k")
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.sets, stats.invalidations, stats.deletes) == (2, 1, 1, 2, 1)
    assert stats.hit_ratio == pytest.approx(2 / 3)
    assert stats.errors == 0
    assert stats.server_keys is not None and stats.server_keys >= 0
    assert stats.as_dict()["hit_ratio"] == stats.hit_ratio


async def test_corrupt_payload_is_a_miss_and_an_error(cache: Cache) -> None:
    await cache.backend.set(cache.namespace, "bad", b"\xffnot a payload", 60, ())
    assert await cache.get("bad", MISSING) is MISSING
    stats = await cache.stats()
    assert stats.errors == 1 and stats.misses == 1
    src = Source("fresh")
    assert await cache.get_or_set("bad", src.load) == "fresh"
    assert await cache.get("bad") == "fresh"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("", InvalidKeyError),
        (123, InvalidKeyError),
        (b"bytes", InvalidKeyError),
        (None, InvalidKeyError),
        ("a\nb", InvalidKeyError),
        ("a\x00b", InvalidKeyError),
        ("x" * 1025, InvalidKeyError),
    ],
)
async def test_bad_keys_are_rejected(cache: Cache, key: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        await cache.set(key, 1)
    assert "key" in str(info.value)
    with pytest.raises(error):
        await cache.get(key)
    with pytest.raises(error):
        await cache.get_or_set(key, Source().load)


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ("users", "bare string"),
        (["ok", ""], "empty"),
        (["a\tb"], "control"),
        ([1], "must be str"),
        (["x" * 257], "limit"),
        ([f"t{i}" for i in range(65)], "limit"),
    ],
)
async def test_bad_tags_are_rejected_and_nothing_written(cache: Cache, tags: Any, message: str) -> None:
    await cache.set("k", "old")
    with pytest.raises(InvalidTagError, match=message):
        await cache.set("k", "new", tags=tags)
    assert await cache.get("k") == "old"
    if isinstance(tags, str):
        with pytest.raises(InvalidTagError):
            await cache.invalidate_tags(tags)


@pytest.mark.parametrize("ttl", [-1, -0.5, math.nan, math.inf, "10", timedelta(seconds=-1), True])
async def test_bad_ttls_are_rejected(cache: Cache, ttl: Any) -> None:
    with pytest.raises(InvalidTTLError):
        await cache.set("k", 1, ttl=ttl)
    assert await cache.get("k") is None


async def test_unencodable_value_writes_nothing(cache: Cache) -> None:
    await cache.set("k", "old")
    with pytest.raises(SerializationError, match=r"'k'.*object"):
        await cache.set("k", object())
    assert await cache.get("k") == "old"


async def test_value_over_size_limit_is_rejected(make_backend: Callable[..., Backend]) -> None:
    c = Cache(make_backend(), namespace=unique_namespace(), max_value_size=1000)
    await c.set("k", "small")
    with pytest.raises(ValueTooLargeError, match="max_value_size"):
        await c.set("k", "x" * 2000)
    assert await c.get("k") == "small"
    await c.clear()


async def test_bad_settings_are_rejected(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    for namespace in ("", "a b", "a{b}", "x" * 65, "a:b", "a*"):
        with pytest.raises(ConfigurationError, match="namespace"):
            Cache(backend, namespace=namespace)
    with pytest.raises(ConfigurationError, match="max_value_size"):
        Cache(backend, max_value_size=0)
    with pytest.raises(InvalidTTLError):
        Cache(backend, default_ttl=-5)


# ---------------------------------------------------------------- disabling


async def test_caching_disabled_blocks_nest_and_restore(cache: Cache) -> None:
    await cache.set("k", "cached")
    src = Source("fresh")
    with caching_disabled():
        assert await cache.get("k") is None
        with caching_disabled():
            assert await cache.get_or_set("k", src.load) == "fresh"
        assert await cache.get("k") is None
        await cache.set("k", "ignored")
    assert await cache.get("k") == "cached"
    assert src.loads == 1
