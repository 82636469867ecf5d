"""The ``tagcache`` command line (``tagcache.cli``), against a real Redis.

``main([...])`` runs in process (it starts its own event loop, so these tests
are synchronous); a few tests run ``python -m tagcache`` and the installed
``tagcache`` script as subprocesses to prove the entry points.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tagcache import Cache
from tagcache.backends.feed import DEFAULT_CHANNEL
from tagcache.cli import EXIT_ABSENT, build_parser, main

from tests.conftest import unique_namespace

pytestmark = pytest.mark.redis

SECRET = "s3cr3t-pw"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


# ---------------------------------------------------------------------- helpers


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _seed(url: str, namespace: str, entries: dict[str, tuple[Any, list[str]]]) -> None:
    async with Cache.from_url(url, namespace=namespace) as cache:
        for key, (value, tags) in entries.items():
            await cache.set(key, value, ttl=300, tags=tags)


async def _get(url: str, namespace: str, key: str) -> Any:
    async with Cache.from_url(url, namespace=namespace) as cache:
        return await cache.get(key, "<miss>")


async def _keys(url: str, namespace: str) -> list[str]:
    async with Cache.from_url(url, namespace=namespace) as cache:
        return sorted(await cache.keys("*", limit=None))


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAGCACHE_URL", raising=False)
    monkeypatch.delenv("TAGCACHE_NAMESPACE", raising=False)


@pytest.fixture
def ns(redis_url: str) -> Iterator[str]:
    """A fresh namespace, cleared after the test."""
    name = unique_namespace("cli")
    yield name
    run(_clear(redis_url, name))


async def _clear(url: str, namespace: str) -> None:
    async with Cache.from_url(url, namespace=namespace) as cache:
        await cache.clear()


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[Any]:
    """A plain redis-py client on the same database (for keys tagcache did not write)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def cli(url: str, namespace: str, *args: str) -> int:
    return main(["--url", url, "--namespace", namespace, *args])


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (in the backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


# ---------------------------------------------------------------------- stats


def test_stats_text(redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(_seed(redis_url, ns, {"a": (1, [])}))
    assert cli(redis_url, ns, "stats") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert re.search(rf"^namespace\s+{re.escape(ns)}$", out, re.M)
    assert re.search(r"^server keys\s+\d+", out, re.M)
    assert re.search(r"^redis version\s+\d", out, re.M)


def test_stats_json(redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(redis_url, ns, "stats", "--json") == 0  # --json after the command works too
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["namespace"] == ns
    assert isinstance(doc["server_keys"], int)
    assert {"hits", "misses", "memory_bytes", "evictions", "backend", "health"} <= doc.keys()
    assert err == ""


def test_env_vars_give_url_and_namespace(
    redis_url: str, ns: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TAGCACHE_URL", redis_url)
    monkeypatch.setenv("TAGCACHE_NAMESPACE", ns)
    assert main(["--json", "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["namespace"] == ns


# ---------------------------------------------------------------------- invalidate


def test_invalidate_makes_entries_miss(redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(_seed(redis_url, ns, {"p:1": ("one", ["products", "p:1"]), "u:1": ("ada", ["users"])}))
    assert cli(redis_url, ns, "invalidate", "products", "p:2") == 0
    out, err = capsys.readouterr()
    assert "invalidated 2 tags" in out and "p:2, products" in out
    assert err == ""
    assert run(_get(redis_url, ns, "p:1")) == "<miss>"
    assert run(_get(redis_url, ns, "u:1")) == "ada"

    assert cli(redis_url, ns, "--json", "invalidate", "users", "users") == 0
    assert json.loads(capsys.readouterr().out) == {"namespace": ns, "invalidated": ["users"]}
    assert run(_get(redis_url, ns, "u:1")) == "<miss>"


def test_invalidate_more_tags_than_one_call_takes(
    redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(_seed(redis_url, ns, {"k": ("v", ["t:99"])}))
    tags = [f"t:{i}" for i in range(100)]
    assert cli(redis_url, ns, "--json", "invalidate", *tags) == 0
    assert len(json.loads(capsys.readouterr().out)["invalidated"]) == 100
    assert run(_get(redis_url, ns, "k")) == "<miss>"


@pytest.mark.parametrize("bad", ["", "bad\ntag", "x" * 300])
def test_invalid_tag_is_refused_and_nothing_changes(
    redis_url: str, ns: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(_seed(redis_url, ns, {"p:1": ("one", ["products"])}))
    assert cli(redis_url, ns, "invalidate", "products", bad) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "invalid tag" in err and repr(bad)[:20] in err and "nothing was invalidated" in err
    assert run(_get(redis_url, ns, "p:1")) == "one"


def test_invalidate_tells_the_applications_l1(redis_url: str, ns: str) -> None:
    """invalidate publishes the change, so applications' LocalCache copies drop it at once."""
    import redis

    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(DEFAULT_CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        assert cli(redis_url, ns, "invalidate", "users") == 0
        while True:  # the channel is shared: skip other tests' messages
            message = pubsub.get_message(timeout=5)
            assert message is not None, "no change message published"
            body = json.loads(message["data"])
            if body.get("n") == ns:
                break
        assert body["t"] == ["users"]
    finally:
        pubsub.close()
        client.close()


# ---------------------------------------------------------------------- keys


def test_keys_pattern_and_limit(redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(_seed(redis_url, ns, {**{f"user:{i}": (i, []) for i in range(5)}, "order:1": (1, [])}))
    assert cli(redis_url, ns, "keys", "user:*") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"user:{i}" for i in range(5)]
    assert err == ""

    assert cli(redis_url, ns, "keys") == 0
    assert len(capsys.readouterr().out.splitlines()) == 6

    assert cli(redis_url, ns, "keys", "user:*", "--limit", "2") == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2
    assert "--limit 2" in err

    assert cli(redis_url, ns, "--json", "keys", "user:*", "--limit", "2") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["truncated"] is True and len(doc["keys"]) == 2 and doc["limit"] == 2

    assert cli(redis_url, ns, "--json", "keys", "user:*", "--limit", "5") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["truncated"] is False and doc["keys"] == [f"user:{i}" for i in range(5)]

    assert cli(redis_url, ns, "keys", "nothing:*") == 0
    out, err = capsys.readouterr()
    assert out == "" and "no key matches" in err


@pytest.mark.parametrize("limit", ["0", "-1", "many"])
def test_keys_limit_must_be_positive(
    redis_url: str, ns: str, limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(redis_url, ns, "keys", "--limit", limit) == 2
    assert "--limit" in capsys.readouterr().err


# ---------------------------------------------------------------------- peek


def test_peek_present(redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(_seed(redis_url, ns, {"user:1": ({"name": "Ada", "ids": (1, 2)}, ["users", "user:1"])}))
    assert cli(redis_url, ns, "peek", "user:1") == 0
    out, _ = capsys.readouterr()
    assert re.search(r"^valid\s+yes$", out, re.M)
    assert re.search(r"^tags\s+user:1, users$", out, re.M)
    assert re.search(r"^ttl\s+\d+ s", out, re.M)
    assert '"name": "Ada"' in out

    assert cli(redis_url, ns, "--json", "peek", "user:1") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["found"] is True and doc["valid"] is True
    assert doc["value"] == {"name": "Ada", "ids": [1, 2]}
    assert doc["tags"] == ["user:1", "users"]
    assert 0 < doc["ttl"] <= 300

    # After an invalidation the entry is still there, but not valid.
    assert cli(redis_url, ns, "invalidate", "users") == 0
    capsys.readouterr()
    assert cli(redis_url, ns, "--json", "peek", "user:1") == 0
    assert json.loads(capsys.readouterr().out)["valid"] is False


def test_peek_absent(redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(redis_url, ns, "peek", "nope") == EXIT_ABSENT
    out, err = capsys.readouterr()
    assert out == "" and "no entry 'nope'" in err
    assert cli(redis_url, ns, "--json", "peek", "nope") == EXIT_ABSENT
    assert json.loads(capsys.readouterr().out) == {"namespace": ns, "key": "nope", "found": False}


def test_peek_invalid_key_is_a_usage_error(
    redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(redis_url, ns, "peek", "a\x00b") == 2
    assert "invalid key" in capsys.readouterr().err


# ---------------------------------------------------------------------- clear and the namespace


def test_clear_without_yes_refuses_and_touches_nothing(
    redis_url: str, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(_seed(redis_url, ns, {"a": (1, []), "b": (2, [])}))
    assert cli(redis_url, ns, "clear") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "--yes" in err and repr(ns) in err and "nothing was changed" in err
    assert run(_keys(redis_url, ns)) == ["a", "b"]


def test_clear_and_invalidate_never_leave_the_namespace(
    redis_url: str, ns: str, raw_redis: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    other = unique_namespace("cli-other")
    foreign = f"not-tagcache:{ns}"
    try:
        run(_seed(redis_url, ns, {"a": (1, ["shared"]), "b": (2, ["shared"])}))
        run(_seed(redis_url, other, {"a": ("kept", ["shared"]), "c": ("kept", [])}))
        raw_redis.set(foreign, b"kept")

        assert cli(redis_url, ns, "invalidate", "shared") == 0
        assert run(_get(redis_url, ns, "a")) == "<miss>"
        assert run(_get(redis_url, other, "a")) == "kept"  # same tag, other namespace: valid

        assert cli(redis_url, ns, "clear", "--yes") == 0
        out, _ = capsys.readouterr()
        assert f"cleared namespace {ns!r}" in out
        assert run(_keys(redis_url, ns)) == []
        assert run(_keys(redis_url, other)) == ["a", "c"]
        assert run(_get(redis_url, other, "c")) == "kept"
        assert raw_redis.get(foreign) == b"kept"

        run(_seed(redis_url, ns, {"x": (1, [])}))
        assert cli(redis_url, ns, "clear", "--yes", "--json") == 0
        assert json.loads(capsys.readouterr().out) == {"namespace": ns, "cleared": 1}
        assert run(_keys(redis_url, other)) == ["a", "c"]
    finally:
        raw_redis.delete(foreign)
        run(_clear(redis_url, other))


# ---------------------------------------------------------------------- usage errors


def test_missing_url_and_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats"]) == 2
    err = capsys.readouterr().err
    assert "--url" in err and "TAGCACHE_URL" in err
    assert "--namespace" in err and "TAGCACHE_NAMESPACE" in err

    assert main(["--namespace", "app", "stats"]) == 2
    err = capsys.readouterr().err
    assert "--url" in err and "TAGCACHE_URL" in err and "TAGCACHE_NAMESPACE" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "memcached://h", "--namespace", "app", "stats"], "unknown cache URL scheme"),
        (["--url", "memory://", "--namespace", "bad name", "stats"], "namespace 'bad name' is invalid"),
        (["--url", "memory://", "--namespace", "app", "frobnicate"], "invalid choice"),
        (["--url", "memory://", "--namespace", "app"], "required"),
        (["--url", "memory://", "--namespace", "app", "invalidate"], "TAG"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "invalidate" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("tagcache ")


def test_memory_url_warns_that_it_sees_an_empty_cache(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "memory://", "--namespace", "app", "keys"]) == 0
    err = capsys.readouterr().err
    assert "memory://" in err and "empty cache" in err


# ---------------------------------------------------------------------- failures and secrets

COMMANDS = [["stats"], ["keys"], ["peek", "k"], ["invalidate", "t"], ["clear", "--yes"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_unreachable_server_fails_fast(
    closed_port: int, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{closed_port}/0"
    started = time.monotonic()
    assert cli(url, "app", "--json", *command) == 1
    assert time.monotonic() - started < 2.0
    out, err = capsys.readouterr()
    assert out == ""
    assert f"tagcache: cannot reach redis://:***@127.0.0.1:{closed_port}/0: " in err
    assert SECRET not in err


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_silent_server_fails_within_seconds(
    silent_port: int, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that accepts connections and never answers: bounded by the socket timeout
    (0.5 s per round trip; invalidate also publishes and re-applies once before giving up)."""
    started = time.monotonic()
    assert cli(f"redis://127.0.0.1:{silent_port}/0", "app", *command) == 1
    assert time.monotonic() - started < 3.5
    err = capsys.readouterr().err
    assert "cannot reach" in err and "Timeout" in err


def test_password_is_masked_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused clear: the URL is echoed, without its password.
    assert main(["--url", f"redis://user:{SECRET}@127.0.0.1:1/0", "--namespace", "app", "clear"]) == 2
    err = capsys.readouterr().err
    assert "redis://user:***@127.0.0.1:1/0" in err and SECRET not in err
    # A configuration error quoting the URL; a password in the query string.
    for url in (f"bogus://:{SECRET}@host/0", f"redis://host:1/0?password={SECRET}&socket_timeout=x"):
        assert main(["--url", url, "--namespace", "app", "keys"]) == 2
        err = capsys.readouterr().err
        assert err and SECRET not in err and "***" in err


# ---------------------------------------------------------------------- entry points


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGCACHE_")}
    env["PYTHONWARNINGS"] = "error::RuntimeWarning"
    return env


def test_python_dash_m(redis_url: str, ns: str) -> None:
    run(_seed(redis_url, ns, {"user:1": ("ada", ["users"])}))
    done = subprocess.run(
        [sys.executable, "-m", "tagcache", "--url", redis_url, "--namespace", ns, "--json", "keys"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["keys"] == ["user:1"]

    done = subprocess.run(
        [sys.executable, "-m", "tagcache", "--namespace", ns, "clear"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )
    assert done.returncode == 2 and "TAGCACHE_URL" in done.stderr


def test_installed_script(redis_url: str, ns: str) -> None:
    script = Path(sys.executable).parent / ("tagcache.exe" if os.name == "nt" else "tagcache")
    if not script.exists():
        pytest.skip(f"no tagcache script next to {sys.executable} (reinstall the package to create it)")
    env = {**_env(), "TAGCACHE_URL": redis_url, "TAGCACHE_NAMESPACE": ns}
    done = subprocess.run(
        [str(script), "--json", "stats"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["namespace"] == ns


def test_declared_script_is_main() -> None:
    """pyproject.toml's ``tagcache`` script points at ``tagcache.cli:main``."""
    import importlib

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    target = re.search(r'^tagcache\s*=\s*"([^"]+)"', pyproject, re.M)
    assert target is not None
    module, _, name = target.group(1).partition(":")
    assert getattr(importlib.import_module(module), name) is main


# ---------------------------------------------------------------------- the docs


def test_docs_command_lines_parse() -> None:
    """Every ``$ tagcache ...`` line of docs/cli.md is a valid command line."""
    import shlex

    text = DOCS.read_text(encoding="utf-8")
    lines = [
        line[2:]
        for block in re.findall(r"```console\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.startswith(("$ tagcache ", "$ python -m tagcache "))
    ]
    assert len(lines) >= 8
    parser = build_parser()
    for line in lines:
        words = shlex.split(line)
        words = words[3:] if words[0] == "python" else words[1:]
        args = parser.parse_args(words)
        assert args.command in {"stats", "invalidate", "keys", "peek", "clear"}, line


# ---------------------------------------------------------------------- Redis Cluster


def test_redis_cluster_url(redis_cluster_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The verbs work on a cluster namespace spread over every primary's buckets."""
    ns = unique_namespace("cli-cluster")
    other = unique_namespace("cli-cluster")
    run(_seed(redis_cluster_url, ns, {f"user:{i}": (i, ["users"]) for i in range(20)}))
    run(_seed(redis_cluster_url, other, {"user:1": ("kept", ["users"])}))
    try:
        assert cli(redis_cluster_url, ns, "--json", "keys", "user:*") == 0
        assert len(json.loads(capsys.readouterr().out)["keys"]) == 20
        assert cli(redis_cluster_url, ns, "peek", "user:3") == 0
        assert cli(redis_cluster_url, ns, "invalidate", "users") == 0
        capsys.readouterr()
        assert cli(redis_cluster_url, ns, "--json", "peek", "user:3") == 0
        assert json.loads(capsys.readouterr().out)["valid"] is False
        assert cli(redis_cluster_url, ns, "--json", "clear", "--yes") == 0
        assert json.loads(capsys.readouterr().out) == {"namespace": ns, "cleared": 20}
        assert run(_keys(redis_cluster_url, ns)) == []
        assert run(_get(redis_cluster_url, other, "user:1")) == "kept"
        assert cli(redis_cluster_url, ns, "stats") == 0
    finally:
        run(_clear(redis_cluster_url, ns))
        run(_clear(redis_cluster_url, other))
