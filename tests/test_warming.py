"""CacheWarmer: one-off and periodic runs, reports, bounds, timeouts and lifecycle."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from tagcache import Cache, ConfigurationError
from tagcache.testing import cache_fixture
from tagcache.warming import CacheWarmer, JobReport, WarmingReport

cache = cache_fixture()

#: Upper bound for waiting on something that should happen within milliseconds.
PATIENCE = 5.0


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds (fails the test after PATIENCE seconds)."""

    async def poll() -> None:
        while not predicate():  # noqa: ASYNC110  # the counters polled belong to the jobs under test
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), PATIENCE)


class Gauge:
    """Counts how many instances of something run at once, and the most seen."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.finished = 0

    async def hold(self, seconds: float) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.active -= 1
            self.finished += 1


# ---------------------------------------------------------------------- run_once


async def test_run_once_runs_every_job_and_counts_entries_written(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    calls: list[str] = []

    @warmer.job(every=3600)
    async def sets_three() -> None:
        calls.append("sets_three")
        for i in range(3):
            await cache.set(f"a:{i}", i, tags=["a"])

    async def load() -> str:
        return "v"

    @warmer.job
    async def get_or_set_two() -> None:
        calls.append("get_or_set_two")
        await cache.get_or_set("b:1", load, tags=["b"])
        await cache.get_or_set("b:2", load, tags=["b"])
        await cache.get_or_set("b:1", load, tags=["b"])  # a hit: writes nothing

    async def in_tasks() -> None:
        calls.append("in_tasks")
        tasks = [asyncio.create_task(cache.set(f"c:{i}", i)) for i in range(4)]
        await asyncio.gather(*tasks)

    async def writes_nothing() -> None:
        calls.append("writes_nothing")
        await cache.get("a:0")

    warmer.add(in_tasks, name="tasks")
    warmer.add(writes_nothing)

    report = await warmer.run_once()

    assert isinstance(report, WarmingReport)
    assert sorted(calls) == sorted(["sets_three", "get_or_set_two", "in_tasks", "writes_nothing"])
    assert [job.name for job in report.jobs] == ["sets_three", "get_or_set_two", "tasks", "writes_nothing"]
    assert {job.name: job.entries_written for job in report.jobs} == {
        "sets_three": 3,
        "get_or_set_two": 2,
        "tasks": 4,
        "writes_nothing": 0,
    }
    assert report.ok and report.failed == ()
    assert report.entries_written == 9
    assert all(job.ok and job.error is None for job in report.jobs)
    assert report["tasks"].entries_written == 4
    assert await cache.get("c:3") == 3
    assert all(job.started_at.tzinfo is not None for job in report.jobs)
    # Serialisable as is.
    data = json.loads(json.dumps(report.as_dict()))
    assert data["ok"] is True and data["entries_written"] == 9
    assert [job["name"] for job in data["jobs"]] == list(warmer.jobs)
    datetime.fromisoformat(data["jobs"][0]["started_at"])
    assert warmer.last_reports["sets_three"] == report["sets_three"]
    stats = warmer.stats()
    assert {name: (s.runs, s.failures, s.entries_written) for name, s in stats.items()} == {
        "sets_three": (1, 0, 3),
        "get_or_set_two": (1, 0, 2),
        "tasks": (1, 0, 4),
        "writes_nothing": (1, 0, 0),
    }
    assert stats["sets_three"].as_dict()["every"] == 3600.0


async def test_entries_are_counted_per_run(cache: Cache) -> None:
    warmer = CacheWarmer(cache)

    @warmer.job
    async def fill() -> None:
        await cache.set("k", 1)

    first = await warmer.run_once()
    second = await warmer.run_once()
    assert first.entries_written == second.entries_written == 1
    assert warmer.stats()["fill"].runs == 2
    assert warmer.stats()["fill"].entries_written == 2


async def test_run_once_without_jobs_is_an_empty_successful_report(cache: Cache) -> None:
    report = await CacheWarmer(cache).run_once()
    assert report.jobs == () and report.ok and report.entries_written == 0


async def test_failing_job_is_reported_and_logged_and_others_still_run(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    warmer = CacheWarmer(cache, concurrency=1)

    @warmer.job
    async def broken() -> None:
        await cache.set("before", 1)
        raise ValueError("database is down")

    @warmer.job
    async def healthy() -> None:
        await cache.set("x", 1)
        await cache.set("y", 2)

    with caplog.at_level(logging.ERROR, logger="tagcache"):
        report = await warmer.run_once()

    assert not report.ok
    assert report.failed == (report["broken"],)
    assert report["broken"].error == "ValueError: database is down"
    assert report["broken"].entries_written == 1
    assert report["healthy"].ok and report["healthy"].entries_written == 2
    assert await cache.get("y") == 2
    failures = [r for r in caplog.records if r.name == "tagcache" and r.levelno == logging.ERROR]
    assert len(failures) == 1
    assert "broken" in failures[0].getMessage()
    assert failures[0].exc_info is not None and isinstance(failures[0].exc_info[1], ValueError)
    assert warmer.stats()["broken"].failures == 1
    assert warmer.stats()["healthy"].failures == 0


async def test_exception_without_message_is_named(cache: Cache) -> None:
    warmer = CacheWarmer(cache)

    @warmer.job
    async def bare() -> None:
        raise KeyError

    assert (await warmer.run_once())["bare"].error == "KeyError"


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_concurrency_bound_holds(cache: Cache, concurrency: int) -> None:
    warmer = CacheWarmer(cache, concurrency=concurrency)
    gauge = Gauge()
    for i in range(7):
        warmer.add(functools.partial(gauge.hold, 0.02), name=f"job{i}")

    report = await warmer.run_once()

    assert report.ok and len(report.jobs) == 7
    assert gauge.finished == 7
    assert gauge.peak == concurrency


async def test_timeout_cancels_the_job_and_reports_it(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    cancelled = asyncio.Event()

    async def slow() -> None:
        await cache.set("early", 1)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def raises_timeout() -> None:  # a job's own TimeoutError is an ordinary failure
        raise TimeoutError("upstream took too long")

    warmer.add(slow, timeout=0.02)
    warmer.add(raises_timeout, timeout=timedelta(seconds=30))

    @warmer.job(timeout=30)
    async def quick() -> None:
        await cache.set("quick", 1)

    report = await warmer.run_once()

    assert cancelled.is_set()
    assert report["slow"].ok is False
    assert report["slow"].error == "timed out after 0.02 s"
    assert report["slow"].entries_written == 1
    assert report["raises_timeout"].error == "TimeoutError: upstream took too long"
    assert report["quick"].ok and report["quick"].entries_written == 1
    assert warmer.stats()["slow"].failures == 1


async def test_job_cancelling_itself_is_a_failure_not_a_crash(cache: Cache) -> None:
    warmer = CacheWarmer(cache)

    @warmer.job
    async def gives_up() -> None:
        raise asyncio.CancelledError

    @warmer.job
    async def fine() -> None:
        await cache.set("fine", 1)

    report = await warmer.run_once()
    assert report["gives_up"].ok is False
    assert report["gives_up"].error is not None and "Cancelled" in report["gives_up"].error
    assert report["fine"].ok


async def test_names_filter(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    ran: list[str] = []

    for name in ("a", "b", "c"):

        async def job(name: str = name) -> None:
            ran.append(name)

        warmer.add(job, name=name)

    report = await warmer.run_once(names=["c", "a", "c"])
    assert sorted(ran) == ["a", "c"]
    assert [job.name for job in report.jobs] == ["c", "a"]
    assert warmer.stats()["b"].runs == 0

    with pytest.raises(ValueError, match="no warming job named 'zzz'"):
        await warmer.run_once(names=["a", "zzz"])
    with pytest.raises(ValueError, match="not a str"):
        await warmer.run_once(names="a")
    assert sorted(ran) == ["a", "c"]  # nothing ran for the rejected calls

    assert (await warmer.run_once(names=[])).jobs == ()


async def test_report_as_dict_round_trips_a_failure(cache: Cache) -> None:
    warmer = CacheWarmer(cache)

    @warmer.job
    async def oops() -> None:
        raise RuntimeError("no")

    job = (await warmer.run_once()).jobs[0]
    assert isinstance(job, JobReport)
    data = json.loads(json.dumps(job.as_dict()))
    assert data == {**data, "name": "oops", "ok": False, "error": "RuntimeError: no", "entries_written": 0}
    with pytest.raises(AttributeError):
        job.ok = True  # type: ignore[misc]  # frozen dataclass: assignment must fail


# ---------------------------------------------------------------------- periodic


async def test_periodic_job_runs_repeatedly_and_logs_each_run(
    cache: Cache, caplog: pytest.LogCaptureFixture
) -> None:
    warmer = CacheWarmer(cache)
    runs = 0

    @warmer.job(every=0.005, jitter=0)
    async def tick() -> None:
        nonlocal runs
        runs += 1
        await cache.set(f"tick:{runs}", runs)

    with caplog.at_level(logging.INFO, logger="tagcache"):
        warmer.start()
        assert warmer.started
        await eventually(lambda: runs >= 3)
        await warmer.stop()

    assert not warmer.started
    stats = warmer.stats()["tick"]
    assert stats.runs == runs >= 3
    assert stats.entries_written == runs
    assert stats.failures == 0
    assert warmer.last_reports["tick"].ok
    progress = [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "'tick'" in r.getMessage()
    ]
    assert len(progress) == runs
    assert all("entries_written=1 " in message for message in progress)

    after_stop = runs
    await asyncio.sleep(0.03)
    assert runs == after_stop  # nothing runs once stopped


async def test_failing_periodic_job_keeps_its_schedule(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    attempts = 0

    @warmer.job(every=0.005, jitter=0)
    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        raise OSError("unreachable")

    async with warmer.running():
        await eventually(lambda: attempts >= 3)
    stats = warmer.stats()["flaky"]
    assert stats.runs == stats.failures == attempts
    assert warmer.last_reports["flaky"].error == "OSError: unreachable"


async def test_slow_periodic_job_is_never_run_concurrently_with_itself(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    gauge = Gauge()
    warmer.add(functools.partial(gauge.hold, 0.03), every=0.005, jitter=0, name="slow")

    warmer.start()
    await eventually(lambda: gauge.finished >= 3)
    # run_once while the schedule runs the job too: it waits instead of overlapping.
    report = await warmer.run_once()
    await eventually(lambda: gauge.finished >= 6)
    await warmer.stop()

    assert report.ok
    assert gauge.peak == 1
    stats = warmer.stats()["slow"]
    assert stats.runs == gauge.finished
    # Each 30 ms run outlives several 5 ms periods: those runs are skipped, not stacked.
    # (The skip after the last run may not be counted yet when stop() comes.)
    assert stats.skipped >= stats.runs - 2 >= 4


async def test_periodic_runs_share_the_concurrency_bound(cache: Cache) -> None:
    warmer = CacheWarmer(cache, concurrency=2)
    gauge = Gauge()
    for i in range(5):
        warmer.add(functools.partial(gauge.hold, 0.01), every=0.005, jitter=0, name=f"j{i}")

    async with warmer.running():
        await eventually(lambda: all(s.runs >= 2 for s in warmer.stats().values()))
    assert gauge.peak == 2


async def test_only_periodic_jobs_are_scheduled(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    ran: list[str] = []

    @warmer.job(every=0.005)
    async def periodic() -> None:
        ran.append("periodic")

    @warmer.job
    async def manual() -> None:
        ran.append("manual")

    async with warmer.running():
        await eventually(lambda: len(ran) >= 3)
    assert "manual" not in ran


async def test_run_on_start_runs_at_once_and_can_be_turned_off(cache: Cache) -> None:
    ran: list[str] = []

    async def job() -> None:
        ran.append("x")

    eager = CacheWarmer(cache)
    eager.add(job, every=3600)
    async with eager.running():
        await eventually(lambda: ran == ["x"])

    lazy = CacheWarmer(cache, run_on_start=False)
    lazy.add(job, every=3600)
    async with lazy.running():
        await asyncio.sleep(0.03)
    assert ran == ["x"]
    assert lazy.stats()["job"].runs == 0


async def test_stop_waits_for_a_running_job(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    started = asyncio.Event()
    finished = asyncio.Event()

    @warmer.job(every=3600)
    async def long() -> None:
        started.set()
        await asyncio.sleep(0.03)
        await cache.set("done", True)
        finished.set()

    warmer.start()
    await asyncio.wait_for(started.wait(), PATIENCE)
    await warmer.stop()

    assert finished.is_set()
    assert warmer.stats()["long"].runs == 1
    assert warmer.last_reports["long"].entries_written == 1
    assert await cache.get("done") is True


async def test_stop_cancels_jobs_that_outlast_stop_timeout(cache: Cache) -> None:
    warmer = CacheWarmer(cache, stop_timeout=0.02)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @warmer.job(every=3600)
    async def stuck() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    warmer.start()
    await asyncio.wait_for(started.wait(), PATIENCE)
    await asyncio.wait_for(warmer.stop(), PATIENCE)

    assert cancelled.is_set()
    assert warmer.stats()["stuck"].runs == 0  # a cancelled run is not a finished run
    # The slot and the job's lock were given back: the job can run again.
    started.clear()
    stuck_free = asyncio.create_task(warmer.run_once())
    await asyncio.wait_for(started.wait(), PATIENCE)
    stuck_free.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck_free


async def test_stop_during_the_wait_between_runs(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    runs = 0

    @warmer.job(every=3600)
    async def once() -> None:
        nonlocal runs
        runs += 1

    warmer.start()
    await eventually(lambda: runs == 1)
    await warmer.stop()
    assert runs == 1 and not warmer.started


async def test_start_stop_lifecycle_errors(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    await warmer.stop()  # not started: a no-op
    warmer.start()
    with pytest.raises(RuntimeError, match="already started"):
        warmer.start()
    await warmer.stop()
    await warmer.stop()  # twice: still fine
    warmer.start()  # can start again
    await warmer.stop()


def test_start_needs_a_running_loop() -> None:
    from tagcache.testing import memory_cache

    warmer = CacheWarmer(memory_cache())
    with pytest.raises(RuntimeError, match="running event loop"):
        warmer.start()
    assert not warmer.started


async def test_job_added_while_started_is_scheduled(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    ran = asyncio.Event()

    async with warmer.running():

        async def late() -> None:
            ran.set()

        warmer.add(late, every=3600)
        await asyncio.wait_for(ran.wait(), PATIENCE)


async def test_lifespan_starts_and_stops(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    ran = asyncio.Event()

    @warmer.job(every=3600)
    async def warm() -> None:
        ran.set()

    app = object()
    async with warmer.lifespan(app) as state:
        assert state is None
        assert warmer.started
        await asyncio.wait_for(ran.wait(), PATIENCE)
    assert not warmer.started


async def test_running_stops_even_when_the_block_raises(cache: Cache) -> None:
    warmer = CacheWarmer(cache)

    @warmer.job(every=3600)
    async def warm() -> None:
        pass

    async def serve() -> None:
        async with warmer.running():
            assert warmer.started
            raise LookupError

    with pytest.raises(LookupError):
        await serve()
    assert not warmer.started


# ---------------------------------------------------------------------- jitter


class SequenceRandom(random.Random):
    """A Random whose random() returns the given values in turn."""

    def __new__(cls, values: list[float]) -> SequenceRandom:
        # random.Random.__new__ seeds from its arguments on Python 3.10: give it none.
        return super().__new__(cls)

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


async def test_jitter_adds_up_to_a_fraction_of_the_period(cache: Cache) -> None:
    warmer = CacheWarmer(cache, rng=SequenceRandom([0.0, 0.5, 0.999]))

    @warmer.job(every=100, jitter=0.1)
    async def job() -> None:
        pass

    assert [warmer.next_delay("job") for _ in range(3)] == pytest.approx([100.0, 105.0, 109.99])

    seeded = CacheWarmer(cache, rng=random.Random(7))
    seeded.add(job, every=timedelta(minutes=1), jitter=0.5)
    delays = [seeded.next_delay("job") for _ in range(2000)]
    assert all(60.0 <= d <= 90.0 for d in delays)
    assert max(delays) - min(delays) > 25  # the jitter is actually spread

    exact = CacheWarmer(cache)
    exact.add(job, every=2, jitter=0)
    assert {exact.next_delay("job") for _ in range(50)} == {2.0}

    manual = CacheWarmer(cache)
    manual.add(job)
    with pytest.raises(ValueError, match="every=None"):
        manual.next_delay("job")


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -3}, "concurrency"),
        ({"concurrency": 2.5}, "concurrency"),
        ({"concurrency": True}, "concurrency"),
        ({"stop_timeout": -1}, "stop_timeout"),
        ({"stop_timeout": "30"}, "stop_timeout"),
        ({"stop_timeout": float("nan")}, "stop_timeout"),
        ({"run_on_start": "yes"}, "run_on_start"),
        ({"rng": 42}, "rng"),
    ],
)
def test_constructor_validation(options: dict[str, Any], message: str) -> None:
    from tagcache.testing import memory_cache

    with pytest.raises(ConfigurationError, match=message):
        CacheWarmer(memory_cache(), **options)


def test_constructor_requires_a_cache() -> None:
    with pytest.raises(ConfigurationError, match=r"tagcache\.Cache"):
        CacheWarmer("redis://localhost")  # type: ignore[arg-type]  # wrong type on purpose


def test_constructor_accepts_valid_settings(cache: Cache) -> None:
    CacheWarmer(cache, concurrency=1, run_on_start=False, stop_timeout=None)
    CacheWarmer(cache, stop_timeout=0)
    CacheWarmer(cache, stop_timeout=timedelta(seconds=5), rng=random.Random(1))


async def _noop() -> None:
    pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"every": 0}, "every"),
        ({"every": -1}, "every"),
        ({"every": "10"}, "every"),
        ({"every": float("inf")}, "every"),
        ({"every": timedelta(0)}, "every"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": "0.1"}, "jitter"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"name": ""}, "name"),
        ({"name": "a\nb"}, "name"),
    ],
)
def test_job_argument_validation(cache: Cache, options: dict[str, Any], message: str) -> None:
    warmer = CacheWarmer(cache)
    with pytest.raises(ConfigurationError, match=message):
        warmer.add(_noop, **options)
    with pytest.raises(ValueError, match=message):
        warmer.job(**options)(_noop)
    assert warmer.jobs == ()


def test_duplicate_names_are_rejected(cache: Cache) -> None:
    warmer = CacheWarmer(cache)
    warmer.add(_noop)
    with pytest.raises(ValueError, match="'_noop' is already registered"):
        warmer.add(_noop)
    warmer.add(_noop, name="other")
    with pytest.raises(ValueError, match="already registered"):

        @warmer.job(name="other")
        async def another() -> None:
            pass

    assert warmer.jobs == ("_noop", "other")


def test_non_async_callables_are_rejected_by_name(cache: Cache) -> None:
    warmer = CacheWarmer(cache)

    def sync_warm() -> None:
        pass

    with pytest.raises(TypeError, match="sync_warm"):
        warmer.add(sync_warm)  # type: ignore[type-var]  # a sync function on purpose
    with pytest.raises(TypeError, match="sync_warm"):
        warmer.job(every=10)(sync_warm)  # type: ignore[type-var]  # same, through the decorator
    with pytest.raises(TypeError, match="async"):
        warmer.add(42)  # type: ignore[type-var]  # not callable at all
    assert warmer.jobs == ()


def test_decorator_returns_the_function_unchanged(cache: Cache) -> None:
    warmer = CacheWarmer(cache)

    async def plain() -> None:
        pass

    assert warmer.job(every=60)(plain) is plain
    assert warmer.job(_noop) is _noop
    assert warmer.add(functools.partial(_noop), name="partial") is not None

    class Callable_:
        async def __call__(self) -> None:
            pass

    instance = Callable_()
    assert warmer.add(instance) is instance
    assert warmer.jobs == ("plain", "_noop", "partial", "Callable_")
    assert warmer.stats()["plain"].every == 60.0
    assert warmer.stats()["_noop"].every is None
