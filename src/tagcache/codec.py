"""Codecs: how cached values become bytes and back.

A :class:`Codec` turns a value into ``bytes`` before the cache hands it to a
backend, and turns the stored bytes back into a value on a read. Every
payload starts with a one-byte format marker, so a codec recognises (and
rejects) bytes it did not write.

* :class:`JsonCodec` (the default) is built on orjson and keeps the exact
  Python types of a broad set of values (tuples stay tuples, ``datetime``
  keeps its zone, ``Decimal`` its exponent, dataclasses and pydantic models
  their class). Values made only of plain JSON types are stored as plain
  orjson bytes and decoded with a single ``orjson.loads``.
* :class:`PickleCodec` stores anything picklable. It is opt-in and signs
  every payload with HMAC-SHA256, bound to the namespace and key it is
  stored under (:class:`KeyBoundCodec`); a payload is unpickled only after
  its signature has been verified.

Decoding never imports a module: classes named in a payload are looked up
only among the modules this process has already imported, and the classes
adopted by the codec (:meth:`JsonCodec.adopt`).

Codec errors raise :class:`~tagcache.exceptions.SerializationError`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import hmac
import pickle
import re
import sys
import weakref
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from inspect import getattr_static
from types import GenericAlias, ModuleType
from typing import Any, ClassVar, Final, Protocol, TypeVar, runtime_checkable
from uuid import UUID
from zoneinfo import ZoneInfo

import orjson

from tagcache.exceptions import ConfigurationError, SerializationError

__all__ = ["Codec", "JsonCodec", "KeyBoundCodec", "PickleCodec"]

T = TypeVar("T")


@runtime_checkable
class Codec(Protocol):
    """Turns cache values into bytes and back.

    Implementations raise :class:`~tagcache.exceptions.SerializationError`
    (never another exception type) when a value cannot be encoded or a
    payload cannot be decoded. The message names the offending type; the
    cache adds the key.
    """

    def encode(self, value: object) -> bytes:
        """Return the bytes to store for ``value``.

        Raises:
            SerializationError: ``value`` (or something inside it) cannot be encoded.
        """
        ...

    def decode(self, data: bytes) -> Any:
        """Return the value stored as ``data`` by :meth:`encode`.

        Raises:
            SerializationError: ``data`` is corrupt, truncated or was not written by this codec.
        """
        ...


@runtime_checkable
class KeyBoundCodec(Protocol):
    """A codec that binds each payload to where it is stored.

    When the cache's codec implements these two methods, the cache calls
    them instead of :meth:`Codec.encode` and :meth:`Codec.decode`, with
    ``context = namespace.encode() + b"\\x00" + key.encode()``. A codec can
    then refuse a payload that was written for another key or namespace, for
    example one copied from ``user:root`` to ``user:alice`` by someone able
    to write to the backend. Such a codec still implements :class:`Codec`
    for callers that have no context.
    """

    def encode_for(self, value: object, context: bytes) -> bytes:
        """Return the bytes to store for ``value`` at the place named by ``context``.

        Raises:
            SerializationError: ``value`` (or something inside it) cannot be encoded.
        """
        ...

    def decode_for(self, data: bytes, context: bytes) -> Any:
        """Return the value stored as ``data`` by :meth:`encode_for` with the same ``context``.

        Raises:
            SerializationError: ``data`` is corrupt, was not written by this
                codec, or was written for another ``context``.
        """
        ...


# --------------------------------------------------------------------------------------------------
# JsonCodec
# --------------------------------------------------------------------------------------------------

# Plain payloads are bare JSON text, whose first byte is one of '{["-0123456789tfn';
# markers of the other formats are control bytes at or below this value.
_PLAIN_MAX: Final = 0x20
_TAGGED: Final = 0x02
_PICKLE: Final = 0x03

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1

# A tagged node is a JSON object with exactly one key, taken from this fixed set. A user dict
# of exactly one key from this set is escaped (stored as "$dict" pairs) in the tagged format.
_K_TUPLE: Final = "$tuple"
_K_SET: Final = "$set"
_K_FROZENSET: Final = "$fset"
_K_BYTES: Final = "$bytes"
_K_INT: Final = "$int"
_K_FLOAT: Final = "$float"
_K_DICT: Final = "$dict"
_K_DATETIME: Final = "$dt"
_K_DATE: Final = "$date"
_K_TIME: Final = "$time"
_K_TIMEDELTA: Final = "$td"
_K_UUID: Final = "$uuid"
_K_DECIMAL: Final = "$dec"
_K_ENUM: Final = "$enum"
_K_DATACLASS: Final = "$dc"
_K_PYDANTIC: Final = "$pyd"
_K_REGISTERED: Final = "$x"

_RESERVED: Final = frozenset(
    {
        _K_TUPLE,
        _K_SET,
        _K_FROZENSET,
        _K_BYTES,
        _K_INT,
        _K_FLOAT,
        _K_DICT,
        _K_DATETIME,
        _K_DATE,
        _K_TIME,
        _K_TIMEDELTA,
        _K_UUID,
        _K_DECIMAL,
        _K_ENUM,
        _K_DATACLASS,
        _K_PYDANTIC,
        _K_REGISTERED,
    }
)

# IANA time zone names ("UTC", "Europe/Paris", "Etc/GMT+5", "America/Port-au-Prince"): ASCII letters,
# digits, "_", "+" and "-" in "/"-separated parts. No ".", so never a relative path or a module name.
_ZONE_KEY: Final = re.compile(r"(?=.{1,255}\Z)[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*\Z")

_PLAIN_TYPES: Final = frozenset({str, int, float, bool, type(None), dict, list})
_HINT: Final = "register it with JsonCodec.register(), or use PickleCodec"
_ADOPT_HINT: Final = (
    "name it in the return annotation of the cached function (such as '-> Out' or '-> list[Out]'), "
    "which makes @cache.cached adopt it (JsonCodec.adopt())"
)
_MISSING: Final = object()


class _EncodeFailure(Exception):
    """Internal: raised inside the encoding walk; collects the path while unwinding."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []

    def to_error(self) -> SerializationError:
        where = "value" + "".join(reversed(self.path))
        return SerializationError(f"cannot encode {where}: {self.message}")


