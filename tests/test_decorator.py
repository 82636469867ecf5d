"""``@cache.cached`` on every backend: keys, tags, flights, staleness, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from tagcache import BackendError, Cache, ConfigurationError
from tagcache.backends import Backend, MemoryBackend

from tests.conftest import unique_namespace


@dataclasses.dataclass(frozen=True)
class UserOut:
    id: int
    name: str


class Post(pydantic.BaseModel):
    id: int
    title: str


class Counter:
    def __init__(self) -> None:
        self.calls = 0


# ---------------------------------------------------------------- basics


async def test_miss_then_hit_with_the_same_type(cache: Cache) -> None:
    calls = Counter()

    @cache.cached(ttl=600, tags=["users", "user:{user_id}"])
    async def get_user(user_id: int) -> UserOut:
        calls.calls += 1
        return UserOut(user_id, f"user{user_id}")

    first = await get_user(1)
    second = await get_user(1)
    assert first == second == UserOut(1, "user1")
    assert type(second) is UserOut
    assert calls.calls == 1
    assert await get_user(user_id=1) == first  # keyword call: same key
    assert calls.calls == 1
    await get_user(2)
    assert calls.calls == 2


async def test_handles_and_signature(cache: Cache) -> None:
    async def original(user_id: int, verbose: bool = False) -> dict[str, int]:
        """Docstring."""
        return {"id": user_id}

    get_user = cache.cached(ttl=60)(original)
    assert get_user.__wrapped__ is original  # type: ignore[attr-defined]  # set by update_wrapper
    assert get_user.__name__ == "original"  # type: ignore[attr-defined]  # as above
    assert get_user.__doc__ == "Docstring."
    assert inspect.signature(get_user) == inspect.signature(original)
    key = get_user.key_for(5)
    assert key == get_user.key_for(user_id=5, verbose=False)
    assert key.startswith(f"{original.__module__}.{original.__qualname__}:")
    await get_user(5)
    assert await cache.get(key) == {"id": 5}
    assert await get_user.invalidate(5) is True
    assert await cache.get(key) is None


async def test_tag_templates_invalidate(cache: Cache) -> None:
    calls = Counter()

    @cache.cached(ttl=600, tags=["users", "user:{user_id}"])
    async def get_user(user_id: int) -> dict[str, int]:
        calls.calls += 1
        return {"id": user_id, "v": calls.calls}

    await get_user(1)
    await get_user(2)
    await cache.invalidate_tags(["user:1"])
    await get_user(1)
    await get_user(2)
    assert calls.calls == 3
    await cache.invalidate_tags(["users"])
    await get_user(2)
    assert calls.calls == 4


async def test_attribute_templates_and_custom_key(cache: Cache) -> None:
    @cache.cached(ttl=60, key="feed:{user.id}:{page}", tags=["feed:{user.id}"], ignore=("session",))
    async def get_feed(session: object, user: UserOut, page: int = 1) -> list[int]:
        return [user.id, page]

    alice = UserOut(7, "alice")
    assert await get_feed(object(), alice) == [7, 1]
    assert get_feed.key_for(None, alice) == "feed:7:1"
    assert await cache.get("feed:7:1") == [7, 1]
    await cache.invalidate_tags(["feed:7"])
    assert await cache.get("feed:7:1") is None


async def test_callable_tags_see_result_and_arguments(cache: Cache) -> None:
    calls = Counter()

    @cache.cached(
        ttl=60, tags=lambda result, **args: [f"post:{p.id}" for p in result] + [f"page:{args['page']}"]
    )
    async def list_posts(page: int) -> list[Post]:
        calls.calls += 1
        return [Post(id=page * 10 + i, title="t") for i in range(2)]

    posts = await list_posts(1)
    assert type(posts[0]) is Post
    await list_posts(1)
    assert calls.calls == 1
    await cache.invalidate_tags(["post:11"])
    await list_posts(1)
    assert calls.calls == 2
    await cache.invalidate_tags(["page:1"])
    await list_posts(1)
    assert calls.calls == 3


async def test_none_is_cached_and_exceptions_are_not(cache: Cache) -> None:
    calls = Counter()

    @cache.cached(ttl=60)
    async def maybe(x: int) -> int | None:
        calls.calls += 1
        if x < 0:
            raise ValueError("negative")
        return None

    assert await maybe(1) is None
    assert await maybe(1) is None
    assert calls.calls == 1
    for _ in range(2):
        with pytest.raises(ValueError, match="negative"):
            await maybe(-1)
    assert calls.calls == 3


async def test_thousand_concurrent_callers_run_the_function_once(cache: Cache) -> None:
    calls = Counter()

    @cache.cached(ttl=60, tags=["t"])
    async def slow(x: int) -> dict[str, int]:
        calls.calls += 1
        await asyncio.sleep(0.05)
        return {"x": x}

    results = await asyncio.gather(*(slow(1) for _ in range(1000)))
    assert calls.calls == 1
    assert all(r == {"x": 1} for r in results)


async def test_cancelled_caller_does_not_poison_waiters(cache: Cache) -> None:
    calls = Counter()
    started = asyncio.Event()

    @cache.cached(ttl=60)
    async def slow() -> str:
        calls.calls += 1
        started.set()
        await asyncio.sleep(0.1)
        return "done"

    first = asyncio.create_task(slow())
    await started.wait()
    others = [asyncio.create_task(slow()) for _ in range(5)]
    await asyncio.sleep(0.01)
    first.cancel()
    assert await asyncio.gather(*others) == ["done"] * 5
    assert calls.calls == 2
    assert await slow() == "done"
    assert calls.calls == 2


# ---------------------------------------------------------------- methods


async def test_methods_static_and_class_methods(cache: Cache) -> None:
    calls = Counter()

    class Repo:
        def __init__(self, ident: int) -> None:
            self.id = ident

        @cache.cached(ttl=60)
        async def shared(self, x: int) -> int:
            calls.calls += 1
            return x * 2

        @cache.cached(ttl=60, key="repo:{self.id}:{x}")
        async def per_instance(self, x: int) -> int:
            calls.calls += 1
            return x + self.id

        @cache.cached(ttl=60)
        @staticmethod
        async def static(x: int) -> int:
            calls.calls += 1
            return -x

        @cache.cached(ttl=60)
        @classmethod
        async def klass(cls, x: int) -> str:
            calls.calls += 1
            return f"{cls.__name__}{x}"

    a, b = Repo(1), Repo(2)
    assert await a.shared(3) == 6
    assert await b.shared(3) == 6  # self is not part of the default key
    assert calls.calls == 1
    assert a.shared.key_for(3) == b.shared.key_for(3)
    assert await a.per_instance(3) == 4
    assert await b.per_instance(3) == 5
    assert calls.calls == 3
    assert a.per_instance.key_for(3) == "repo:1:3"
    assert await Repo.static(4) == -4
    assert await a.static(4) == -4
    assert calls.calls == 4
    assert await Repo.klass(1) == "Repo1"
    assert await a.klass(1) == "Repo1"
    assert calls.calls == 5
    assert await a.per_instance.invalidate(3) is True
    await a.per_instance(3)
    assert calls.calls == 6


# ---------------------------------------------------------------- staleness


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(cache: Cache) -> None:
    version = Counter()
    gate = asyncio.Event()
    gate.set()

    @cache.cached(ttl=0.2, stale_while_revalidate=30, jitter=0)
    async def value() -> int:
        await gate.wait()
        version.calls += 1
        return version.calls

    assert await value() == 1
    await asyncio.sleep(0.3)  # expired, inside the stale window
    gate.clear()  # the refresh will block until released
    results = await asyncio.gather(*(value() for _ in range(20)))
    assert results == [1] * 20  # served at once, stale
    gate.set()
    for _ in range(100):
        if await value() == 2:
            break
        await asyncio.sleep(0.01)
    assert await value() == 2
    assert version.calls == 2  # exactly one background refresh


async def test_early_refresh_keeps_a_hot_key_warm(cache: Cache) -> None:
    """A hot key read continuously across several expiries is refreshed about once
    per TTL, in the background: no read waits for a recompute."""
    calls = Counter()
    ttl, duration = 1.0, 3.2

    @cache.cached(ttl=ttl, early_refresh=True, jitter=0)
    async def hot() -> int:
        calls.calls += 1
        await asyncio.sleep(0.01)
        return calls.calls

    await hot()
    misses_before = (await cache.stats()).misses
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    reads = 0
    while loop.time() < end:
        await hot()
        reads += 1
        await asyncio.sleep(0.0005)
    misses_after = (await cache.stats()).misses
    assert misses_after == misses_before, "a read waited for a recompute"
    refreshes = calls.calls - 1
    assert refreshes >= 3, "the key must have been refreshed before each expiry"
    assert refreshes <= (duration / ttl) * 1.1, f"{refreshes} refreshes in {duration / ttl} TTL windows"
    assert reads > 1000


# ---------------------------------------------------------------- failures


class FailingBackend(MemoryBackend):
    """A memory backend that fails while ``failing`` is set."""

    failing = False

    def _check(self) -> None:
        if self.failing:
            raise BackendError("Redis fetch failed: ConnectionError: refused")

    def get_nowait(self, ns: str, key: str) -> bytes | None:
        self._check()
        return super().get_nowait(ns, key)

    async def fetch(self, *args: Any) -> Any:
        self._check()
        return await super().fetch(*args)

    async def fill(self, *args: Any) -> Any:
        self._check()
        return await super().fill(*args)


async def test_fail_open_calls_the_function_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    backend = FailingBackend()
    cache = Cache(backend, namespace="fo")
    calls = Counter()

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        calls.calls += 1
        return x

    @cache.cached(ttl=60, fail_open=False)
    async def strict(x: int) -> int:
        return x

    await f(1)
    backend.failing = True
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        assert [await f(2) for _ in range(5)] == [2] * 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert (await cache.stats()).errors == 5
    with pytest.raises(BackendError):
        await strict(1)
    backend.failing = False
    before = calls.calls
    assert await f(1) == 1  # cached before the incident, served again
    assert calls.calls == before


async def test_bad_decorator_options_fail_at_decoration(cache: Cache) -> None:
    async def f(user_id: int) -> int:
        return user_id

    with pytest.raises(ValueError, match="nope"):
        cache.cached(ttl=60, tags=["user:{nope}"])(f)
    with pytest.raises(ValueError, match="nope"):
        cache.cached(ttl=60, key="k:{nope}")(f)
    with pytest.raises(ValueError, match="bare string"):
        cache.cached(ttl=60, tags="users")(f)  # type: ignore[arg-type]  # bad input on purpose
    with pytest.raises(ConfigurationError, match="TTL"):
        cache.cached(ttl=None, early_refresh=True)(f)
    with pytest.raises(ConfigurationError, match="jitter"):
        cache.cached(ttl=1, jitter=2)(f)
    with pytest.raises(TypeError, match="async"):
        cache.cached(ttl=1)(lambda: 1)  # type: ignore[arg-type, return-value]  # bad input on purpose


async def test_unsupported_argument_names_parameter(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def f(conn: object) -> int:
        return 1

    with pytest.raises(TypeError, match="conn"):
        await f(object())


# ---------------------------------------------------------------- races


@pytest.mark.parametrize("tag_style", ["template", "from result"])
async def test_no_stale_reads_through_the_decorator(
    make_backend: Callable[..., Backend], tag_style: str
) -> None:
    import random

    backend = make_backend()
    ns = unique_namespace("dec")
    caches = [Cache(backend, namespace=ns, owns_backend=False) for _ in range(2)]
    rng = random.Random(99)
    source = dict.fromkeys(range(6), 0)
    floor = dict.fromkeys(range(6), 0)
    stale: list[tuple[int, int, int]] = []

    def result_tags(result: int, **args: Any) -> list[str]:
        return [f"item:{args['item']}"]

    functions = []
    for c in caches:
        tags: Any = ["item:{item}"] if tag_style == "template" else result_tags

        @c.cached(ttl=60, tags=tags)
        async def read(item: int) -> int:
            version = source[item]
            await asyncio.sleep(rng.random() * 0.004)
            return version

        functions.append(read)

    async def reader(n: int) -> None:
        fn = functions[n % 2]
        for _ in range(50):
            item = rng.randrange(6)
            must_see = floor[item]
            got = await fn(item)
            if got < must_see:
                stale.append((item, got, must_see))
            await asyncio.sleep(rng.random() * 0.002)

    async def writer() -> None:
        for n in range(80):
            item = rng.randrange(6)
            source[item] += 1
            version = source[item]
            await caches[n % 2].invalidate_tags([f"item:{item}"])
            floor[item] = max(floor[item], version)
            await asyncio.sleep(rng.random() * 0.003)

    await asyncio.gather(writer(), *(reader(n) for n in range(30)))
    assert stale == []
    hits = [(await c.stats()).hits for c in caches]
    assert sum(hits) > 100 if tag_style == "template" else sum(hits) > 20
    await caches[0].clear()


async def test_other_process_waits_for_the_lease_holder(make_backend: Callable[..., Backend]) -> None:
    """Two caches on one backend stand for two processes: the function runs once."""
    backend = make_backend()
    ns = unique_namespace("lease")
    one = Cache(backend, namespace=ns, owns_backend=False)
    two = Cache(backend, namespace=ns, owns_backend=False)
    calls = Counter()

    async def body(x: int) -> int:
        calls.calls += 1
        await asyncio.sleep(0.2)
        return x

    f_one = one.cached(ttl=60)(body)
    f_two = two.cached(ttl=60)(body)
    results = await asyncio.gather(*(f_one(1) for _ in range(50)), *(f_two(1) for _ in range(50)))
    assert results == [1] * 100
    assert calls.calls == 1
    await one.clear()


async def test_lock_false_computes_instead_of_waiting(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace("nolock")
    one = Cache(backend, namespace=ns, owns_backend=False)
    two = Cache(backend, namespace=ns, owns_backend=False)
    calls = Counter()
    gate = asyncio.Event()

    async def body(x: int) -> int:
        calls.calls += 1
        await gate.wait()
        return x

    f_one = one.cached(ttl=60, lock=False)(body)
    f_two = two.cached(ttl=60, lock=False)(body)
    first = asyncio.create_task(f_one(1))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(f_two(1))
    await asyncio.sleep(0.05)
    assert calls.calls == 2  # the second "process" did not wait
    gate.set()
    assert await first == await second == 1
    await one.clear()


async def test_waiter_takes_over_when_the_holder_dies(make_backend: Callable[..., Backend]) -> None:
    """A holder that never fills nor releases (a dead process): its lease expires and a waiter loads."""
    backend = make_backend()
    ns = unique_namespace("dead")
    holder = Cache(backend, namespace=ns, owns_backend=False, lease_ttl=0.3)
    waiter = Cache(backend, namespace=ns, owns_backend=False, lease_ttl=0.3)
    never = asyncio.Event()

    async def hang() -> str:
        await never.wait()
        return "never"

    async def load() -> str:
        return "taken over"

    stuck = asyncio.create_task(holder.get_or_set("k", hang))
    await asyncio.sleep(0.05)
    assert await asyncio.wait_for(waiter.get_or_set("k", load), 5) == "taken over"
    assert await waiter.get("k") == "taken over"
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    await waiter.clear()


async def test_ttl_jitter_spreads_expiries(cache: Cache) -> None:
    @cache.cached(ttl=100, jitter=0.5)
    async def f(x: int) -> int:
        return x

    ttls = []
    for x in range(20):
        await f(x)
        view = await cache.peek(f.key_for(x))
        assert view is not None
        assert view.ttl is not None
        ttls.append(view.ttl)
    assert all(49 <= t <= 100 for t in ttls)
    assert max(ttls) - min(ttls) > 5  # not all the same expiry


async def test_corrupt_stored_value_is_recomputed(cache: Cache) -> None:
    calls = Counter()

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        calls.calls += 1
        return x

    await cache.backend.set(cache.namespace, f.key_for(1), b"\x7fgarbage", 60, ())
    assert await f(1) == 1
    assert calls.calls == 1
    assert await f(1) == 1  # stored properly this time
    assert calls.calls == 1
    assert (await cache.stats()).errors >= 1


async def test_result_tag_invalidated_while_computing_is_not_stored(cache: Cache) -> None:
    gate = asyncio.Event()
    source = {"title": "old"}
    calls = Counter()

    def tags_of(result: dict[str, str], **args: Any) -> list[str]:
        return [f"post:{args['post_id']}"]

    @cache.cached(ttl=60, tags=tags_of)
    async def get_post(post_id: int) -> dict[str, str]:
        calls.calls += 1
        seen = dict(source)
        await gate.wait()
        return seen

    first = asyncio.create_task(get_post(1))
    await asyncio.sleep(0.05)
    source["title"] = "new"
    await cache.invalidate_tags(["post:1"])  # the result's tag, unknown before it was computed
    gate.set()
    assert await first == {"title": "old"}
    assert await get_post(1) == {"title": "new"}  # the old value was not stored
    assert calls.calls == 2
    assert await get_post(1) == {"title": "new"}
    assert calls.calls == 2  # and the new one was
