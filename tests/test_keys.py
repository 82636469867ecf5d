"""Keys and tags built from call arguments (tagcache.keys)."""

from __future__ import annotations

import abc
import dataclasses
import enum
import inspect
import json
import numbers
import os
import subprocess
import sys
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, NewType, Protocol, TypeVar
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tagcache.exceptions import (
    ConfigurationError,
    InvalidKeyError,
    InvalidTagError,
    TagCacheError,
    UnsupportedArgumentError,
)
from tagcache.keys import KeyBuilder, TagTemplates, is_keyable_type
from tagcache.tags import MAX_KEY_LENGTH

from tests import keyfuncs
from tests.keyfuncs import Color, Level, Pair, Point, Profile, Repository

ROOT = Path(__file__).resolve().parent.parent

#: Keys of keyfuncs.SAMPLES, computed once. A change here changes every default key in every
#: deployed cache (all entries miss after an upgrade): only change it on purpose.
GOLDEN = [
    "tests.keyfuncs.get_user:29f4b147c6a8830835d30f9348d2c1d6",
    "tests.keyfuncs.get_user:6561650f0d73e0322dfbf797fc44f57f",
    "tests.keyfuncs.search:5626bb92dd3203466de738cec250c48f",
    "tests.keyfuncs.anything:f96b510dcf2e2f9f03cfdabd4799178b",
    "tests.keyfuncs.anything:3673dd2df3d2edf0d88efbe4d5979ff9",
    "tests.keyfuncs.anything:6f7581d57385e24fc79dc24ef44e74cf",
    "tests.keyfuncs.anything:1a1261f03313ff809eed68030deb9480",
    "tests.keyfuncs.anything:ab0cc0f054418674d4799d12dd8c04a8",
    "tests.keyfuncs.anything:f36b3d2880cb284fdb07df32c061d731",
    "tests.keyfuncs.anything:7f0bd206ba612dce1da1db60925c73fb",
    "tests.keyfuncs.anything:6825cb247a2cac7ec83adad96521b6eb",
    "tests.keyfuncs.anything:79333999ba642f9549f50351d37a2ada",
    "tests.keyfuncs.anything:4714d84416ac067b3725aea588b1e09e",
    "tests.keyfuncs.anything:5d913fbb82ad73c2fc532fbe40a702dc",
    "tests.keyfuncs.anything:4af7020ceff8710e43cfd8a16e8fc0e3",
    "tests.keyfuncs.anything:7562952af99904303f38a7ecda2e66a6",
    "tests.keyfuncs.anything:ab4f16e4b19d3851361aad6f49f8f41b",
    "tests.keyfuncs.anything:3a7ba96455c077e6b55091891ad00331",
    "tests.keyfuncs.anything:aebc0339f6376c708f76af1c8340481c",
    "tests.keyfuncs.anything:4b7e48a39026f48bf8451d90d2bad6e5",
    "tests.keyfuncs.anything:fe7726903398615d6d095e4a82a7d529",
    "tests.keyfuncs.anything:d286e5cec1b20be7852dba2531e064f2",
    "tests.keyfuncs.anything:c539ccea22b2b54cf48cb48e446026db",
    "tests.keyfuncs.anything:1be79659f08405b9e869877a9afb1bfd",
    "tests.keyfuncs.Repository.find:abbd5ae723b4a9c9666fb25ce740d850",
    "tests.keyfuncs.Repository.by_kind:ebd7674919f7ecf59f4a1be5fbc7aae0",
]


def key_of(value: Any) -> str:
    """The default key of ``anything(value)``."""
    return KeyBuilder(keyfuncs.anything)((value,), {})


# -- stability -------------------------------------------------------------------------------------


def test_golden_keys_do_not_change() -> None:
    assert keyfuncs.sample_keys() == GOLDEN


