"""Redis-specific behaviour of RedisBackend, against a real Redis server.

Round trips are counted on the wire by a loopback proxy (tests/wire.py).
The behaviour every backend shares is in tests/test_contract.py.
"""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tagcache.backends.base import Backend
from tagcache.backends.redis import RedisBackend
from tagcache.exceptions import BackendError, ConfigurationError
from tagcache.tags import glob_escape

from tests.redis_server import free_port
from tests.wire import Wire, count_turns

pytestmark = pytest.mark.redis


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client on the test database, for looking behind the backend's back."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def ns(raw: aioredis.Redis) -> AsyncIterator[str]:
    """A unique namespace; its keys are removed afterwards."""
    name = f"rb{uuid.uuid4().hex[:12]}"
    yield name
    async for key in raw.scan_iter(match=f"tc:{{{name}*", count=500):
        await raw.unlink(key)


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[RedisBackend]:
    async with RedisBackend.from_url(redis_url) as b:
        yield b


@pytest.fixture
async def wire(redis_url: str) -> AsyncIterator[Wire]:
    async with count_turns(redis_url) as w:
        yield w


async def namespace_keys(raw: aioredis.Redis, ns: str) -> list[bytes]:
    return [key async for key in raw.scan_iter(match=f"tc:{{{glob_escape(ns)}:*", count=500)]


def test_is_a_backend() -> None:
    assert issubclass(RedisBackend, Backend)


# -- round trips, counted on the wire -------------------------------------------


async def test_round_trips(wire: Wire, ns: str) -> None:
    async with RedisBackend.from_url(wire.url_for()) as b:
        # Warm up: connect and load the scripts.
        await b.set(ns, "warm", b"w", 60, ["t1"])
        assert await b.get(ns, "warm") == b"w"
        connections = wire.connections

        wire.reset()
        await b.set(ns, "k", b"v", 60, ["t1", "t2"])
        assert wire.turns == 1

        wire.reset()
        assert await b.get(ns, "k") == b"v"
        assert wire.turns == 1

        wire.reset()
        assert (await b.fetch(ns, "k", ["t1", "t2"], 5)).payload == b"v"
        assert wire.turns == 1

        wire.reset()
        miss = await b.fetch(ns, "m", ["t1", "t3"], 5)
        assert miss.payload is None
        assert miss.lease is not None
        assert await b.fill(ns, "m", b"loaded", 60, ["t1", "t3"], miss.tokens, miss.lease)
        assert wire.turns == 2

        wire.reset()
        await b.invalidate(ns, ["t1", "t2", "t3"])
        assert wire.turns == 1
        assert await b.get(ns, "k") is None

        wire.reset()
        assert await b.get(ns, "absent") is None
        assert wire.turns == 1
        assert wire.connections == connections


async def test_concurrent_gets_share_one_turn(wire: Wire, ns: str) -> None:
    async with RedisBackend.from_url(wire.url_for()) as b:
        for i in range(20):
            await b.set(ns, f"k{i}", b"v%d" % i, 60, ["t"])
        assert await b.get(ns, "k0") == b"v0"

        # The first caller goes out at once (a lone caller never waits for a
        # batch); the 19 issued while it is in flight travel together.
        wire.reset()
        results = await asyncio.gather(*(b.get(ns, f"k{i}") for i in range(20)))
        assert results == [b"v%d" % i for i in range(20)]
        assert wire.turns == 2

        # Reads queued behind an in-flight read: N of them cost one turn,
        # duplicates and fetches included.
        wire.hold()
        wire.reset()
        first = asyncio.create_task(b.get(ns, "k0"))
        await wire.wait_turns(1)
        wire.reset()
        queued = [asyncio.create_task(b.get(ns, f"k{i % 20}")) for i in range(50)]
        fetches = [asyncio.create_task(b.fetch(ns, f"k{i}", ["t"], 5)) for i in range(3)]
        await asyncio.sleep(0)  # one tick: each task queues its read in its first step
        assert wire.turns == 0  # and nothing is sent while a read is in flight
        wire.release()
        assert await first == b"v0"
        assert await asyncio.gather(*queued) == [b"v%d" % (i % 20) for i in range(50)]
        assert [f.payload for f in await asyncio.gather(*fetches)] == [b"v0", b"v1", b"v2"]
        assert wire.turns == 1


