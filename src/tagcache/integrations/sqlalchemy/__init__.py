"""SQLAlchemy 2 query cache with commit-time invalidation (extra ``sqlalchemy``).

::

    from tagcache.integrations.sqlalchemy import QueryCache

    qc = QueryCache(cache, default_ttl=300)
    qc.invalidate_on_commit(SessionFactory)
    result = await qc.get_or_execute(session, select(User).where(User.is_active), tags=["active_users"])

See :class:`QueryCache`.
"""

from __future__ import annotations

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "tagcache.integrations.sqlalchemy needs SQLAlchemy 2 with its asyncio support: "
        'pip install "tagcache[sqlalchemy]"'
    ) from exc

from tagcache.integrations.sqlalchemy.query import OPTION, CommitInvalidationError, QueryCache

__all__ = ["OPTION", "CommitInvalidationError", "QueryCache"]
