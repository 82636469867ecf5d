"""Field fingerprints: a value stored before its class's fields changed is a miss, not a broken instance.

A deploy is simulated by defining the classes in a module registered in
``sys.modules``, encoding, then registering a new module of the same name
that defines the changed classes, and decoding.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

import tagcache.codec as codec_module
from tagcache import MISSING
from tagcache.codec import JsonCodec
from tagcache.exceptions import SerializationError
from tagcache.testing import memory_cache

pydantic = pytest.importorskip("pydantic")

MODULE = "tagcache_test_schema_models"
CHANGED = r"has changed since this value was stored: its field fingerprint was '[0-9a-f]{8}' and is now"

Deploy = Callable[[str], ModuleType]


@pytest.fixture
def deploy(monkeypatch: pytest.MonkeyPatch) -> Deploy:
    """Return a function that (re)defines the module MODULE from source, as a deploy would."""

    def define(source: str) -> ModuleType:
        module = ModuleType(MODULE)
        monkeypatch.setitem(sys.modules, MODULE, module)
        exec(compile(textwrap.dedent(source), f"<{MODULE}>", "exec"), module.__dict__)
        return module

    return define


DATACLASS_V1 = """
    import dataclasses

    @dataclasses.dataclass
    class UserOut:
        id: int
        name: str
"""

MODEL_V1 = """
    import pydantic

    class UserOut(pydantic.BaseModel):
        id: int
        name: str
"""

# (name, dataclass source, model source): each a change of UserOut that old values do not fit
CHANGES = [
    (
        "added field",
        """
        import dataclasses

        @dataclasses.dataclass
        class UserOut:
            id: int
            name: str
            is_admin: bool
        """,
        """
        import pydantic

        class UserOut(pydantic.BaseModel):
            id: int
            name: str
            is_admin: bool
        """,
    ),
    (
        "added field with a default",
        """
        import dataclasses

        @dataclasses.dataclass
        class UserOut:
            id: int
            name: str
            is_admin: bool = False
        """,
        """
        import pydantic

        class UserOut(pydantic.BaseModel):
            id: int
            name: str
            is_admin: bool = False
        """,
    ),
    (
        "removed field",
        """
        import dataclasses

        @dataclasses.dataclass
        class UserOut:
            id: int
        """,
        """
        import pydantic

        class UserOut(pydantic.BaseModel):
            id: int
        """,
    ),
    (
        "renamed field",
        """
        import dataclasses

        @dataclasses.dataclass
        class UserOut:
            id: int
            full_name: str
        """,
        """
        import pydantic

        class UserOut(pydantic.BaseModel):
            id: int
            full_name: str
        """,
    ),
    (
        "changed field type",
        """
        import dataclasses

        @dataclasses.dataclass
        class UserOut:
            id: str
            name: str
        """,
        """
        import pydantic

        class UserOut(pydantic.BaseModel):
            id: str
            name: str
        """,
    ),
]


def make_user(module: ModuleType, **fields: Any) -> Any:
    return module.UserOut(**{"id": 7, "name": "Ada", **fields})


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
@pytest.mark.parametrize(("change", "dataclass_v2", "model_v2"), CHANGES, ids=[c[0] for c in CHANGES])
def test_value_stored_before_a_field_change_does_not_decode(
    deploy: Deploy, kind: str, change: str, dataclass_v2: str, model_v2: str
) -> None:
    v1 = deploy(DATACLASS_V1 if kind == "dataclass" else MODEL_V1)
    payload = JsonCodec().encode(make_user(v1))
    deploy(dataclass_v2 if kind == "dataclass" else model_v2)
    with pytest.raises(SerializationError, match=rf"UserOut' {CHANGED}"):
        JsonCodec().decode(payload)


# The same class, or one that differs only in what the fingerprint leaves out (field order,
# defaults, constraints, methods): nothing a stored value holds is invalid for it.
SAME_FIELDS = {
    "dataclass": [
        DATACLASS_V1,
        """
        import dataclasses

        @dataclasses.dataclass
        class UserOut:
            name: str = "?"
            id: int = 0

            def greeting(self) -> str:
                return "hello " + self.name
        """,
    ],
    "pydantic": [
        MODEL_V1,
        """
        import pydantic

        class UserOut(pydantic.BaseModel):
            name: str = pydantic.Field(default="?", max_length=50)
            id: int = 0

            def greeting(self) -> str:
                return "hello " + self.name
        """,
    ],
}


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
@pytest.mark.parametrize("version", [0, 1], ids=["same class", "reordered fields, defaults, methods"])
def test_class_with_the_same_fields_decodes_after_a_deploy(deploy: Deploy, kind: str, version: int) -> None:
    v1 = deploy(DATACLASS_V1 if kind == "dataclass" else MODEL_V1)
    payload = JsonCodec().encode([make_user(v1)])
    ((ref, fingerprint, *_),) = orjson.loads(payload[1:])[0].values()
    assert ref == f"{MODULE}:UserOut"
    assert isinstance(fingerprint, str)
    assert len(fingerprint) == 8
    assert int(fingerprint, 16) >= 0
    v2 = deploy(SAME_FIELDS[kind][version])  # a new class object
    decoded = JsonCodec().decode(payload)
    assert type(decoded[0]) is v2.UserOut
    assert decoded == [make_user(v2)]
    if version:
        assert decoded[0].greeting() == "hello Ada"


def test_pydantic_private_attributes_and_extra_are_part_of_the_fingerprint(deploy: Deploy) -> None:
    v1 = deploy(MODEL_V1)
    payload = JsonCodec().encode(make_user(v1))
    deploy("""
        import pydantic

        class UserOut(pydantic.BaseModel):
            id: int
            name: str
            _token: str = pydantic.PrivateAttr(default="")
    """)
    with pytest.raises(SerializationError, match=CHANGED):
        JsonCodec().decode(payload)
    deploy("""
        import pydantic

        class UserOut(pydantic.BaseModel):
            model_config = pydantic.ConfigDict(extra="allow")
            id: int
            name: str
    """)
    with pytest.raises(SerializationError, match=CHANGED):
        JsonCodec().decode(payload)


NESTED_V1 = """
    import dataclasses
    import pydantic

    @dataclasses.dataclass
    class Line:
        sku: str
        qty: int

    class Order(pydantic.BaseModel):
        id: int
        lines: list[Line]
