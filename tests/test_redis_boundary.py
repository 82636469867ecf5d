"""RedisBackend's boundary with redis-py: errors translated into BackendError in one
place, and the fast write to a connection's stream with its fallback.

Against a real Redis server, like tests/test_redis_backend.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from tagcache.backends import redis as redis_backend
from tagcache.backends.breaker import CircuitBreaker
from tagcache.backends.redis import RedisBackend
from tagcache.exceptions import BackendError, BackendUnavailableError

from tests.redis_server import free_port

pytestmark = pytest.mark.redis


@pytest.fixture
async def ns(redis_url: str) -> AsyncIterator[str]:
    """A unique namespace; its keys are removed afterwards."""
    name = f"rbb{uuid.uuid4().hex[:12]}"
    yield name
    client = aioredis.Redis.from_url(redis_url)
    async for key in client.scan_iter(match=f"tc:{{{name}*", count=500):
        await client.unlink(key)
    await client.aclose()


async def _exercise(b: RedisBackend, ns: str) -> None:
    """Every kind of call, alone and batched, with the replies checked."""
    await b.set(ns, "a", b"va", 60, ["t1"])
    assert await b.get(ns, "a") == b"va"
    assert await b.get(ns, "missing") is None
    miss = await b.fetch(ns, "b", ["t1", "t2"], 5.0)
    assert miss.payload is None and miss.lease is not None
    assert await b.fill(ns, "b", b"vb", 60, ["t1", "t2"], list(miss.tokens), miss.lease, miss.epoch)
    hit = await b.fetch(ns, "b", ["t1", "t2"], 5.0)
    assert hit.payload == b"vb"
    # Concurrent reads: one goes out at once, the others are batched behind it.
    got = await asyncio.gather(*(b.get(ns, k) for k in ("a", "b", "missing", "a")))
    assert got == [b"va", b"vb", None, b"va"]
    await b.invalidate(ns, ["t2"])
    assert await b.get(ns, "b") is None
    assert await b.get(ns, "a") == b"va"
    assert await b.delete(ns, "a")
    assert await b.get(ns, "a") is None


# -- the fast write and its fallback ----------------------------------------------


class _Writer:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def writelines(self, data: Any) -> None:
        self.written.extend(data)


class _Conn:
    """Stands in for a connection, with or without a ``_writer`` stream."""

    def __init__(self, writer: _Writer | None = None, *, has_writer: bool = True, health: int = 0) -> None:
        if has_writer:
            self._writer = writer
        self.health_check_interval = health


def test_write_small_writes_to_the_stream() -> None:
    writer = _Writer()
    assert redis_backend._write_small(_Conn(writer), b"cmd")  # type: ignore[arg-type]  # a stand-in connection
    assert writer.written == [b"cmd"]


@pytest.mark.parametrize(
    "conn",
    [
        pytest.param(_Conn(has_writer=False), id="no _writer attribute"),
        pytest.param(_Conn(None), id="disconnected"),
        pytest.param(_Conn(_Writer(), health=30), id="health check due"),
    ],
)
def test_write_small_declines_when_it_cannot_write(conn: _Conn) -> None:
    assert not redis_backend._write_small(conn, b"cmd")  # type: ignore[arg-type]  # a stand-in connection
    writer = getattr(conn, "_writer", None)
    assert writer is None or writer.written == []


def test_write_small_declines_large_commands() -> None:
    writer = _Writer()
    big = b"x" * redis_backend._FAST_WRITE_MAX
    assert not redis_backend._write_small(_Conn(writer), big)  # type: ignore[arg-type]  # a stand-in connection
    assert writer.written == []


class _Hidden:
    """A connection as seen by a redis-py without the ``_writer`` internal."""

    def __init__(self, conn: Any) -> None:
        self.health_check_interval = conn.health_check_interval


async def test_backend_works_when_connections_have_no_writer(
    redis_url: str, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = redis_backend._write_small
    seen: list[bool] = []

    def hiding(conn: Any, cmd: bytes) -> bool:
        wrote = real(_Hidden(conn), cmd)  # type: ignore[arg-type]  # a stand-in connection
        seen.append(wrote)
        return wrote

    monkeypatch.setattr(redis_backend, "_write_small", hiding)
    async with RedisBackend.from_url(redis_url) as b:
        await _exercise(b, ns)
    assert seen and not any(seen)  # the fast path was tried and every call fell back


async def test_backend_reconnects_a_disconnected_idle_connection(redis_url: str, ns: str) -> None:
    async with RedisBackend.from_url(redis_url) as b:
        await b.set(ns, "k", b"v", 60, [])
        assert await b.get(ns, "k") == b"v"
        assert b._idle
        for conn in b._idle:
            await conn.disconnect()
            assert getattr(conn, "_writer", None) is None
        # The fast write declines; send_packed_command connects again.
        assert await b.get(ns, "k") == b"v"
        await _exercise(b, ns)


async def test_fast_path_is_taken_on_a_connected_socket(
    redis_url: str, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = redis_backend._write_small
    seen: list[bool] = []

    def spy(conn: Any, cmd: bytes) -> bool:
        wrote = real(conn, cmd)
        seen.append(wrote)
        return wrote

    monkeypatch.setattr(redis_backend, "_write_small", spy)
    async with RedisBackend.from_url(redis_url) as b:
        await _exercise(b, ns)
    assert any(seen)


# -- errors translated at the boundary ---------------------------------------------


async def test_errors_of_every_method_are_translated_with_the_cause() -> None:
    breaker = CircuitBreaker(failures=1000)  # stays closed: every call reaches the transport
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with RedisBackend.from_url(url, breaker=breaker) as b:
        calls = {
            "get of key 'k'": b.get("ns", "k"),
            "fetch of key 'k'": b.fetch("ns", "k", ["t"], 1.0),
            "lease of key 'k'": b.lease("ns", "k", ["t"], 1.0),
            "set of key 'k'": b.set("ns", "k", b"v", 1, ["t"]),
            "delete of key 'k'": b.delete("ns", "k"),
            "peek of key 'k'": b.peek("ns", "k"),
            "invalidate failed": b.invalidate("ns", ["t"]),
            "clear failed": b.clear("ns"),
            "keys failed": b.keys("ns", "*", None),
            "info failed": b.info(),
        }
        for where, call in calls.items():
            with pytest.raises(BackendError) as caught:
                await call
            assert type(caught.value) is BackendError
            message = str(caught.value)
            assert message.startswith("Redis ") and where in message, message
            cause = caught.value.__cause__
            assert isinstance(cause, (RedisConnectionError, OSError))
            assert f"failed: {type(cause).__name__}: {cause}" in message
        with pytest.raises(BackendError, match=r"^Redis watch of key 'k' failed: ") as caught:
            async with b.watch("ns", "k"):
                pass
        assert caught.value.__cause__ is not None


async def test_batched_reads_carry_translated_errors() -> None:
    breaker = CircuitBreaker(failures=1000)
    async with RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0", breaker=breaker) as b:
        results = await asyncio.gather(*(b.get("ns", f"k{i}") for i in range(5)), return_exceptions=True)
        for i, result in enumerate(results):
            assert type(result) is BackendError
            assert str(result).startswith(f"Redis get of key 'k{i}' failed: ")
            assert isinstance(result.__cause__, (RedisConnectionError, OSError))


async def test_breaker_errors_pass_through_untouched() -> None:
    breaker = CircuitBreaker(failures=1, cooldown=60)
    async with RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0", breaker=breaker) as b:
        with pytest.raises(BackendError) as first:
            await b.set("ns", "k", b"v", 1, [])
        assert type(first.value) is BackendError
        assert not breaker.closed
        for call in (
            b.get("ns", "k"),
            b.fetch("ns", "k", [], 1.0),
            b.set("ns", "k", b"v", 1, []),
            b.delete("ns", "k"),
            b.info(),
        ):
            with pytest.raises(BackendUnavailableError) as caught:
                await call
            assert "circuit breaker" in str(caught.value)
            assert not str(caught.value).startswith("Redis ")


async def test_error_replies_are_translated(redis_url: str) -> None:
    async with RedisBackend.from_url(redis_url) as b:
        with pytest.raises(BackendError) as caught:
            await b._call("probe", "k", [redis_backend._pack(b"NO-SUCH-COMMAND")])
        assert isinstance(caught.value.__cause__, ResponseError)
        assert str(caught.value) == f"Redis probe of key 'k' failed: ResponseError: {caught.value.__cause__}"
        # A reply tolerated by the caller is returned as a value.
        replies = await b._call("probe", None, [redis_backend._pack(b"NO-SUCH-COMMAND")], tolerate=1)
        assert isinstance(replies[0], ResponseError)
        # The server is fine: the error reply left the connection usable.
        info = await b.info()
        assert info.keys is not None and info.keys >= 0
