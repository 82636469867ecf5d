"""Prometheus metrics of ``tagcache.integrations.prometheus``: counters labelled by
namespace (and, per cached function, by its name), read at scrape time."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tagcache import Cache, ConfigurationError
from tagcache.backends import MemoryBackend
from tagcache.integrations.prometheus import CacheCollector, metrics_app

from tests.conftest import unique_namespace

SECRET_KEY = "user:secret-key-7f3a"
SECRET_TAG = "tenant:secret-tag-91bc"


@pytest.fixture
async def cache() -> AsyncIterator[Cache]:
    c = Cache(MemoryBackend(), namespace=unique_namespace("prom"))
    try:
        yield c
    finally:
        await c.aclose()


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry's exposition text, by name and sorted labels."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(registry: CollectorRegistry, name: str, namespace: str, **labels: str) -> float | None:
    return samples(registry).get((name, tuple(sorted({"namespace": namespace, **labels}.items()))))


async def test_counters_follow_hits_and_misses(cache: Cache) -> None:
    registry = CollectorRegistry()
    CacheCollector(cache, registry=registry)
    ns = cache.namespace
    for name in (
        "tagcache_hits_total",
        "tagcache_misses_total",
        "tagcache_sets_total",
        "tagcache_errors_total",
    ):
        assert value(registry, name, ns) == 0.0, name
    assert value(registry, "tagcache_hit_ratio", ns) == 0.0

    await cache.set(SECRET_KEY, {"email": "ada@example.com"}, tags=[SECRET_TAG])
    await cache.get(SECRET_KEY)
    await cache.get(SECRET_KEY)
    await cache.get("user:absent")
    assert value(registry, "tagcache_hits_total", ns) == 2.0
    assert value(registry, "tagcache_misses_total", ns) == 1.0
    assert value(registry, "tagcache_sets_total", ns) == 1.0
    assert value(registry, "tagcache_hit_ratio", ns) == pytest.approx(2 / 3)

    await cache.invalidate_tags([SECRET_TAG, "other"])
    await cache.delete(SECRET_KEY)
    assert value(registry, "tagcache_invalidations_total", ns) == 2.0
    assert value(registry, "tagcache_deletes_total", ns) == 1.0
    assert value(registry, "tagcache_pending_invalidations", ns) == 0.0

    cache.reset_stats()
    assert value(registry, "tagcache_hits_total", ns) == 0.0


async def test_no_key_tag_or_value_appears_in_the_exposition(cache: Cache) -> None:
    registry = CollectorRegistry()
    CacheCollector(cache, registry=registry)
    await cache.set(SECRET_KEY, "ada@example.com", tags=[SECRET_TAG])
    await cache.get(SECRET_KEY)
    await cache.get(SECRET_KEY + ":missing")
    await cache.invalidate_tags([SECRET_TAG])
    text = generate_latest(registry).decode()
    for secret in ("secret-key", "secret-tag", "ada@example.com", "user:", "tenant:"):
        assert secret not in text
    label_names = {
        name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for name in sample.labels
    }
    assert label_names == {"namespace"}
    assert f'tagcache_hits_total{{namespace="{cache.namespace}"}} 1.0' in text


async def test_cached_functions_get_counters_labelled_by_function(cache: Cache) -> None:
    registry = CollectorRegistry()
    CacheCollector(cache, registry=registry)

    @cache.cached(ttl=60, tags=[SECRET_TAG])
    async def account(user_id: str) -> str:
        return "ada@example.com"

    for _ in range(3):
        await account(SECRET_KEY)
    ns = cache.namespace
    function = f"{__name__}.test_cached_functions_get_counters_labelled_by_function.<locals>.account"
    assert value(registry, "tagcache_function_hits_total", ns, function=function) == 2.0
    assert value(registry, "tagcache_function_misses_total", ns, function=function) == 1.0
    for name in ("lock_waits", "errors", "not_stored", "stale_on_error", "timeouts"):
        assert value(registry, f"tagcache_function_{name}_total", ns, function=function) == 0.0, name
    assert value(registry, "tagcache_hits_total", ns) == 2.0  # the totals count them too
    text = generate_latest(registry).decode()
    for secret in ("secret-key", "secret-tag", "ada@example.com"):
        assert secret not in text
    label_names = {
        name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for name in sample.labels
    }
    assert label_names == {"namespace", "function"}


async def test_several_caches_are_told_apart_by_namespace() -> None:
    backend = MemoryBackend()
    first = Cache(backend, namespace=unique_namespace("a"), owns_backend=False)
    second = Cache(backend, namespace=unique_namespace("b"), owns_backend=False)
    registry = CollectorRegistry()
    collector = CacheCollector([first, second, first], registry=registry)
    assert collector.caches == (first, second)
    await first.get("k")
    await second.set("k", 1)
    await second.get("k")
    assert value(registry, "tagcache_misses_total", first.namespace) == 1.0
    assert value(registry, "tagcache_hits_total", first.namespace) == 0.0
    assert value(registry, "tagcache_hits_total", second.namespace) == 1.0
    assert value(registry, "tagcache_misses_total", second.namespace) == 0.0


def test_caches_sharing_a_namespace_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="namespace"):
        CacheCollector([Cache(MemoryBackend(), namespace="x"), Cache(MemoryBackend(), namespace="x")])
    with pytest.raises(ConfigurationError):
        CacheCollector([], registry=CollectorRegistry())
    with pytest.raises(ConfigurationError):
        CacheCollector(["not a cache"], registry=CollectorRegistry())  # type: ignore[list-item]


def test_the_default_registry_and_register_false(cache: Cache) -> None:
    unregistered = CacheCollector(cache, register=False)
    assert f'namespace="{cache.namespace}"' not in generate_latest(REGISTRY).decode()
    collector = CacheCollector(cache)
    try:
        assert f'tagcache_hits_total{{namespace="{cache.namespace}"}}' in generate_latest(REGISTRY).decode()
        registry = CollectorRegistry()
        registry.register(unregistered)
        assert value(registry, "tagcache_hits_total", cache.namespace) == 0.0
        # Registering a second collector of the same metric names is refused, as for any metric.
        with pytest.raises(ValueError, match="Duplicated"):
            CacheCollector(cache, registry=registry)
    finally:
        REGISTRY.unregister(collector)


async def test_a_backend_with_a_breaker_reports_its_state() -> None:
    fakeredis = pytest.importorskip("fakeredis")
    from tagcache.backends.redis import RedisBackend

    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=7))
    cache = Cache(RedisBackend(client), namespace=unique_namespace("redis"))
    registry = CollectorRegistry()
    CacheCollector(cache, registry=registry)
    try:
        await cache.set("k", 1)
        assert await cache.get("k") == 1
        ns = cache.namespace
        assert value(registry, "tagcache_hits_total", ns) == 1.0
        assert value(registry, "tagcache_backend_breaker_state", ns, state="closed") == 1.0
        assert value(registry, "tagcache_backend_breaker_state", ns, state="open") == 0.0
        assert value(registry, "tagcache_backend_breaker_opened_total", ns) == 0.0
    finally:
        await cache.aclose()
        await client.aclose()


async def test_a_memory_backend_has_no_breaker_metrics(cache: Cache) -> None:
    registry = CollectorRegistry()
    CacheCollector(cache, registry=registry)
    text = generate_latest(registry).decode()
    assert "tagcache_backend_breaker" not in text
    assert "tagcache_hits_total" in text


def test_an_unconfigured_cache_is_collected() -> None:
    cache = Cache(namespace=unique_namespace("later"))
    registry = CollectorRegistry()
    CacheCollector(cache, registry=registry)
    assert value(registry, "tagcache_hits_total", cache.namespace) == 0.0


async def test_metrics_app_serves_the_registry(cache: Cache) -> None:
    registry = CollectorRegistry()
    CacheCollector(cache, registry=registry)
    await cache.get("k")
    transport = httpx.ASGITransport(app=metrics_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert f'tagcache_misses_total{{namespace="{cache.namespace}"}} 1.0' in response.text


def test_missing_prometheus_client_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "try:\n"
        "    import tagcache.integrations.prometheus\n"
        "except ImportError as exc:\n"
        "    assert 'tagcache[prometheus]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('imported without prometheus_client')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