async def test_invalidate_is_one_turn_over_buckets(wire: Wire, ns: str) -> None:
    async with RedisBackend.from_url(wire.url_for(), buckets=4) as b:
        for i in range(20):
            await b.set(ns, f"k{i}", b"v", 60, ["t", "u"])
        wire.reset()
        await b.invalidate(ns, ["t", "u"])
        assert wire.turns == 1
        assert await asyncio.gather(*(b.get(ns, f"k{i}") for i in range(20))) == [None] * 20


# -- scripts ---------------------------------------------------------------------


async def test_noscript_recovery(backend: RedisBackend, raw: aioredis.Redis, ns: str) -> None:
    await backend.set(ns, "k", b"v", 60, ["t"])
    assert await backend.get(ns, "k") == b"v"

    await raw.script_flush()
    assert await backend.get(ns, "k") == b"v"

    await raw.script_flush()
    results = await asyncio.gather(*(backend.get(ns, "k") for _ in range(10)), backend.get(ns, "x"))
    assert results == [b"v"] * 10 + [None]

    await raw.script_flush()
    miss = await backend.fetch(ns, "m", ["t"], 5)
    assert miss.lease is not None
    await raw.script_flush()
    assert await backend.fill(ns, "m", b"m", 60, ["t"], miss.tokens, miss.lease)
    await raw.script_flush()
    info = await backend.peek(ns, "m")
    assert info is not None
    assert info.payload == b"m"
    assert info.valid


async def test_every_written_key_has_a_ttl(backend: RedisBackend, raw: aioredis.Redis, ns: str) -> None:
    await backend.set(ns, "timed", b"v", 60, ["a", "b"])
    await backend.set(ns, "forever", b"v", None, ["p"])
    await backend.fetch(ns, "leased", ["a", "c"], 5)  # a lease and a new token "c"
    miss = await backend.fetch(ns, "filled", ["d"], 5)
    assert miss.lease is not None
    assert await backend.fill(ns, "filled", b"v", 30, ["d"], miss.tokens, miss.lease)
    miss = await backend.fetch(ns, "released", ["e"], 5)
    assert miss.lease is not None
    await backend.release(ns, "released", miss.lease)
    await backend.invalidate(ns, ["b"])
    await backend.fetch(ns, "timed", ["a", "b"], 5)  # recreates "b", takes a lease

    prefix = f"tc:{{{ns}:0}}:".encode()
    persistent = set()
    keys = await namespace_keys(raw, ns)
    assert len(keys) >= 8
    for key in keys:
        ttl = await raw.pttl(key)
        assert ttl != -2, key
        if ttl == -1:
            persistent.add(key)
    # The entry without expiry, its tag's token and the namespace's generation token.
    assert persistent == {prefix + b"e:forever", prefix + b"t:p", prefix + b"t:\x01gen"}


async def test_ttl_none_entry_makes_its_tokens_persist(
    backend: RedisBackend, raw: aioredis.Redis, ns: str
) -> None:
    await backend.set(ns, "a", b"v", 1, ["t"])
    token = f"tc:{{{ns}:0}}:t:t"
    assert await raw.pttl(token) > 0
    await backend.set(ns, "b", b"v", None, ["t"])
    assert await raw.pttl(token) == -1
    # A shorter-lived entry never shortens or re-expires the token.
    await backend.set(ns, "c", b"v", 5, ["t"])
    assert await raw.pttl(token) == -1
    assert await backend.get(ns, "a") == b"v"


# -- connections -------------------------------------------------------------------