def _type_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


class _NotImported(Exception):
    """Internal: a class reference names a module that this process has not imported."""


def _find_class(module_name: str, qualname: str) -> object:
    """Return the object named ``qualname`` in the already imported module ``module_name``.

    Imports nothing and runs no code of the module or its classes: the module
    is taken from :data:`sys.modules` only, and each part of ``qualname`` is
    read with :func:`inspect.getattr_static`, which bypasses a module's
    ``__getattr__`` (often a lazy import), descriptors and metaclass hooks.
    Returns ``_MISSING`` when a part is absent; raises :class:`_NotImported`
    when the module is not imported.
    """
    found: object = sys.modules.get(module_name)
    if not isinstance(found, ModuleType):
        raise _NotImported(module_name)
    for part in qualname.split("."):
        found = getattr_static(found, part, _MISSING)
        if found is _MISSING:
            break
    return found


def _class_ref(cls: type, kind: str) -> str:
    """Return the "module:qualname" reference of ``cls``, checking that it resolves back to it."""
    qualname = cls.__qualname__
    ref = f"{cls.__module__}:{qualname}"
    if "<locals>" in qualname:
        raise _EncodeFailure(
            f"{kind} {_type_name(cls)} is a local class, which cannot be found by name when decoding; "
            f"define it at module level, {_ADOPT_HINT}, or register it with JsonCodec.register()"
        )
    if _find_class_or_none(cls.__module__, qualname) is not cls:
        raise _EncodeFailure(
            f"{kind} {_type_name(cls)} cannot be found again by its name {ref!r}; define it at module "
            f"level under that name, {_ADOPT_HINT}, or register it with JsonCodec.register()"
        )
    return ref


def _find_class_or_none(module_name: str, qualname: str) -> object:
    """:func:`_find_class`, with ``None`` for a module that is not imported."""
    try:
        return _find_class(module_name, qualname)
    except _NotImported:
        return None


def _class_kind(cls: type) -> str | None:
    """The kind of class :class:`JsonCodec` stores by reference, or ``None`` for any other class."""
    if issubclass(cls, enum.Enum):
        return "enum"
    if dataclasses.is_dataclass(cls):
        return "dataclass"
    if _is_pydantic_model_class(cls):
        return "pydantic model"
    return None


# Field fingerprints: a short hash of what an instance's stored fields must match to be valid
# (see JsonCodec), computed once per class.
_FINGERPRINT_SIZE: Final = 4  # bytes of blake2b: 8 hex characters in each payload
_ADDRESS: Final = re.compile(r" at 0x[0-9A-Fa-f]+")
_DATACLASS_FINGERPRINTS: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()
_MODEL_FINGERPRINTS: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def _describe_annotation(annotation: object) -> str:
    """A description of a declared type that is the same in every process running the same code.

    A string annotation (``from __future__ import annotations``, or a quoted
    forward reference) is taken as written, a class by its qualified name,
    anything else by its ``repr``, without the memory addresses that the
    default ``repr`` of an object inside ``Annotated[...]`` contains.
    """
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not isinstance(annotation, GenericAlias):
        return _type_name(annotation)  # "int", "datetime.datetime": as a string annotation names it
    try:
        text = repr(annotation)
    except Exception:
        text = _type_name(type(annotation))
    return _ADDRESS.sub("", text)


def _fingerprint(lines: list[str]) -> str:
    return hashlib.blake2b("\n".join(lines).encode(), digest_size=_FINGERPRINT_SIZE).hexdigest()


def _dataclass_fingerprint(cls: type) -> str:
    """Return the field fingerprint of a dataclass: its field names and declared types."""
    found = _DATACLASS_FINGERPRINTS.get(cls)
    if found is None:
        fields = sorted(f"{f.name}: {_describe_annotation(f.type)}" for f in dataclasses.fields(cls))
        found = _DATACLASS_FINGERPRINTS[cls] = _fingerprint(["dataclass", *fields])
    return found


def _model_fingerprint(cls: Any) -> str:
    """Return the field fingerprint of a pydantic model.

    It covers the names and annotations of ``model_fields``, the names of the
    private attributes and the ``extra`` setting: the parts of the pickle
    state an instance is restored from.
    """
    found: str | None = _MODEL_FINGERPRINTS.get(cls)
    if found is None:
        fields = sorted(
            f"{name}: {_describe_annotation(info.annotation)}" for name, info in cls.model_fields.items()
        )
        private = sorted(f"private {name}" for name in cls.__private_attributes__)
        extra = f"extra {cls.model_config.get('extra')!r}"
        found = _fingerprint(["pydantic", *fields, *private, extra])
        if getattr(cls, "__pydantic_complete__", True):  # else its annotations may still change
            _MODEL_FINGERPRINTS[cls] = found
    return found


def _unfingerprinted(x: list[Any], kind: str) -> SerializationError:
    """The error for a dataclass or model node stored without a field fingerprint (or malformed)."""
    ref = x[0] if x and type(x[0]) is str else None
    if ref is None or len(x) != (2 if kind == "dataclass" else 3):
        return SerializationError(f"cannot decode payload: malformed {kind} node")
    return SerializationError(
        f"cannot decode payload: {kind} {ref!r} was stored without a field fingerprint (by an earlier "
        "version of tagcache), so its fields cannot be checked against the class; it is treated as "
        "stored before a change of the class"
    )


def _fail_unsupported(value: object) -> _EncodeFailure:
    return _EncodeFailure(f"objects of type {_type_name(type(value))} are not supported; {_HINT}")


@dataclasses.dataclass(frozen=True)
class _Registration:
    cls: type
    name: str
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


