"""The rows of a query result as a JSON-compatible payload, and back to a ``Result``.

``encode_result`` turns a frozen result into plain data (dicts with str keys, lists,
str, int, float, bool, None). It is columnar: each result column, and each loaded
attribute of each group of ORM objects, is one list of values with one converter code,
so decoding is a few list comprehensions.

``decode_result`` rebuilds the ``Result`` that executing the statement would give and
makes its ORM objects persistent in a session without emitting SQL, with the
semantics of ``merge_frozen_result(session, stmt, frozen, load=False)`` except that an
object already in the identity map keeps its in-memory values, as on a real execution:
only its unloaded attributes are filled in.

Payload (format 1)::

    {"v": 1,
     "keys": [result keys], "names": [label of each statement column],
     "ents": [mapped class name of an entity column, or None for a plain column],
     "scalars": bool, "flags": {ORM result flag: bool},
     "n": number of rows, "codes": [converter per column], "cols": [[values] per column],
     "objs": [{"cls": mapped class name, "fp": mapper fingerprint, "n": number of objects,
               "keys": [loaded attributes], "codes": [...], "cols": [[values] per attribute]}]}

Objects are numbered across the groups of ``objs`` in order; entity columns and
relationship attributes hold those numbers (code ``"o"``: a number or None; ``"os"``:
a list of numbers).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import itertools
import math
import uuid
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Select
from sqlalchemy.engine import FrozenResult, Result
from sqlalchemy.orm import ColumnProperty, Mapper, RelationshipProperty, Session
from sqlalchemy.orm.attributes import instance_state, set_committed_value

from .errors import NotCacheable

__all__ = ["encode_result", "decode_result"]

_FORMAT = 1
_NONE_TYPE = type(None)
_JSON_SCALARS = frozenset({str, int, bool, _NONE_TYPE})
_JSON_TYPES = frozenset({str, int, bool, float, dict, list, _NONE_TYPE})
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # the integers orjson writes
_ONE_US = timedelta(microseconds=1)


# --------------------------------------------------------------------------- SQLAlchemy internals
# The only places that touch private SQLAlchemy API. Each does what the ORM itself does
# in ``merge_frozen_result`` / ``Session.merge(load=False)`` / ``FrozenResult.__call__``,
# for which no public equivalent exists.


@dataclass(frozen=True)
class _Column:
    label: str | None
    extra: tuple[Any, ...]
    mapper: Mapper[Any] | None
    sql_type: Any


def _statement_columns(stmt: Select[Any]) -> list[_Column]:
    """The result columns of an ORM select, as the ORM names them.

    Private: ``_ORMSelectCompileState._create_entities_collection`` is what
    ``merge_frozen_result`` and ``Select.column_descriptions`` use; only it gives the
    "extra entities" a ``Row._mapping`` is keyed by (``row._mapping[User.name]``).
    """
    from sqlalchemy.orm import context
    from sqlalchemy.orm.context import _MapperEntity

    # ORMSelectCompileState in SQLAlchemy 2.0, _ORMSelectCompileState from 2.1
    state_class: Any = getattr(context, "_ORMSelectCompileState", None)
    if state_class is None:
        state_class = getattr(context, "ORMSelectCompileState")  # noqa: B009  # absent from 2.1's stubs
    ctx = state_class._create_entities_collection(stmt, legacy=False)
    return [
        _Column(
            ent._label_name,
            tuple(ent._extra_entities),
            ent.mapper if isinstance(ent, _MapperEntity) else None,
            getattr(ent, "type", None),
        )
        for ent in ctx._entities
    ]


def _frozen_flags(frozen: FrozenResult[Any]) -> tuple[bool, dict[str, bool]]:
    """Whether the rows are single objects, and the ORM result flags (``filtered``,
    ``is_single_entity``, read by the legacy ``Query``). Private attributes of FrozenResult."""
    flags = {k: v for k, v in frozen._attributes.items() if isinstance(k, str) and isinstance(v, bool)}
    return bool(frozen._source_supports_scalars), flags


def _make_result(
    keys: Sequence[str | None],
    extras: Sequence[tuple[Any, ...]],
    data: list[Any],
    scalars: bool,
    flags: dict[str, bool],
) -> Result[Any]:
    """A Result over in-memory rows, built as ``FrozenResult.__call__`` builds one.

    Private: ``SimpleResultMetaData`` and the ``_attributes`` / ``_source_supports_scalars``
    attributes of a Result.
    """
    from sqlalchemy.engine import IteratorResult
    from sqlalchemy.engine.result import SimpleResultMetaData
    from sqlalchemy.util import immutabledict

    result: IteratorResult[Any] = IteratorResult(
        SimpleResultMetaData(keys, extras),  # type: ignore[arg-type]  # None: unnamed entity, as the ORM passes
        iter(data),
    )
    result._attributes = immutabledict(flags)
    result._source_supports_scalars = scalars
    return result


def _new_instance(mapper: Mapper[Any], values: dict[str, Any]) -> Any:
    """A transient instance of ``mapper`` holding ``values`` as loaded (unchanged) state,
    as the ORM builds one for a fetched row. Private: ``ClassManager.new_instance``."""
    obj = mapper.class_manager.new_instance()
    obj.__dict__.update(values)
    return obj


def _new_instances(mapper: Mapper[Any], keys: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[Any]:
    """Transient instances of ``mapper``, one per row of values for ``keys`` (see _new_instance)."""
    new = mapper.class_manager.new_instance
    out = []
    for row in rows:
        obj = new()
        obj.__dict__.update(zip(keys, row, strict=True))
        out.append(obj)
    return out


def _make_persistent(session: Session, fresh: Sequence[tuple[Any, Any, Sequence[str]]]) -> None:
    """Put freshly built instances into ``session`` as persistent under their identity
    keys, as the ORM's row loader does for objects it fetched: no SQL, no history;
    ``expired`` attributes load on access like those a polymorphic or ``load_only`` load
    leaves unloaded; the ``load`` and ``loaded_as_persistent`` events fire.

    Private (from ``sqlalchemy.orm.loading``): ``InstanceState.key`` and ``session_id``,
    ``IdentityMap._add_unpresent``, the event dispatchers.
    """
    identity_map = session.identity_map
    session_id = session.hash_key
    persistent_event = session.dispatch.loaded_as_persistent
    states = []
    for obj, key, expired in fresh:
        state = instance_state(obj)
        state.key = key
        state.session_id = session_id
        if expired:
            state.expired_attributes.update(expired)
        identity_map._add_unpresent(state, key)
        states.append(state)
    for state in states:
        load_event = state.manager.dispatch.load
        if load_event:  # an empty listener collection is false: skip the call
            load_event(state, None)
        if persistent_event:
            persistent_event(session, state)


# --------------------------------------------------------------------------- mappers


@dataclass
class _MapperInfo:
    mapper: Mapper[Any]
    name: str
    fingerprint: str
    order: list[str]  # column attributes, then relationships, in mapper order
    enums: dict[str, type[enum.Enum] | None]  # column attribute -> enum class of its type
    deferred: frozenset[str]
    rels: dict[str, bool]  # relationship -> uselist
    bad_rels: dict[str, str]  # relationship -> why its loaded value cannot be cached
    pk: list[str]
    expired_for: dict[frozenset[str], list[str]] = field(default_factory=dict)


_INFO: dict[Mapper[Any], _MapperInfo] = {}
_REACHABLE: dict[Mapper[Any], dict[str, Mapper[Any]]] = {}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _enum_class(sql_type: Any) -> type[enum.Enum] | None:
    cls = getattr(sql_type, "enum_class", None)
    return cls if isinstance(cls, type) and issubclass(cls, enum.Enum) else None


def _info(mapper: Mapper[Any]) -> _MapperInfo:
    info = _INFO.get(mapper)
    if info is not None:
        return info
    parts: list[str] = []
    order: list[str] = []
    enums: dict[str, type[enum.Enum] | None] = {}
    deferred: set[str] = set()
    rels: dict[str, bool] = {}
    bad_rels: dict[str, str] = {}
    for prop in mapper.attrs:
        if isinstance(prop, ColumnProperty):
            order.append(prop.key)
            enums[prop.key] = _enum_class(prop.columns[0].type)
            if prop.deferred:
                deferred.add(prop.key)
            parts.append(f"{prop.key}:{','.join(repr(c.type) for c in prop.columns)}")
    for prop in mapper.attrs:
        if isinstance(prop, RelationshipProperty):
            order.append(prop.key)
            rels[prop.key] = bool(prop.uselist)
            if prop.uselist and prop.collection_class not in (None, list, set):
                bad_rels[prop.key] = f"collection class {prop.collection_class!r}"
            parts.append(f"{prop.key}->{_class_name(prop.mapper.class_)}:{prop.uselist}")
    fingerprint = hashlib.blake2b("|".join(parts).encode(), digest_size=8).hexdigest()
    pk = [mapper.get_property_by_column(col).key for col in mapper.primary_key]
    info = _MapperInfo(
        mapper,
        _class_name(mapper.class_),
        fingerprint,
        order,
        enums,
        frozenset(deferred),
        rels,
        bad_rels,
        pk,
    )
    _INFO[mapper] = info
    return info


def _reachable(roots: Iterable[Mapper[Any]], *, refresh: bool = False) -> dict[str, Mapper[Any]]:
    """Mapped classes a payload for a statement over ``roots`` may name: their
    hierarchies and whatever their relationships lead to."""
    found: dict[str, Mapper[Any]] = {}
    for root in roots:
        names = None if refresh else _REACHABLE.get(root)
        if names is None:
            names = {}
            todo = [root]
            seen: set[Mapper[Any]] = set()
            while todo:
                m = todo.pop()
                for sub in m.base_mapper.self_and_descendants:
                    if sub not in seen:
                        seen.add(sub)
                        names[_class_name(sub.class_)] = sub
                        todo.extend(rel.mapper for rel in sub.relationships)
            _REACHABLE[root] = names
        found.update(names)
    return found


# --------------------------------------------------------------------------- values


def _fixed_offset(tz: Any) -> bool:
    """A tzinfo that ISO 8601 text restores exactly (None or an unnamed fixed offset)."""
    if tz is None:
        return True
    if type(tz) is not timezone:
        return False
    offset = tz.utcoffset(None)
    return offset is not None and repr(tz) == repr(timezone(offset))


def _check_json(value: Any, where: str) -> None:
    t = type(value)
    if t is str or t is bool or value is None:
        return
    if t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise NotCacheable(f"column {where}: integer {value} is out of the 64-bit range")
    elif t is float:
        if not math.isfinite(value):
            raise NotCacheable(f"column {where}: non-finite float {value!r}")
    elif t is list:
        for item in value:
            _check_json(item, where)
    elif t is dict:
        for k, item in value.items():
            if type(k) is not str:
                raise NotCacheable(f"column {where}: JSON object key of type {type(k).__name__}")
            _check_json(item, where)
    else:
        raise NotCacheable(f"column {where}: value of type {_class_name(t)} inside a JSON value")


def _zoned(text: str) -> datetime:
    iso, _, key = text.partition("[")
    value = datetime.fromisoformat(iso)
    return value.astimezone(ZoneInfo(key[:-1])) if key else value


def _timedelta(n: int) -> timedelta:
    if type(n) is not int:
        raise TypeError("not an int")
    return timedelta(microseconds=n)


def _asyncpg_uuid(text: str) -> uuid.UUID:
    from asyncpg.pgproto.pgproto import UUID  # type: ignore[import-untyped]  # asyncpg ships no stubs

    return UUID(text)  # type: ignore[no-any-return]  # untyped class


def _bytes(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "dt": datetime.fromisoformat,
    "dtz": _zoned,
    "d": date.fromisoformat,
    "t": time.fromisoformat,
    "td": _timedelta,
    "dec": Decimal,
    "uuid": uuid.UUID,
    "uuid-asyncpg": _asyncpg_uuid,
    "b": _bytes,
}


def _encode_column(
    values: Sequence[Any], where: str, enum_cls: type[enum.Enum] | None
) -> tuple[str, list[Any]]:
    """(converter code, JSON-compatible values) for one column of values."""
    types = set(map(type, values))
    types.discard(_NONE_TYPE)
    if not types:
        return "", list(values)
    if types <= _JSON_SCALARS:
        if int in types:
            for v in values:
                if type(v) is int and not _INT_MIN <= v <= _INT_MAX:
                    raise NotCacheable(f"column {where}: integer {v} is out of the 64-bit range")
        return "", list(values)
    if types <= _JSON_TYPES:
        for v in values:
            _check_json(v, where)
        return "", list(values)
    if len(types) > 1:
        names = ", ".join(sorted(_class_name(t) for t in types))
        raise NotCacheable(f"column {where}: values of several types ({names})")
    (t,) = types
    present = [v for v in values if v is not None]
    if t is datetime:
        if all(_fixed_offset(v.tzinfo) and not v.fold for v in present):
            return "dt", [None if v is None else v.isoformat() for v in values]
        out: list[Any] = []
        for v in values:
            if v is None:
                out.append(None)
            elif type(v.tzinfo) is ZoneInfo and v.tzinfo.key:
                out.append(f"{v.isoformat()}[{v.tzinfo.key}]")
            elif _fixed_offset(v.tzinfo) and not v.fold:
                out.append(v.isoformat())
            else:
                raise NotCacheable(f"column {where}: datetime with time zone {v.tzinfo!r}")
        return "dtz", out
    if t is date:
        return "d", [None if v is None else v.isoformat() for v in values]
    if t is time:
        if not all(_fixed_offset(v.tzinfo) and not v.fold for v in present):
            raise NotCacheable(f"column {where}: time with a named time zone")
        return "t", [None if v is None else v.isoformat() for v in values]
    if t is timedelta:
        out = [None if v is None else v // _ONE_US for v in values]
        if not all(_INT_MIN <= n <= _INT_MAX for n in out if n is not None):
            raise NotCacheable(f"column {where}: interval out of range")
        return "td", out
    if t is Decimal:
        return "dec", [None if v is None else str(v) for v in values]
    if t is uuid.UUID or (issubclass(t, uuid.UUID) and _class_name(t) == "asyncpg.pgproto.pgproto.UUID"):
        code = "uuid" if t is uuid.UUID else "uuid-asyncpg"
        return code, [None if v is None else str(v) for v in values]
    if t is bytes:
        return "b", [None if v is None else base64.b64encode(v).decode("ascii") for v in values]
    if enum_cls is not None and t is enum_cls:
        return "e", [None if v is None else v.name for v in values]
    raise NotCacheable(f"column {where}: values of type {_class_name(t)} cannot be cached exactly")


def _decode_column(code: Any, col: Any, n: int, enum_cls: type[enum.Enum] | None) -> list[Any]:
    if type(col) is not list or len(col) != n:
        raise NotCacheable("malformed payload: a column has the wrong length")
    if code == "":
        return col
    if code == "e":
        if enum_cls is None:
            raise NotCacheable("payload has enum values for a column that is not an Enum")
        members = enum_cls.__members__
        return [None if v is None else members[v] for v in col]
    convert = _DECODERS.get(code) if type(code) is str else None
    if convert is None:
        raise NotCacheable(f"malformed payload: unknown converter {code!r}")
    return [None if v is None else convert(v) for v in col]


# --------------------------------------------------------------------------- encode


class _Objects:
    """The ORM objects a result reaches, grouped by mapper and loaded attributes."""

    def __init__(self, held: Container[Any]) -> None:
        self.held = held
        self.seen: dict[int, tuple[Any, list[Any]]] = {}  # id(obj) -> (group key, group)
        self.groups: dict[tuple[Mapper[Any], tuple[str, ...]], list[Any]] = {}
        self.index: dict[int, int] = {}

    def add(self, obj: Any) -> None:
        todo = [obj]
        while todo:
            o = todo.pop()
            if id(o) in self.seen:
                continue
            state = instance_state(o)
            info = _info(state.mapper)
            if state.key is None:
                raise NotCacheable(f"{info.name} object is not persistent")
            if state.modified:
                raise NotCacheable(f"{info.name} object has unflushed changes")
            if state.key in self.held:
                # The statement returned the session's object as it was: its values
                # may be older than the database's (another transaction committed since).
                raise NotCacheable(f"{info.name} object was already loaded in the session")
            if state.key[2] is not None:
                raise NotCacheable(f"{info.name} object has an identity token")
            d = state.dict
            keys = tuple(k for k in info.order if k in d)
            gkey = (info.mapper, keys)
            group = self.groups.setdefault(gkey, [])
            group.append(o)
            self.seen[id(o)] = (gkey, group)
            for k in keys:
                uselist = info.rels.get(k)
                if uselist is None:
                    continue
                if k in info.bad_rels:
                    raise NotCacheable(f"relationship {info.name}.{k}: {info.bad_rels[k]}")
                value = d[k]
                if uselist:
                    todo.extend(value)
                elif value is not None:
                    todo.append(value)

    def number(self) -> None:
        i = 0
        for group in self.groups.values():
            for o in group:
                self.index[id(o)] = i
                i += 1

    def ref(self, obj: Any) -> int | None:
        return None if obj is None else self.index[id(obj)]

    def encode(self) -> list[dict[str, Any]]:
        out = []
        for (mapper, keys), group in self.groups.items():
            info = _info(mapper)
            codes: list[str] = []
            cols: list[list[Any]] = []
            for k in keys:
                uselist = info.rels.get(k)
                values = [o.__dict__[k] for o in group]
                if uselist is None:
                    code, col = _encode_column(values, f"{info.name}.{k}", info.enums[k])
                elif uselist:
                    code, col = "os", [[self.index[id(m)] for m in v] for v in values]
                else:
                    code, col = "o", [self.ref(v) for v in values]
                codes.append(code)
                cols.append(col)
            out.append(
                {
                    "cls": info.name,
                    "fp": info.fingerprint,
                    "n": len(group),
                    "keys": list(keys),
                    "codes": codes,
                    "cols": cols,
                }
            )
        return out


def encode_result(
    frozen: FrozenResult[Any], stmt: Select[Any], *, max_rows: int, held: Container[Any] = ()
) -> dict[str, Any]:
    """A JSON-compatible payload of ``frozen``, the frozen result of executing ``stmt``.

    Only dicts with str keys, lists, str, int, float, bool and None occur inside. Rows are
    stored by column, each column with one converter code; ORM objects (with the
    attributes they have loaded, and the objects their loaded relationships reach) are
    stored once each, grouped by class, with a fingerprint of each mapper's columns.

    Raises ``NotCacheable(reason)`` when the result has more than ``max_rows`` rows, when
    a value's type cannot be stored exactly (naming the column and the type), when an
    object has unflushed changes, or when an object's identity key is in ``held``: the
    objects the session had loaded before the statement ran, which the statement returns
    with the values they had then (it does not overwrite loaded attributes).
    """
    rows = frozen().all()
    if len(rows) > max_rows:
        raise NotCacheable(f"result has more than {max_rows} rows")
    columns = _statement_columns(stmt)
    labels = [c.label for c in columns]
    result_keys = list(frozen.metadata.keys)
    keys: list[str] | None = None  # None: the result is keyed by the labels
    if result_keys != [label for label in labels if label is not None]:
        if len(result_keys) != len(labels):
            raise NotCacheable("result columns do not match the statement's columns")
        keys = result_keys
    by_column: list[Sequence[Any]] = list(zip(*rows, strict=True)) if rows else [() for _ in labels]
    objects = _Objects(held)
    for column, values in zip(columns, by_column, strict=True):
        if column.mapper is not None:
            for obj in values:
                if obj is not None:
                    objects.add(obj)
    objects.number()
    codes: list[str] = []
    cols: list[list[Any]] = []
    for i, (column, values) in enumerate(zip(columns, by_column, strict=True)):
        if column.mapper is not None:
            code, col = "o", [objects.ref(v) for v in values]
        else:
            name = repr(keys[i] if keys is not None else column.label)
            code, col = _encode_column(values, name, _enum_class(column.sql_type))
        codes.append(code)
        cols.append(col)
    scalars, flags = _frozen_flags(frozen)
    return {
        "v": _FORMAT,
        "keys": keys,
        "names": labels,
        "ents": [None if c.mapper is None else _class_name(c.mapper.class_) for c in columns],
        "scalars": scalars,
        "flags": flags,
        "n": len(rows),
        "codes": codes,
        "cols": cols,
        "objs": objects.encode(),
    }


# --------------------------------------------------------------------------- decode


@dataclass
class _Group:
    info: _MapperInfo
    keys: list[str]
    values: list[list[Any]]  # columns of column attributes, decoded
    value_keys: list[str]
    refs: list[tuple[str, bool, list[Any]]]  # (relationship, uselist, column of numbers)
    identities: list[Any]
    expired: list[str]


def _check_refs(refs: Iterable[Any], mappers_of: list[Mapper[Any]], target: Mapper[Any]) -> None:
    """Raise unless each of ``refs`` is None or the number of an object of class ``target``."""
    total = len(mappers_of)
    allowed = {m for m in mappers_of if m.isa(target)}
    for i in refs:
        if i is None:
            continue
        if type(i) is not int or not 0 <= i < total:
            raise NotCacheable("malformed payload: bad object reference")
        if mappers_of[i] not in allowed:
            raise NotCacheable("payload refers to an object of another class")


def _parse_groups(raw: Any, names: dict[str, Mapper[Any]], roots: list[Mapper[Any]]) -> list[_Group]:
    if type(raw) is not list:
        raise NotCacheable("malformed payload: objs")
    infos: list[_MapperInfo] = []
    mappers_of: list[Mapper[Any]] = []
    for g in raw:
        name, n = g["cls"], g["n"]
        if type(n) is not int or n < 0 or type(name) is not str:
            raise NotCacheable("malformed payload: object group")
        mapper = names.get(name)
        if mapper is None:
            names.update(_reachable(roots, refresh=True))
            mapper = names.get(name)
            if mapper is None:
                raise NotCacheable(f"payload names a class the statement does not reach: {name!r}")
        info = _info(mapper)
        if g["fp"] != info.fingerprint:
            raise NotCacheable(f"payload was written for another version of {info.name}")
        infos.append(info)
        mappers_of.extend([mapper] * n)
    groups = []
    for g, info in zip(raw, infos, strict=True):
        mapper = info.mapper
        keys, codes, cols, n = g["keys"], g["codes"], g["cols"], g["n"]
        if type(keys) is not list or type(codes) is not list or type(cols) is not list:
            raise NotCacheable("malformed payload: object group")
        if not len(keys) == len(codes) == len(cols) or len(set(keys)) != len(keys):
            raise NotCacheable("malformed payload: object group")
        values: list[list[Any]] = []
        value_keys: list[str] = []
        refs: list[tuple[str, bool, list[Any]]] = []
        for key, code, col in zip(keys, codes, cols, strict=True):
            if type(key) is not str:
                raise NotCacheable("malformed payload: attribute name")
            uselist = info.rels.get(key)
            if key in info.enums:
                values.append(_decode_column(code, col, n, info.enums[key]))
                value_keys.append(key)
            elif uselist is not None and code == ("os" if uselist else "o"):
                if type(col) is not list or len(col) != n:
                    raise NotCacheable("malformed payload: relationship column")
                target = mapper.relationships[key].mapper
                if uselist:
                    if not all(type(v) is list for v in col):
                        raise NotCacheable("malformed payload: collection")
                    members = [i for v in col for i in v]
                    if None in members:
                        raise NotCacheable("malformed payload: None in a collection")
                    _check_refs(members, mappers_of, target)
                else:
                    _check_refs(col, mappers_of, target)
                refs.append((key, uselist, col))
            else:
                raise NotCacheable(f"payload has attribute {key!r} that {info.name} does not map")
        try:
            pk_cols = [values[value_keys.index(k)] for k in info.pk]
        except ValueError:
            raise NotCacheable(f"payload lacks the primary key of {info.name}") from None
        identities = [mapper.identity_key_from_primary_key(tuple(pk)) for pk in zip(*pk_cols, strict=True)]
        if len(identities) != n or any(v is None for ident in identities for v in ident[1]):
            raise NotCacheable(f"payload has a {info.name} without a primary key")
        loaded = frozenset(keys)
        expired = info.expired_for.get(loaded)
        if expired is None:
            expired = [k for k in info.enums if k not in loaded and k not in info.deferred]
            info.expired_for[loaded] = expired
        groups.append(_Group(info, keys, values, value_keys, refs, identities, expired))
    return groups


def decode_result(payload: Any, session: Session, stmt: Select[Any]) -> Result[Any]:
    """The ``Result`` that executing ``stmt`` in ``session`` would give, rebuilt from ``payload``.

    ``session`` is a sync ``Session`` (for an ``AsyncSession`` pass its ``sync_session``).
    ORM objects become persistent in it without emitting SQL: an object whose identity is
    already in the identity map is returned as it is, with only its unloaded attributes
    filled in from the payload; the others are created with the attributes that were
    loaded when the payload was written (deferred and lazy ones load on access as usual).

    Raises ``NotCacheable(reason)``, before touching the session, when the payload does
    not fit: malformed or foreign data, written for another statement shape, or for a
    mapped class whose columns have changed since.
    """
    try:
        return _decode(payload, session, stmt)
    except NotCacheable:
        raise
    except Exception as exc:
        raise NotCacheable(f"malformed payload ({type(exc).__name__})") from exc


def _decode(payload: Any, session: Session, stmt: Select[Any]) -> Result[Any]:
    if type(payload) is not dict or payload.get("v") != _FORMAT:
        raise NotCacheable("payload is not a result of this format")
    columns = _statement_columns(stmt)
    ents = [None if c.mapper is None else _class_name(c.mapper.class_) for c in columns]
    if payload["ents"] != ents or payload["names"] != [c.label for c in columns]:
        raise NotCacheable("payload was written for another statement shape")
    keys, codes, cols, n = payload["keys"], payload["codes"], payload["cols"], payload["n"]
    if keys is None:
        keys = [c.label for c in columns]
    elif type(keys) is not list or not all(type(k) is str for k in keys):
        raise NotCacheable("malformed payload: keys")
    if type(n) is not int or n < 0:
        raise NotCacheable("malformed payload: row count")
    if (
        type(codes) is not list
        or type(cols) is not list
        or not len(keys) == len(codes) == len(cols) == len(ents)
    ):
        raise NotCacheable("malformed payload: columns")
    scalars, flags = payload["scalars"], payload["flags"]
    if (
        type(scalars) is not bool
        or type(flags) is not dict
        or not all(type(v) is bool for v in flags.values())
    ):
        raise NotCacheable("malformed payload: flags")
    if scalars and len(columns) != 1:
        raise NotCacheable("malformed payload: scalars")

    # Phase 1: parse and check everything; the session is not touched yet.
    roots = [c.mapper for c in columns if c.mapper is not None]
    names = _reachable(roots) if roots else {}
    groups = _parse_groups(payload["objs"], dict(names), roots) if roots else []
    if not roots and payload["objs"]:
        raise NotCacheable("malformed payload: objects in a result without entities")
    mappers_of: list[Mapper[Any]] = [g.info.mapper for g in groups for _ in g.identities]
    decoded: list[list[Any]] = []
    for column, code, col in zip(columns, codes, cols, strict=True):
        if column.mapper is not None:
            if code != "o" or type(col) is not list or len(col) != n:
                raise NotCacheable("malformed payload: entity column")
            _check_refs(col, mappers_of, column.mapper)
            decoded.append(col)
        else:
            decoded.append(_decode_column(code, col, n, _enum_class(column.sql_type)))

    # Phase 2: objects into the session (no SQL).
    identity_map = session.identity_map
    objs: list[Any] = []
    fresh: list[tuple[Any, Any, list[str]]] = []
    present: dict[Any, Any] = {}
    for g in groups:
        value_keys = g.value_keys
        rows = zip(*g.values, strict=True) if g.values else iter([()] * len(g.identities))
        if not identity_map and not present and len(set(g.identities)) == len(g.identities):
            # A session holding nothing yet (the usual request), each object once: all new.
            made = _new_instances(g.info.mapper, value_keys, rows)
            fresh.extend(zip(made, g.identities, itertools.repeat(g.expired)))
            present.update(zip(g.identities, made, strict=True))
            objs.extend(made)
            continue
        for ident, row in zip(g.identities, rows, strict=True):
            obj = present.get(ident)
            if obj is None:
                obj = identity_map.get(ident)
                if obj is not None:
                    d = obj.__dict__
                    for k, v in zip(value_keys, row, strict=True):
                        if k not in d:
                            set_committed_value(obj, k, v)
                else:
                    obj = _new_instance(g.info.mapper, dict(zip(value_keys, row, strict=True)))
                    fresh.append((obj, ident, g.expired))
                present[ident] = obj
            objs.append(obj)
    fresh_ids = {id(o) for o, _, _ in fresh}
    start = 0
    for g in groups:
        for key, uselist, col in g.refs:
            for j, v in enumerate(col, start):
                obj = objs[j]
                if id(obj) not in fresh_ids and key in obj.__dict__:
                    continue
                if uselist:
                    set_committed_value(obj, key, [objs[i] for i in v])
                else:
                    set_committed_value(obj, key, None if v is None else objs[v])
        start += len(g.identities)
    _make_persistent(session, fresh)

    ref_cols = [
        [None if i is None else objs[i] for i in col] if column.mapper is not None else col
        for column, col in zip(columns, decoded, strict=True)
    ]
    data: list[Any] = ref_cols[0] if scalars else list(zip(*ref_cols, strict=True)) if ref_cols else []
    if not scalars and len(data) != n:
        data = [()] * n
    return _make_result(keys, [c.extra for c in columns], data, scalars, flags)
