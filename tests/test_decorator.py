"""``@cache.cached`` on every backend: keys, tags, flights, staleness, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from tagcache import BackendError, Cache, ConfigurationError
from tagcache.backends import Backend, MemoryBackend

from tests.conftest import unique_namespace
from tests.test_backend_waits import Returns, Waiting


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
    gate = asyncio.Event()
    fetched = Returns(cache.backend, "fetch")

    @cache.cached(ttl=60, tags=["t"])
    async def slow(x: int) -> dict[str, int]:
        calls.calls += 1
        await gate.wait()
        return {"x": x}

    callers = asyncio.gather(*(slow(1) for _ in range(1000)))
    await fetched.reach(1000)  # every caller missed while the function was running
    gate.set()
    results = await callers
    assert calls.calls == 1
    assert all(r == {"x": 1} for r in results)


async def test_cancelled_caller_does_not_poison_waiters(cache: Cache) -> None:
    calls = Counter()
    started = asyncio.Event()
    never = asyncio.Event()
    fetched = Returns(cache.backend, "fetch")

    @cache.cached(ttl=60)
    async def slow() -> str:
        calls.calls += 1
        if calls.calls == 1:
            started.set()
            await never.wait()  # the first caller is cancelled while computing
        return "done"

    first = asyncio.create_task(slow())
    await started.wait()
    others = [asyncio.create_task(slow()) for _ in range(5)]
    await fetched.reach(6)  # the five others missed and joined the first caller's computation
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

        @cache.cached(ttl=60, ignore=("self",))  # shared by every instance, on purpose
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

    class SubRepo(Repo):
        pass

    a, b = Repo(1), Repo(2)
    assert await a.shared(3) == 6
    assert await b.shared(3) == 6  # self is ignored: instances share the entry
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
    # cls is keyed by the class the method is called on: a subclass has entries of its own.
    assert await SubRepo.klass(1) == "SubRepo1"
    assert await SubRepo(3).klass(1) == "SubRepo1"
    assert calls.calls == 6
    assert SubRepo.klass.key_for(1) != Repo.klass.key_for(1)
    assert a.klass.key_for(1) == Repo.klass.key_for(1)
    assert await a.per_instance.invalidate(3) is True
    await a.per_instance(3)
    assert calls.calls == 7


# ---------------------------------------------------------------- staleness


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(cache: Cache) -> None:
    version = Counter()
    gate = asyncio.Event()
    gate.set()
    filled = Returns(cache.backend, "fill")

    @cache.cached(ttl=0.1, stale_while_revalidate=30, jitter=0)
    async def value() -> int:
        await gate.wait()
        version.calls += 1
        return version.calls

    assert await value() == 1
    # Expired, inside the stale window. Real time: the logical expiry is wall-clock time,
    # and any wait longer than the TTL reaches it.
    await asyncio.sleep(0.15)
    gate.clear()  # the refresh will block until released
    results = await asyncio.gather(*(value() for _ in range(20)))
    assert results == [1] * 20  # served at once, stale
    gate.set()
    await filled.reach(2)  # the first fill, then the background refresh's
    assert version.calls == 2  # exactly one background refresh
    assert await value() == 2


async def test_early_refresh_keeps_a_hot_key_warm(cache: Cache) -> None:
    """A hot key read continuously across several expiries is refreshed shortly before
    each expiry, about once per TTL, in the background: no read waits for a recompute.

    Real time: early refresh is decided against wall-clock time. XFetch starts a
    refresh about ``delta * beta * ln(reads per second * delta * beta)`` before
    expiry; here ``delta * beta`` is about 0.02 s and readers keep up thousands of
    reads per second, which puts refreshes some 0.05 to 0.2 s before each expiry.
    The checks accept anything from just before the expiry to, on average, 0.35 s
    before it, and nothing depends on how long a read or a refresh takes.
    """
    ttl, refreshes = 1.0, 3
    began: list[float] = []  # wall-clock time at which each computation began
    ended: list[float] = []  # ... and ended: its value expires at least ttl later
    asked: list[float] = []  # wall-clock time at which each background refresh asked for the lease
    backend: Any = cache.backend
    lease = backend.lease

    async def timed_lease(*args: Any) -> Any:
        asked.append(time.time())
        return await lease(*args)

    backend.lease = timed_lease

    @cache.cached(ttl=ttl, early_refresh=True, beta=0.5, jitter=0)
    async def hot() -> int:
        began.append(time.time())
        await asyncio.sleep(0.04)  # a computation that takes a while: delta
        ended.append(time.time())
        return len(began)

    assert await hot() == 1
    before = await cache.stats()
    reads = 0
    done = asyncio.Event()

    async def reader() -> None:
        nonlocal reads
        while not done.is_set():
            if await hot() == 1 + refreshes:
                done.set()
            reads += 1
            await asyncio.sleep(0.001)

    readers = [asyncio.create_task(reader()) for _ in range(32)]
    try:
        await asyncio.wait_for(done.wait(), 10 * ttl * refreshes)  # takes about ttl * refreshes
    finally:
        done.set()
        await asyncio.gather(*readers)
    after = await cache.stats()
    assert after.misses == before.misses, "a read waited for a recompute"
    assert after.hits - before.hits == reads
    # One computation per refresh, each started by a read but run in the background.
    assert len(began) == len(asked) + 1 == 1 + refreshes
    for n in range(refreshes):
        assert asked[n] < ended[n] + ttl, f"refresh {n + 1} began after the value it replaces expired"
    # About once per TTL: the refreshes are spread over at least refreshes - 1 TTLs
    # (a refresh started, say, halfway through each TTL would fail this).
    spread = began[refreshes] - ended[0]
    assert spread >= (refreshes - 1) * ttl, f"{refreshes} refreshes in {spread:.2f} s"


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
    gate = asyncio.Event()
    waiting = Waiting(backend)

    async def body(x: int) -> int:
        calls.calls += 1
        await gate.wait()
        return x

    f_one = one.cached(ttl=60)(body)
    f_two = two.cached(ttl=60)(body)
    callers = asyncio.gather(*(f_one(1) for _ in range(50)), *(f_two(1) for _ in range(50)))
    # The callers of the "process" holding the lease share its call; those of the
    # other one all wait for its value.
    await waiting.reach(50)
    gate.set()
    results = await callers
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
    computing = [asyncio.Event(), asyncio.Event()]

    async def body(x: int) -> int:
        calls.calls += 1
        computing[calls.calls - 1].set()
        await gate.wait()
        return x

    f_one = one.cached(ttl=60, lock=False)(body)
    f_two = two.cached(ttl=60, lock=False)(body)
    first = asyncio.create_task(f_one(1))
    await computing[0].wait()  # the first "process" holds the lease and computes
    second = asyncio.create_task(f_two(1))
    # The second "process" computes too instead of waiting for the lease holder:
    # if it waited, this would time out (the first cannot finish before the gate opens).
    await asyncio.wait_for(computing[1].wait(), 5)
    assert calls.calls == 2
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
    holding = asyncio.Event()

    async def hang() -> str:
        holding.set()
        await never.wait()
        return "never"

    async def load() -> str:
        return "taken over"

    stuck = asyncio.create_task(holder.get_or_set("k", hang))
    await holding.wait()  # the holder has the lease; it will neither fill nor release it
    # The waiter waits lease_ttl (real time: a Redis lease expires by Redis's clock),
    # then finds the lease expired and loads. 5 s: only reached when something is broken.
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

    computing = asyncio.Event()

    @cache.cached(ttl=60, tags=tags_of)
    async def get_post(post_id: int) -> dict[str, str]:
        calls.calls += 1
        seen = dict(source)
        computing.set()
        await gate.wait()
        return seen

    first = asyncio.create_task(get_post(1))
    await computing.wait()
    source["title"] = "new"
    await cache.invalidate_tags(["post:1"])  # the result's tag, unknown before it was computed
    gate.set()
    assert await first == {"title": "old"}
    assert await get_post(1) == {"title": "new"}  # the old value was not stored
    assert calls.calls == 2
    assert await get_post(1) == {"title": "new"}
    assert calls.calls == 2  # and the new one was
