"""Return-type fidelity through the annotation.

A cached function annotated ``-> Out``, ``-> list[Out]``, ``-> Out | None``
and so on decodes its hits into exactly that class, even when ``Out`` is a
class defined inside a function, which :class:`~tagcache.codec.JsonCodec`
cannot find by name: the classes named in the return annotation are adopted
by the codec at decoration (:func:`tagcache.hints.prepare_codec`).

This module has no ``from __future__ import annotations`` (annotations are
class objects); ``tests/return_types_future.py`` builds the same scenarios
with string annotations.

``CachedFunction.__init__`` calls ``prepare_codec`` with the decorating
frame's locals, so plain ``@cache.cached`` is all a user writes.
"""

import dataclasses
import enum
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Annotated, Any, Literal, NewType, Optional, TypedDict, Union

import pytest

from tagcache import Cache, SerializationError
from tagcache.codec import JsonCodec
from tagcache.exceptions import ConfigurationError
from tagcache.hints import prepare_codec, return_classes
from tagcache.testing import memory_cache

from tests import return_types_future

try:
    import pydantic
except ImportError:  # pragma: no cover - pydantic is a test dependency
    pydantic = None  # type: ignore[assignment]  # the model tests are skipped then

HAS_PYDANTIC_2 = pydantic is not None and pydantic.VERSION.startswith("2.")
needs_pydantic = pytest.mark.skipif(not HAS_PYDANTIC_2, reason="pydantic v2 is not installed")


# --------------------------------------------------------------------------------------------------
# scenarios: the same local classes and functions, with class and with string annotations


def build(cache: Cache) -> SimpleNamespace:
    """Local classes and cached functions returning them (annotations are classes)."""
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


BUILDERS = {"class-annotations": build, "string-annotations": return_types_future.build}


@pytest.fixture(params=list(BUILDERS))
def scenario(request: pytest.FixtureRequest) -> SimpleNamespace:
    cache = memory_cache()  # strict: a value that cannot be stored raises
    ns = BUILDERS[request.param](cache)
    ns.cache = cache
    return ns


async def twice(ns: SimpleNamespace, name: str, x: int) -> tuple[Any, Any]:
    """Call ``ns.<name>(x)`` twice: a miss that runs the function, then a hit decoded from the backend."""
    func = getattr(ns, name)
    before = await ns.cache.stats()
    first = await func(x)
    second = await func(x)
    after = await ns.cache.stats()
    assert ns.calls[name] == 1, "the second call must be a hit"
    assert after.hits == before.hits + 1
    assert after.errors == before.errors
    return first, second


def assert_out(ns: SimpleNamespace, value: Any, x: int) -> None:
    assert type(value) is ns.Out
    assert type(value.leaf) is ns.Leaf
    assert [type(leaf) for leaf in value.leaves] == [ns.Leaf, ns.Leaf]
    assert value == ns.Out(f"n{x}", ns.Leaf(x), [ns.Leaf(x + 1), ns.Leaf(x + 2)])


# --------------------------------------------------------------------------------------------------
# through @cache.cached (WIRING: decorated through cached() until CachedFunction calls prepare_codec)


async def test_returns_local_dataclass(scenario: SimpleNamespace) -> None:
    first, second = await twice(scenario, "one", 1)
    assert second is not first  # decoded from the stored bytes
    assert second == first
    assert_out(scenario, first, 1)
    assert_out(scenario, second, 1)


async def test_returns_list_of_local_dataclass(scenario: SimpleNamespace) -> None:
    first, second = await twice(scenario, "many", 1)
    assert type(second) is list
    assert second == first
    assert_out(scenario, second[0], 1)
    assert_out(scenario, second[1], 2)


@pytest.mark.parametrize("name", ["maybe", "optional"])
async def test_returns_optional_local_dataclass(scenario: SimpleNamespace, name: str) -> None:
    first, second = await twice(scenario, name, 3)
    assert second == first
    assert_out(scenario, second, 3)
    scenario.calls.clear()
    none_first, none_second = await twice(scenario, name, -1)
    assert none_first is None
    assert none_second is None


