"""Tests of the codecs: exact type round trips, the plain-JSON fast path, and signed pickles."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hmac
import importlib
import math
import pickle
import socket
import subprocess
import sys
import zoneinfo
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagcache.codec import Codec, JsonCodec, KeyBoundCodec, PickleCodec, _dataclass_fingerprint
from tagcache.exceptions import ConfigurationError, SerializationError

pydantic = pytest.importorskip("pydantic")


# --------------------------------------------------------------------------------------------------
# module-level types the codec can find again by name


class Color(enum.Enum):
    RED = 1
    GREEN = "green"
    BLUE = (1, 2)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


class Mode(str, enum.Enum):  # the StrEnum shape, also on Python 3.10
    FAST = "fast"
    SAFE = "safe"


ENUM_MEMBERS: list[enum.Enum] = [*Color, *Level, *Perm, Perm.R | Perm.W, Perm(0), *Mode]
if sys.version_info >= (3, 11):

    class Size(enum.StrEnum):
        S = "s"
        M = "m"

    ENUM_MEMBERS += list(Size)


@dataclasses.dataclass
class Point:
    x: Any
    y: Any = None


@dataclasses.dataclass(frozen=True)
class FrozenPair:
    left: Any
    right: Any


@dataclasses.dataclass
class Totals:
    items: list[int]
    total: int = dataclasses.field(init=False)
    post_init_calls: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        self.total = sum(self.items)
        self.post_init_calls += 1


class Inner(pydantic.BaseModel):
    when: datetime
    tags: tuple[str, ...] = ()


class Model(pydantic.BaseModel):
    a: int
    payload: Any = None
    inner: Inner | None = None


class Loose(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")
    name: str
    _secret: int = pydantic.PrivateAttr(default=0)


# --------------------------------------------------------------------------------------------------
# comparing values: equal AND of the same types, recursively (NaN counts as equal to NaN)


def assert_same(a: Any, b: Any, path: str = "value") -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} became {type(b).__name__}"
    t = type(a)
    if t is float:
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert a == b, path
            assert math.copysign(1.0, a) == math.copysign(1.0, b), f"{path}: sign of zero lost"
    elif t is Decimal:
        assert str(a) == str(b), path
    elif t in (list, tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif t is dict:
        assert len(a) == len(b), path
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{path}<key {ka!r}>")
            assert_same(va, vb, f"{path}[{ka!r}]")
    elif t in (set, frozenset):
        assert a == b, path
        for x in a:
            (y,) = [y for y in b if y == x]
            assert_same(x, y, f"{path}<element {x!r}>")
    elif t in (datetime, time):
        assert a == b, path
        assert a.replace(tzinfo=None) == b.replace(tzinfo=None), path
        assert a.fold == b.fold, f"{path}: fold"
        assert type(a.tzinfo) is type(b.tzinfo), f"{path}: tzinfo type"
        if isinstance(a.tzinfo, ZoneInfo):
            assert a.tzinfo.key == b.tzinfo.key, path
        else:
            assert a.tzinfo == b.tzinfo, path
    elif isinstance(a, pydantic.BaseModel):
        assert_same(a.__dict__, b.__dict__, f"{path}.__dict__")
        assert a.model_fields_set == b.model_fields_set, path
        assert a.__pydantic_extra__ == b.__pydantic_extra__, path
        assert a.__pydantic_private__ == b.__pydantic_private__, path
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert a == b, path


def round_trip(codec: Codec, value: Any) -> Any:
    decoded = codec.decode(codec.encode(value))
    assert_same(value, decoded)
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = ""
    if "nan" not in text.lower():  # NaN is not equal to itself
        assert decoded == value
    return decoded


# --------------------------------------------------------------------------------------------------
# the property test

ZONES = [
    ZoneInfo(k) for k in ("UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe")
]
fixed_offsets = st.builds(
    timezone,
    st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)),
)
zones = st.one_of(st.none(), fixed_offsets, st.sampled_from(ZONES))
integers = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 3, max_value=2**64 + 3),
    st.integers(min_value=-(2**63) - 3, max_value=-(2**63) + 3),
    st.integers(min_value=2**64, max_value=2**300).flatmap(lambda n: st.sampled_from([n, -n])),
)
decimals = st.one_of(
    st.decimals(),
    st.sampled_from(["NaN", "-NaN", "sNaN", "Infinity", "-Infinity", "1E+3", "-0", "0E-10", "1.500"]).map(
        Decimal
    ),
)
hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.binary(max_size=10),
    st.dates(),
    st.datetimes(timezones=zones),
    st.times(timezones=zones),
    st.timedeltas(),
    st.uuids(),
    st.decimals(allow_nan=False),
    st.sampled_from(ENUM_MEMBERS),
)
hashables = st.recursive(
    hashable_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(tuple),
        st.frozensets(children, max_size=3),
        st.builds(FrozenPair, children, children),
    ),
    max_leaves=4,
)
leaves = st.one_of(
    hashable_leaves,
    st.floats(),
    decimals,
    st.builds(Totals, st.lists(st.integers(-100, 100), max_size=3)),
    st.builds(Inner, when=st.datetimes(timezones=zones), tags=st.lists(st.text(max_size=3)).map(tuple)),
)
reserved_keys = st.sampled_from(["$tuple", "$dt", "$x", "$dict", "$set", "$pyd", "a"])


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
        st.dictionaries(reserved_keys, children, max_size=2),
        st.dictionaries(hashables, children, max_size=3),
        st.sets(hashables, max_size=3),
        st.frozensets(hashables, max_size=3),
        st.builds(Point, children, children),
        st.builds(FrozenPair, children, children),
        st.builds(
            Model,
            a=st.integers(-(2**63), 2**63 - 1),
            payload=children,
            inner=st.none() | leaves.filter(lambda v: isinstance(v, Inner)),
        ),
    )


values = st.recursive(leaves, containers, max_leaves=16)
CODEC = JsonCodec()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_round_trip_keeps_values_and_types(value: Any) -> None:
    round_trip(CODEC, value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.binary(max_size=40).map(lambda b: b"\x02" + b)))
def test_decoding_garbage_only_raises_serialization_error(data: bytes) -> None:
    with contextlib.suppress(SerializationError):
        CODEC.decode(data)


@settings(max_examples=200, deadline=None)
@given(values, st.data())
def test_truncated_payload_raises_serialization_error(value: Any, data: st.DataObject) -> None:
    payload = CODEC.encode(value)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with contextlib.suppress(SerializationError):
        CODEC.decode(payload[:cut])


# --------------------------------------------------------------------------------------------------
# the plain-JSON fast path


PLAIN = {"id": 7, "name": "Widget", "price": 19.5, "tags": ["a", "b"], "ok": True, "n": None, "o": {"x": []}}


def test_plain_json_payload_is_bare_orjson() -> None:
    codec = JsonCodec()
    payload = codec.encode(PLAIN)
    assert payload == orjson.dumps(PLAIN)
    assert payload[0] > 0x20  # never a format marker
    assert codec.decode(orjson.dumps(PLAIN)) == PLAIN


def test_plain_json_decode_is_one_orjson_loads_and_no_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = JsonCodec()
    payload = codec.encode(PLAIN)
    calls: list[object] = []
    real_loads = orjson.loads

    def counting_loads(data: Any) -> Any:
        calls.append(data)
        return real_loads(data)

    def no_walk(self: JsonCodec, tree: Any) -> Any:
        raise AssertionError("a plain payload must not be walked")

    monkeypatch.setattr(orjson, "loads", counting_loads)
    monkeypatch.setattr(JsonCodec, "_unwalk", no_walk)
    assert codec.decode(payload) == PLAIN
    assert len(calls) == 1


@pytest.mark.parametrize(
    "value",
    [None, True, 0, "", [], {}, 2**64 - 1, -(2**63), 1.5, -0.0, {"$tuple": 1, "b": 2}, {"$ref": "#/x"}],
)
def test_plain_values_use_the_plain_format(value: Any) -> None:
    payload = JsonCodec().encode(value)
    assert payload == orjson.dumps(value)
    round_trip(JsonCodec(), value)


@pytest.mark.parametrize(
    "value",
    [(1,), {1: 2}, b"", 2**64, -(2**63) - 1, float("nan"), [1, {"a": (2,)}], {"$tuple": [1, 2]}],
)
def test_other_values_use_the_tagged_format(value: Any) -> None:
    payload = JsonCodec().encode(value)
    assert payload[:1] == JsonCodec.TAGGED_MARKER
    round_trip(JsonCodec(), value)


# --------------------------------------------------------------------------------------------------
# specific values


@pytest.mark.parametrize(
    "n",
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**100, -(10**100), 10**5000],
    ids=lambda n: f"{n:x}"[:20],
)
def test_big_ints(n: int) -> None:
    round_trip(JsonCodec(), n)
    round_trip(JsonCodec(), [n, {"k": n}])


@pytest.mark.parametrize(
    "x", [-0.0, 0.0, float("inf"), float("-inf"), float("nan"), 5e-324, 1.7976931348623157e308]
)
def test_special_floats(x: float) -> None:
    decoded = round_trip(JsonCodec(), [x])
    assert math.copysign(1.0, decoded[0]) == math.copysign(1.0, x)


@pytest.mark.parametrize(
    "value",
    [
        {"$tuple": [1, 2]},
        {"$dict": [[1, 2]]},
        {"$dt": "2020-01-01T00:00:00"},
        {"$x": ["name", 1]},
        {"$set": []},
        [{"$bytes": "AA=="}, (1,)],
        {"$tuple": {"$tuple": (1,)}},
    ],
)
def test_dicts_colliding_with_type_markers(value: Any) -> None:
    round_trip(JsonCodec(), value)
    round_trip(JsonCodec(), (value,))


def test_non_str_keys() -> None:
    value = {
        1: "int",
        2.5: "float",
        None: "none",
        (1, "b"): "tuple",
        frozenset({1, 2}): "frozenset",
        Color.RED: "enum",
        date(2020, 1, 2): "date",
        b"k": "bytes",
        FrozenPair(1, 2): "dataclass",
        "s": "str",
    }
    round_trip(JsonCodec(), value)


def test_aware_datetimes_keep_zone_and_fold() -> None:
    paris = ZoneInfo("Europe/Paris")
    ambiguous = datetime(2023, 10, 29, 2, 30, tzinfo=paris)
    for value in (
        ambiguous,
        ambiguous.replace(fold=1),
        datetime(2020, 1, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2020, 1, 1, tzinfo=timezone.utc),
        datetime(2020, 1, 1, 23, 59, 59, 999999),
        time(1, 2, 3, 4, tzinfo=timezone(-timedelta(hours=3))),
        time(1, 2, 3, tzinfo=paris),
        time(4, 5, fold=1),
    ):
        round_trip(JsonCodec(), value)
    decoded = JsonCodec().decode(JsonCodec().encode(ambiguous.replace(fold=1)))
    assert decoded.utcoffset() == timedelta(hours=1)


def test_other_tzinfo_types_are_rejected() -> None:
    class Custom(tzinfo):
        def utcoffset(self, dt: datetime | None) -> timedelta:
            return timedelta(0)

    with pytest.raises(SerializationError, match=r"tzinfo.*Custom.*zoneinfo"):
        JsonCodec().encode(datetime(2020, 1, 1, tzinfo=Custom()))


def test_enums_dataclasses_and_models() -> None:
    codec = JsonCodec()
    for member in ENUM_MEMBERS:
        assert codec.decode(codec.encode(member)) is member
    totals = Totals([1, 2, 3])
    totals.total = 100  # init=False fields are restored as stored, __post_init__ is not re-run
    decoded = round_trip(codec, totals)
    assert decoded.total == 100
    assert decoded.post_init_calls == 1
    round_trip(codec, FrozenPair(Point(1, (2,)), {Level.LOW: Perm.R | Perm.X}))
    model = Model(
        a=1, payload={"t": (1, 2), "s": {b"x"}}, inner=Inner(when=datetime(2020, 1, 1), tags=("a",))
    )
    round_trip(codec, model)
    loose = Loose(name="n", extra_field=(1, 2))
    loose._secret = 42
    decoded = round_trip(codec, loose)
    assert decoded._secret == 42
    assert decoded.extra_field == (1, 2)


def test_missing_dataclass_field_gets_its_default() -> None:
    codec = JsonCodec()
    payload = codec.encode(Point(1, 2)).replace(b',"y":2', b"")
    assert codec.decode(payload) == Point(1, None)


def test_pydantic_is_not_imported_by_the_codec() -> None:
    code = "import sys, tagcache.codec as c; c.JsonCodec().encode((1,)); assert 'pydantic' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# decoding never imports a module or runs lookup hooks


def test_decoding_never_imports_the_module_a_payload_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "tagcache_test_payload_module"
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{name}.py").write_text(
        "import dataclasses, pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('module code ran')\n"
        "@dataclasses.dataclass\n"
        "class Secret:\n"
        "    x: int\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)  # and drop it again after the test

    @dataclasses.dataclass
    class Secret:  # the same fields: the same field fingerprint
        x: int

    fingerprint = _dataclass_fingerprint(Secret)
    payload = JsonCodec.TAGGED_MARKER + orjson.dumps({"$dc": [f"{name}:Secret", fingerprint, {"x": 1}]})
    codec = JsonCodec()
    with pytest.raises(SerializationError, match=rf"module '{name}', which is not imported in this process"):
        codec.decode(payload)
    assert name not in sys.modules
    assert not marker.exists()
    # once the application has imported the module itself, the same payload decodes
    module = importlib.import_module(name)
    decoded = codec.decode(payload)
    assert type(decoded) is module.Secret
    assert decoded.x == 1


def test_class_lookup_does_not_call_module_getattr(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []
    module = ModuleType("tagcache_test_lazy_module")

    def lazy_getattr(attr: str) -> Any:  # the usual shape of a lazy import
        looked_up.append(attr)
        raise AttributeError(attr)

    module.__getattr__ = lazy_getattr  # type: ignore[method-assign]  # PEP 562 module hook
    monkeypatch.setitem(sys.modules, module.__name__, module)
    payload = JsonCodec.TAGGED_MARKER + orjson.dumps({"$dc": [f"{module.__name__}:Lazy", "00000000", {}]})
    with pytest.raises(SerializationError, match="has no attribute 'Lazy'"):
        JsonCodec().decode(payload)
    assert looked_up == []


def _datetime_in_zone(key: str) -> bytes:
    return JsonCodec.TAGGED_MARKER + orjson.dumps({"$dt": ["2020-01-01T00:00:00", key, 0]})


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/Paris/",
        "Europe//Paris",
        ".",
        "a.b/c",
        "x\x00y",
        "x" * 300,
    ],
)
def test_malformed_zone_keys_are_rejected_before_lookup(key: str) -> None:
    with pytest.raises(SerializationError, match="is not a valid time zone key"):
        JsonCodec().decode(_datetime_in_zone(key))


def test_unknown_zone_is_a_serialization_error_naming_the_zone() -> None:
    with pytest.raises(SerializationError, match="time zone 'No/Such_Zone' is not available"):
        JsonCodec().decode(_datetime_in_zone("No/Such_Zone"))


def test_malformed_zone_keys_never_reach_the_tzdata_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ZoneInfo looks a zone missing from the system database up in the tzdata package, by
    # importing "tzdata.zoneinfo." + the key's directories joined with ".": a dotted key would
    # name further modules. A stand-in tzdata records whether any such import was attempted.
    marker = tmp_path / "imported.txt"
    (tmp_path / "tzdata.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('tzdata imported')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tzdata", raising=False)
    for key in ("zoneinfo.x/y", "a.b/c", "x\x00y"):
        with pytest.raises(SerializationError):
            JsonCodec().decode(_datetime_in_zone(key))
    assert not marker.exists()


def test_zone_keys_decoding_would_reject_are_not_encoded() -> None:
    files = [Path(base, "UTC") for base in zoneinfo.TZPATH if Path(base, "UTC").is_file()]
    if not files:
        pytest.skip("no system time zone database to read a zone file from")
    with files[0].open("rb") as f:
        zone = ZoneInfo.from_file(f, key="custom.zone")
    with pytest.raises(SerializationError, match=r"ZoneInfo key 'custom.zone' is not a time zone name"):
        JsonCodec().encode(datetime(2020, 1, 1, tzinfo=zone))


# --------------------------------------------------------------------------------------------------
# local classes, registration and unsupported values


def test_local_class_is_rejected_then_accepted_after_register() -> None:
    @dataclasses.dataclass
    class Local:
        value: int

    codec = JsonCodec()
    with pytest.raises(
        SerializationError, match=r"value\['k'\]: dataclass .*Local is a local class.*register"
    ):
        codec.encode({"k": Local(1)})
    codec.register(Local, "local", lambda obj: obj.value, lambda raw: Local(raw))
    payload = codec.encode({"k": [Local(2)]})
    assert codec.decode(payload) == {"k": [Local(2)]}
    with pytest.raises(SerializationError, match="no type is registered under the name 'local'"):
        JsonCodec().decode(payload)


def test_local_enum_is_rejected() -> None:
    class LocalEnum(enum.Enum):
        A = 1

    with pytest.raises(SerializationError, match=r"enum .*LocalEnum is a local class"):
        JsonCodec().encode(LocalEnum.A)


def test_registered_type_takes_precedence_and_nests() -> None:
    codec = JsonCodec()
    codec.register(Point, "pt", lambda p: (p.x, p.y), lambda raw: Point(*raw))
    payload = codec.encode([Point(1, Point(date(2020, 1, 1)))])
    assert b'"$x"' in payload
    assert b'"$dc"' not in payload
    round_trip(codec, [Point(1, Point(date(2020, 1, 1)))])


def test_register_rejects_bad_registrations() -> None:
    codec = JsonCodec()
    codec.register(Point, "pt", lambda p: p.x, lambda raw: Point(raw))
    codec.register(Point, "pt", lambda p: p.x, lambda raw: Point(raw))  # same pair again is fine
    with pytest.raises(ConfigurationError, match="already registered"):
        codec.register(FrozenPair, "pt", lambda p: 0, lambda raw: FrozenPair(0, 0))
    with pytest.raises(ConfigurationError, match="already registered"):
        codec.register(Point, "other", lambda p: p.x, lambda raw: Point(raw))
    with pytest.raises(ConfigurationError, match="plain JSON type"):
        codec.register(dict, "d", dict, dict)
    with pytest.raises(ConfigurationError, match="non-empty"):
        codec.register(FrozenPair, "", lambda p: 0, lambda raw: FrozenPair(0, 0))


def test_failing_registered_encoder_raises_serialization_error() -> None:
    codec = JsonCodec()

    def broken(p: Point) -> Any:
        raise RuntimeError("boom")

    codec.register(Point, "pt", broken, lambda raw: Point(raw))
    with pytest.raises(SerializationError, match=r"value\[0\]: the encode function .*boom"):
        codec.encode([Point(1)])


@pytest.mark.parametrize(
    ("value", "where", "type_name"),
    [
        (object(), "value", "object"),
        ({"a": [1, lambda: 1]}, r"value\['a'\]\[1\]", "function"),
        ((1, {2: {"k": Ellipsis}}), r"value\[1\]\[2\]\['k'\]", "ellipsis"),
        (Point(1, [object()]), r"value\.y\[0\]", "object"),
        ({object(): 1}, r"value<key <object.*>>", "object"),
        ({1.5: complex(1, 2)}, r"value\[1\.5\]", "complex"),
    ],
)
def test_unsupported_values_name_the_type_and_the_way_out(value: Any, where: str, type_name: str) -> None:
    with pytest.raises(
        SerializationError, match=rf"^cannot encode {where}: .*{type_name}.*register.*PickleCodec"
    ):
        JsonCodec().encode(value)


def test_socket_is_unsupported() -> None:
    with (
        socket.socket() as sock,
        pytest.raises(SerializationError, match=r"socket\.socket.*register.*PickleCodec"),
    ):
        JsonCodec().encode({"conn": sock})


def test_subclasses_of_builtin_types_are_unsupported() -> None:
    class MyStr(str):
        pass

    with pytest.raises(SerializationError, match="MyStr"):
        JsonCodec().encode([MyStr("x")])


def test_reference_cycle_raises_serialization_error() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(SerializationError, match="cycle"):
        JsonCodec().encode(cycle)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01",
        b"\x01{",
        b"\x01\xff\xfe",
        b"\x02",
        b"\x02[1,",
        b"\x7f{}",
        b'{"a":',
        b"not json",
        b"\x03" + b"\x00" * 40,
        b'\x02{"$tuple":5}',
        b'\x02{"$dt":5}',
        b'\x02{"$dt":["2020-01-01", "No/Such_Zone", 0]}',
        b'\x02{"$int":"zz"}',
        b'\x02{"$float":"1.5"}',
        b'\x02{"$bytes":"!!"}',
        b'\x02{"$td":[1,2]}',
        b'\x02{"$uuid":"nope"}',
        b'\x02{"$dec":"abc"}',
        b'\x02{"$dict":[[1]]}',
        b'\x02{"$dict":[[[1],2]]}',
        b'\x02{"$set":[[1]]}',
        b'\x02{"$enum":["collections:OrderedDict","x"]}',
        b'\x02{"$enum":["no_such_module_xyz:Thing","x"]}',
        b'\x02{"$enum":["tests.test_codec:Color","PURPLE"]}',
        b'\x02{"$enum":["tests.test_codec","RED"]}',
        b'\x02{"$enum":5}',
        b'\x02{"$dc":["builtins:int",{}]}',
        b'\x02{"$dc":["tests.test_codec:Point",{}]}',
        b'\x02{"$dc":["tests.test_codec:Point",[]]}',
        b'\x02{"$pyd":["tests.test_codec:Point",{},{}]}',
        b'\x02{"$pyd":["tests.test_codec:Model",{},5]}',
        b'\x02{"$dc":["builtins:int","00000000",{}]}',
        b'\x02{"$dc":["tests.test_codec:Point","00000000",{}]}',
        b'\x02{"$dc":["tests.test_codec:Point",5,{}]}',
        b'\x02{"$dc":["tests.test_codec:Point",[],{}]}',
        b'\x02{"$dc":["tests.test_codec:Point","00000000",{},{}]}',
        b'\x02{"$dc":[]}',
        b'\x02{"$pyd":["tests.test_codec:Point","00000000",{},{}]}',
        b'\x02{"$pyd":["tests.test_codec:Model","00000000",{},{}]}',
        b'\x02{"$pyd":["tests.test_codec:Model",null,{},5]}',
        b'\x02{"$pyd":[5,"00000000",{},5]}',
        b'\x02{"$x":["unknown",1]}',
        b'\x02{"$x":[[],1]}',
    ],
)
def test_corrupt_payloads_raise_serialization_error(payload: bytes) -> None:
    with pytest.raises(SerializationError):
        JsonCodec().decode(payload)


def test_decoding_non_bytes_raises_serialization_error() -> None:
    with pytest.raises(SerializationError, match="expected bytes"):
        JsonCodec().decode("\x01{}")  # type: ignore[arg-type]  # deliberately the wrong type


def test_codecs_satisfy_the_protocol() -> None:
    assert isinstance(JsonCodec(), Codec)
    assert isinstance(PickleCodec(b"k"), Codec)


def test_only_pickle_codec_binds_payloads_to_their_key() -> None:
    assert isinstance(PickleCodec(b"k"), KeyBoundCodec)
    assert not isinstance(JsonCodec(), KeyBoundCodec)


# --------------------------------------------------------------------------------------------------
# PickleCodec

UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    UNPICKLED.append("unpickled")
    return "trap"


class Trap:
    """Unpickling an instance records it in UNPICKLED."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record_unpickling, ())


