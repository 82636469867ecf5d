"""Prometheus metrics for tagcache caches (extra ``tagcache[prometheus]``).

::

    from prometheus_client import CollectorRegistry
    from tagcache.integrations.prometheus import CacheCollector, metrics_app

    CacheCollector([users_cache, pages_cache])       # registers in prometheus_client.REGISTRY
    app.mount("/metrics", metrics_app())            # or prometheus_client.make_asgi_app()

The collector reads each cache's in-process counters when Prometheus scrapes, so
a cache hit costs nothing more. Every metric has the label ``namespace`` (the
cache's namespace, a bounded set); the per-function ones also have ``function``
(a decorated function's ``module.qualname``, ``tagcache.QueryCache`` or
``tagcache.ResponseCache``; at most 1,000 names per cache, see
:meth:`~tagcache.Cache.function_counters`). Keys and tags never appear in the metrics.

Metrics (counters since the cache was created or its :meth:`~tagcache.Cache.reset_stats`,
which Prometheus sees as a counter reset):

* ``tagcache_hits_total``, ``tagcache_misses_total``, ``tagcache_sets_total``,
  ``tagcache_deletes_total``
* ``tagcache_invalidations_total`` — tags invalidated
* ``tagcache_errors_total`` — backend failures, corrupt payloads, values not stored, timeouts
* ``tagcache_not_stored_total``, ``tagcache_stale_on_error_total``, ``tagcache_timeouts_total``,
  ``tagcache_lock_waits_total``
* ``tagcache_hit_ratio`` (gauge) — hits / (hits + misses) over the same period; for a
  current ratio use ``rate(tagcache_hits_total[5m]) /``
  ``(rate(tagcache_hits_total[5m]) + rate(tagcache_misses_total[5m]))``
* ``tagcache_pending_invalidations`` (gauge) — failed invalidations waiting to be re-applied
* per cached function (labels ``namespace``, ``function``), counted besides the totals above:
  ``tagcache_function_hits_total``, ``tagcache_function_misses_total``,
  ``tagcache_function_lock_waits_total``, ``tagcache_function_errors_total``,
  ``tagcache_function_not_stored_total``, ``tagcache_function_stale_on_error_total``,
  ``tagcache_function_timeouts_total``; a function's hit ratio is
  ``rate(tagcache_function_hits_total[5m]) /``
  ``(rate(tagcache_function_hits_total[5m]) + rate(tagcache_function_misses_total[5m]))``
* for a backend with a circuit breaker (Redis): ``tagcache_backend_breaker_state``
  (gauge, label ``state``: ``closed``, ``open``, ``half-open``; 1 for the current one)
  and ``tagcache_backend_breaker_opened_total``

Figures that need a round trip to the backend (``keys``, ``memory_bytes``,
``evictions`` of :meth:`~tagcache.Cache.stats`) are not collected: a scrape must
not wait on Redis. Monitor Redis itself with a Redis exporter, or read them from
the ``GET /stats`` management endpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

try:
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tagcache.integrations.prometheus needs prometheus_client: pip install 'tagcache[prometheus]'"
    ) from exc

from tagcache.backends.base import HealthReporting
from tagcache.cache import Cache
from tagcache.exceptions import ConfigurationError

__all__ = ["CacheCollector", "metrics_app"]

#: (metric name without ``_total``, Counters attribute, help text)
_COUNTERS: Final = (
    ("tagcache_hits", "hits", "Cache reads that found a value."),
    ("tagcache_misses", "misses", "Cache reads that found no usable value."),
    ("tagcache_sets", "sets", "Values stored."),
    ("tagcache_deletes", "deletes", "Keys deleted."),
    ("tagcache_invalidations", "invalidations", "Tags invalidated (a call with three tags counts three)."),
    (
        "tagcache_errors",
        "errors",
        "Backend failures, corrupt payloads, values not stored and loads that timed out or stopped waiting.",
    ),
    ("tagcache_not_stored", "not_stored", "Loaded values returned but not stored because storing failed."),
    ("tagcache_stale_on_error", "stale_on_error", "Expired values served because the source failed."),
    ("tagcache_timeouts", "timeouts", "Loader calls stopped by their timeout."),
    ("tagcache_lock_waits", "lock_waits", "Misses that waited for another caller's load of the key."),
)
#: Per cached function (labels ``namespace`` and ``function``): (metric name without
#: ``_total``, Counters attribute, help text).
_FUNCTION_COUNTERS: Final = (
    ("tagcache_function_hits", "hits", "Reads of a cached function that found a value."),
    ("tagcache_function_misses", "misses", "Reads of a cached function that found no usable value."),
    (
        "tagcache_function_lock_waits",
        "lock_waits",
        "Misses of a cached function that waited for another caller's load of the key.",
    ),
    (
        "tagcache_function_errors",
        "errors",
        "Errors met by a cached function's calls (backend failures, corrupt payloads, values not stored, "
        "timeouts, stale values served, waits given up, failed background refreshes).",
    ),
    (
        "tagcache_function_not_stored",
        "not_stored",
        "A cached function's loaded values returned but not stored.",
    ),
    (
        "tagcache_function_stale_on_error",
        "stale_on_error",
        "Expired values of a cached function served because its source failed.",
    ),
    ("tagcache_function_timeouts", "timeouts", "A cached function's loads stopped by their timeout."),
)
_BREAKER_STATES: Final = ("closed", "open", "half-open")
_LABELS: Final = ["namespace"]
_FUNCTION_LABELS: Final = ["namespace", "function"]


class CacheCollector(Collector):
    """A Prometheus collector reporting the counters of one or more caches.

    Args:
        caches: a :class:`~tagcache.Cache` or several; their namespaces must differ
            (the ``namespace`` label tells them apart).
        registry: where to register the collector; ``None`` (default) means
            ``prometheus_client.REGISTRY``, the registry ``generate_latest()`` and
            ``make_asgi_app()`` use by default.
        register: ``False`` creates the collector without registering it
            (register it yourself with ``registry.register(collector)``).

    Reading happens in :meth:`collect`, synchronously and from process memory
    only: the caches' counters (through :attr:`tagcache.Cache.engine`'s
    ``counters`` and ``pending``; inside a :meth:`~tagcache.Cache.using` block,
    the block's) and, for a backend reporting its health, its circuit breaker.
    """

    def __init__(
        self,
        caches: Cache | Iterable[Cache],
        *,
        registry: CollectorRegistry | None = None,
        register: bool = True,
    ) -> None:
        listed = [caches] if isinstance(caches, Cache) else list(caches)
        unique: list[Cache] = []
        for cache in listed:
            if not isinstance(cache, Cache):
                raise ConfigurationError(f"CacheCollector takes tagcache.Cache objects, got {cache!r:.80}")
            if any(cache is seen for seen in unique):
                continue
            if any(cache.namespace == seen.namespace for seen in unique):
                raise ConfigurationError(
                    f"two caches share the namespace {cache.namespace!r}: their metrics would have the "
                    "same labels; give each cache its own namespace or a collector of its own registry"
                )
            unique.append(cache)
        if not unique:
            raise ConfigurationError("CacheCollector needs at least one cache")
        self._caches: tuple[Cache, ...] = tuple(unique)
        if register:
            (prometheus_client.REGISTRY if registry is None else registry).register(self)

    @property
    def caches(self) -> tuple[Cache, ...]:
        """The caches this collector reports."""
        return self._caches

    def describe(self) -> Iterator[Metric]:
        """The metric families (without samples), for the registry's duplicate check."""
        for name, _, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, labels=_LABELS)
        for name, _, doc in _FUNCTION_COUNTERS:
            yield CounterMetricFamily(name, doc, labels=_FUNCTION_LABELS)
        yield from self._gauges()
        yield CounterMetricFamily(
            "tagcache_backend_breaker_opened", "Times the backend's circuit breaker opened.", labels=_LABELS
        )
        yield GaugeMetricFamily(
            "tagcache_backend_breaker_state",
            "State of the backend's circuit breaker: 1 for the current state.",
            labels=[*_LABELS, "state"],
        )

    @staticmethod
    def _gauges() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "tagcache_hit_ratio",
                "hits / (hits + misses) since the counters started; 0 before the first read.",
                labels=_LABELS,
            ),
            GaugeMetricFamily(
                "tagcache_pending_invalidations",
                "Failed invalidations waiting to be re-applied; reads bypass the cache meanwhile.",
                labels=_LABELS,
            ),
        )

    def collect(self) -> Iterator[Metric]:
        """Read every cache's counters now and yield them as metric families."""
        counters = {name: CounterMetricFamily(name, doc, labels=_LABELS) for name, _, doc in _COUNTERS}
        per_function = {
            name: CounterMetricFamily(name, doc, labels=_FUNCTION_LABELS)
            for name, _, doc in _FUNCTION_COUNTERS
        }
        ratio, pending = self._gauges()
        opened = CounterMetricFamily(
            "tagcache_backend_breaker_opened", "Times the backend's circuit breaker opened.", labels=_LABELS
        )
        state = GaugeMetricFamily(
            "tagcache_backend_breaker_state",
            "State of the backend's circuit breaker: 1 for the current state.",
            labels=[*_LABELS, "state"],
        )
        for cache in self._caches:
            ns = [cache.namespace]
            engine = cache.engine
            figures = engine.counters
            for name, attribute, _ in _COUNTERS:
                counters[name].add_metric(ns, float(getattr(figures, attribute)))
            reads = figures.hits + figures.misses
            ratio.add_metric(ns, figures.hits / reads if reads else 0.0)
            pending.add_metric(ns, float(len(engine.pending)))
            for function, function_stats in cache.function_stats().items():
                labels = [cache.namespace, function]
                for name, attribute, _ in _FUNCTION_COUNTERS:
                    per_function[name].add_metric(labels, float(getattr(function_stats, attribute)))
            health = _health(cache)
            if health is not None:
                current = health.get("breaker")
                if isinstance(current, str):
                    for known in _BREAKER_STATES:
                        state.add_metric([*ns, known], 1.0 if current == known else 0.0)
                times = health.get("breaker_opened")
                if isinstance(times, int):
                    opened.add_metric(ns, float(times))
        yield from counters.values()
        yield from per_function.values()
        yield ratio
        yield pending
        if opened.samples:
            yield opened
        if state.samples:
            yield state


def _health(cache: Cache) -> dict[str, Any] | None:
    """The backend's own health figures (no round trip), or ``None``."""
    if not cache.configured:
        return None
    backend = cache.backend
    if not isinstance(backend, HealthReporting):
        return None
    try:
        return dict(backend.health())
    except Exception:  # a scrape must not fail because one figure did
        return None


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """An ASGI app serving ``registry`` (default ``prometheus_client.REGISTRY``) in
    Prometheus's text format, to mount: ``app.mount("/metrics", metrics_app())``.

    The same as ``prometheus_client.make_asgi_app(registry)``. The metrics hold no
    keys, tags or values, but protect the path like your other internal endpoints.
    """
    return prometheus_client.make_asgi_app(prometheus_client.REGISTRY if registry is None else registry)
