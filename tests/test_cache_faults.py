"""The cache layer on the backend's bad days: fail-open, values never lost, bounded
waits, prompt lease releases, invalidations never silently lost, stats, codec binding.

Most tests wrap a :class:`MemoryBackend` in :class:`Faulty`, which fails, hangs or
reports calls on demand; the tests that depend on a real backend's behaviour run
on every backend kind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import pytest

from tagcache import (
    BackendError,
    BackendUnavailableError,
    Cache,
    ConfigurationError,
    PickleCodec,
    SerializationError,
    ValueTooLargeError,
)
from tagcache.backends import Backend, MemoryBackend
from tagcache.backends.base import FillWatch
from tagcache.codec import JsonCodec
from tagcache.readthrough import _key_shape
from tagcache.testing import memory_cache, strict
from tagcache.warming import CacheWarmer

from tests.conftest import unique_namespace

MISSING = object()
#: Guard against a hang: far longer than any wait these tests expect.
GUARD = 10.0


class Unencodable:
    """A value JsonCodec cannot encode (not registered, not a dataclass)."""


class Faulty:
    """A backend wrapper that fails, hangs or reports its calls on demand.

    ``failing``: names of methods that raise :class:`BackendError` (``"watch"``
    fails entering a watch). ``unavailable``: every call raises
    :class:`BackendUnavailableError`, as with an open circuit breaker.
    ``gates``: a call of that method waits until the event is set.
    ``started``/``finished``: events set when a call of that method begins/ends.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.failing: set[str] = set()
        self.unavailable = False
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _event(self, table: dict[str, asyncio.Event], name: str) -> asyncio.Event:
        event = table.get(name)
        if event is None:
            event = table[name] = asyncio.Event()
        return event

    def started_event(self, name: str) -> asyncio.Event:
        return self._event(self.started, name)

    def finished_event(self, name: str) -> asyncio.Event:
        return self._event(self.finished, name)

    def count(self, name: str) -> int:
        return sum(1 for called, _ in self.calls if called == name)

    async def _enter(self, name: str, args: tuple[Any, ...]) -> None:
        self.calls.append((name, args))
        self._event(self.started, name).set()
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        if self.unavailable:
            raise BackendUnavailableError("the circuit breaker has been open since 12:00:00")
        if name in self.failing:
            raise BackendError(f"Redis {name} failed: ConnectionError: refused")

    async def _call(self, name: str, *args: Any) -> Any:
        try:
            await self._enter(name, args)
            return await getattr(self.inner, name)(*args)
        finally:
            self._event(self.finished, name).set()

    async def get(self, ns: str, key: str) -> Any:
        return await self._call("get", ns, key)

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Any:
        return await self._call("fetch", ns, key, tags, lease_ttl)

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Any:
        return await self._call("lease", ns, key, tags, lease_ttl)

    def watch(self, ns: str, key: str) -> FillWatch:
        return _Watch(self, self.inner.watch(ns, key))

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        await self._call("set", ns, key, payload, ttl, tags)

    async def fill(self, *args: Any) -> Any:
        return await self._call("fill", *args)

    async def release(self, ns: str, key: str, lease: str) -> None:
        await self._call("release", ns, key, lease)

    async def delete(self, ns: str, key: str) -> Any:
        return await self._call("delete", ns, key)

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        await self._call("invalidate", ns, tuple(tags))

    async def clear(self, ns: str) -> Any:
        return await self._call("clear", ns)

    async def keys(self, ns: str, pattern: str, limit: int | None) -> Any:
        return await self._call("keys", ns, pattern, limit)

    async def peek(self, ns: str, key: str) -> Any:
        return await self._call("peek", ns, key)

    async def info(self) -> Any:
        return await self._call("info")

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Watch:
    def __init__(self, faulty: Faulty, inner: FillWatch) -> None:
        self._faulty = faulty
        self._inner = inner

    async def __aenter__(self) -> _Watch:
        await self._faulty._enter("watch", ())
        await self._inner.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._inner.__aexit__(exc_type, exc, tb)

    async def wait(self, timeout: float) -> bool:
        return await self._inner.wait(timeout)