async def _busy_caller(b: RedisBackend, ns: str, i: int) -> None:
    key = f"k{i % 50}"
    kind = i % 4
    if kind == 0:
        await b.set(ns, key, b"v", 60, ["t"])
    elif kind == 1:
        assert await b.get(ns, key) in (b"v", b"f", None)
    elif kind == 2:
        miss = await b.fetch(ns, f"f{i}", ["t"], 5)
        if miss.lease is not None:
            await b.fill(ns, f"f{i}", b"f", 60, ["t"], miss.tokens, miss.lease)
    else:
        if i % 40 == 3:
            await b.invalidate(ns, ["t"])
        info = await b.peek(ns, key)
        assert info is None or info.payload == b"v"


async def test_thousand_concurrent_callers_with_few_connections(redis_url: str, ns: str) -> None:
    # A 5 s socket timeout: 1000 callers over 3 connections on a loaded machine may wait long.
    async with RedisBackend.from_url(redis_url, max_connections=3, socket_timeout=5.0) as b:
        await asyncio.gather(*(_busy_caller(b, ns, i) for i in range(1000)))
        assert b._held <= 3


async def test_thousand_callers_over_a_smaller_plain_pool(redis_url: str, ns: str) -> None:
    # The client's own pool (a plain ConnectionPool) allows fewer connections
    # than the backend: callers queue for the backend's connections instead
    # of seeing "Too many connections".
    client = aioredis.Redis.from_url(redis_url, max_connections=2)
    async with RedisBackend(client, max_connections=10, socket_timeout=5.0) as b:
        await asyncio.gather(*(_busy_caller(b, ns, i) for i in range(1000)))
    # The client stays usable and got its connections back.
    assert await client.ping()
    await client.aclose()