class JsonCodec:
    """The default codec: orjson with exact type round trips.

    ``decode(encode(v))`` equals ``v`` and has the same type, recursively, for
    ``None``, ``bool``, ``int`` (any size), ``float`` (including NaN, the
    infinities and ``-0.0``), ``str``, ``bytes``, ``list``, ``tuple``,
    ``dict`` (any hashable keys of supported types), ``set``, ``frozenset``,
    ``datetime``/``time`` (naive, or with a ``datetime.timezone``, whose
    exact offset and name are kept, or a ``zoneinfo.ZoneInfo`` that has a
    key, restored by that key; ``fold`` is kept), ``date``,
    ``timedelta``, ``UUID``, ``Decimal`` (its exact form, including NaN and
    exponents), members of ``Enum`` subclasses (including ``IntEnum``,
    ``StrEnum`` and ``Flag`` combinations), dataclass instances and pydantic
    v2 models. Types are matched exactly: a subclass of ``str``, ``dict``,
    ``tuple`` and so on is not supported unless registered.

    Format: a value made only of ``dict`` (``str`` keys), ``list``, ``str``,
    ``bool``, ``None``, 64-bit ``int`` and finite ``float`` is stored as plain
    orjson bytes, with no marker (JSON text never starts with a control byte,
    so the markers below cannot be confused with it); decoding it is one
    ``orjson.loads`` of the stored bytes, without a copy. Anything else is stored after
    :attr:`TAGGED_MARKER` as JSON in which non-JSON values are objects with a
    single reserved key such as ``"$tuple"`` or ``"$dt"``; only these
    payloads are walked on decode. A ``dict`` whose only key is one of the
    reserved keys is escaped, so it round trips too (in the tagged format).

    Enum, dataclass and pydantic classes are recorded as ``"module:qualname"``
    and found again when decoding, only among the modules already imported
    in this process (:data:`sys.modules`); the class found must be of the
    expected kind. Decoding never imports a module, so a payload cannot make
    a process run a module's import-time code: the reading process must have
    imported the class's module itself, and a payload naming a module that
    is not imported raises :class:`~tagcache.exceptions.SerializationError`
    (which the cache counts as an error and treats as a miss). Classes
    defined inside a function cannot be found by name: they must be adopted
    (:meth:`adopt`, which ``@cache.cached`` does for the classes named in a
    function's return annotation) or registered with :meth:`register`, as
    must any other type. Dataclasses and models
    are restored field by field without calling ``__init__`` or validators,
    the way :mod:`pickle` restores them.

    Schema changes: each dataclass or model instance is stored with the
    *field fingerprint* of its class, 8 hex characters of a BLAKE2b hash of
    the field names and declared types (as written, or the class's name or
    the type's ``repr``; for a model, the annotations of ``model_fields``, the names of its private
    attributes and its ``extra`` setting). Field order, defaults, validators
    and methods are not part of it. Decoding compares the stored fingerprint
    with the class's current one and raises
    :class:`~tagcache.exceptions.SerializationError` when they differ, so a
    value stored before a field was added, removed, renamed or retyped never
    becomes an instance that lacks a field or holds one of the wrong type; a
    cache reading it counts an error and a miss, and computes and stores the
    value again. This includes adding a field *with* a default: the default
    is what new instances get, not necessarily what the stored value would
    have had (a new ``is_admin: bool = False`` would silently read ``False``
    for an admin), so after a deploy that changes a class each entry holding
    it is computed once more. Payloads stored without a fingerprint (by
    earlier versions) are treated the same way. Every instance carries its
    own fingerprint, so a dataclass nested in a list inside a model is
    checked too. Fingerprints are computed once per class; checking one
    costs a dictionary lookup per instance.

    Zones are stored by their key and restored with ``ZoneInfo(key)``; only
    keys shaped like IANA names (``"Europe/Paris"``, ``"Etc/GMT+5"``) are
    accepted, on both sides.

    Nesting is limited by orjson to about 250 levels (less for tagged
    values, whose markers add levels); strings must be valid Unicode (no lone
    surrogates).
    """

    #: First byte of a payload holding tagged (non-JSON) values.
    TAGGED_MARKER: ClassVar[bytes] = bytes([_TAGGED])

    def __init__(self) -> None:
        """Create a codec with the built-in types; add more with :meth:`register`."""
        self._by_name: dict[str, _Registration] = {}
        # exact type -> function returning the tagged node (built-ins, registered, discovered)
        self._encoders: dict[type, Callable[[Any], Any]] = {
            tuple: self._enc_tuple,
            set: self._enc_set,
            frozenset: self._enc_frozenset,
            bytes: self._enc_bytes,
            datetime: self._enc_datetime,
            date: self._enc_date,
            time: self._enc_time,
            timedelta: self._enc_timedelta,
            UUID: self._enc_uuid,
            Decimal: self._enc_decimal,
        }
        self._decoders: dict[str, Callable[[Any], Any]] = {
            _K_TUPLE: self._dec_tuple,
            _K_SET: self._dec_set,
            _K_FROZENSET: self._dec_frozenset,
            _K_BYTES: _dec_bytes,
            _K_INT: _dec_int,
            _K_FLOAT: _dec_float,
            _K_DICT: self._dec_dict,
            _K_DATETIME: _dec_datetime,
            _K_DATE: date.fromisoformat,
            _K_TIME: _dec_time,
            _K_TIMEDELTA: _dec_timedelta,
            _K_UUID: _dec_uuid,
            _K_DECIMAL: _dec_decimal,
            _K_ENUM: self._dec_enum,
            _K_DATACLASS: self._dec_dataclass,
            _K_PYDANTIC: self._dec_pydantic,
            _K_REGISTERED: self._dec_registered,
        }
        self._classes: dict[tuple[str, str], type] = {}
        # (class reference, field fingerprint) -> the class (and a dataclass's fields), for
        # fingerprints that matched the class found; a changed class never gets an entry
        self._dataclasses: dict[tuple[str, str], tuple[Any, tuple[dataclasses.Field[Any], ...]]] = {}
        self._models: dict[tuple[str, str], Any] = {}
        # class reference -> the class adopted under it (adopt()): consulted only when a class is
        # first seen (_discover) and when adopting; decoding finds it through _classes
        self._adopted: dict[str, type] = {}
        # classes adopted earlier and then replaced by another class of the same reference
        self._replaced: weakref.WeakSet[type] = weakref.WeakSet()

    # ---------------------------------------------------------------------------------------------
    # public API

    def adopt(self, cls: type) -> bool:
        """Store and find ``cls`` by the class object itself instead of looking its name up.

        A dataclass, pydantic model or enum is stored with its reference
        ``"module:qualname"`` and found again by that name when decoding, so a
        class defined inside a function (its qualname contains ``<locals>``)
        or a module-level class that was shadowed or renamed cannot be stored.
        Adopting it makes this codec remember it under its reference, for
        encoding and decoding: the payload format and the field fingerprint
        check are unchanged, so a value stored for a different set of fields
        still fails to decode (a cache reads it as a miss). ``@cache.cached``
        adopts the classes named in a cached function's return annotation
        (see :func:`tagcache.hints.prepare_codec`).

        Adopting a class under a reference already adopted for another class
        (the function defining a local class ran again and defined it anew)
        replaces that class: payloads naming the reference decode into the new
        class, and instances of the replaced class can no longer be encoded.
        A module-level class found by the same name is not encoded either
        while the reference is adopted for another class. Meant to be called
        at decoration time, for a bounded number of classes; the codec keeps
        a reference to the class adopted under each name, and none to the
        classes it replaced.

        Returns:
            ``True`` if ``cls`` is adopted, ``False`` if it needs no adoption
            (it is found by its name and no other class is adopted under that
            name, or it is registered with :meth:`register`, which takes
            precedence).

        Raises:
            ConfigurationError: ``cls`` is not a dataclass, pydantic model or
                enum class.
        """
        kind = _class_kind(cls) if isinstance(cls, type) else None
        if kind is None:
            raise ConfigurationError(
                f"adopt() needs a dataclass, pydantic model or enum class, not {cls!r:.100}"
            )
        registered = {reg.cls for reg in self._by_name.values()}
        if cls in registered:
            return False
        ref = f"{cls.__module__}:{cls.__qualname__}"
        previous = self._adopted.get(ref)
        if previous is cls:
            return True
        if previous is None and _find_class_or_none(cls.__module__, cls.__qualname__) is cls:
            return False
        # Forget every other class known under this reference: its encoder (so its next instance
        # goes through _discover, which refuses it) and what decoding found for the reference.
        for other in [t for t in self._encoders if t is not cls and t not in registered]:
            if f"{other.__module__}:{other.__qualname__}" == ref:
                del self._encoders[other]
        if previous is not None:
            self._replaced.add(previous)
        self._replaced.discard(cls)
        for cache in (self._classes, self._dataclasses, self._models):
            for key in [key for key in cache if key[0] == ref]:
                del cache[key]
        self._adopted[ref] = cls
        self._classes[(ref, kind)] = cls
        return True

    def register(
        self,
        cls: type[T],
        name: str,
        encode: Callable[[T], Any],
        decode: Callable[[Any], T],
    ) -> None:
        """Teach this codec a further type.

        Args:
            cls: the exact type to handle (subclasses are not matched). A
                registered type takes precedence over the built-in handling,
                so this also serves local classes and enums, dataclasses or
                models that must not be looked up by name.
            name: a stable name stored in the payload instead of the class
                path; decoding looks the name up in this codec, so the
                reading side must register the same name.
            encode: turns an instance into a value this codec can encode
                itself (plain JSON types, or any other supported or
                registered type).
            decode: turns that value, decoded, back into an instance.

        Raises:
            ConfigurationError: ``cls`` is a plain JSON type, ``name`` is
                empty, or ``cls`` or ``name`` is already registered with the
                other half of the pair.
        """
        if not isinstance(cls, type):
            raise ConfigurationError(f"register() needs a class, not {type(cls).__name__}")
        if cls in _PLAIN_TYPES:
            raise ConfigurationError(f"{cls.__name__} is a plain JSON type and cannot be registered")
        if not isinstance(name, str) or not name:
            raise ConfigurationError("register() needs a non-empty str name")
        if not callable(encode) or not callable(decode):
            raise ConfigurationError("register() needs callable encode and decode functions")
        existing = self._by_name.get(name)
        if existing is not None and existing.cls is not cls:
            raise ConfigurationError(
                f"name {name!r} is already registered for {_type_name(existing.cls)}; pick another name"
            )
        for other in self._by_name.values():
            if other.cls is cls and other.name != name:
                raise ConfigurationError(
                    f"{_type_name(cls)} is already registered under the name {other.name!r}"
                )
        reg = _Registration(cls, name, encode, decode)
        self._by_name[name] = reg

        def encode_registered(value: Any) -> Any:
            try:
                raw = reg.encode(value)
            except _EncodeFailure:
                raise
            except Exception as exc:
                raise _EncodeFailure(
                    f"the encode function registered for {_type_name(cls)} failed: {exc!r}"
                ) from exc
            return {_K_REGISTERED: [name, self._walk(raw)]}

        self._encoders[cls] = encode_registered

    def encode(self, value: object) -> bytes:
        """Return plain orjson bytes, or :attr:`TAGGED_MARKER` + tagged JSON.

        Raises:
            SerializationError: something inside ``value`` is not supported
                (the message names its type and where it is, such as
                ``value['a'][3]``), or ``value`` is nested too deeply or
                contains a reference cycle.
        """
        try:
            tree = self._walk(value)
            if tree is value:
                return orjson.dumps(value)
            return b"\x02" + orjson.dumps(tree)
        except _EncodeFailure as failure:
            raise failure.to_error() from failure.__cause__
        except RecursionError:
            raise SerializationError(
                "cannot encode value: it is nested too deeply or contains a reference cycle"
            ) from None
        except orjson.JSONEncodeError as exc:
            raise SerializationError(f"cannot encode value: {exc}") from exc

    def decode(self, data: bytes) -> Any:
        """Return the value encoded in ``data``.

        Raises:
            SerializationError: ``data`` is empty, truncated, corrupt, not
                written by a :class:`JsonCodec`, or names a type that cannot
                be found or is not registered here.
        """
        try:
            if data[0] > _PLAIN_MAX:
                return orjson.loads(data)
            if data[0] == _TAGGED:
                return self._unwalk(orjson.loads(data[1:]))
        except SerializationError:
            raise
        except RecursionError:
            raise SerializationError("cannot decode payload: it is nested too deeply") from None
        except Exception as exc:
            if not data or not isinstance(data, (bytes, bytearray, memoryview)):
                raise SerializationError(_foreign_marker_message(data, "JsonCodec")) from exc
            raise SerializationError(f"cannot decode payload: {type(exc).__name__}: {exc}") from exc
        raise SerializationError(_foreign_marker_message(data, "JsonCodec"))

    # ---------------------------------------------------------------------------------------------
    # encoding: one walk that returns the value itself when it is plain JSON, otherwise a new tree

    def _walk(self, v: Any) -> Any:
        t = type(v)
        if t is str or t is bool or v is None:
            return v
        if t is int:
            if _INT_MIN <= v <= _INT_MAX:
                return v
            return {_K_INT: format(v, "x")}
        if t is float:
            if v - v == 0.0:  # finite
                return v
            return {_K_FLOAT: repr(v)}
        if t is dict:
            return self._walk_dict(v)
        if t is list:
            out: list[Any] | None = None
            i = 0
            try:
                for x in v:
                    y = self._walk(x)
                    if y is not x:
                        if out is None:
                            out = v.copy()
                        out[i] = y
                    i += 1
            except _EncodeFailure as failure:
                failure.path.append(f"[{i}]")
                raise
            return v if out is None else out
        enc = self._encoders.get(t)
        if enc is None:
            enc = self._discover(t, v)
        return enc(v)

    def _walk_dict(self, v: dict[Any, Any]) -> Any:
        out: dict[str, Any] | None = None
        k: Any = None
        try:
            for k, x in v.items():
                if type(k) is not str:
                    break
                y = self._walk(x)
                if y is not x:
                    if out is None:
                        out = v.copy()
                    out[k] = y
            else:
                if len(v) == 1 and k in _RESERVED:  # would read as a tagged node: escape it
                    return {_K_DICT: [[k, v[k] if out is None else out[k]]]}
                return v if out is None else out
        except _EncodeFailure as failure:
            failure.path.append(f"[{k!r}]")
            raise
        return self._walk_pairs(v)

    def _walk_pairs(self, v: dict[Any, Any]) -> Any:
        pairs = []
        for k, x in v.items():
            try:
                ek = self._walk(k)
            except _EncodeFailure as failure:
                failure.path.append(f"<key {k!r}>")
                raise
            try:
                pairs.append([ek, self._walk(x)])
            except _EncodeFailure as failure:
                failure.path.append(f"[{k!r}]")
                raise
        return {_K_DICT: pairs}

    def _walk_items(self, v: Iterable[Any], indexed: bool) -> list[Any]:
        out = []
        try:
            for x in v:
                out.append(self._walk(x))
        except _EncodeFailure as failure:
            failure.path.append(f"[{len(out)}]" if indexed else "<element>")
            raise
        return out

    def _enc_tuple(self, v: tuple[Any, ...]) -> Any:
        return {_K_TUPLE: self._walk_items(v, True)}

    def _enc_set(self, v: set[Any]) -> Any:
        return {_K_SET: self._walk_items(v, False)}

    def _enc_frozenset(self, v: frozenset[Any]) -> Any:
        return {_K_FROZENSET: self._walk_items(v, False)}

    @staticmethod
    def _enc_bytes(v: bytes) -> Any:
        return {_K_BYTES: binascii.b2a_base64(v, newline=False).decode("ascii")}

    @staticmethod
    def _enc_datetime(v: datetime) -> Any:
        tz = v.tzinfo
        if tz is None and not v.fold:
            return {_K_DATETIME: v.isoformat()}
        return {_K_DATETIME: [v.replace(tzinfo=None).isoformat(), _tz_spec(tz), v.fold]}

    @staticmethod
    def _enc_date(v: date) -> Any:
        return {_K_DATE: v.isoformat()}

    @staticmethod
    def _enc_time(v: time) -> Any:
        tz = v.tzinfo
        if tz is None and not v.fold:
            return {_K_TIME: v.isoformat()}
        return {_K_TIME: [v.replace(tzinfo=None).isoformat(), _tz_spec(tz), v.fold]}

    @staticmethod
    def _enc_timedelta(v: timedelta) -> Any:
        return {_K_TIMEDELTA: [v.days, v.seconds, v.microseconds]}

    @staticmethod
    def _enc_uuid(v: UUID) -> Any:
        return {_K_UUID: v.hex}

    @staticmethod
    def _enc_decimal(v: Decimal) -> Any:
        return {_K_DECIMAL: str(v)}

    def _discover(self, t: type, v: object) -> Callable[[Any], Any]:
        """Find (and remember) how to encode instances of a type not seen before."""
        ref = self._adopted_ref(t) if self._adopted else None
        if isinstance(v, enum.Enum):
            enc = self._enum_encoder(t, isinstance(v, enum.Flag), ref)
        elif dataclasses.is_dataclass(t):
            enc = self._dataclass_encoder(t, ref)
        elif _is_pydantic_model_class(t):
            enc = self._pydantic_encoder(t, ref)
        else:
            raise _fail_unsupported(v)
        self._encoders[t] = enc
        return enc

    def _adopted_ref(self, t: type) -> str | None:
        """The reference ``t`` is adopted under, ``None`` if it is not adopted; raises for a class
        whose reference is adopted for another class."""
        ref = f"{t.__module__}:{t.__qualname__}"
        adopted = self._adopted.get(ref)
        if adopted is t:
            return ref
        if adopted is None:
            return None
        kind = _class_kind(t) or "class"
        if t in self._replaced:
            raise _EncodeFailure(
                f"{kind} {_type_name(t)} was adopted for a return annotation, then replaced by another "
                f"class of the same name {ref!r} (the code defining it ran again); only the newest "
                "class of that name can be stored"
            )
        raise _EncodeFailure(
            f"{kind} {_type_name(t)} cannot be stored under its name {ref!r}: this JsonCodec adopted "
            "another class of that name (named in the return annotation of a cached function); "
            "give one of the two classes another name"
        )

    @staticmethod
    def _enum_encoder(t: type, is_flag: bool, ref: str | None = None) -> Callable[[Any], Any]:
        if ref is None:
            ref = _class_ref(t, "enum")
        if is_flag:  # combinations of flags have no single name: store the value
            return lambda member: {_K_ENUM: [ref, member._value_]}
        return lambda member: {_K_ENUM: [ref, member._name_]}

    def _dataclass_encoder(self, t: type, ref: str | None = None) -> Callable[[Any], Any]:
        if ref is None:
            ref = _class_ref(t, "dataclass")
        fingerprint = _dataclass_fingerprint(t)
        names = tuple(f.name for f in dataclasses.fields(t))
        walk = self._walk

        def encode_dataclass(obj: Any) -> Any:
            fields = {}
            name = ""
            try:
                for name in names:
                    x = getattr(obj, name, _MISSING)
                    if x is not _MISSING:  # an init=False field may never have been set
                        fields[name] = walk(x)
            except _EncodeFailure as failure:
                failure.path.append(f".{name}")
                raise
            return {_K_DATACLASS: [ref, fingerprint, fields]}

        return encode_dataclass

    def _pydantic_encoder(self, t: type, ref: str | None = None) -> Callable[[Any], Any]:
        if ref is None:
            ref = _class_ref(t, "pydantic model")
        fingerprint = _model_fingerprint(t)
        walk = self._walk

        def encode_model(obj: Any) -> Any:
            # the pickle state: __dict__ (the fields), extra, fields set and private attributes
            state = obj.__getstate__()
            fields = {}
            name = ""
            try:
                for name, x in state["__dict__"].items():
                    fields[name] = walk(x)
            except _EncodeFailure as failure:
                failure.path.append(f".{name}")
                raise
            rest = {k: x for k, x in state.items() if k != "__dict__"}
            return {_K_PYDANTIC: [ref, fingerprint, fields, walk(rest)]}

        return encode_model

    # ---------------------------------------------------------------------------------------------
    # decoding tagged payloads

    def _unwalk(self, o: Any) -> Any:
        t = type(o)
        if t is dict:
            if len(o) == 1:
                for k, x in o.items():
                    dec = self._decoders.get(k)
                    if dec is not None:
                        return dec(x)
            unwalk = self._unwalk
            return {k: unwalk(x) for k, x in o.items()}
        if t is list:
            unwalk = self._unwalk
            return [unwalk(x) for x in o]
        return o

    def _dec_tuple(self, x: list[Any]) -> Any:
        _expect(x, list)
        unwalk = self._unwalk
        return tuple([unwalk(y) for y in x])

    def _dec_set(self, x: list[Any]) -> Any:
        _expect(x, list)
        unwalk = self._unwalk
        return {unwalk(y) for y in x}

    def _dec_frozenset(self, x: list[Any]) -> Any:
        _expect(x, list)
        unwalk = self._unwalk
        return frozenset([unwalk(y) for y in x])

    def _dec_dict(self, x: list[Any]) -> Any:
        _expect(x, list)
        unwalk = self._unwalk
        return {unwalk(k): unwalk(y) for k, y in x}

    def _resolve(self, ref: str, kind: str, check: Callable[[Any], bool]) -> Any:
        cached = self._classes.get((ref, kind))
        if cached is not None:
            return cached
        _expect(ref, str)
        module_name, sep, qualname = ref.partition(":")
        if not sep or not module_name or not qualname or "<locals>" in qualname:
            raise SerializationError(f"cannot decode payload: malformed {kind} class reference {ref!r}")
        try:
            found = _find_class(module_name, qualname)
        except _NotImported:
            raise SerializationError(
                f"cannot decode payload: {kind} class {ref!r} is in module {module_name!r}, which is "
                "not imported in this process; decoding never imports modules, so import it at start-up "
                "in every process that reads this value, or register the class with JsonCodec.register()"
            ) from None
        if found is _MISSING:
            raise SerializationError(
                f"cannot decode payload: {kind} class {ref!r} cannot be found: module {module_name!r} "
                f"has no attribute {qualname!r}"
            )
        if not isinstance(found, type) or not check(found):
            raise SerializationError(f"cannot decode payload: {ref!r} is not a {kind} class")
        self._classes[(ref, kind)] = found
        return found

    def _dec_enum(self, x: list[Any]) -> Any:
        _expect(x, list)
        ref, raw = x
        cls = self._resolve(ref, "enum", lambda c: issubclass(c, enum.Enum))
        if type(raw) is str:
            return cls[raw]
        return cls(raw)

    def _check_fingerprint(self, ref: str, fingerprint: Any, kind: str, current: str) -> None:
        if fingerprint != current:
            _expect(fingerprint, str)
            raise SerializationError(
                f"cannot decode payload: {kind} {ref!r} has changed since this value was stored: "
                f"its field fingerprint was {fingerprint!r} and is now {current!r} (fields added, "
                "removed, renamed or retyped)"
            )

    def _resolve_dataclass(
        self, ref: str, fingerprint: Any
    ) -> tuple[Any, tuple[dataclasses.Field[Any], ...]]:
        cls = self._resolve(ref, "dataclass", dataclasses.is_dataclass)
        self._check_fingerprint(ref, fingerprint, "dataclass", _dataclass_fingerprint(cls))
        found = self._dataclasses[(ref, fingerprint)] = (cls, dataclasses.fields(cls))
        return found

    def _dec_dataclass(self, x: list[Any]) -> Any:
        _expect(x, list)
        try:
            ref, fingerprint, fields = x
        except ValueError:
            raise _unfingerprinted(x, "dataclass") from None
        _expect(fields, dict)
        found = self._dataclasses.get((ref, fingerprint))
        if found is None:
            found = self._resolve_dataclass(ref, fingerprint)
        cls, cls_fields = found
        obj = cls.__new__(cls)
        unwalk = self._unwalk
        for f in cls_fields:
            raw = fields.get(f.name, _MISSING)
            if raw is not _MISSING:
                value = unwalk(raw)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            elif not f.init:
                continue  # was never set on the encoded instance either
            else:
                raise SerializationError(
                    f"cannot decode payload: dataclass {ref!r} field {f.name!r} is missing"
                )
            object.__setattr__(obj, f.name, value)
        return obj

    def _resolve_model(self, ref: str, fingerprint: Any) -> Any:
        cls = self._resolve(ref, "pydantic model", _is_pydantic_model_class)
        self._check_fingerprint(ref, fingerprint, "pydantic model", _model_fingerprint(cls))
        self._models[(ref, fingerprint)] = cls
        return cls

    def _dec_pydantic(self, x: list[Any]) -> Any:
        _expect(x, list)
        try:
            ref, fingerprint, fields, rest = x
        except ValueError:
            raise _unfingerprinted(x, "pydantic model") from None
        _expect(fields, dict)
        cls = self._models.get((ref, fingerprint))
        if cls is None:
            cls = self._resolve_model(ref, fingerprint)
        state = self._unwalk(rest)
        _expect(state, dict)
        unwalk = self._unwalk
        state["__dict__"] = {name: unwalk(y) for name, y in fields.items()}
        obj = cls.__new__(cls)
        obj.__setstate__(state)
        return obj

    def _dec_registered(self, x: list[Any]) -> Any:
        _expect(x, list)
        name, raw = x
        reg = self._by_name.get(name) if type(name) is str else None
        if reg is None:
            raise SerializationError(
                f"cannot decode payload: no type is registered under the name {name!r} in this JsonCodec"
            )
        return reg.decode(self._unwalk(raw))


