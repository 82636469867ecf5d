"""What a SQLAlchemy statement reads, and the cache key and tags of its result.

The query cache stores the results of SQLAlchemy 2 ``select()`` statements and
invalidates them by tags when tables change. This module answers, for one
statement, the questions it needs:

:func:`statement_key`
    A cache key for running the statement on a database: ``"sa:"`` and 32 hex
    digits of a BLAKE2b hash of SQLAlchemy's own statement cache key (its
    structure, loader options included, and the values of its bound
    parameters) and of the database the bind connects to. Keys are equal across
    processes for the same statement on the same database, and never equal for
    two statements that may return different rows.

:func:`read_tables`
    Every table the statement reads, ORM loading included (``column_property``
    subqueries, inheritance tables, secondary tables, eager loaders).

:func:`pk_lookup`
    Whether the statement reads one row by primary key, so that its result can
    be tagged with that row's tag (:func:`identity_tags`) instead of the whole
    table's.

:func:`written_tables`
    The tables a write through a mapper or to a table changes, including rows
    the database changes by ``ON DELETE`` / ``ON UPDATE`` actions.

:func:`table_tag`, :func:`rows_tag`, :func:`identity_tags`
    The tags the query cache puts on entries and invalidates.

Statements that must not be cached raise :class:`NotCacheable` with a reason.

Choices worth knowing
    * ``Decimal("1.0")`` and ``Decimal("1.00")`` are different keys: the value
      is sent as given, and a statement that returns it (``select(literal(d))``)
      returns it with its exponent. The same holds for datetimes: two offsets of
      one instant, and an aware and a naive value, are different keys. Row tags
      (:func:`identity_tags`), which must match whatever value a write carries,
      normalise instead: ``Decimal("5.00")``, ``5.0`` and ``5`` are one row, and
      aware datetimes are rendered in UTC.
    * Selecting an entity of a polymorphic hierarchy reads the tables of all its
      subclasses too (``select(Employee)`` reads ``managers``): rows of
      subclasses are returned as subclass objects, whose columns may be loaded
      with them, so a write to a subclass table invalidates the base query.
    * The database identity in keys is the dialect and driver, host, port,
      database, user name (the same query may read other rows or other tables
      as another user: row-level security, a ``search_path`` starting with
      ``"$user"``) and the URL query options except credentials. The password
      never takes part. Keys do not capture mapping changes (a new column, a
      changed ``column_property``): tables and mappers are rendered by name.
    * Several SQLite connections to ``:memory:`` are several databases that
      render as one; do not share a cache between them.
    * SQL functions are assumed to read no table; a statement calling a
      function that reads tables must pass ``tables=[...]`` to
      :func:`read_tables` for them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from types import CodeType, MappingProxyType
from typing import Any, Final, NamedTuple
from uuid import UUID

from sqlalchemy import (
    BindParameter,
    ColumnClause,
    CompoundSelect,
    Executable,
    Select,
    Table,
    TableClause,
    TextClause,
    TextualSelect,
    UpdateBase,
    inspect,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.orm.util import AliasedInsp, LoaderCriteriaOption
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BooleanClauseList
from sqlalchemy.sql.functions import next_value
from sqlalchemy.sql.visitors import iterate
from sqlalchemy.types import TypeEngine

from tagcache.integrations.sqlalchemy.errors import NotCacheable

__all__ = [
    "Described",
    "describe",
    "identity_tags",
    "pk_lookup",
    "read_tables",
    "rows_tag",
    "statement_key",
    "table_tag",
    "written_tables",
]

#: Longest key or tag this module returns; longer tags are hashed.
MAX_LENGTH: Final = 200

_KEY_PREFIX: Final = "sa:"
# Relationship loader strategies that read the related table while the statement runs.
_EAGER: Final[frozenset[object]] = frozenset({False, "joined", "selectin", "subquery", "immediate"})
# Referential actions by which the database changes rows of the referencing table.
_CHANGING_ACTIONS: Final = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})
# URL query options left out of the database identity: they may carry credentials.
_SECRET_OPTION: Final = re.compile(r"pass|pwd|secret|token|key|cred|auth", re.IGNORECASE)
# Shapes remembered (least recently added are forgotten first).
_MAX_SHAPES: Final = 1024
# literal_column() texts that read nothing: "*" (exists(), count()), numbers (any()), constants.
_INERT_LITERAL: Final = re.compile(r"(\*|\d+|NULL|TRUE|FALSE)\Z", re.IGNORECASE)
# Characters escaped in tags: "%" (the escape), control characters and lone surrogates,
# and in primary-key values "," (separates composite values) and ":" (separates the table).
_TAG_UNSAFE: Final = re.compile(r"[%\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_PK_UNSAFE: Final = re.compile(r"[%,:\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_HASH: Final = hashlib.blake2b(digest_size=16)


def _digest(text: str) -> str:
    """32 hex digits of the BLAKE2b-128 hash of ``text`` (lone surrogates kept as is)."""
    h = _HASH.copy()
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# SQLAlchemy internals: each use of a private attribute is in one of these functions.
# --------------------------------------------------------------------------------------------------


def _cache_key(stmt: Executable) -> Any:
    """SQLAlchemy's statement cache key (``key`` structure and ``bindparams``), or None.

    ``_generate_cache_key()`` is what SQLAlchemy's compiled cache uses; it has no
    public spelling. None means some element of the statement does not support
    caching (a custom construct without ``inherit_cache``).
    """
    generate = getattr(stmt, "_generate_cache_key", None)
    return generate() if generate is not None else None


def _has_for_update(select: Select[Any] | CompoundSelect[Any]) -> bool:
    """Whether ``select`` has ``with_for_update()`` (stored as the private ``_for_update_arg``)."""
    return getattr(select, "_for_update_arg", None) is not None


def _statement_options(stmt: Select[Any] | CompoundSelect[Any]) -> Sequence[Any]:
    """The loader and criteria options given with ``.options()`` (private ``_with_options``)."""
    return tuple(getattr(stmt, "_with_options", ()))


def _load_paths(option: Any) -> list[tuple[tuple[Any, ...], dict[Any, Any]]]:
    """The (path, strategy) pairs of a loader option such as ``selectinload(A.b).joinedload(B.c)``.

    A ``Load`` keeps one element per attribute of its chain in ``context``, each with a
    path registry (``path.path``: mapper, property, mapper, ...) and a strategy key
    (``(("lazy", "selectin"),)``); a bare wildcard such as ``joinedload("*")`` keeps a
    path of one token and its strategy itself. These attributes are not public API.
    """
    result: list[tuple[tuple[Any, ...], dict[Any, Any]]] = []
    context = getattr(option, "context", None)
    if context is not None:
        for element in context:
            path = getattr(getattr(element, "path", None), "path", ())
            result.append((tuple(path), dict(getattr(element, "strategy", None) or ())))
    elif isinstance(getattr(option, "path", None), tuple):
        result.append((option.path, dict(getattr(option, "strategy", None) or ())))
    return result


# --------------------------------------------------------------------------------------------------
# Stable rendering of values and of cache key structures
# --------------------------------------------------------------------------------------------------
#
# Every item renders to a self-delimiting text, so a concatenation splits back one way only:
#   None "N"  True "T"  False "F"  int "i<digits>;"  float "f<repr>;"  str "s<len>:<text>"
#   bytes "b<hex>;"  list/tuple "l<n>:<items>"  set "S<n>:<sorted items>"  dict "d<n>:<sorted pairs>"
#   datetime "@dt<iso>;"  date "@d<iso>;"  time "@t<iso>;"  timedelta "@td<d>,<s>,<us>;"  UUID "@u<hex>;"
#   Decimal "@n<text>;"  enum "E<class><name>"  dataclass "D<class><n>:<name><value>..."
#   (structure only) class "C<module.qualname>"  function "F<module.qualname>"  table "Q<fullname>"
#   type "Y<class><sorted arguments>"  mapper "M<class>"  column "K<table><name>"
#   code "X<file:line:name><digest of its bytecode>"


class _Unrenderable(Exception):
    """A value with no stable rendering; ``what`` names its type."""

    def __init__(self, value: object) -> None:
        super().__init__()
        self.what = f"{type(value).__module__}.{type(value).__qualname__}"


def _str(text: str) -> str:
    return f"s{len(text)}:{text}"


def _path(cls: type) -> str:
    return _str(f"{cls.__module__}.{cls.__qualname__}")


def _sequence(
    code: str, items: Iterable[Any], out: list[str], render: Callable[[Any, list[str]], None]
) -> None:
    parts: list[str] = []
    for item in items:
        render(item, parts)
    out.append(f"{code}{len(parts)}:")
    out.extend(parts)


def _sorted_items(
    code: str, items: Iterable[Any], out: list[str], render: Callable[[Any, list[str]], None]
) -> None:
    rendered = []
    for item in items:
        parts: list[str] = []
        render(item, parts)
        rendered.append("".join(parts))
    rendered.sort()
    out.append(f"{code}{len(rendered)}:")
    out.extend(rendered)


def _render_value(value: Any, out: list[str]) -> None:
    """Append the stable rendering of a bound parameter value; raise _Unrenderable."""
    cls = type(value)
    if value is None:
        out.append("N")
    elif cls is bool:
        out.append("T" if value else "F")
    elif cls is int:
        out.append(f"i{value};")
    elif cls is str:
        out.append(_str(value))
    elif cls is float:
        out.append(f"f{value!r};")
    elif cls in (list, tuple):
        _sequence("l", value, out, _render_value)
    else:
        _render_other_value(value, out)


def _render_other_value(value: Any, out: list[str]) -> None:
    if isinstance(value, enum.Enum):
        out.append("E" + _path(type(value)) + _str(value.name))
    elif isinstance(value, int):
        out.append(f"i{int(value)};")
    elif isinstance(value, str):
        out.append(_str(str.__str__(value)))
    elif isinstance(value, float):
        out.append(f"f{float(value)!r};")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(f"b{bytes(value).hex()};")
    elif isinstance(value, datetime):
        out.append(f"@dt{value.isoformat()};")
    elif isinstance(value, date):
        out.append(f"@d{value.isoformat()};")
    elif isinstance(value, time):
        out.append(f"@t{value.isoformat()};")
    elif isinstance(value, timedelta):
        out.append(f"@td{value.days},{value.seconds},{value.microseconds};")
    elif isinstance(value, UUID):
        out.append(f"@u{value.hex};")
    elif isinstance(value, Decimal):
        out.append(f"@n{Decimal.__str__(value)};")
    elif isinstance(value, (list, tuple)):
        _sequence("l", value, out, _render_value)
    elif isinstance(value, (set, frozenset)):
        _sorted_items("S", value, out, _render_value)
    elif isinstance(value, Mapping):
        _sorted_items("d", value.items(), out, _render_value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f for f in dataclasses.fields(value) if f.compare]
        out.append("D" + _path(type(value)) + f"{len(fields)}:")
        for field in fields:
            out.append(_str(field.name))
            _render_value(getattr(value, field.name), out)
    else:
        raise _Unrenderable(value)


def _render_structure(item: Any, out: list[str]) -> None:
    """Append the stable rendering of one item of a cache key structure; raise _Unrenderable."""
    if type(item) is tuple:
        if item and isinstance(item[0], type) and issubclass(item[0], TypeEngine):
            # A type's key: its class, then (argument, value) pairs in an order that depends
            # on string hashing (SQLAlchemy collects the names in a set), so sorted here.
            out.append("Y" + _path(item[0]))
            _sorted_items("l", item[1:], out, _render_structure)
        else:
            _sequence("l", item, out, _render_structure)
    elif type(item) is str:
        out.append(_str(item))
    elif isinstance(item, type):
        out.append("C" + _path(item))
    elif isinstance(item, TableClause):
        out.append("Q" + _str(item.fullname))
    elif isinstance(item, Mapper):
        out.append("M" + _path(item.class_))
    elif isinstance(item, ColumnClause):
        table = item.table
        out.append("K" + _str(getattr(table, "fullname", "") if table is not None else "") + _str(item.name))
    elif isinstance(item, CodeType):
        _render_code(item, out)
    elif callable(item) and hasattr(item, "__qualname__"):
        _render_function(item, out)
    else:
        _render_value(item, out)


def _render_function(func: Any, out: list[str]) -> None:
    out.append("F" + _str(f"{getattr(func, '__module__', None)}.{func.__qualname__}"))
    code = getattr(func, "__code__", None)
    if isinstance(code, CodeType) and "<" in func.__qualname__:
        _render_code(code, out)  # a lambda or local function: its name alone is not unique


def _render_code(code: CodeType, out: list[str]) -> None:
    """Render a code object (lambdas in ``with_loader_criteria``) by where it is and what it does.

    The file's base name, not its path: installations at different paths share keys.
    """
    name = getattr(code, "co_qualname", code.co_name)
    where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}:{name}"
    out.append("X" + _str(where) + _str(_digest(code.co_code.hex() + repr(code.co_names))))


# --------------------------------------------------------------------------------------------------
# What a statement reads
# --------------------------------------------------------------------------------------------------


def _mapper_of(entity: Any) -> Mapper[Any] | None:
    """The mapper of a mapped class, an aliased class or a mapper path entry, else None."""
    if isinstance(entity, Mapper):
        return entity
    if isinstance(entity, AliasedInsp):
        return entity.mapper
    info = inspect(entity, raiseerr=False)
    if isinstance(info, Mapper):
        return info
    if isinstance(info, AliasedInsp):
        return info.mapper
    return None


def _is_relationship_wildcard(entry: object) -> bool:
    return isinstance(entry, str) and entry.startswith("relationship:")


class _Reader:
    """Walks a statement and the ORM loading it implies, collecting what it reads."""

    def __init__(self) -> None:
        self.tables: set[str] = set()
        self.textual: str | None = None
        self.fatal: str | None = None
        self.selects = 0  # SELECTs run or nested, column_property subqueries included
        self.eager = False  # some relationship is loaded while the statement runs
        self.criteria = False  # with_loader_criteria() adds criteria
        self.froms_unknown = False  # the FROM list of some SELECT could not be computed
        self.entities: list[Mapper[Any]] = []  # mappers selected as entities by the statement itself
        self._mappers: set[Mapper[Any]] = set()
        self._relationships: set[RelationshipProperty[Any]] = set()
        self._seen: set[int] = set()
        self._keep: list[object] = []  # keeps visited elements alive so their ids stay unique

    def _fail(self, reason: str) -> None:
        if self.fatal is None:
            self.fatal = reason

    def _text(self, construct: str) -> None:
        if self.textual is None:
            self.textual = (
                f"the statement contains {construct}, whose tables cannot be known; "
                "pass tables=[...] naming every table it reads"
            )

    def visit(self, root: Any, *, top: bool = False) -> None:
        """Collect the tables read by ``root`` and by everything nested in it."""
        work = [root]
        while work:
            element = work.pop()
            for node in iterate(element):
                if id(node) in self._seen:
                    continue
                self._seen.add(id(node))
                self._keep.append(node)
                self._node(node, work, top=top and node is root)

    def _node(self, node: Any, work: list[Any], *, top: bool) -> None:
        if isinstance(node, TableClause):
            self.tables.add(node.fullname)
        elif isinstance(node, (Select, CompoundSelect)):
            self.selects += 1
            if _has_for_update(node):
                self._fail(
                    "the statement locks rows (with_for_update()); a locking read must reach the database"
                )
            if isinstance(node, Select):
                self._select(node, work, top=top)
        elif isinstance(node, TextualSelect):
            self._text("a text().columns() statement")
        elif isinstance(node, TextClause):
            self._text(f"text({node.text[:40]!r})")
        elif isinstance(node, ColumnClause) and node.is_literal and not _INERT_LITERAL.match(node.name):
            self._text(f"literal_column({node.name[:40]!r})")
        elif isinstance(node, UpdateBase):
            self._fail("the statement contains an INSERT, UPDATE or DELETE (a data-modifying CTE)")
        elif isinstance(node, next_value):
            self._fail("the statement calls a sequence's next_value(), which changes on every execution")

    def _select(self, select: Select[Any], work: list[Any], *, top: bool) -> None:
        # The FROM list as compiled: ORM joins along relationships add secondary tables.
        try:
            work.extend(select.get_final_froms())
        except Exception:  # SQLAlchemy cannot compute it, e.g. for select_from(text(...)) with entities
            self.froms_unknown = True
        try:
            descriptions = select.column_descriptions
        except Exception:  # SQLAlchemy cannot describe some columns, e.g. the "*" of exists()
            if top:
                self._fail("the statement's columns cannot be described, so what it loads is unknown")
            return
        for description in descriptions:
            entity = description.get("entity")
            if entity is None or description.get("expr") is not entity:
                continue  # a column or an expression: its tables are in the statement
            mapper = _mapper_of(entity)
            if mapper is not None:
                if top:
                    self.entities.append(mapper)
                self.mapper(mapper)

    def mapper(self, mapper: Mapper[Any]) -> None:
        """Tables read when loading objects of ``mapper``, subclasses and eager loading included."""
        if mapper in self._mappers:
            return
        self._mappers.add(mapper)
        for each in mapper.self_and_descendants:
            for table in each.tables:
                self.visit(table)
            for prop in each.column_attrs:
                for column in prop.columns:
                    self.visit(column)
            for relationship in each.relationships:
                if relationship.lazy in _EAGER:
                    self.eager = True
                    self.relationship(relationship)

    def relationship(self, relationship: RelationshipProperty[Any]) -> None:
        """Tables read when loading ``relationship`` eagerly."""
        if relationship in self._relationships:
            return
        self._relationships.add(relationship)
        for clause in (relationship.secondary, relationship.primaryjoin, relationship.secondaryjoin):
            if clause is not None:
                self.visit(clause)
        self.mapper(relationship.mapper)

    def options(self, stmt: Select[Any] | CompoundSelect[Any]) -> None:
        """Tables read by loader options (``selectinload`` and the like) and loader criteria."""
        for option in _statement_options(stmt):
            if isinstance(option, LoaderCriteriaOption):
                self.criteria = True
                self.visit(option.where_criteria)
                continue
            for path, strategy in _load_paths(option):
                if strategy.get("lazy", True) not in _EAGER:
                    continue
                self.eager = True
                current: list[Mapper[Any]] = list(self.entities)
                for entry in path:
                    if isinstance(entry, RelationshipProperty):
                        self.relationship(entry)
                    elif _is_relationship_wildcard(entry):
                        for mapper in current:
                            for each in mapper.self_and_descendants:
                                for relationship in each.relationships:
                                    self.relationship(relationship)
                    else:
                        entry_mapper = _mapper_of(entry)
                        if entry_mapper is not None:
                            current = [entry_mapper]


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What one statement shape (one cache key structure) reads and how it is keyed."""

    digest: str
    fatal: str | None
    textual: str | None
    tables: frozenset[str]
    # (table fullname, positions in the cache key's bindparams of the primary-key values)
    pk: tuple[str, tuple[int, ...]] | None


