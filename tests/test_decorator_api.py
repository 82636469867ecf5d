"""``@cache.cached`` and ``get_or_set`` as users meet them: the forms they write and the
mistakes they make, each failing at decoration (or before the backend) with a message
that says what to do."""

from __future__ import annotations

import asyncio
import gc
import textwrap
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tagcache import Cache, ConfigurationError, UnsupportedArgumentError
from tagcache.decorator import CachedFunction
from tagcache.testing import memory_cache

ROOT = Path(__file__).resolve().parent.parent


class Counter:
    def __init__(self) -> None:
        self.calls = 0


# Stand-ins for a database session and a web request: plain classes whose instances
# have no key encoding. Module level, so string annotations resolve.
class AsyncSession:
    async def get(self, ident: int) -> int:
        return ident


class Request:
    pass


@pytest.fixture
def cache() -> Cache:
    return memory_cache(namespace="api", default_ttl=300)


# ---------------------------------------------------------------- bare @cache.cached


async def test_bare_decorator_works_like_empty_parentheses(cache: Cache) -> None:
    calls = Counter()

    @cache.cached
    async def get_user(user_id: int) -> dict[str, int]:
        calls.calls += 1
        return {"id": user_id}

    @cache.cached()
    async def with_parentheses(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    assert isinstance(get_user, CachedFunction)
    assert await get_user(1) == {"id": 1}
    assert await get_user(1) == {"id": 1}
    assert calls.calls == 1
    view = await cache.peek(get_user.key_for(1))
    assert view is not None
    assert view.ttl is not None
    assert 250 < view.ttl <= 300  # the cache's default_ttl, less jitter, as with @cache.cached()
    assert get_user.key_for(1).startswith(f"{__name__}.test_bare_decorator_works_like_empty_parentheses")
    assert get_user._policy == with_parentheses._policy
    assert get_user._ttl == with_parentheses._ttl == 300


async def test_bare_decorator_on_static_and_class_methods(cache: Cache) -> None:
    class Plans:
        @cache.cached
        @staticmethod
        async def listed(x: int) -> int:
            return -x

        @cache.cached
        @classmethod
        async def named(cls, x: int) -> str:
            return f"{cls.__name__}{x}"

    assert await Plans.listed(2) == -2
    assert await Plans.named(2) == "Plans2"
    assert await Plans().named(2) == "Plans2"


async def test_positional_and_keyword_ttl_still_work(cache: Cache) -> None:
    @cache.cached(600)
    async def positional(x: int) -> int:
        return x

    @cache.cached(ttl=600, tags=["t"])
    async def keyword(x: int) -> int:
        return x

    @cache.cached(None)
    async def forever(x: int) -> int:
        return x

    assert positional._ttl == keyword._ttl == 600
    assert forever._ttl is None
    assert await positional(1) == await keyword(1) == 1


async def test_bare_decorator_on_a_sync_function_says_async(cache: Cache) -> None:
    with pytest.raises(TypeError, match="async def"):

        @cache.cached  # type: ignore[arg-type]  # a sync function on purpose
        def sync(x: int) -> int:
            return x


def test_mypy_sees_the_types_of_both_forms(tmp_path: Path) -> None:
    """``mypy --strict`` on user code: the bare form keeps the function's signature."""
    from mypy import api

    source = tmp_path / "user_code.py"
    source.write_text(
        textwrap.dedent(
            """
            from tagcache import Cache
            from tagcache.decorator import CachedFunction

            cache = Cache.from_url("memory://", namespace="n")

            @cache.cached
            async def bare(user_id: int, name: str = "") -> list[int]:
                return [user_id]

            @cache.cached(ttl=60, tags=["users"])
            async def called(user_id: int) -> str:
                return ""

            @cache.cached(60)
            async def positional(user_id: int) -> bytes:
                return b""

            async def use() -> None:
                reveal_type(bare)
                reveal_type(await bare(1))
                reveal_type(await called(1))
                reveal_type(await positional(1))
                bare.key_for(1, name="x")
            """
        )
    )
    stdout, stderr, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    assert status == 0, stdout + stderr
    revealed = [
        line.split("Revealed type is ", 1)[1].replace("builtins.", "")  # older mypy spells builtins out
        for line in stdout.splitlines()
        if "Revealed type is " in line
    ]
    assert revealed == [
        '"tagcache.decorator.CachedFunction[[user_id: int, name: str =], list[int]]"',
        '"list[int]"',
        '"str"',
        '"bytes"',
    ], stdout


# ---------------------------------------------------------------- methods


async def test_a_method_must_say_what_identifies_the_instance(cache: Cache) -> None:
    with pytest.raises(ConfigurationError) as info:

        class Repo:
            @cache.cached(ttl=60)
            async def find(self, x: int) -> int:
                return x

    message = str(info.value)
    assert "Repo.find()" in message
    assert 'ignore=("self",)' in message
    assert 'key="repo:{self.id}:{x}"' in message


async def test_the_two_ways_a_method_says_what_identifies_the_instance(cache: Cache) -> None:
    """A key naming self keys per instance (Repo(200).m(1) is not Repo(100)'s result);
    ignore=("self",) shares the entries on purpose."""

    class Repo:
        def __init__(self, ident: int) -> None:
            self.id = ident

        @cache.cached(ttl=60, key="repo:{self.id}:{x}")
        async def m(self, x: int) -> int:
            return self.id + x

        @cache.cached(ttl=60, ignore=("self",))
        async def shared(self, x: int) -> int:
            return self.id + x

    assert await Repo(100).m(1) == 101
    assert await Repo(200).m(1) == 201
    assert await Repo(100).shared(1) == 101
    assert await Repo(200).shared(1) == 101  # shared on purpose


async def test_classmethods_are_keyed_by_the_class_they_are_called_on(cache: Cache) -> None:
    calls = Counter()

    class Base:
        @cache.cached(ttl=60)
        @classmethod
        async def label(cls, x: int) -> str:
            calls.calls += 1
            return f"{cls.__name__}:{x}"

    class Child(Base):
        pass

    class Other(Base):
        pass

    assert await Base.label(1) == "Base:1"
    assert await Child.label(1) == "Child:1"
    assert await Other().label(1) == "Other:1"
    assert await Child().label(1) == "Child:1"  # a hit
    assert calls.calls == 3
    assert len({Base.label.key_for(1), Child.label.key_for(1), Other.label.key_for(1)}) == 3
    # The key names the class by its qualified name, not by anything per process.
    assert Child.label.key_for(1) == Child().label.key_for(1)

    class Shared:
        @cache.cached(ttl=60, ignore=("cls",))  # every class shares the entries, on purpose
        @classmethod
        async def label(cls, x: int) -> str:
            return cls.__name__

    class SharedChild(Shared):
        pass

    assert Shared.label.key_for(1) == SharedChild.label.key_for(1)


async def test_staticmethods_are_unchanged(cache: Cache) -> None:
    class Tools:
        @cache.cached(ttl=60)
        @staticmethod
        async def double(x: int) -> int:
            return 2 * x

    assert await Tools.double(2) == await Tools().double(2) == 4
    assert Tools.double.key_for(2) == Tools().double.key_for(2)


async def test_a_plain_function_with_a_self_parameter_is_not_a_method(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def helper(self: int, x: int) -> int:
        return self + x

    assert await helper(1, 2) == 3
    assert helper.key_for(1, 2) != helper.key_for(2, 2)


# ---------------------------------------------------------------- annotations


@pytest.mark.parametrize("annotation", ["AsyncSession", "Request", "AsyncSession | Request", "type[int]"])
def test_an_annotated_unkeyable_parameter_fails_at_decoration(cache: Cache, annotation: str) -> None:
    namespace: dict[str, Any] = {}
    exec(  # a string annotation, as with "from __future__ import annotations"
        f"async def load(user_id: int, session: {annotation}) -> int:\n    return user_id",
        globals(),
        namespace,
    )
    with pytest.raises(UnsupportedArgumentError) as info:
        cache.cached(ttl=60)(namespace["load"])
    message = str(info.value)
    assert "'session'" in message
    assert "ignore=('session',)" in message
    assert "{session.id}" not in message


async def test_the_fix_the_message_gives_works(cache: Cache) -> None:
    @cache.cached(ttl=60, ignore=("session",))
    async def load(user_id: int, session: AsyncSession) -> int:
        return await session.get(user_id)

    @cache.cached(ttl=60, key="user:{user_id}")
    async def by_template(user_id: int, session: AsyncSession) -> int:
        return await session.get(user_id)

    assert await load(3, AsyncSession()) == 3
    assert await by_template(4, AsyncSession()) == 4


async def test_undecidable_annotations_are_left_to_the_call(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def maybe(user_id: int, session: AsyncSession | None = None) -> int:
        return user_id

    @cache.cached(ttl=60)
    async def anything(user_id: int, conn: Any, other: object, free=None) -> int:  # type: ignore[no-untyped-def]  # an unannotated parameter on purpose
        return user_id

    namespace: dict[str, Any] = {}
    exec(
        "async def unresolved(user_id: int, session: NotImportedHere) -> int:\n    return user_id",
        globals(),
        namespace,
    )
    unresolved = cache.cached(ttl=60)(namespace["unresolved"])  # NotImportedHere: as if under TYPE_CHECKING

    assert await maybe(1) == 1
    assert await anything(1, 2, 3) == 1
    with pytest.raises(UnsupportedArgumentError, match="'session'"):
        await maybe(1, AsyncSession())  # the same rules, at call time
    with pytest.raises(UnsupportedArgumentError, match="'session'"):
        await unresolved(1, AsyncSession())


# ---------------------------------------------------------------- ignore="session"


def test_ignore_as_a_bare_string_is_rejected_like_tags(cache: Cache) -> None:
    async def load(user_id: int, session: object = None) -> int:
        return user_id

    with pytest.raises(ConfigurationError) as tags_error:
        cache.cached(ttl=60, tags="users")(load)  # type: ignore[arg-type]  # bad input on purpose
    with pytest.raises(ConfigurationError) as ignore_error:
        cache.cached(ttl=60, ignore="session")(load)
    assert (
        str(tags_error.value)
        == "tags must be a list of templates, got the bare string 'users'; write tags=['users']"
    )
    assert str(ignore_error.value) == (
        "ignore must be a list of parameter names, got the bare string 'session'; write ignore=('session',)"
    )


# ---------------------------------------------------------------- get_or_set


class Untouchable:
    """Stands for the backend: any attribute read from it fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the backend was used: {name}")


async def load() -> int:
    return 1


@pytest.mark.parametrize("make_loader", [lambda: 5, lambda: "value", lambda: None])
async def test_get_or_set_with_a_value_instead_of_a_function(
    cache: Cache, make_loader: Callable[[], Any]
) -> None:
    cache._backend = Untouchable()  # type: ignore[assignment]  # nothing may reach the backend
    with pytest.raises(TypeError) as info:
        await cache.get_or_set("k", make_loader())
    message = str(info.value)
    assert "a function returning an awaitable" in message
    assert "get_or_set(key, load)" in message
    assert "get_or_set(key, lambda: load(x))" in message


async def test_get_or_set_with_a_coroutine_object_closes_it(cache: Cache) -> None:
    cache._backend = Untouchable()  # type: ignore[assignment]  # nothing may reach the backend
    coroutine = load()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=r"coroutine object load\(\).*get_or_set\(key, load\)"):
            await cache.get_or_set("k", coroutine)  # type: ignore[arg-type]  # the mistake under test
        assert coroutine.cr_frame is None  # closed
        del coroutine
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


async def test_get_or_set_still_takes_functions_and_lambdas(cache: Cache) -> None:
    def later(x: int) -> Awaitable[int]:
        return asyncio.sleep(0, result=x)

    assert await cache.get_or_set("a", load) == 1
    assert await cache.get_or_set("b", lambda: later(2)) == 2


async def test_remembered_keys_keep_equal_values_of_other_types_apart() -> None:
    """Calls with int/str arguments reuse their key and tags; 1, True and 1.0 hash
    alike but must keep their own keys and entries."""
    cache = memory_cache()
    seen: list[object] = []

    @cache.cached(ttl=60, tags=["v:{x}"])
    async def echo(x: object) -> str:
        seen.append(x)
        return f"{type(x).__name__}:{x}"

    for _ in range(2):
        assert await echo(1) == "int:1"
        assert await echo(True) == "bool:True"
        assert await echo(1.0) == "float:1.0"
        assert await echo("1") == "str:1"
    assert seen == [1, True, 1.0, "1"]
    assert len({echo.key_for(1), echo.key_for(True), echo.key_for(1.0), echo.key_for("1")}) == 4
    # The remembered key and tags are the ones the full path builds.
    await cache.invalidate_tags(["v:1"])
    assert await echo(1) == "int:1"
    assert seen[-1] == 1 and len(seen) == 5


async def test_the_call_memo_is_bounded() -> None:
    import tagcache.decorator as decorator

    cache = memory_cache()

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        return x

    for i in range(decorator._MEMO_SIZE + 10):
        assert await f(i) == i
    assert len(f._memo) == decorator._MEMO_SIZE  # type: ignore[arg-type]  # an OrderedDict here
    assert (0,) not in f._memo and (decorator._MEMO_SIZE + 9,) in f._memo  # type: ignore[operator]  # first in, first out