class Reporting(Faulty):
    """A :class:`Faulty` backend that knows its health (``HealthReporting``)."""

    def health(self) -> Mapping[str, object]:
        return {"breaker": "open" if self.unavailable else "closed", "breaker_opened": 3}


def faulty_cache(clock: Callable[[], float] | None = None, **options: Any) -> tuple[Faulty, Cache]:
    inner = MemoryBackend(clock=clock) if clock is not None else MemoryBackend()
    faulty = Faulty(inner)
    return faulty, Cache(faulty, namespace="f", **options)


def loader(value: Any, calls: list[Any] | None = None) -> Callable[[], Any]:
    async def load() -> Any:
        if calls is not None:
            calls.append(value)
        return value

    return load


async def settled(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), GUARD)


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tagcache" and text in r.getMessage()]


# ---------------------------------------------------------------- 1. get_or_set fails open


async def test_get_or_set_fails_open_by_default_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    faulty, cache = faulty_cache()
    faulty.failing = {"fetch"}
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        got = [await cache.get_or_set(f"user:{i}", loader(i)) for i in range(4)]
    assert got == [0, 1, 2, 3]
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert (await cache.stats()).errors == 4
    faulty.failing = set()
    assert await cache.get_or_set("user:1", loader("stored")) == "stored"
    assert await cache.get("user:1") == "stored"


async def test_open_breaker_fails_open_for_get_or_set_and_decorated_calls() -> None:
    faulty, cache = faulty_cache()
    faulty.unavailable = True

    @cache.cached(ttl=60)
    async def double(x: int) -> int:
        return 2 * x

    assert await cache.get_or_set("k", loader(1)) == 1
    assert await double(4) == 8
    assert (await cache.stats()).errors == 2


async def test_fail_open_is_a_cache_setting_each_call_and_decorator_can_override() -> None:
    faulty, closed = faulty_cache(fail_open=False)
    faulty.failing = {"fetch", "get"}
    assert closed.fail_open is False
    with pytest.raises(BackendError):
        await closed.get_or_set("k", loader(1))
    assert await closed.get_or_set("k", loader(1), fail_open=True) == 1

    @closed.cached(ttl=60)
    async def follows_the_cache(x: int) -> int:
        return x

    @closed.cached(ttl=60, fail_open=True)
    async def opens(x: int) -> int:
        return x

    with pytest.raises(BackendError):
        await follows_the_cache(1)
    assert await opens(2) == 2

    faulty2, default = faulty_cache()
    faulty2.failing = {"fetch"}
    assert default.fail_open is True
    with pytest.raises(BackendError):
        await default.get_or_set("k", loader(1), fail_open=False)


async def test_reads_and_writes_still_raise_and_count() -> None:
    faulty, cache = faulty_cache()
    faulty.failing = {"get", "set", "delete", "invalidate"}
    with pytest.raises(BackendError):
        await cache.get("k")
    with pytest.raises(BackendError):
        await cache.set("k", 1)
    with pytest.raises(BackendError):
        await cache.delete("k")
    with pytest.raises(BackendError):
        await cache.invalidate_tags(["t"])
    assert (await cache.stats()).errors == 4


def test_bad_fail_open_and_strict_values_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="fail_open must be True or False"):
        Cache(MemoryBackend(), fail_open="yes")  # type: ignore[arg-type]  # bad input on purpose
    with pytest.raises(ConfigurationError, match="strict must be True or False"):
        Cache(MemoryBackend(), strict=1)  # type: ignore[arg-type]  # bad input on purpose
    cache = Cache(MemoryBackend())
    with pytest.raises(ConfigurationError, match="fail_open must be True, False or None"):
        cache.cached(fail_open="no")  # type: ignore[arg-type]  # bad input on purpose


async def test_bad_fail_open_per_call_is_rejected() -> None:
    cache = Cache(MemoryBackend())
    with pytest.raises(ConfigurationError, match="fail_open must be True, False or None"):
        await cache.get_or_set("k", loader(1), fail_open=1)  # type: ignore[arg-type]  # on purpose