def _tz_spec(tz: object) -> Any:
    """Describe a tzinfo as JSON: None, a zone key, offset microseconds, or [offset, name]."""
    if tz is None:
        return None
    if type(tz) is timezone:
        offset = tz.utcoffset(None)
        micros = (offset.days * 86_400 + offset.seconds) * 1_000_000 + offset.microseconds
        name = tz.tzname(None)
        if name != timezone(offset).tzname(None):
            return [micros, name]
        return micros
    if type(tz) is ZoneInfo and tz.key is not None:
        if not _ZONE_KEY.match(tz.key):
            raise _EncodeFailure(
                f"zoneinfo.ZoneInfo key {tz.key!r:.80} is not a time zone name (such as 'Europe/Paris') "
                "that decoding would accept; use a zone of the IANA database, or datetime.timezone"
            )
        return tz.key
    raise _EncodeFailure(
        f"tzinfo of type {_type_name(type(tz))} is not supported; use datetime.timezone or a "
        "zoneinfo.ZoneInfo created from a key"
    )


def _tz_from_spec(spec: Any) -> Any:
    if spec is None:
        return None
    if type(spec) is str:
        # Only a well-formed zone name reaches ZoneInfo: never a path, and never a dotted name,
        # which ZoneInfo would turn into a module name when it falls back to the tzdata package.
        if not _ZONE_KEY.match(spec):
            raise SerializationError(f"cannot decode payload: {spec!r:.80} is not a valid time zone key")
        try:
            return ZoneInfo(spec)
        except Exception as exc:
            raise SerializationError(
                f"cannot decode payload: time zone {spec!r} is not available in this process: {exc}"
            ) from exc
    if type(spec) is int:
        return timezone(timedelta(microseconds=spec))
    _expect(spec, list)
    micros, name = spec
    _expect(name, str)
    return timezone(timedelta(microseconds=micros), name)


