"""tagcache in a few lines: python examples/minimal.py [CACHE_URL]   (default memory://)"""

import asyncio
import sys

from tagcache import Cache

cache = Cache.from_url(sys.argv[1] if len(sys.argv) > 1 else "memory://", namespace="minimal")
database = {42: {"name": "Ada"}}  # stands in for a real one
loads = 0


@cache.cached(ttl=600, tags=["users", "user:{user_id}"])
async def get_user(user_id: int) -> dict[str, str]:
    global loads
    loads += 1
    return dict(database[user_id])


async def main() -> None:
    print("first call: ", await get_user(42), f"(loaded from the database: {loads})")
    print("second call:", await get_user(42), f"(a hit: still {loads} load)")
    database[42]["name"] = "Ada Lovelace"  # a write...
    await cache.invalidate_tags(["user:42"])  # ...then invalidate what shows it
    print("after write:", await get_user(42), f"(reloaded: {loads} loads)")
    stats = await cache.stats()
    print(f"hits {stats.hits}, misses {stats.misses}, hit ratio {stats.hit_ratio:.0%}")
    await cache.clear()  # only this example's namespace
    await cache.aclose()


asyncio.run(main())