@pytest.mark.parametrize("seed", ["random", "0", "12345"])
def test_keys_are_equal_in_another_process(seed: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": seed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = "import json; from tests.keyfuncs import sample_keys; print(json.dumps(sample_keys()))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == keyfuncs.sample_keys()


def test_default_key_shape() -> None:
    key = KeyBuilder(keyfuncs.get_user)((42,), {})
    prefix, _, digest = key.rpartition(":")
    assert prefix == "tests.keyfuncs.get_user"
    assert len(digest) == 32
    assert int(digest, 16) >= 0


# -- binding ---------------------------------------------------------------------------------------


def test_positional_keyword_and_default_forms_give_one_key() -> None:
    build = KeyBuilder(keyfuncs.get_user)
    forms = [
        ((7,), {}),
        ((), {"user_id": 7}),
        ((7, 1), {}),
        ((7,), {"page": 1}),
        ((7,), {"size": 10}),
        ((), {"size": 10, "page": 1, "user_id": 7}),
    ]
    assert len({build(args, kwargs) for args, kwargs in forms}) == 1
    assert build((7, 2), {}) != build((7,), {})
    assert build((7,), {"size": 11}) != build((7,), {})
    assert build((8,), {}) != build((7,), {})


def test_parameter_names_are_part_of_the_key() -> None:
    def f(a: int = 0, b: int = 0) -> None: ...

    build = KeyBuilder(f)
    assert build((), {"a": 1}) != build((), {"b": 1})


def test_var_positional_and_var_keyword_are_encoded() -> None:
    build = KeyBuilder(keyfuncs.search)
    base = build(("q", 1, 2), {"a": 1, "b": 2})
    assert build(("q", 1, 2), {"b": 2, "a": 1}) == base  # kwargs order does not matter
    assert build(("q", 1, 2), {"a": 1, "b": 2, "limit": 20}) == base  # default applied
    assert build(("q", 2, 1), {"a": 1, "b": 2}) != base
    assert build(("q", 1, 2), {"a": 1}) != base
    assert build(("q",), {}) != build(("q", ()), {})


def test_bind_applies_defaults_and_keeps_every_parameter() -> None:
    build = KeyBuilder(keyfuncs.search, ignore=("options",))
    assert build.bind(("q", 1), {"x": 2}) == {"query": "q", "filters": (1,), "limit": 20, "options": {"x": 2}}
    method = KeyBuilder(Repository.find)
    repo = Repository(3)
    assert method.bind((repo, "n"), {}) == {"self": repo, "name": "n", "active": True}


def test_key_for_and_key_and_arguments_match_the_call() -> None:
    build = KeyBuilder(keyfuncs.get_user)
    key, arguments = build.key_and_arguments((5,), {"size": 3})
    assert arguments == {"user_id": 5, "page": 1, "size": 3}
    assert key == build((5,), {"size": 3}) == build.key_for(arguments)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),  # missing argument
        ((1, 2, 3), {}),  # too many positional arguments (size is keyword-only)
        ((1,), {"nope": 1}),  # unexpected keyword
        ((1,), {"user_id": 1}),  # given twice
    ],
)
def test_wrong_calls_raise_the_usual_type_error(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    build = KeyBuilder(keyfuncs.get_user)
    with pytest.raises(TypeError) as expected:
        inspect.signature(keyfuncs.get_user).bind(*args, **kwargs)
    with pytest.raises(TypeError) as got:
        build(args, kwargs)
    assert str(got.value) == str(expected.value)
    assert not isinstance(got.value, UnsupportedArgumentError)


def test_positional_only_parameters() -> None:
    def f(a: int, /, b: int = 2) -> None: ...

    build = KeyBuilder(f)
    assert build((1,), {}) == build((1, 2), {}) == build((1,), {"b": 2})
    with pytest.raises(TypeError):
        build((), {"a": 1})


# -- values ----------------------------------------------------------------------------------------


def test_types_are_distinguished() -> None:
    values: list[Any] = [1, 1.0, True, "1", b"1", None, "None", 0, False, 0.0, -0.0, "", b""]
    assert len({key_of(v) for v in values}) == len(values)


def test_containers_are_distinguished() -> None:
    values: list[Any] = [
        (1, 2),
        [1, 2],
        {1, 2},
        frozenset({1, 2}),
        {1: 2},
        ((1, 2),),
        [(1, 2)],
        ([1, 2],),
        (1, (2,)),
        ((1,), 2),
        ("ab",),
        ("a", "b"),
        (),
        [],
        {},
        set(),
    ]
    assert len({key_of(v) for v in values}) == len(values)


def test_nested_values() -> None:
    nested = {"ids": [1, 2, (3, {"deep": {4, 5}})], "when": date(2024, 1, 1)}
    same = {"when": date(2024, 1, 1), "ids": [1, 2, (3, {"deep": {5, 4}})]}
    other = {"ids": [1, 2, (3, {"deep": {4, 6}})], "when": date(2024, 1, 1)}
    assert key_of(nested) == key_of(same)
    assert key_of(nested) != key_of(other)


def test_dict_and_set_order_do_not_matter() -> None:
    words = [f"word{i}" for i in range(50)]
    assert key_of(dict.fromkeys(words, 1)) == key_of(dict.fromkeys(reversed(words), 1))
    first, second = (
        set(range(8, 25, 8)),
        set(range(24, 7, -8)),
    )  # colliding hashes: insertion order
    assert list(first) != list(second)
    assert key_of(first) == key_of(second)
    assert key_of(frozenset(first)) == key_of(frozenset(second))
    assert key_of({1: "a", "1": "b"}) == key_of({"1": "b", 1: "a"})
    assert key_of({"a": 1, "b": 2}) != key_of({"a": 2, "b": 1})


@pytest.mark.parametrize(
    ("value", "equal", "different"),
    [
        (datetime(2024, 5, 1, 12), datetime(2024, 5, 1, 12), datetime(2024, 5, 1, 13)),
        (
            datetime(2024, 5, 1, 12, tzinfo=timezone.utc),
            datetime(2024, 5, 1, 12, tzinfo=timezone.utc),
            datetime(2024, 5, 1, 12),
        ),
        (date(2024, 5, 1), date(2024, 5, 1), datetime(2024, 5, 1)),
        (time(8, 30), time(8, 30), time(8, 31)),
        (timedelta(hours=1), timedelta(seconds=3600), timedelta(hours=2)),
        (UUID(int=5), UUID("00000000-0000-0000-0000-000000000005"), UUID(int=6)),
        (Decimal("1.5"), Decimal("1.5"), Decimal("1.50")),
        (b"\x00\x01", b"\x00\x01", b"\x00\x02"),
        (Color.RED, Color("red"), Color.GREEN),
        (Color.RED, Color.RED, "red"),
        (Level.HIGH, Level(2), 2),
        (Point(1, 2), Point(1, 2, scratch=object()), Point(2, 1)),
        (Point(1, 2), Point(1, 2), (1, 2, "")),
        (Profile(name="a", tags=["x"]), Profile(name="a", tags=["x"]), Profile(name="a", tags=["y"])),
        (Pair(1, 2), (1, 2), Pair(2, 1)),
        (2**5000, 2**5000, 2**5000 + 1),
        ("\ud800", "\ud800", "\ud801"),
        (float("nan"), float("nan"), float("inf")),
    ],
)
def test_supported_types(value: Any, equal: Any, different: Any) -> None:
    assert key_of(value) == key_of(equal)
    assert key_of(value) != key_of(different)


class Name(str):
    def __str__(self) -> str:
        return "overridden"


def test_subclasses_of_builtins_are_keyed_as_the_builtin() -> None:
    assert key_of(Name("ann")) == key_of("ann")
    assert key_of(Name("ann")) != key_of("overridden")


def test_enum_and_dataclass_keys_include_the_class() -> None:
    class Other(enum.Enum):
        RED = "red"

    @dataclasses.dataclass
    class Point2:
        x: int
        y: int
        label: str = ""

    assert key_of(Other.RED) != key_of(Color.RED)
    assert key_of(Point2(1, 2)) != key_of(Point(1, 2))


class Opaque:
    pass


def test_unsupported_argument_names_the_parameter_and_the_remedies() -> None:
    def load(user_id: int, session: Any) -> None: ...

    build = KeyBuilder(load)
    with pytest.raises(UnsupportedArgumentError) as info:
        build((1, Opaque()), {})
    message = str(info.value)
    assert "'session'" in message
    assert "Opaque" in message
    assert "key=" in message
    assert "ignore=('session',)" in message
    assert "{session.id}" not in message  # a session has no id worth keying: no such hint
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, TagCacheError)


