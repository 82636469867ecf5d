"""Scenarios for tests/test_return_types.py, with string annotations.

The same local classes and cached functions as ``build`` in
``test_return_types``, but under ``from __future__ import annotations``, so
every return annotation is a string that is resolved at decoration time.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Optional

from tagcache import Cache

try:
    import pydantic
except ImportError:  # pragma: no cover - pydantic is a test dependency
    pydantic = None  # type: ignore[assignment]  # the model scenarios are skipped then

def build(cache: Cache) -> SimpleNamespace:
    """Local classes and cached functions returning them (string annotations)."""
    calls: Counter[str] = Counter()

    @dataclasses.dataclass
    class Leaf:
        n: int

    @dataclasses.dataclass
    class Out:
        name: str
        leaf: Leaf
        leaves: list[Leaf]

    def make(x: int) -> Out:
        return Out(f"n{x}", Leaf(x), [Leaf(x + 1), Leaf(x + 2)])

    @cache.cached
    async def one(x: int) -> Out:
        calls["one"] += 1
        return make(x)

    @cache.cached
    async def many(x: int) -> list[Out]:
        calls["many"] += 1
        return [make(x), make(x + 1)]

    @cache.cached
    async def maybe(x: int) -> Out | None:
        calls["maybe"] += 1
        return None if x < 0 else make(x)

    @cache.cached
    async def optional(x: int) -> Optional[Out]:  # noqa: UP045 - the typing spelling on purpose
        calls["optional"] += 1
        return None if x < 0 else make(x)

    @cache.cached
    async def by_name(x: int) -> dict[str, Out]:
        calls["by_name"] += 1
        return {"a": make(x), "b": make(x + 1)}

    @cache.cached
    async def pair(x: int) -> tuple[Out, ...]:
        calls["pair"] += 1
        return (make(x), make(x + 1))

    model = models = maybe_model = None
    Model: Any = None
    if pydantic is not None:

        class Model(pydantic.BaseModel):  # type: ignore[no-redef]  # defined only with pydantic
            title: str
            out: Out
            extra: Out | None = None

        def make_model(x: int) -> Model:
            return Model(title=f"t{x}", out=make(x))

        @cache.cached
        async def model(x: int) -> Model:
            calls["model"] += 1
            return make_model(x)

        @cache.cached
        async def models(x: int) -> list[Model]:
            calls["models"] += 1
            return [make_model(x), make_model(x + 1)]

        @cache.cached
        async def maybe_model(x: int) -> Model | None:
            calls["maybe_model"] += 1
            return None if x < 0 else make_model(x)

    return SimpleNamespace(
        calls=calls,
        Leaf=Leaf,
        Out=Out,
        Model=Model,
        one=one,
        many=many,
        maybe=maybe,
        optional=optional,
        by_name=by_name,
        pair=pair,
        model=model,
        models=models,
        maybe_model=maybe_model,
    )


def closure_only() -> tuple[type, Callable[..., Any]]:
    """A function whose string return annotation names a local class its body also uses.

    The class is then a closure variable of the function, found without any
    ``localns``.
    """

    @dataclasses.dataclass
    class Captured:
        n: int

    async def load() -> list[Captured]:
        return [Captured(1)]

    return Captured, load


def forward_only() -> Callable[..., Any]:
    """A function whose string return annotation names a local class it does not use."""

    @dataclasses.dataclass
    class Unseen:
        n: int

    async def load() -> Unseen:  # type: ignore[empty-body]  # never called
        ...

    return load


def two_local() -> tuple[type, type, Callable[..., Any], dict[str, Any]]:
    """A local dataclass whose field is another local dataclass defined after it."""

    @dataclasses.dataclass
    class A:
        b: B

    @dataclasses.dataclass
    class B:
        n: int

    async def load() -> list[A | None]:  # type: ignore[empty-body]  # never called
        ...

    return A, B, load, dict(locals())
