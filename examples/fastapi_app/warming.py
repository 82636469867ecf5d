"""Start-up and periodic cache warming.

At start-up (``Settings.warm_all``, on by default) the pages of every user are
warmed: their user page, their project pages and the owner summaries those show.
A service that has been running for a while has these pages cached; without
warming, a fresh process (or a flushed cache) answers the first read of every page
from the database, and under a long-tailed popularity most pages are read for
the first time long after start-up. Then every ten minutes the pages of the
``Settings.warm_users`` most recently active users are refreshed (their entries
live ``default_ttl``, ten minutes).

Cost: users are warmed ``BATCH`` at a time in one session, with
``asyncio.gather(*(get_user_page.refresh(session, uid) for uid in batch))`` and then
the same for their project pages (whose owner summaries, another cached function,
fill on the way). The functions' bodies read through the session's batching loader
(:mod:`.loader`), so a batch of 500 users costs a handful of statements (the batch's
ids, the users, their projects, the owners of the project pages) instead of two per
page: about 110 statements for 10,000 users and 40,000 entries. What remains is the
cache's own work per entry (key, lease, encoding, compare-and-set fill), about
0.3 ms on memory:// and 0.6 ms on Redis here: 12 s and 24 s for 10,000 users.

Why this never stores a page older than a write that returned:

1. ``refresh`` takes the key's snapshot of its tag tokens (and the key's lease)
   *before* it calls the function (``ReadThrough.recompute``: ``backend.lease``,
   then the loader, then the compare-and-set ``fill``).
2. A function asks the loader for its rows only after its snapshot returned, and
   the loader closes a batch before sending its query: every key in a batch took its
   snapshot before the database read that answers it.
3. A write commits, then invalidates its tags (``services``). If that invalidation
   lands after a key's snapshot, the key's ``fill`` compares the tokens and refuses
   the value: nothing is stored. If it landed before the snapshot, the write had
   committed before the read: the value shows it. (A batch of one id reads through
   the query cache, whose entries over the written rows are invalidated before the
   write's ``commit()`` returns: an entry it finds was read after that commit.)

So a write interleaved anywhere with a batch leaves either a fresh page or no page
(``tests/test_examples.py::test_warming_never_stores_a_page_older_than_a_write``).

An ``AsyncSession`` must not be used concurrently: the callers of one batch only
wait on futures, and the loader runs its queries one at a time under its lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Sequence
from typing import Final, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tagcache import CacheWarmer

from . import services
from .caching import cache
from .db import Database
from .models import User
from .settings import Settings

#: Users warmed per session and per ``gather``: a session holds what it loaded until it closes.
BATCH: Final = 500

T = TypeVar("T")


async def gather_all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await every call concurrently; once all have finished, raise the first error, if any.

    Unlike a plain ``gather``, no call is still running on the session when this
    returns or raises (the session is closed right after).
    """
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]  # no exception among them


async def warm_users(db: Database, user_ids: Sequence[int]) -> None:
    """Refresh the user page, the project pages and the owner summary of ``user_ids``,
    ``BATCH`` users per session."""
    for start in range(0, len(user_ids), BATCH):
        async with db.sessions() as session:
            await _warm_batch(session, user_ids[start : start + BATCH])


async def warm_all_users(db: Database) -> None:
    """:func:`warm_users` for every user, in batches of ids read by keyset pagination
    (one more statement per batch, and no list of every id in memory)."""
    last = 0
    while True:
        async with db.sessions() as session:
            page = select(User.id).where(User.id > last).order_by(User.id).limit(BATCH)
            user_ids = list((await session.execute(page)).scalars())
            if not user_ids:
                return
            await _warm_batch(session, user_ids)
        last = user_ids[-1]


async def _warm_batch(session: AsyncSession, user_ids: Sequence[int]) -> None:
    pages = await gather_all(services.get_user_page.refresh(session, uid) for uid in user_ids)
    # Which project pages to warm comes from the pages just read; each project page
    # reads its own rows after its own snapshot (a project created meanwhile is
    # simply not warmed).
    await gather_all(
        services.get_project_page.refresh(session, page.user.id, project.id)
        for page in pages
        if page is not None
        for project in page.projects
    )


def build_warmer(db: Database, settings: Settings) -> CacheWarmer:
    """A warmer with three jobs: ``all_user_pages`` (start-up only: ``every=None``),
    ``active_user_pages`` and ``user_directory`` (every ten minutes, and at start-up
    too: see :func:`start_up_jobs`)."""
    warmer = CacheWarmer(cache, concurrency=2, run_on_start=False)

    @warmer.job(name="all_user_pages")
    async def all_user_pages() -> None:
        """The pages of every user."""
        await warm_all_users(db)

    @warmer.job(every=600, name="active_user_pages")
    async def active_user_pages() -> None:
        """The pages of the most recently active users."""
        async with db.sessions() as session:
            recent = select(User.id).order_by(User.last_active_at.desc()).limit(settings.warm_users)
            user_ids = list((await session.execute(recent)).scalars())
        await warm_users(db, user_ids)

    @warmer.job(every=600, name="user_directory")
    async def user_directory() -> None:
        """The first pages of the user directory."""
        async with db.sessions() as session:
            for page in range(3):
                await services.list_users(session, offset=page * 20, limit=20)

    return warmer


def start_up_jobs(settings: Settings) -> list[str]:
    """The jobs the lifespan runs before serving: every user's pages (``warm_all``),
    else the recently active users' only."""
    pages = "all_user_pages" if settings.warm_all else "active_user_pages"
    return [pages, "user_directory"]
