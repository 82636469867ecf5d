"""The backend contract: a pytest test class that checks a :class:`~tagcache.backends.Backend`.

:class:`BackendContract` is the executable definition of the
:class:`~tagcache.backends.Backend` protocol. Subclass it in a test module of
your own, give the subclass a fixture named ``backend`` returning a fresh
instance of your backend, and run pytest: every test of the contract runs
against it. The tests need no async plugin (each runs its scenario with
:func:`asyncio.run`, and closes the backend inside that event loop), and they
also run under pytest-asyncio in any mode.

This module imports pytest: import it from test code only (it is re-exported
by :mod:`tagcache.testing`).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import pytest

from tagcache.backends.base import (
    Backend,
    BackendInfo,
    SupportsInfo,
    SupportsKeys,
    SupportsPeek,
    SupportsWatch,
)
from tagcache.cache import Cache
from tagcache.tags import glob_escape

__all__ = ["BackendContract"]

#: Lease lifetime, in seconds, of the tests that do not wait for a lease to expire.
LEASE_TTL = 10.0
#: A short TTL (of entries and leases), in seconds, that tests wait out.
SHORT_TTL = 0.2
#: Seconds after a write at which a :data:`SHORT_TTL` record must be gone: five
#: times the TTL, so that a TTL rounded up to a whole second also fails.
EXPIRED_AFTER = 1.0
#: Upper bound on any wait for a signal: reached only when something is broken.
PATIENCE = 5.0
TAGS = ("users", "user:1")


class _Namespaces:
    """Makes fresh namespaces for one test and remembers them, to clear them afterwards."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def __call__(self) -> str:
        ns = _namespace()
        self.made.append(ns)
        return ns


def _namespace() -> str:
    """A random namespace: tests on a shared server never see each other's data."""
    return f"contract-{uuid.uuid4().hex[:16]}"


def _run(backend: Backend, scenario: Callable[[_Namespaces], Awaitable[None]]) -> None:
    """Run ``scenario`` in a new event loop, then clear its namespaces and close ``backend``
    in that same loop."""

    async def main() -> None:
        namespaces = _Namespaces()
        failed = False
        try:
            await scenario(namespaces)
        except BaseException:
            failed = True
            raise
        finally:
            try:
                for ns in namespaces.made:
                    await backend.clear(ns)
            except Exception:
                if not failed:  # a cleanup failure must not hide the test's own failure
                    raise
            finally:
                await backend.aclose()

    asyncio.run(main())


def _missing(backend: Backend, capability: str, method: str) -> NoReturn:
    """Close ``backend`` and skip the test: it lacks an optional capability."""
    asyncio.run(backend.aclose())
    pytest.skip(
        f"{type(backend).__name__} lacks the optional capability {capability} "
        f"(no {method} method): nothing to check"
    )


async def _wait_until(deadline: float) -> None:
    """Sleep until the :func:`time.monotonic` instant ``deadline`` (real time must pass for expiry)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class _Calls:
    """Counts the completed calls of an async method of one object; a test can wait for a count."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.count += 1
        self._changed.set()

    async def reach(self, count: int) -> None:
        """Wait until ``count`` calls returned (at most :data:`PATIENCE` seconds)."""

        async def until() -> None:
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(until(), PATIENCE)
        except asyncio.TimeoutError:
            pytest.fail(f"{self.count} calls returned after {PATIENCE} s, expected {count}")


