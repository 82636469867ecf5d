"""Starlette/ASGI HTTP caching (extra ``starlette``): browser caching headers and
conditional requests, a server-side response cache with tags, and a protected
management API.

::

    from tagcache.integrations.starlette import (
        CacheControlMiddleware, ResponseCache, ResponseCacheMiddleware, cache_admin,
    )

* :class:`CacheControlMiddleware` — ``Cache-Control`` per route pattern, ``ETag`` and 304s.
* :class:`ResponseCache`, :class:`ResponseCacheMiddleware` — whole responses stored in the
  cache with tags, through the read-through engine.
* :func:`cache_admin` — stats, clear, invalidation and inspection endpoints behind an
  ``authorize`` callable.

Pure ASGI: works in Starlette and FastAPI apps; FastAPI is never imported.
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'tagcache.integrations.starlette needs Starlette: pip install "tagcache[starlette]"'
    ) from exc

from tagcache.integrations.starlette.admin import CacheAdmin, cache_admin
from tagcache.integrations.starlette.cache_control import CacheControlMiddleware, Policy
from tagcache.integrations.starlette.responses import ResponseCache, ResponseCacheMiddleware

__all__ = [
    "CacheAdmin",
    "CacheControlMiddleware",
    "Policy",
    "ResponseCache",
    "ResponseCacheMiddleware",
    "cache_admin",
]
