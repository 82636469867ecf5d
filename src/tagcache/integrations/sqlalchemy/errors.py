"""Why a statement or a result is run or returned without the cache."""

from __future__ import annotations

__all__ = ["NotCacheable"]


class NotCacheable(Exception):
    """A statement, or its result, that the query cache must not store.

    Raised inside the integration and never seen by users: the statement then
    runs uncached, and ``reason`` (one sentence naming what and why) is logged
    once per statement shape.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
