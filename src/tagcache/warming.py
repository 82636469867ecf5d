"""Cache warming: fill hot entries ahead of the requests that would miss them.

A :class:`CacheWarmer` runs *jobs* — async functions without arguments — once
(:meth:`CacheWarmer.run_once`) or periodically in the background
(:meth:`CacheWarmer.start`, or the :meth:`CacheWarmer.lifespan` helper for
Starlette and FastAPI)::

    from tagcache.warming import CacheWarmer

    warmer = CacheWarmer(cache, concurrency=8)

    @warmer.job(every=3600, jitter=0.1)
    async def warm_active_users() -> None:
        for user_id in await db.active_user_ids():
            await get_user(user_id)          # a function decorated with the cache

    report = await warmer.run_once()         # every job now, at most 8 at a time
    app = FastAPI(lifespan=warmer.lifespan)  # or: async with warmer.running(): ...

A job normally calls functions decorated with the cache for their hot
arguments. A decorated function fills the cache through the cache's
compare-and-set path (:meth:`tagcache.Cache.get_or_set`): the value is stored
only if none of its tags was invalidated while it was being computed, so
warming never writes data older than an invalidation. Calling a decorated
function returns the entry when it is already present; ``await
fn.refresh(*args)`` recomputes and stores it even then, for jobs that must
renew entries before they expire.

Each job runs inside :func:`tagcache.stats.count_writes`, so its
:class:`JobReport` tells how many entries it stored (including entries stored
by tasks the job starts).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Final, TypeVar, overload

from tagcache.cache import Cache
from tagcache.exceptions import ConfigurationError
from tagcache.stats import count_writes

__all__ = ["CacheWarmer", "JobReport", "JobStats", "WarmingReport"]

logger: Final = logging.getLogger("tagcache")

#: A warming job: an async function taking no arguments.
JobFunction = Callable[[], Awaitable[Any]]
F = TypeVar("F", bound=Callable[[], Awaitable[Any]])


# ---------------------------------------------------------------------- reports


@dataclass(frozen=True, slots=True)
class JobReport:
    """The outcome of one run of one warming job."""

    #: The job's name.
    name: str
    #: ``True`` when the job returned without raising and within its timeout.
    ok: bool
    #: ``"ExceptionType: message"`` (or ``"timed out after N s"``) when the run failed.
    error: str | None
    #: Entries stored by any cache during the run, tasks started by the job included.
    entries_written: int
    #: Seconds the run took.
    duration: float
    #: When the run started (wall clock, UTC).
    started_at: datetime
    #: Values computed during the run that could not be stored (a backend error
    #: during the fill, a value not encodable or too large); see ``Cache.stats().not_stored``.
    entries_not_stored: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (``started_at`` in ISO 8601)."""
        return {
            "name": self.name,
            "ok": self.ok,
            "error": self.error,
            "entries_written": self.entries_written,
            "entries_not_stored": self.entries_not_stored,
            "duration": self.duration,
            "started_at": self.started_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class WarmingReport:
    """The outcome of :meth:`CacheWarmer.run_once`: one :class:`JobReport` per job run."""

    #: One report per job, in the order the jobs were asked for.
    jobs: tuple[JobReport, ...]
    #: Seconds the whole run took.
    duration: float

    @property
    def ok(self) -> bool:
        """``True`` when every job succeeded (also when no job ran)."""
        return all(job.ok for job in self.jobs)

    @property
    def entries_written(self) -> int:
        """Entries stored by all the jobs together."""
        return sum(job.entries_written for job in self.jobs)

    @property
    def entries_not_stored(self) -> int:
        """Values the jobs computed but could not store, all together."""
        return sum(job.entries_not_stored for job in self.jobs)

    @property
    def failed(self) -> tuple[JobReport, ...]:
        """The reports of the jobs that failed."""
        return tuple(job for job in self.jobs if not job.ok)

    def __getitem__(self, name: str) -> JobReport:
        """The report of the job called ``name`` (``KeyError`` if it did not run)."""
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "ok": self.ok,
            "duration": self.duration,
            "entries_written": self.entries_written,
            "entries_not_stored": self.entries_not_stored,
            "jobs": [job.as_dict() for job in self.jobs],
        }