def test_unsupported_nested_argument_shows_where() -> None:
    def load(filters: Any) -> None: ...

    with pytest.raises(UnsupportedArgumentError, match=r"filters\['a'\]\[1\]"):
        KeyBuilder(load)(({"a": [1, Opaque()]},), {})
    with pytest.raises(UnsupportedArgumentError, match=r"filters\.label"):
        KeyBuilder(load)((Point(1, 2, label=Opaque()),), {})  # type: ignore[arg-type]  # a wrong field type on purpose


@pytest.mark.parametrize("value", [object(), Opaque, lambda: 1, bytearray(b"x"), 1j, [object()], {object()}])
def test_unsupported_types_raise(value: Any) -> None:
    with pytest.raises(UnsupportedArgumentError, match="'value'"):
        key_of(value)


def test_sentinel_default_is_keyed_as_the_default() -> None:
    missing = object()

    def f(x: Any = missing) -> None: ...

    build = KeyBuilder(f)
    assert build((), {}) == build((missing,), {})
    assert build((), {}) != build((None,), {})
    with pytest.raises(UnsupportedArgumentError):
        build((object(),), {})


# -- methods ---------------------------------------------------------------------------------------


def test_by_default_self_is_not_part_of_the_key() -> None:
    build = KeyBuilder(Repository.find)  # kind="auto": what the golden keys use
    assert build.parameters == ("name", "active")
    assert build((Repository(1), "x"), {}) == build((Repository(2), "x"), {})
    assert build((Repository(1), "x"), {}) != build((Repository(1), "y"), {})


