"""Waiting for another caller's fill: ``Backend.lease`` and ``Backend.watch``.

Runs on memory, fakeredis and real Redis. Two backends made by one
``make_backend`` factory share one server (fakeredis and Redis), standing in
for two processes. Real-Redis tests count the waiting backend's commands on
the wire (tests/wire.py) and kill its pub/sub connection.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tagcache.backends import Backend, MemoryBackend
from tagcache.backends.base import FillWatch, Lookup
from tagcache.backends.redis import RedisBackend
from tagcache.exceptions import BackendError

from tests.conftest import unique_namespace
from tests.redis_server import free_port
from tests.wire import Wire

TAGS = ("users", "user:1")
LEASE = 10.0
# Upper bound on any single wait in these tests: reached only when something is broken.
PATIENCE = 5.0


async def hold_and_wait(holder: Backend, waiter: Backend, ns: str, key: str = "k") -> tuple[Lookup, Lookup]:
    """``holder`` takes the lease on a missing key; ``waiter`` finds it held (and marks the key)."""
    held = await holder.fetch(ns, key, TAGS, LEASE)
    assert held.payload is None and held.lease is not None
    seen = await waiter.fetch(ns, key, TAGS, LEASE)
    assert seen.payload is None and seen.lease is None
    assert seen.tokens == held.tokens
    return held, seen


async def start_waiting(watch: FillWatch, timeout: float = PATIENCE) -> asyncio.Task[bool]:
    """Start ``watch.wait`` in a task and let it block (it does in its first step: a few
    ticks are plenty, and a signal sent before it blocks is kept for it anyway)."""
    task = asyncio.ensure_future(watch.wait(timeout))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    return task


async def recheck(backend: Backend, ns: str, key: str = "k") -> None:
    """The read a waiter makes right after entering its watch: the lease is still held."""
    again = await backend.fetch(ns, key, TAGS, LEASE)
    assert again.payload is None and again.lease is None


# ---------------------------------------------------------------- spies (also used by other modules)


class _Progress:
    """A count a test can wait for (at most PATIENCE seconds: more means something is broken)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def _bump(self) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, count: int) -> None:
        """Wait until the count is at least ``count``."""

        async def until() -> None:
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), PATIENCE)
        except asyncio.TimeoutError:
            pytest.fail(f"{type(self).__name__}: {self.count} after {PATIENCE} s, expected {count}")


class Returns(_Progress):
    """Counts the calls of an async method of ``obj`` that returned (the method is wrapped
    on that instance only).

    When a test waiting in :meth:`reach` resumes, the caller that got the reply has
    already acted on it up to its next ``await``: after a ``fetch`` that missed, a
    :class:`~tagcache.Cache` caller has joined the load in progress or moved on to
    wait for another caller's fill.
    """

    def __init__(self, obj: Any, method: str) -> None:
        super().__init__()
        original = getattr(obj, method)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            self._bump()
            return result

        setattr(obj, method, counted)


class Waiting(_Progress):
    """Counts the callers that entered ``FillWatch.wait`` on ``backend`` (its ``watch``
    is wrapped on that instance only): callers blocked until the key is signalled."""

    def __init__(self, backend: Any) -> None:
        super().__init__()
        original = backend.watch

        def watch(ns: str, key: str) -> FillWatch:
            return _CountedWatch(original(ns, key), self)

        backend.watch = watch


class _CountedWatch:
    def __init__(self, inner: FillWatch, waiting: Waiting) -> None:
        self._inner = inner
        self._waiting = waiting

    async def __aenter__(self) -> _CountedWatch:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._inner.__aexit__(*exc_info)

    async def wait(self, timeout: float) -> bool:
        self._waiting._bump()
        return await self._inner.wait(timeout)


# ---------------------------------------------------------------- what wakes a watcher


