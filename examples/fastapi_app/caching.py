"""The app's cache and its layers, created at import and configured at start-up.

Decorators run when ``services`` and ``routes`` are imported, before settings are
read: the cache is created without a backend here and the lifespan configures it
(``memory://`` or ``redis://...``). One app at a time uses these objects per process;
the lifespan closes the cache, so tests and the demo build one app after another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from tagcache import Cache
from tagcache.integrations.sqlalchemy import QueryCache
from tagcache.integrations.starlette import ResponseCache
from tagcache.testing import caching_disabled

#: This app's keys live under this namespace only; ``clear()`` never touches others.
NAMESPACE: Final = "tagcache-example"

cache = Cache(namespace=NAMESPACE, default_ttl=600)

#: Whole GET responses, stored with tags (which paths, with which tags: ``routes.RESPONSE_RULES``).
responses = ResponseCache(cache, ttl=600)

#: ``select()`` results, invalidated when a session commits writes to their tables.
queries = QueryCache(cache, default_ttl=600)


async def invalidate(tags: Iterable[str]) -> None:
    """Invalidate ``tags``; runs to the end even if the request is cancelled meanwhile,
    so a committed write is never left with cached pages older than it."""
    await asyncio.shield(cache.invalidate_tags(list(tags)))


class CachingOff:
    """ASGI middleware running every request inside ``tagcache.testing.caching_disabled()``:
    ``@cache.cached`` functions run their body on every call and store nothing.

    Used by ``create_app`` when ``Settings.caching`` is ``False`` (the demo's baseline).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with caching_disabled():
            await self.app(scope, receive, send)