def test_by_default_cls_is_not_part_of_the_key() -> None:
    build = KeyBuilder(Repository.__dict__["by_kind"].__func__)

    class Sub(Repository):
        pass

    assert build.parameters == ("kind",)
    assert build((Repository, "a"), {}) == build((Sub, "a"), {})


def test_template_naming_self_keys_per_instance() -> None:
    build = KeyBuilder(Repository.find, key="repo:{self.id}:{name}")
    assert build.parameters == ("self", "name")
    assert build((Repository(1), "x"), {}) == "repo:1:x"
    assert build((Repository(2), "x"), {}) == "repo:2:x"


def test_a_method_must_say_what_identifies_the_instance() -> None:
    with pytest.raises(ConfigurationError) as info:
        KeyBuilder(Repository.find, kind="function")
    message = str(info.value)
    assert "Repository.find()" in message
    assert 'key="repository:{self.id}:{name}:{active}"' in message
    assert 'ignore=("self",)' in message
    shared = KeyBuilder(Repository.find, ignore=("self",), kind="function")
    assert shared.parameters == ("name", "active")
    assert shared((Repository(1), "x"), {}) == shared((Repository(2), "x"), {})
    templated = KeyBuilder(Repository.find, key="repo:{self.id}:{name}", kind="function")
    assert templated((Repository(1), "x"), {}) == "repo:1:x"
    assert templated((Repository(2), "x"), {}) == "repo:2:x"


def test_a_classmethod_is_keyed_by_the_class_it_is_called_on() -> None:
    func = Repository.__dict__["by_kind"].__func__
    build = KeyBuilder(func, kind="class")

    class Sub(Repository):
        pass

    assert build.parameters == ("cls", "kind")
    assert build((Repository, "a"), {}) != build((Sub, "a"), {})
    assert build((Sub, "a"), {}) == build((Sub, "a"), {})
    assert build((Sub, "a"), {}) != build((Sub, "b"), {})
    assert KeyBuilder(func, kind="class", ignore=("cls",)).parameters == ("kind",)
    with pytest.raises(UnsupportedArgumentError, match="'cls'"):
        build((Repository(1), "a"), {})  # an instance where the class belongs