async def test_fill_wakes_the_watcher(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    held, _ = await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch:
        await recheck(backend, ns)
        task = await start_waiting(watch)
        assert held.lease is not None
        assert await backend.fill(ns, "k", b"value", 60, TAGS, held.tokens, held.lease)
        assert await asyncio.wait_for(task, PATIENCE) is True
    assert (await backend.fetch(ns, "k", TAGS, LEASE)).payload == b"value"
    await backend.clear(ns)


async def test_failed_fill_after_invalidation_wakes_the_watcher(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    held, _ = await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch:
        await recheck(backend, ns)
        task = await start_waiting(watch)
        await backend.invalidate(ns, ["users"])
        assert held.lease is not None
        assert not await backend.fill(ns, "k", b"old", 60, TAGS, held.tokens, held.lease)
        assert await asyncio.wait_for(task, PATIENCE) is True
    # Nothing was stored and the lease is free: the woken caller may load.
    after = await backend.fetch(ns, "k", TAGS, LEASE)
    assert after.payload is None and after.lease is not None
    await backend.clear(ns)


async def test_release_wakes_the_watcher(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    held, _ = await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch:
        await recheck(backend, ns)
        task = await start_waiting(watch)
        assert held.lease is not None
        await backend.release(ns, "k", held.lease)
        assert await asyncio.wait_for(task, PATIENCE) is True
    after = await backend.fetch(ns, "k", TAGS, LEASE)
    assert after.payload is None and after.lease is not None
    await backend.clear(ns)


async def test_set_wakes_the_watcher(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch:
        await recheck(backend, ns)
        task = await start_waiting(watch)
        await backend.set(ns, "k", b"explicit", 60, TAGS)
        assert await asyncio.wait_for(task, PATIENCE) is True
    assert (await backend.fetch(ns, "k", TAGS, LEASE)).payload == b"explicit"
    await backend.clear(ns)


async def test_delete_wakes_the_watcher(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch:
        await recheck(backend, ns)
        task = await start_waiting(watch)
        assert await backend.delete(ns, "k") is False
        assert await asyncio.wait_for(task, PATIENCE) is True
    after = await backend.fetch(ns, "k", TAGS, LEASE)
    assert after.payload is None and after.lease is not None  # delete cleared the lease
    await backend.clear(ns)


async def test_every_watcher_of_the_key_is_woken_and_others_are_not(
    make_backend: Callable[..., Backend],
) -> None:
    backend = make_backend()
    ns = unique_namespace()
    held, _ = await hold_and_wait(backend, backend, ns)
    await hold_and_wait(backend, backend, ns, "other")
    async with (
        backend.watch(ns, "k") as first,
        backend.watch(ns, "k") as second,
        backend.watch(ns, "other") as unrelated,
    ):
        tasks = [await start_waiting(w) for w in (first, second)]
        bystander = await start_waiting(unrelated, 0.3)
        assert held.lease is not None
        await backend.fill(ns, "k", b"v", 60, TAGS, held.tokens, held.lease)
        assert await asyncio.wait_for(asyncio.gather(*tasks), PATIENCE) == [True, True]
        assert await asyncio.wait_for(bystander, PATIENCE) is False
    await backend.clear(ns)


async def test_a_cancelled_wait_does_not_disturb_the_others(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    held, _ = await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as first, backend.watch(ns, "k") as second:
        doomed = await start_waiting(first)
        survivor = await start_waiting(second)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert held.lease is not None
        await backend.release(ns, "k", held.lease)
        assert await asyncio.wait_for(survivor, PATIENCE) is True
        # The cancelled watcher's signal was still recorded.
        assert await first.wait(0) is True
    await backend.clear(ns)


# ---------------------------------------------------------------- timing of signals and timeouts


async def test_signal_between_entering_and_waiting_is_not_lost(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    held, _ = await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch, backend.watch(ns, "k") as probe:
        await recheck(backend, ns)
        probing = await start_waiting(probe)
        assert held.lease is not None
        await backend.fill(ns, "k", b"v", 60, TAGS, held.tokens, held.lease)
        # Once the probe is woken, the signal has reached this process...
        assert await asyncio.wait_for(probing, PATIENCE) is True
        # ... and a wait that starts only now sees it without waiting at all.
        assert await watch.wait(0) is True
        # Consumed: nothing new since.
        assert await watch.wait(0.05) is False
    await backend.clear(ns)


async def test_wait_times_out_when_nothing_happens(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch:
        await recheck(backend, ns)
        assert await watch.wait(0.05) is False
        assert await watch.wait(0) is False
    await backend.clear(ns)


async def test_waiting_needs_an_entered_watch(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    watch = backend.watch(unique_namespace(), "k")
    with pytest.raises(RuntimeError):
        await watch.wait(0)


async def test_closing_the_backend_wakes_its_watchers(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    await hold_and_wait(backend, backend, ns)
    async with backend.watch(ns, "k") as watch:
        task = await start_waiting(watch)
        await backend.aclose()
        assert await asyncio.wait_for(task, PATIENCE) is True


# ---------------------------------------------------------------- across processes


async def test_fill_by_another_process_wakes_the_watcher(make_backend: Callable[..., Backend]) -> None:
    holder, waiter = make_backend(), make_backend()
    if isinstance(holder, MemoryBackend):
        pytest.skip("in-process backends share nothing between instances")
    ns = unique_namespace()
    held, _ = await hold_and_wait(holder, waiter, ns)
    async with waiter.watch(ns, "k") as watch:
        await recheck(waiter, ns)
        task = await start_waiting(watch)
        assert held.lease is not None
        assert await holder.fill(ns, "k", b"from-holder", 60, TAGS, held.tokens, held.lease)
        assert await asyncio.wait_for(task, PATIENCE) is True
    assert (await waiter.fetch(ns, "k", TAGS, LEASE)).payload == b"from-holder"
    await holder.clear(ns)


async def test_unmarked_key_does_not_signal_another_process(make_backend: Callable[..., Backend]) -> None:
    """Only a fetch that found the lease held marks the key: other fills publish nothing."""
    holder, waiter = make_backend(), make_backend()
    if isinstance(holder, MemoryBackend):
        pytest.skip("in-process backends signal their own watchers directly")
    ns = unique_namespace()
    held = await holder.fetch(ns, "k", TAGS, LEASE)
    assert held.lease is not None
    # The waiter's watch is entered, but it never found the lease held.
    async with waiter.watch(ns, "k") as watch:
        task = await start_waiting(watch, 0.3)
        await holder.fill(ns, "k", b"v", 60, TAGS, held.tokens, held.lease)
        assert await asyncio.wait_for(task, PATIENCE) is False
    await holder.clear(ns)


# ---------------------------------------------------------------- lease()


async def test_lease_on_a_stored_entry_is_granted_once_with_a_token_snapshot(
    make_backend: Callable[..., Backend],
) -> None:
    backend = make_backend()
    ns = unique_namespace()
    await backend.set(ns, "k", b"current", 60, TAGS)
    first = await backend.lease(ns, "k", TAGS, LEASE)
    assert first.payload is None and first.lease is not None
    assert len(first.tokens) == len(TAGS)
    # The snapshot is the tags' current tokens: a miss of another key with those tags (in the
    # same bucket: each bucket has tokens of its own) sees the same.
    other = await backend.fetch(ns, same_bucket_key(backend, "k"), TAGS, LEASE)
    assert other.tokens == first.tokens
    second = await backend.lease(ns, "k", TAGS, LEASE)
    assert second.lease is None and second.tokens == first.tokens
    # The entry keeps serving while the lease is held.
    assert await backend.get(ns, "k") == b"current"
    assert await backend.fill(ns, "k", b"refreshed", 60, TAGS, first.tokens, first.lease)
    assert await backend.get(ns, "k") == b"refreshed"
    await backend.clear(ns)


async def test_lease_snapshot_taken_before_an_invalidation_cannot_fill(
    make_backend: Callable[..., Backend],
) -> None:
    backend = make_backend()
    ns = unique_namespace()
    await backend.set(ns, "k", b"current", 60, TAGS)
    refresh = await backend.lease(ns, "k", TAGS, LEASE)
    assert refresh.lease is not None
    await backend.invalidate(ns, ["user:1"])
    assert not await backend.fill(ns, "k", b"stale", 60, TAGS, refresh.tokens, refresh.lease)
    assert await backend.get(ns, "k") is None
    again = await backend.lease(ns, "k", TAGS, LEASE)
    assert again.lease is not None  # the failed fill released the lease
    assert again.tokens[0] == refresh.tokens[0] and again.tokens[1] != refresh.tokens[1]
    await backend.clear(ns)


async def test_lease_on_a_missing_key_and_fetch_share_one_lease(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace()
    refresh = await backend.lease(ns, "k", TAGS, LEASE)
    assert refresh.lease is not None
    found = await backend.fetch(ns, "k", TAGS, LEASE)
    assert found.payload is None and found.lease is None and found.tokens == refresh.tokens
    await backend.clear(ns)


async def test_lease_does_not_mark_the_key_as_waited_for(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    if not isinstance(backend, RedisBackend):
        pytest.skip("marks are how Redis avoids publishing for keys nobody waits for")
    ns = unique_namespace()
    client: Any = backend._client  # look behind the backend's back
    mark = f"tc:{{{ns}:0}}:w:k"
    held = await backend.lease(ns, "k", TAGS, LEASE)
    assert held.lease is not None
    assert (await backend.lease(ns, "k", TAGS, LEASE)).lease is None
    assert await client.exists(mark) == 0
    assert (await backend.fetch(ns, "k", TAGS, LEASE)).lease is None
    assert await client.exists(mark) == 1
    assert 0 < await client.pttl(mark) <= LEASE * 1000
    await backend.release(ns, "k", held.lease)
    assert await client.exists(mark) == 0  # the signal consumed the mark
    await backend.clear(ns)


# ---------------------------------------------------------------- real Redis: the wire


@pytest.fixture
async def wire(redis_url: str) -> AsyncIterator[Wire]:
    async with Wire(redis_url) as w:
        yield w


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def wait_all(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    return list(await asyncio.wait_for(asyncio.gather(*tasks), PATIENCE))


@pytest.mark.redis
async def test_waiting_sends_nothing_to_redis(redis_url: str, wire: Wire) -> None:
    ns = unique_namespace()
    async with (
        RedisBackend.from_url(redis_url, socket_timeout=PATIENCE) as holder,
        RedisBackend.from_url(wire.url, socket_timeout=PATIENCE) as waiter,
    ):
        held = await holder.fetch(ns, "k", TAGS, LEASE)
        assert held.lease is not None
        callers = 200
        ready = 0
        all_ready = asyncio.Event()
        gate = asyncio.Event()

        async def caller() -> bytes | None:
            nonlocal ready
            seen = await waiter.fetch(ns, "k", TAGS, LEASE)
            assert seen.lease is None
            async with waiter.watch(ns, "k") as watch:
                await recheck(waiter, ns)
                ready += 1
                if ready == callers:
                    all_ready.set()
                await gate.wait()
                assert await watch.wait(PATIENCE) is True
            return (await waiter.fetch(ns, "k", TAGS, LEASE)).payload

        wire.reset()
        tasks = [asyncio.ensure_future(caller()) for _ in range(callers)]
        await asyncio.wait_for(all_ready.wait(), PATIENCE)
        # 400 fetches and the subscription, batched: tens of turns, not hundreds.
        assert wire.turns <= 60
        gate.set()
        wire.reset()
        await asyncio.sleep(0.3)  # everyone waits for the holder's load
        assert wire.turns == 0
        assert await holder.fill(ns, "k", b"loaded", 60, TAGS, held.tokens, held.lease)
        assert await wait_all(tasks) == [b"loaded"] * callers
        assert wire.turns <= 30  # the re-reads after waking, batched
        await holder.clear(ns)


@pytest.mark.redis
async def test_only_the_first_watch_of_a_namespace_subscribes(redis_url: str, wire: Wire) -> None:
    ns = unique_namespace()
    async with RedisBackend.from_url(wire.url) as backend:
        async with backend.watch(ns, "a"):
            pass
        wire.reset()
        async with backend.watch(ns, "b"), backend.watch(ns, "a"):
            pass
        assert wire.turns == 0
        async with backend.watch(unique_namespace(), "a"):
            pass
        assert wire.turns == 1  # a new namespace: one SUBSCRIBE on the same connection
        assert wire.connections == 1


@pytest.mark.redis
async def test_killed_pubsub_connection_does_not_strand_watchers(redis_url: str, raw: aioredis.Redis) -> None:
    ns = unique_namespace()
    name = f"waits-{uuid.uuid4().hex[:12]}"
    async with (
        RedisBackend.from_url(redis_url) as holder,
        RedisBackend.from_url(redis_url, client_name=name) as waiter,
    ):
        held, _ = await hold_and_wait(holder, waiter, ns)
        async with waiter.watch(ns, "k") as watch:
            await recheck(waiter, ns)
            task = await start_waiting(watch, 3.0)
            clients = [c for c in await raw.client_list(_type="pubsub") if c.get("name") == name]
            assert len(clients) == 1
            assert await raw.client_kill_filter(_id=clients[0]["id"], _type="pubsub") == 1
            # Returns within its timeout (at once: a signal may have been lost).
            assert await asyncio.wait_for(task, PATIENCE) in (True, False)
        # A later watch subscribes again and is woken as usual.
        assert (await waiter.fetch(ns, "k", TAGS, LEASE)).lease is None
        async with waiter.watch(ns, "k") as watch:
            await recheck(waiter, ns)
            task = await start_waiting(watch)
            assert held.lease is not None
            assert await holder.fill(ns, "k", b"v", 60, TAGS, held.tokens, held.lease)
            assert await asyncio.wait_for(task, PATIENCE) is True
        await holder.clear(ns)


@pytest.mark.redis
async def test_watch_on_an_unreachable_server_raises_backend_error() -> None:
    async with RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0") as backend:
        with pytest.raises(BackendError):
            async with backend.watch("ns", "k"):
                pass


# ---------------------------------------------------------------- client flavours


@pytest.fixture(params=["fakeredis", "redis-resp2", "redis-resp3"])
async def decoding_pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisBackend, RedisBackend]]:
    """Two backends on one server over ``decode_responses=True`` clients (RESP2 and RESP3)."""
    clients: list[Any] = []
    if request.param == "fakeredis":
        import fakeredis

        server = fakeredis.FakeServer(version=(7,))
        clients = [fakeredis.FakeAsyncRedis(server=server, decode_responses=True) for _ in range(2)]
    else:
        url = request.getfixturevalue("redis_url")
        protocol = 2 if request.param == "redis-resp2" else 3
        clients = [aioredis.Redis.from_url(url, decode_responses=True, protocol=protocol) for _ in range(2)]
    backends = [RedisBackend(client, owns_client=True) for client in clients]
    yield backends[0], backends[1]
    for backend in backends:
        await backend.aclose()


async def test_watch_works_over_decoding_clients(decoding_pair: tuple[RedisBackend, RedisBackend]) -> None:
    holder, waiter = decoding_pair
    ns = unique_namespace()
    key = "clé:1"  # not ASCII: the signal names the key in bytes
    held, _ = await hold_and_wait(holder, waiter, ns, key)
    async with waiter.watch(ns, key) as watch:
        await recheck(waiter, ns, key)
        task = await start_waiting(watch)
        assert held.lease is not None
        assert await holder.fill(ns, key, b"\xffbinary", 60, TAGS, held.tokens, held.lease)
        assert await asyncio.wait_for(task, PATIENCE) is True
    assert (await waiter.fetch(ns, key, TAGS, LEASE)).payload == b"\xffbinary"
    await holder.clear(ns)


def same_bucket_key(backend: Backend, key: str) -> str:
    """Another key in ``key``'s bucket of ``backend`` (one with ``buckets``, else any key)."""
    from tagcache.backends.redis import bucket_index

    buckets = getattr(backend, "buckets", 1)
    wanted = bucket_index(key.encode(), buckets)
    return next(f"other{n}" for n in range(100_000) if bucket_index(f"other{n}".encode(), buckets) == wanted)
