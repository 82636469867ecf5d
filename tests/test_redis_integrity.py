"""The Redis backend never trusts what it reads and keeps memory bounded.

* Under ``noeviction`` a script that may add data is refused before it writes
  anything once memory is full; reads and deletes still run.
* An entry found stale on read is deleted, so one without expiry does not
  outlive the invalidation of its tags.
* Foreign data under any tagcache key (a malformed entry stamp, junk under a
  lease, token, generation, epoch or wait-mark key) is a miss or is replaced,
  never a hit, a crash or a wait.
* A server restarted from a snapshot (which brings back old tokens and
  entries) is detected: everything written before is a miss.

Tests that need no server behaviour fakeredis lacks run against both fakeredis
and a real Redis; the rest need a real ``redis-server`` (a throwaway one where
the test restarts it or limits its memory).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from tagcache import BackendError, Cache
from tagcache.backends.redis import _FLAGGED, _PLAIN, RedisBackend

from tests.redis_server import RedisProcess

GEN = "\x01gen"
#: No test here is about timeouts: a loaded machine must not turn a slow reply into a failure.
TIMEOUT = 5.0


@dataclass
class Store:
    """A server seen two ways: backends made by ``make`` and a plain client ``raw``."""

    kind: str
    raw: Any
    make: Callable[[], RedisBackend]


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    made: list[Any] = []
    if request.param == "fakeredis":
        import fakeredis

        server = fakeredis.FakeServer(version=7)

        def make() -> RedisBackend:
            client = fakeredis.FakeAsyncRedis(server=server)
            made.append(client)
            backend = RedisBackend(client)
            made.append(backend)
            return backend

        raw: Any = fakeredis.FakeAsyncRedis(server=server)
    else:
        url = request.getfixturevalue("redis_url")

        def make() -> RedisBackend:
            backend = RedisBackend.from_url(url, socket_timeout=TIMEOUT)
            made.append(backend)
            return backend

        raw = aioredis.Redis.from_url(url)
    yield Store(str(request.param), raw, make)
    for obj in reversed(made):
        await obj.aclose()
    await raw.aclose()


@pytest.fixture
async def ns(store: Store) -> AsyncIterator[str]:
    """A unique namespace; its keys are removed afterwards."""
    name = f"ri{uuid.uuid4().hex[:12]}"
    yield name
    async for key in store.raw.scan_iter(match=f"tc:{{{name}:*", count=500):
        await store.raw.unlink(key)


def key_of(ns: str, kind: str, name: str) -> str:
    return f"tc:{{{ns}:0}}:{kind}:{name}"


async def loaded(value: object) -> object:
    return value


def loader(value: object) -> Callable[[], Awaitable[object]]:
    return lambda: loaded(value)


# -- 1. memory is checked before a script writes ---------------------------------------


async def used_memory(raw: aioredis.Redis) -> int:
    return int((await raw.info("memory"))["used_memory"])


@pytest.mark.redis
async def test_a_full_server_refuses_writes_before_they_write(
    redis_process: Callable[..., RedisProcess],
) -> None:
    server = redis_process("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    raw = aioredis.Redis.from_url(server.url)
    limit = int((await raw.config_get("maxmemory"))["maxmemory"])
    value = "x" * 100_000
    entry = len(value) + 2  # its JSON
    ns = "oom"
    cache = Cache(RedisBackend.from_url(server.url, socket_timeout=TIMEOUT), namespace=ns)
    try:
        stored = 0
        refused: BackendError | None = None
        for i in range(250):  # 25 MB, far beyond the limit
            try:
                await cache.set(f"k{i}", value, ttl=None, tags=["all", f"own{i}"])
            except BackendError as exc:
                refused = exc
                break
            stored += 1
            # Refused once full: memory never exceeds the limit by more than one entry.
            assert await used_memory(raw) <= limit + 1.5 * entry, f"after {stored} entries"
        assert refused is not None
        assert "OutOfMemoryError" in str(refused)
        assert stored >= 5
        # Nothing of the refused write was made: no entry, no token for its new tag.
        assert not await raw.exists(key_of(ns, "e", f"k{stored}"))
        assert not await raw.exists(key_of(ns, "t", f"own{stored}"))
        assert await raw.exists(key_of(ns, "e", f"k{stored - 1}"))

        # Reads and deletes still run when memory is full, and free it.
        assert await cache.get("k0") == value
        assert await cache.delete("k0") is True
        await cache.invalidate_tags(["all"])
        assert [await cache.get(f"k{i}") for i in range(1, stored)] == [None] * (stored - 1)
        assert [await raw.exists(key_of(ns, "e", f"k{i}")) for i in range(stored)] == [0] * stored
        await cache.set("again", value, tags=["all"])
        assert await cache.get("again") == value
    finally:
        await cache.aclose()
        await raw.aclose()


def test_scripts_declare_their_flags() -> None:
    """Scripts that may add data keep the default (deny-oom); those that only read or free
    memory may run when it is full; peek writes nothing."""
    expected = {
        "fetch": b"#!lua\n",
        "lease": b"#!lua\n",
        "set": b"#!lua\n",
        "fill": b"#!lua\n",
        "read": b"#!lua flags=allow-oom\n",
        "release": b"#!lua flags=allow-oom\n",
        "delete": b"#!lua flags=allow-oom\n",
        "verify": b"#!lua flags=allow-oom\n",
        "peek": b"#!lua flags=no-writes\n",
    }
    for name, shebang in expected.items():
        assert _FLAGGED.sources[name].startswith(shebang), name
        assert _PLAIN.sources[name] == _FLAGGED.sources[name][len(shebang) :], name


async def test_the_script_variant_follows_the_server(store: Store, ns: str) -> None:
    backend = store.make()
    # Commands built and queued before the scripts were ever loaded all succeed.
    results = await asyncio.gather(
        *(backend.get(ns, f"k{i}") for i in range(10)),
        backend.fetch(ns, "f", ["t"], 5),
        backend.set(ns, "s", b"v", 60, ["t"]),
    )
    assert results[:10] == [None] * 10
    miss = results[10]
    assert miss.lease is not None
    assert await backend.fill(ns, "f", b"filled", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get(ns, "f") == b"filled"
    # Real Redis runs the flagged scripts; fakeredis rejects the shebang and gets the plain ones.
    assert backend._scripts is (_FLAGGED if store.kind == "redis" else _PLAIN)


# -- 2. an entry found stale on read is deleted ----------------------------------------------


async def test_a_stale_entry_is_deleted_by_the_read_that_finds_it(store: Store, ns: str) -> None:
    cache = Cache(store.make(), namespace=ns)
    await cache.set("forever", 1, ttl=None, tags=["t"])
    assert await cache.get("forever") == 1
    await cache.invalidate_tags(["t"])
    assert await cache.get("forever") is None
    assert not await store.raw.exists(key_of(ns, "e", "forever"))

    # A token missing (expired, evicted) is a mismatch too.
    await cache.set("other", 2, ttl=None, tags=["u"])
    await store.raw.delete(key_of(ns, "t", "u"))
    assert await cache.get("other") is None
    assert not await store.raw.exists(key_of(ns, "e", "other"))


async def test_a_stale_entry_is_deleted_by_a_fetch(store: Store, ns: str) -> None:
    backend = store.make()
    await backend.set(ns, "forever", b"v", None, ["t"])
    await backend.invalidate(ns, ["t"])
    miss = await backend.fetch(ns, "forever", ["t"], 5)
    assert miss.payload is None
    assert miss.lease is not None
    assert not await store.raw.exists(key_of(ns, "e", "forever"))
    # A valid entry stays.
    await backend.set(ns, "kept", b"v", None, ["t"])
    assert (await backend.fetch(ns, "kept", ["t"], 5)).payload == b"v"
    assert await store.raw.exists(key_of(ns, "e", "kept"))


# -- 3. a malformed stamp is foreign data ------------------------------------------------------


MALFORMED = {
    "no pairs": {"p": b"v", "t": b"\n"},
    "odd parts": {"p": b"v", "t": f"{GEN}\ng\nt".encode()},
    "a lone tag": {"p": b"v", "t": b"t"},
    "empty token": {"p": b"v", "t": f"{GEN}\n\nt\nx".encode()},
    "empty tag": {"p": b"v", "t": f"{GEN}\ng\n\nx".encode()},
    "trailing separator": {"p": b"v", "t": f"{GEN}\ng\n".encode()},
    "leading separator": {"p": b"v", "t": f"\n{GEN}\ng".encode()},
    "too many pairs": {"p": b"v", "t": "\n".join(["t\nx"] * 300).encode()},
    "no stamp": {"p": b"v"},
    "no payload": {"t": f"{GEN}\ng".encode()},
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
async def test_a_malformed_stamp_is_an_error_and_a_miss(store: Store, ns: str, shape: str) -> None:
    backend = store.make()
    cache = Cache(backend, namespace=ns)
    await store.raw.hset(key_of(ns, "e", "k"), mapping=MALFORMED[shape])
    assert await backend.get(ns, "k") == b""
    assert list(await asyncio.gather(backend.get(ns, "k"), backend.get(ns, "absent"))) == [b"", None]
    assert await cache.get("k") is None
    assert (await cache.stats()).errors == 1
    assert await backend.peek(ns, "k") is None
    miss = await backend.fetch(ns, "k", ["t"], 5)
    assert miss.payload is None
    assert miss.lease is not None
    assert await backend.fill(ns, "k", b"replaced", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get(ns, "k") == b"replaced"


async def test_one_batch_judges_each_entry_on_its_own(store: Store, ns: str) -> None:
    backend = store.make()
    await backend.set(ns, "tagged", b"1", 60, ["t", "u"])
    await backend.set(ns, "untagged", b"2", 60, [])
    await backend.set(ns, "stale", b"3", 60, ["v"])
    await backend.invalidate(ns, ["v"])
    await store.raw.hset(key_of(ns, "e", "old"), mapping={"p": b"4", "t": b"t\nx"})  # no generation
    await store.raw.hset(key_of(ns, "e", "malformed"), mapping={"p": b"5", "t": b"\n"})
    names = ["tagged", "stale", "untagged", "old", "malformed", "absent"]
    # The first get goes out alone; the others travel together in one script call.
    replies = await asyncio.gather(*(backend.get(ns, name) for name in ["tagged", *names, *names]))
    assert replies[1:] == [b"1", None, b"2", None, b"", None] * 2
    assert not await store.raw.exists(key_of(ns, "e", "stale"))
    assert not await store.raw.exists(key_of(ns, "e", "old"))


async def test_peek_never_fails_on_bytes_it_reads(store: Store, ns: str) -> None:
    backend = store.make()
    # Well-formed pairs, but not UTF-8 and without a generation: a stale entry.
    await store.raw.hset(key_of(ns, "e", "k"), mapping={"p": b"v", "t": b"\xff\xfe\nab"})
    info = await backend.peek(ns, "k")
    assert info is not None
    assert info.payload == b"v"
    assert info.tags == ("\ufffd\ufffd",)
    assert not info.valid


# -- 4. junk under lease, token, generation, epoch and wait-mark keys ---------------------------


async def put_string(raw: Any, key: str, value: bytes, px: int | None = None) -> None:
    await raw.set(key, value, px=px)


async def put_list(raw: Any, key: str) -> None:
    await raw.delete(key)
    await raw.rpush(key, b"junk")


async def put_hash(raw: Any, key: str) -> None:
    await raw.delete(key)
    await raw.hset(key, "f", b"junk")


LEASE_JUNK: dict[str, Callable[[Any, str], Awaitable[Any]]] = {
    "a string without expiry": lambda raw, k: put_string(raw, k, b"junk"),
    "a lease-shaped string without expiry": lambda raw, k: put_string(raw, k, b"0" * 32),
    "a string of another shape": lambda raw, k: put_string(raw, k, b"junk", px=600_000),
    "a list": put_list,
    "a hash": put_hash,
}


@pytest.mark.parametrize("junk", sorted(LEASE_JUNK))
async def test_junk_under_a_lease_key_is_taken_over(store: Store, ns: str, junk: str) -> None:
    backend = store.make()
    await LEASE_JUNK[junk](store.raw, key_of(ns, "l", "k"))
    miss = await backend.fetch(ns, "k", ["t"], 5)
    assert miss.lease is not None
    assert await backend.fill(ns, "k", b"v", 60, ["t"], miss.tokens, miss.lease)
    assert await backend.get(ns, "k") == b"v"

    await LEASE_JUNK[junk](store.raw, key_of(ns, "l", "r"))
    refresh = await backend.lease(ns, "r", ["t"], 5)
    assert refresh.lease is not None

    # Through the cache: no wait for a lease nobody holds (the default lease_ttl is 10 s).
    cache = Cache(backend, namespace=ns)
    await LEASE_JUNK[junk](store.raw, key_of(ns, "l", "c"))
    assert await asyncio.wait_for(cache.get_or_set("c", loader("loaded"), tags=["t"]), 3) == "loaded"
    assert await cache.get("c") == "loaded"


async def test_a_lease_another_caller_holds_is_respected(store: Store, ns: str) -> None:
    backend = store.make()
    first = await backend.fetch(ns, "k", ["t"], 5)
    assert first.lease is not None
    assert (await backend.fetch(ns, "k", ["t"], 5)).lease is None
    assert (await backend.lease(ns, "k", ["t"], 5)).lease is None
    assert await backend.fill(ns, "k", b"v", 60, ["t"], first.tokens, first.lease)


TOKEN_JUNK: dict[str, Callable[[Any, str], Awaitable[Any]]] = {
    "a list": put_list,
    "a hash": put_hash,
    "a newline": lambda raw, k: put_string(raw, k, b"ab\ncd"),
    "bytes that are not UTF-8": lambda raw, k: put_string(raw, k, b"\xff\xfe"),
    "an empty string": lambda raw, k: put_string(raw, k, b""),
    "a long string": lambda raw, k: put_string(raw, k, b"a" * 1000),
}


@pytest.mark.parametrize("where", ["tag token", "generation", "epoch"])
@pytest.mark.parametrize("junk", sorted(TOKEN_JUNK))
async def test_junk_under_a_token_key_is_replaced(store: Store, ns: str, junk: str, where: str) -> None:
    key = {
        "tag token": key_of(ns, "t", "t"),
        "generation": key_of(ns, "t", GEN),
        "epoch": key_of(ns, "v", ""),
    }[where]
    cache = Cache(store.make(), namespace=ns)
    await TOKEN_JUNK[junk](store.raw, key)
    await cache.set("k", 1, tags=["t"])
    assert await cache.get("k") == 1

    await TOKEN_JUNK[junk](store.raw, key)
    assert await cache.get_or_set("m", loader("m"), tags=["t"]) == "m"
    assert await cache.get_or_set("m", loader("other"), tags=["t"]) == "m"  # stored
    value = await store.raw.get(key)  # replaced by a token of tagcache's own shape
    assert value is not None
    assert len(value) <= 64
    assert value.decode().replace(":", "").isalnum()

    await TOKEN_JUNK[junk](store.raw, key)
    calls: list[int] = []

    @cache.cached(ttl=60, tags=lambda result, **args: ["t"])  # tags known from the result
    async def compute(x: int) -> int:
        calls.append(x)
        return x

    assert [await compute(7), await compute(7)] == [7, 7]
    assert calls == [7]  # stored, then a hit

    await cache.invalidate_tags(["t"])
    assert await cache.get("m") is None
    assert (await cache.stats()).errors == 0


@pytest.mark.parametrize("junk", sorted(LEASE_JUNK))
async def test_junk_under_a_wait_mark_breaks_nothing(store: Store, ns: str, junk: str) -> None:
    holder, waiter = store.make(), store.make()
    for name in ("k", "d"):
        await LEASE_JUNK[junk](store.raw, key_of(ns, "w", name))
    cache = Cache(holder, namespace=ns)
    await cache.set("k", 1, tags=["t"])  # signals (and drops) the mark
    assert not await store.raw.exists(key_of(ns, "w", "k"))
    assert await cache.delete("d") is False
    assert not await store.raw.exists(key_of(ns, "w", "d"))

    await LEASE_JUNK[junk](store.raw, key_of(ns, "w", "f"))
    held = await holder.fetch(ns, "f", ["t"], 5)
    assert held.lease is not None
    async with waiter.watch(ns, "f") as watch:
        seen = await waiter.fetch(ns, "f", ["t"], 5)
        assert seen.lease is None  # marks the key as waited for, replacing the junk
        assert await holder.fill(ns, "f", b"v", 60, ["t"], held.tokens, held.lease)
        assert await watch.wait(5)
    assert await waiter.get(ns, "f") == b"v"


# -- 5. restarts and failovers ----------------------------------------------------------------


GET_IN_A_NEW_PROCESS = """
import asyncio, sys
from tagcache.backends import RedisBackend