_shapes: dict[Any, _Shape] = {}
_shapes_lock = threading.Lock()


def _check_statement(stmt: object) -> Select[Any] | CompoundSelect[Any]:
    if isinstance(stmt, (Select, CompoundSelect)):
        return stmt
    if isinstance(stmt, UpdateBase):
        raise NotCacheable(f"a {type(stmt).__name__.lower()}() statement writes; only select() is cached")
    if isinstance(stmt, (TextClause, TextualSelect)):
        raise NotCacheable(
            "a text() statement is not cached: the cache cannot tell what it does; use select()"
        )
    raise NotCacheable(f"only select() statements are cached, not {type(stmt).__name__}")


def _shape(stmt: Executable) -> tuple[Any, _Shape]:
    """The cache key of ``stmt`` and its shape, computed once per shape; raise NotCacheable."""
    select = _check_statement(stmt)
    cache_key = _cache_key(select)
    if cache_key is None:
        raise NotCacheable(
            "the statement has no SQLAlchemy cache key: an element of it does not support "
            "caching (a custom construct without inherit_cache=True)"
        )
    shape = _shapes.get(cache_key.key)
    if shape is None:
        shape = _new_shape(select, cache_key)
        with _shapes_lock:
            if len(_shapes) >= _MAX_SHAPES:
                _shapes.pop(next(iter(_shapes)), None)
            _shapes[cache_key.key] = shape
    return cache_key, shape