"""

NESTED_V2 = NESTED_V1.replace("qty: int", "qty: int\n        unit_price: float = 0.0")


def test_nested_instances_are_checked_each(deploy: Deploy) -> None:
    # Only the dataclass inside a list inside the model changed: the model's own fingerprint is
    # the same, and the nested instances' fingerprints catch the change.
    v1 = deploy(NESTED_V1)
    value = {"orders": (v1.Order(id=1, lines=[v1.Line("a", 1), v1.Line("b", 2)]),)}
    payload = JsonCodec().encode(value)
    v2 = deploy(NESTED_V2)
    with pytest.raises(SerializationError, match=rf"dataclass '{MODULE}:Line' {CHANGED}"):
        JsonCodec().decode(payload)
    assert codec_module._model_fingerprint(v1.Order) == codec_module._model_fingerprint(v2.Order)
    v1_again = deploy(NESTED_V1)
    decoded = JsonCodec().decode(payload)
    assert decoded == {
        "orders": (v1_again.Order(id=1, lines=[v1_again.Line("a", 1), v1_again.Line("b", 2)]),)
    }


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
def test_payload_stored_without_a_fingerprint_does_not_decode(deploy: Deploy, kind: str) -> None:
    # The format before fingerprints: ["module:qualname", fields] and ["module:qualname", fields, rest].
    v1 = deploy(DATACLASS_V1 if kind == "dataclass" else MODEL_V1)
    tree = orjson.loads(JsonCodec().encode(make_user(v1))[1:])
    ((marker, node),) = tree.items()
    del node[1]
    payload = JsonCodec.TAGGED_MARKER + orjson.dumps({marker: node})
    with pytest.raises(SerializationError, match=r"UserOut' was stored without a field fingerprint"):
        JsonCodec().decode(payload)


def test_fingerprints_are_computed_once_per_class(deploy: Deploy, monkeypatch: pytest.MonkeyPatch) -> None:
    v1 = deploy(NESTED_V1)
    computed: list[type] = []
    describe = codec_module._describe_annotation

    def counting(annotation: object) -> str:
        computed.append(type(annotation))
        return describe(annotation)

    monkeypatch.setattr(codec_module, "_describe_annotation", counting)
    codec = JsonCodec()
    value = [v1.Order(id=i, lines=[v1.Line("a", i)] * 3) for i in range(50)]
    for _ in range(3):
        assert codec.decode(codec.encode(value)) == value
    assert len(computed) == 4  # two fields of each class, described once
    assert JsonCodec().decode(JsonCodec().encode(value)) == value  # another codec: no recomputation
    assert len(computed) == 4


def test_fingerprint_is_the_same_in_every_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default repr of an object inside Annotated[...] holds its address, which differs between
    # processes; it is not part of the fingerprint.
    name = "tagcache_test_schema_annotated"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent("""
            import dataclasses
            from datetime import datetime
            from typing import Annotated, Optional

            import pydantic

            class Marker:
                pass

            @dataclasses.dataclass
            class Row:
                when: datetime
                score: Annotated[int, Marker()]
                note: Optional["Row"] = None

            class Model(pydantic.BaseModel):
                score: Annotated[int, Marker()]
                rows: list[Row] = []
        """)
    )
    code = (
        f"import {name} as m, tagcache.codec as c; "
        "print(c._dataclass_fingerprint(m.Row), c._model_fingerprint(m.Model))"
    )
    env_path = str(tmp_path)
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": env_path, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    monkeypatch.syspath_prepend(env_path)
    module = __import__(name)
    here = (
        f"{codec_module._dataclass_fingerprint(module.Row)} {codec_module._model_fingerprint(module.Model)}\n"
    )
    assert runs == {here}


# --------------------------------------------------------------------------------------------------
# through the cache


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
async def test_cache_get_after_a_field_change_is_a_miss_and_an_error(deploy: Deploy, kind: str) -> None:
    cache = memory_cache(strict=False)
    v1 = deploy(DATACLASS_V1 if kind == "dataclass" else MODEL_V1)
    await cache.set("user:7", make_user(v1), tags=["users"])
    deploy(CHANGES[1][1] if kind == "dataclass" else CHANGES[1][2])  # is_admin: bool = False
    assert await cache.get("user:7") is None
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.errors) == (0, 1, 1)
    assert await cache.get("user:7", default=MISSING) is MISSING  # it stays a miss until rewritten
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.errors) == (0, 2, 2)


@pytest.mark.parametrize("kind", ["dataclass", "pydantic"])
async def test_decorated_function_recomputes_after_a_field_change(deploy: Deploy, kind: str) -> None:
    cache = memory_cache(strict=False)
    deploy(DATACLASS_V1 if kind == "dataclass" else MODEL_V1)
    calls: list[int] = []

    @cache.cached(ttl=600, tags=["user:{user_id}"])
    async def get_user(user_id: int) -> Any:
        calls.append(user_id)
        module = sys.modules[MODULE]  # whichever version is deployed
        extra = {"is_admin": True} if "is_admin" in _field_names(module.UserOut) else {}
        return make_user(module, id=user_id, **extra)

    first = await get_user(7)
    assert not hasattr(first, "is_admin")
    v2 = deploy(CHANGES[1][1] if kind == "dataclass" else CHANGES[1][2])  # is_admin: bool = False
    second = await get_user(7)
    assert calls == [7, 7]
    assert type(second) is v2.UserOut
    assert second.is_admin is True
    # at least one error: the read-through path may read the entry a second time under its lock
    assert (await cache.stats()).errors >= 1
    third = await get_user(7)  # the recomputed value was stored again
    assert calls == [7, 7]
    assert third == second
    assert third.is_admin is True


def _field_names(cls: Any) -> set[str]:
    fields = getattr(cls, "__dataclass_fields__", None)
    return set(fields if fields is not None else cls.model_fields)