def test_classmethod_keys_name_the_class_and_are_stable() -> None:
    """Keyed by the class's module and qualified name: equal across processes."""
    func = Repository.__dict__["by_kind"].__func__
    key = KeyBuilder(func, kind="class")((Repository, "admin"), {})
    code = (
        "from tests.keyfuncs import Repository; from tagcache.keys import KeyBuilder; "
        "print(KeyBuilder(Repository.__dict__['by_kind'].__func__, kind='class')((Repository, 'admin'), {}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == key
    assert key != KeyBuilder(func)((Repository, "admin"), {})


def test_static_kind_treats_no_parameter_specially() -> None:
    async def first_is_self(self: int, x: int) -> None: ...

    first_is_self.__qualname__ = "Tools.first_is_self"  # as if defined in a class
    assert KeyBuilder(first_is_self, kind="static").parameters == ("self", "x")
    with pytest.raises(ConfigurationError, match="kind must be"):
        KeyBuilder(first_is_self, kind="bound")  # type: ignore[arg-type]  # bad input on purpose


def test_a_nested_function_with_a_self_parameter_is_not_a_method() -> None:
    def helper(self: Any) -> None: ...

    assert KeyBuilder(helper).parameters == ("self",)


def test_self_in_a_plain_function_is_an_ordinary_parameter() -> None:
    assert KeyBuilder(_module_level_self).parameters == ("self", "x")


def _module_level_self(self: int, x: int) -> None: ...


# -- annotations -----------------------------------------------------------------------------------


class Session:
    """A stand-in for a database session: its instances have no key encoding."""


class Readable(Protocol):
    def read(self) -> bytes: ...


class AbstractStore(abc.ABC):
    @abc.abstractmethod
    def get(self) -> int: ...


T = TypeVar("T")
UserId = NewType("UserId", int)
SessionId = NewType("SessionId", Session)


@pytest.mark.parametrize(
    "annotation",
    [
        Any,
        object,
        None,
        type(None),
        int,
        bool,
        str,
        Name,
        Pair,
        Color,
        Level,
        Point,
        Profile,
        datetime,
        UUID,
        Decimal,
        list[Session],  # empty, it is keyed
        dict[str, Session],
        Session | None,
        typing.Optional[Session],  # noqa: UP045 - the typing spelling on purpose
        typing.Union[Session, int],  # noqa: UP007 - the typing spelling on purpose
        Literal["a", 1],
        Annotated[int, "meta"],
        UserId,
        T,
        "Session",  # an unresolved string: left to the call
        Sequence[int],
        Mapping[str, int],
        Hashable,
        numbers.Number,
        Readable,
        AbstractStore,
        Callable[[], int],
    ],
)
def test_annotations_that_are_not_rejected(annotation: Any) -> None:
    assert is_keyable_type(annotation)


@pytest.mark.parametrize(
    "annotation",
    [
        Session,
        Opaque,
        bytearray,
        complex,
        type,
        type[int],
        Annotated[Session, "meta"],
        SessionId,
        Session | Opaque,
    ],
)
def test_annotations_that_are_rejected(annotation: Any) -> None:
    assert not is_keyable_type(annotation)


@pytest.mark.parametrize(
    "value",
    [
        1,
        True,
        1.5,
        "s",
        b"b",
        None,
        (1,),
        [1],
        {1: 2},
        {1},
        frozenset({1}),
        date(2024, 1, 1),
        datetime(2024, 1, 1),
        time(1),
        timedelta(1),
        UUID(int=1),
        Decimal("1"),
        Color.RED,
        Level.LOW,
        Point(1, 2),
        Profile(name="a"),
        Pair(1, 2),
        Name("n"),
        Session(),
        Opaque(),
        bytearray(b"x"),
        1j,
        Opaque,
        lambda: 1,
    ],
)
def test_the_annotation_rule_agrees_with_the_call_time_encoding(value: Any) -> None:
    """For a value's own class, decoration time and call time give the same answer."""
    try:
        key_of(value)
    except UnsupportedArgumentError:
        keyable = False
    else:
        keyable = True
    assert is_keyable_type(type(value)) is keyable


def _with_session(user_id: int, session: Session) -> None: ...


def _with_session_and_unresolvable(user_id: int, session: Session, other: NotDefinedAnywhere) -> None: ...  # type: ignore[name-defined]  # noqa: F821 - unresolvable on purpose


def test_an_unkeyable_annotation_fails_at_construction() -> None:
    with pytest.raises(UnsupportedArgumentError) as info:
        KeyBuilder(_with_session)
    message = str(info.value)
    assert "_with_session()" in message
    assert "'session'" in message
    assert "tests.test_keys.Session" in message
    assert "ignore=('session',)" in message
    assert "{session.id}" not in message
    # One unresolvable annotation does not hide the others.
    with pytest.raises(UnsupportedArgumentError, match="'session'"):
        KeyBuilder(_with_session_and_unresolvable, ignore=("other",))
    # The fixes.
    assert KeyBuilder(_with_session, ignore=("session",)).parameters == ("user_id",)
    assert KeyBuilder(_with_session, key="u:{user_id}").parameters == ("user_id",)


def test_an_unresolvable_annotation_is_checked_at_call_time() -> None:
    build = KeyBuilder(_with_session_and_unresolvable, ignore=("session",))
    assert build((1, Session(), 2), {}) == build((1, None, 2), {})
    with pytest.raises(UnsupportedArgumentError, match="'other'"):
        build((1, Session(), Session()), {})


# -- ignore ----------------------------------------------------------------------------------------


def test_ignored_parameters_are_left_out() -> None:
    def load(user_id: int, session: Any = None) -> None: ...

    build = KeyBuilder(load, ignore=("session",))
    assert build.parameters == ("user_id",)
    assert build((1, Opaque()), {}) == build((1,), {}) == build((), {"user_id": 1, "session": Opaque()})
    assert build((1,), {}) != build((2,), {})


def test_ignoring_an_unknown_parameter_fails_at_decoration() -> None:
    def load(user_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"'sesion'.*parameters: user_id"):
        KeyBuilder(load, ignore=("sesion",))
    with pytest.raises(ValueError, match=r"ignore=\('user_id',\)"):
        KeyBuilder(load, ignore="user_id")


def test_ignoring_a_parameter_the_template_names_is_an_error() -> None:
    def load(user_id: int, session: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="session"):
        KeyBuilder(load, key="u:{user_id}:{session}", ignore=("session",))
    assert KeyBuilder(load, key="u:{user_id}", ignore=("session",))((1, Opaque()), {}) == "u:1"


# -- key templates ---------------------------------------------------------------------------------


@dataclasses.dataclass
class User:
    id: int
    name: str


def test_template_fields_with_attribute_item_access_and_format_specs() -> None:
    def feed(user: User, page: int = 1, filters: Any = None) -> None: ...

    build = KeyBuilder(feed, key="feed:{user.id}:{page:03d}:{filters[kind]}")
    assert build.template == "feed:{user.id}:{page:03d}:{filters[kind]}"
    assert build.prefix is None
    assert build.parameters == ("user", "page", "filters")
    assert build((User(7, "a"), 2, {"kind": "new"}), {}) == "feed:7:002:new"
    assert build((), {"user": User(7, "b"), "filters": {"kind": "new"}, "page": 2}) == "feed:7:002:new"


def test_template_values_use_str() -> None:
    def f(when: date, obj: Any) -> None: ...

    assert KeyBuilder(f, key="{when}|{obj}")((date(2024, 1, 2), Opaque()), {}).startswith("2024-01-02|<")


def test_template_item_access_on_var_positional() -> None:
    def f(*args: Any, **kwargs: Any) -> None: ...

    assert KeyBuilder(f, key="{args[0]}:{kwargs[x]}")((1, 2), {"x": "y"}) == "1:y"


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("feed:{usr.id}", r"'usr' is not a parameter.*parameters: user, page"),
        ("feed:{}", "positional field"),
        ("feed:{0}", "positional field"),
        ("feed:{page:{width}}", "'width' is not a parameter"),
        ("feed:{user", "not a valid format string"),
    ],
)
def test_template_errors_at_decoration(template: str, match: str) -> None:
    def feed(user: User, page: int = 1) -> None: ...

    with pytest.raises(ConfigurationError, match=match):
        KeyBuilder(feed, key=template)