def _new_shape(select: Select[Any] | CompoundSelect[Any], cache_key: Any) -> _Shape:
    reader = _Reader()
    reader.visit(select, top=True)
    reader.options(select)
    fatal = reader.fatal
    if fatal is None and reader.froms_unknown and reader.textual is None:
        fatal = "the FROM list of the statement cannot be computed, so the tables it reads are unknown"
    parts: list[str] = []
    try:
        _render_structure(cache_key.key, parts)
    except _Unrenderable as exc:
        fatal = fatal or f"the statement's cache key holds a {exc.what}, which has no stable rendering"
    pk = None
    if (
        fatal is None
        and reader.textual is None
        and isinstance(select, Select)
        and len(reader.tables) == 1
        and reader.selects == 1
        and not reader.eager
        and not reader.criteria
    ):
        pk = _pk_shape(select, cache_key.bindparams)
    return _Shape(_digest("".join(parts)), fatal, reader.textual, frozenset(reader.tables), pk)


def _pk_shape(
    select: Select[Any], bindparams: Sequence[BindParameter[Any]]
) -> tuple[str, tuple[int, ...]] | None:
    """Positions of the primary-key values if ``select`` reads one row of one table by primary key."""
    froms = select.get_final_froms()
    if len(froms) != 1 or not isinstance(froms[0], Table):
        return None
    table = froms[0]
    pk_columns = list(table.primary_key.columns)
    where = select.whereclause
    if not pk_columns or where is None:
        return None
    if isinstance(where, BooleanClauseList) and where.operator is operators.and_:
        criteria = list(where.clauses)
    else:
        criteria = [where]
    found: dict[str, BindParameter[Any]] = {}
    for criterion in criteria:
        if not isinstance(criterion, BinaryExpression) or criterion.operator is not operators.eq:
            return None
        column, value = criterion.left, criterion.right
        if isinstance(column, BindParameter):
            column, value = value, column
        if (
            not isinstance(column, ColumnClause)
            or column.table is not table
            or not isinstance(value, BindParameter)
            or value.expanding
            or column.name in found
        ):
            return None
        found[column.name] = value
    if sorted(found) != sorted(c.name for c in pk_columns):
        return None
    positions = []
    for pk_column in pk_columns:
        param = found[pk_column.name]
        index = next((i for i, each in enumerate(bindparams) if each is param), None)
        if index is None:
            return None
        positions.append(index)
    return table.fullname, tuple(positions)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------

