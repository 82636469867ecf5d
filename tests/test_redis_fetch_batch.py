"""Coalesced fetches: concurrent ``RedisBackend.fetch`` calls of one bucket travel as
one ``fetch_many.lua`` call, like gets, and answer exactly as sequential fetches
would (hits with their payload; misses with the tokens of their tags, the epoch,
one lease per key and the key marked as waited for)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tagcache.backends.base import Lookup
from tagcache.backends.redis import RedisBackend

from tests.conftest import unique_namespace
from tests.wire import Wire

TIMEOUT = 5.0
LEASE_TTL = 10.0


class Store:
    """A backend and a raw client on the same server."""

    def __init__(self, backend: RedisBackend, raw: Any) -> None:
        self.backend = backend
        self.raw = raw

    def key(self, ns: str, kind: str, name: str) -> str:
        return f"tc:{{{ns}:0}}:{kind}:{name}"

    async def tokens(self, ns: str, tags: tuple[str, ...]) -> tuple[str, ...]:
        values = [await self.raw.get(self.key(ns, "t", t)) for t in tags]
        return tuple(v.decode() for v in values)

    async def epoch(self, ns: str) -> str:
        value = await self.raw.get(self.key(ns, "v", ""))
        return str(value.decode())


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "fakeredis":
        import fakeredis

        server = fakeredis.FakeServer(version=7)
        backend = RedisBackend(fakeredis.FakeAsyncRedis(server=server))
        raw: Any = fakeredis.FakeAsyncRedis(server=server)
    else:
        url = request.getfixturevalue("redis_url")
        backend = RedisBackend.from_url(url, socket_timeout=TIMEOUT)
        raw = aioredis.Redis.from_url(url)
    try:
        yield Store(backend, raw)
    finally:
        await backend.aclose()
        await raw.aclose()


async def _in_one_batch(backend: RedisBackend, ns: str, calls: list[Any]) -> list[Any]:
    """Run the coroutines of ``calls`` in one tick behind a read in flight, so they all
    queue for the same batch; return their results."""
    # The first read goes out at once; every call made in the same tick queues behind it.
    results = await asyncio.gather(backend.get(ns, "in-flight"), *calls)
    return list(results[1:])


TAGS = ("user:1", "group:1")


async def _prepare(backend: RedisBackend, ns: str) -> None:
    for i in range(10):
        await backend.set(ns, f"h{i}", b"payload-%d" % i, 60, TAGS)


def _requests() -> list[tuple[str, tuple[str, ...]]]:
    """Distinct hits, distinct misses, a missing key fetched five times, a present key
    fetched five times, a missing key fetched with other tags."""
    reqs: list[tuple[str, tuple[str, ...]]] = []
    reqs += [(f"h{i}", TAGS) for i in range(10)]
    reqs += [(f"m{i}", ("user:2",) if i % 2 else TAGS) for i in range(20)]
    reqs += [("dup", TAGS)] * 5
    reqs += [("h0", TAGS)] * 5
    reqs += [("other", ("a", "b", "c"))] * 2
    reqs += [("other", TAGS)] * 3
    reqs += [(f"n{i}", ()) for i in range(5)]
    return reqs


async def _check(
    store: Store, ns: str, reqs: list[tuple[str, tuple[str, ...]]], got: list[Lookup]
) -> list[Any]:
    """Check each Lookup against the server's state; return a summary comparable across runs."""
    epoch = await store.epoch(ns)
    summary: list[Any] = []
    granted: dict[str, int] = {}
    for (key, tags), lookup in zip(reqs, got, strict=True):
        if key.startswith("h"):
            assert lookup.payload == b"payload-%d" % int(key[1:])
            summary.append(("hit", lookup.payload))
            continue
        assert lookup.payload is None
        assert lookup.tokens == await store.tokens(ns, tags)  # in tag order
        assert lookup.epoch == epoch
        if lookup.lease is not None:
            granted[key] = granted.get(key, 0) + 1
            token = lookup.lease.partition("/")[0]
            assert await store.raw.get(store.key(ns, "l", key)) == token.encode()
        summary.append(("miss", len(lookup.tokens), lookup.lease is not None))
    for key in {k for k, _ in reqs if not k.startswith("h")}:
        assert granted.get(key) == 1, key  # exactly one lease per missing key
        fetchers = sum(1 for k, _ in reqs if k == key)
        # Marked as waited for exactly when another fetch found the lease held.
        assert bool(await store.raw.exists(store.key(ns, "w", key))) == (fetchers > 1), key
    return summary


async def test_coalesced_fetches_answer_as_sequential_ones(store: Store) -> None:
    backend = store.backend
    reqs = _requests()
    ns_seq, ns_batch = unique_namespace("fseq"), unique_namespace("fbatch")
    await _prepare(backend, ns_seq)
    await _prepare(backend, ns_batch)
    sequential = [await backend.fetch(ns_seq, key, tags, LEASE_TTL) for key, tags in reqs]
    batched = await _in_one_batch(
        backend, ns_batch, [backend.fetch(ns_batch, k, t, LEASE_TTL) for k, t in reqs]
    )
    assert await _check(store, ns_batch, reqs, batched) == await _check(store, ns_seq, reqs, sequential)
    # The leases granted in the batch are real: a fill with one stores.
    dup = next(lk for (k, _), lk in zip(reqs, batched, strict=True) if k == "dup" and lk.lease)
    assert dup.lease is not None
    assert await backend.fill(ns_batch, "dup", b"filled", 60, TAGS, dup.tokens, dup.lease, dup.epoch)
    assert await backend.get(ns_batch, "dup") == b"filled"
    await backend.clear(ns_seq)
    await backend.clear(ns_batch)


