"""``RedisClusterBackend`` on a real local Redis Cluster: routing, every-primary operations,
URLs, and a primary that hangs and is replaced by its replica.

The contract suite, the backend wait tests, the stateful test and the stale-read test
also run on the cluster (backend kind ``cluster`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection

from tagcache import BackendError, Cache, ConfigurationError, LocalCache, PartialInvalidationError
from tagcache.backends import Backend, RedisBackend
from tagcache.backends.cluster import RedisClusterBackend
from tagcache.backends.redis import bucket_hash_tag, bucket_index

from tests.conftest import local_cluster, no_redis, unique_namespace
from tests.redis_cluster import (
    Cluster,
    ClusterNode,
    cluster_binaries_available,
    command,
    key_slot,
    make_tls_files,
    redis_cluster,
)

#: Generous bound for a call while a primary hangs: its socket timeout is 0.5 s.
SLOW_CALL = 3.0


def primary_of(cluster: Cluster, ns: str, key: str, buckets: int = 64) -> ClusterNode:
    """The node serving ``key``'s bucket (as of the cluster's last refresh)."""
    return cluster.node_for_key(bucket_hash_tag(ns, bucket_index(key.encode(), buckets)))


# ---------------------------------------------------------------- URLs and construction


def test_from_url_reads_hosts_credentials_and_options() -> None:
    backend = RedisClusterBackend.from_url(
        "redis+cluster://user:p%40ss@127.0.0.1:7000,127.0.0.1:7001/?buckets=16&socket_timeout=0.2"
        "&breaker_failures=5&max_connections=7"
    )
    assert backend.buckets == 16
    health = backend.health()
    assert health["socket_timeout"] == 0.2 and health["breaker"] == "closed"
    tls = Cache.from_url("rediss+cluster://127.0.0.1:7000/", namespace="x")
    assert isinstance(tls.backend, RedisClusterBackend)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+cluster://127.0.0.1:7000/?bukets=4", "unknown parameter"),
        ("redis+cluster://127.0.0.1:7000/2", "database 0 only"),
        ("redis+cluster://127.0.0.1:x/", "invalid host:port"),
        ("redis+cluster://127.0.0.1:7000/?buckets=0", "buckets must be an int from 1 to 4096"),
        ("redis+cluster://127.0.0.1:7000/?socket_timeout=soon", "must be a number"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisClusterBackend.from_url(url)


def test_a_cluster_client_given_to_redis_backend_names_the_cluster_backend() -> None:
    client = aioredis.RedisCluster(host="127.0.0.1", port=7000)
    with pytest.raises(ConfigurationError, match="RedisClusterBackend"):
        RedisBackend(client)


# ---------------------------------------------------------------- on the session's cluster


@pytest.fixture
async def cluster_backend(redis_cluster_url: str) -> AsyncIterator[RedisClusterBackend]:
    backend = RedisClusterBackend.from_url(redis_cluster_url, socket_timeout=5.0)
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_a_redis_cluster_client_can_be_given(redis_cluster: Cluster) -> None:
    client = aioredis.RedisCluster(host="127.0.0.1", port=redis_cluster.port)
    backend = RedisClusterBackend(client)
    cache = Cache(backend, namespace=unique_namespace("given"))
    try:
        await cache.set("k", 1, tags=["t"])
        assert await cache.get("k") == 1
    finally:
        await cache.clear()
        await cache.aclose()
        await client.aclose()


async def test_a_namespace_spreads_over_every_primary_and_clear_reaches_them_all(
    redis_cluster: Cluster, cluster_backend: RedisClusterBackend
) -> None:
    ns, other = unique_namespace("spread"), unique_namespace("other")
    cache = Cache(cluster_backend, namespace=ns, owns_backend=False)
    neighbour = Cache(cluster_backend, namespace=other, owns_backend=False)
    keys = [f"k{n}" for n in range(200)]
    for key in keys:
        await cache.set(key, key, tags=["all"])
    await neighbour.set("kept", 1)
    used = {primary_of(redis_cluster, ns, key).port for key in keys}
    assert used == {p.port for p in redis_cluster.primaries}
    assert sorted(await cache.keys("*", limit=None)) == sorted(keys)
    assert len(await cache.keys("k1*", limit=5)) == 5
    assert await cache.clear() == 200
    assert await cache.keys("*", limit=None) == []
    assert await neighbour.get("kept") == 1
    await neighbour.clear()


async def test_invalidate_calls_each_primary_once_and_misses_everywhere(
    redis_cluster: Cluster, cluster_backend: RedisClusterBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(cluster_backend, namespace=unique_namespace("inv"), owns_backend=False)
    keys = [f"k{n}" for n in range(100)]
    for key in keys:
        await cache.set(key, key, tags=["shared"])
    calls: list[int] = []
    original = RedisBackend.invalidate

    async def counted(self: RedisBackend, ns: str, tags: Any, **options: Any) -> None:
        calls.append(id(self))
        await original(self, ns, tags, **options)

    monkeypatch.setattr(RedisBackend, "invalidate", counted)
    await cache.invalidate_tags(["shared"])
    # One pipelined round trip per primary (RedisBackend.invalidate is one), each primary once.
    assert len(calls) == len(set(calls)) == len(redis_cluster.primaries)
    assert [await cache.get(key) for key in keys] == [None] * len(keys)
    await cache.clear()


async def test_reads_of_one_tick_travel_as_one_batch_per_primary(
    cluster_backend: RedisClusterBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = unique_namespace("batch")
    cache = Cache(cluster_backend, namespace=ns, owns_backend=False)
    keys = [f"k{n}" for n in range(90)]  # over the three primaries
    for key in keys:
        await cache.set(key, key, tags=["t"])
    trips: dict[int, int] = {}
    one, batch = RedisBackend._roundtrip_one, RedisBackend._send_batch

    async def counted_one(self: RedisBackend, *args: Any) -> Any:
        trips[id(self)] = trips.get(id(self), 0) + 1
        return await one(self, *args)

    async def counted_batch(self: RedisBackend, *args: Any) -> Any:
        trips[id(self)] = trips.get(id(self), 0) + 1
        return await batch(self, *args)

    monkeypatch.setattr(RedisBackend, "_roundtrip_one", counted_one)
    monkeypatch.setattr(RedisBackend, "_send_batch", counted_batch)
    assert await asyncio.gather(*(cache.get(key) for key in keys)) == keys
    # Each primary's reads: the first goes alone, those issued while it is in flight
    # follow as one batch; 90 reads, 3 primaries, at most 2 round trips each.
    assert len(trips) == 3
    assert all(n <= 2 for n in trips.values()), trips
    await cache.clear()


async def test_info_and_health_cover_every_primary(cluster_backend: RedisClusterBackend) -> None:
    cache = Cache(cluster_backend, namespace=unique_namespace("info"), owns_backend=False)
    await cache.set("k", 1)
    stats = await cache.stats()
    assert stats.backend["primaries"] == 3
    assert stats.server_keys is not None and stats.server_keys >= 1
    health = cluster_backend.health()
    assert health["breaker"] == "closed"
    assert len(health["primaries"]) == 3  # type: ignore[arg-type]  # a dict of the primaries' states
    await cache.clear()


# ---------------------------------------------------------------- a primary hangs, a replica takes over


@pytest.fixture
def replicated_cluster() -> Iterator[Cluster]:
    """A cluster of 3 primaries with a replica each, for this test only."""
    yield from local_cluster(3, 1)


async def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = await call()
    return result, time.monotonic() - start


@pytest.mark.slow
async def test_a_hung_primary_fails_open_for_its_keys_only_and_its_replica_takes_over(
    replicated_cluster: Cluster,
) -> None:
    cluster = replicated_cluster
    backend: Backend = RedisClusterBackend.from_url(f"redis+cluster://127.0.0.1:{cluster.port}/")
    ns = unique_namespace("failover")
    cache = Cache(backend, namespace=ns)
    loads: dict[str, int] = {}
    version = 1

    def loader(key: str) -> Callable[[], Any]:
        async def load() -> str:
            loads[key] = loads.get(key, 0) + 1
            return f"{key}:v{version}"

        return load

    async def read(key: str) -> tuple[str, float]:
        value, took = await timed(lambda: cache.get_or_set(key, loader(key), ttl=300, tags=["items"]))
        return str(value), took

    try:
        keys = [f"k{n}" for n in range(120)]
        for key in keys:
            await read(key)
        hung = cluster.primaries[0]
        lost = [k for k in keys if primary_of(cluster, ns, k).port == hung.port]
        kept = [k for k in keys if k not in lost]
        assert lost and kept

        cluster.pause(hung)
        before = dict(loads)
        outage: list[float] = []
        for key in lost[:10]:  # fail open: the loader answers, within the timeout
            value, took = await read(key)
            assert value == f"{key}:v1"
            outage.append(took)
        assert max(outage) < SLOW_CALL, outage
        assert all(loads[k] == before[k] + 1 for k in lost[:10])
        for key in kept:  # the other primaries keep serving hits
            await read(key)
        assert all(loads[k] == before[k] for k in kept)
        assert backend.health()["breaker"] == "open"  # type: ignore[attr-defined]  # RedisClusterBackend

        # An invalidation while a primary hangs is applied on the others and fails on the
        # hung one's buckets (and says which); the cache keeps it for those buckets,
        # bypasses their keys meanwhile and replays it there.
        version = 2
        with pytest.raises(PartialInvalidationError) as caught:
            await cache.invalidate_tags(["items"])
        assert {bucket_index(k.encode(), 64) for k in lost} <= caught.value.scope
        assert not {bucket_index(k.encode(), 64) for k in kept} & caught.value.scope
        assert (await cache.stats()).pending_invalidations == 1
        for key in kept:  # never the value from before the invalidation: reloaded once...
            value, _ = await read(key)
            assert value == f"{key}:v2"
        reloaded = dict(loads)
        for key in kept:  # ...then hits again while the primary still hangs
            value, took = await read(key)
            assert value == f"{key}:v2"
            assert took < SLOW_CALL
        assert all(loads[k] == reloaded[k] for k in kept)
        for key in lost[:3]:  # the hung primary's keys still bypass the cache
            value, _ = await read(key)
            assert value == f"{key}:v2"
            assert loads[key] == reloaded[key] + 1

        await asyncio.to_thread(cluster.wait_until_ok, 60.0)  # the replica took over
        deadline = time.monotonic() + 30
        while True:  # the cache reads the new slot map and replays the invalidation
            value, _ = await read(lost[0])
            assert value == f"{lost[0]}:v2"
            stats = await cache.stats()
            if stats.pending_invalidations == 0 and loads[lost[0]] and (await read(lost[0]))[0] == value:
                hits_before = stats.hits
                await read(lost[0])
                if (await cache.stats()).hits > hits_before:
                    break
            assert time.monotonic() < deadline, "caching did not resume on the promoted replica"
            await asyncio.sleep(0.1)  # polling the recovery, bounded by the deadline
        for key in keys:  # nothing from before the invalidation is served, anywhere
            value, _ = await read(key)
            assert value == f"{key}:v2"
    finally:
        cluster.resume(hung)
        await cache.aclose()


# ---------------------------------------------------------------- a slot moves (resharding)


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster of 3 primaries for this test only (its slots are moved)."""
    yield from local_cluster(3, 0)