_NO_OPTIONS: Final[Mapping[str, Any]] = MappingProxyType({})
_identities: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def _database_identity(engine: Engine) -> str:
    """The rendered identity of the database ``engine`` connects to, without the password."""
    identity = _identities.get(engine)
    if identity is None:
        url = engine.url
        options = sorted(
            (name, str(value)) for name, value in url.query.items() if not _SECRET_OPTION.search(name)
        )
        parts: list[str] = []
        _render_value(
            (
                engine.dialect.name,
                engine.dialect.driver,
                url.host,
                url.port,
                url.database,
                url.username,
                options,
            ),
            parts,
        )
        identity = "".join(parts)
        _identities[engine] = identity
    return identity


def statement_key(
    stmt: Executable,
    bind: Engine | Connection,
    execution_options: Mapping[str, Any] = _NO_OPTIONS,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Return the cache key of the result of running ``stmt`` on ``bind``.

    ``"sa:"`` and 32 hex digits, built from SQLAlchemy's statement cache key (its
    structure, loader options included, and the values of its bound parameters),
    the database ``bind`` connects to (dialect, driver, host, port, database and
    user; never the password) and the effective ``schema_translate_map`` (of the
    bind, the statement and ``execution_options``, later ones winning). Equal in
    every process for the same statement on the same database. The part that
    depends on the statement's shape only is computed once per shape.

    ``params`` are the parameters given to ``execute()`` beside the statement:
    they take the place of the bound values of the same names (as they do when
    the statement runs) and are part of the key.

    Raises :class:`NotCacheable` when the statement is not a ``select()``, locks
    rows, calls ``next_value()``, has no SQLAlchemy cache key, or has a bound
    parameter whose value cannot be rendered stably or is given neither in the
    statement nor in ``params`` (``bindparam("x")`` without a value). Textual
    fragments do not raise here; :func:`read_tables` decides about those.
    """
    cache_key, shape = _shape(stmt)
    return _key_of(stmt, cache_key, shape, bind, execution_options, params)


def _key_of(
    stmt: Executable,
    cache_key: Any,
    shape: _Shape,
    bind: Engine | Connection,
    execution_options: Mapping[str, Any],
    params: Mapping[str, Any] | None,
) -> str:
    """:func:`statement_key` once the statement's shape is known."""
    if shape.fatal is not None:
        raise NotCacheable(shape.fatal)
    engine = bind.engine
    parts = [shape.digest, _database_identity(engine)]
    translate = execution_options.get("schema_translate_map")
    if translate is None:
        translate = stmt.get_execution_options().get("schema_translate_map")
        if translate is None:
            translate = bind.get_execution_options().get("schema_translate_map")
    try:
        if translate:
            _render_value(dict(translate), parts)
        given = params if params is not None else _NO_OPTIONS
        for param in cache_key.bindparams:
            if param.key in given:
                continue  # the execute() parameter is used instead: rendered below
            if param.value is None and param.callable is None and param.required:
                name = param.key if not param.key.startswith("%(") else "an anonymous bindparam()"
                raise NotCacheable(
                    f"bound parameter {name!r} has no value in the statement (it is given at execution time)"
                )
            _render_value(param.effective_value, parts)
        for name in sorted(given):
            parts.append(_str(str(name)))
            _render_value(given[name], parts)
    except _Unrenderable as exc:
        raise NotCacheable(f"a bound parameter is a {exc.what}, which has no stable rendering") from None
    return _KEY_PREFIX + _digest("".join(parts))