def test_template_result_is_checked_like_a_cache_key() -> None:
    def f(text: str) -> None: ...

    build = KeyBuilder(f, key="k:{text}")
    assert build(("x" * (MAX_KEY_LENGTH - 2),), {}) == "k:" + "x" * (MAX_KEY_LENGTH - 2)
    with pytest.raises(InvalidKeyError, match="characters"):
        build(("x" * (MAX_KEY_LENGTH - 1),), {})
    with pytest.raises(InvalidKeyError, match="control character"):
        build(("a\nb",), {})


def test_a_template_without_fields_is_a_constant_key() -> None:
    def f(x: int) -> None: ...

    build = KeyBuilder(f, key="all-{{x}}")
    assert build.parameters == ()
    assert build((1,), {}) == build((2,), {}) == "all-{x}"


def test_functions_without_parameters() -> None:
    def f() -> None: ...

    build = KeyBuilder(f)
    assert build((), {}) == build.key_for({})
    assert build.bind((), {}) == {}
    with pytest.raises(TypeError):
        build((1,), {})


# -- tag templates ---------------------------------------------------------------------------------


def test_tag_templates() -> None:
    def load(user: User, org_id: int, page: int = 1) -> None: ...

    tags = TagTemplates(load, ["users", "user:{user.id}", "org:{org_id}", "literal{{x}}"])
    assert not tags.static
    assert tags.parameters == ("user", "org_id")
    arguments = KeyBuilder(load).bind((User(4, "a"), 9), {})
    assert tags(arguments) == ["users", "user:4", "org:9", "literal{x}"]
    assert tags({**arguments, "org_id": 10}) == ["users", "user:4", "org:10", "literal{x}"]


