"""Cache keys and tags built from a function's call arguments.

:class:`KeyBuilder` turns one call of a function into a cache key, and
:class:`TagTemplates` turns it into the tags of the entry. Both are made once,
when the function is decorated, and validate their configuration then: a
template or ``ignore=`` entry naming a parameter the function does not have is
a :class:`~tagcache.exceptions.ConfigurationError` (a ``ValueError``) at
decoration time, not at the first call.

Default keys
    ``"<module>.<qualname>:<digest>"``, where the digest is 32 hex digits of a
    BLAKE2b hash of a canonical encoding of the bound arguments (defaults
    applied, so ``f(1)``, ``f(x=1)`` and ``f()`` with ``x=1`` as the default are
    one key). The encoding includes parameter names and never uses ``repr()``
    of objects, ``id()`` or Python's salted ``hash()``: keys are equal across
    processes, restarts and Python versions. Supported argument types:

    * ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``; ``1``,
      ``1.0``, ``True`` and ``"1"`` are four different keys;
    * ``tuple`` and ``list`` (different keys for the same items), ``dict``
      (order of insertion does not matter), ``set`` and ``frozenset``
      (different keys for the same elements; iteration order does not matter);
    * ``datetime``, ``date``, ``time`` (by ISO text: an aware and a naive value
      differ, as do two offsets of one instant), ``timedelta``, ``UUID``,
      ``Decimal`` (by its text, so ``Decimal("1.0")`` and ``Decimal("1.00")``
      differ);
    * enum members (class path and value), dataclass instances (class path and
      the fields that take part in ``==``), pydantic v2 models (class path and
      ``model_dump(mode="json")``);
    * subclasses of the built-in types above (a ``NamedTuple`` is keyed as the
      plain ``tuple`` of its items).

    Any other type raises :class:`UnsupportedArgumentError` (a ``TypeError``)
    when the function is called, naming the parameter and the type: pass
    ``key=`` to build the key from chosen fields, or ``ignore=`` to leave the
    parameter out of the key. A parameter whose default is an object of an
    unsupported type (a sentinel such as ``_MISSING = object()``) is keyed as
    "the default" when it receives that very object.

    A parameter in the default key *annotated* with a type whose values can
    never be keyed (a database session, a request: any class that is none of
    the above) raises the same error when the :class:`KeyBuilder` is made,
    that is at decoration time. :func:`is_keyable_type` decides, from the
    same rules as the call-time encoding: ``Any``, ``object``, abstract
    classes and protocols, unions with a keyable member and unannotated
    parameters are not rejected; an annotation that cannot be resolved (a
    name imported only under ``TYPE_CHECKING``) is left to the call-time
    check. The annotation is taken as the promise: a concrete class whose
    own instances cannot be keyed is rejected even if a subclass could be.

Methods
    ``KeyBuilder(func, kind=...)`` says how the function is bound:

    * ``"function"`` (what ``@cache.cached`` passes for a plain function or a
      method): a method (defined in a class, first parameter ``self``) must
      say what identifies the instance: ``ignore=("self",)`` to share the
      entries of all instances on purpose, or a key template naming ``self``
      (``key="user:{self.id}:{page}"``); otherwise :class:`ConfigurationError`.
      A method whose first parameter is ``cls`` is keyed like a classmethod.
    * ``"class"`` (a classmethod's function): the first parameter is keyed by
      the qualified name of the class the method is called on, so two classes
      sharing an inherited classmethod have different keys.
    * ``"static"``: no parameter is special.
    * ``"auto"`` (the default, for direct use): the first parameter of a
      method, when named ``self`` or ``cls``, is left out of the default key.

Key templates
    ``key="feed:{user.id}:{page}"`` is formatted with :meth:`str.format`
    semantics from the bound arguments (attribute access ``{user.id}``, item
    access ``{items[0]}``, format specs ``{page:03d}``), and the result is the
    key exactly as written, without a prefix: that is the text operators see.
    Each field must name a parameter. The result is checked like any key given
    to the cache (length, control characters).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import inspect
import operator
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from string import Formatter
from typing import Any, Final, Literal
from uuid import UUID

from tagcache.exceptions import ConfigurationError, UnsupportedArgumentError
from tagcache.tags import check_key, check_tags

__all__ = ["KeyBuilder", "TagTemplates", "UnsupportedArgumentError", "is_keyable_type"]


# --------------------------------------------------------------------------------------------------
# Canonical encoding
# --------------------------------------------------------------------------------------------------
#
# Every value encodes to a self-delimiting text, so a concatenation of encodings
# can be split back in one way only:
#
#   None "N"   True "T"   False "F"   int "i<hex>;"   float "f<repr>;"
#   str "s<length>:<text>"   bytes "b<hex>;"
#   tuple "t<n>:<items>"   list "l<n>:<items>"   dict "d<n>:<key><value>..." (sorted by encoded key)
#   set "S<n>:<items>"   frozenset "Z<n>:<items>" (sorted by encoded item)
#   datetime "@dt<iso>;"   date "@d<iso>;"   time "@t<iso>;"   timedelta "@td<days>,<s>,<us>;"
#   UUID "@u<hex>;"   Decimal "@n<text>;"
#   enum member "E<class path as str><value>"
#   dataclass "C<class path as str><n>:<field name as str><value>..."
#   pydantic model "P<class path as str><model_dump(mode='json')>"
#   parameter default of an unsupported type "~"
#   the class a classmethod is called on "K<class path as str>"
#
# Changing any of this changes every default key (golden keys in the tests catch it).


class _Unsupported(Exception):
    """Raised inside the encoder; turned into UnsupportedArgumentError naming the parameter."""

    def __init__(self, value: object) -> None:
        super().__init__()
        self.type_name = _type_name(type(value))
        self.path: list[str] = []


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _enc_none(v: None) -> str:
    return "N"


def _enc_bool(v: bool) -> str:
    return "T" if v else "F"


def _enc_int(v: int) -> str:
    # Hex: no limit on the number of digits (decimal str() of huge ints raises).
    return "i%x;" % v  # noqa: UP031 - faster than an f-string with a format spec


def _enc_float(v: float) -> str:
    # repr() of a float is the shortest text that round-trips: exact and stable.
    return f"f{float.__repr__(v)};"


def _enc_str(v: str) -> str:
    return f"s{len(v)}:{v}"


def _enc_bytes(v: bytes) -> str:
    return f"b{v.hex()};"


def _enc_items(code: str, items: Iterable[Any], n: int) -> str:
    parts = [f"{code}{n}:"]
    for item in items:
        enc = _ENCODERS.get(type(item))
        try:
            parts.append(enc(item) if enc is not None else _encode_other(item))
        except _Unsupported as exc:
            exc.path.append(f"[{len(parts) - 1}]")
            raise
    return "".join(parts)


def _enc_tuple(v: tuple[Any, ...]) -> str:
    return _enc_items("t", v, len(v))


def _enc_list(v: list[Any]) -> str:
    return _enc_items("l", v, len(v))


def _enc_unordered(code: str, v: set[Any] | frozenset[Any]) -> str:
    try:
        encoded = sorted(_encode(item) for item in v)
    except _Unsupported as exc:
        exc.path.append(" (a set element)")
        raise
    return f"{code}{len(encoded)}:" + "".join(encoded)


def _enc_set(v: set[Any]) -> str:
    return _enc_unordered("S", v)


def _enc_frozenset(v: frozenset[Any]) -> str:
    return _enc_unordered("Z", v)


def _enc_dict(v: dict[Any, Any]) -> str:
    pairs: list[tuple[str, str]] = []
    for key, value in v.items():
        try:
            encoded_key = _encode(key)
        except _Unsupported as exc:
            exc.path.append(" (a dict key)")
            raise
        try:
            pairs.append((encoded_key, _encode(value)))
        except _Unsupported as exc:
            exc.path.append(f"[{key!r:.40}]")
            raise
    pairs.sort()
    return f"d{len(pairs)}:" + "".join(k + value for k, value in pairs)


def _enc_datetime(v: datetime) -> str:
    return f"@dt{v.isoformat()};"


def _enc_date(v: date) -> str:
    return f"@d{v.isoformat()};"


def _enc_time(v: time) -> str:
    return f"@t{v.isoformat()};"


def _enc_timedelta(v: timedelta) -> str:
    return f"@td{v.days},{v.seconds},{v.microseconds};"


def _enc_uuid(v: UUID) -> str:
    return f"@u{v.hex};"


def _enc_decimal(v: Decimal) -> str:
    return f"@n{Decimal.__str__(v)};"


_ENCODERS: Final[dict[type, Callable[[Any], str]]] = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    str: _enc_str,
    bytes: _enc_bytes,
    tuple: _enc_tuple,
    list: _enc_list,
    dict: _enc_dict,
    set: _enc_set,
    frozenset: _enc_frozenset,
    datetime: _enc_datetime,
    date: _enc_date,
    time: _enc_time,
    timedelta: _enc_timedelta,
    UUID: _enc_uuid,
    Decimal: _enc_decimal,
}

# Subclasses of these built-in types are first converted to the exact type, so
# an overridden __str__, __iter__ or __format__ cannot change their encoding.
_EXACT: Final[dict[type, Callable[[Any], Any]]] = {
    str: str.__str__,
    int: int.__index__,
    float: float.__float__,
    bytes: bytes,
    tuple: tuple,
    list: list,
    dict: dict,
    set: set,
    frozenset: frozenset,
}


def _class_path(cls: type) -> str:
    return _enc_str(f"{cls.__module__}.{cls.__qualname__}")


def _is_pydantic_model(value: object) -> bool:
    # Never imports pydantic: if it is not imported, no value can be a model.
    pydantic = sys.modules.get("pydantic")
    if pydantic is None:
        return False
    base = getattr(pydantic, "BaseModel", None)
    return isinstance(base, type) and isinstance(value, base)


def _encode(value: Any) -> str:
    """Return the canonical encoding of ``value`` (see the table above)."""
    enc = _ENCODERS.get(type(value))
    return enc(value) if enc is not None else _encode_other(value)


def _encode_other(value: Any) -> str:
    cls = type(value)
    if isinstance(value, enum.Enum):
        try:
            return "E" + _class_path(cls) + _encode(value.value)
        except _Unsupported as exc:
            exc.path.append(f" (the value of {_type_name(cls)}.{value.name})")
            raise
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = ["C", _class_path(cls)]
        fields = [f for f in dataclasses.fields(value) if f.compare]
        parts.append(f"{len(fields)}:")
        for f in fields:
            parts.append(_enc_str(f.name))
            try:
                parts.append(_encode(getattr(value, f.name)))
            except _Unsupported as exc:
                exc.path.append(f".{f.name}")
                raise
        return "".join(parts)
    if _is_pydantic_model(value):
        return "P" + _class_path(cls) + _encode(value.model_dump(mode="json"))
    for base in cls.__mro__[1:]:
        enc = _ENCODERS.get(base)
        if enc is not None:
            convert = _EXACT.get(base)
            return enc(convert(value) if convert is not None else value)
    raise _Unsupported(value)


def is_keyable_type(annotation: object) -> bool:
    """Whether values annotated ``annotation`` may have a default-key encoding.

    ``False`` only when no value of the type can be keyed: a class that is
    none of the supported types (see the module documentation), judged by the
    rules :func:`_encode_other` applies to a value of that class. ``True`` for
    anything that cannot be decided: ``Any``, ``object``, type variables,
    unresolved (string) annotations, abstract classes and protocols (their
    values are of other classes), a union with a keyable member, and a generic
    alias whose container is keyable (``list[Session]`` holds nothing when
    empty).
    """
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    supertype = getattr(annotation, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return is_keyable_type(supertype)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(is_keyable_type(arg) for arg in typing.get_args(annotation))
    if origin is typing.Annotated:
        return is_keyable_type(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return True
    if origin is not None:
        annotation = origin
    if not isinstance(annotation, type):
        return True  # TypeVar, ParamSpec, ForwardRef, a string, a special form: undecidable
    return _class_is_keyable(annotation)


def _class_is_keyable(cls: type) -> bool:
    """Whether values of ``cls`` may be encoded; the rules of :func:`_encode_other`, for a class."""
    if cls is object:
        return True
    for base in cls.__mro__:
        if base in _ENCODERS:  # a supported type or a subclass of one
            return True
    if issubclass(cls, enum.Enum) or dataclasses.is_dataclass(cls):
        return True
    pydantic = sys.modules.get("pydantic")
    base_model = getattr(pydantic, "BaseModel", None) if pydantic is not None else None
    if isinstance(base_model, type) and issubclass(cls, base_model):
        return True
    if inspect.isabstract(cls) or getattr(cls, "_is_protocol", False):
        return True  # instances are of concrete subclasses, or of any class matching the protocol
    try:  # an ABC a supported type is registered with or matches (numbers.Number, Hashable, ...)
        return any(issubclass(supported, cls) for supported in _ENCODERS)
    except TypeError:
        return True


def _check_annotations(
    func: Callable[..., Any], params: Sequence[inspect.Parameter], keyed: Sequence[str], class_at: int
) -> None:
    """Raise UnsupportedArgumentError for a parameter of the default key annotated with a
    type that :func:`is_keyable_type` rejects (so that every call would fail)."""
    hints = _resolved_annotations(func, params)
    included = set(keyed)
    for i, p in enumerate(params):
        if (
            i == class_at
            or p.name not in included
            or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            or p.name not in hints
        ):
            continue
        annotation = hints[p.name]
        if not is_keyable_type(annotation):
            shown = _type_name(annotation) if isinstance(annotation, type) else repr(annotation)
            raise UnsupportedArgumentError(
                f"cannot build cache keys for {_describe(func)}: parameter {p.name!r} is annotated "
                f"{shown}, which has no stable key encoding (supported: None, bool, int, float, str, "
                "bytes, tuple, list, dict, set, frozenset, date/time types, UUID, Decimal, enums, "
                f"dataclasses, pydantic models); pass ignore=({p.name!r},) to leave it out of the key, "
                'or key="..." to build the key from chosen fields of the other arguments'
            )


def _resolved_annotations(func: Callable[..., Any], params: Sequence[inspect.Parameter]) -> dict[str, Any]:
    """The annotations of ``func``'s parameters, resolved; those that cannot be are left out."""
    try:
        return typing.get_type_hints(func)
    except Exception:  # any failure (a name imported only under TYPE_CHECKING): one by one below
        pass
    namespace = getattr(inspect.unwrap(func), "__globals__", None)
    hints: dict[str, Any] = {}
    for p in params:
        annotation = p.annotation
        if annotation is _EMPTY:
            continue
        if isinstance(annotation, str):
            holder = types.SimpleNamespace(__annotations__={"a": annotation})
            try:
                annotation = typing.get_type_hints(holder, globalns=namespace)["a"]
            except Exception:  # unresolvable: left to the call-time check
                continue
        hints[p.name] = annotation
    return hints