def read_tables(stmt: Executable, tables: Iterable[str] | None = None) -> frozenset[str]:
    """Return every table ``stmt`` reads, by ``Table.fullname``.

    Found: tables in FROM clauses, joins (ORM joins along relationships with
    their secondary tables), subqueries, CTEs, scalar subqueries; for each ORM
    entity selected, the tables of its inheritance hierarchy (subclasses
    included), of its ``column_property`` expressions and of its relationships
    configured to load eagerly (recursively); the tables of eager loader options
    (``selectinload``, ``joinedload``, ``subqueryload``, ``immediateload``,
    ``contains_eager``, nested paths and ``"*"``) and of ``with_loader_criteria``.

    ``tables`` names tables the statement reads that cannot be found (behind
    ``text()``, ``literal_column()`` or a SQL function); they are added to what is
    found, and textual fragments are then accepted.

    Raises :class:`NotCacheable` for a statement that is not a ``select()``
    (``insert()``, ``update()``, ``delete()``, ``text()``), that locks rows
    (``with_for_update()``), and, unless ``tables`` is given, that contains
    ``text()``, ``literal_column()`` or ``text().columns()`` anywhere.
    """
    if isinstance(tables, str):
        raise TypeError("tables must be an iterable of table names, not a str; write tables=[name]")
    _, shape = _shape(stmt)
    return _tables_of(shape, tables)


