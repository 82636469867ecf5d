"""The query cache: results of SQLAlchemy 2 ``select()`` statements, cached through the
read-through engine and invalidated when a session commits writes to their tables.

See :class:`QueryCache`. Building blocks: :mod:`.statements` (cache keys, the tables a
statement reads and a flush writes), :mod:`.rows` (the columnar payload and the
rehydration of ORM objects into the caller's session).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from concurrent.futures import Future as ThreadFuture
from datetime import timedelta
from typing import Any, Final, TypeVar

from sqlalchemy import Table, event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection, Result
from sqlalchemy.engine.result import FrozenResult
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction, sessionmaker
from sqlalchemy.sql.base import Executable
from sqlalchemy.util.concurrency import await_only, greenlet_spawn, in_greenlet

from tagcache.cache import Cache
from tagcache.exceptions import ConfigurationError, TagCacheError
from tagcache.integrations.sqlalchemy.errors import NotCacheable
from tagcache.integrations.sqlalchemy.rows import decode_result, encode_result
from tagcache.integrations.sqlalchemy.statements import (
    describe,
    identity_tags,
    rows_tag,
    table_tag,
    written_tables,
)
from tagcache.readthrough import LoadPolicy, LoadRequest, Uncached
from tagcache.tags import check_tags, ttl_seconds

__all__ = ["CommitInvalidationError", "QueryCache"]

logger: Final = logging.getLogger("tagcache")

T = TypeVar("T")

#: Execution option naming a statement's cache settings (the opt-in of ``session.execute``).
OPTION: Final = "tagcache"
#: Execution option marking the query cache's own execution of a statement on a miss.
_INNER: Final = "tagcache_inner"
#: Reasons logged for statements run without the cache, at most (then only counted).
_MAX_LOGGED: Final = 256
#: Keys an opt-in ``execution_options={"tagcache": {...}}`` may hold.
_SPEC_KEYS: Final = frozenset({"ttl", "tags", "tables"})
#: Isolation levels whose transactions read from a snapshot taken at their first statement.
_SNAPSHOT_LEVELS: Final = frozenset({"REPEATABLE READ", "SERIALIZABLE", "SNAPSHOT"})

_UNSET: Final = object()

AnySession = Session | AsyncSession
SessionFactory = sessionmaker[Any] | async_sessionmaker[Any] | type[Session] | type[AsyncSession]


class CommitInvalidationError(TagCacheError):
    """``commit()`` wrote to the database, but invalidating the cached queries over the
    changed tables failed (the cache backend is unreachable).

    The data **is committed**. Until the invalidation is re-applied, other processes
    may serve results older than this commit; this process re-applies it (the
    cache's replay of failed invalidations) before it reads the cache again, and
    bypasses the cache until then. ``tags`` are the tags that were not invalidated.
    """

    def __init__(self, message: str, tags: tuple[str, ...]) -> None:
        super().__init__(message)
        self.tags = tags


class _Tracked:
    """What one session wrote in its current outer transaction (kept in ``session.info``)."""

    __slots__ = ("committed", "others", "rows", "snapshot", "tables")

    def __init__(self) -> None:
        #: Tables written (by flushes, bulk statements, foreign-key actions).
        self.tables: set[str] = set()
        #: (table, primary key) of rows flushed.
        self.rows: set[tuple[str, tuple[Any, ...]]] = set()
        #: Tables changed in rows the ORM cannot name (bulk statements, foreign-key actions).
        self.others: set[str] = set()
        #: The transaction reads from a snapshot (REPEATABLE READ or SERIALIZABLE).
        self.snapshot = False
        #: The outer transaction committed (set in after_commit, acted on at its end).
        self.committed = False

    def tags(self) -> tuple[str, ...]:
        """The tags to invalidate for these writes."""
        tags = {table_tag(t) for t in self.tables}
        tags.update(rows_tag(t) for t in self.others)
        tags.update(identity_tags(t, pk) for t, pk in self.rows)
        return tuple(sorted(tags))


class _Trampoline:
    """Runs a coroutine on the query cache's event loop from a worker thread, while
    the steps that must use the thread's sync ``Session`` (executing the statement)
    are sent back to run on that thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; serve its :meth:`call` requests on this thread meanwhile."""
        done: ThreadFuture[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        done.add_done_callback(lambda _: self.jobs.put(None))
        while True:
            job = self.jobs.get()
            if job is None:
                return done.result()
            fn, fut = job
            try:
                value = fn()
            except BaseException as exc:
                self.loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                self.loop.call_soon_threadsafe(_settle, fut, value, None)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker thread (from the loop) and return its value."""
        fut: asyncio.Future[T] = self.loop.create_future()
        self.jobs.put((fn, fut))
        return await fut


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class QueryCache:
    """Caches the results of SQLAlchemy 2 ``select()`` statements, invalidated
    automatically when a session commits writes to the tables they read.

    ::

        qc = QueryCache(cache, default_ttl=300)
        qc.invalidate_on_commit(SessionFactory)       # once, at start-up

        result = await qc.get_or_execute(session, select(User).where(User.is_active))
        users = result.scalars().all()                # the session's User objects, hit or miss

        # or, in existing code, one execution option (sessions of SessionFactory):
        result = await session.execute(stmt, execution_options={"tagcache": {"ttl": 600}})

    A result behaves like ``session.execute(stmt)``'s on a hit as on a miss; ORM
    objects become the session's persistent objects without SQL. Every entry is
    tagged with the tables the statement reads (``table:users``; primary-key
    lookups of one table carry ``row:users:42`` and ``rows:users`` instead), plus
    the ``tags`` you give. Loads go through the cache's read-through engine:
    one query per key across callers and processes, and a query that read the
    database before a commit's invalidation never stores its result after it.

    Args:
        cache: the :class:`~tagcache.Cache` to store results in.
        default_ttl: seconds (or a ``timedelta``) a result is kept when a call gives
            no ``ttl``; ``None`` keeps it until invalidated or evicted.
        max_rows: results with more rows are returned uncached (counted in
            ``stats().not_stored``). The byte limit is the cache's ``max_value_size``.
        fail_open: when the cache backend fails, run statements uncached (``True``)
            or raise :class:`~tagcache.BackendError`; ``None``: the cache's setting.
    """

    def __init__(
        self,
        cache: Cache,
        *,
        default_ttl: float | timedelta | None = 300.0,
        max_rows: int = 10_000,
        fail_open: bool | None = None,
    ) -> None:
        if not isinstance(cache, Cache):
            raise TypeError(f"QueryCache needs a tagcache.Cache, got {type(cache).__name__}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ConfigurationError(f"max_rows must be a positive int, got {max_rows!r}")
        if fail_open not in (None, True, False):
            raise ConfigurationError(f"fail_open must be True, False or None, got {fail_open!r}")
        self._cache = cache
        self._stats = cache.function_counters("tagcache.QueryCache")
        self._default_ttl = ttl_seconds(default_ttl, what="default_ttl")
        self._max_rows = max_rows
        self._fail_open = fail_open
        self._policies: dict[bool, LoadPolicy] = {}
        self._logged: set[str] = set()
        self._info_key = f"tagcache.sqlalchemy.{id(self):x}"
        # Session classes whose events this query cache listens to, and the listeners.
        self._targets: list[tuple[Any, list[tuple[str, Callable[..., Any]]]]] = []
        self._classes: tuple[type, ...] = ()
        self._warned_classes: set[type] = set()
        # The event loop sync sessions in worker threads hand their cache calls to.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_loop: asyncio.AbstractEventLoop | None = None
        self._own_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def cache(self) -> Cache:
        """The cache results are stored in."""
        return self._cache

    # ------------------------------------------------------------------ reads

    async def get_or_execute(
        self,
        session: Session | AsyncSession,
        statement: Executable,
        params: Mapping[str, Any] | None = None,
        *,
        ttl: float | timedelta | object | None = _UNSET,
        tags: Iterable[str] = (),
        tables: Iterable[str] | None = None,
    ) -> Result[Any]:
        """Return the result of ``session.execute(statement, params)``, from the cache
        when it holds one, else executed (in this task, on this session) and stored.

        The same code path as the ``execution_options={"tagcache": {...}}`` opt-in.
        Runs the statement uncached (logged once per reason) when it is not a plain
        ``select()``, has ``FOR UPDATE``, contains textual SQL and no ``tables=``,
        returns more than ``max_rows`` rows or values that cannot be stored exactly;
        and when this session's own uncommitted writes touch a table it reads, or its
        REPEATABLE READ/SERIALIZABLE transaction already ran a statement.

        Args:
            session: a ``Session`` or ``AsyncSession``.
            statement: a ``select()``.
            params: parameters for ``execute()``, part of the cache key.
            ttl: seconds (or a ``timedelta``); default: the query cache's ``default_ttl``.
            tags: tags added to the automatic table tags (invalidate them yourself).
            tables: the tables a statement with textual SQL reads (names as in
                ``Table.fullname``); also added to the tables found in any statement.
        """
        sync = _sync_session(session)
        self._note_loop()
        seconds = self._default_ttl if ttl is _UNSET else ttl_seconds(ttl)
        tag_tuple = check_tags(tags)
        table_names = None if tables is None else _table_names(tables)
        if isinstance(session, AsyncSession):
            execute: Callable[[], Awaitable[Result[Any]]] = lambda: session.execute(  # noqa: E731
                statement, params, execution_options={_INNER: True}
            )
        else:

            async def execute() -> Result[Any]:
                return session.execute(statement, params, execution_options={_INNER: True})

        return await self._query(sync, statement, params, seconds, tag_tuple, table_names, execute)

    async def _query(
        self,
        sync: Session,
        statement: Executable,
        params: Mapping[str, Any] | None,
        ttl: float | None,
        tags: tuple[str, ...],
        tables: frozenset[str] | None,
        execute: Callable[[], Awaitable[Result[Any]]],
    ) -> Result[Any]:
        """The one path of both forms: key, tags, bypass rules, the engine, rehydration."""
        try:
            bind = sync.get_bind(clause=statement)  # type: ignore[arg-type]  # an Executable is a clause here
            options = dict(bind.get_execution_options())
            get_options = getattr(statement, "get_execution_options", None)
            if get_options is not None:
                options.update(get_options())
            if params is not None and not isinstance(params, Mapping):
                raise NotCacheable("executemany-style parameters (a list of dicts) are not cached")
            key, read, lookup = describe(statement, bind, options, params, tables)
        except NotCacheable as exc:
            self._log_once(exc.reason)
            return await execute()
        bypass = self._bypass(sync, read)
        if bypass is not None:
            return await execute()
        auto: tuple[str, ...]
        if lookup is not None:
            table, pk = lookup
            auto = (identity_tags(table, pk), rows_tag(table))
        else:
            auto = tuple(sorted(table_tag(t) for t in read))
        all_tags = auto + tuple(t for t in tags if t not in auto)
        executed: list[FrozenResult[Any]] = []
        max_rows = self._max_rows

        async def load() -> Any:
            held = _held_identities(sync)
            frozen = (await execute()).freeze()
            executed.append(frozen)
            try:
                return encode_result(frozen, statement, max_rows=max_rows, held=held)  # type: ignore[arg-type]  # a Select: read_tables accepted it
            except NotCacheable as exc:
                return Uncached(None, exc.reason)

        value = await self._cache.engine.load(
            LoadRequest(key, load, ttl, all_tags, self._policy(), stats=self._stats)
        )
        if executed:
            return executed[-1]()  # this caller ran the statement: its own objects
        if isinstance(value, Uncached):
            return await execute()  # shared a load whose result could not be stored
        try:
            return decode_result(value, sync, statement)  # type: ignore[arg-type]  # a Select, as above
        except NotCacheable as exc:
            # Written for another shape of the mapped classes (a deploy changed a model),
            # or foreign data under the key: drop it and run the statement.
            self._log_once(f"a cached result could not be used ({exc.reason}); it is dropped")
            with contextlib.suppress(TagCacheError):  # the next reader finds it unusable too
                await self._cache.delete(key)
            return await execute()

    def _policy(self) -> LoadPolicy:
        fail_open = self._cache.fail_open if self._fail_open is None else self._fail_open
        policy = self._policies.get(fail_open)
        if policy is None:
            policy = self._policies[fail_open] = LoadPolicy(fail_open=fail_open)
        return policy

    def _bypass(self, sync: Session, read: frozenset[str]) -> str | None:
        """Why ``sync`` must not use the cache for a statement reading ``read``, or ``None``."""
        if not isinstance(sync, self._classes):
            self._warn_untracked(type(sync))
        tracked: _Tracked | None = sync.info.get(self._info_key)
        if tracked is not None:
            if tracked.snapshot:
                return "snapshot"
            if not tracked.tables.isdisjoint(read):
                return "own writes"
        if sync.new or sync.dirty or sync.deleted:
            for obj in itertools.chain(sync.new, sync.dirty, sync.deleted):
                if not written_tables(sa_inspect(obj).mapper).isdisjoint(read):
                    return "pending writes"
        return None

    def _warn_untracked(self, cls: type) -> None:
        if cls in self._warned_classes or len(self._warned_classes) > _MAX_LOGGED:
            return
        self._warned_classes.add(cls)
        logger.warning(
            "tagcache: QueryCache used with a %s whose commits it does not watch: its commits do not "
            "invalidate cached queries, and its flushed writes and REPEATABLE READ snapshots are not seen. "
            "Call query_cache.invalidate_on_commit(<its sessionmaker or async_sessionmaker>) at start-up.",
            cls.__qualname__,
        )

    def _log_once(self, reason: str) -> None:
        if reason in self._logged or len(self._logged) > _MAX_LOGGED:
            return
        self._logged.add(reason)
        logger.warning("tagcache: statement run without the query cache: %s", reason)

    # ------------------------------------------------------------------ invalidation

    async def invalidate_tables(self, *tables: str | Table | type[Any]) -> None:
        """Invalidate every cached statement reading any of ``tables``: for writes the ORM
        cannot see (triggers, ``text()`` DML, other programs).

        A ``Table`` or mapped class also invalidates the tables its foreign-key
        ``ON DELETE``/``ON UPDATE`` actions change; a name (``Table.fullname``) only
        itself. Raises :class:`~tagcache.BackendError` like
        :meth:`tagcache.Cache.invalidate_tags` (and is then re-applied by the cache).
        """
        names: set[str] = set()
        for table in tables:
            if isinstance(table, str):
                names.add(table)
            elif isinstance(table, Table):
                names |= written_tables(table)
            else:
                mapper = sa_inspect(table, raiseerr=False)
                if not isinstance(mapper, Mapper):
                    raise TypeError(
                        f"invalidate_tables takes table names, Table objects or mapped classes, got {table!r}"
                    )
                names |= written_tables(mapper)
        tags = sorted({table_tag(n) for n in names} | {rows_tag(n) for n in names})
        await self._cache.invalidate_tags(tags)

    def invalidate_on_commit(self, factory: SessionFactory) -> None:
        """Invalidate, when a session of ``factory`` commits, every cached statement over
        the tables (and rows) it wrote; also enable the execution-option opt-in
        (``execution_options={"tagcache": {...}}``) for its sessions.

        ``factory`` is a ``sessionmaker``, an ``async_sessionmaker`` (its sessions'
        ``sync_session_class`` is replaced by a subclass of it, so that only its
        sessions are watched), or a ``Session``/``AsyncSession`` class (all its
        sessions). Call it once at start-up. Idempotent.

        What is recorded: rows inserted, updated or deleted by each flush (their
        tables, and tables changed by foreign-key ``ON DELETE``/``ON UPDATE`` actions),
        bulk ``insert()``/``update()``/``delete()`` executed through the session. After
        the outer transaction commits, ``commit()`` invalidates them and returns only
        when that is done; if it fails, ``commit()`` raises
        :class:`CommitInvalidationError` (the data is committed). A rollback, also of
        flushed changes, invalidates nothing; writes inside a savepoint that was rolled
        back are still invalidated at the outer commit (harmless: one extra miss).
        A sync ``Session`` must commit in a worker thread, not on the event loop's
        thread (its invalidation could not be awaited there): that is refused in
        ``before_commit`` with :class:`~tagcache.ConfigurationError`.
        """
        target = _event_target(factory)
        if any(t is target for t, _ in self._targets):
            return
        listeners: list[tuple[str, Callable[..., Any]]] = [
            ("after_begin", self._after_begin),
            ("after_flush", self._after_flush),
            ("do_orm_execute", self._on_execute),
            ("before_commit", self._before_commit),
            ("after_commit", self._after_commit),
            ("after_transaction_end", self._after_transaction_end),
        ]
        for name, fn in listeners:
            event.listen(target, name, fn)
        self._targets.append((target, listeners))
        self._classes = (*self._classes, target.class_ if isinstance(target, sessionmaker) else target)
        self._note_loop()

    def _tracked(self, session: Session) -> _Tracked:
        tracked: _Tracked | None = session.info.get(self._info_key)
        if tracked is None:
            tracked = session.info[self._info_key] = _Tracked()
        return tracked

    def _after_begin(self, session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        if connection.dialect.name == "sqlite":
            return  # pysqlite/aiosqlite run SELECTs outside a transaction: no old snapshot
        level = (
            connection.get_execution_options().get("isolation_level") or connection.default_isolation_level
        )
        if isinstance(level, str) and level.upper().replace("_", " ") in _SNAPSHOT_LEVELS:
            self._tracked(session).snapshot = True

    def _after_flush(self, session: Session, flush_context: Any) -> None:
        tracked = self._tracked(session)
        for obj in itertools.chain(session.new, session.dirty, session.deleted):
            state = sa_inspect(obj)
            mapper = state.mapper
            tables = written_tables(mapper)
            tracked.tables |= tables
            own = {t.fullname for t in mapper.tables if isinstance(t, Table)}
            tracked.others |= tables - own
            for rel in mapper.relationships:
                secondary = rel.secondary
                if isinstance(secondary, Table):
                    tracked.tables.add(secondary.fullname)
                    tracked.others.add(secondary.fullname)
            pk = _primary_key(state, mapper)
            if pk is None:
                tracked.others |= own
            else:
                tracked.rows.update((t, pk) for t in own)

    def _on_execute(self, state: ORMExecuteState) -> Result[Any] | None:
        if state.is_select:
            spec = state.execution_options.get(OPTION)
            if spec is None or state.execution_options.get(_INNER):
                return None
            if state.is_relationship_load or state.is_column_load:
                return None
            return self._execute_opted_in(state, spec)
        if state.is_insert or state.is_update or state.is_delete:
            mapper = state.bind_mapper
            target = getattr(state.statement, "table", None)
            if mapper is not None:
                tables = written_tables(mapper)
            elif isinstance(target, Table):
                tables = written_tables(target)
            else:
                return None
            tracked = self._tracked(state.session)
            tracked.tables |= tables
            tracked.others |= tables
        return None

    def _execute_opted_in(self, state: ORMExecuteState, spec: object) -> Result[Any] | None:
        ttl, tags, tables = self._parse_spec(spec)
        sync = state.session
        params = state.parameters if isinstance(state.parameters, Mapping) else None
        statement = state.statement

        def invoke() -> Result[Any]:
            return state.invoke_statement(execution_options={_INNER: True})

        if in_greenlet():
            # An AsyncSession: this runs in its greenlet, whose loop is this thread's.
            return await_only(
                self._query(sync, statement, params, ttl, tags, tables, lambda: greenlet_spawn(invoke))
            )
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            self._log_once(
                "a sync Session executed on the event loop's thread cannot await the cache; "
                "use an AsyncSession, or run the sync code in a worker thread"
            )
            return None
        trampoline = _Trampoline(self._loop_for_threads())
        return trampoline.run(
            self._query(sync, statement, params, ttl, tags, tables, lambda: trampoline.call(invoke))
        )

    def _parse_spec(self, spec: object) -> tuple[float | None, tuple[str, ...], frozenset[str] | None]:
        if spec is True:
            return self._default_ttl, (), None
        if not isinstance(spec, Mapping):
            raise TypeError(
                'execution option "tagcache" must be True or a dict with keys ttl, tags, tables; '
                f"got {spec!r}"
            )
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise TypeError(
                f'execution option "tagcache" has unknown keys {sorted(map(str, unknown))}; '
                "known: ttl, tags, tables"
            )
        ttl = ttl_seconds(spec["ttl"]) if "ttl" in spec else self._default_ttl
        tags = check_tags(spec.get("tags", ()))
        tables = _table_names(spec["tables"]) if spec.get("tables") is not None else None
        return ttl, tags, tables

    def _before_commit(self, session: Session) -> None:
        if in_greenlet():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a worker thread, or no event loop at all: the invalidation can wait
        tracked: _Tracked | None = session.info.get(self._info_key)
        if (tracked is not None and (tracked.tables or tracked.rows)) or (
            session.new or session.dirty or session.deleted
        ):
            raise ConfigurationError(
                "a sync Session is committing writes on the event loop's thread: the query cache "
                "could not await their invalidation there. Use an AsyncSession, or run the sync "
                "session's work in a worker thread (asyncio.to_thread, run_in_threadpool)"
            )

    def _after_commit(self, session: Session) -> None:
        tracked: _Tracked | None = session.info.get(self._info_key)
        if tracked is not None:
            tracked.committed = True

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is not None:
            return  # a savepoint: its writes stay recorded for the outer commit
        tracked: _Tracked | None = session.info.pop(self._info_key, None)
        if tracked is None or not tracked.committed:
            return  # rolled back, or nothing written: nothing to invalidate
        tags = tracked.tags()
        if tags:
            self._invalidate_now(tags)

    def _invalidate_now(self, tags: tuple[str, ...]) -> None:
        """Invalidate ``tags`` before ``commit()`` returns, from the session's sync code."""
        try:
            if in_greenlet():
                await_only(self._cache.invalidate_tags(tags))
            else:
                fut = asyncio.run_coroutine_threadsafe(
                    self._cache.invalidate_tags(tags), self._loop_for_threads()
                )
                fut.result()
        except TagCacheError as exc:
            raise CommitInvalidationError(
                f"the transaction is committed, but invalidating the cached queries over it failed "
                f"({exc}); until that is re-applied other processes may serve results older than "
                f"this commit (this process re-applies it before it reads the cache again). "
                f"Tags: {list(tags)[:10]}{' ...' if len(tags) > 10 else ''}",
                tags,
            ) from exc

    # ------------------------------------------------------------------ event loops

    def _note_loop(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop is not self._own_loop:
            self._loop = loop

    def _loop_for_threads(self) -> asyncio.AbstractEventLoop:
        """The loop a worker thread's sync session hands cache calls to: the application's
        (the one this query cache was last used or set up on) while it runs, else one
        of the query cache's own, on a daemon thread."""
        loop = self._loop
        if loop is not None and loop.is_running():
            return loop
        with self._lock:
            own = self._own_loop
            if own is None or own.is_closed():
                own = asyncio.new_event_loop()
                thread = threading.Thread(target=own.run_forever, name="tagcache-sqlalchemy", daemon=True)
                thread.start()
                self._own_loop, self._own_thread = own, thread
            return own

    def close(self) -> None:
        """Stop listening to session events and stop the event loop this query cache
        started for sync sessions, if any. Cached entries are kept."""
        for target, listeners in self._targets:
            for name, fn in listeners:
                # SQLAlchemy before 2.0.26 can raise KeyError while tidying its registry after
                # removing a listener from a sessionmaker's class; the listener is gone by then.
                with contextlib.suppress(KeyError):
                    if event.contains(target, name, fn):
                        event.remove(target, name, fn)
        self._targets.clear()
        self._classes = ()
        own, thread = self._own_loop, self._own_thread
        self._own_loop = self._own_thread = None
        if own is not None and thread is not None:
            own.call_soon_threadsafe(own.stop)
            thread.join(timeout=5)
            own.close()

    def __repr__(self) -> str:
        return f"QueryCache({self._cache!r}, default_ttl={self._default_ttl!r})"


def _sync_session(session: object) -> Session:
    if isinstance(session, AsyncSession):
        return session.sync_session
    if isinstance(session, Session):
        return session
    raise TypeError(
        f"get_or_execute needs a sqlalchemy Session or AsyncSession, got {type(session).__name__}"
    )


def _table_names(tables: Iterable[str | Table]) -> frozenset[str]:
    if isinstance(tables, str):
        raise TypeError(
            f"tables must be a list of table names, got the string {tables!r}: write [{tables!r}]"
        )
    names = set()
    for t in tables:
        if isinstance(t, Table):
            names.add(t.fullname)
        elif isinstance(t, str) and t:
            names.add(t)
        else:
            raise TypeError(f"tables must hold table names or Table objects, got {t!r}")
    return frozenset(names)


def _event_target(factory: object) -> Any:
    """Where SQLAlchemy events for ``factory``'s sessions are listened to."""
    if isinstance(factory, sessionmaker):
        return factory
    if isinstance(factory, async_sessionmaker):
        base = factory.kw.get("sync_session_class", Session)
        own = type(f"Tagcache{base.__name__}", (base,), {"__module__": __name__})
        factory.configure(sync_session_class=own)
        return own
    if isinstance(factory, type) and issubclass(factory, AsyncSession):
        return factory.sync_session_class
    if isinstance(factory, type) and issubclass(factory, Session):
        return factory
    raise TypeError(
        "invalidate_on_commit takes a sessionmaker, an async_sessionmaker, or a Session or AsyncSession "
        f"class; got {factory!r}"
    )


def _held_identities(session: Session) -> frozenset[Any]:
    """Identity keys of the objects ``session`` holds loaded (not expired): a statement
    returns them with the values they have, so a result holding one is not stored."""
    if not session.identity_map:
        return frozenset()
    return frozenset(state.key for state in session.identity_map.all_states() if not state.expired)


def _primary_key(state: Any, mapper: Mapper[Any]) -> tuple[Any, ...] | None:
    """The primary key of a flushed object, or ``None`` when it cannot be read without SQL."""
    identity = state.identity
    if identity is not None:
        return tuple(identity)
    try:
        values = [state.dict.get(mapper.get_property_by_column(col).key) for col in mapper.primary_key]
    except Exception:  # an unusual mapping: the table is invalidated as a whole instead
        return None
    if any(v is None for v in values):
        return None
    return tuple(values)
