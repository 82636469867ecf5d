"""The examples run: the FastAPI example app (memory:// and real Redis), examples/minimal.py,
and the demo's figures (examples/demo.py), checked on what they count, never on speed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tagcache import Cache

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import demo  # noqa: E402
from fastapi_app import Settings, create_app  # noqa: E402
from fastapi_app import loader as app_loader  # noqa: E402
from fastapi_app import services as app_services  # noqa: E402
from fastapi_app import warming as app_warming  # noqa: E402
from fastapi_app.caching import NAMESPACE, cache  # noqa: E402
from fastapi_app.schemas import UserUpdate  # noqa: E402
from fastapi_app.seed import seed  # noqa: E402

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def clear_namespace(url: str) -> None:
    if url.startswith("redis"):
        async with Cache.from_url(url, namespace=NAMESPACE) as admin:
            await admin.clear()


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def settings(tmp_path: Path, cache_url: str) -> Settings:
    return Settings(
        cache_url=cache_url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        admin_token=TOKEN,
        warm_users=5,
    )


@asynccontextmanager
async def started(settings: Settings, users: int = 20) -> AsyncIterator[httpx.AsyncClient]:
    """The app on fresh tables with ``users`` users, its lifespan running, and a client."""
    await clear_namespace(settings.cache_url)
    app = create_app(settings)
    await app.state.db.create_tables()
    await seed(app.state.db, users, seed=7)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://example.test") as client:
                yield client
    finally:
        await clear_namespace(settings.cache_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with started(settings) as c:
        yield c


def app_of(client: httpx.AsyncClient) -> Any:
    transport = client._transport
    assert isinstance(transport, httpx.ASGITransport)
    return transport.app


def statements(client: httpx.AsyncClient) -> int:
    count: int = app_of(client).state.db.statements
    return count


def first_project(page: dict[str, Any]) -> int:
    assert page["projects"], "seed 7 gives user 1 a project"
    project_id: int = page["projects"][0]["id"]
    return project_id


# ---------------------------------------------------------------------- the app


async def test_warming_ran_at_start_up(client: httpx.AsyncClient) -> None:
    report = app_of(client).state.warming
    assert report is not None
    assert report.ok, report.as_dict()
    assert [job.name for job in report.jobs] == ["all_user_pages", "user_directory"]
    assert report.entries_written > 0
    assert set(app_of(client).state.warming.as_dict()["jobs"][0]) >= {"name", "entries_written"}
    # Every user's pages are cached: reading them costs no SQL.
    before = statements(client)
    for user_id in range(1, 21):
        page = (await client.get(f"/api/v1/users/{user_id}")).json()
        for project in page["projects"]:
            assert (await client.get(f"/api/v1/users/{user_id}/projects/{project['id']}")).status_code == 200
    assert statements(client) == before


async def test_start_up_warms_only_the_active_users_without_warm_all(settings: Settings) -> None:
    async with started(settings.with_overrides(warm_all=False)) as client:
        report = app_of(client).state.warming
        assert [job.name for job in report.jobs] == ["active_user_pages", "user_directory"]
        assert report.ok, report.as_dict()


async def test_a_request_runs_single_row_statements(client: httpx.AsyncClient) -> None:
    """Through the loader, a miss of one page costs what a direct query costs: two statements."""
    await cache.clear()
    before = statements(client)
    page = (await client.get("/api/v1/users/1")).json()
    assert statements(client) - before == 2  # the user, their projects
    before = statements(client)
    assert (await client.get(f"/api/v1/users/1/projects/{first_project(page)}")).status_code == 200
    assert statements(client) - before == 1  # the project; the owner's row is in the query cache
    before = statements(client)
    assert (await client.get("/api/v1/users/999")).status_code == 404
    assert statements(client) - before == 1  # no user: no projects query


async def test_warming_batches_its_queries_one_at_a_time(client: httpx.AsyncClient) -> None:
    """Warming 20 users costs a few statements, never two at once on the warming session."""
    db = app_of(client).state.db
    await cache.clear()
    in_flight: list[int] = [0]
    batches: list[tuple[str, int]] = []

    async def hook(kind: str, stage: str, keys: Any) -> None:
        if stage == "before":
            assert in_flight[0] == 0, "two queries at once on one session"
            in_flight[0] += 1
            batches.append((kind, len(keys)))
        else:
            in_flight[0] -= 1

    token = app_loader.QUERY_HOOK.set(hook)
    try:
        before = statements(client)
        await app_warming.warm_users(db, list(range(1, 21)))
        spent = statements(client) - before
    finally:
        app_loader.QUERY_HOOK.reset(token)
    # One query per kind of row for the whole batch; on Redis the first refresh's lease
    # comes back alone (the others travel in the next pipeline), so its id may be read apart.
    assert spent <= len(batches) <= 10, batches  # a one-id batch may hit the query cache
    assert max(n for kind, n in batches if kind == "users") >= 19, batches
    assert max(n for kind, n in batches if kind == "projects_of") >= 19, batches
    before = statements(client)
    for user_id in range(1, 21):
        assert (await client.get(f"/api/v1/users/{user_id}")).status_code == 200
    assert statements(client) == before


async def test_batcher_survives_its_leader_being_cancelled() -> None:
    """The other callers of a batch get their values when its leader is cancelled, before
    its batch is taken or during its query; a failing query fails every caller of it."""
    started, release = asyncio.Event(), asyncio.Event()
    fetched: list[list[int]] = []

    async def fetch(keys: list[int]) -> dict[int, int]:
        fetched.append(keys)
        started.set()
        if len(fetched) == 1:
            await release.wait()  # the first query hangs (until cancelled)
        if -1 in keys:
            raise LookupError("no -1")
        return {k: k * 10 for k in keys}

    batcher = app_loader.Batcher[int, int]("test", fetch, asyncio.Lock())
    # Cancelled during its query: the others are read again in a new batch.
    leader = asyncio.create_task(batcher.load(1))
    others = [asyncio.create_task(batcher.load(k)) for k in (2, 3)]
    await started.wait()
    leader.cancel()
    assert await asyncio.gather(*others) == [20, 30]
    assert leader.cancelled()
    assert fetched[1:] == [[2, 3]]
    # Cancelled before taking its batch (waiting for the lock): the others still get theirs.
    lock = asyncio.Lock()
    batcher = app_loader.Batcher[int, int]("test", fetch, lock)
    await lock.acquire()
    leader = asyncio.create_task(batcher.load(4))
    others = [asyncio.create_task(batcher.load(k)) for k in (5, 5)]
    for _ in range(20):  # ticks: the leader gathers its batch, then waits for the lock
        await asyncio.sleep(0)
    leader.cancel()
    await asyncio.sleep(0)
    lock.release()
    assert await asyncio.gather(*others) == [50, 50]
    assert fetched[-1] == [5]  # no caller waits for 4 any more
    # A failing query fails each of its callers.
    failing = await asyncio.gather(batcher.load(-1), batcher.load(6), return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in failing)


@pytest.mark.parametrize("stage", ["before", "after"])
@pytest.mark.parametrize("invalidates", [True, False], ids=["invalidating", "not-invalidating"])
async def test_warming_never_stores_a_page_older_than_a_write(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, stage: str, invalidates: bool
) -> None:
    """A write (commit, then invalidation) lands between the snapshots of a warming batch
    and its query ("before"), or between its query and the fills ("after"): no page
    older than the write stays cached. Without the invalidation ("not-invalidating", a
    broken app), the "after" case leaves the old page cached: the test sees it."""
    db = app_of(client).state.db
    await cache.clear()
    if not invalidates:

        async def forget(tags: Any) -> None:
            return None

        monkeypatch.setattr(app_services, "invalidate", forget)
    written: list[int] = []

    async def hook(kind: str, when: str, keys: Any) -> None:
        if kind == "users" and when == stage and 1 in keys and not written:
            async with db.sessions() as session:  # another session: a concurrent request
                user = await app_services.update_user(session, 1, UserUpdate(name="Written Meanwhile"))
            assert user is not None
            written.append(user.version)

    token = app_loader.QUERY_HOOK.set(hook)
    try:
        await app_warming.warm_users(db, [1, 2, 3])
    finally:
        app_loader.QUERY_HOOK.reset(token)
    assert written, "the hook did not run"
    async with db.sessions() as session:
        cached_page = await cache.get(app_services.get_user_page.key_for(session, 1))
        other_page = await cache.get(app_services.get_user_page.key_for(session, 2))
        served = await app_services.get_user_page(session, 1)
    assert other_page is not None  # the rest of the batch was stored
    assert served is not None
    if invalidates or stage == "before":
        # "before": the query read the written row; "after": the fill was refused.
        assert served.user.version == written[0]
        assert served.user.name == "Written Meanwhile"
        assert cached_page is None or cached_page.user.version == written[0]
        response = (await client.get("/api/v1/users/1")).json()
        assert response["user"]["version"] == written[0]
    else:
        assert served.user.version < written[0]  # stale: what the check above rules out


async def test_second_read_is_served_by_the_response_cache(client: httpx.AsyncClient) -> None:
    first = await client.get("/api/v1/users/1")
    assert first.status_code == 200
    assert "age" not in first.headers
    assert first.headers["cache-control"] == "no-cache"
    before = statements(client)
    second = await client.get("/api/v1/users/1")
    assert second.status_code == 200
    assert "age" in second.headers  # served from the response cache
    assert second.json() == first.json()
    assert statements(client) == before  # no SQL
    responses = cache.function_stats()["tagcache.ResponseCache"]
    assert responses.hits >= 1


async def test_etag_gives_304(client: httpx.AsyncClient) -> None:
    first = await client.get("/api/v1/users/2")
    etag = first.headers["etag"]
    revalidated = await client.get("/api/v1/users/2", headers={"If-None-Match": etag})
    assert revalidated.status_code == 304
    assert revalidated.content == b""
    assert revalidated.headers["etag"] == etag


async def test_user_update_invalidates_every_page_showing_the_user(client: httpx.AsyncClient) -> None:
    page = (await client.get("/api/v1/users/1")).json()
    project_id = first_project(page)
    project_url = f"/api/v1/users/1/projects/{project_id}"
    assert (await client.get(project_url)).json()["owner"]["name"] == page["user"]["name"]
    await client.get(project_url)  # cached now

    updated = await client.patch("/api/v1/users/1", json={"name": "Grace Hopper"})
    assert updated.status_code == 200
    assert updated.json()["version"] == page["user"]["version"] + 1

    fresh = (await client.get("/api/v1/users/1")).json()
    assert fresh["user"]["name"] == "Grace Hopper"
    assert fresh["user"]["version"] == updated.json()["version"]
    owner = (await client.get(project_url)).json()["owner"]
    assert owner == {"id": 1, "name": "Grace Hopper", "version": updated.json()["version"]}


async def test_project_writes_show_on_the_user_page(client: httpx.AsyncClient) -> None:
    page = (await client.get("/api/v1/users/1")).json()
    project_id = first_project(page)

    changed = await client.patch(f"/api/v1/users/1/projects/{project_id}", json={"status": "archived"})
    assert changed.status_code == 200
    shown = {p["id"]: p for p in (await client.get("/api/v1/users/1")).json()["projects"]}
    assert shown[project_id]["status"] == "archived"
    assert shown[project_id]["version"] == changed.json()["version"]

    created = await client.post("/api/v1/users/1/projects", json={"name": "new-one"})
    assert created.status_code == 201
    new_id = created.json()["id"]
    assert new_id in {p["id"] for p in (await client.get("/api/v1/users/1")).json()["projects"]}
    assert (await client.get(f"/api/v1/users/1/projects/{new_id}")).status_code == 200

    assert (await client.delete(f"/api/v1/users/1/projects/{new_id}")).status_code == 204
    assert (await client.get(f"/api/v1/users/1/projects/{new_id}")).status_code == 404
    assert new_id not in {p["id"] for p in (await client.get("/api/v1/users/1")).json()["projects"]}


async def test_concurrent_writes_on_sqlite_queue_instead_of_racing(client: httpx.AsyncClient) -> None:
    """SQLite has one writer at a time: the app's writes wait their turn on one lock
    (db.writing) instead of polling SQLite's lock (which can fail with "database is locked")
    and losing optimistic-locking races."""
    version = (await client.get("/api/v1/users/1")).json()["user"]["version"]
    writes = (client.patch("/api/v1/users/1", json={"bio": f"b{i}"}) for i in range(20))
    updates = await asyncio.gather(*writes)
    assert [r.status_code for r in updates] == [200] * 20
    assert sorted(r.json()["version"] for r in updates) == list(range(version + 1, version + 21))
    assert (await client.get("/api/v1/users/1")).json()["user"]["version"] == version + 20


async def test_user_lifecycle_and_directory(client: httpx.AsyncClient) -> None:
    directory = (await client.get("/api/v1/users", params={"limit": 5})).json()
    assert directory["total"] == 20
    assert [u["id"] for u in directory["items"]] == [1, 2, 3, 4, 5]
    assert (await client.get("/api/v1/users/21")).status_code == 404  # None is cached too

    created = await client.post("/api/v1/users", json={"name": "Edsger", "email": "ewd@example.com"})
    assert created.status_code == 201
    user_id = created.json()["id"]
    assert user_id == 21
    assert (await client.get("/api/v1/users/21")).status_code == 200  # the cached None is gone
    assert (await client.get("/api/v1/users", params={"limit": 5})).json()["total"] == 21
    duplicate = await client.post("/api/v1/users", json={"name": "Again", "email": "ewd@example.com"})
    assert duplicate.status_code == 409

    assert (await client.delete("/api/v1/users/21")).status_code == 204
    assert (await client.get("/api/v1/users/21")).status_code == 404
    assert (await client.get("/api/v1/users", params={"limit": 5})).json()["total"] == 20
    assert (await client.delete("/api/v1/users/21")).status_code == 404


async def test_admin_api_needs_the_token(client: httpx.AsyncClient) -> None:
    refused = await client.get("/api/v1/cache/stats")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    wrong = await client.get("/api/v1/cache/stats", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert (await client.post("/api/v1/cache/clear", json={})).status_code == 401

    await client.get("/api/v1/users/3")
    stats = await client.get("/api/v1/cache/stats", headers=AUTH)
    assert stats.status_code == 200
    body = stats.json()
    assert body["namespace"] == NAMESPACE
    assert "tagcache.ResponseCache" in body["functions"]

    cleared = await client.post("/api/v1/cache/clear-tags", json={"tags": ["user:3"]}, headers=AUTH)
    assert cleared.status_code == 200
    again = await client.get("/api/v1/users/3")
    assert "age" not in again.headers  # the response was invalidated: rendered again


async def test_admin_api_is_closed_without_a_configured_token(settings: Settings) -> None:
    async with started(settings.with_overrides(admin_token=None)) as client:
        assert (await client.get("/api/v1/cache/stats", headers=AUTH)).status_code == 403


async def test_metrics_expose_tagcache_and_database_figures(client: httpx.AsyncClient) -> None:
    await client.get("/api/v1/users/4")
    await client.get("/api/v1/users/4")
    metrics = await client.get("/metrics/")
    assert metrics.status_code == 200
    text = metrics.text
    assert f'tagcache_hits_total{{namespace="{NAMESPACE}"}}' in text
    assert 'function="tagcache.ResponseCache"' in text
    assert "example_db_statements_total" in text
    assert metrics.headers["cache-control"] == "no-store"


async def test_caching_off_runs_the_same_endpoints_and_sql(settings: Settings) -> None:
    async with started(settings.with_overrides(caching=False)) as client:
        assert app_of(client).state.warming is None
        first = await client.get("/api/v1/users/1")
        before = statements(client)
        second = await client.get("/api/v1/users/1")
        assert second.status_code == 200
        assert second.json() == first.json()
        assert "age" not in second.headers
        assert statements(client) - before == 2  # the user and their projects, every time
        assert second.headers["etag"] == first.headers["etag"]  # browser caching headers still apply
        updated = await client.patch("/api/v1/users/1", json={"bio": "off"})
        assert updated.status_code == 200
        assert (await client.get("/api/v1/users/1")).json()["user"]["bio"] == "off"
        assert cache.function_stats()["fastapi_app.services.get_user_page"].hits == 0  # reset at start-up


def test_settings_from_environment() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://127.0.0.1:6379/3",
            "DATABASE_URL": "postgresql+asyncpg://u@h/db",
            "ADMIN_TOKEN": "t",
            "CACHING": "off",
            "WARM_ALL": "0",
            "WARM_USERS": "7",
        }
    )
    assert settings.cache_url == "redis://127.0.0.1:6379/3"
    assert settings.database_url == "postgresql+asyncpg://u@h/db"
    assert settings.admin_token == "t"
    assert settings.caching is False
    assert settings.warm_users == 7
    assert settings.warm_all is False
    assert Settings().warm_all is True
    assert Settings.from_env({}) == Settings()
    with pytest.raises(ValueError, match="boolean"):
        Settings.from_env({"CACHING": "maybe"})


# ---------------------------------------------------------------------- minimal.py


def test_minimal_example_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "minimal.py")], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "first call:  {'name': 'Ada'} (loaded from the database: 1)"
    assert lines[1] == "second call: {'name': 'Ada'} (a hit: still 1 load)"
    assert lines[2] == "after write: {'name': 'Ada Lovelace'} (reloaded: 2 loads)"
    assert lines[3] == "hits 1, misses 2, hit ratio 33%"


# ---------------------------------------------------------------------- the demo


async def test_demo_quick_mode_figures() -> None:
    options, _ = demo.parse_args(["--quick", "--no-progress"])
    assert (options.users, options.requests, options.clients) == (1000, 500, 10)
    figures = await demo.run_demo(options)
    base, cached = figures.no_cache, figures.tagcache
    for run in (base, cached):
        assert run.requests == run.reads + run.writes == 500
        assert run.errors == 0
        assert run.stale_reads == 0
        assert len(run.probe_read_latencies_ms) == 100
        assert sum(run.requests_by_kind.values()) == 500
    # the same request sequence in both runs
    assert (base.reads, base.writes, base.first_reads) == (cached.reads, cached.writes, cached.first_reads)
    assert base.statements_per_request >= 1.9  # every request reaches the database
    assert base.response_hit_ratio is None
    # The cached run starts warm: every user's pages, for a few statements per 500 users.
    assert cached.warming is not None
    assert cached.warming["entries_written"] > 3000
    assert cached.warming["statements"] < 50
    assert figures.load_reduction > 0.8  # about -95% (-89% to -95% over seeds)
    assert cached.statements_per("first read") < 0.5
    assert cached.statements_per("repeat read") < base.statements_per("repeat read") / 5
    assert cached.response_hit_ratio is not None and cached.response_hit_ratio > 0.3
    assert cached.memory_bytes is not None and cached.memory_bytes > 0
    assert figures.failures() == []
    report = demo.format_report(figures)
    assert "| database load (statements/request)" in report
    assert "| start-up warming (before the measured run)" in report
    assert "the cached run starts warm" in report
    assert "stale reads (must be 0)" in report


async def test_demo_on_redis_writes_json(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    argv = ["--redis", redis_url, "--users", "200", "--requests", "300", "--clients", "4", "--probe", "20"]
    options, _ = demo.parse_args([*argv, "--no-progress"])
    figures = await demo.run_demo(options)
    out.write_text(json.dumps(figures.as_dict()))
    data = json.loads(out.read_text())
    assert data["failures"] == []
    assert data["tagcache"]["stale_reads"] == 0
    assert data["database_load_reduction"] > 0
    assert data["tagcache"]["memory_bytes"] > 0
    assert data["tagcache"]["memory_label"].startswith("MEMORY USAGE")
    async with Cache.from_url(redis_url, namespace=NAMESPACE) as check:
        assert await check.keys("*") == []  # the demo cleans its namespace up


def test_demo_main_exit_code_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figures.json"
    argv = ["--users", "100", "--requests", "150", "--clients", "3", "--probe", "10", "--no-progress"]
    assert demo.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target 0 stale reads: met" in printed
    data = json.loads(out.read_text())
    assert set(data) >= {"no_cache", "tagcache", "database_load_reduction", "targets", "failures"}


def test_stale_read_detection() -> None:
    confirmed = demo.Confirmed()
    confirmed.wrote("user:1", 2)
    as_of = confirmed.seq
    confirmed.wrote("user:1", 3)  # returned after the read began: either version is fine
    page = {"user": {"id": 1, "version": 2}, "projects": [{"id": 5, "version": 1}]}
    op = demo.Op("read_user", 1)
    assert demo.stale_reason(op, page, confirmed, as_of) is None
    assert demo.stale_reason(op, page, confirmed, confirmed.seq) is not None
    confirmed.created(1, 6)
    reason = demo.stale_reason(op, {**page, "user": {"id": 1, "version": 3}}, confirmed, confirmed.seq)
    assert reason is not None and "[6]" in reason


async def test_demo_detects_a_missing_invalidation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With the services' tag invalidation removed, the demo sees stale pages: the check works."""

    async def forget(tags: Any) -> None:
        return None

    monkeypatch.setattr(app_services, "invalidate", forget)
    options = demo.DemoOptions(users=50, requests=600, clients=1, probe=0, progress=False)
    url = f"sqlite+aiosqlite:///{tmp_path / 'stale.db'}"
    figures, _ = await demo.run_once(options, True, url, None, demo.MEMORY_URL)
    assert figures.stale_reads > 0
    assert figures.stale_examples


def test_demo_plot_without_matplotlib_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert demo.main(["--quick", "--plot", "latency.png"]) == 2  # before any work
    assert "pip install -e '.[plot]'" in capsys.readouterr().err