def move_slot(cluster: Cluster, slot: int, source: ClusterNode, target: ClusterNode) -> None:
    """Move ``slot`` with its keys from ``source`` to ``target``, as ``redis-cli --cluster reshard`` does."""
    command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.node_id)
    command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.node_id)
    while True:
        keys = command(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100")
        assert isinstance(keys, list)
        if not keys:
            break
        names = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
        command(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *names)
    for node in cluster.primaries:
        command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target.node_id)
    cluster.wait_until_ok()


async def test_a_bucket_whose_slot_moves_keeps_working_without_errors(own_cluster: Cluster) -> None:
    cluster = own_cluster
    ns = unique_namespace("moved")
    cache = Cache(RedisClusterBackend.from_url(f"redis+cluster://127.0.0.1:{cluster.port}/"), namespace=ns)
    try:
        await cache.set("k", "v", tags=["t"])
        slot = key_slot(bucket_hash_tag(ns, bucket_index(b"k", 64)))
        source = cluster.node_for_slot(slot)
        target = next(node for node in cluster.primaries if node is not source)
        move_slot(cluster, slot, source, target)
        # MOVED: the slot map is read again and the read retried, without an error. The new
        # owner did not write the bucket's data (its server check says so): a miss, never stale.
        assert await cache.get("k") in ("v", None)
        assert (await cache.stats()).errors == 0
        await cache.set("k", "w", tags=["t"])
        assert await cache.get("k") == "w"
        await cache.invalidate_tags(["t"])
        assert await cache.get("k") is None
        # Moved back, then invalidated first thing: the stale slot map sends a token's DEL to
        # the old owner, which redirects it; the invalidation is retried with the new map.
        await cache.set("k", "x", tags=["t"])
        cluster.refresh()
        move_slot(cluster, slot, target, source)
        await cache.invalidate_tags(["t"])
        assert await cache.get("k") is None
        stats = await cache.stats()
        assert (stats.errors, stats.pending_invalidations) == (0, 0)
    finally:
        await cache.clear()
        await cache.aclose()