@pytest.fixture
def unpickled() -> list[str]:
    UNPICKLED.clear()
    return UNPICKLED


def test_pickle_round_trip() -> None:
    codec = PickleCodec(b"secret")
    value = {"p": Point(1, {2, 3}), "c": complex(1, 2), "t": (date(2020, 1, 1), Decimal("1.0"))}
    payload = codec.encode(value)
    assert payload[:1] == PickleCodec.MARKER
    assert codec.decode(payload) == value
    assert PickleCodec("secret").decode(payload) == value  # str keys are UTF-8 encoded


def test_signed_trap_is_unpickled_with_the_right_key(unpickled: list[str]) -> None:
    codec = PickleCodec(b"secret")
    assert codec.decode(codec.encode(Trap())) == "trap"
    assert unpickled == ["unpickled"]


def test_wrong_key_is_rejected_without_unpickling(unpickled: list[str]) -> None:
    payload = PickleCodec(b"attacker").encode(Trap())
    with pytest.raises(SerializationError, match=r"signature.*not unpickled"):
        PickleCodec(b"secret").decode(payload)
    assert unpickled == []


def test_tampered_payload_is_rejected_without_unpickling(unpickled: list[str]) -> None:
    codec = PickleCodec(b"secret")
    payload = bytearray(codec.encode(["harmless", Trap()]))
    payload[-5] ^= 0x01
    with pytest.raises(SerializationError, match="signature"):
        codec.decode(bytes(payload))
    # a valid signature on other bytes does not help either
    good = codec.encode("harmless")
    forged = good[:33] + pickle.dumps(Trap())
    with pytest.raises(SerializationError, match="signature"):
        codec.decode(forged)
    assert unpickled == []


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Trap()),
        PickleCodec.MARKER + pickle.dumps(Trap()),
        PickleCodec.MARKER + b"\x00" * 32 + pickle.dumps(Trap()),
        PickleCodec.MARKER + b"\x00" * 10,
        b"",
        JsonCodec().encode([1]),
    ],
)
def test_unsigned_payloads_are_rejected_without_unpickling(payload: bytes, unpickled: list[str]) -> None:
    with pytest.raises(SerializationError):
        PickleCodec(b"secret").decode(payload)
    assert unpickled == []


