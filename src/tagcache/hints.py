"""Classes named in a cached function's return annotation.

:class:`~tagcache.codec.JsonCodec` stores dataclasses, pydantic models and
enums by their name, ``"module:qualname"``, and decoding finds the class
again by that name. A class defined inside a function has no such name. But
when a cached function says what it returns (``-> Out``, ``-> list[Out]``,
``-> Out | None``), the class is known at decoration time:
:func:`prepare_codec` hands each class named there, and in the fields of
those classes, that cannot be found by its name to
:meth:`JsonCodec.adopt <tagcache.codec.JsonCodec.adopt>`, so values of that
type are stored and decoded into exactly that class.

Nothing here raises for an annotation it cannot resolve (a name that is not
defined yet, a typo): such an annotation names no class, and the codec then
behaves as without it.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import sys
import typing
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, ForwardRef

from tagcache.codec import JsonCodec, _class_kind

__all__ = ["decorating_namespace", "prepare_codec", "return_classes"]

_TypeAliasType: Any = getattr(typing, "TypeAliasType", None)  # Python 3.12+


def return_classes(func: Callable[..., Any], localns: Mapping[str, Any] | None = None) -> tuple[type, ...]:
    """Return the dataclasses, pydantic models and enums named in ``func``'s return annotation.

    Generic types are walked (``list[Out]``, ``Out | None``,
    ``Optional[Out]``, ``dict[str, Out]``, ``tuple[Out, ...]``,
    ``Sequence[Out]``, ``Annotated[Out, ...]``, ``Literal[Color.RED]``, type
    aliases, ``NewType``, ``TypedDict`` values, and any nesting of them), and
    so are the fields of every class found, recursively: a dataclass whose
    field holds another dataclass yields both. Each class appears once, in
    the order found.

    String annotations (``from __future__ import annotations``, quoted
    forward references) are resolved with :func:`typing.get_type_hints`, in
    the function's module globals, its closure variables and ``localns``
    (which takes precedence): pass the namespace the function is decorated
    in, such as the decorating frame's ``f_locals``, so that classes defined
    in the same function resolve. String field annotations of a dataclass
    are resolved the same way, in the class's module and ``localns``.

    An annotation, or part of one, that cannot be resolved names nothing:
    this function never raises for it.
    """
    try:
        annotation = _return_annotation(func)
    except Exception:
        return ()
    if annotation is _NO_ANNOTATION:
        return ()
    namespace = _closure_namespace(func)
    if localns:
        namespace.update(localns)
    walker = _Walker(namespace)
    walker.walk(annotation, _globals_of(func))
    return tuple(walker.found)


def prepare_codec(codec: object, func: Callable[..., Any], localns: Mapping[str, Any] | None = None) -> None:
    """Make ``codec`` able to store and restore the classes ``func`` is annotated to return.

    For a :class:`~tagcache.codec.JsonCodec`, adopts
    (:meth:`~tagcache.codec.JsonCodec.adopt`) each class of
    :func:`return_classes` ``(func, localns)`` that cannot be found by its
    name: local classes, and classes shadowed or renamed in their module.
    Classes found by name, and registered ones, are left as they are. Any
    other codec is left alone. Never raises: a class that cannot be adopted
    is stored as without this call.
    """
    if not isinstance(codec, JsonCodec):
        return
    for cls in return_classes(func, localns):
        try:
            codec.adopt(cls)
        except Exception:  # best effort at decoration: encoding then reports the class
            continue


def decorating_namespace() -> Mapping[str, Any]:
    """Return the local variables of the nearest calling frame outside the tagcache package.

    Called while ``@cache.cached`` decorates a function, this is the
    namespace the decorator is applied in (a function's locals, a class
    body, or a module's globals): the ``localns`` for :func:`prepare_codec`,
    where string annotations naming classes defined next to the function
    resolve. Empty when there is no such frame.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "tagcache":
        frame = frame.f_back
    return frame.f_locals if frame is not None else {}


# --------------------------------------------------------------------------------------------------

_NO_ANNOTATION: Any = object()


def _unwrap(func: object) -> object:
    try:
        return inspect.unwrap(func)  # type: ignore[arg-type]  # any object; returns it when not wrapped
    except Exception:
        return func


def _return_annotation(func: Callable[..., Any]) -> Any:
    annotations = getattr(func, "__annotations__", None)
    if not isinstance(annotations, Mapping) or "return" not in annotations:
        return _NO_ANNOTATION
    return annotations["return"]


def _globals_of(func: Callable[..., Any]) -> dict[str, Any]:
    found = getattr(_unwrap(func), "__globals__", None)
    if isinstance(found, dict):
        return found
    module = sys.modules.get(getattr(func, "__module__", None) or "")
    return dict(vars(module)) if module is not None else {}


def _closure_namespace(func: Callable[..., Any]) -> dict[str, Any]:
    """The function's closure variables that are bound (a cell may still be empty)."""
    target = _unwrap(func)
    code = getattr(target, "__code__", None)
    closure = getattr(target, "__closure__", None)
    namespace: dict[str, Any] = {}
    if code is None or not closure:
        return namespace
    for name, cell in zip(code.co_freevars, closure, strict=False):
        try:
            namespace[name] = cell.cell_contents
        except ValueError:  # not bound yet
            continue
    return namespace


def _evaluate(annotation: Any, globalns: dict[str, Any], localns: dict[str, Any]) -> Any:
    """Resolve a string or forward reference (also nested ones) with :func:`typing.get_type_hints`."""

    def holder() -> None: ...

    holder.__annotations__ = {"return": annotation}
    return typing.get_type_hints(holder, globalns=globalns, localns=localns)["return"]


class _Walker:
    """Collects the classes a type expression names, with the fields of those classes."""

    def __init__(self, localns: dict[str, Any]) -> None:
        self.localns = localns
        self.found: list[type] = []
        self.seen: set[int] = set()  # ids of classes and aliases walked (recursive types end here)

    def walk(self, tp: Any, globalns: dict[str, Any]) -> None:
        try:
            self._walk(tp, globalns)
        except Exception:  # an annotation that cannot be resolved or taken apart names nothing
            return

    def _walk(self, tp: Any, globalns: dict[str, Any]) -> None:
        if isinstance(tp, (str, ForwardRef)):
            tp = _evaluate(tp, globalns, self.localns)
        if tp is None or tp is Ellipsis or isinstance(tp, typing.TypeVar):
            return
        if isinstance(tp, enum.Enum):  # a Literal[...] value
            tp = type(tp)
        if _TypeAliasType is not None and isinstance(tp, _TypeAliasType):
            if id(tp) not in self.seen:
                self.seen.add(id(tp))
                self.walk(tp.__value__, _module_globals(tp, globalns))
            return
        supertype = getattr(tp, "__supertype__", None)  # typing.NewType
        if supertype is not None:
            self.walk(supertype, globalns)
            return
        if isinstance(tp, type) and not typing.get_args(tp):
            self._walk_class(tp)
            return
        origin = typing.get_origin(tp)
        if isinstance(origin, type):
            self.walk(origin, globalns)  # a generic dataclass or model: Box[Out]
        for arg in typing.get_args(tp):
            if isinstance(arg, list):  # Callable[[A, B], R]
                for item in arg:
                    self.walk(item, globalns)
            else:
                self.walk(arg, globalns)

    def _walk_class(self, cls: type) -> None:
        if id(cls) in self.seen:
            return
        self.seen.add(id(cls))
        kind = _class_kind(cls)
        if kind is not None:
            self.found.append(cls)
        if kind == "dataclass":
            globalns = _module_globals(cls, {})
            localns = {**self.localns, cls.__name__: cls}
            for f in dataclasses.fields(cls):
                field_type = f.type
                if isinstance(field_type, (str, ForwardRef)):
                    try:
                        field_type = _evaluate(field_type, globalns, localns)
                    except Exception:
                        continue
                self.walk(field_type, globalns)
        elif kind == "pydantic model":
            globalns = _module_globals(cls, {})
            fields: Mapping[str, Any] = getattr(cls, "model_fields", {})
            for info in fields.values():
                self.walk(getattr(info, "annotation", None), globalns)
        elif kind is None and typing.is_typeddict(cls):
            globalns = _module_globals(cls, {})
            for value in getattr(cls, "__annotations__", {}).values():
                self.walk(value, globalns)


def _module_globals(obj: object, default: dict[str, Any]) -> dict[str, Any]:
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    return vars(module) if module is not None else default