# ---------------------------------------------------------------- 2. loaded values never lost


async def test_failed_fill_returns_the_value_and_releases_the_lease() -> None:
    faulty, cache = faulty_cache(fail_open=False, lease_ttl=60)
    faulty.failing = {"fill"}
    assert await cache.get_or_set("user:1", loader("v"), tags=["users"]) == "v"
    await settled(faulty.finished_event("release"))
    # Nobody else has to wait out the lease.
    assert (await faulty.inner.fetch("f", "user:1", (), 60)).lease is not None
    stats = await cache.stats()
    assert (stats.not_stored, stats.errors, stats.sets) == (1, 1, 0)
    assert stats.as_dict()["not_stored"] == 1


async def test_failed_result_tags_lease_returns_the_value() -> None:
    faulty, cache = faulty_cache()

    @cache.cached(ttl=60, tags=lambda result, **_: [f"item:{result}"])
    async def item(x: int) -> int:
        return x

    faulty.failing = {"lease"}
    assert await item(3) == 3
    faulty.failing = set()
    await settled(faulty.finished_event("release"))
    assert (await cache.stats()).not_stored == 1
    assert (await faulty.inner.fetch("f", item.key_for(3), (), 60)).lease is not None


async def test_store_failures_are_logged_once_per_key_shape(caplog: pytest.LogCaptureFixture) -> None:
    faulty, cache = faulty_cache()
    faulty.failing = {"fill"}
    keys = ["user:1", "user:22", "user:3f0c9a1b2c4d", "post:1", "post:7"]
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        for key in keys:
            assert await cache.get_or_set(key, loader(key)) == key
    lines = log_lines(caplog, "not cached")
    assert len(lines) == 2, lines
    assert "'user:*'" in lines[0] and "'post:*'" in lines[1]
    assert (await cache.stats()).not_stored == len(keys)


async def test_logged_key_shapes_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    faulty, cache = faulty_cache()
    faulty.failing = {"fill"}
    letters = "ghijklmnop"  # not hex digits: each key below has a shape of its own
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        for i in range(400):
            key = "k" + "".join(letters[int(d)] for d in str(i))
            await cache.get_or_set(key, loader(i))
    assert len(log_lines(caplog, "not cached")) == 256
    assert len(log_lines(caplog, "only counted")) == 1
    assert (await cache.stats()).not_stored == 400


def test_key_shapes() -> None:
    assert _key_shape("user:123") == "user:*"
    assert _key_shape("app.get_user:3f0c9a1b2c4d5e6f") == "app.get_user:*"
    assert _key_shape("doc:550e8400-e29b-41d4-a716-446655440000") == "doc:*-*-*-*-*"
    assert _key_shape("feed:alice:page2") == "feed:alice:page*"
    assert _key_shape("feed:cafe") == "feed:cafe"


async def test_unencodable_value_is_returned_to_the_caller_and_the_callers_sharing_it() -> None:
    cache = memory_cache(strict=False)
    value = Unencodable()
    entered, gate = asyncio.Event(), asyncio.Event()
    calls: list[Any] = []

    async def slow() -> Unencodable:
        entered.set()
        await gate.wait()
        return value

    leader = asyncio.ensure_future(cache.get_or_set("k", slow))
    waiters = [asyncio.ensure_future(cache.get_or_set("k", loader("own", calls))) for _ in range(3)]
    await settled(entered)
    gate.set()
    got = await asyncio.wait_for(asyncio.gather(leader, *waiters), GUARD)
    assert calls == []  # the waiters shared the leader's load
    assert all(v is value for v in got)  # no payload to copy from: the object itself
    assert await cache.get("k", MISSING) is MISSING
    stats = await cache.stats()
    assert (stats.not_stored, stats.errors) == (1, 1)