def test_key_rotation_with_fallback_keys() -> None:
    old = PickleCodec(b"old-key")
    new = PickleCodec(b"new-key", fallback_keys=[b"old-key", "older"])
    assert new.decode(old.encode([1, 2])) == [1, 2]
    assert new.decode(PickleCodec("older").encode("x")) == "x"
    with pytest.raises(SerializationError, match="signature"):
        old.decode(new.encode([1, 2]))  # new payloads are signed with the new key only


@pytest.mark.parametrize(
    "make",
    [
        lambda: PickleCodec(b""),
        lambda: PickleCodec(""),
        lambda: PickleCodec(b"k", fallback_keys=[b""]),
        lambda: PickleCodec(None),
        lambda: PickleCodec(b"k", fallback_keys=b"old"),
        lambda: PickleCodec(b"k", protocol=99),
    ],
)
def test_bad_pickle_configuration(make: Any) -> None:
    with pytest.raises(ConfigurationError):
        make()


def test_empty_key_message_explains_why() -> None:
    with pytest.raises(ConfigurationError, match=r"non-empty secret_key.*arbitrary code"):
        PickleCodec(b"")


def test_unpicklable_value_raises_serialization_error() -> None:
    with pytest.raises(SerializationError, match="function"):
        PickleCodec(b"k").encode(lambda: 1)


