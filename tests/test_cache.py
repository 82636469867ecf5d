"""Cache construction, lifecycle and logging (backend-independent parts)."""

from __future__ import annotations

import logging

import pytest

from tagcache import Cache, ConfigurationError
from tagcache.backends import MemoryBackend
from tagcache.testing import memory_cache


async def test_from_url_memory_with_sizes() -> None:
    async with Cache.from_url("memory://?max_entries=5", namespace="app", default_ttl=30) as cache:
        assert isinstance(cache.backend, MemoryBackend)
        assert cache.namespace == "app"
        assert cache.default_ttl == 30
        for i in range(10):
            await cache.set(f"k{i}", i)
        stats = await cache.stats()
        assert stats.keys == 5
        assert stats.evictions == 5


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memcached://localhost", "unknown cache URL scheme 'memcached'"),
        ("localhost:6379", "unknown cache URL scheme"),
        ("memory://?max_entries=lots", "must be an integer"),
        ("memory://?size=1", "unknown memory:// parameter"),
        ("redis://127.0.0.1/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs need a TLS connection: use a rediss://"),
    ],
)
def test_from_url_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Cache.from_url(url)


def test_not_a_backend_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="not a tagcache Backend"):
        Cache(object())  # type: ignore[arg-type]  # bad input on purpose


async def test_aclose_is_idempotent_and_closes_owned_backend() -> None:
    backend = MemoryBackend()
    cache = Cache(backend)
    await cache.set("k", 1)
    await cache.aclose()
    await cache.aclose()
    assert (await backend.info()).keys == 0


async def test_shared_backend_survives_a_cache_that_does_not_own_it() -> None:
    backend = MemoryBackend()
    one = Cache(backend, namespace="one", owns_backend=False)
    two = Cache(backend, namespace="two", owns_backend=False)
    await two.set("k", 2)
    await one.aclose()
    assert await two.get("k") == 2


async def test_corrupt_payload_is_logged_under_tagcache_logger(caplog: pytest.LogCaptureFixture) -> None:
    cache = memory_cache()
    await cache.backend.set(cache.namespace, "bad", b"garbage", 60, ())
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        assert await cache.get("bad") is None
    assert any(r.name == "tagcache" and "'bad'" in r.getMessage() for r in caplog.records)


async def test_reset_stats() -> None:
    cache = memory_cache()
    await cache.get("x")
    cache.reset_stats()
    assert (await cache.stats()).misses == 0


def test_repr_names_backend_and_namespace() -> None:
    assert repr(memory_cache(namespace="ns")) == "Cache(MemoryBackend, namespace='ns')"