async def test_returns_dict_of_local_dataclass(scenario: SimpleNamespace) -> None:
    first, second = await twice(scenario, "by_name", 1)
    assert type(second) is dict
    assert second == first
    assert_out(scenario, second["a"], 1)
    assert_out(scenario, second["b"], 2)


async def test_returns_tuple_of_local_dataclass(scenario: SimpleNamespace) -> None:
    first, second = await twice(scenario, "pair", 1)
    assert type(second) is tuple
    assert second == first
    assert_out(scenario, second[0], 1)
    assert_out(scenario, second[1], 2)


@needs_pydantic
async def test_returns_local_pydantic_model(scenario: SimpleNamespace) -> None:
    first, second = await twice(scenario, "model", 1)
    assert second is not first
    assert type(second) is scenario.Model
    assert second == first
    assert_out(scenario, second.out, 1)
    assert second.extra is None


@needs_pydantic
async def test_returns_list_of_local_pydantic_model(scenario: SimpleNamespace) -> None:
    first, second = await twice(scenario, "models", 1)
    assert second == first
    assert [type(m) for m in second] == [scenario.Model, scenario.Model]
    assert_out(scenario, second[1].out, 2)


@needs_pydantic
async def test_returns_optional_local_pydantic_model(scenario: SimpleNamespace) -> None:
    first, second = await twice(scenario, "maybe_model", 1)
    assert type(second) is scenario.Model
    assert second == first
    scenario.calls.clear()
    assert await twice(scenario, "maybe_model", -1) == (None, None)


def make_service(cache: Cache, *, extra_field: bool) -> SimpleNamespace:
    """Define a local class and a cached function returning it, as a factory would: calling it
    again defines a new class with the same qualname (here, with an extra field)."""
    calls: Counter[str] = Counter()
    if extra_field:

        @dataclasses.dataclass
        class Out:
            a: int
            b: int = 0

    else:

        @dataclasses.dataclass  # type: ignore[no-redef]  # the class before the change
        class Out:
            a: int

    @cache.cached
    async def load(x: int) -> Out:
        calls["load"] += 1
        return Out(x)

    return SimpleNamespace(Out=Out, load=load, calls=calls)


async def test_redefined_class_makes_old_entries_a_miss() -> None:
    cache = memory_cache()
    old = make_service(cache, extra_field=False)
    first = await old.load(1)
    assert type(await old.load(1)) is old.Out
    assert old.calls["load"] == 1

    new = make_service(cache, extra_field=True)
    assert new.Out.__qualname__ == old.Out.__qualname__
    assert new.load.key_for(1) == old.load.key_for(1)  # the same entry
    errors = (await cache.stats()).errors
    value = await new.load(1)  # stored for the old fields: a miss, loaded again
    assert new.calls["load"] == 1
    assert (await cache.stats()).errors > errors  # counted as unreadable
    assert type(value) is new.Out
    assert value == new.Out(1, 0)
    hit = await new.load(1)
    assert new.calls["load"] == 1
    assert type(hit) is new.Out
    assert hit == value
    assert first == old.Out(1)

    # The replaced class can no longer be stored: its name now means the new class.
    with pytest.raises(SerializationError, match="replaced by another class of the same name"):
        cache.codec.encode(old.Out(2))


async def test_same_fields_redefined_class_decodes_into_the_newest() -> None:
    cache = memory_cache()

    def define() -> type:
        @dataclasses.dataclass
        class Same:
            a: int

        return Same

    first, second = define(), define()
    codec = cache.codec
    assert isinstance(codec, JsonCodec)
    assert codec.adopt(first) is True
    payload = codec.encode(first(1))
    assert codec.adopt(second) is True
    value = codec.decode(payload)
    assert type(value) is second
    assert value == second(1)