def _expect(x: object, t: type) -> None:
    if type(x) is not t:
        raise SerializationError(
            f"cannot decode payload: expected {t.__name__}, found {type(x).__name__} in a tagged value"
        )


def _dec_bytes(x: str) -> bytes:
    _expect(x, str)
    return base64.b64decode(x, validate=True)


def _dec_int(x: str) -> int:
    _expect(x, str)
    return int(x, 16)


def _dec_float(x: str) -> float:
    if x not in ("nan", "inf", "-inf"):
        raise SerializationError(f"cannot decode payload: bad special float {x!r}")
    return float(x)


def _dec_datetime(x: Any) -> datetime:
    if type(x) is str:
        return datetime.fromisoformat(x)
    _expect(x, list)
    iso, spec, fold = x
    return datetime.fromisoformat(iso).replace(tzinfo=_tz_from_spec(spec), fold=fold)


def _dec_time(x: Any) -> time:
    if type(x) is str:
        return time.fromisoformat(x)
    _expect(x, list)
    iso, spec, fold = x
    return time.fromisoformat(iso).replace(tzinfo=_tz_from_spec(spec), fold=fold)


def _dec_timedelta(x: list[int]) -> timedelta:
    _expect(x, list)
    days, seconds, microseconds = x
    return timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _dec_uuid(x: str) -> UUID:
    _expect(x, str)
    return UUID(hex=x)