async def test_oversized_value_is_returned_and_sharing_callers_get_their_own_copy() -> None:
    cache = memory_cache(strict=False, max_value_size=100)
    value = {"text": "x" * 500}
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow() -> dict[str, str]:
        entered.set()
        await gate.wait()
        return value

    leader = asyncio.ensure_future(cache.get_or_set("k", slow))
    waiter = asyncio.ensure_future(cache.get_or_set("k", loader("own")))
    await settled(entered)
    gate.set()
    got_leader, got_waiter = await asyncio.wait_for(asyncio.gather(leader, waiter), GUARD)
    assert got_leader is value
    assert got_waiter == value and got_waiter is not value
    assert await cache.get("k", MISSING) is MISSING
    assert (await cache.stats()).not_stored == 1


async def test_unusable_result_tags_return_the_value_and_release_the_lease() -> None:
    faulty, cache = faulty_cache(lease_ttl=60)

    def broken(result: int, **arguments: Any) -> list[str]:
        raise KeyError("owner")

    @cache.cached(ttl=60, tags=broken)
    async def item(x: int) -> int:
        return x

    assert await item(5) == 5
    await settled(faulty.finished_event("release"))
    assert (await faulty.inner.fetch("f", item.key_for(5), (), 60)).lease is not None
    assert (await cache.stats()).not_stored == 1


async def test_memory_cache_is_strict_and_every_sharing_caller_gets_the_error() -> None:
    cache = memory_cache()
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow() -> Unencodable:
        entered.set()
        await gate.wait()
        return Unencodable()

    leader = asyncio.ensure_future(cache.get_or_set("k", slow))
    waiter = asyncio.ensure_future(cache.get_or_set("k", loader("own")))
    await settled(entered)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(leader, waiter, return_exceptions=True), GUARD)
    assert all(isinstance(r, SerializationError) for r in results), results
    assert "'k'" in str(results[0]) and "Unencodable" in str(results[0])
    # The lease was released: the next load stores.
    assert await asyncio.wait_for(cache.get_or_set("k", loader(1)), GUARD) == 1
    assert await cache.get("k") == 1


async def test_strict_block_makes_any_cache_strict_and_nests() -> None:
    cache = Cache(MemoryBackend(), max_value_size=100)

    @cache.cached(ttl=60, tags=lambda result, **_: ["bad\ntag"])
    async def tagged() -> int:
        return 1

    with strict():
        with pytest.raises(SerializationError):
            await cache.get_or_set("a", loader(Unencodable()))
        with strict():
            pass
        with pytest.raises(ValueTooLargeError):
            await cache.get_or_set("b", loader("x" * 500))
        with pytest.raises(ValueError, match="control"):
            await tagged()
    value = Unencodable()
    assert await cache.get_or_set("a", loader(value)) is value
    assert await tagged() == 1
    assert (await cache.stats()).not_stored == 2


async def test_strict_refresh_raises_and_lenient_refresh_returns() -> None:
    faulty, cache = faulty_cache()

    @cache.cached(ttl=60)
    async def make() -> Unencodable:
        return Unencodable()

    with strict(), pytest.raises(SerializationError):
        await make.refresh()
    await settled(faulty.finished_event("release"))
    assert isinstance(await make.refresh(), Unencodable)
    assert (await cache.stats()).not_stored == 1


async def test_refresh_returns_a_falsy_result_without_calling_twice() -> None:
    cache = Cache(MemoryBackend())
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def nothing() -> int | None:
        calls.append(1)
        return None

    assert await nothing.refresh() is None
    assert calls == [1]


async def test_warming_reports_values_not_stored() -> None:
    faulty, cache = faulty_cache()
    warmer = CacheWarmer(cache)

    @cache.cached(ttl=60)
    async def item(x: int) -> int:
        return x

    @warmer.job
    async def warm() -> None:
        for x in range(3):
            await item(x)

    faulty.failing = {"fill"}
    report = await warmer.run_once()
    assert report.ok
    assert (report.entries_written, report.entries_not_stored) == (0, 3)
    assert report.as_dict()["jobs"][0]["entries_not_stored"] == 3
    assert warmer.stats()["warm"].entries_not_stored == 3


# ---------------------------------------------------------------- 3. waiting for another process's fill