async def test_a_half_migrated_bucket_fails_open_and_works_once_the_migration_completes(
    own_cluster: Cluster,
) -> None:
    cluster = own_cluster
    ns = unique_namespace("ask")
    cache = Cache(RedisClusterBackend.from_url(f"redis+cluster://127.0.0.1:{cluster.port}/"), namespace=ns)
    loads: list[int] = []

    async def load() -> str:
        loads.append(1)
        return "loaded"

    try:
        await cache.set("k", "v", tags=["t"])
        other_key = next(
            k for k in (f"o{n}" for n in range(100)) if bucket_index(k.encode(), 64) != bucket_index(b"k", 64)
        )
        await cache.set(other_key, "o", tags=["t"])
        slot = key_slot(bucket_hash_tag(ns, bucket_index(b"k", 64)))
        source = cluster.node_for_slot(slot)
        target = next(node for node in cluster.primaries if node is not source)
        # Half-migrated: the entry has moved to the target, the tag tokens have not. The source
        # answers ASK for the entry and TRYAGAIN for a script over both.
        command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.node_id)
        command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.node_id)
        names = command(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100")
        assert isinstance(names, list)
        entry = next(n for n in names if bytes(n).endswith(b":e:k"))
        command(
            source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", entry.decode()
        )
        # Reads of that bucket fail open (the loader answers, never an old value); the
        # other buckets are not affected.
        assert await cache.get_or_set("k", load, tags=["t"]) == "loaded"
        assert loads == [1]
        assert (await cache.stats()).errors >= 1  # the bucket's scripts were refused
        assert await cache.get(other_key) == "o"
        # Once the migration completes, the bucket works on its new owner.
        move_slot(cluster, slot, source, target)
        assert await cache.get_or_set("k", load, tags=["t"]) in ("v", "loaded")
        assert await cache.get_or_set("k", load, tags=["t"]) in ("v", "loaded")
        hits = (await cache.stats()).hits
        assert await cache.get("k") in ("v", "loaded")
        assert (await cache.stats()).hits == hits + 1
        await cache.invalidate_tags(["t"])
        assert await cache.get("k") is None
        assert await cache.get(other_key) is None
    finally:
        await cache.clear()
        await cache.aclose()


# ---------------------------------------------------------------- TLS: rediss+cluster:// URLs

TLS_URL = "rediss+cluster://127.0.0.1:7000/"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            "ssl_ca_certs=/etc/ca%20dir/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
            {"ssl_ca_certs": "/etc/ca dir/ca.pem", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"},
        ),
        ("ssl_cert_reqs=none", {"ssl_cert_reqs": "none"}),
        ("ssl_cert_reqs=optional", {"ssl_cert_reqs": "optional"}),
        ("ssl_cert_reqs=Required", {"ssl_cert_reqs": "required"}),
        *[
            (f"ssl_check_hostname={raw}", {"ssl_check_hostname": True})
            for raw in ("true", "1", "yes", "TRUE")
        ],
        *[(f"ssl_check_hostname={raw}", {"ssl_check_hostname": False}) for raw in ("false", "0", "no", "No")],
    ],
)
def test_a_rediss_cluster_url_takes_redis_py_tls_parameters(query: str, expected: dict[str, Any]) -> None:
    backend = RedisClusterBackend.from_url(f"{TLS_URL}?{query}&buckets=8")
    assert backend.buckets == 8
    assert backend._connection_class is SSLConnection
    assert backend._connection_kwargs == expected
    # redis-py takes them as they are: the connections' TLS settings.
    tls = SSLConnection(**backend._connection_kwargs).ssl_context
    assert tls.ca_certs == expected.get("ssl_ca_certs")
    reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL}.get(expected.get("ssl_cert_reqs", ""))
    assert tls.cert_reqs == (reqs if reqs is not None else ssl.CERT_REQUIRED)
    default = SSLConnection().ssl_context.check_hostname  # redis-py's own default (False before 6.0)
    assert tls.check_hostname is (expected.get("ssl_check_hostname", default) and reqs != ssl.CERT_NONE)


