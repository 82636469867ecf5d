"""Statement keys, read and written tables, primary-key lookups and tags of SQLAlchemy statements.

No database is needed: engines are built from URLs without connecting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    bindparam,
    create_engine,
    delete,
    exists,
    func,
    insert,
    inspect,
    literal_column,
    select,
    text,
    union,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    aliased,
    defaultload,
    immediateload,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
    with_polymorphic,
)
from sqlalchemy.sql.expression import ColumnClause

from tagcache.integrations.sqlalchemy import statements
from tagcache.integrations.sqlalchemy.errors import NotCacheable
from tagcache.integrations.sqlalchemy.statements import (
    identity_tags,
    pk_lookup,
    read_tables,
    rows_tag,
    statement_key,
    table_tag,
    written_tables,
)

from tests.sa_models import Employee, Label, Manager, Project, User, project_labels

ROOT = Path(__file__).resolve().parent.parent
PG_URL = "postgresql+asyncpg://u:secret@h1:5432/a"


def engine(url: str = PG_URL) -> Engine:
    """An engine that never connects (asyncpg URLs go through the async engine)."""
    if "+asyncpg" in url or "+aiosqlite" in url:
        return create_async_engine(url).sync_engine
    return create_engine(url)


ENGINE = engine()


def key(stmt: Any, bind: Engine = ENGINE, **options: Any) -> str:
    return statement_key(stmt, bind, options)


def label_by(value: Any) -> Any:
    return select(Label).where(Label.name == value)


# ------------------------------------------------------------------------------------------ statement_key


def test_key_is_short_printable_and_equal_for_the_same_statement_built_twice() -> None:
    def build() -> Any:
        return select(User.id, User.name).where(User.name == "bob", User.id > 3).order_by(User.id).limit(10)

    first, second = key(build()), key(build())
    assert first == second
    assert first.startswith("sa:")
    assert len(first) <= 200
    assert first.isascii() and first.isprintable()
    assert key(select(User.id).where(User.name == "bob")) != first


# Statements keyed in this process and in others (with other string hash seeds).
STATEMENTS_CODE = textwrap.dedent(
    """
    import uuid
    from datetime import date, datetime, time, timedelta, timezone
    from decimal import Decimal
    from sqlalchemy import Numeric, cast, func, select
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.orm import aliased, joinedload, selectinload, with_polymorphic
    from tests.sa_models import Employee, Label, Manager, Plan, Project, User
    from tagcache.integrations.sqlalchemy.statements import statement_key

    def keys():
        u = aliased(User)
        stmts = [
            select(User)
            .where(
                User.name.in_(["a", "b"]),
                User.created_at > datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
                User.external_id == uuid.UUID(int=7),
                User.plan == Plan.PRO,
                User.birthday == date(2000, 1, 1),
                User.wakes_at == time(7, 30),
                User.session_length == timedelta(minutes=5),
                User.avatar == b"\\x00",
            )
            .join(User.projects)
            .where(Project.budget > Decimal("1.50"))
            .options(selectinload(User.projects).selectinload(Project.labels))
            .limit(5),
            select(u.id, cast(u.name, Numeric(10, 3)), func.count(Project.id))
            .join(Project, u.projects)
            .group_by(u.id),
            select(with_polymorphic(Employee, [Manager])).options(joinedload("*")),
            select(Label).where(Label.id == 5),
        ]
        bind = create_async_engine("postgresql+asyncpg://u:other-password@h1:5432/a").sync_engine
        return [statement_key(s, bind, {"schema_translate_map": {None: "tenant1"}}) for s in stmts]
    """
)


@pytest.mark.parametrize("seed", ["1", "2"])
def test_keys_are_equal_in_another_process(seed: str) -> None:
    namespace: dict[str, Any] = {}
    exec(STATEMENTS_CODE, namespace)
    expected = namespace["keys"]()
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run(
        [sys.executable, "-c", STATEMENTS_CODE + "\nprint(' '.join(keys()))"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == expected
    assert len(set(expected)) == len(expected)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, 2),
        (1, "1"),
        (0, False),
        ("bob", "Bob"),
        ("", None),
        (b"\x00", b"\x01"),
        (1.0, 1),
        # One instant in two zones, and an aware and a naive value: different keys.
        (
            datetime(2024, 1, 1, 12, tzinfo=timezone.utc),
            datetime(2024, 1, 1, 14, tzinfo=timezone(timedelta(hours=2))),
        ),
        (datetime(2024, 1, 1, 12, tzinfo=timezone.utc), datetime(2024, 1, 1, 12)),
        (datetime(2024, 1, 1, 12, 0, 0, 1), datetime(2024, 1, 1, 12)),
        # Decimals by their text: 1.0 and 1.00 are different keys (see the module documentation).
        (Decimal("1.0"), Decimal("1.00")),
        (Decimal("1.0"), 1.0),
        (uuid.UUID(int=1), uuid.UUID(int=2)),
        (uuid.UUID(int=1), str(uuid.UUID(int=1))),
        (timedelta(seconds=1), timedelta(seconds=2)),
    ],
)
def test_keys_differ_for_each_different_bound_value(a: Any, b: Any) -> None:
    assert key(label_by(a)) != key(label_by(b))
    assert key(label_by(a)) == key(label_by(a))


def test_keys_differ_for_in_lists_and_limits() -> None:
    lists = [[1, 2], [1, 3], [1, 2, 3], [2, 1], [], ["1", "2"]]
    keys = {key(select(Label).where(Label.id.in_(each))) for each in lists}
    assert len(keys) == len(lists)
    assert key(select(Label).limit(1)) != key(select(Label).limit(2))
    assert key(select(Label).offset(1)) != key(select(Label).offset(2))


def test_a_value_from_a_callable_bindparam_is_keyed() -> None:
    def stmt(value: int) -> Any:
        return select(Label).where(Label.id == bindparam("x", callable_=lambda: value))

    assert key(stmt(1)) != key(stmt(2))


def test_execute_parameters_take_the_place_of_bound_values_and_are_keyed() -> None:
    stmt = select(Label).where(Label.id == bindparam("uid"))
    with pytest.raises(NotCacheable, match="uid"):
        statement_key(stmt, ENGINE)  # its value comes only with execute()
    one = statement_key(stmt, ENGINE, params={"uid": 1})
    assert one == statement_key(stmt, ENGINE, params={"uid": 1})
    assert one != statement_key(stmt, ENGINE, params={"uid": 2})
    assert one != statement_key(stmt, ENGINE, params={"uid": "1"})
    with_value = select(Label).where(Label.id == bindparam("uid", 1))
    # a parameter given to execute() replaces the statement's own value
    assert statement_key(with_value, ENGINE, params={"uid": 2}) != statement_key(with_value, ENGINE)


def test_keys_differ_for_loader_options() -> None:
    plain = select(Project).where(Project.id == 1)
    keys = [
        key(plain),
        key(plain.options(selectinload(Project.labels))),
        key(plain.options(joinedload(Project.labels))),
        key(plain.options(selectinload(Project.owner))),
        key(plain.options(selectinload(Project.owner).selectinload(User.projects))),
    ]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    "other",
    [
        "postgresql+asyncpg://u:secret@h1:5432/b",  # database
        "postgresql+asyncpg://u:secret@h2:5432/a",  # host
        "postgresql+asyncpg://u:secret@h1:5433/a",  # port
        "postgresql+psycopg://u:secret@h1:5432/a",  # driver
        "postgresql+asyncpg://v:secret@h1:5432/a",  # user (see the module documentation)
        "postgresql+asyncpg://u:secret@h1:5432/a?options=-csearch_path%3Dother",  # URL options
        "sqlite+aiosqlite:///a",  # dialect
    ],
)
def test_keys_differ_for_another_database(other: str) -> None:
    stmt = select(Label).where(Label.id == 1)
    assert key(stmt, engine(other)) != key(stmt)


def test_password_takes_no_part_in_the_key() -> None:
    stmt = select(Label).where(Label.id == 1)
    assert key(stmt, engine("postgresql+asyncpg://u:another@h1:5432/a")) == key(stmt)
    assert key(stmt, engine("postgresql+asyncpg://u@h1:5432/a")) == key(stmt)
    assert key(stmt, engine("postgresql+asyncpg://u:s@h1:5432/a?password=x")) == key(stmt)
    assert "secret" not in key(stmt)


def test_keys_differ_for_another_schema_translate_map() -> None:
    stmt = select(Label).where(Label.id == 1)
    plain = key(stmt)
    one = key(stmt, schema_translate_map={None: "tenant1"})
    two = key(stmt, schema_translate_map={None: "tenant2"})
    assert len({plain, one, two}) == 3
    # From the bind's execution options too, and the statement-level argument wins.
    translated = ENGINE.execution_options(schema_translate_map={None: "tenant1"})
    assert key(stmt, translated) == one
    assert key(stmt, translated, schema_translate_map={None: "tenant2"}) == two


def test_statements_that_cannot_be_keyed_raise() -> None:
    class Unkeyed(ColumnClause[Any]):
        inherit_cache = False

    with pytest.raises(NotCacheable, match="no SQLAlchemy cache key"):
        key(select(Unkeyed("x")).select_from(Label))
    with pytest.raises(NotCacheable, match="has no value"):
        key(select(Label).where(Label.id == bindparam("x")))
    with pytest.raises(NotCacheable, match="stable rendering"):
        key(label_by(object()))
    with pytest.raises(NotCacheable, match="locks rows"):
        key(select(Label).with_for_update())
    with pytest.raises(NotCacheable, match="only select"):
        key(update(Label).values(name="x"))
    with pytest.raises(NotCacheable, match=r"text\(\)"):
        key(text("select 1"))


def test_a_repeated_shape_is_analysed_once() -> None:
    key(select(Label.name).where(Label.id == 123456, Label.name == "shape"))
    size = len(statements._shapes)
    for value in range(20):
        key(select(Label.name).where(Label.id == value, Label.name == str(value)))
    assert len(statements._shapes) == size


# ------------------------------------------------------------------------------------------ read_tables


@pytest.mark.parametrize(
    ("stmt", "expected"),
    [
        (select(Label), {"labels"}),
        (select(User.id, User.name), {"users"}),
        (select(User.id).join(Project, Project.owner_id == User.id), {"users", "projects"}),
        (select(User.id).join(User.projects), {"users", "projects"}),
        (select(Project.id).join(Project.labels), {"projects", "project_labels", "labels"}),
        (select(User.id).where(User.id.in_(select(Project.owner_id))), {"users", "projects"}),
        (select(User.id).where(exists().where(Project.owner_id == User.id)), {"users", "projects"}),
        (
            select(User.id).where(User.projects.any(Project.labels.any())),
            {"users", "projects", "project_labels", "labels"},
        ),
        (
            select(User.id, select(func.count(Label.id)).scalar_subquery()),
            {"users", "labels"},
        ),
        (select(Label.name).select_from(select(Label).subquery()), {"labels"}),
        (select(aliased(Label)), {"labels"}),
        (union(select(Label.id), select(Project.id)), {"labels", "projects"}),
        # A column_property reading another table.
        (select(User), {"users", "projects"}),
        (select(User.project_count), {"users", "projects"}),
        # Joined inheritance; a polymorphic base reads its subclasses' tables too.
        (select(Manager), {"employees", "managers"}),
        (select(Employee), {"employees", "managers"}),
        (select(with_polymorphic(Employee, "*")), {"employees", "managers"}),
        (select(Employee.name), {"employees"}),
        # Eager loader options, nested paths and wildcards.
        (select(Project).options(selectinload(Project.labels)), {"projects", "project_labels", "labels"}),
        (select(Project).options(joinedload(Project.owner)), {"projects", "users"}),
        (select(Label).options(joinedload("*")), {"labels"}),
        (select(Project).options(selectinload("*")), {"projects", "project_labels", "labels", "users"}),
        (
            select(User).options(selectinload(User.projects).selectinload(Project.labels)),
            {"users", "projects", "project_labels", "labels"},
        ),
        (
            select(User).options(defaultload(User.projects).subqueryload(Project.labels)),
            {"users", "projects", "project_labels", "labels"},
        ),
        (select(Project).options(immediateload(Project.owner)), {"projects", "users"}),
        (select(Project).options(subqueryload(Project.owner)), {"projects", "users"}),
    ],
)
def test_read_tables(stmt: Any, expected: set[str]) -> None:
    assert read_tables(stmt) == expected


def test_read_tables_of_a_cte() -> None:
    cte = select(Project.owner_id).where(Project.budget > 0).cte("owners")
    assert read_tables(select(User.id).join(cte, cte.c.owner_id == User.id)) == {"users", "projects"}
    assert read_tables(select(cte.c.owner_id)) == {"projects"}


class EagerBase(DeclarativeBase):
    pass


class Node(EagerBase):
    """Relationships configured eager, in a cycle, with a schema-qualified table."""

    __tablename__ = "nodes"
    __table_args__ = ({"schema": "graph"},)

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("graph.nodes.id"))
    children: Mapped[list[Node]] = relationship(lazy="selectin", join_depth=2)
    tags: Mapped[list[NodeTag]] = relationship(lazy="joined", back_populates="node")


class NodeTag(EagerBase):
    __tablename__ = "node_tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("graph.nodes.id"))
    node: Mapped[Node] = relationship(lazy="selectin", back_populates="tags")
    notes: Mapped[list[Note]] = relationship(lazy="immediate")
    lazy_things: Mapped[list[LazyThing]] = relationship()


class Note(EagerBase):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    tag_id: Mapped[int] = mapped_column(ForeignKey("node_tags.id"))


class LazyThing(EagerBase):
    __tablename__ = "lazy_things"

    id: Mapped[int] = mapped_column(primary_key=True)
    tag_id: Mapped[int] = mapped_column(ForeignKey("node_tags.id"))


def test_read_tables_follows_relationships_configured_eager_through_cycles() -> None:
    assert read_tables(select(Node)) == {"graph.nodes", "node_tags", "notes"}
    assert read_tables(select(NodeTag)) == {"graph.nodes", "node_tags", "notes"}
    assert read_tables(select(Node.id)) == {"graph.nodes"}
    assert read_tables(select(Note)) == {"notes"}
    assert pk_lookup(select(Node).where(Node.id == 1)) is None
    assert pk_lookup(select(Note).where(Note.id == 1)) == ("notes", (1,))


@pytest.mark.parametrize(
    ("stmt", "construct"),
    [
        (select(User.id).where(text("id = 1")), "text('id = 1')"),
        (select(User.id).order_by(text("name")), "text('name')"),
        (select(literal_column("id + 1")).select_from(Label), "literal_column('id + 1')"),
        (select(Label.id).select_from(text("labels")), "text('labels')"),
        (select(Label).where(Label.id.in_(select(text("id")).select_from(text("x")))), "text("),
        (
            select(Label).where(Label.id.in_(select(text("select 1").columns(Label.id).subquery().c.id))),
            "text(",
        ),
    ],
)
def test_textual_fragments_need_tables(stmt: Any, construct: str) -> None:
    with pytest.raises(NotCacheable, match=r"tables=\[") as info:
        read_tables(stmt)
    assert construct in info.value.reason
    assert read_tables(stmt, tables=["extra"]) >= {"extra"}
    assert read_tables(stmt, tables=[]) == read_tables(stmt, tables=()) - {"extra"}
    assert pk_lookup(stmt) is None
    key(stmt)  # the key does not depend on knowing the tables


def test_given_tables_are_added_to_what_is_found() -> None:
    stmt = select(User.id).where(text("id in (select owner_id from audit)"))
    assert read_tables(stmt, tables=["audit"]) == {"users", "audit"}
    assert read_tables(select(Label), tables=["other"]) == {"labels", "other"}
    with pytest.raises(TypeError):
        read_tables(select(Label), tables="labels")


@pytest.mark.parametrize(
    ("stmt", "match"),
    [
        (text("select * from labels"), r"text\(\)"),
        (text("select id from labels").columns(Label.id), r"text\(\)"),
        (insert(Label).values(name="x"), "insert"),
        (update(Label).values(name="x"), "update"),
        (delete(Label), "delete"),
        (select(Label).with_for_update(), "with_for_update"),
        (select(Label).where(Label.id.in_(select(Project.id).with_for_update().scalar_subquery())), "locks"),
        (union(select(Label.id), select(Project.id)).with_for_update(), "locks"),
        (select(Label).where(Label.id == 1).with_for_update(read=True), "locks"),
    ],
)
def test_statements_that_are_never_cached(stmt: Any, match: str) -> None:
    with pytest.raises(NotCacheable, match=match):
        read_tables(stmt)
    with pytest.raises(NotCacheable, match=match):
        read_tables(stmt, tables=["labels"])
    assert pk_lookup(stmt) is None


def test_a_data_modifying_cte_is_never_cached() -> None:
    cte = insert(Label).values(name="x").returning(Label.id).cte("added")
    with pytest.raises(NotCacheable, match="INSERT"):
        read_tables(select(cte.c.id))


# ------------------------------------------------------------------------------------------ pk_lookup


def test_pk_lookup_of_one_row() -> None:
    assert pk_lookup(select(Label).where(Label.id == 5)) == ("labels", (5,))
    assert pk_lookup(select(Label).where(5 == Label.id)) == ("labels", (5,))  # noqa: SIM300 - reversed on purpose
    assert pk_lookup(select(Label).filter_by(id=6)) == ("labels", (6,))
    assert pk_lookup(select(Label.name).where(Label.id == 7)) == ("labels", (7,))
    assert pk_lookup(select(User.id, User.name).where(User.id == 1)) == ("users", (1,))
    # The memoised shape gives each statement its own value.
    assert pk_lookup(select(Label).where(Label.id == 8)) == ("labels", (8,))


def test_pk_lookup_of_a_composite_key_gives_values_in_key_order() -> None:
    pl = project_labels.c
    assert pk_lookup(select(project_labels).where(pl.project_id == 1, pl.label_id == 2)) == (
        "project_labels",
        (1, 2),
    )
    assert pk_lookup(select(project_labels).where(pl.label_id == 2, pl.project_id == 1)) == (
        "project_labels",
        (1, 2),
    )
    assert pk_lookup(select(project_labels).where(pl.project_id == 1)) is None


@pytest.mark.parametrize(
    "stmt",
    [
        select(Label),
        select(Label).where(Label.id > 5),
        select(Label).where(Label.id.in_([5])),
        select(Label).where(Label.id == 5, Label.name == "x"),
        select(Label).where(Label.id == 5, Label.id == 6),
        select(Label).where((Label.id == 5) | (Label.id == 6)),
        select(Label).where(Label.name == "x"),
        select(Label).where(Label.id == None),  # noqa: E711
        select(Label).where(Label.id == bindparam("x")),
        select(Label).where(Label.id == Label.id),
        select(Label).where(Label.id == 5).with_for_update(),
        # User.project_count reads projects.
        select(User).where(User.id == 1),
        select(User.project_count).where(User.id == 1),
        select(Label.id, select(func.count(Label.id)).scalar_subquery()).where(Label.id == 1),
        select(Manager).where(Manager.id == 1),
        select(Employee).where(Employee.id == 1),
        select(Project).where(Project.id == 1).options(selectinload(Project.labels)),
        select(Project).where(Project.id == 1).options(joinedload(Project.owner)),
        select(Project).join(Project.owner).where(Project.id == 1),
        select(Label, Project).where(Label.id == 1, Project.id == 1),
        select(aliased(Label)).where(Label.id == 1),
        select(Label).where(Label.id == 5).where(text("true")),
        union(select(Label).where(Label.id == 1), select(Label).where(Label.id == 2)),
        update(Label).where(Label.id == 1).values(name="x"),
        text("select * from labels where id = 1"),
    ],
)
def test_not_a_pk_lookup(stmt: Any) -> None:
    assert pk_lookup(stmt) is None


def test_pk_lookup_with_a_value_that_has_no_tag_is_none() -> None:
    assert pk_lookup(select(Label).where(Label.id == bindparam("x", value=object()))) is None


# ------------------------------------------------------------------------------------------ written_tables


def test_written_tables_follow_cascading_foreign_keys() -> None:
    assert written_tables(inspect(User)) == {"users", "projects", "project_labels"}
    assert written_tables(inspect(Project)) == {"projects", "project_labels"}
    assert written_tables(inspect(Label)) == {"labels", "project_labels"}
    assert written_tables(project_labels) == {"project_labels"}
    assert written_tables(inspect(Manager)) == {"employees", "managers"}
    assert written_tables(inspect(Employee)) == {"employees", "managers"}
    assert written_tables(Label.__table__) == written_tables(inspect(Label))  # type: ignore[arg-type]  # __table__ is a FromClause to mypy


def test_written_tables_by_action() -> None:
    metadata = MetaData()
    parent = Table("parent", metadata, Column("id", Integer, primary_key=True))

    def child(name: str, **actions: str) -> Table:
        return Table(
            name,
            metadata,
            Column("id", Integer, primary_key=True),
            Column("p", ForeignKey("parent.id", **actions)),
        )

    child("restrict", ondelete="RESTRICT")
    child("no_action")
    child("set_null", ondelete="SET NULL")
    child("set_default", ondelete="set default")
    child("on_update", onupdate="CASCADE")
    grandchild = Table(
        "grandchild",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("c", ForeignKey("set_null.id", ondelete="CASCADE")),
    )
    assert written_tables(parent) == {"parent", "set_null", "set_default", "on_update", "grandchild"}
    assert written_tables(grandchild) == {"grandchild"}
    # Remembered, and recomputed when the metadata gains tables.
    child("late", ondelete="CASCADE")
    assert "late" in written_tables(parent)
    with pytest.raises(TypeError):
        written_tables("parent")  # type: ignore[arg-type]  # checking the runtime guard


# ------------------------------------------------------------------------------------------ tags


def test_tags() -> None:
    assert table_tag("labels") == "table:labels"
    assert rows_tag("labels") == "rows:labels"
    assert table_tag("graph.nodes") == "table:graph.nodes"
    assert identity_tags("labels", (5,)) == "row:labels:5"
    assert identity_tags("project_labels", (1, 2)) == "row:project_labels:1,2"
    assert identity_tags("t", (uuid.UUID(int=1),)) == "row:t:00000000-0000-0000-0000-000000000001"
    assert identity_tags("t", ("abc",)) == "row:t:abc"


def test_row_tags_render_values_the_database_takes_for_equal_alike() -> None:
    assert identity_tags("t", (Decimal("5.00"),)) == identity_tags("t", (5,)) == identity_tags("t", (5.0,))
    assert (
        identity_tags("t", (Decimal("1.50"),))
        == identity_tags("t", (Decimal("1.5"),))
        != identity_tags("t", (1,))
    )
    utc = datetime(2024, 1, 1, 12, tzinfo=timezone.utc)
    assert identity_tags("t", (utc,)) == identity_tags("t", (utc.astimezone(timezone(timedelta(hours=2))),))
    assert identity_tags("t", (utc,)) != identity_tags("t", (utc.replace(tzinfo=None),))


def test_row_tags_are_unambiguous_and_printable() -> None:
    tags = {
        identity_tags("t", ("a,b", "c")),
        identity_tags("t", ("a", "b,c")),
        identity_tags("t", ("a%2Cb", "c")),
        identity_tags("t:a", ("b",)),
        identity_tags("t", ("a:b",)),
        identity_tags("t", ("x\n",)),
        identity_tags("t", ("x\r",)),
        identity_tags("t", ("x\ud800",)),
        identity_tags("t", (b"\x00",)),
    }
    assert len(tags) == 9
    for tag in tags:
        assert tag.isprintable()


def test_long_tags_are_hashed() -> None:
    long_names = [table_tag("t" * 300), rows_tag("t" * 300), identity_tags("t", ("x" * 300,))]
    assert all(len(tag) <= 200 and tag.isprintable() for tag in long_names)
    assert identity_tags("t", ("x" * 300,)) != identity_tags("t", ("x" * 301,))
    assert table_tag("t" * 300) != table_tag("t" * 301)
    assert "\x00" not in table_tag("a\x00b") and table_tag("a\x00b").isprintable()


def test_a_pk_value_without_a_tag_raises() -> None:
    with pytest.raises(NotCacheable):
        identity_tags("t", (object(),))


def test_describe_gives_what_the_three_functions_give() -> None:
    from tagcache.integrations.sqlalchemy.statements import describe

    lookup = select(Label).where(Label.id == 5)
    assert describe(lookup, ENGINE) == (statement_key(lookup, ENGINE), read_tables(lookup), pk_lookup(lookup))
    joined = select(User.name).join(User.projects)
    assert describe(joined, ENGINE, tables=["extra"]) == (
        statement_key(joined, ENGINE),
        read_tables(joined, ["extra"]),
        None,  # tables given: no row tags
    )
    with pytest.raises(NotCacheable):
        describe(select(User.id).where(text("1 = 1")), ENGINE)