@pytest.mark.parametrize("failing", ["watch", "fetch"])
async def test_failure_while_waiting_for_another_fill_stays_inside_fail_open(failing: str) -> None:
    faulty, cache = faulty_cache(lease_ttl=60)
    # Another process holds the key's lease.
    assert (await faulty.inner.fetch("f", "k", (), 60)).lease is not None
    if failing == "fetch":
        original = faulty._enter

        async def fail_the_fetch_inside_the_watch(name: str, args: tuple[Any, ...]) -> None:
            await original(name, args)
            if name == "fetch" and faulty.count("fetch") % 2 == 0:  # each call's second fetch
                raise BackendError("Redis fetch failed: ConnectionError: max number of clients reached")

        faulty._enter = fail_the_fetch_inside_the_watch  # type: ignore[method-assign]  # fault injection
    else:
        faulty.failing = {"watch"}
    assert await asyncio.wait_for(cache.get_or_set("k", loader("loaded")), GUARD) == "loaded"
    assert (await cache.stats()).errors == 1
    with pytest.raises(BackendError):
        await asyncio.wait_for(cache.get_or_set("k", loader("x"), fail_open=False), GUARD)


# ---------------------------------------------------------------- 4. bounded waits


async def test_a_lease_that_outlives_lease_ttl_is_waited_for_lease_ttl_at_most(
    make_backend: Callable[..., Backend], caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_backend()
    ns = unique_namespace()
    # Foreign data, or a holder that never finishes: a lease far longer than this cache's.
    assert (await backend.fetch(ns, "k", (), 3600)).lease is not None
    cache = Cache(backend, namespace=ns, lease_ttl=0.2, owns_backend=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        got = await asyncio.wait_for(cache.get_or_set("k", loader("loaded")), GUARD)
    assert got == "loaded"
    assert 0.2 <= loop.time() - started < GUARD / 2
    assert (await cache.stats()).errors == 1
    assert await cache.get("k", MISSING) is MISSING  # not stored
    assert log_lines(caplog, "waited lease_ttl")
    await cache.clear()


async def test_signals_that_never_free_the_lease_do_not_spin_forever() -> None:
    faulty, cache = faulty_cache(lease_ttl=0.2)
    assert (await faulty.inner.fetch("f", "k", (), 3600)).lease is not None

    class Restless:
        """Every wait is woken at once (a notification connection that keeps dropping)."""

        async def __aenter__(self) -> Restless:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

        async def wait(self, timeout: float) -> bool:
            await asyncio.sleep(0)  # yield only: this is the fault, not a barrier
            return True

    faulty.watch = lambda ns, key: Restless()  # type: ignore[method-assign]  # fault injection
    assert await asyncio.wait_for(cache.get_or_set("k", loader(1)), GUARD) == 1
    assert (await cache.stats()).errors == 1


async def test_an_in_process_load_that_never_finishes_is_waited_for_lease_ttl_at_most() -> None:
    cache = Cache(MemoryBackend(), lease_ttl=0.2)
    entered, never = asyncio.Event(), asyncio.Event()

    async def stuck() -> int:
        entered.set()
        await never.wait()
        return 0

    leader = asyncio.ensure_future(cache.get_or_set("k", stuck))
    await settled(entered)
    assert await asyncio.wait_for(cache.get_or_set("k", loader(2)), GUARD) == 2
    assert (await cache.stats()).errors == 1
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await cache.aclose()


# ---------------------------------------------------------------- 5. prompt lease releases


async def test_loader_error_reaches_sharing_callers_without_waiting_for_the_release() -> None:
    faulty, cache = faulty_cache()
    faulty.gates["release"] = hang = asyncio.Event()  # the release hangs
    entered, gate = asyncio.Event(), asyncio.Event()

    async def failing() -> int:
        entered.set()
        await gate.wait()
        raise RuntimeError("database down")

    leader = asyncio.ensure_future(cache.get_or_set("k", failing))
    waiter = asyncio.ensure_future(cache.get_or_set("k", loader("own")))
    await settled(entered)
    gate.set()
    results = await asyncio.wait_for(asyncio.gather(leader, waiter, return_exceptions=True), GUARD)
    assert [type(r) for r in results] == [RuntimeError, RuntimeError]
    assert faulty.count("release") == 1  # started in the background
    hang.set()
    await cache.aclose()


async def test_cancelled_leader_whose_release_hangs_wakes_waiters_after_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tagcache.readthrough._RELEASE_TIMEOUT", 0.05)
    faulty, cache = faulty_cache(lease_ttl=60)
    faulty.gates["release"] = asyncio.Event()  # never set: the release hangs
    entered, never = asyncio.Event(), asyncio.Event()

    async def stuck() -> int:
        entered.set()
        await never.wait()
        return 0

    leader = asyncio.ensure_future(cache.get_or_set("k", stuck))
    await settled(entered)
    del faulty.started["fetch"]
    waiter = asyncio.ensure_future(cache.get_or_set("k", loader("own")))
    await settled(faulty.started_event("fetch"))  # the waiter shares the leader's load now
    leader.cancel()
    # The lease could not be released: the waiter loads rather than wait it out (60 s).
    assert await asyncio.wait_for(waiter, GUARD) == "own"
    await asyncio.wait_for(cache.aclose(), GUARD)


async def test_cancelled_fill_releases_the_lease_in_the_background() -> None:
    faulty, cache = faulty_cache(lease_ttl=60)
    faulty.gates["fill"] = asyncio.Event()  # the fill hangs
    call = asyncio.ensure_future(cache.get_or_set("k", loader(1)))
    await settled(faulty.started_event("fill"))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await settled(faulty.finished_event("release"))
    assert (await faulty.inner.fetch("f", "k", (), 60)).lease is not None


async def test_timed_out_caller_releases_the_lease() -> None:
    faulty, cache = faulty_cache(lease_ttl=60)
    never = asyncio.Event()

    async def stuck() -> int:
        await never.wait()
        return 0

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(cache.get_or_set("k", stuck), 0.05)
    await settled(faulty.finished_event("release"))
    assert (await faulty.inner.fetch("f", "k", (), 60)).lease is not None


async def test_a_lease_renewed_after_expiry_for_result_tags_is_not_left_behind() -> None:
    now = [1000.0]
    faulty, cache = faulty_cache(clock=lambda: now[0], lease_ttl=5)

    @cache.cached(ttl=60, tags=lambda result, **_: [f"item:{result}"])
    async def item(x: int) -> int:
        now[0] += 10  # the load outlives the lease
        return x

    assert await item(1) == 1
    await settled(faulty.finished_event("release"))
    assert (await faulty.inner.fetch("f", item.key_for(1), (), 5)).lease is not None
    assert (await cache.stats()).not_stored == 0  # too late to store is not a failure


async def test_refresh_whose_store_fails_returns_the_value_and_releases() -> None:
    faulty, cache = faulty_cache(lease_ttl=60, fail_open=False)

    @cache.cached(ttl=60)
    async def item(x: int) -> int:
        return x

    faulty.failing = {"fill"}
    assert await item.refresh(7) == 7
    await settled(faulty.finished_event("release"))
    assert (await faulty.inner.fetch("f", item.key_for(7), (), 60)).lease is not None
    assert (await cache.stats()).not_stored == 1


# ---------------------------------------------------------------- 6. invalidations never silently lost


async def test_failed_invalidation_raises_then_reads_bypass_until_it_is_replayed() -> None:
    faulty, cache = faulty_cache()
    await cache.set("k", "old", tags=["t"])
    faulty.failing = {"invalidate"}
    with pytest.raises(BackendError):
        await cache.invalidate_tags(["t"])
    stats = await cache.stats()
    assert stats.pending_invalidations == 1
    assert stats.as_dict()["pending_invalidations"] == 1
    # The backend still serves "old", but this cache does not read it.
    assert await faulty.inner.get("f", "k") is not None
    before = stats.misses
    assert await cache.get("k", MISSING) is MISSING
    calls: list[Any] = []
    assert await cache.get_or_set("k", loader("new", calls)) == "new"
    assert await cache.get_or_set("k", loader("new", calls)) == "new"
    assert calls == ["new", "new"]  # not stored

    @cache.cached(ttl=60)
    async def decorated() -> str:
        calls.append("decorated")
        return "d"

    assert await decorated() == "d"
    assert await decorated() == "d"
    assert calls.count("decorated") == 2
    stats = await cache.stats()
    assert stats.misses - before == 5
    assert stats.sets == 1  # only the set above

    faulty.failing = set()
    assert await cache.get("k", MISSING) is MISSING  # replayed first: "old" is invalid now
    stats = await cache.stats()
    assert (stats.pending_invalidations, stats.invalidations) == (0, 1)
    assert await cache.get_or_set("k", loader("new")) == "new"
    assert await cache.get("k") == "new"


async def test_pending_invalidations_replay_in_order_before_a_new_one() -> None:
    faulty, cache = faulty_cache()
    faulty.failing = {"invalidate"}
    for tags in (["a"], ["b", "c"]):
        with pytest.raises(BackendError):
            await cache.invalidate_tags(tags)
    # Still failing: the new one is remembered after them, and raises too.
    with pytest.raises(BackendError, match="not applied"):
        await cache.invalidate_tags(["d"])
    assert (await cache.stats()).pending_invalidations == 3
    faulty.failing = set()
    faulty.calls.clear()
    await cache.invalidate_tags(["e"])
    assert [args[1] for name, args in faulty.calls if name == "invalidate"] == [
        ("a",),
        ("b", "c"),
        ("d",),
        ("e",),
    ]
    assert (await cache.stats()).pending_invalidations == 0


async def test_too_many_pending_tags_collapse_into_one_clear_of_the_namespace() -> None:
    faulty, cache = faulty_cache()
    await cache.set("k", 1, tags=["other"])
    faulty.failing = {"invalidate", "clear"}
    for i in range(10_000 // 64 + 1):
        with pytest.raises(BackendError):
            await cache.invalidate_tags([f"t{i}:{j}" for j in range(64)])
    assert (await cache.stats()).pending_invalidations == 1
    faulty.failing = set()
    faulty.calls.clear()
    assert await cache.get("k", MISSING) is MISSING  # cleared by the replay
    assert (faulty.count("clear"), faulty.count("invalidate")) == (1, 0)
    assert (await cache.stats()).pending_invalidations == 0


async def test_cancelled_invalidation_is_remembered() -> None:
    faulty, cache = faulty_cache()
    await cache.set("k", 1, tags=["t"])
    faulty.gates["invalidate"] = gate = asyncio.Event()
    call = asyncio.ensure_future(cache.invalidate_tags(["t"]))
    await settled(faulty.started_event("invalidate"))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (await cache.stats()).pending_invalidations == 1
    gate.set()
    assert await cache.get("k", MISSING) is MISSING
    assert (await cache.stats()).pending_invalidations == 0


async def test_clear_settles_pending_invalidations() -> None:
    faulty, cache = faulty_cache()
    faulty.failing = {"invalidate"}
    with pytest.raises(BackendError):
        await cache.invalidate_tags(["t"])
    await cache.clear()
    assert (await cache.stats()).pending_invalidations == 0
    await cache.set("k", 1)
    assert await cache.get("k") == 1


async def test_aclose_replays_pending_invalidations_or_logs_them(caplog: pytest.LogCaptureFixture) -> None:
    faulty = Faulty(MemoryBackend())
    cache = Cache(faulty, namespace="f", owns_backend=False)
    await cache.set("k", 1, tags=["t"])
    faulty.failing = {"invalidate"}
    with pytest.raises(BackendError):
        await cache.invalidate_tags(["t"])
    faulty.failing = set()
    await cache.aclose()
    assert await faulty.inner.get("f", "k") is None  # the replay invalidated it

    faulty2, lost = faulty_cache()
    faulty2.failing = {"invalidate"}
    with pytest.raises(BackendError):
        await lost.invalidate_tags(["users"])
    with caplog.at_level(logging.ERROR, logger="tagcache"):
        await lost.aclose()
    assert any("not re-applied" in line and "users" in line for line in log_lines(caplog, "closing"))


# ---------------------------------------------------------------- 7. stats


async def test_stats_report_health_without_a_round_trip() -> None:
    reporting = Reporting(MemoryBackend())
    cache = Cache(reporting, namespace="h")
    reporting.unavailable = True  # info() fails; health is read from memory
    stats = await cache.stats()
    assert stats.health == {"breaker": "open", "breaker_opened": 3}
    assert stats.as_dict()["health"]["breaker"] == "open"
    assert "error" in stats.backend
    plain = await memory_cache().stats()
    assert plain.health == {} and plain.as_dict()["health"] == {}
    assert (plain.not_stored, plain.pending_invalidations) == (0, 0)


# ---------------------------------------------------------------- 8. codec binding


async def test_pickle_payload_copied_to_another_key_is_a_miss_counted_as_an_error(
    make_backend: Callable[..., Backend],
) -> None:
    backend = make_backend()
    ns = unique_namespace()
    cache = Cache(backend, namespace=ns, codec=PickleCodec(secret_key=b"k" * 32), owns_backend=False)
    await cache.set("root", {"role": "admin"}, tags=["users"])
    assert await cache.get("root") == {"role": "admin"}
    payload = await backend.get(ns, "root")
    assert payload is not None
    await backend.set(ns, "alice", payload, 60, ("users",))
    assert await cache.get("alice", MISSING) is MISSING
    assert (await cache.stats()).errors == 1
    assert await cache.get_or_set("alice", loader({"role": "user"})) == {"role": "user"}
    assert await cache.get("alice") == {"role": "user"}
    # The same payload under its own key in another namespace is refused too.
    other = Cache(backend, namespace=ns + "x", codec=PickleCodec(secret_key=b"k" * 32), owns_backend=False)
    await backend.set(ns + "x", "root", payload, 60, ())
    assert await other.get("root", MISSING) is MISSING
    await cache.clear()
    await other.clear()


class RecordingCodec:
    """A key-bound codec that records the context of every call."""

    def __init__(self) -> None:
        self.json = JsonCodec()
        self.contexts: list[tuple[str, bytes]] = []

    def encode(self, value: object) -> bytes:
        raise AssertionError("the cache must call encode_for")

    def decode(self, data: bytes) -> Any:
        raise AssertionError("the cache must call decode_for")

    def encode_for(self, value: object, context: bytes) -> bytes:
        self.contexts.append(("encode", context))
        return self.json.encode(value)

    def decode_for(self, data: bytes, context: bytes) -> Any:
        self.contexts.append(("decode", context))
        return self.json.decode(data)


async def test_a_key_bound_codec_gets_namespace_and_key_everywhere() -> None:
    codec = RecordingCodec()
    cache = Cache(MemoryBackend(), namespace="ns", codec=codec)
    context = b"ns\x00k"
    await cache.set("k", 1)  # set
    assert await cache.get("k") == 1  # get
    assert (await cache.peek("k")) is not None  # peek
    assert await cache.get_or_set("k", loader(2)) == 1  # hit through the snapshot read

    @cache.cached(ttl=60, key="k", stale_while_revalidate=5)
    async def decorated() -> int:
        return 3

    await cache.delete("k")
    assert await decorated() == 3  # load
    assert await decorated() == 3  # hit through the plain read
    assert {c for _, c in codec.contexts} == {context}
    assert {kind for kind, _ in codec.contexts} == {"encode", "decode"}

    codec.contexts.clear()
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow() -> int:
        entered.set()
        await gate.wait()
        return 4

    leader = asyncio.ensure_future(cache.get_or_set("f", slow))
    waiter = asyncio.ensure_future(cache.get_or_set("f", loader(0)))
    await settled(entered)
    gate.set()
    assert list(await asyncio.wait_for(asyncio.gather(leader, waiter), GUARD)) == [4, 4]
    assert codec.contexts == [("encode", b"ns\x00f"), ("decode", b"ns\x00f")]  # the flight