@dataclass(frozen=True, slots=True)
class JobStats:
    """Counters of one job since the warmer was created (see :meth:`CacheWarmer.stats`)."""

    name: str
    #: The job's period in seconds; ``None`` for a job run only by :meth:`CacheWarmer.run_once`.
    every: float | None
    #: Runs finished (successful or not; a run cancelled by :meth:`CacheWarmer.stop` is not counted).
    runs: int
    #: Runs that raised or timed out.
    failures: int
    #: Periodic runs not started because the previous run of the job was still going.
    skipped: int
    #: Entries stored by all the job's runs.
    entries_written: int
    #: Values all the job's runs computed but could not store.
    entries_not_stored: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict."""
        return {
            "name": self.name,
            "every": self.every,
            "runs": self.runs,
            "failures": self.failures,
            "skipped": self.skipped,
            "entries_written": self.entries_written,
            "entries_not_stored": self.entries_not_stored,
        }


# ---------------------------------------------------------------------- internals


class _Job:
    __slots__ = (
        "entries_not_stored",
        "entries_written",
        "every",
        "failures",
        "fn",
        "jitter",
        "name",
        "runs",
        "skipped",
        "timeout",
    )

    def __init__(
        self, fn: JobFunction, name: str, every: float | None, jitter: float, timeout: float | None
    ) -> None:
        self.fn = fn
        self.name = name
        self.every = every
        self.jitter = jitter
        self.timeout = timeout
        self.runs = 0
        self.failures = 0
        self.skipped = 0
        self.entries_written = 0
        self.entries_not_stored = 0


class _LoopState:
    """The asyncio primitives of a warmer, which belong to one event loop."""

    __slots__ = ("locks", "loop", "semaphore")

    def __init__(self, loop: asyncio.AbstractEventLoop, concurrency: int) -> None:
        self.loop = loop
        self.semaphore = asyncio.Semaphore(concurrency)
        self.locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        lock = self.locks.get(name)
        if lock is None:
            lock = self.locks[name] = asyncio.Lock()
        return lock


def _seconds(value: object, what: str, *, allow_none: bool, allow_zero: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        accepted = "seconds (int or float) or a datetime.timedelta" + (" or None" if allow_none else "")
        raise ConfigurationError(f"{what} must be {accepted}, got {type(value).__name__} ({value!r:.80})")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        limit = "a finite number of seconds >= 0" if allow_zero else "a positive finite number of seconds"
        raise ConfigurationError(f"{what} must be {limit}, got {value!r}")
    return seconds


def _is_async(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or inspect.isclass(fn):
        return False
    call: object = type(fn).__call__  # instances with an async __call__
    return inspect.iscoroutinefunction(call)


def _describe(fn: object) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return f"{name!r}" if isinstance(name, str) else repr(fn)


def _default_name(fn: object) -> str | None:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        name = getattr(type(fn), "__name__", None)
    return name if isinstance(name, str) and name else None


async def _invoke(fn: JobFunction) -> None:
    result = fn()
    if not inspect.isawaitable(result):
        raise TypeError(f"warming job {_describe(fn)} returned {type(result).__name__}, not an awaitable")
    await result


def _error_text(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# ---------------------------------------------------------------------- the warmer


class CacheWarmer:
    """Runs warming jobs for ``cache``, once or periodically, with bounded concurrency.

    Args:
        cache: the cache being warmed (jobs usually reach it through
            decorated functions; it names the warmer in logs).
        concurrency: most jobs running at the same time, across
            :meth:`run_once` and the periodic schedule.
        run_on_start: run every periodic job as soon as :meth:`start` is
            called; otherwise its first run is one period (plus jitter) later.
        stop_timeout: seconds :meth:`stop` waits for running jobs before
            cancelling them; ``None`` waits as long as they take.
        rng: source of randomness for the jitter (a :class:`random.Random`);
            pass a seeded one for reproducible schedules.

    Register jobs with :meth:`job` (a decorator) or :meth:`add`. A job is an
    async function without arguments (use :func:`functools.partial` to bind
    some). It typically calls functions decorated with the cache for hot
    arguments: those fill through the cache's compare-and-set path, so
    warming never stores data older than an invalidation; ``await
    fn.refresh(*args)`` on a decorated function recomputes the entry even
    when it is present. A failing job is logged (logger ``tagcache``) and
    reported, and never stops the others.

    Nothing runs, and no task or asyncio object exists, until :meth:`run_once`
    or :meth:`start` is called.
    """

    def __init__(
        self,
        cache: Cache,
        *,
        concurrency: int = 8,
        run_on_start: bool = True,
        stop_timeout: float | timedelta | None = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(cache, Cache):
            raise ConfigurationError(f"cache must be a tagcache.Cache, got {type(cache).__name__}")
        if type(concurrency) is not int or concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive int, got {concurrency!r}")
        if not isinstance(run_on_start, bool):
            raise ConfigurationError(f"run_on_start must be a bool, got {run_on_start!r}")
        if rng is not None and not callable(getattr(rng, "random", None)):
            raise ConfigurationError(f"rng must be a random.Random (or have a random() method), got {rng!r}")
        self._cache = cache
        self._concurrency = concurrency
        self._run_on_start = run_on_start
        self._stop_timeout = _seconds(stop_timeout, "stop_timeout", allow_none=True, allow_zero=True)
        self._rng: random.Random = rng if rng is not None else random.Random()
        self._jobs: dict[str, _Job] = {}
        self._last_reports: dict[str, JobReport] = {}
        self._state: _LoopState | None = None
        self._schedulers: dict[str, asyncio.Task[None]] = {}
        self._inflight: set[asyncio.Task[JobReport]] = set()
        self._started = False

    # ------------------------------------------------------------------ registration

    @overload
    def job(self, fn: F, /) -> F: ...
    @overload
    def job(
        self,
        fn: None = None,
        /,
        *,
        every: float | timedelta | None = None,
        jitter: float = 0.1,
        name: str | None = None,
        timeout: float | timedelta | None = None,
    ) -> Callable[[F], F]: ...

    def job(
        self,
        fn: JobFunction | None = None,
        /,
        *,
        every: float | timedelta | None = None,
        jitter: float = 0.1,
        name: str | None = None,
        timeout: float | timedelta | None = None,
    ) -> JobFunction | Callable[[F], F]:
        """Decorator registering an async function as a job; returns it unchanged.

        ``@warmer.job(every=3600)`` runs it hourly once :meth:`start` is
        called (and on every :meth:`run_once`); bare ``@warmer.job`` registers a
        job run only by :meth:`run_once`. See :meth:`add` for the arguments.
        """
        if fn is not None:
            return self.add(fn, every=every, jitter=jitter, name=name, timeout=timeout)

        def register(func: F) -> F:
            return self.add(func, every=every, jitter=jitter, name=name, timeout=timeout)

        return register

    def add(
        self,
        fn: F,
        *,
        every: float | timedelta | None = None,
        jitter: float = 0.1,
        name: str | None = None,
        timeout: float | timedelta | None = None,
    ) -> F:
        """Register ``fn`` (an async function without arguments) as a job; return it unchanged.

        Args:
            every: period of the background schedule, in seconds or a
                ``timedelta``; ``None`` (the default) registers a job run only
                by :meth:`run_once`.
            jitter: fraction of the period (0 to 1) added at random to each
                wait, so the jobs of many processes do not run in step.
            name: the job's name in reports, logs and ``run_once(names=...)``;
                defaults to the function's ``__name__``. Names are unique.
            timeout: seconds (or ``timedelta``) after which a run is
                cancelled and reported as failed; ``None``: no limit.

        Raises:
            TypeError: ``fn`` is not an async callable.
            ValueError: a bad argument (:class:`~tagcache.ConfigurationError`),
                or a job of that name is already registered.
        """
        if not callable(fn) or not _is_async(fn):
            raise TypeError(
                f"warming job {_describe(fn)} must be an async function (async def) taking no arguments, "
                f"got {type(fn).__name__}"
            )
        period = _seconds(every, "every", allow_none=True)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= 1:
            raise ConfigurationError(
                f"jitter must be a fraction of the period between 0 and 1, got {jitter!r}"
            )
        limit = _seconds(timeout, "timeout", allow_none=True)
        if name is None:
            name = _default_name(fn)
            if name is None:
                raise ConfigurationError(f"cannot name warming job {fn!r}: pass name=")
        elif not isinstance(name, str) or not name or not name.isprintable():
            raise ConfigurationError(f"job name must be a non-empty printable str, got {name!r}")
        if name in self._jobs:
            raise ValueError(
                f"a warming job named {name!r} is already registered; pass a distinct name= to add or job"
            )
        job = _Job(fn, name, period, float(jitter), limit)
        self._jobs[name] = job
        if self._started and period is not None:
            self._spawn_scheduler(job, self._loop_state())
        return fn

    @property
    def cache(self) -> Cache:
        """The cache this warmer warms."""
        return self._cache

    @property
    def jobs(self) -> tuple[str, ...]:
        """Names of the registered jobs, in registration order."""
        return tuple(self._jobs)

    @property
    def started(self) -> bool:
        """``True`` between :meth:`start` and :meth:`stop`."""
        return self._started

    @property
    def last_reports(self) -> dict[str, JobReport]:
        """The latest :class:`JobReport` of each job that has run (a copy)."""
        return dict(self._last_reports)

    def stats(self) -> dict[str, JobStats]:
        """Counters (runs, failures, skipped runs, entries written) of every job, by name."""
        return {
            job.name: JobStats(
                job.name,
                job.every,
                job.runs,
                job.failures,
                job.skipped,
                job.entries_written,
                job.entries_not_stored,
            )
            for job in self._jobs.values()
        }

    def next_delay(self, name: str) -> float:
        """A wait before the next periodic run of job ``name``: its period plus
        a random share of up to ``jitter`` times the period."""
        job = self._get(name)
        if job.every is None:
            raise ValueError(f"warming job {name!r} has no period (every=None): it runs only by run_once()")
        return job.every * (1.0 + job.jitter * self._rng.random())

    # ------------------------------------------------------------------ running

    async def run_once(self, names: Iterable[str] | None = None) -> WarmingReport:
        """Run every job (or only those in ``names``) now and report how each went.

        At most ``concurrency`` jobs run at the same time. A job already
        running (in the background schedule) is waited for, then run again:
        a job never runs concurrently with itself. Failures are reported,
        not raised.

        Raises:
            ValueError: ``names`` holds an unknown name, or is a bare string.
        """
        if isinstance(names, str):
            raise ValueError(f"names must be a list of job names, not a str: write names=[{names!r}]")
        jobs = list(self._jobs.values()) if names is None else [self._get(n) for n in dict.fromkeys(names)]
        state = self._loop_state()
        began = time.perf_counter()
        reports = await asyncio.gather(*(self._run_now(job, state) for job in jobs))
        report = WarmingReport(tuple(reports), time.perf_counter() - began)
        logger.info(
            "tagcache: warmed %d job(s) of cache %r: %d failed, %d entries written in %.3f s",
            len(report.jobs),
            self._cache.namespace,
            len(report.failed),
            report.entries_written,
            report.duration,
        )
        return report

    def start(self) -> None:
        """Start the background schedule: one task per job registered with ``every``.

        Must be called with an event loop running. A job's next run starts
        only after its previous run finished; runs that fall due meanwhile are
        skipped and counted in :meth:`stats`. Each run is logged at INFO.

        Raises:
            RuntimeError: the warmer is already started, or no event loop is running.
        """
        if self._started:
            raise RuntimeError("CacheWarmer is already started; call stop() first")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "CacheWarmer.start() needs a running event loop: call it from async code, "
                "or use 'async with warmer.running():'"
            ) from None
        state = self._loop_state()
        self._started = True
        for job in self._jobs.values():
            if job.every is not None:
                self._spawn_scheduler(job, state)
        logger.info(
            "tagcache: warming of cache %r started (%d periodic job(s))",
            self._cache.namespace,
            len(self._schedulers),
        )

    async def stop(self) -> None:
        """Stop the background schedule and wait for running jobs.

        No run starts after this is called. Runs in progress get up to
        ``stop_timeout`` seconds to finish, then are cancelled. A no-op when
        the warmer is not started.
        """
        if not self._started:
            return
        self._started = False
        schedulers = list(self._schedulers.values())
        self._schedulers.clear()
        for task in schedulers:
            task.cancel()
        # Cancelling a scheduler leaves the run it is waiting for going.
        await asyncio.gather(*schedulers, return_exceptions=True)
        running = set(self._inflight)
        try:
            if running:
                _, pending = await asyncio.wait(running, timeout=self._stop_timeout)
                if pending:
                    logger.warning(
                        "tagcache: cancelling %d warming job(s) still running after stop_timeout=%s s",
                        len(pending),
                        self._stop_timeout,
                    )
                    await _cancel_all(pending)
        except asyncio.CancelledError:
            await _cancel_all(running)
            raise
        logger.info("tagcache: warming of cache %r stopped", self._cache.namespace)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """``async with warmer.running():`` starts the schedule on enter and stops it on exit."""
        self.start()
        try:
            yield
        finally:
            await self.stop()

    def lifespan(self, app: object) -> AbstractAsyncContextManager[None]:
        """A Starlette/FastAPI lifespan: ``FastAPI(lifespan=warmer.lifespan)``.

        Starts the schedule when the application starts and stops it (waiting
        for running jobs) when it shuts down. ``app`` is not used. To combine
        with a lifespan of your own, enter ``warmer.running()`` inside it.
        """
        return self.running()

    def __repr__(self) -> str:
        state = "started" if self._started else "stopped"
        return f"CacheWarmer({self._cache!r}, jobs={list(self._jobs)}, {state})"

    # ------------------------------------------------------------------ internals

    def _get(self, name: str) -> _Job:
        job = self._jobs.get(name)
        if job is None:
            known = ", ".join(repr(n) for n in self._jobs) or "none"
            raise ValueError(f"no warming job named {name!r}; registered: {known}")
        return job

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopState(loop, self._concurrency)
        return self._state

    async def _run_now(self, job: _Job, state: _LoopState) -> JobReport:
        async with state.lock(job.name), state.semaphore:
            return await self._execute(job, periodic=False)

    def _spawn_scheduler(self, job: _Job, state: _LoopState) -> None:
        task = state.loop.create_task(self._schedule(job, state), name=f"tagcache-warming:{job.name}")
        task.add_done_callback(_scheduler_done)
        self._schedulers[job.name] = task

    async def _schedule(self, job: _Job, state: _LoopState) -> None:
        assert job.every is not None
        loop = asyncio.get_running_loop()
        due = loop.time() if self._run_on_start else loop.time() + self.next_delay(job.name)
        lock = state.lock(job.name)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if lock.locked():  # running from run_once()
                job.skipped += 1
            else:
                await lock.acquire()
                try:
                    await state.semaphore.acquire()
                except BaseException:
                    lock.release()
                    raise
                run = loop.create_task(self._execute_and_release(job, state, lock))
                self._inflight.add(run)
                run.add_done_callback(self._inflight.discard)
                await asyncio.wait({run})
            due += self.next_delay(job.name)
            now = loop.time()
            if due <= now:  # the run outlived its period: skip the runs that fell due
                missed = int((now - due) // job.every) + 1
                job.skipped += missed
                due += missed * job.every

    async def _execute_and_release(self, job: _Job, state: _LoopState, lock: asyncio.Lock) -> JobReport:
        try:
            return await self._execute(job, periodic=True)
        finally:
            state.semaphore.release()
            lock.release()

    async def _execute(self, job: _Job, *, periodic: bool) -> JobReport:
        started_at = datetime.now(timezone.utc)
        began = time.perf_counter()
        error: str | None = None
        with count_writes() as written:
            # A task of its own (it inherits the write counter): a timeout
            # cancels it, and a job cancelling itself is told from a stop.
            task = asyncio.ensure_future(_invoke(job.fn))
            try:
                done, _ = await asyncio.wait({task}, timeout=job.timeout)
            except asyncio.CancelledError:
                await _cancel_all({task})
                raise
            if not done:
                await _cancel_all({task})
                error = f"timed out after {job.timeout:g} s"
                logger.error("tagcache: warming job %r %s", job.name, error)
            elif task.cancelled():
                error = "CancelledError: the job was cancelled"
                logger.error("tagcache: warming job %r was cancelled", job.name)
            else:
                exc = task.exception()
                if exc is not None:
                    error = _error_text(exc)
                    logger.error("tagcache: warming job %r failed: %s", job.name, error, exc_info=exc)
        report = JobReport(
            name=job.name,
            ok=error is None,
            error=error,
            entries_written=written.written,
            duration=time.perf_counter() - began,
            started_at=started_at,
            entries_not_stored=written.not_stored,
        )
        job.runs += 1
        if error is not None:
            job.failures += 1
        job.entries_written += report.entries_written
        job.entries_not_stored += report.entries_not_stored
        self._last_reports[job.name] = report
        log = logger.info if periodic else logger.debug
        log(
            "tagcache: warming job %r %s in %.3f s: entries_written=%d entries_not_stored=%d runs=%d "
            "failures=%d skipped=%d",
            job.name,
            "done" if error is None else "failed",
            report.duration,
            report.entries_written,
            report.entries_not_stored,
            job.runs,
            job.failures,
            job.skipped,
        )
        return report


def _scheduler_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "tagcache: warming schedule %s stopped by an error", task.get_name(), exc_info=task.exception()
        )


async def _cancel_all(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have finished."""
    tasks = set(tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