# Copying a prepared hash object is faster than constructing one with parameters.
_HASH: Final = hashlib.blake2b(digest_size=16)


def _digest(text: str) -> str:
    """32 hex digits of the BLAKE2b-128 hash of ``text`` in UTF-8 (lone surrogates kept as is)."""
    try:
        data = text.encode()
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")
    h = _HASH.copy()
    h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------------

_FIELD_HEAD: Final = re.compile(r"[^.\[]*")
_EMPTY: Final[Any] = inspect.Parameter.empty
_formatter: Final = Formatter()


def _template_fields(template: object, parameters: Sequence[str], what: str) -> set[str]:
    """Return the parameter names ``template`` uses; raise ConfigurationError if any is unknown."""
    if not isinstance(template, str):
        raise ConfigurationError(f"{what} must be a str, got {type(template).__name__} ({template!r:.80})")
    names: set[str] = set()
    try:
        _collect_fields(template, parameters, what, template, names)
    except ValueError as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"{what} {template!r} is not a valid format string: {exc}") from exc
    return names


def _collect_fields(text: str, parameters: Sequence[str], what: str, template: str, names: set[str]) -> None:
    for _literal, field, spec, _conversion in _formatter.parse(text):
        if field is None:
            continue
        head = _FIELD_HEAD.match(field)
        name = head.group() if head else ""
        if name not in parameters:
            shown = ", ".join(parameters) if parameters else "none"
            if not name or name.isdigit():
                problem = f"has a positional field {{{field}}}"
            else:
                problem = f"names {{{field}}}, but {name!r} is not a parameter"
            raise ConfigurationError(
                f"{what} {template!r} {problem}; fields must name a parameter of the function "
                f"(parameters: {shown})"
            )
        names.add(name)
        if spec:  # nested fields such as {price:{width}}
            _collect_fields(spec, parameters, what, template, names)


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    if not callable(func):
        raise ConfigurationError(f"expected a function, got {type(func).__name__} ({func!r:.80})")
    try:
        return inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the signature of {func!r:.80}: {exc}") from exc