def test_signed_but_corrupt_pickle_raises_serialization_error() -> None:
    codec = PickleCodec(b"k")
    body = b"not a pickle"
    context = b"app\x00k"
    # signed with the codec's own (derived) key over the length-prefixed context and the body:
    # only unpickling can fail
    signed = len(context).to_bytes(8, "big") + context + body
    forged = PickleCodec.MARKER + hmac.digest(codec._key, signed, "sha256") + body
    with pytest.raises(SerializationError, match="cannot unpickle"):
        codec.decode_for(forged, context)


ROOT = b"app\x00user:root"
ALICE = b"app\x00user:alice"


def test_key_bound_round_trip() -> None:
    codec = PickleCodec(b"secret")
    value = {"p": Point(1, {2, 3}), "c": complex(1, 2)}
    assert codec.decode_for(codec.encode_for(value, ROOT), ROOT) == value
    assert PickleCodec(b"secret").decode_for(codec.encode_for(value, ALICE), ALICE) == value


def test_payload_copied_to_another_key_is_rejected_without_unpickling(unpickled: list[str]) -> None:
    codec = PickleCodec(b"secret")
    payload = codec.encode_for(Trap(), ROOT)
    for context in (ALICE, b"other\x00user:root", b"", ROOT[:-1], ROOT + b"x"):
        with pytest.raises(SerializationError, match=r"signature does not match.*another key"):
            codec.decode_for(payload, context)
    assert unpickled == []
    assert codec.decode_for(payload, ROOT) == "trap"  # under its own key it is unpickled: the trap works