async def test_unannotated_local_class_still_raises() -> None:
    cache = memory_cache()

    @dataclasses.dataclass
    class Hidden:
        a: int

    @cache.cached
    async def untyped(x: int):  # type: ignore[no-untyped-def]  # no return annotation on purpose
        return Hidden(x)

    @cache.cached
    async def as_object(x: int) -> object:
        return Hidden(x)

    for func in (untyped, as_object):
        with pytest.raises(SerializationError, match=r"Hidden is a local class.*return annotation.*register"):
            await func(1)


async def test_local_class_needs_the_decorating_namespace_for_string_annotations() -> None:
    # Without the namespace the function was decorated in, a string annotation naming a local
    # class the function does not use cannot be resolved: nothing is adopted, nothing raises.
    load = return_types_future.forward_only()
    assert return_classes(load) == ()
    codec = JsonCodec()
    prepare_codec(codec, load)
    assert codec._adopted == {}


def test_closure_variables_resolve_string_annotations() -> None:
    captured, load = return_types_future.closure_only()
    assert return_classes(load) == (captured,)
    codec = JsonCodec()
    prepare_codec(codec, load)
    value = codec.decode(codec.encode([captured(1)]))
    assert type(value[0]) is captured


async def test_plain_decoration_adopts_the_return_classes() -> None:
    cache = memory_cache()

    @dataclasses.dataclass
    class Plain:
        a: int

    calls = 0

    @cache.cached
    async def load(x: int) -> list[Plain]:
        nonlocal calls
        calls += 1
        return [Plain(x)]

    assert await load(1) == [Plain(1)]
    value = await load(1)
    assert calls == 1
    assert type(value[0]) is Plain


# --------------------------------------------------------------------------------------------------
# JsonCodec.adopt


@dataclasses.dataclass
class Renamed:
    a: int


RENAMED = Renamed
del Renamed  # no longer found by its name


@dataclasses.dataclass
class Shadowed:
    a: int


OLD_SHADOWED = Shadowed


@dataclasses.dataclass  # type: ignore[no-redef]  # shadows the class above on purpose
class Shadowed:
    a: int
    b: str = ""


@dataclasses.dataclass
class ModuleLevel:
    a: int


async def test_renamed_module_level_class_round_trips() -> None:
    cache = memory_cache()
    calls = 0

    @cache.cached
    async def load(x: int) -> RENAMED:  # type: ignore[valid-type]  # an alias of the class
        nonlocal calls
        calls += 1
        return RENAMED(x)

    await load(1)
    value = await load(1)
    assert calls == 1
    assert type(value) is RENAMED
    assert value == RENAMED(1)


def test_adopt_only_what_cannot_be_found_by_name() -> None:
    codec = JsonCodec()
    assert codec.adopt(ModuleLevel) is False  # found by name: stored as before
    assert codec._adopted == {}

    @dataclasses.dataclass
    class Local:
        a: int

    codec.register(Local, "local", lambda v: v.a, lambda raw: Local(raw))
    assert codec.adopt(Local) is False  # registered: the registration is used
    assert b'"$x"' in codec.encode(Local(1))

    with pytest.raises(ConfigurationError, match="dataclass, pydantic model or enum"):
        codec.adopt(int)
    with pytest.raises(ConfigurationError, match="dataclass, pydantic model or enum"):
        codec.adopt("Local")  # type: ignore[arg-type]  # wrong on purpose


def test_adopted_local_enum_round_trips() -> None:
    class Color(enum.Enum):
        RED = 1
        BLUE = 2

    class Perm(enum.Flag):
        R = 1
        W = 2

    codec = JsonCodec()
    assert codec.adopt(Color) is True
    assert codec.adopt(Perm) is True
    value = codec.decode(codec.encode({"c": Color.BLUE, "p": Perm.R | Perm.W}))
    assert value == {"c": Color.BLUE, "p": Perm.R | Perm.W}
    assert type(value["c"]) is Color


