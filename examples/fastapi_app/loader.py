"""Per-session batching of the services' reads (the DataLoader pattern).

``loader(session)`` is the :class:`Loader` kept in ``session.info``. Its methods
(``user``, ``projects_of``, ``project``) each ask for one id. The calls made on one
session join the open batch of their kind: its first caller (the batch's leader, in
its own task) lets the event loop run until a tick passes with no new caller, takes
the batch, runs ONE query for all its ids and resolves every caller's future; callers
arriving meanwhile open the next batch. A request asks for one id at a time: a batch
of one runs the same single-row statement as a direct query, through the query cache
(``execution_options=CACHED``). A warming job refreshing the pages of 500 users at
once in one session gets one ``IN (...)`` query per kind of row, without the query
cache (a one-off statement), instead of two statements per page (:mod:`.warming`).

Rules that keep this correct:

* **One statement at a time on the session.** An ``AsyncSession`` must not be used
  concurrently: every batch of every kind runs under the loader's one lock, so only
  one query is ever in flight on the session (the callers only wait on futures).
* **A batch is closed before its query runs.** The ids of a batch are taken, and the
  next caller starts a new batch, before the statement is sent: every caller in a
  batch asked (and, for a cached function's ``refresh``, took its key's snapshot of
  tag tokens) before the database read that answers it.
* **Values, not ORM objects.** The loader selects table columns (``select(users)``,
  not ``select(User)``) and returns pydantic models: nothing goes through the
  session's identity map, where an object loaded earlier in a long warming session
  would keep its old attribute values when its row is read again.

``QUERY_HOOK`` (a context variable, for tests) is awaited before and after each
batched query, to interleave a write with a batch deterministically.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Final, Generic, Literal, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from .models import Project, User
from .schemas import ProjectOut, UserOut

#: Opt a statement into the query cache (sessions of a factory given to
#: ``queries.invalidate_on_commit``; elsewhere the option does nothing).
CACHED: Final[dict[str, Any]] = {"tagcache": True}

#: ``await hook(kind, stage, keys)`` around each batched query: ``kind`` is ``"users"``,
#: ``"projects_of"`` or ``"project"``, ``stage`` ``"before"`` (the batch is closed, the
#: statement not sent) or ``"after"`` (the rows are read, no caller has them yet).
Hook = Callable[[str, Literal["before", "after"], Sequence[Any]], Awaitable[None]]
QUERY_HOOK: Final[ContextVar[Hook | None]] = ContextVar("fastapi_app_query_hook", default=None)

#: Ticks a batch's leader waits for more ids at most (it stops at the first quiet tick).
_GATHER_TICKS: Final = 16
_INFO_KEY: Final = "fastapi_app.loader"

users = User.__table__
projects = Project.__table__

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Batcher(Generic[K, V]):
    """Calls of :meth:`load` gathered into batches, each answered by one ``fetch``.

    ``fetch(keys)`` returns a value for every key it was given (``keys`` holds no
    duplicates; callers asking for the same key in one batch share its value).
    Batches of all the batchers sharing ``lock`` run one at a time.
    """

    def __init__(
        self, kind: str, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], lock: asyncio.Lock
    ) -> None:
        self.kind = kind
        self._fetch = fetch
        self._lock = lock
        #: The open batch: keys asked for since the last batch was taken, with their callers.
        self._pending: dict[K, list[asyncio.Future[V]]] = {}
        #: Whether the open batch has a leader (a caller that will run it).
        self._led = False
        #: Batches handed over by a cancelled leader, running in the background.
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self, key: K) -> V:
        """The value for ``key``, read with the other keys asked for meanwhile."""
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(future)
        if not self._led:
            self._led = True
            await self._lead(future)
        return await future

    async def _lead(self, mine: asyncio.Future[V] | None) -> None:
        """Let the other callers of this tick add their keys, then take the batch and run
        its query under the lock. ``mine``: the leader's own future (``None`` for a leader
        started in the background by :meth:`_hand_over`)."""
        batch = None
        try:
            for _ in range(_GATHER_TICKS):
                size = len(self._pending)
                await asyncio.sleep(0)
                if len(self._pending) == size:  # a quiet tick: everyone has asked
                    break
            async with self._lock:  # one statement at a time on the session
                batch, self._pending = self._pending, {}
                self._led = False  # the next caller opens and leads a new batch
                await self._run(batch)
        except asyncio.CancelledError:
            if mine is not None:
                mine.cancel()
            self._hand_over(batch, give_up=mine is None)
            raise

    def _hand_over(self, batch: dict[K, list[asyncio.Future[V]]] | None, *, give_up: bool) -> None:
        """After a leader was cancelled: the other callers of its batch (not taken yet, or
        taken and interrupted mid-query) wait in the open batch, which gets a leader in
        the background. A background leader cancelled (the loop is shutting down) cancels
        them instead."""
        if batch is None:
            self._led = False  # it led the open batch
        else:
            for key, futures in batch.items():
                waiting = [f for f in futures if not f.done()]
                if waiting:  # read again in a later batch: still after they asked
                    self._pending.setdefault(key, []).extend(waiting)
        if self._led or all(f.done() for fs in self._pending.values() for f in fs):
            return
        if give_up:
            for futures in self._pending.values():
                for future in futures:
                    future.cancel()
            self._pending = {}
            return
        self._led = True
        self._background(self._lead(None))

    async def _run(self, batch: dict[K, list[asyncio.Future[V]]]) -> None:
        """One query for the batch's keys; every caller gets its value or the query's error."""
        keys = [key for key, futures in batch.items() if not all(f.done() for f in futures)]
        if not keys:  # every caller was cancelled meanwhile
            return
        hook = QUERY_HOOK.get()
        try:
            if hook is not None:
                await hook(self.kind, "before", keys)
            values = await self._fetch(keys)
            if hook is not None:
                await hook(self.kind, "after", keys)
        except Exception as exc:
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        for key in keys:
            for future in batch[key]:
                if not future.done():
                    future.set_result(values[key])

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Loader:
    """The batched reads of one session: users, the projects of an owner, one project."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        lock = asyncio.Lock()
        self._users = Batcher[int, UserOut | None]("users", self._fetch_users, lock)
        self._projects_of = Batcher[int, list[ProjectOut]]("projects_of", self._fetch_projects_of, lock)
        self._project = Batcher[tuple[int, int], ProjectOut | None]("project", self._fetch_project, lock)

    async def user(self, user_id: int) -> UserOut | None:
        """The user, or ``None``."""
        return await self._users.load(user_id)

    async def projects_of(self, user_id: int) -> list[ProjectOut]:
        """The user's projects, by id."""
        return await self._projects_of.load(user_id)

    async def project(self, user_id: int, project_id: int) -> ProjectOut | None:
        """The project ``project_id`` if ``user_id`` owns it, else ``None`` (batched by owner)."""
        return await self._project.load((user_id, project_id))

    # ------------------------------------------------------------------ the queries

    async def _fetch_users(self, ids: list[int]) -> dict[int, UserOut | None]:
        found: dict[int, UserOut | None] = dict.fromkeys(ids)
        if len(ids) == 1:
            # A primary-key lookup: the query cache tags it with this row only, so
            # writing another user does not evict it.
            statement = select(users).where(users.c.id == ids[0])
            result = await self.session.execute(statement, execution_options=CACHED)
        else:
            result = await self.session.execute(select(users).where(users.c.id.in_(ids)))
        for row in result:
            found[row.id] = UserOut.model_validate(row)
        return found

    async def _projects_by_owner(self, owner_ids: list[int]) -> dict[int, list[ProjectOut]]:
        found: dict[int, list[ProjectOut]] = {owner: [] for owner in owner_ids}
        if len(owner_ids) == 1:
            statement = select(projects).where(projects.c.owner_id == owner_ids[0]).order_by(projects.c.id)
            result = await self.session.execute(statement, execution_options=CACHED)
        else:
            statement = select(projects).where(projects.c.owner_id.in_(owner_ids)).order_by(projects.c.id)
            result = await self.session.execute(statement)  # one-off: not worth a cache entry
        for row in result:
            found[row.owner_id].append(ProjectOut.model_validate(row))
        return found

    async def _fetch_projects_of(self, owner_ids: list[int]) -> dict[int, list[ProjectOut]]:
        return await self._projects_by_owner(owner_ids)

    async def _fetch_project(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], ProjectOut | None]:
        if len(keys) == 1:
            # One project page: its row by primary key, through the query cache.
            user_id, project_id = keys[0]
            statement = select(projects).where(projects.c.id == project_id)
            row = (await self.session.execute(statement, execution_options=CACHED)).first()
            project = None if row is None else ProjectOut.model_validate(row)
            return {keys[0]: project if project is not None and project.owner_id == user_id else None}
        by_owner = await self._projects_by_owner(sorted({owner for owner, _ in keys}))
        found: dict[tuple[int, int], ProjectOut | None] = {}
        for owner, project_id in keys:
            found[owner, project_id] = next((p for p in by_owner[owner] if p.id == project_id), None)
        return found


def loader(session: AsyncSession) -> Loader:
    """The session's loader (created on first use, kept in ``session.info``)."""
    found = session.info.get(_INFO_KEY)
    if found is None:
        found = session.info[_INFO_KEY] = Loader(session)
    assert isinstance(found, Loader)
    return found
