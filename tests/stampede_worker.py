"""One "process" of the cross-process stampede tests: N concurrent callers of one
decorated function on a cold key. Run as ``python -m tests.stampede_worker``.

The test drives it through stdin and stdout, one line at a time:

* it prints ``ready`` once connected (scripts loaded), then waits for ``go``;
* with ``--hold``, the function prints ``computing`` once it runs (this process
  holds the key's lease) and returns only after ``finish``; otherwise it takes
  ``--delay`` seconds;
* it prints ``waiting`` once all its callers wait for another process's value;
* it prints the results its callers got as one JSON line, last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import redis.asyncio as redis

from tagcache import Cache
from tagcache.backends import RedisBackend


def say(line: str) -> None:
    print(line, flush=True)


async def hear(expected: str) -> None:
    line = (await asyncio.to_thread(sys.stdin.readline)).strip()
    if line != expected:
        raise SystemExit(f"expected {expected!r} on stdin, got {line!r}")


def count_waiting(backend: Any, callers: int) -> None:
    """Print ``waiting`` once ``callers`` callers wait for a fill (``watch`` wrapped on this instance)."""
    original = backend.watch
    waiting = 0

    class Counted:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __aenter__(self) -> Counted:
            await self.inner.__aenter__()
            return self

        async def __aexit__(self, *exc_info: Any) -> None:
            await self.inner.__aexit__(*exc_info)

        async def wait(self, timeout: float) -> bool:
            nonlocal waiting
            waiting += 1
            if waiting == callers:
                say("waiting")
            return bool(await self.inner.wait(timeout))

    def watch(ns: str, key: str) -> Counted:
        return Counted(original(ns, key))

    backend.watch = watch


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("--callers", type=int, default=250)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds the function takes")
    parser.add_argument("--hold", action="store_true", help="the function returns when told to finish")
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    args = parser.parse_args()

    client = redis.Redis.from_url(args.url)
    counter = f"stampede:{args.namespace}:calls"
    # Hundreds of callers in each of several processes on a loaded machine: a reply
    # may take longer than the production default of 0.5 s, and no test here is about that.
    backend = RedisBackend.from_url(args.url, socket_timeout=5.0)
    count_waiting(backend, args.callers)
    async with Cache(backend, namespace=args.namespace, lease_ttl=args.lease_ttl) as cache:

        @cache.cached(ttl=60, tags=["stampede"])
        async def load(item: int) -> dict[str, int]:
            calls = await client.incr(counter)
            if args.hold:
                say("computing")
                await hear("finish")
            else:
                await asyncio.sleep(args.delay)
            return {"item": item, "call": int(calls)}

        await cache.get("warm-up")  # connect and load scripts before the start
        say("ready")
        await hear("go")
        results = await asyncio.gather(*(load(1) for _ in range(args.callers)))
    await client.aclose()
    say(json.dumps({"results": results}))


if __name__ == "__main__":
    asyncio.run(main())