def test_static_tags_need_no_arguments() -> None:
    def load(x: int) -> None: ...

    tags = TagTemplates(load, ("users", "admins"))
    assert tags.static
    assert tags() == ["users", "admins"]
    result = tags()
    result.append("changed")
    assert tags() == ["users", "admins"]  # every call returns a fresh list
    with pytest.raises(TypeError):
        TagTemplates(load, ["user:{x}"])()


def test_tag_template_errors_at_decoration() -> None:
    def load(user_id: int) -> None: ...

    with pytest.raises(ConfigurationError, match=r"'user' is not a parameter.*parameters: user_id"):
        TagTemplates(load, ["users", "user:{user}"])
    with pytest.raises(ValueError, match=r"tags=\['users'\]"):
        TagTemplates(load, "users")
    with pytest.raises(InvalidTagError):
        TagTemplates(load, ["bad\ntag"])
    with pytest.raises(ConfigurationError, match="must be a str"):
        TagTemplates(load, [1])  # type: ignore[list-item]  # a wrong type on purpose


def test_tag_templates_may_use_ignored_parameters_and_self() -> None:
    tags = TagTemplates(Repository.find, ["repo:{self.id}", "name:{name}"])
    build = KeyBuilder(Repository.find, ignore=("name",))
    key, arguments = build.key_and_arguments((Repository(5), "n"), {})
    assert tags(arguments) == ["repo:5", "name:n"]
    assert key == build((Repository(6), "other"), {})


# -- properties ------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.dates()
    | st.datetimes(timezones=st.none() | st.timezones())
    | st.timedeltas()
    | st.uuids()
    | st.decimals(allow_nan=False)
    | st.sampled_from(list(Color) + list(Level))
)
hashables = scalars | st.tuples(scalars, scalars) | st.frozensets(scalars, max_size=3)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.builds(Point, st.integers(), st.integers(), st.text(max_size=5))
    ),
    max_leaves=12,
)


def reference_key(build: KeyBuilder, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The key computed from Signature.bind, bypassing the fast binder."""
    bound = inspect.signature(build.func).bind(*args, **kwargs)
    bound.apply_defaults()
    return build.key_for(dict(bound.arguments))


def _three(a: Any, b: Any = "default", *, c: Any = None) -> None: ...


@given(a=values, b=values, c=values)
def test_key_is_deterministic_and_independent_of_the_call_form(a: Any, b: Any, c: Any) -> None:
    build = KeyBuilder(_three)
    key = build((a, b), {"c": c})
    assert build((), {"a": a, "b": b, "c": c}) == key
    assert build((a,), {"c": c, "b": b}) == key
    assert reference_key(build, (a, b), {"c": c}) == key
    assert KeyBuilder(_three)((a, b), {"c": c}) == key
    if b == "default" and type(b) is str:
        assert build((a,), {"c": c}) == key


@given(a=values, b=values)
def test_different_values_give_different_keys(a: Any, b: Any) -> None:
    build = KeyBuilder(_three)
    if build((a,), {}) == build((b,), {}):
        assert type(a) is type(b)
        assert a == b or a != a  # equal, or NaN-like values that are not equal to themselves