def test_context_and_body_cannot_trade_bytes(unpickled: list[str]) -> None:
    # Signing context + body without a length prefix would accept the last byte of the context
    # moved to the front of the body.
    codec = PickleCodec(b"secret")
    payload = codec.encode_for(Trap(), b"app\x00ab")
    signature, body = payload[1:33], payload[33:]
    moved = PickleCodec.MARKER + signature + b"b" + body
    with pytest.raises(SerializationError, match="signature does not match"):
        codec.decode_for(moved, b"app\x00a")
    assert unpickled == []


def test_encode_and_decode_use_the_empty_context(unpickled: list[str]) -> None:
    codec = PickleCodec(b"secret")
    assert codec.decode_for(codec.encode([1, 2]), b"") == [1, 2]
    assert codec.decode(codec.encode_for((3,), b"")) == (3,)
    with pytest.raises(SerializationError, match="signature"):
        codec.decode(codec.encode_for(Trap(), ROOT))
    with pytest.raises(SerializationError, match="signature"):
        codec.decode_for(codec.encode(Trap()), ROOT)
    assert unpickled == []


def test_key_rotation_keeps_the_context_binding(unpickled: list[str]) -> None:
    old = PickleCodec(b"old-key")
    new = PickleCodec(b"new-key", fallback_keys=[b"old-key"])
    assert new.decode_for(old.encode_for([1, 2], ROOT), ROOT) == [1, 2]
    with pytest.raises(SerializationError, match="signature"):
        new.decode_for(old.encode_for(Trap(), ROOT), ALICE)
    assert unpickled == []


def test_fixed_offsets_keep_microseconds_and_names() -> None:
    for tz in (
        timezone(timedelta(microseconds=1)),
        timezone(-timedelta(hours=23, minutes=59, seconds=59, microseconds=999999)),
        timezone(timedelta(hours=1), "CET"),
        timezone.utc,
    ):
        decoded = round_trip(JsonCodec(), [datetime(2000, 1, 1, tzinfo=tz), time(1, tzinfo=tz)])
        assert decoded[0].tzname() == tz.tzname(None)
        assert decoded[1].utcoffset() == tz.utcoffset(None)