def _dec_decimal(x: str) -> Decimal:
    _expect(x, str)
    return Decimal(x)


def _is_pydantic_model_class(cls: type) -> bool:
    """Whether ``cls`` is a pydantic v2 model, without importing pydantic when nothing has yet."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None:
        return False
    base = getattr(pydantic, "BaseModel", None)
    return isinstance(base, type) and issubclass(cls, base)


def _foreign_marker_message(data: object, codec: str) -> str:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return f"cannot decode payload: expected bytes, got {type(data).__name__}"
    if not data:
        return "cannot decode payload: it is empty"
    return f"cannot decode payload: format marker {bytes(data[:1])!r} was not written by {codec}"


# --------------------------------------------------------------------------------------------------
# PickleCodec
# --------------------------------------------------------------------------------------------------

_TAG_SIZE: Final = hashlib.sha256().digest_size
# v2: signatures cover the storage context as well as the pickle.
_KEY_CONTEXT: Final = b"tagcache.codec.PickleCodec/v2"


def _signing_key(key: object, what: str) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise ConfigurationError(f"PickleCodec {what} must be bytes or str, not {type(key).__name__}")
    if not key:
        raise ConfigurationError(
            f"PickleCodec needs a non-empty {what}: unpickling runs arbitrary code, so every payload is "
            "signed and only payloads with a valid signature are unpickled; without a secret key anyone "
            "able to write to the cache could run code in this process"
        )
    # Derive a key used only for this purpose, so signatures cannot be confused with other uses
    # of the same secret.
    return hmac.digest(bytes(key), _KEY_CONTEXT, "sha256")


def _signature(key: bytes, context: bytes, body: bytes | memoryview) -> bytes:
    """HMAC-SHA256 over the length-prefixed ``context`` followed by ``body``.

    The 8-byte length prefix makes the signed message unambiguous: no other
    split of the same bytes into a context and a body has the same signature.
    """
    mac = hmac.new(key, len(context).to_bytes(8, "big"), "sha256")
    mac.update(context)
    mac.update(body)
    return mac.digest()


class PickleCodec:
    """Opt-in codec for any picklable value, with signed payloads.

    Unpickling untrusted bytes runs arbitrary code, so every payload is
    ``MARKER + signature + pickle``, where the signature is HMAC-SHA256 over
    the length-prefixed storage context followed by the pickle.
    :meth:`decode_for` verifies the signature with
    :func:`hmac.compare_digest` before unpickling, and an unsigned, tampered
    or wrongly keyed payload raises
    :class:`~tagcache.exceptions.SerializationError` without being unpickled.
    Every process sharing the cache needs the same secret key.

    Binding to the key: this codec is a :class:`KeyBoundCodec`, so the cache
    passes the namespace and key an entry is stored under as the context. A
    payload copied to another key or namespace (``user:root`` to
    ``user:alice``) fails verification like a tampered one and is not
    unpickled. :meth:`encode` and :meth:`decode` use the empty context.

    Key rotation: payloads are always signed with ``secret_key``, and verified
    against ``secret_key`` then each of ``fallback_keys``. To rotate, deploy
    the new key as ``secret_key`` with the old one in ``fallback_keys``; once
    entries signed with the old key have expired, drop it.

    Args:
        secret_key: the signing key (``str`` keys are UTF-8 encoded); must
            not be empty. Use a long random value kept out of the cache.
        fallback_keys: further keys accepted when verifying, never used to sign.
        protocol: the pickle protocol to write.

    Raises:
        ConfigurationError: a key is empty or not ``bytes``/``str``, or the
            protocol is not one this Python supports.
    """

    #: First byte of every payload this codec writes.
    MARKER: ClassVar[bytes] = bytes([_PICKLE])

    def __init__(
        self,
        secret_key: bytes | str,
        *,
        fallback_keys: Iterable[bytes | str] = (),
        protocol: int = pickle.HIGHEST_PROTOCOL,
    ) -> None:
        """See the class documentation."""
        self._key = _signing_key(secret_key, "secret_key")
        if isinstance(fallback_keys, (bytes, str)):
            raise ConfigurationError("fallback_keys must be a list of keys, not a single key")
        self._keys = (self._key, *(_signing_key(k, "fallback key") for k in fallback_keys))
        if type(protocol) is not int or not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ConfigurationError(
                f"pickle protocol must be an int from 0 to {pickle.HIGHEST_PROTOCOL}, not {protocol!r}"
            )
        self._protocol = protocol

    def encode_for(self, value: object, context: bytes) -> bytes:
        """Return ``MARKER + signature + pickle`` for ``value``, signed for ``context``.

        Raises:
            SerializationError: ``value`` cannot be pickled.
        """
        try:
            body = pickle.dumps(value, protocol=self._protocol)
        except Exception as exc:
            raise SerializationError(f"cannot pickle value of type {_type_name(type(value))}: {exc}") from exc
        return b"\x03" + _signature(self._key, context, body) + body

    def decode_for(self, data: bytes, context: bytes) -> Any:
        """Verify that ``data`` was signed for ``context``, then unpickle it.

        Raises:
            SerializationError: the payload is not from a :class:`PickleCodec`,
                is unsigned, tampered with, signed with an unknown key or for
                another context (it is then not unpickled), or unpickling fails.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or not data or data[0] != _PICKLE:
            raise SerializationError(_foreign_marker_message(data, "PickleCodec"))
        if len(data) < 1 + _TAG_SIZE:
            raise SerializationError("cannot decode payload: it is truncated (no signature)")
        view = memoryview(data)
        tag = view[1 : 1 + _TAG_SIZE]
        body = view[1 + _TAG_SIZE :]
        for key in self._keys:
            if hmac.compare_digest(_signature(key, context, body), tag):
                break
        else:
            raise SerializationError(
                "cannot decode payload: its signature does not match (tampered with, unsigned, signed "
                "with a key that is neither secret_key nor in fallback_keys, or written under another "
                "key or namespace); it was not unpickled"
            )
        try:
            return pickle.loads(body)
        except Exception as exc:
            raise SerializationError(f"cannot unpickle payload: {type(exc).__name__}: {exc}") from exc

    def encode(self, value: object) -> bytes:
        """Return :meth:`encode_for` ``(value, b"")``: a payload bound to the empty context.

        Raises:
            SerializationError: ``value`` cannot be pickled.
        """
        return self.encode_for(value, b"")

    def decode(self, data: bytes) -> Any:
        """Return :meth:`decode_for` ``(data, b"")``: accepts only payloads bound to the empty context.

        Raises:
            SerializationError: as :meth:`decode_for`.
        """
        return self.decode_for(data, b"")