def test_tls_parameters_reach_the_primaries_and_the_invalidation_feed() -> None:
    backend = RedisClusterBackend.from_url(f"{TLS_URL}?ssl_ca_certs=/url.pem&ssl_cert_reqs=required")
    primary = backend._new_primary("127.0.0.1:7000", ("127.0.0.1", 7000))
    pool = primary.backend._home_pool
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/url.pem"
    feed = backend.invalidation_feed()
    assert feed._connection_class is SSLConnection
    assert all(e["ssl_ca_certs"] == "/url.pem" for e in feed._endpoints)
    # The URL's parameters win over the keyword arguments, as the other parameters do.
    both = RedisClusterBackend.from_url(f"{TLS_URL}?ssl_ca_certs=/url.pem", ssl_ca_certs="/kw.pem")
    assert both._connection_kwargs["ssl_ca_certs"] == "/url.pem"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            f"{TLS_URL}?ssl_cert_reqs=maybe",
            "ssl_cert_reqs must be one of none, optional, required, got 'maybe'",
        ),
        (f"{TLS_URL}?ssl_check_hostname=sure", "ssl_check_hostname must be true/false, 1/0 or yes/no"),
        (f"{TLS_URL}?ssl_ca_certs=", "ssl_ca_certs must be the path of a PEM file"),
        (f"{TLS_URL}?ssl_ca_path=/etc/ssl", "unknown parameter"),
        (
            "redis+cluster://127.0.0.1:7000/?ssl_ca_certs=/ca.pem",
            r"\['ssl_ca_certs'\].*use rediss\+cluster://",
        ),
        (
            "redis+cluster://127.0.0.1:7000/?ssl_check_hostname=no&ssl_cert_reqs=none",
            r"use rediss\+cluster://",
        ),
    ],
)
def test_bad_tls_parameters_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RedisClusterBackend.from_url(url)


