"""Functions and argument types for the key tests, importable by a fresh interpreter.

``python -c "from tests.keyfuncs import sample_keys; print(sample_keys())"`` computes
the same keys as the test process does: that is how key stability across
processes is tested.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple
from uuid import UUID

import pydantic

from tagcache.keys import KeyBuilder


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int
    label: str = ""
    scratch: Any = dataclasses.field(default=None, compare=False)


class Pair(NamedTuple):
    left: Any
    right: Any


class Profile(pydantic.BaseModel):
    name: str
    tags: list[str] = []
    joined: datetime | None = None


async def get_user(user_id: int, page: int = 1, *, size: int = 10) -> None:
    """A typical cached loader."""


def search(query: str, *filters: Any, limit: int = 20, **options: Any) -> None:
    """With ``*args`` and ``**kwargs`` parameters."""


def anything(value: Any) -> None:
    """One parameter of any type."""


class Repository:
    """A class with cached methods."""

    def __init__(self, ident: int) -> None:
        self.id = ident

    async def find(self, name: str, active: bool = True) -> None:
        """A method: ``self`` is not part of the default key."""

    @classmethod
    async def by_kind(cls, kind: str) -> None:
        """A class method: ``cls`` is not part of the default key."""


_STRINGS = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"})

#: (function, args, kwargs) of calls whose keys must not change between processes.
SAMPLES: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
    (get_user, (42,), {}),
    (get_user, (), {"user_id": 42, "page": 3, "size": 50}),
    (search, ("shoes", "red", 7), {"brand": "acme", "in_stock": True}),
    (anything, (None,), {}),
    (anything, (True,), {}),
    (anything, (-(2**70),), {}),
    (anything, (1.5,), {}),
    (anything, ("héllo wörld ✓",), {}),
    (anything, (b"\x00\xff",), {}),
    (anything, ((1, [2, 3], {"b": 1, "a": 2}),), {}),
    (anything, (set(_STRINGS),), {}),
    (anything, (_STRINGS,), {}),
    (anything, ({s: len(s) for s in _STRINGS},), {}),
    (anything, (datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc),), {}),
    (anything, (date(2024, 5, 1),), {}),
    (anything, (time(12, 30, 15, 500),), {}),
    (anything, (timedelta(days=1, seconds=5),), {}),
    (anything, (UUID("12345678-1234-5678-1234-567812345678"),), {}),
    (anything, (Decimal("10.50"),), {}),
    (anything, (Color.RED,), {}),
    (anything, (Level.HIGH,), {}),
    (anything, (Point(1, 2, "p"),), {}),
    (anything, (Pair(1, 2),), {}),
    (anything, (Profile(name="ann", tags=["x"], joined=datetime(2024, 1, 1)),), {}),
    (Repository.find, (Repository(1), "main"), {}),
    (Repository.__dict__["by_kind"].__func__, (Repository, "admin"), {}),
]


def sample_keys() -> list[str]:
    """The key of every call in :data:`SAMPLES`."""
    return [KeyBuilder(func)(args, kwargs) for func, args, kwargs in SAMPLES]


if __name__ == "__main__":
    print(json.dumps(sample_keys()))