def _tables_of(shape: _Shape, tables: Iterable[str] | None) -> frozenset[str]:
    """:func:`read_tables` once the statement's shape is known."""
    if shape.fatal is not None:
        raise NotCacheable(shape.fatal)
    if tables is None:
        if shape.textual is not None:
            raise NotCacheable(shape.textual)
        return shape.tables
    return shape.tables | frozenset(tables)


def pk_lookup(stmt: Executable) -> tuple[str, tuple[Any, ...]] | None:
    """Return (table fullname, primary-key values) when ``stmt`` reads one row by primary key.

    That is: it selects one mapped entity or columns of one table, with no join,
    subquery (a ``column_property`` subquery included), eager loading, loader
    criteria or textual fragment, and its WHERE is exactly one equality of each
    primary-key column with a bound value. ``select(Label).where(Label.id == 5)``
    gives ``("labels", (5,))``; values are in the order of the table's primary
    key columns. Otherwise, and when a value is None or cannot be rendered in a
    tag, None.
    """
    try:
        cache_key, shape = _shape(stmt)
    except NotCacheable:
        return None
    return _pk_of(cache_key, shape)


def _pk_of(cache_key: Any, shape: _Shape) -> tuple[str, tuple[Any, ...]] | None:
    """:func:`pk_lookup` once the statement's shape is known."""
    if shape.pk is None or shape.fatal is not None:
        return None
    table, positions = shape.pk
    values = tuple(cache_key.bindparams[i].effective_value for i in positions)
    try:
        for value in values:
            if value is None:
                return None
            _pk_text(value)
    except NotCacheable:
        return None
    return table, values