def test_tls_keyword_arguments_with_a_plain_url_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"use rediss\+cluster://"):
        RedisClusterBackend.from_url("redis+cluster://127.0.0.1:7000/", ssl_ca_certs="/ca.pem")


# ---------------------------------------------------------------- TLS: on a real TLS cluster


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[Cluster]:
    """A cluster of 3 primaries listening with TLS only, for this module's TLS tests."""
    if not cluster_binaries_available(tls=True):
        no_redis("redis-server, redis-cli and openssl are needed for a local TLS Redis Cluster")
    with redis_cluster(3, 0, tls=True) as cluster:
        yield cluster


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions chained to it (``__cause__``, else ``__context__``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


async def test_a_tls_cluster_serves_reads_writes_invalidations_and_clear(tls_cluster: Cluster) -> None:
    ns = unique_namespace("tls")
    assert tls_cluster.url.startswith("rediss+cluster://")
    cache = Cache.from_url(tls_cluster.url, namespace=ns)
    try:
        keys = [f"k{n}" for n in range(60)]
        assert {primary_of(tls_cluster, ns, k).port for k in keys} == {p.port for p in tls_cluster.primaries}
        for key in keys:
            await cache.set(key, key, tags=["all"])
        assert [await cache.get(key) for key in keys] == keys
        await cache.invalidate_tags(["all"])
        assert [await cache.get(key) for key in keys] == [None] * len(keys)
        for key in keys:
            await cache.set(key, key)
        assert await cache.clear() == len(keys)
        assert await cache.keys("*", limit=None) == []
        stats = await cache.stats()
        assert (stats.errors, stats.backend["primaries"]) == (0, 3)
    finally:
        await cache.clear()
        await cache.aclose()


async def test_an_l1_over_a_tls_cluster_drops_copies_across_processes(tls_cluster: Cluster) -> None:
    from tests.test_local import copied, layer_of, live, until

    ns = unique_namespace("tlsl1")
    one, two = (Cache.from_url(tls_cluster.url, namespace=ns, local=LocalCache(ttl=60)) for _ in range(2))
    try:
        await live(one)
        await live(two)
        keys = [f"k{n}" for n in range(20)]  # over several buckets, hence primaries
        for key in keys:
            await one.set(key, key, tags=["t"])
            assert await two.get(key) == key
        for key in keys:
            await copied(two, key)
        await one.invalidate_tags(["t"])
        for key in keys:
            await until(lambda key=key: layer_of(two).get_local(ns, key) is None, "copies are dropped")
            assert await two.get(key) is None
    finally:
        await one.clear()
        await one.aclose()
        await two.aclose()


async def test_a_plain_url_on_a_tls_node_fails_in_time_and_the_cache_fails_open(tls_cluster: Cluster) -> None:
    ns = unique_namespace("tlsplain")
    cache = Cache.from_url(f"redis+cluster://127.0.0.1:{tls_cluster.port}/", namespace=ns)
    try:
        with pytest.raises(BackendError):
            await asyncio.wait_for(cache.backend.get(ns, "k"), SLOW_CALL)

        async def load() -> str:
            return "loaded"

        value, took = await timed(lambda: cache.get_or_set("k", load, ttl=60))
        assert value == "loaded"
        assert took < SLOW_CALL
    finally:
        await cache.aclose()


async def test_a_wrong_ca_fails_with_a_certificate_verification_error(
    tls_cluster: Cluster, tmp_path: Path
) -> None:
    other = await asyncio.to_thread(make_tls_files, tmp_path / "other", "another CA")
    ns = unique_namespace("tlsca")
    url = f"rediss+cluster://127.0.0.1:{tls_cluster.port}/?ssl_ca_certs={other.ca_path}"
    cache = Cache.from_url(url, namespace=ns)
    try:
        with pytest.raises(BackendError) as caught:
            await asyncio.wait_for(cache.backend.get(ns, "k"), SLOW_CALL)
        chain = list(causes(caught.value))
        assert any("certificate verify failed" in str(exc) for exc in chain), chain
    finally:
        await cache.aclose()
