"""The shipped backend contract (:class:`tagcache.contract.BackendContract`).

It runs here over the memory backend, RedisBackend on real Redis and
RedisBackend on fakeredis; then as a user runs it (a test module of their own,
in a pytest subprocess without the asyncio plugin): it passes for
MemoryBackend, fails for a broken backend, and skips the capability tests of
a backend with only the core operations.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from tagcache.backends import (
    Backend,
    Lookup,
    MemoryBackend,
    SupportsInfo,
    SupportsKeys,
    SupportsPeek,
    SupportsWatch,
)
from tagcache.backends.redis import RedisBackend
from tagcache.contract import BackendContract

#: The contract's tests of optional capabilities (skipped for a backend without them).
CAPABILITY_TESTS = (
    "test_peek_shows_payload_ttl_tags_and_validity",
    "test_keys_lists_matching_keys_of_its_namespace",
    "test_info_returns_backend_info",
    "test_watch_wakes_a_waiter_after_fill",
    "test_watch_wakes_a_waiter_after_release",
)
CONTRACT_TESTS = sorted(name for name in dir(BackendContract) if name.startswith("test_"))


# ---------------------------------------------------------------- the contract over the shipped backends


class TestMemoryBackendContract(BackendContract):
    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend()


@pytest.mark.redis
class TestRedisBackendContract(BackendContract):
    @pytest.fixture
    def backend(self, redis_url: str) -> RedisBackend:
        # A loaded machine must not turn a slow reply into a failed test.
        return RedisBackend.from_url(redis_url, socket_timeout=5.0)


class TestFakeRedisBackendContract(BackendContract):
    @pytest.fixture
    def backend(self) -> RedisBackend:
        import fakeredis

        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=7))
        return RedisBackend(client, owns_client=True)


# ---------------------------------------------------------------- as a user runs it


def run_pytest(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    """Write ``source`` as a test module in ``tmp_path`` and run pytest on it as a user would,
    without the asyncio plugin; return the process and the summary's counts."""
    module = tmp_path / "test_user_backend.py"
    module.write_text(textwrap.dedent(source))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "no:asyncio",
            "-p",
            "no:cacheprovider",
            str(module),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    return proc, counts


def outcomes(proc: subprocess.CompletedProcess[str], outcome: str) -> set[str]:
    """Names of the tests the ``-rA`` summary reports with ``outcome`` (``PASSED``, ``FAILED``, ...)."""
    found = set()
    for line in proc.stdout.splitlines():
        if line.startswith(outcome + " "):
            match = re.search(r"::(test_\w+)", line)
            if match:
                found.add(match.group(1))
    return found


def test_contract_has_tests() -> None:
    assert len(CONTRACT_TESTS) >= 30
    assert set(CAPABILITY_TESTS) <= set(CONTRACT_TESTS)


def test_a_user_runs_the_contract_over_memory_backend(tmp_path: Path) -> None:
    proc, counts = run_pytest(
        tmp_path,
        """
        import pytest

        from tagcache.backends import MemoryBackend
        from tagcache.contract import BackendContract


        class TestMyBackend(BackendContract):
            @pytest.fixture
            def backend(self):
                return MemoryBackend()
        """,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert counts.get("passed") == len(CONTRACT_TESTS), output
    assert counts.get("skipped", 0) == 0, output  # MemoryBackend has every capability
    assert outcomes(proc, "PASSED") == set(CONTRACT_TESTS), output


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (
            # fill stores whatever the snapshot tokens say: the stale-read guarantee is gone
            """
            async def fill(self, ns, key, payload, ttl, tags, tokens, lease, epoch=None):
                await self.release(ns, key, lease)
                await self.set(ns, key, payload, ttl, tags)
                return True
            """,
            "fill",
        ),
        (
            """
            async def invalidate(self, ns, tags):
                pass
            """,
            "invalidat",
        ),
    ],
    ids=["fill-ignores-tokens", "invalidate-does-nothing"],
)
def test_the_contract_fails_a_broken_backend(tmp_path: Path, breakage: str, expected: str) -> None:
    proc, counts = run_pytest(
        tmp_path,
        """
        import pytest

        from tagcache.backends import MemoryBackend
        from tagcache.contract import BackendContract


        class BrokenBackend(MemoryBackend):
        """
        + textwrap.indent(textwrap.dedent(breakage), " " * 12)
        + """

        class TestBrokenBackend(BackendContract):
            @pytest.fixture
            def backend(self):
                return BrokenBackend()
        """,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output  # tests failed (not a usage or collection error)
    failed = outcomes(proc, "FAILED")
    assert failed, output
    assert counts.get("failed") == len(failed), output
    assert any(expected in name for name in failed), failed
    assert counts.get("passed", 0) + len(failed) == len(CONTRACT_TESTS), output


class CoreOnly:
    """A backend with only the core operations of ``Backend``, delegating to a MemoryBackend."""

    def __init__(self) -> None:
        self._inner = MemoryBackend()

    async def get(self, ns: str, key: str) -> bytes | None:
        return await self._inner.get(ns, key)

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        return await self._inner.fetch(ns, key, tags, lease_ttl)

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        return await self._inner.lease(ns, key, tags, lease_ttl)

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        await self._inner.set(ns, key, payload, ttl, tags)

    async def fill(
        self,
        ns: str,
        key: str,
        payload: bytes,
        ttl: float | None,
        tags: Sequence[str],
        tokens: Sequence[str],
        lease: str,
        epoch: str | None = None,
    ) -> bool:
        return await self._inner.fill(ns, key, payload, ttl, tags, tokens, lease, epoch)

    async def release(self, ns: str, key: str, lease: str) -> None:
        await self._inner.release(ns, key, lease)

    async def delete(self, ns: str, key: str) -> bool:
        return await self._inner.delete(ns, key)

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        await self._inner.invalidate(ns, tags)

    async def clear(self, ns: str) -> int:
        return await self._inner.clear(ns)

    async def aclose(self) -> None:
        await self._inner.aclose()


def test_a_core_only_backend_is_a_backend_without_capabilities() -> None:
    core = CoreOnly()
    assert isinstance(core, Backend)
    for capability in (SupportsPeek, SupportsKeys, SupportsInfo, SupportsWatch):
        assert not isinstance(core, capability), capability.__name__
    asyncio.run(core.aclose())


def test_the_contract_skips_capability_tests_of_a_core_only_backend(tmp_path: Path) -> None:
    header = """
        from collections.abc import Sequence

        import pytest

        from tagcache.backends import Lookup, MemoryBackend
        from tagcache.contract import BackendContract


    """
    footer = """

        class TestCoreOnly(BackendContract):
            @pytest.fixture
            def backend(self):
                return CoreOnly()
    """
    source = textwrap.dedent(header) + inspect.getsource(CoreOnly) + textwrap.dedent(footer)
    proc, counts = run_pytest(tmp_path, source)
    output = proc.stdout + proc.stderr
    # -rA reports skips by reason, merging equal ones: "SKIPPED [2] path:line: reason".
    missing: dict[str, int] = {}
    for n, capability in re.findall(
        r"^SKIPPED \[(\d+)\] .*lacks the optional capability (\w+)", proc.stdout, re.M
    ):
        missing[capability] = missing.get(capability, 0) + int(n)
    assert missing == {"SupportsPeek": 1, "SupportsKeys": 1, "SupportsInfo": 1, "SupportsWatch": 2}, output
    assert counts.get("skipped") == len(CAPABILITY_TESTS), output
    assert proc.returncode == 0, output
    assert counts.get("passed") == len(CONTRACT_TESTS) - len(CAPABILITY_TESTS), output