class Described(NamedTuple):
    """What :func:`describe` finds about one execution of a statement."""

    key: str
    tables: frozenset[str]
    pk: tuple[str, tuple[Any, ...]] | None


def describe(
    stmt: Executable,
    bind: Engine | Connection,
    execution_options: Mapping[str, Any] = _NO_OPTIONS,
    params: Mapping[str, Any] | None = None,
    tables: Iterable[str] | None = None,
) -> Described:
    """:func:`statement_key`, :func:`read_tables` and (without ``tables``) :func:`pk_lookup`
    in one look-up of the statement's shape: the query cache's per-call analysis.
    Raises :class:`NotCacheable` as those do."""
    if isinstance(tables, str):
        raise TypeError("tables must be an iterable of table names, not a str; write tables=[name]")
    cache_key, shape = _shape(stmt)
    read = _tables_of(shape, tables)
    key = _key_of(stmt, cache_key, shape, bind, execution_options, params)
    return Described(key, read, _pk_of(cache_key, shape) if tables is None else None)


_written: weakref.WeakKeyDictionary[Any, tuple[int, frozenset[str]]] = weakref.WeakKeyDictionary()


def written_tables(mapper_or_table: Mapper[Any] | Table) -> frozenset[str]:
    """Return the tables a write through ``mapper_or_table`` changes, by ``Table.fullname``.

    A mapper writes all the tables of its inheritance chain; a table itself.
    Added, transitively, are the tables whose foreign keys reference a changed
    table with ``ON DELETE`` or ``ON UPDATE`` ``CASCADE``, ``SET NULL`` or
    ``SET DEFAULT``: the database changes their rows without the ORM seeing it.
    Remembered per mapper or table (recomputed when tables are added to its
    ``MetaData``).
    """
    if isinstance(mapper_or_table, Mapper):
        start = list(mapper_or_table.tables)
    elif isinstance(mapper_or_table, TableClause):
        start = [mapper_or_table]
    else:
        raise TypeError(f"expected a Mapper or a Table, got {type(mapper_or_table).__name__}")
    metadatas = {id(t.metadata): t.metadata for t in start if isinstance(t, Table)}
    size = sum(len(m.tables) for m in metadatas.values())
    remembered = _written.get(mapper_or_table)
    if remembered is not None and remembered[0] == size:
        return remembered[1]
    referencing: dict[str, set[Table]] = {}
    for metadata in metadatas.values():
        for table in metadata.tables.values():
            for fk in table.foreign_keys:
                actions = {(fk.ondelete or "").upper(), (fk.onupdate or "").upper()}
                if not actions & _CHANGING_ACTIONS:
                    continue
                try:
                    target = fk.column.table
                except Exception:  # an unresolvable reference: the database changes nothing through it
                    continue
                referencing.setdefault(getattr(target, "fullname", ""), set()).add(table)
    result = {t.fullname for t in start}
    pending = list(result)
    while pending:
        for table in referencing.get(pending.pop(), ()):
            if table.fullname not in result:
                result.add(table.fullname)
                pending.append(table.fullname)
    frozen = frozenset(result)
    _written[mapper_or_table] = (size, frozen)
    return frozen


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"%{code:02X}" if code < 0x100 else f"%u{code:04X}"