# --------------------------------------------------------------------------------------------------
# KeyBuilder
# --------------------------------------------------------------------------------------------------


class KeyBuilder:
    """Build the cache key of each call of ``func``.

    Create it once, when ``func`` is decorated; then call it with the
    positional and keyword arguments of each call::

        build_key = KeyBuilder(get_feed, ignore=("session",))
        key = build_key(args, kwargs)

    Args:
        func: the function whose calls are cached (not a ``staticmethod`` or
            ``classmethod`` object: pass the function it wraps).
        key: a template such as ``"feed:{user.id}:{page}"``; every field must
            name a parameter. Omitted: a default key
            ``"<module>.<qualname>:<digest of the arguments>"`` (see the module
            documentation for the supported argument types).
        ignore: names of parameters to leave out of the default key (a database
            session, a logger). Each must be a parameter of ``func``.
            With ``key=`` the template alone decides what is in the key.
        kind: how ``func`` is bound: ``"function"``, ``"class"``
            (classmethod), ``"static"`` or ``"auto"`` (see "Methods" in the
            module documentation).

    Raises:
        ConfigurationError: (a ``ValueError``) when a template field or an
            ``ignore`` entry names no parameter, a parameter is both ignored
            and named in the template, ``ignore`` is a bare string, or a
            method (``kind="function"``) says neither ``ignore=("self",)``
            nor a key naming ``self``.
        UnsupportedArgumentError: (a ``TypeError``) a parameter in the
            default key is annotated with a type that cannot be keyed.
    """

    __slots__ = (
        "_all_keyword",
        "_all_positional",
        "_by_keyword",
        "_by_name",
        "_class_at",
        "_defaults",
        "_fast",
        "_included",
        "_names",
        "_npos",
        "_opaque",
        "_prefix",
        "_signature",
        "_single",
        "func",
        "parameters",
        "prefix",
        "template",
    )

    #: The function the keys are built for.
    func: Callable[..., Any]
    #: ``"<module>.<qualname>:"`` for default keys; ``None`` with a template.
    prefix: str | None
    #: The ``key=`` template, or ``None`` for default keys.
    template: str | None
    #: Names of the parameters that the key depends on, in signature order.
    parameters: tuple[str, ...]

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        key: str | None = None,
        ignore: Iterable[str] = (),
        kind: Literal["auto", "function", "class", "static"] = "auto",
    ) -> None:
        sig = _signature(func)
        self.func = func
        self._signature = sig
        params = list(sig.parameters.values())
        names = tuple(p.name for p in params)
        self._names = names

        if isinstance(ignore, (str, bytes)):
            raise ConfigurationError(
                f"ignore must be a list of parameter names, got the bare string {ignore!r:.80}; "
                f"write ignore=({ignore!r:.80},)"
            )
        if kind not in ("auto", "function", "class", "static"):
            raise ConfigurationError(f"kind must be 'auto', 'function', 'class' or 'static', got {kind!r}")
        ignored: set[str] = set()
        for name in ignore:
            if name not in names:
                raise ConfigurationError(
                    f"ignore names {name!r}, which is not a parameter of {_describe(func)} "
                    f"(parameters: {', '.join(names) or 'none'})"
                )
            ignored.add(name)

        self._class_at = -1  # 0 when the first parameter is keyed by the class it holds (classmethods)
        if key is not None:
            used = _template_fields(key, names, "key template")
            both = sorted(used & ignored)
            if both:
                raise ConfigurationError(
                    f"key template {key!r} names {', '.join(both)}, which ignore= also lists; "
                    "the template alone decides what is in the key: drop them from ignore"
                )
            self.template: str | None = key
            self.prefix: str | None = None
            self._prefix = ""
            self.parameters = tuple(n for n in names if n in used)
        else:
            self.template = None
            module = getattr(func, "__module__", None) or ""
            qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or "<function>"
            self.prefix = self._prefix = f"{module}.{qualname}:"
            check_key(self.prefix + _digest(""))  # a digest adds 32 hex digits, never anything invalid
            method = _is_method(qualname, params)
            if kind == "auto":
                if method:
                    ignored.add(params[0].name)
            elif kind == "class" or (kind == "function" and method and params[0].name == "cls"):
                if not params or params[0].kind not in _POSITIONAL:
                    raise ConfigurationError(
                        f"{_describe(func)} is a classmethod without a positional first parameter "
                        "for the class"
                    )
                if params[0].name not in ignored:
                    self._class_at = 0
            elif kind == "function" and method and "self" not in ignored:
                raise ConfigurationError(_method_needs_identity(func, qualname, names))
            self.parameters = tuple(n for n in names if n not in ignored)
            _check_annotations(func, params, self.parameters, self._class_at)

        included = set(self.parameters)
        self._included: tuple[tuple[int, str], ...] = tuple(
            (i, f"{n}=") for i, n in enumerate(names) if n in included
        )
        self._single = self._included[0] if len(self._included) == 1 else None
        # Defaults that cannot be encoded (sentinels) are keyed as "the default" when passed as is.
        opaque: dict[int, Any] = {}
        for i, p in enumerate(params):
            if p.name in included and p.default is not _EMPTY:
                try:
                    _encode(p.default)
                except _Unsupported:
                    opaque[i] = p.default
        self._opaque = opaque

        kinds = [p.kind for p in params]
        self._fast = not any(
            k in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in kinds
        )
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._npos = sum(1 for k in kinds if k in positional)
        self._all_positional = len(params) if self._npos == len(params) else -1
        self._all_keyword = -1 if not params or inspect.Parameter.POSITIONAL_ONLY in kinds else len(params)
        self._by_name: Callable[[Mapping[str, Any]], Any] = (
            operator.itemgetter(*names) if names else _no_values
        )
        self._by_keyword = tuple(k is not inspect.Parameter.POSITIONAL_ONLY for k in kinds)
        self._defaults = tuple(p.default for p in params)
        if self._class_at == 0:
            self.__class__ = _ClassKeyBuilder

    def __repr__(self) -> str:
        what = f"key={self.template!r}" if self.template is not None else f"prefix={self.prefix!r}"
        return f"KeyBuilder({_describe(self.func)}, {what}, parameters={self.parameters!r})"

    # -- binding -----------------------------------------------------------------------------------

    def _values(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Sequence[Any]:
        """The value of every parameter, in signature order, defaults applied."""
        if self._fast:
            n = len(args)
            if not kwargs:
                if n == self._all_positional:
                    return args
            elif not n and len(kwargs) == self._all_keyword:
                try:
                    found = self._by_name(kwargs)
                except KeyError:
                    pass
                else:
                    return found if self._all_keyword != 1 else (found,)
            if n <= self._npos:
                values = list(args)
                names = self._names
                by_keyword = self._by_keyword
                defaults = self._defaults
                used = 0
                for i in range(n, len(names)):
                    name = names[i]
                    if by_keyword[i] and name in kwargs:
                        values.append(kwargs[name])
                        used += 1
                    else:
                        default = defaults[i]
                        if default is _EMPTY:
                            break  # a missing argument: let Signature.bind raise the usual TypeError
                        values.append(default)
                else:
                    if used == len(kwargs):
                        return values
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        return [arguments[name] for name in self._names]

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Return the arguments of a call as ``{parameter name: value}``.

        Defaults are applied and nothing is left out (neither ``self`` nor
        ignored parameters); a ``*args`` parameter maps to a tuple and a
        ``**kwargs`` parameter to a dict. A call that does not match the
        signature raises the usual ``TypeError``.
        """
        return dict(zip(self._names, self._values(args, kwargs), strict=False))

    # -- keys --------------------------------------------------------------------------------------

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
        """Return the cache key of the call ``func(*args, **kwargs)``.

        Raises:
            TypeError: the arguments do not match the signature.
            UnsupportedArgumentError: (a ``TypeError``) an argument in the
                default key has no stable encoding.
            InvalidKeyError: a key template produced an invalid key.
        """
        values = self._values(args, kwargs)
        if self.template is not None:
            return self._from_template(dict(zip(self._names, values, strict=False)))
        return self._from_values(values)

    def key_for(self, arguments: Mapping[str, Any]) -> str:
        """Return the key for arguments already bound with :meth:`bind`."""
        if self.template is not None:
            return self._from_template(arguments)
        return self._from_values([arguments[name] for name in self._names])

    def key_and_arguments(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[str, dict[str, Any]]:
        """Bind a call once and return both its key and its arguments (for :class:`TagTemplates`
        or a ``tags=`` callable)."""
        values = self._values(args, kwargs)
        arguments = dict(zip(self._names, values, strict=False))
        if self.template is not None:
            return self._from_template(arguments), arguments
        return self._from_values(values), arguments

    def _from_values(self, values: Sequence[Any]) -> str:
        encoders = _ENCODERS
        if self._single is not None:  # the common one-parameter case, without a list
            i, label = self._single
            value = values[i]
            enc = encoders.get(type(value))
            try:
                text = enc(value) if enc is not None else _encode_other(value)
            except _Unsupported as exc:
                text = self._opaque_default(i, label, value, exc)
            return self._prefix + _digest(label + text)
        parts: list[str] = []
        for i, label in self._included:
            value = values[i]
            enc = encoders.get(type(value))
            try:
                text = enc(value) if enc is not None else _encode_other(value)
            except _Unsupported as exc:
                text = self._opaque_default(i, label, value, exc)
            parts.append(label + text)
        return self._prefix + _digest("".join(parts))

    def _opaque_default(self, i: int, label: str, value: Any, exc: _Unsupported) -> str:
        """Encode the parameter's own unsupported default object as "~", or raise for ``value``."""
        if i in self._opaque and value is self._opaque[i]:
            return "~"
        raise self._unsupported(label[:-1], exc) from None

    def _from_template(self, arguments: Mapping[str, Any]) -> str:
        assert self.template is not None
        return check_key(self.template.format_map(arguments))

    def _unsupported(self, name: str, exc: _Unsupported) -> UnsupportedArgumentError:
        where = "".join(reversed(exc.path))
        inside = f" contains a {exc.type_name} (at {name}{where})" if where else f" is a {exc.type_name}"
        return UnsupportedArgumentError(
            f"cannot build a cache key for {_describe(self.func)}: argument {name!r}{inside}, "
            "which has no stable key encoding (supported: None, bool, int, float, str, bytes, tuple, list, "
            "dict, set, frozenset, date/time types, UUID, Decimal, enums, dataclasses, pydantic models); "
            f"pass ignore=({name!r},) to leave it out of the key, "
            'or key="..." to build the key from chosen fields of the other arguments'
        )


class _ClassKeyBuilder(KeyBuilder):
    """A :class:`KeyBuilder` whose first parameter holds a class (a classmethod's ``cls``),
    keyed by the class's path. A separate class, so that other functions' keys pay
    nothing for it."""

    __slots__ = ()

    def _from_values(self, values: Sequence[Any]) -> str:
        owner = values[0]
        if not isinstance(owner, type):
            return super()._from_values(values)  # raises, naming the parameter
        included = self._included
        parts = [included[0][1], "K", _class_path(owner)]
        encoders = _ENCODERS
        for i, label in included[1:]:
            value = values[i]
            enc = encoders.get(type(value))
            try:
                text = enc(value) if enc is not None else _encode_other(value)
            except _Unsupported as exc:
                text = self._opaque_default(i, label, value, exc)
            parts.append(label + text)
        return self._prefix + _digest("".join(parts))


def _no_values(kwargs: Mapping[str, Any]) -> tuple[()]:
    return ()


_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _method_needs_identity(func: Callable[..., Any], qualname: str, names: Sequence[str]) -> str:
    owner = qualname.rpartition(".")[0].rpartition(".")[2]
    fields = "".join(f":{{{n}}}" for n in names[1:])
    return (
        f"{_describe(func)} is a method, and its default key cannot tell instances apart: "
        "say what identifies the instance with a key template naming self, e.g. "
        f'key="{owner.lower()}:{{self.id}}{fields}", '
        'or pass ignore=("self",) if all instances should share its entries'
    )


def _is_method(qualname: str, params: list[inspect.Parameter]) -> bool:
    """Whether the function looks like a method: defined in a class, first parameter self/cls."""
    owner, dot, _ = qualname.rpartition(".")
    if not dot or owner.endswith("<locals>") or not params:
        return False
    first = params[0]
    return first.name in ("self", "cls") and first.kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def _describe(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{name}()"


# --------------------------------------------------------------------------------------------------
# TagTemplates
# --------------------------------------------------------------------------------------------------


class TagTemplates:
    """Build the tags of each call of ``func`` from templates.

    ``TagTemplates(get_user, ["users", "user:{user_id}"])`` gives
    ``["users", "user:42"]`` for the arguments of ``get_user(42)``. Fields use
    the same syntax as key templates (``{user.id}``, ``{ids[0]}``) and each
    must name a parameter of ``func`` (any parameter, ``self`` and ignored ones
    included), else :class:`~tagcache.exceptions.ConfigurationError` is
    raised here. Tags without fields are validated here and computed once.

    Args:
        func: the decorated function.
        templates: the tag templates, in the order the tags are returned. A
            bare string is rejected (write ``["users"]``).
    """

    __slots__ = ("_dynamic", "_static", "parameters", "static")

    #: Names of the parameters the templates use.
    parameters: tuple[str, ...]
    #: ``True`` when no template has a field: the tags do not depend on the call.
    static: bool

    def __init__(self, func: Callable[..., Any], templates: Iterable[str]) -> None:
        if isinstance(templates, (str, bytes)):
            raise ConfigurationError(
                f"tags must be a list of templates, got the bare string {templates!r:.80}; "
                f"write tags=[{templates!r:.80}]"
            )
        names = tuple(_signature(func).parameters)
        used: set[str] = set()
        static: list[str] = []
        self._dynamic: list[tuple[int, str]] = []
        entries: list[str] = []
        for template in templates:
            fields = _template_fields(template, names, "tag template")
            if fields:
                used |= fields
                self._dynamic.append((len(entries), template))
                entries.append("")  # replaced per call
            else:
                tag = template.format()  # turns "{{" into "{"
                static.append(tag)
                entries.append(tag)
        check_tags(static)
        self._static = entries
        self.static = not self._dynamic
        self.parameters = tuple(n for n in names if n in used)

    def __repr__(self) -> str:
        shown = list(self._static)
        for i, template in self._dynamic:
            shown[i] = template
        return f"TagTemplates({shown!r})"

    def __call__(self, arguments: Mapping[str, Any] | None = None) -> list[str]:
        """Return the tags for one call, given its arguments from :meth:`KeyBuilder.bind`.

        ``arguments`` may be omitted when :attr:`static` is true.
        """
        tags = list(self._static)
        if self._dynamic:
            if arguments is None:
                raise TypeError("these tag templates have fields: pass the call's arguments")
            for i, template in self._dynamic:
                tags[i] = template.format_map(arguments)
        return tags