def _count_calls(obj: object, name: str) -> _Calls | None:
    """Wrap the async method ``name`` on the instance ``obj`` to count its calls;
    ``None`` when the instance cannot take attributes (``__slots__``)."""
    original = getattr(obj, name)
    calls = _Calls()

    async def counted(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        calls.bump()
        return result

    try:
        setattr(obj, name, counted)
    except (AttributeError, TypeError):
        return None
    return calls


class BackendContract:
    """Tests every :class:`~tagcache.backends.Backend` must pass; subclass it to check yours.

    Define a fixture named ``backend`` that returns a fresh instance of the
    backend (each test closes it with ``aclose`` when done)::

        import pytest
        from tagcache.testing import BackendContract
        from mypkg import MyBackend

        class TestMyBackend(BackendContract):
            @pytest.fixture
            def backend(self):
                return MyBackend(...)

    The tests call the backend directly (the core operations of
    :class:`~tagcache.backends.Backend`, in random namespaces, so a shared
    server is fine), then through :class:`tagcache.Cache`. Tests of an optional
    capability (:class:`~tagcache.backends.SupportsPeek`,
    :class:`~tagcache.backends.SupportsKeys`,
    :class:`~tagcache.backends.SupportsInfo`,
    :class:`~tagcache.backends.SupportsWatch`) are skipped, with a reason
    naming it, when the backend lacks it. A few tests wait about a second of
    real time for a short TTL or lease to expire.

    The fixture must be a plain (not async) fixture: each test runs its
    scenario in an event loop of its own, with :func:`asyncio.run`, so the
    backend must not be bound to another loop yet (connect lazily).
    """

    # ------------------------------------------------------------ core: the basics

    def test_fixture_returns_a_backend(self, backend: Backend) -> None:
        """The ``backend`` fixture returns an object with every core operation of ``Backend``."""
        assert isinstance(backend, Backend), f"{type(backend).__name__} lacks core Backend methods"
        asyncio.run(backend.aclose())

    def test_set_get_delete_round_trip(self, backend: Backend) -> None:
        """``set`` stores a payload ``get`` returns; ``delete`` removes it and says whether it was there."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            assert await backend.get(ns, "k") is None
            await backend.set(ns, "k", b"v1", 60, ["t"])
            assert await backend.get(ns, "k") == b"v1"
            await backend.set(ns, "k", b"v2", 60, ["t"])
            assert await backend.get(ns, "k") == b"v2"
            assert await backend.delete(ns, "k") is True
            assert await backend.get(ns, "k") is None
            assert await backend.delete(ns, "k") is False
            assert await backend.delete(ns, "never-stored") is False

        _run(backend, scenario)

    def test_overwrite_replaces_payload_and_tags(self, backend: Backend) -> None:
        """A second ``set`` of a key replaces its tags: only the new tags invalidate it."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await backend.set(ns, "k", b"1", 60, ["a"])
            await backend.set(ns, "k", b"2", 60, ["b"])
            await backend.invalidate(ns, ["a"])
            assert await backend.get(ns, "k") == b"2"
            await backend.invalidate(ns, ["b"])
            assert await backend.get(ns, "k") is None

        _run(backend, scenario)

    def test_ttl_seconds_are_honoured_by_set_and_fill(self, backend: Backend) -> None:
        """A float TTL in seconds expires entries written by ``set`` and ``fill``; ``None`` never expires."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            start = time.monotonic()
            await backend.set(ns, "set-short", b"s", SHORT_TTL, ["t"])
            miss = await backend.fetch(ns, "fill-short", ["t"], LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "fill-short", b"f", SHORT_TTL, ["t"], miss.tokens, miss.lease)
            await backend.set(ns, "set-long", b"l", 60.5, ["t"])
            await backend.set(ns, "set-forever", b"n", None, ["t"])
            miss = await backend.fetch(ns, "fill-forever", ["t"], LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "fill-forever", b"m", None, ["t"], miss.tokens, miss.lease)
            assert await backend.get(ns, "set-long") == b"l"
            await _wait_until(start + EXPIRED_AFTER)
            assert await backend.get(ns, "set-short") is None, f"set with ttl={SHORT_TTL} did not expire"
            assert await backend.get(ns, "fill-short") is None, f"fill with ttl={SHORT_TTL} did not expire"
            assert (await backend.fetch(ns, "set-short", ["t"], LEASE_TTL)).payload is None
            assert await backend.get(ns, "set-long") == b"l"
            assert await backend.get(ns, "set-forever") == b"n"
            assert await backend.get(ns, "fill-forever") == b"m"

        _run(backend, scenario)

    def test_entry_without_ttl_is_still_invalidated(self, backend: Backend) -> None:
        """An entry written with ``ttl=None`` persists, yet goes when one of its tags is invalidated."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await backend.set(ns, "forever", b"v", None, ["t"])
            assert await backend.get(ns, "forever") == b"v"
            await backend.invalidate(ns, ["t"])
            assert await backend.get(ns, "forever") is None

        _run(backend, scenario)

    # ------------------------------------------------------------ core: tags

    def test_invalidate_drops_every_entry_carrying_a_tag_and_no_other(self, backend: Backend) -> None:
        """``invalidate`` drops every entry carrying any of the tags, and leaves every other entry."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await backend.set(ns, "a", b"1", 60, ["users", "user:1"])
            await backend.set(ns, "b", b"2", 60, ["users", "user:2"])
            await backend.set(ns, "c", b"3", 60, ["posts"])
            await backend.set(ns, "d", b"4", 60, [])
            await backend.invalidate(ns, ["user:1"])
            assert await backend.get(ns, "a") is None
            assert await backend.get(ns, "b") == b"2"
            await backend.invalidate(ns, ["never-used", "users"])
            assert await backend.get(ns, "b") is None
            assert await backend.get(ns, "c") == b"3"
            assert await backend.get(ns, "d") == b"4"
            assert (await backend.fetch(ns, "b", ["users"], LEASE_TTL)).payload is None
            # An entry written after the invalidation is valid.
            await backend.set(ns, "a", b"5", 60, ["users", "user:1"])
            assert await backend.get(ns, "a") == b"5"
            await backend.invalidate(ns, ["posts", "user:1"])
            assert await backend.get(ns, "a") is None
            assert await backend.get(ns, "c") is None

        _run(backend, scenario)

    # ------------------------------------------------------------ core: fetch and fill

    def test_fetch_on_a_miss_snapshots_tokens_in_tag_order(self, backend: Backend) -> None:
        """A missing ``fetch`` returns one token per tag in the order asked, the epoch and a lease."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            # Each tag's token is created by a fetch of its own, so the two differ
            # (tokens created in one step may be equal: only a tag's successive tokens must differ).
            (token_a,) = (await backend.fetch(ns, "only-a", ["a"], LEASE_TTL)).tokens
            (token_b,) = (await backend.fetch(ns, "only-b", ["b"], LEASE_TTL)).tokens
            assert token_a != token_b
            miss = await backend.fetch(ns, "k1", ["a", "b"], LEASE_TTL)
            assert miss.payload is None
            assert isinstance(miss.lease, str)
            assert miss.lease
            assert isinstance(miss.epoch, str)
            assert miss.epoch
            assert miss.tokens == (token_a, token_b)
            assert all(isinstance(t, str) and t for t in miss.tokens)
            reverse = await backend.fetch(ns, "k2", ["b", "a"], LEASE_TTL)
            assert reverse.tokens == (miss.tokens[1], miss.tokens[0])
            assert reverse.lease is not None
            assert reverse.lease != miss.lease
            assert (await backend.fetch(ns, "k3", [], LEASE_TTL)).tokens == ()
            await backend.invalidate(ns, ["a"])
            after = await backend.fetch(ns, "k4", ["a", "b"], LEASE_TTL)
            assert after.tokens[0] != miss.tokens[0]  # a new token for the invalidated tag
            assert after.tokens[1] == miss.tokens[1]
            assert after.epoch != miss.epoch

        _run(backend, scenario)

    def test_fetch_on_a_hit_returns_the_payload_and_takes_no_lease(self, backend: Backend) -> None:
        """A ``fetch`` of a valid entry returns its payload and leaves the lease free."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await backend.set(ns, "k", b"v", 60, ["t"])
            hit = await backend.fetch(ns, "k", ["t"], LEASE_TTL)
            assert hit.payload == b"v"
            assert hit.lease is None
            assert (await backend.lease(ns, "k", ["t"], LEASE_TTL)).lease is not None

        _run(backend, scenario)

    def test_fill_stores_when_nothing_changed(self, backend: Backend) -> None:
        """``fill`` with the lease and tokens of a miss stores the payload and returns ``True``."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "k", b"loaded", 60, TAGS, miss.tokens, miss.lease) is True
            assert await backend.get(ns, "k") == b"loaded"
            assert (await backend.fetch(ns, "k", TAGS, LEASE_TTL)).payload == b"loaded"
            await backend.invalidate(ns, [TAGS[1]])  # the filled entry carries its tags
            assert await backend.get(ns, "k") is None

        _run(backend, scenario)

    def test_fill_fails_after_an_invalidation_of_one_of_the_tags(self, backend: Backend) -> None:
        """A tag invalidated between the miss and the ``fill`` makes the fill store nothing."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert miss.lease is not None
            await backend.invalidate(ns, [TAGS[1]])
            assert await backend.fill(ns, "k", b"stale", 60, TAGS, miss.tokens, miss.lease) is False
            assert await backend.get(ns, "k") is None
            assert (await backend.fetch(ns, "k", TAGS, LEASE_TTL)).payload is None

        _run(backend, scenario)

    def test_fill_fails_after_a_set(self, backend: Backend) -> None:
        """A ``set`` between the miss and the ``fill`` wins: the fill stores nothing."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert miss.lease is not None
            await backend.set(ns, "k", b"explicit", 60, TAGS)
            assert await backend.fill(ns, "k", b"older", 60, TAGS, miss.tokens, miss.lease) is False
            assert await backend.get(ns, "k") == b"explicit"

        _run(backend, scenario)

    def test_fill_fails_after_a_delete(self, backend: Backend) -> None:
        """A ``delete`` between the miss and the ``fill`` clears the lease: the fill stores nothing."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert miss.lease is not None
            assert await backend.delete(ns, "k") is False
            assert await backend.fill(ns, "k", b"older", 60, TAGS, miss.tokens, miss.lease) is False
            assert await backend.get(ns, "k") is None

        _run(backend, scenario)

    def test_fill_fails_with_a_wrong_lease_and_keeps_the_lease(self, backend: Backend) -> None:
        """A ``fill`` with a lease that is not the holder's stores nothing and leaves the lease held."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "k", b"x", 60, TAGS, miss.tokens, "not-the-lease") is False
            assert await backend.get(ns, "k") is None
            assert (await backend.fetch(ns, "k", TAGS, LEASE_TTL)).lease is None
            assert await backend.fill(ns, "k", b"v", 60, TAGS, miss.tokens, miss.lease) is True
            assert await backend.get(ns, "k") == b"v"

        _run(backend, scenario)

    def test_fill_fails_with_wrong_tokens(self, backend: Backend) -> None:
        """A ``fill`` whose tokens are not the tags' current ones (or not one per tag) stores nothing."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert miss.lease is not None
            wrong = (miss.tokens[0], "0123456789abcdef")
            assert await backend.fill(ns, "k", b"x", 60, TAGS, wrong, miss.lease) is False
            assert await backend.get(ns, "k") is None
            miss = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "k", b"x", 60, TAGS, miss.tokens[:1], miss.lease) is False
            assert await backend.get(ns, "k") is None

        _run(backend, scenario)

    def test_fill_with_epoch_fails_after_any_invalidation(self, backend: Backend) -> None:
        """Given the miss's epoch, ``fill`` stores only if no tag at all was invalidated since."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "k1", ["t"], LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "k1", b"v", 60, ["t"], miss.tokens, miss.lease, miss.epoch) is True
            assert await backend.get(ns, "k1") == b"v"

            miss = await backend.fetch(ns, "k2", ["t"], LEASE_TTL)
            assert miss.lease is not None
            await backend.invalidate(ns, ["unrelated"])
            assert await backend.fill(ns, "k2", b"v", 60, ["t"], miss.tokens, miss.lease, miss.epoch) is False
            assert await backend.get(ns, "k2") is None

            # Without the epoch, only the entry's own tags count.
            miss = await backend.fetch(ns, "k3", ["t"], LEASE_TTL)
            assert miss.lease is not None
            await backend.invalidate(ns, ["unrelated"])
            assert await backend.fill(ns, "k3", b"v", 60, ["t"], miss.tokens, miss.lease) is True
            assert await backend.get(ns, "k3") == b"v"

        _run(backend, scenario)

    def test_fill_releases_the_lease_whether_it_stores_or_not(self, backend: Backend) -> None:
        """After a ``fill``, stored or refused, the next caller is granted the lease."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            miss = await backend.fetch(ns, "stored", TAGS, LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "stored", b"v", 60, TAGS, miss.tokens, miss.lease) is True
            assert (await backend.lease(ns, "stored", TAGS, LEASE_TTL)).lease is not None

            miss = await backend.fetch(ns, "refused", TAGS, LEASE_TTL)
            assert miss.lease is not None
            await backend.invalidate(ns, [TAGS[0]])
            assert await backend.fill(ns, "refused", b"v", 60, TAGS, miss.tokens, miss.lease) is False
            again = await backend.fetch(ns, "refused", TAGS, LEASE_TTL)
            assert again.payload is None
            assert again.lease is not None

        _run(backend, scenario)

    # ------------------------------------------------------------ core: leases

    def test_second_fetch_while_the_lease_is_held_gets_no_lease(self, backend: Backend) -> None:
        """A ``fetch`` that misses while another caller holds the lease gets the tokens but no lease."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            held = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert held.lease is not None
            seen = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert seen.payload is None
            assert seen.lease is None
            assert seen.tokens == held.tokens
            assert (await backend.lease(ns, "k", TAGS, LEASE_TTL)).lease is None
            other = await backend.fetch(ns, "other-key", TAGS, LEASE_TTL)
            assert other.lease is not None  # leases are per key

        _run(backend, scenario)

    def test_release_lets_another_caller_take_the_lease(self, backend: Backend) -> None:
        """``release`` by the holder frees the lease; releasing someone else's lease does nothing."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            held = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert held.lease is not None
            await backend.release(ns, "k", "not-the-lease")
            assert (await backend.fetch(ns, "k", TAGS, LEASE_TTL)).lease is None
            await backend.release(ns, "k", held.lease)
            taken = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert taken.payload is None
            assert taken.lease is not None
            assert taken.lease != held.lease
            assert await backend.fill(ns, "k", b"v", 60, TAGS, held.tokens, held.lease) is False
            assert await backend.fill(ns, "k", b"v", 60, TAGS, taken.tokens, taken.lease) is True
            assert await backend.get(ns, "k") == b"v"
            await backend.release(ns, "never-leased", "not-a-lease")  # harmless

        _run(backend, scenario)

    def test_lease_is_granted_even_when_the_key_holds_a_value(self, backend: Backend) -> None:
        """``lease`` takes the lease whether or not the key holds a value, and never returns a payload."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await backend.set(ns, "k", b"old", 60, TAGS)
            refresh = await backend.lease(ns, "k", TAGS, LEASE_TTL)
            assert refresh.payload is None
            assert refresh.lease is not None
            assert len(refresh.tokens) == len(TAGS)
            assert await backend.get(ns, "k") == b"old"  # the value stays readable meanwhile
            assert (await backend.lease(ns, "k", TAGS, LEASE_TTL)).lease is None
            assert await backend.fill(ns, "k", b"new", 60, TAGS, refresh.tokens, refresh.lease) is True
            assert await backend.get(ns, "k") == b"new"
            absent = await backend.lease(ns, "absent", TAGS, LEASE_TTL)
            assert absent.payload is None
            assert absent.lease is not None

        _run(backend, scenario)

    def test_lease_expires_after_lease_ttl(self, backend: Backend) -> None:
        """A lease not given back expires after ``lease_ttl`` seconds; its holder's fill then fails."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            start = time.monotonic()
            first = await backend.fetch(ns, "k", TAGS, SHORT_TTL)
            assert first.lease is not None
            await _wait_until(start + EXPIRED_AFTER)
            second = await backend.fetch(ns, "k", TAGS, LEASE_TTL)
            assert second.lease is not None, f"a lease with lease_ttl={SHORT_TTL} did not expire"
            assert second.lease != first.lease
            assert await backend.fill(ns, "k", b"late", 60, TAGS, first.tokens, first.lease) is False
            assert await backend.fill(ns, "k", b"v", 60, TAGS, second.tokens, second.lease) is True
            assert await backend.get(ns, "k") == b"v"

        _run(backend, scenario)

    # ------------------------------------------------------------ core: namespaces

    def test_clear_removes_only_its_namespace_and_counts_entries(self, backend: Backend) -> None:
        """``clear`` removes the entries, tokens and leases of one namespace and returns how many entries."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns, other = new_ns(), new_ns()
            for key in ("a", "b", "c"):
                await backend.set(ns, key, b"v", 60, ["t"])
            await backend.set(ns, "forever", b"v", None, ["t"])
            leased = await backend.fetch(ns, "leased", ["t"], LEASE_TTL)
            assert leased.lease is not None
            await backend.set(other, "a", b"kept", 60, ["t"])
            other_lease = await backend.fetch(other, "leased", ["t"], LEASE_TTL)
            assert other_lease.lease is not None

            assert await backend.clear(ns) == 4
            for key in ("a", "b", "c", "forever"):
                assert await backend.get(ns, key) is None
            assert (await backend.fetch(ns, "leased", ["t"], LEASE_TTL)).lease is not None
            assert await backend.get(other, "a") == b"kept"
            assert (await backend.fetch(other, "leased", ["t"], LEASE_TTL)).lease is None
            assert await backend.clear(new_ns()) == 0

        _run(backend, scenario)

    def test_namespaces_are_isolated(self, backend: Backend) -> None:
        """Keys, tags and leases of one namespace never affect another's."""

        async def scenario(new_ns: _Namespaces) -> None:
            one, two = new_ns(), new_ns()
            await backend.set(one, "k", b"one", 60, ["t"])
            await backend.set(two, "k", b"two", 60, ["t"])
            assert await backend.get(one, "k") == b"one"
            assert await backend.get(two, "k") == b"two"
            await backend.invalidate(one, ["t"])
            assert await backend.get(one, "k") is None
            assert await backend.get(two, "k") == b"two"
            assert (await backend.fetch(one, "m", ["t"], LEASE_TTL)).lease is not None
            assert (await backend.fetch(two, "m", ["t"], LEASE_TTL)).lease is not None
            assert await backend.delete(one, "absent") is False
            await backend.set(one, "d", b"1", 60, [])
            await backend.set(two, "d", b"2", 60, [])
            assert await backend.delete(one, "d") is True
            assert await backend.get(two, "d") == b"2"

        _run(backend, scenario)

    # ------------------------------------------------------------ core: data

    def test_payloads_are_arbitrary_bytes(self, backend: Backend) -> None:
        """Payloads come back byte for byte: empty, NUL, not UTF-8, every byte value, 1 MB."""
        payloads = [
            b"",
            b"\x00",
            b"\xff\xfe\x80\x00\xc3",
            bytes(range(256)),
            b"\r\n$-1\r\n*2\r\n",
            os.urandom(2**20),
        ]

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            for i, payload in enumerate(payloads):
                await backend.set(ns, f"set:{i}", payload, 60, ["t"])
                miss = await backend.fetch(ns, f"fill:{i}", ["t"], LEASE_TTL)
                assert miss.lease is not None
                assert await backend.fill(ns, f"fill:{i}", payload, 60, ["t"], miss.tokens, miss.lease)
            for i, payload in enumerate(payloads):
                assert await backend.get(ns, f"set:{i}") == payload, f"payload {i} changed by set"
                assert await backend.get(ns, f"fill:{i}") == payload, f"payload {i} changed by fill"
                assert (await backend.fetch(ns, f"set:{i}", ["t"], LEASE_TTL)).payload == payload

        _run(backend, scenario)

    def test_glob_characters_and_unicode_in_keys_and_tags_are_data(self, backend: Backend) -> None:
        """Keys and tags with ``*?[]`` or non-ASCII text are plain data, never patterns."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await backend.set(ns, "user:*", b"star", 60, ["t*"])
            await backend.set(ns, "user:1", b"one", 60, ["t1"])
            await backend.set(ns, "user:[1]", b"brackets", 60, ["t?"])
            await backend.set(ns, "usér:ключ:🔑", b"unicode", 60, ["тег", "t[1]"])
            await backend.invalidate(ns, ["t*"])
            assert await backend.get(ns, "user:*") is None
            assert await backend.get(ns, "user:1") == b"one"
            assert await backend.get(ns, "user:[1]") == b"brackets"
            assert await backend.delete(ns, "user:?") is False
            assert await backend.get(ns, "user:1") == b"one"
            await backend.invalidate(ns, ["t[1]"])
            assert await backend.get(ns, "user:1") == b"one"
            assert await backend.get(ns, "usér:ключ:🔑") is None
            miss = await backend.fetch(ns, "usér:ключ:🔑", ["тег"], LEASE_TTL)
            assert miss.lease is not None
            assert await backend.fill(ns, "usér:ключ:🔑", b"again", 60, ["тег"], miss.tokens, miss.lease)
            assert await backend.get(ns, "usér:ключ:🔑") == b"again"
            await backend.invalidate(ns, ["т*"])
            assert await backend.get(ns, "usér:ключ:🔑") == b"again"

        _run(backend, scenario)

    def test_aclose_is_idempotent(self, backend: Backend) -> None:
        """``aclose`` may be called twice."""

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await backend.set(ns, "k", b"v", 60, [])
            await backend.clear(ns)
            new_ns.made.remove(ns)  # nothing left to clear once closed
            await backend.aclose()
            await backend.aclose()

        _run(backend, scenario)

    # ------------------------------------------------------------ optional capabilities

    def test_peek_shows_payload_ttl_tags_and_validity(self, backend: Backend) -> None:
        """``peek`` (SupportsPeek) shows an entry's payload, TTL, tags and whether it is still valid."""
        if not isinstance(backend, SupportsPeek):
            _missing(backend, "SupportsPeek", "peek")
        viewer = backend

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            assert await viewer.peek(ns, "absent") is None
            await viewer.set(ns, "k", b"v", 60, ["b", "a"])
            await viewer.set(ns, "forever", b"f", None, [])
            info = await viewer.peek(ns, "k")
            assert info is not None
            assert info.payload == b"v"
            assert info.ttl is not None
            assert 30 < info.ttl <= 60
            assert info.tags == ("b", "a")
            assert info.valid is True
            forever = await viewer.peek(ns, "forever")
            assert forever is not None
            assert forever.ttl is None
            assert forever.tags == ()
            assert forever.valid is True
            await viewer.invalidate(ns, ["a"])
            stale = await viewer.peek(ns, "k")
            assert stale is not None
            assert stale.valid is False
            assert stale.payload == b"v"
            assert await viewer.get(ns, "k") is None

        _run(backend, scenario)

    def test_keys_lists_matching_keys_of_its_namespace(self, backend: Backend) -> None:
        """``keys`` (SupportsKeys) lists stored keys of one namespace matching a glob, up to a limit."""
        if not isinstance(backend, SupportsKeys):
            _missing(backend, "SupportsKeys", "keys")
        lister = backend

        async def scenario(new_ns: _Namespaces) -> None:
            ns, other = new_ns(), new_ns()
            for key in ("a:1", "a:2", "b:1", "a:*", "ключ:1"):
                await lister.set(ns, key, b"v", 60, ["t"])
            await lister.set(other, "a:9", b"v", 60, ["t"])
            await lister.fetch(ns, "a:leased", ["t"], LEASE_TTL)  # a lease is not an entry
            assert sorted(await lister.keys(ns, "*", None)) == sorted(["a:1", "a:2", "b:1", "a:*", "ключ:1"])
            assert sorted(await lister.keys(ns, "a:*", None)) == ["a:*", "a:1", "a:2"]
            assert await lister.keys(ns, glob_escape("a:*"), None) == ["a:*"]
            assert await lister.keys(ns, "a:[12]", None) in (["a:1", "a:2"], ["a:2", "a:1"])
            assert await lister.keys(ns, "ключ:?", None) == ["ключ:1"]
            limited = await lister.keys(ns, "*", 2)
            assert len(limited) == 2
            assert set(limited) <= {"a:1", "a:2", "b:1", "a:*", "ключ:1"}
            assert await lister.keys(ns, "*", 0) == []
            assert await lister.keys(ns, "nothing:*", None) == []
            assert await lister.keys(other, "*", None) == ["a:9"]
            assert await lister.keys(new_ns(), "*", None) == []

        _run(backend, scenario)

    def test_info_returns_backend_info(self, backend: Backend) -> None:
        """``info`` (SupportsInfo) returns a ``BackendInfo`` whose figures are numbers or ``None``."""
        if not isinstance(backend, SupportsInfo):
            _missing(backend, "SupportsInfo", "info")
        reporter = backend

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            await reporter.set(ns, "k", b"v", 60, ["t"])
            info = await reporter.info()
            assert isinstance(info, BackendInfo)
            for name in ("keys", "memory_bytes", "evictions"):
                figure = getattr(info, name)
                assert figure is None or (isinstance(figure, int) and figure >= 0), (name, figure)
            if info.keys is not None:
                assert info.keys >= 1
            assert info.entries is None or all(
                isinstance(n, str) and isinstance(c, int) and c >= 0 for n, c in info.entries.items()
            )

        _run(backend, scenario)

    def test_watch_wakes_a_waiter_after_fill(self, backend: Backend) -> None:
        """``watch`` (SupportsWatch): a caller that found the lease held is woken by the holder's fill."""
        if not isinstance(backend, SupportsWatch):
            _missing(backend, "SupportsWatch", "watch")
        watcher = backend

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            held = await watcher.fetch(ns, "k", TAGS, LEASE_TTL)
            assert held.lease is not None
            assert (await watcher.fetch(ns, "k", TAGS, LEASE_TTL)).lease is None  # marks the key
            async with watcher.watch(ns, "k") as watch:
                assert (await watcher.fetch(ns, "k", TAGS, LEASE_TTL)).lease is None
                assert await watch.wait(0.05) is False  # nothing happened yet
                waiting = asyncio.ensure_future(watch.wait(PATIENCE))
                assert await watcher.fill(ns, "k", b"v", 60, TAGS, held.tokens, held.lease) is True
                assert await asyncio.wait_for(waiting, PATIENCE + 1) is True, "the fill did not wake"
            assert (await watcher.fetch(ns, "k", TAGS, LEASE_TTL)).payload == b"v"

        _run(backend, scenario)

    def test_watch_wakes_a_waiter_after_release(self, backend: Backend) -> None:
        """``watch`` (SupportsWatch): a caller that found the lease held is woken when it is released."""
        if not isinstance(backend, SupportsWatch):
            _missing(backend, "SupportsWatch", "watch")
        watcher = backend

        async def scenario(new_ns: _Namespaces) -> None:
            ns = new_ns()
            held = await watcher.fetch(ns, "k", TAGS, LEASE_TTL)
            assert held.lease is not None
            assert (await watcher.fetch(ns, "k", TAGS, LEASE_TTL)).lease is None  # marks the key
            async with watcher.watch(ns, "k") as watch:
                assert (await watcher.fetch(ns, "k", TAGS, LEASE_TTL)).lease is None
                waiting = asyncio.ensure_future(watch.wait(PATIENCE))
                await watcher.release(ns, "k", held.lease)
                assert await asyncio.wait_for(waiting, PATIENCE + 1) is True, "the release did not wake"
            after = await watcher.fetch(ns, "k", TAGS, LEASE_TTL)
            assert after.payload is None
            assert after.lease is not None

        _run(backend, scenario)

    # ------------------------------------------------------------ through tagcache.Cache

    def test_cache_get_or_set_loads_once_then_hits(self, backend: Backend) -> None:
        """``Cache.get_or_set`` loads a value once, then hits until its tag is invalidated."""

        async def scenario(new_ns: _Namespaces) -> None:
            cache = Cache(backend, namespace=_namespace(), owns_backend=True, fail_open=False)
            loads = 0

            async def load() -> dict[str, int]:
                nonlocal loads
                loads += 1
                return {"id": 1, "load": loads}

            try:
                assert await cache.get_or_set("k", load, ttl=60, tags=["t"]) == {"id": 1, "load": 1}
                assert await cache.get_or_set("k", load, ttl=60, tags=["t"]) == {"id": 1, "load": 1}
                assert loads == 1
                assert await cache.get("k") == {"id": 1, "load": 1}
                await cache.invalidate_tags(["t"])
                assert await cache.get_or_set("k", load, ttl=60, tags=["t"]) == {"id": 1, "load": 2}
                assert loads == 2
            finally:
                await cache.clear()
                await cache.aclose()

        _run(backend, scenario)

    def test_cache_invalidation_during_a_load_is_not_overwritten(self, backend: Backend) -> None:
        """A value loaded before an invalidation of its tag is returned to its caller but never stored."""

        async def scenario(new_ns: _Namespaces) -> None:
            cache = Cache(backend, namespace=_namespace(), owns_backend=True, fail_open=False)
            source = {"value": "old"}
            started, gate = asyncio.Event(), asyncio.Event()

            async def slow_load() -> str:
                value = source["value"]  # read the source ...
                started.set()
                await gate.wait()  # ... and take a while to return
                return value

            async def load() -> str:
                return source["value"]

            try:
                task = asyncio.ensure_future(cache.get_or_set("k", slow_load, ttl=60, tags=["t"]))
                await asyncio.wait_for(started.wait(), PATIENCE)
                source["value"] = "new"
                await cache.invalidate_tags(["t"])
                gate.set()
                assert await asyncio.wait_for(task, PATIENCE) == "old"
                assert await cache.get("k") is None, "a value read before an invalidation was stored"
                assert await cache.get_or_set("k", load, ttl=60, tags=["t"]) == "new"
            finally:
                await cache.clear()
                await cache.aclose()

        _run(backend, scenario)

    def test_cache_concurrent_get_or_set_share_one_load(self, backend: Backend) -> None:
        """Concurrent ``Cache.get_or_set`` calls of one missing key run its loader once; all get the value."""
        callers = 20

        async def scenario(new_ns: _Namespaces) -> None:
            fetched = _count_calls(backend, "fetch")  # before the cache is built: it may keep the method
            cache = Cache(backend, namespace=_namespace(), owns_backend=True, fail_open=False)
            started, gate = asyncio.Event(), asyncio.Event()
            loads = 0

            async def slow() -> dict[str, int]:
                nonlocal loads
                loads += 1
                started.set()
                await gate.wait()
                return {"n": 1}

            try:
                everyone = asyncio.gather(*(cache.get_or_set("k", slow, tags=["t"]) for _ in range(callers)))
                await asyncio.wait_for(started.wait(), PATIENCE)
                if fetched is not None:
                    await fetched.reach(callers)  # every caller missed while the load was running
                gate.set()
                results = await asyncio.wait_for(everyone, PATIENCE)
                assert loads == 1
                assert results == [{"n": 1}] * callers
                assert await cache.get("k") == {"n": 1}
            finally:
                gate.set()
                await cache.clear()
                await cache.aclose()

        _run(backend, scenario)
