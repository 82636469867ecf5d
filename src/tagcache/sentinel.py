"""The :data:`MISSING` sentinel: "no value", distinct from a cached ``None``."""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["MISSING", "Missing"]


class Missing(enum.Enum):
    """The type of :data:`MISSING`, which is its only value."""

    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"

    __str__ = __repr__


#: A sentinel for "no value": ``await cache.get(key, default=MISSING)`` returns
#: it on a miss, so a cached ``None`` can be told from an absent entry
#: (``if value is MISSING``). A singleton: copies and unpickled copies are the
#: same object. Annotate with :class:`Missing` (``str | Missing``).
MISSING: Final = Missing.MISSING
