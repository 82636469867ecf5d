"""A hypothesis state machine drives the cache against a plain model, on every backend.

The memory backend runs on a fake clock, so expiry is exact. Redis keeps its
own time, so there the clock is real and each entry's expiry is known only
within the interval between the start and the end of its write: a read inside
that window may hit or miss, and the model then records what it saw.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tagcache import Cache
from tagcache.backends import Backend, MemoryBackend

from tests.conftest import BACKEND_KINDS, unique_namespace

KEYS = st.sampled_from(["a", "b", "c", "user:*", "user:?"])
TAGS = st.lists(st.sampled_from(["t1", "t2", "t3", "t*"]), max_size=3, unique=True)
VALUES = st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.none())
TTLS = st.sampled_from([None, 0.06, 0.25, 100.0])
MISSING = object()
SLACK = 0.01  # Redis keeps millisecond TTLs


@dataclass
class Model:
    value: Any
    tags: tuple[str, ...]
    expires_lo: float | None  # surely present before this time
    expires_hi: float | None  # surely gone after this time


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_machine(kind: str, redis_url: str | None) -> type[RuleBasedStateMachine]:
    class CacheMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.fake = FakeClock() if kind == "memory" else None
            self.model: dict[str, Model] = {}
            self.closers: list[Any] = []
            backend: Backend
            if kind == "memory":
                backend = MemoryBackend(clock=self.fake)
            else:
                from tagcache.backends.redis import RedisBackend

                if kind == "fakeredis":
                    import fakeredis

                    async def make_client() -> Any:
                        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=7))

                    client = self.run(make_client())
                    self.closers.append(client)
                    backend = RedisBackend(client)
                elif kind == "l1":
                    from tagcache.backends.local import LocalCache, LocalLayer

                    assert redis_url is not None

                    async def make_layer() -> Backend:
                        remote = RedisBackend.from_url(redis_url, socket_timeout=5.0)
                        return LocalLayer(remote, remote.invalidation_feed(), LocalCache(ttl=60))

                    backend = self.run(make_layer())
                elif kind == "cluster":
                    from tagcache.backends.cluster import RedisClusterBackend

                    assert redis_url is not None
                    backend = RedisClusterBackend.from_url(redis_url, socket_timeout=5.0)
                else:
                    assert redis_url is not None

                    async def make_backend() -> Backend:
                        # Not a test of timeouts: a loaded machine must not fail it with one.
                        return RedisBackend.from_url(redis_url, socket_timeout=5.0)

                    backend = self.run(make_backend())
            self.cache = Cache(backend, namespace=unique_namespace("sm"), default_ttl=None)

        def run(self, coro: Any) -> Any:
            return self.loop.run_until_complete(coro)

        def now(self) -> float:
            return self.fake.now if self.fake is not None else time.monotonic()

        def teardown(self) -> None:
            async def close() -> None:
                await self.cache.clear()
                await self.cache.aclose()
                for obj in self.closers:
                    await obj.aclose()

            self.run(close())
            self.loop.close()

        # -- the model's view of time
        def _state(self, key: str, start: float, end: float) -> str:
            """'present', 'absent' or 'unknown' for a read between start and end."""
            entry = self.model.get(key)
            if entry is None:
                return "absent"
            if entry.expires_lo is None or end < entry.expires_lo:
                return "present"
            assert entry.expires_hi is not None
            if start > entry.expires_hi + SLACK:
                return "absent"
            return "unknown"

        def _observe(self, key: str, start: float, end: float, got: Any) -> None:
            state = self._state(key, start, end)
            if state == "present":
                assert got == self.model[key].value, (key, got, self.model[key])
            elif state == "absent":
                assert got is MISSING, (key, got)
                self.model.pop(key, None)
            elif got is MISSING:
                del self.model[key]
            else:
                assert got == self.model[key].value

        # -- rules
        @rule(key=KEYS, value=VALUES, ttl=TTLS, tags=TAGS)
        def set(self, key: str, value: Any, ttl: float | None, tags: list[str]) -> None:
            start = self.now()
            self.run(self.cache.set(key, value, ttl=ttl, tags=tags))
            end = self.now()
            self.model[key] = Model(
                value,
                tuple(tags),
                None if ttl is None else start + ttl - SLACK,
                None if ttl is None else end + ttl,
            )

        @rule(key=KEYS)
        def get(self, key: str) -> None:
            start = self.now()
            got = self.run(self.cache.get(key, MISSING))
            self._observe(key, start, self.now(), got)

        @rule(key=KEYS, value=VALUES, tags=TAGS)
        def get_or_set(self, key: str, value: Any, tags: list[str]) -> None:
            loaded = []

            async def loader() -> Any:
                loaded.append(1)
                return value

            start = self.now()
            got = self.run(self.cache.get_or_set(key, loader, ttl=100.0, tags=tags))
            end = self.now()
            if loaded:
                self._observe(key, start, end, MISSING)
                assert got == value
                self.model[key] = Model(value, tuple(tags), start + 100.0 - SLACK, end + 100.0)
            else:
                self._observe(key, start, end, got)

        @rule(key=KEYS)
        def delete(self, key: str) -> None:
            start = self.now()
            existed = self.run(self.cache.delete(key))
            state = self._state(key, start, self.now())
            if state != "unknown":
                # An invalidated entry may still be stored until it expires.
                assert existed or state == "absent"
            self.model.pop(key, None)

        @rule(tags=TAGS)
        def invalidate(self, tags: list[str]) -> None:
            self.run(self.cache.invalidate_tags(tags))
            for key in [k for k, m in self.model.items() if set(m.tags) & set(tags)]:
                del self.model[key]

        @rule()
        def clear(self) -> None:
            self.run(self.cache.clear())
            self.model.clear()

        @rule(seconds=st.sampled_from([0.03, 0.1, 0.3]))
        def advance_clock(self, seconds: float) -> None:
            if self.fake is not None:
                self.fake.now += seconds
            else:
                self.run(asyncio.sleep(seconds))

        @invariant()
        def keys_match_model(self) -> None:
            if kind != "memory":
                return  # with a real clock the membership of expiring keys is fuzzy
            listed = set(self.run(self.cache.keys("*", limit=None)))
            now = self.now()
            live = {key for key in self.model if self._state(key, now, now) == "present"}
            # Invalidated entries may still be listed until they expire; live ones must be.
            assert live <= listed, (live, listed)

    return CacheMachine


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_cache_matches_model(kind: str, request: pytest.FixtureRequest) -> None:
    url = {"redis": "redis_url", "l1": "redis_url", "cluster": "redis_cluster_url"}.get(kind)
    machine = make_machine(kind, None if url is None else request.getfixturevalue(url))
    examples = 200 if kind == "memory" else 40
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