def _bounded(tag: str) -> str:
    """``tag`` when short enough, else its beginning, ``"#"`` and a digest of the whole tag."""
    if len(tag) <= MAX_LENGTH:
        return tag
    return f"{tag[: MAX_LENGTH - 33]}#{_digest(tag)}"


def _name(name: str) -> str:
    return _TAG_UNSAFE.sub(_escape, name)


def table_tag(name: str) -> str:
    """The tag of every cached result reading table ``name`` (a ``Table.fullname``): ``"table:" + name``."""
    tag = "table:" + _name(name)
    return _bounded(tag)


def rows_tag(name: str) -> str:
    """The tag primary-key lookups of table ``name`` carry: ``"rows:" + name``.

    A bulk write to the table, or a manual invalidation of it, invalidates this
    tag (and :func:`table_tag`), reaching the lookups whose rows it may have
    changed without knowing which.
    """
    tag = "rows:" + _name(name)
    return _bounded(tag)


def _pk_text(value: Any) -> str:
    """One primary-key value as tag text, equal for values the database takes for equal."""
    if isinstance(value, enum.Enum):
        value = value.name
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return str(int(value))
        return _PK_UNSAFE.sub(_escape, format(value.normalize(), "f"))
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return _PK_UNSAFE.sub(_escape, str.__str__(value))
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is not None and value.utcoffset() is not None:
            value = value.astimezone(timezone.utc)
        return _PK_UNSAFE.sub(_escape, value.isoformat())
    if isinstance(value, (date, time)):
        return _PK_UNSAFE.sub(_escape, value.isoformat())
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "x" + bytes(value).hex()
    raise NotCacheable(f"a primary-key value of type {type(value).__name__} cannot be rendered in a tag")


def identity_tags(pk_table: str, pk: tuple[Any, ...]) -> str:
    """Return the tag of one row: ``"row:{table}:{pk}"``.

    Values render so that values the database takes for equal render alike:
    integers (and integral ``Decimal`` and ``float``) as digits, other decimals
    normalised, aware datetimes in UTC, strings, UUIDs and dates as text, bytes
    as ``x`` and hex. Composite keys are joined with ``","``. ``%``, ``,``,
    ``:``, control characters and lone surrogates in values are escaped as
    ``%XX`` (``%uXXXX``), so distinct keys never share a tag; a tag longer than
    200 characters is shortened to a prefix and a digest. Raises
    :class:`NotCacheable` for a value of another type.
    """
    tag = f"row:{_name(pk_table)}:" + ",".join(_pk_text(value) for value in pk)
    return _bounded(tag)