async def test_decode_responses_client(redis_url: str, ns: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    async with RedisBackend(client) as b:
        payload = b"\xff\x00\x80binary"
        await b.set(ns, "k", payload, 60, ["t"])
        assert await b.get(ns, "k") == payload
        assert list(await asyncio.gather(b.get(ns, "k"), b.get(ns, "k"))) == [payload, payload]
        assert (await b.fetch(ns, "k", ["t"], 5)).payload == payload
        info = await b.peek(ns, "k")
        assert info is not None
        assert info.payload == payload
        assert info.tags == ("t",)
        assert await b.keys(ns, "*", None) == ["k"]
        assert (await b.info()).keys is not None
    # Not owned: the client is still open.
    assert await client.get("tagcache-no-such-key") is None
    await client.aclose()


async def test_connection_refused_is_a_backend_error() -> None:
    async with RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0") as b:
        with pytest.raises(BackendError, match=r"get of key 'user:1'") as caught:
            await b.get("ns", "user:1")
        assert isinstance(caught.value.__cause__, (RedisConnectionError, OSError))
        with pytest.raises(BackendError) as caught:
            await b.set("ns", "k", b"v", 1, [])
        assert caught.value.__cause__ is not None
        with pytest.raises(BackendError):
            await asyncio.gather(*(b.get("ns", f"k{i}") for i in range(5)))


async def test_cancelled_callers_leave_the_backend_working(wire: Wire, ns: str) -> None:
    async with RedisBackend.from_url(wire.url_for()) as b:
        for i in range(10):
            await b.set(ns, f"k{i}", b"v%d" % i, 60, [])
        assert await b.get(ns, "k0") == b"v0"

        wire.hold()
        turns = wire.turns
        lone = asyncio.create_task(b.get(ns, "k0"))
        await wire.wait_turns(turns + 1)  # sent; its reply is held
        queued = [asyncio.create_task(b.get(ns, f"k{i}")) for i in range(1, 10)]
        await asyncio.sleep(0)  # one tick: each task queues its read in its first step
        queued[0].cancel()  # a waiter cancelled before its batch is sent
        lone.cancel()  # cancelled in the middle of reading its reply
        # The batch goes out on a fresh connection: its first bytes on the wire
        # (the replies stay held) show the batch has left the queue.
        await wire.wait_turns(turns + 2)
        queued[4].cancel()  # a waiter cancelled while its batch is in flight
        wire.release()
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert lone.cancelled()
        for i, result in enumerate(results, start=1):
            if i in (1, 5):
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == b"v%d" % i

        # Nothing half-read is left for later callers.
        for _ in range(3):
            assert await asyncio.gather(*(b.get(ns, f"k{i}") for i in range(10))) == [
                b"v%d" % i for i in range(10)
            ]
        assert (await b.fetch(ns, "k3", [], 5)).payload == b"v3"


async def test_cancelled_writer_leaves_no_reply_behind(wire: Wire, ns: str) -> None:
    async with RedisBackend.from_url(wire.url_for(), max_connections=1) as b:
        await b.set(ns, "k", b"old", 60, [])
        wire.hold()
        turns = wire.turns
        writer = asyncio.create_task(b.set(ns, "k", b"new", 60, []))
        await wire.wait_turns(turns + 1)
        writer.cancel()
        wire.release()
        with pytest.raises(asyncio.CancelledError):
            await writer
        # The only connection was dropped and is reconnected; replies line up.
        assert await b.delete(ns, "k") is True
        assert await b.get(ns, "k") is None


# -- data layout ---------------------------------------------------------------------


async def test_foreign_data_under_an_entry_key(backend: RedisBackend, raw: aioredis.Redis, ns: str) -> None:
    await raw.set(f"tc:{{{ns}:0}}:e:str", "foreign")
    await raw.lpush(f"tc:{{{ns}:0}}:e:list", "foreign")
    await backend.set(ns, "ok", b"fine", 60, [])
    assert await backend.get(ns, "str") == b""
    assert await backend.get(ns, "list") == b""
    assert list(
        await asyncio.gather(backend.get(ns, "ok"), backend.get(ns, "str"), backend.get(ns, "ok"))
    ) == [
        b"fine",
        b"",
        b"fine",
    ]
    assert await backend.peek(ns, "str") is None
    miss = await backend.fetch(ns, "str", ["t"], 5)
    assert miss.payload is None
    assert miss.lease is not None
    assert await backend.fill(ns, "str", b"replaced", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get(ns, "str") == b"replaced"


async def test_foreign_data_under_a_token_key(backend: RedisBackend, raw: aioredis.Redis, ns: str) -> None:
    await raw.lpush(f"tc:{{{ns}:0}}:t:t", "foreign")
    await backend.set(ns, "k", b"v", 60, ["t"])
    assert await backend.get(ns, "k") == b"v"
    await raw.delete(f"tc:{{{ns}:0}}:t:t")
    await raw.lpush(f"tc:{{{ns}:0}}:t:t", "foreign")
    assert await backend.get(ns, "k") is None  # an unreadable token is a mismatch
    miss = await backend.fetch(ns, "k", ["t"], 5)
    assert miss.lease is not None
    assert await backend.fill(ns, "k", b"w", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get(ns, "k") == b"w"


async def test_buckets_spread_keys_and_invalidate_reaches_all(
    redis_url: str, raw: aioredis.Redis, ns: str
) -> None:
    async with RedisBackend.from_url(redis_url, buckets=4) as b:
        keys = [f"item:{i}" for i in range(40)]
        for key in keys:
            await b.set(ns, key, key.encode(), 60, ["all"])
        for key in keys:
            bucket = zlib.crc32(key.encode()) % 4
            assert await raw.exists(f"tc:{{{ns}:{bucket}}}:e:{key}")
        used = {zlib.crc32(key.encode()) % 4 for key in keys}
        assert len(used) == 4
        for bucket in used:
            assert await raw.exists(f"tc:{{{ns}:{bucket}}}:t:all")
        assert await asyncio.gather(*(b.get(ns, k) for k in keys)) == [k.encode() for k in keys]
        assert sorted(await b.keys(ns, "item:*", None)) == sorted(keys)
        assert sorted(await b.keys(ns, "item:1?", None)) == [f"item:{i}" for i in range(10, 20)]

        await b.invalidate(ns, ["all"])
        assert await asyncio.gather(*(b.get(ns, k) for k in keys)) == [None] * 40
        for bucket in range(4):
            assert not await raw.exists(f"tc:{{{ns}:{bucket}}}:t:all")
        assert await b.clear(ns) == 0  # the reads deleted the invalidated entries
        assert await namespace_keys(raw, ns) == []


async def test_clear_and_keys_touch_only_the_namespace(redis_url: str, raw: aioredis.Redis, ns: str) -> None:
    other = f"{ns}-other"
    star, plain = f"{ns}a*", f"{ns}ab"
    await raw.set(other, "foreign", ex=60)
    try:
        async with RedisBackend.from_url(redis_url) as b:
            for space in (star, plain):
                await b.set(space, "user:1", b"1", 60, ["t"])
                await b.set(space, "user:2", b"2", 60, ["t"])
                await b.set(space, "item:1", b"i", 60, [])
            await b.fetch(star, "leased", ["t"], 5)
            assert sorted(await b.keys(star, "*", None)) == ["item:1", "user:1", "user:2"]
            assert sorted(await b.keys(star, "user:*", None)) == ["user:1", "user:2"]
            assert await b.keys(star, "user:[2]", None) == ["user:2"]
            assert len(await b.keys(star, "*", 2)) == 2
            assert await b.keys(star, "*", 0) == []

            assert await b.clear(star) == 3
            assert await b.keys(star, "*", None) == []
            assert await namespace_keys(raw, star) == []
            assert sorted(await b.keys(plain, "*", None)) == ["item:1", "user:1", "user:2"]
            assert await b.get(plain, "user:1") == b"1"
            assert await raw.get(other) == b"foreign"
            assert await b.clear(plain) == 3
    finally:
        await raw.delete(other)


async def test_peek_and_info(backend: RedisBackend, ns: str) -> None:
    await backend.set(ns, "k", b"v", 30, ["b", "a"])
    info = await backend.peek(ns, "k")
    assert info is not None
    assert info.payload == b"v"
    assert info.ttl is not None
    assert 0 < info.ttl <= 30
    assert set(info.tags) == {"a", "b"}
    assert info.valid
    await backend.invalidate(ns, ["a"])
    info = await backend.peek(ns, "k")
    assert info is not None
    assert not info.valid
    assert await backend.peek(ns, "absent") is None

    stats = await backend.info()
    assert stats.keys is not None
    assert stats.keys >= 1
    assert stats.memory_bytes is not None
    assert stats.memory_bytes > 0
    assert stats.evictions is not None
    assert "maxmemory_policy" in stats.extra


# -- construction and closing ----------------------------------------------------------


async def test_aclose_is_idempotent_and_closes_only_owned_clients(redis_url: str, ns: str) -> None:
    owned = RedisBackend.from_url(redis_url)
    await owned.set(ns, "k", b"v", 60, [])
    await owned.aclose()
    await owned.aclose()
    with pytest.raises(BackendError):
        await owned.get(ns, "k")

    client = aioredis.Redis.from_url(redis_url)
    async with RedisBackend(client) as b:
        assert await b.get(ns, "k") == b"v"
    await b.aclose()
    assert await client.exists(f"tc:{{{ns}:0}}:e:k") == 1
    await client.aclose()


def test_bad_settings() -> None:
    with pytest.raises(ConfigurationError):
        RedisBackend.from_url("http://127.0.0.1:6379/0")
    client = aioredis.Redis()
    with pytest.raises(ConfigurationError):
        RedisBackend(client, buckets=0)
    with pytest.raises(ConfigurationError):
        RedisBackend(client, max_connections=0)


async def test_unix_and_rediss_urls_are_accepted() -> None:
    for url in ("unix:///tmp/tagcache-no-such.sock?db=0", "rediss://127.0.0.1:1/0"):
        b = RedisBackend.from_url(url)
        await b.aclose()