async def main():
    async with RedisBackend.from_url(sys.argv[1], socket_timeout=5.0) as backend:
        print(repr(await backend.get(sys.argv[2], sys.argv[3])))

asyncio.run(main())
"""


async def get_in_a_new_process(url: str, ns: str, key: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GET_IN_A_NEW_PROCESS, url, ns, key, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    return out.strip()


@pytest.mark.redis
async def test_a_restart_from_a_snapshot_serves_no_stale_entry(
    redis_process: Callable[..., RedisProcess],
) -> None:
    server = redis_process()
    ns = "restart"
    backend = RedisBackend.from_url(server.url, socket_timeout=TIMEOUT)
    try:
        await backend.set(ns, "k", b"old", None, ["t"])
        await backend.set(ns, "u", b"untagged", 60, [])
        held = await backend.fetch(ns, "f", ["t"], 30)  # a fill in flight across the restart
        assert held.lease is not None
        assert await backend.get(ns, "k") == b"old"
        server.snapshot()
        await backend.invalidate(ns, ["t"])
        assert await backend.get(ns, "k") is None

        server.kill()
        server.start()  # loads the snapshot: the old token, the old entry, the lease
        raw = aioredis.Redis.from_url(server.url)
        try:
            assert await raw.exists(key_of(ns, "e", "k"))
        finally:
            await raw.aclose()

        assert await backend.get(ns, "k") is None  # the same backend, reconnected
        async with RedisBackend.from_url(server.url, socket_timeout=TIMEOUT) as other:  # another process, say
            assert await other.get(ns, "k") is None
            assert await other.get(ns, "u") is None  # one cold cache: every old entry
        assert await get_in_a_new_process(server.url, ns, "k") == b"None"
        assert not await backend.fill(ns, "f", b"loaded before", 60, ["t"], held.tokens, held.lease)
        assert await backend.get(ns, "f") is None

        # Everything works on: writes, hits, fills, invalidations.
        await backend.set(ns, "k", b"new", 60, ["t"])
        assert await backend.get(ns, "k") == b"new"
        miss = await backend.fetch(ns, "f", ["t"], 5)
        assert miss.lease is not None
        assert await backend.fill(ns, "f", b"f", 60, ["t"], miss.tokens, miss.lease)
        assert await backend.get(ns, "f") == b"f"
        await backend.invalidate(ns, ["t"])
        assert await backend.get(ns, "k") is None
    finally:
        await backend.aclose()


@pytest.mark.redis
async def test_processes_drop_the_generation_once(redis_process: Callable[..., RedisProcess]) -> None:
    server = redis_process()
    ns = "once"
    async with RedisBackend.from_url(server.url, socket_timeout=TIMEOUT) as first:
        await first.set(ns, "k", b"old", 60, ["t"])
        server.snapshot()
        server.kill()
        server.start()
        assert await first.get(ns, "k") is None  # dropped the restored generation
        await first.set(ns, "new", b"new", 60, ["t"])
        async with RedisBackend.from_url(server.url, socket_timeout=TIMEOUT) as second:
            # The second process checks too, and keeps the generation the first one made.
            assert await second.get(ns, "new") == b"new"
            assert await second.get(ns, "k") is None
        assert await first.get(ns, "new") == b"new"


@pytest.mark.redis
async def test_a_namespace_first_used_after_the_restart_is_checked_first(
    redis_process: Callable[..., RedisProcess],
) -> None:
    server = redis_process()
    async with RedisBackend.from_url(server.url, socket_timeout=TIMEOUT) as writer:
        await writer.set("late", "k", b"old", 60, ["t"])
        server.snapshot()
        await writer.invalidate("late", ["t"])
    server.kill()
    server.start()
    async with RedisBackend.from_url(server.url, socket_timeout=TIMEOUT) as reader:
        assert await reader.get("early", "x") is None  # scripts loaded, "early" checked
        assert await reader.get("late", "k") is None


@pytest.mark.redis
async def test_a_restart_without_data_change_costs_one_cold_cache(
    redis_process: Callable[..., RedisProcess],
) -> None:
    server = redis_process()
    ns = "calm"
    cache = Cache(RedisBackend.from_url(server.url, socket_timeout=TIMEOUT), namespace=ns)
    try:
        await cache.set("k", 1, tags=["t"])
        server.snapshot()
        server.kill()
        server.start()
        assert await cache.get("k") is None
        assert await cache.get_or_set("k", loader(2), tags=["t"]) == 2
        assert await cache.get("k") == 2

        # A restart with no snapshot at all (an empty server) drops nothing it need not.
        server.kill()
        server.start()
        assert await cache.get("k") is None
        await cache.set("k", 3, tags=["t"])
        assert await cache.get("k") == 3
        await cache.invalidate_tags(["t"])
        assert await cache.get("k") is None
    finally:
        await cache.aclose()


async def command_calls(raw: aioredis.Redis) -> dict[str, int]:
    return {name: int(stat["calls"]) for name, stat in (await raw.info("commandstats")).items()}


@pytest.mark.redis
async def test_normal_operation_costs_no_extra_command(redis_process: Callable[..., RedisProcess]) -> None:
    server = redis_process()
    raw = aioredis.Redis.from_url(server.url)
    cache = Cache(RedisBackend.from_url(server.url, socket_timeout=TIMEOUT), namespace="steady")
    try:
        await cache.set("warm", 0, tags=["t"])  # connect, check the namespace, load the scripts
        before = await command_calls(raw)
        for i in range(20):
            await cache.set(f"k{i}", i, tags=["t"])
            assert await cache.get(f"k{i}") == i
            assert await cache.get_or_set(f"m{i}", loader(i), tags=["t"]) == i  # read, fetch, fill
        await cache.invalidate_tags(["t"])
        after = await command_calls(raw)
        delta = {name: after.get(name, 0) - count for name, count in before.items()}
        delta.update({name: count for name, count in after.items() if name not in before})
        assert delta["cmdstat_evalsha"] == 20 * (1 + 1 + 2)
        assert delta.get("cmdstat_script|load", 0) == 0
        assert delta["cmdstat_info"] == 1  # the one above: no server check in normal operation
    finally:
        await cache.aclose()
        await raw.aclose()
