"""Every code block of the documentation (``docs/**/*.md``) is run or checked here.

Conventions for the pages (mkdocs-material, ``mkdocs build --strict``):

* A fence must name its language; a language this test does not handle fails the
  test, so no block escapes it.
* ```` ```python ```` blocks are executed. The blocks of one page run in page order in
  one namespace (a module registered in ``sys.modules`` while the page runs, so that
  dataclasses and pydantic models defined in a block can be cached), so a later block
  uses the names of earlier ones. Each block is compiled with top-level ``await``
  allowed (``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT``) and every block of a page runs inside
  one fresh event loop.
* ``redis://127.0.0.1:6379/0`` (any database, or ``localhost``) in a block is replaced
  by the test Redis (``TAGCACHE_TEST_REDIS_URL``, or the throwaway server of the
  ``redis_url`` fixture); ``redis+cluster://127.0.0.1:7000/``, ``("127.0.0.1", 7000)``
  and ``port=7000`` by the test Redis Cluster (``redis_cluster_url``). Every
  :class:`tagcache.Cache` created while a page runs gets a namespace unique to the run
  (the page's namespace plus a suffix); afterwards every such cache is closed and its
  namespace cleared on the test Redis.
* Code hidden from the reader is an HTML comment holding Python, run in the page's
  namespace: ``<!-- docs-test: setup`` ... ``-->`` and ``<!-- docs-test: check`` ...
  ``-->`` run at their place in the page (stubs such as a ``db`` object or an engine on
  SQLite before a block; assertions about what a block did after it);
  ``<!-- docs-test: teardown`` ... ``-->`` runs after the page, also when a block failed.
* Blocks that deliberately do not run are fenced as ``text`` (output, diagrams),
  ``toml``, ``yaml``, ``ini`` or ``json`` (these four are parsed); keep them rare.
* ``console``, ``bash`` and ``shell`` blocks hold commands (in ``console``, only lines
  starting with ``$ ``; the other lines are output). ``tagcache ...`` and
  ``python -m tagcache ...`` are parsed with ``tagcache.cli.build_parser()`` (skipped,
  saying so, while ``tagcache.cli`` does not import); ``pip install`` must name extras
  that exist in ``pyproject.toml`` and never install ``tagcache`` from PyPI (it is not
  there); ``python path/to/file.py`` must name a file of the repository.
* Every name in ``__all__`` of each public module appears in the API reference
  (``docs/reference/``): a ``::: module`` directive covers its classes and functions, and
  its data names (such as ``tagcache.MISSING``) when they are documented by a ``#:``
  comment above their assignment (read by ``docs/_hooks/griffe_rest.py``; mkdocstrings
  hides an attribute without documentation); otherwise the name needs a directive of its
  own with ``show_if_no_docstring: true``.
"""

from __future__ import annotations

import ast
import asyncio
import configparser
import contextlib
import importlib
import inspect
import io
import itertools
import json
import os
import re
import shlex
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tagcache import Cache

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))

pytestmark = pytest.mark.skipif(
    not (ROOT / "mkdocs.yml").is_file(), reason="the documentation (mkdocs.yml, docs/) is not in this tree"
)

PUBLIC_MODULES = (
    "tagcache",
    "tagcache.backends",
    "tagcache.testing",
    "tagcache.integrations.sqlalchemy",
    "tagcache.integrations.starlette",
    "tagcache.integrations.prometheus",
    "tagcache.cli",
)