def test_shadowed_class_adopted_then_the_new_one_is_refused() -> None:
    codec = JsonCodec()
    payload_new = codec.encode(Shadowed(1))  # the class found by the name: discovered first
    assert codec.adopt(OLD_SHADOWED) is True  # now the name means the old class, in this codec
    value = codec.decode(codec.encode(OLD_SHADOWED(1)))
    assert type(value) is OLD_SHADOWED
    with pytest.raises(SerializationError, match="adopted another class of that name"):
        codec.encode(Shadowed(2))
    with pytest.raises(SerializationError, match="has changed since this value was stored"):
        codec.decode(payload_new)  # the other class's fields: refused by the fingerprint


def test_adopted_class_payloads_are_unknown_to_other_codecs() -> None:
    @dataclasses.dataclass
    class Local:
        a: int

    codec = JsonCodec()
    codec.adopt(Local)
    payload = codec.encode(Local(1))
    with pytest.raises(SerializationError, match="malformed dataclass class reference"):
        JsonCodec().decode(payload)


def test_prepare_codec_leaves_other_codecs_and_module_classes_alone() -> None:
    @dataclasses.dataclass
    class Local:
        a: int

    async def load() -> tuple[Local, ModuleLevel]: ...

    prepare_codec(object(), load)  # not a JsonCodec: nothing to do, no error
    codec = JsonCodec()
    prepare_codec(codec, load)
    assert list(codec._adopted.values()) == [Local]


# --------------------------------------------------------------------------------------------------
# return_classes


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Node:
    value: int
    children: "list[Node]"
    color: Color = Color.RED


UserId = NewType("UserId", int)


def test_return_classes_walks_annotation_shapes() -> None:
    @dataclasses.dataclass
    class Inner:
        n: int

    @dataclasses.dataclass
    class Out:
        inner: Inner
        many: dict[str, tuple[Inner, ...]]

    class Row(TypedDict):
        out: Out

    def annotated(annotation: Any) -> Callable[..., Any]:
        async def func() -> None: ...

        func.__annotations__ = {"return": annotation}
        return func

    both = (Out, Inner)
    shapes: list[tuple[Any, tuple[type, ...]]] = [
        (Out, both),
        (list[Out], both),
        (Out | None, both),
        (Optional[Out], both),  # noqa: UP045 - the typing spelling on purpose
        (Union[int, Out], both),  # noqa: UP007 - the typing spelling on purpose
        (dict[str, Out], both),
        (tuple[Out, ...], both),
        (tuple[int, Out], both),
        (Sequence[Out], both),
        (Annotated[Out, "meta"], both),
        (list[Annotated[dict[str, Out | None], "meta"]], both),
        (Mapping[str, list[Optional[Out]]], both),  # noqa: UP045
        (Row, both),
        (Inner, (Inner,)),
        (Node, (Node, Color)),
        (Literal[Color.RED], (Color,)),
        (list[Literal[Color.RED] | Inner], (Color, Inner)),
        (UserId, ()),
        (int, ()),
        (None, ()),
        (dict[str, Any], ()),
        ("list[Out]", both),  # resolved in localns below
        (list["Out"], both),
        ("Missing", ()),  # cannot be resolved: nothing, no error
        ("list[", ()),  # not even an expression
    ]
    localns = {"Out": Out}
    for annotation, expected in shapes:
        assert return_classes(annotated(annotation), localns) == expected, annotation

    async def no_annotation():  # type: ignore[no-untyped-def]  # on purpose
        ...

    assert return_classes(no_annotation) == ()
    assert return_classes(annotated("list[Out]")) == ()  # no namespace naming Out


@needs_pydantic
def test_return_classes_includes_model_fields() -> None:
    @dataclasses.dataclass
    class Part:
        n: int

    class Whole(pydantic.BaseModel):
        parts: list[Part]
        node: Node | None = None

    async def load() -> dict[str, Whole]: ...

    assert return_classes(load) == (Whole, Part, Node, Color)


def test_return_classes_of_string_annotations() -> None:
    a, b, load, localns = return_types_future.two_local()
    assert return_classes(load, localns) == (a, b)
    assert return_classes(load, {"A": a}) == (a,)  # B cannot be resolved: A's field is skipped
    assert return_classes(load) == ()