async def test_gets_and_fetches_in_one_tick(store: Store) -> None:
    backend = store.backend
    ns = unique_namespace("fmix")
    await _prepare(backend, ns)
    calls: list[Any] = []
    for i in range(10):
        calls.append(backend.get(ns, f"h{i}"))
        calls.append(backend.fetch(ns, f"h{i}", TAGS, LEASE_TTL))
        calls.append(backend.get(ns, f"m{i}"))
        calls.append(backend.fetch(ns, f"m{i}", TAGS, LEASE_TTL))
    results = await _in_one_batch(backend, ns, calls)
    for i in range(10):
        get_hit, fetch_hit, get_miss, fetch_miss = results[4 * i : 4 * i + 4]
        assert get_hit == fetch_hit.payload == b"payload-%d" % i
        assert get_miss is None
        assert fetch_miss.payload is None and fetch_miss.lease is not None
    await backend.clear(ns)


async def test_foreign_data_in_a_batch_is_a_miss_for_that_key_only(store: Store) -> None:
    backend = store.backend
    ns = unique_namespace("fforeign")
    await _prepare(backend, ns)
    await store.raw.set(store.key(ns, "e", "foreign"), b"not tagcache's")
    got = await _in_one_batch(
        backend,
        ns,
        [
            backend.fetch(ns, "h1", TAGS, LEASE_TTL),
            backend.fetch(ns, "foreign", TAGS, LEASE_TTL),
            backend.fetch(ns, "h2", TAGS, LEASE_TTL),
            backend.fetch(ns, "missing", TAGS, LEASE_TTL),
        ],
    )
    assert got[0].payload == b"payload-1"
    assert got[1].payload is None and got[1].lease is not None
    assert got[2].payload == b"payload-2"
    assert got[3].payload is None and got[3].lease is not None
    # The fill replaces the foreign value.
    assert await backend.fill(ns, "foreign", b"mine", 60, TAGS, got[1].tokens, got[1].lease, got[1].epoch)
    assert await backend.get(ns, "foreign") == b"mine"
    await backend.clear(ns)


# -- on the wire ----------------------------------------------------------------------


@pytest.fixture
async def wired(redis_url: str) -> AsyncIterator[tuple[Wire, RedisBackend, Any]]:
    async with Wire(redis_url) as wire:
        backend = RedisBackend.from_url(wire.url, socket_timeout=TIMEOUT)
        raw = aioredis.Redis.from_url(redis_url)
        try:
            yield wire, backend, raw
        finally:
            await backend.aclose()
            await raw.aclose()


@pytest.mark.redis
async def test_fifty_fetches_share_one_round_trip(wired: tuple[Wire, RedisBackend, Any]) -> None:
    wire, backend, _ = wired
    ns = unique_namespace("fwire")
    await _prepare(backend, ns)
    await backend.get(ns, "warm")
    wire.reset()
    calls = [backend.fetch(ns, f"h{i % 10}", TAGS, LEASE_TTL) for i in range(25)]
    calls += [backend.fetch(ns, f"m{i}", TAGS, LEASE_TTL) for i in range(25)]
    calls += [backend.get(ns, f"h{i}") for i in range(10)]
    results = await _in_one_batch(backend, ns, calls)
    assert wire.turns == 2  # the read in flight, then one batch
    assert all(r.payload is not None for r in results[:25])
    assert all(r.lease is not None for r in results[25:50])
    await backend.clear(ns)


async def _wait_released(backend: RedisBackend) -> None:
    """Wait for the backend's background lease releases."""
    while backend._st.retries:
        await asyncio.gather(*backend._st.retries, return_exceptions=True)


@pytest.mark.redis
@pytest.mark.parametrize("when", ["queued", "sent"])
async def test_cancelled_coalesced_fetch_releases_its_lease(redis_url: str, when: str) -> None:
    backend = RedisBackend.from_url(redis_url, socket_timeout=TIMEOUT)
    raw = aioredis.Redis.from_url(redis_url)
    ns = unique_namespace("fcancel")
    try:
        await backend.get(ns, "warm")  # connection and scripts ready
        front = asyncio.ensure_future(backend.get(ns, "in-flight"))
        await asyncio.sleep(0)  # (one tick, not a timing wait: the direct read is sent)
        others = [asyncio.ensure_future(backend.fetch(ns, "other", TAGS, LEASE_TTL)) for _ in range(3)]
        victim = asyncio.ensure_future(backend.fetch(ns, "k", TAGS, LEASE_TTL))
        await asyncio.sleep(0)  # the fetches queue behind the read in flight
        assert backend._st.queued_fetches
        if when == "queued":
            victim.cancel()
            await front
        else:
            await front
            # The batch was taken from the queue (the task sending it ran first).
            assert not backend._st.queued_fetches
            victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        lookups = await asyncio.gather(*others)
        assert sum(lk.lease is not None for lk in lookups) == 1
        await _wait_released(backend)
        assert not await raw.exists(f"tc:{{{ns}:0}}:l:k")
        await backend.clear(ns)
    finally:
        await backend.aclose()
        await raw.aclose()