RUN = {"python"}
SHELL = {"console", "bash", "shell"}
DATA = {"text", "toml", "yaml", "ini", "json"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
_HIDDEN = re.compile(r"^[ \t]*<!--[ \t]*docs-test:[ \t]*(?P<kind>\S+)[ \t]*$")
_REDIS = re.compile(r"redis://(?:127\.0\.0\.1|localhost):6379(?:/\d+)?")
_CLUSTER_URL = re.compile(r"redis\+cluster://127\.0\.0\.1:7000/?")
_CLUSTER_PORT = re.compile(r"""(\(\s*["']127\.0\.0\.1["']\s*,\s*|\bport\s*=\s*)7000\b""")
_counter = itertools.count()


@dataclass
class Item:
    """A fenced block (``kind="block"``) or hidden code (``setup``, ``check``, ``teardown``)."""

    kind: str
    lang: str
    code: str
    line: int


def parse_page(path: Path) -> list[Item]:
    """The fenced blocks and hidden code of a page, in page order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    items: list[Item] = []
    i = 0
    while i < len(lines):
        hidden = _HIDDEN.match(lines[i])
        if hidden:
            start = i + 1
            end = start
            while end < len(lines) and "-->" not in lines[end]:
                end += 1
            if end == len(lines):
                raise AssertionError(f"{path.name}:{i + 1}: docs-test comment is not closed with -->")
            body = lines[start:end]
            last = lines[end].split("-->", 1)[0]
            if last.strip():
                body.append(last)
            items.append(Item(hidden["kind"], "python", textwrap.dedent("\n".join(body)), i + 1))
            i = end + 1
            continue
        fence = _FENCE.match(lines[i])
        if fence:
            indent = len(fence["indent"])
            marker = fence["fence"]
            info = fence["info"].strip()
            lang = info.split()[0].lstrip(".{").rstrip("}").lower() if info else ""
            closing = re.compile(rf"^[ \t]*{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$")
            end = i + 1
            while end < len(lines) and not closing.match(lines[end]):
                end += 1
            if end == len(lines):
                raise AssertionError(f"{path.name}:{i + 1}: code fence is not closed")
            body = [_unindent(line, indent) for line in lines[i + 1 : end]]
            items.append(Item("block", lang, "\n".join(body), i + 1))
            i = end + 1
            continue
        i += 1
    return items


def _unindent(line: str, indent: int) -> str:
    stripped = len(line) - len(line.lstrip(" "))
    return line[min(indent, stripped) :]


def page_id(path: Path) -> str:
    return path.relative_to(DOCS).as_posix()


def pages_with(langs: set[str]) -> list[Path]:
    return [p for p in PAGES if any(it.kind == "block" and it.lang in langs for it in parse_page(p))]


def pages_with_python() -> list[Path]:
    return [p for p in PAGES if any(it.lang in RUN for it in parse_page(p))]


# ---------------------------------------------------------------------- every block is handled


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_block_has_a_handled_language(page: Path) -> None:
    handled = RUN | SHELL | DATA
    unhandled = [
        f"line {it.line}: ```{it.lang or '(no language)'}"
        for it in parse_page(page)
        if it.kind == "block" and it.lang not in handled
    ]
    assert not unhandled, (
        f"{page_id(page)} has code blocks this test neither runs nor checks: {unhandled}; "
        f"use one of {sorted(handled)} (see the conventions at the top of tests/test_docs.py)"
    )
    kinds = {it.kind for it in parse_page(page)} - {"block", "setup", "check", "teardown"}
    assert not kinds, f"{page_id(page)}: unknown docs-test comment(s) {sorted(kinds)}"


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", config, re.MULTILINE))
    missing = [page_id(p) for p in PAGES if page_id(p) not in listed]
    assert not missing, f"pages missing from the nav of mkdocs.yml: {missing}"


# ---------------------------------------------------------------------- data blocks


@pytest.mark.parametrize("page", pages_with(DATA), ids=page_id)
def test_data_blocks_parse(page: Path) -> None:
    for it in parse_page(page):
        if it.kind != "block":
            continue
        where = f"{page_id(page)}:{it.line}"
        if it.lang == "json":
            json.loads(it.code)
        elif it.lang == "ini":
            configparser.ConfigParser().read_string(it.code, source=where)
        elif it.lang == "toml" and sys.version_info >= (3, 11):
            import tomllib

            tomllib.loads(it.code)
        elif it.lang == "yaml":
            yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse yaml blocks")
            yaml.safe_load(it.code)


# ---------------------------------------------------------------------- shell blocks


def known_extras() -> set[str]:
    """The extras of ``[project.optional-dependencies]`` (read without tomllib, for Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]", 1)[1]
    section = re.split(r"^\[", section, maxsplit=1, flags=re.MULTILINE)[0]
    return set(re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)\s*=", section, re.MULTILINE))


def shell_commands(item: Item) -> Iterator[str]:
    """The commands of a shell block: ``$ `` lines of a console block, every non-comment line
    of a bash block; continuation lines (ending with ``\\``) joined."""
    pending = ""
    for raw in item.code.splitlines():
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        elif item.lang == "console":
            if not line.startswith("$ "):
                continue
            line = line[2:].strip()
        elif line.startswith("$ "):
            line = line[2:].strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        yield line
    if pending:
        yield pending


def check_pip(argv: list[str], extras: set[str]) -> list[str]:
    problems = []
    args = argv[argv.index("install") + 1 :] if "install" in argv else []
    for arg in args:
        if arg.startswith("-"):
            continue
        match = re.match(r"^(?:\.|tagcache)\[([^\]]*)\]", arg)
        if match:
            named = {e.strip() for e in match[1].split(",") if e.strip()}
            unknown = sorted(named - extras)
            if unknown:
                problems.append(
                    f"{shlex.join(argv)!r} names unknown extras {unknown}; known: {sorted(extras)}"
                )
        if re.match(r"^tagcache(\[|$|[<>=~!])", arg) and "@" not in arg:
            problems.append(f"{shlex.join(argv)!r} installs tagcache from PyPI, where it is not published")
    return problems


def cli_problem(args: list[str]) -> str | None:
    """Why ``tagcache <args>`` does not parse, or ``None``."""
    from tagcache.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            return f"'tagcache {shlex.join(args)}' does not parse: {err.getvalue().strip()}"
    return None


@pytest.mark.parametrize("page", pages_with(SHELL), ids=page_id)
def test_shell_blocks(page: Path) -> None:
    extras = known_extras()
    problems: list[str] = []
    cli_lines: list[tuple[int, list[str]]] = []
    for it in parse_page(page):
        if it.kind != "block" or it.lang not in SHELL:
            continue
        for command in shell_commands(it):
            argv = shlex.split(command, comments=True)
            if not argv:
                continue
            where = f"{page_id(page)}:{it.line}"
            python = argv[0] in ("python", "python3")
            if argv[0] == "tagcache":
                cli_lines.append((it.line, argv[1:]))
            elif python and argv[1:3] == ["-m", "tagcache"]:
                cli_lines.append((it.line, argv[3:]))
            elif argv[0] in ("pip", "pip3") or (python and argv[1:3] == ["-m", "pip"]):
                problems += [f"{where}: {p}" for p in check_pip(argv, extras)]
            elif python and len(argv) > 1 and argv[1].endswith(".py") and not (ROOT / argv[1]).is_file():
                problems.append(f"{where}: {argv[1]} is not a file of the repository")
    assert not problems, "\n".join(problems)
    if cli_lines:
        try:
            importlib.import_module("tagcache.cli")
        except ImportError as exc:
            pytest.skip(f"tagcache.cli does not import yet ({exc}); its command lines are not checked")
        for line, args in cli_lines:
            problem = cli_problem(args)
            if problem:
                problems.append(f"{page_id(page)}:{line}: {problem}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------- python blocks


def _with_url(base: str, query: str) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        return base + (f"?{query}" if query else "")

    return replace


def rewrite(code: str, redis_url: str | None, cluster_port: int | None) -> str:
    """``code`` with the documented server addresses replaced by the test servers'."""
    if redis_url is not None:
        parts = urlsplit(redis_url)
        base = parts._replace(query="").geturl()
        code = _REDIS.sub(_with_url(base, parts.query), code)
        code = re.sub(r"(\?[^\s\"'?]*)\?", r"\1&", code)  # the test URL's query and the block's
    if cluster_port is not None:
        code = _CLUSTER_URL.sub(f"redis+cluster://127.0.0.1:{cluster_port}/", code)
        code = _CLUSTER_PORT.sub(rf"\g<1>{cluster_port}", code)
    return code


class PageRun:
    """Runs the Python of one page: one module namespace, one event loop, unique namespaces."""

    def __init__(self, page: Path, redis_url: str | None, cluster_port: int | None) -> None:
        self.page = page
        self.redis_url = redis_url
        self.cluster_port = cluster_port
        self.suffix = f"-docs{os.getpid()}x{next(_counter)}"
        self.caches: list[Cache] = []
        slug = re.sub(r"\W", "_", page_id(page).removesuffix(".md"))
        self.module = types.ModuleType(f"tagcache_docs_{slug}")
        self.module.__file__ = str(page)
        self.loop = asyncio.new_event_loop()

    @contextlib.contextmanager
    def unique_namespaces(self) -> Iterator[None]:
        original = Cache.__init__
        run = self

        def init(self: Cache, *args: Any, **kwargs: Any) -> None:
            namespace = kwargs.get("namespace", "default")
            if isinstance(namespace, str) and len(namespace + run.suffix) <= 64:
                kwargs["namespace"] = namespace + run.suffix
            original(self, *args, **kwargs)
            run.caches.append(self)

        Cache.__init__ = init  # type: ignore[method-assign]
        try:
            yield
        finally:
            Cache.__init__ = original  # type: ignore[method-assign]

    def run(self, item: Item) -> None:
        code = rewrite(item.code, self.redis_url, self.cluster_port)
        # Padded so that tracebacks name the page and its own line numbers.
        compiled = compile(
            "\n" * item.line + code,
            str(self.page.relative_to(ROOT)),
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
            dont_inherit=True,
        )
        namespace = self.module.__dict__

        async def execute() -> None:
            result = eval(compiled, namespace)
            if compiled.co_flags & inspect.CO_COROUTINE:
                await result

        self.loop.run_until_complete(execute())

    def cleanup(self) -> None:
        async def close_all() -> None:
            for cache in self.caches:
                with contextlib.suppress(Exception):
                    await cache.aclose()
            if self.redis_url is None:
                return
            for namespace in dict.fromkeys(c.namespace for c in self.caches):
                async with Cache.from_url(self.redis_url, namespace=namespace) as cleaner:
                    await cleaner.clear()

        try:
            self.loop.run_until_complete(close_all())
        finally:
            tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


@pytest.mark.parametrize("page", pages_with_python(), ids=page_id)
def test_python_blocks_run(page: Path, request: pytest.FixtureRequest) -> None:
    items = [it for it in parse_page(page) if it.lang in RUN or it.kind != "block"]
    source = "\n".join(it.code for it in items)
    redis_url = request.getfixturevalue("redis_url") if _REDIS.search(source) else None
    cluster_port = None
    if _CLUSTER_URL.search(source) or _CLUSTER_PORT.search(source):
        cluster_port = urlsplit(request.getfixturevalue("redis_cluster_url")).port
    run = PageRun(page, redis_url, cluster_port)
    sys.modules[run.module.__name__] = run.module
    try:
        with run.unique_namespaces():
            failed = False
            try:
                for item in items:
                    if item.kind != "teardown":
                        run.run(item)
            except BaseException:
                failed = True
                raise
            finally:
                for item in items:
                    if item.kind == "teardown":
                        # After a failure, the teardown's own errors would hide it.
                        with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                            run.run(item)
    finally:
        try:
            run.cleanup()
        finally:
            sys.modules.pop(run.module.__name__, None)


# ---------------------------------------------------------------------- API reference


@dataclass
class Directive:
    target: str
    members: list[str] | None
    show_if_no_docstring: bool


def reference_directives() -> list[Directive]:
    """Every ``::: identifier`` directive of the pages, with the options this test reads."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"^:::\s+(\S+)\s*$", line)
            if not match:
                continue
            options = []
            for following in lines[i + 1 :]:
                if following.strip() and not following.startswith((" ", "\t")):
                    break
                options.append(following)
            text = "\n".join(options)
            members = None
            inline = re.search(r"^\s*members:\s*\[([^\]]*)\]", text, re.MULTILINE)
            block = re.search(r"^(\s*)members:\s*\n((?:\1\s+-\s*\S+\s*\n?)+)", text, re.MULTILINE)
            if inline:
                members = [m.strip().strip("\"'") for m in inline[1].split(",") if m.strip()]
            elif block:
                members = re.findall(r"-\s*(\S+)", block[2])
            elif re.search(r"^\s*members:\s*(false|\[\s*\])\s*$", text, re.MULTILINE):
                members = []
            shown = bool(re.search(r"^\s*show_if_no_docstring:\s*true\s*$", text, re.MULTILINE))
            found.append(Directive(match[1], members, shown))
    return found


def public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    ]


def has_comment_docstring(name: str) -> bool:
    """Whether a module-level assignment of ``name`` in ``src/tagcache`` has ``#:`` lines above it."""
    pattern = re.compile(rf"^#:.*\n{re.escape(name)}\s*(?::[^=\n]+)?=", re.MULTILINE)
    return any(pattern.search(path.read_text(encoding="utf-8")) for path in (ROOT / "src").rglob("*.py"))


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_api_reference_covers_every_public_name(module_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if module_name == "tagcache.cli":
            pytest.skip(f"tagcache.cli does not import yet ({exc})")
        raise
    directives = reference_directives()
    missing = []
    for name in public_names(module):
        obj = getattr(module, name)
        shown = inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)
        shown = shown or has_comment_docstring(name)
        covered = any(
            (d.target == f"{module_name}.{name}" and (shown or d.show_if_no_docstring))
            or (
                d.target == module_name
                and (d.members is None or name in d.members)
                and (shown or d.show_if_no_docstring)
            )
            for d in directives
        )
        if not covered:
            missing.append(name)
    assert not missing, (
        f"{module_name}: {missing} not in the API reference (docs/reference/): add a "
        f"'::: {module_name}' directive, or '::: {module_name}.NAME' for data names"
    )
