"""``@cache.cached``: read-through caching of async functions.

The decorated function keeps its signature and type hints (``ParamSpec``),
so FastAPI's dependency injection and editors see the original. Each call
builds a stable key from the function and its bound arguments
(:mod:`tagcache.keys`) and hands one :class:`~tagcache.readthrough.LoadRequest`
to the cache's read-through engine (:class:`~tagcache.readthrough.ReadThrough`):
one round trip on a hit; on a miss the tag tokens are read and a lease taken
before the function runs, and its result is stored only if none of its tags
was invalidated meanwhile. Concurrent callers share one call (in the
process) or wait for the lease holder's value (across processes).
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeGuard, TypeVar

from tagcache.exceptions import ConfigurationError
from tagcache.hints import decorating_namespace, prepare_codec
from tagcache.keys import KeyBuilder, TagTemplates
from tagcache.readthrough import NOT_FOUND, LoadPolicy, LoadRequest
from tagcache.tags import check_tags, ttl_seconds

if TYPE_CHECKING:
    from tagcache.cache import Cache

__all__ = ["CachedFunction"]

P = ParamSpec("P")
R = TypeVar("R")

#: ``tags=``: templates formatted from the arguments, or a callable of the result and the arguments.
TagsSpec = Sequence[str] | Callable[..., Iterable[str]] | None

#: Calls whose positional arguments are all ``int`` and ``str`` (the usual ids and
#: slugs) have their key and tags remembered, up to this many per function (then
#: the oldest is dropped), for strings up to _MEMO_STR characters. Exact types
#: only: ``True``, ``1.0`` and ``1`` hash alike but are keyed differently.
_MEMO_SIZE = 16384
_MEMO_STR = 256


class CachedFunction(Generic[P, R]):
    """An async function whose results are cached. Call it like the original.

    Handles: :meth:`invalidate` (drop the entry for some arguments),
    :meth:`refresh` (recompute and store now), :meth:`key_for` (the key, for
    debugging and management) and ``__wrapped__`` (the original function).
    """

    def __init__(
        self,
        cache: Cache,
        func: Callable[P, Awaitable[R]],
        *,
        ttl: float | None,
        key: str | None,
        tags: TagsSpec,
        ignore: Iterable[str],
        policy: LoadPolicy,
        kind: Literal["function", "class", "static"] = "function",
    ) -> None:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"@cache.cached needs an async function, got {getattr(func, '__qualname__', func)!r}; "
                "declare it with 'async def'"
            )
        # Local classes named in the return annotation become encodable by the codec.
        prepare_codec(cache.codec, func, localns=decorating_namespace())
        self._cache = cache
        self._func = func
        #: This function's own counters (Cache.function_stats), counted besides the cache's.
        self._stats = cache.function_counters(f"{func.__module__}.{func.__qualname__}")
        self._ttl = ttl
        self._policy = policy
        self._kind = kind
        self._keys = KeyBuilder(func, key=key, ignore=ignore, kind=kind)
        self._result_tags_fn: Callable[..., Iterable[str]] | None = None
        if callable(tags):
            self._tag_templates = TagTemplates(func, ())
            self._result_tags_fn = tags
        else:  # TagTemplates rejects a bare string and checks the static tags
            self._tag_templates = TagTemplates(func, () if tags is None else tags)
        templates = self._tag_templates
        # Tags without fields are validated once; templated ones per call.
        self._static_tags = check_tags(templates()) if templates.static else None
        #: Key and tags of calls with int/str positional arguments (see _MEMO_SIZE);
        #: ``None`` when tags come from the result.
        self._memo: OrderedDict[tuple[Any, ...], tuple[str, tuple[str, ...]]] | None = (
            OrderedDict() if self._result_tags_fn is None else None
        )
        functools.update_wrapper(self, func)  # __name__, __doc__, __wrapped__, ...

    # ------------------------------------------------------------------ calling

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Return the cached result for these arguments, calling the function on a miss."""
        memo = self._memo
        entry = None
        if memo is not None and not kwargs:
            for arg in args:
                kind = type(arg)
                if kind is not int and (kind is not str or len(arg) > _MEMO_STR):  # type: ignore[arg-type]  # a str here
                    break
            else:
                entry = memo.get(args)
                if entry is None:
                    entry = self._key_and_tags(args, kwargs)
                    if len(memo) >= _MEMO_SIZE:
                        memo.popitem(last=False)  # the oldest: first in, first out
                    memo[args] = entry
        result_tags = None
        if entry is not None:
            key, tags = entry
        elif self._result_tags_fn is None:
            key, tags = self._key_and_tags(args, kwargs)
        else:
            key, tags, result_tags = self._prepare(args, kwargs)
        engine = self._cache.engine
        stats = self._stats
        value = engine.cached_nowait(key, stats)  # an in-process hit, without a coroutine
        if value is not NOT_FOUND:
            return value  # type: ignore[no-any-return]  # decoded payload of an R the function returned
        return await engine.load(
            LoadRequest(key, self._func, self._ttl, tags, self._policy, result_tags, args, kwargs, stats)
        )

    def _key_and_tags(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
        """Key and tags of a call whose tags do not depend on its result."""
        tags = self._static_tags
        if tags is not None:
            return self._keys(args, kwargs), tags  # no argument mapping needed
        key, arguments = self._keys.key_and_arguments(args, kwargs)
        return key, check_tags(self._tag_templates(arguments))

    def _prepare(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, tuple[str, ...], Callable[[R], Iterable[str]] | None]:
        """Key, tags and result-tags function for a call whose tags need its arguments."""
        key, arguments = self._keys.key_and_arguments(args, kwargs)
        tags = self._static_tags
        if tags is None:
            tags = check_tags(self._tag_templates(arguments))
        result_tags = None
        if self._result_tags_fn is not None:
            fn = self._result_tags_fn

            def result_tags(result: R) -> Iterable[str]:
                return fn(result, **arguments)

        return key, tags, result_tags

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of a call with these arguments (no call is made)."""
        return self._keys(args, kwargs)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the cached entry for these arguments; return whether one was stored."""
        return await self._cache.delete(self._keys(args, kwargs))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function now and store its result, even if an entry is present.

        The write is the same compare-and-set as on a miss, so a refresh (for
        example by a :class:`~tagcache.CacheWarmer`) never stores data older
        than an invalidation. If another caller holds the key's lease the
        result is returned without being stored. A backend failure taking the
        lease raises :class:`~tagcache.BackendError` (a warming job should
        know); one storing the result does not: the result is returned and
        counted in ``stats().not_stored``.
        """
        key, tags, result_tags = self._prepare(args, kwargs)
        func = self._func
        ran = await self._cache.engine.recompute(
            LoadRequest(key, func, self._ttl, tags, self._policy, result_tags, args, kwargs, self._stats)
        )
        if ran is None:  # another caller is refreshing: compute without storing
            return await func(*args, **kwargs)
        return ran[0]

    # ------------------------------------------------------------------ methods

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """Bind like the function it wraps: to the instance (methods), the class
        (classmethods) or nothing (staticmethods)."""
        if self._kind == "static":
            return self
        target: object = instance
        if self._kind == "class":  # the class it is called on: a subclass's calls are keyed by the subclass
            target = owner if owner is not None else type(instance)
        if target is None:
            return self
        return _BoundCached(self, target)

    def __repr__(self) -> str:
        return f"<cached {self._func.__module__}.{self._func.__qualname__}>"


class _BoundCached:
    """A :class:`CachedFunction` bound to an instance or class, like a bound method."""

    __slots__ = ("__self__", "_cached")

    def __init__(self, cached: CachedFunction[Any, Any], target: object) -> None:
        self._cached = cached
        self.__self__ = target

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self._cached(self.__self__, *args, **kwargs)

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        """The cache key of a call with these arguments."""
        return self._cached.key_for(self.__self__, *args, **kwargs)

    async def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the cached entry for these arguments."""
        return await self._cached.invalidate(self.__self__, *args, **kwargs)

    async def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Recompute and store the entry for these arguments."""
        return await self._cached.refresh(self.__self__, *args, **kwargs)

    @property
    def __wrapped__(self) -> Any:
        return self._cached.__wrapped__  # type: ignore[attr-defined]  # set by functools.update_wrapper

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cached, name)


def make_decorator(
    cache: Cache,
    *,
    ttl: float | timedelta | object | None,
    key: str | None,
    tags: TagsSpec,
    ignore: Iterable[str],
    stale_while_revalidate: float | timedelta,
    early_refresh: bool,
    beta: float,
    jitter: float,
    lock: bool,
    fail_open: bool,
    stale_if_error: float | timedelta = 0,
    timeout: float | timedelta | None = None,
) -> Callable[[Any], Any]:
    """Validate ``@cache.cached`` options once and return the decorator."""
    seconds = cache.default_ttl if ttl is DEFAULT else ttl_seconds(ttl)
    swr = ttl_seconds(stale_while_revalidate, what="stale_while_revalidate") or 0.0
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
        raise ConfigurationError(f"beta must be a positive number, got {beta!r}")
    if not isinstance(jitter, (int, float)) or isinstance(jitter, bool) or not 0 <= jitter < 1:
        raise ConfigurationError(f"jitter must be a fraction in [0, 1), got {jitter!r}")
    window, limit = check_source_options(stale_if_error, timeout)
    if (swr or early_refresh or window) and seconds is None:
        raise ConfigurationError(
            "stale_while_revalidate, early_refresh and stale_if_error need a TTL: "
            "entries without expiry never go stale"
        )
    if isinstance(ignore, (str, bytes)):  # the same message as KeyBuilder's, before any other check
        raise ConfigurationError(
            f"ignore must be a list of parameter names, got the bare string {ignore!r:.80}; "
            f"write ignore=({ignore!r:.80},)"
        )
    if not isinstance(fail_open, bool):
        raise ConfigurationError(
            f"fail_open must be True, False or None (the cache's setting), got {fail_open!r}"
        )
    policy = LoadPolicy(
        lock=bool(lock),
        stale_while_revalidate=swr,
        early_refresh=bool(early_refresh),
        beta=float(beta),
        jitter=float(jitter),
        fail_open=fail_open,
        stale_if_error=window,
        timeout=limit,
    )

    def decorate(func: Any) -> Any:
        kind: Literal["function", "class", "static"] = "function"
        if isinstance(func, staticmethod):
            kind, func = "static", func.__func__
        elif isinstance(func, classmethod):
            kind, func = "class", func.__func__
        return CachedFunction(
            cache, func, ttl=seconds, key=key, tags=tags, ignore=ignore, policy=policy, kind=kind
        )

    return decorate


def check_source_options(stale_if_error: object, timeout: object) -> tuple[float, float | None]:
    """Check ``stale_if_error`` (seconds or ``timedelta``; 0: off) and ``timeout`` (positive
    seconds or ``timedelta``, or ``None``: no limit); return them in seconds.

    Raises:
        InvalidTTLError: a value of another type, negative, NaN or infinite.
        ConfigurationError: ``stale_if_error=None`` or ``timeout=0``.
    """
    window = ttl_seconds(stale_if_error, what="stale_if_error")
    if window is None:
        raise ConfigurationError(
            "stale_if_error must be a number of seconds or a timedelta (0: off), got None"
        )
    if timeout is None:
        return window, None
    limit = ttl_seconds(timeout, what="timeout")
    if not limit:
        raise ConfigurationError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return window, limit


def is_decoratable(obj: object) -> TypeGuard[Callable[..., Any]]:
    """Whether ``@cache.cached`` received the function itself (written without parentheses)
    instead of a TTL: a callable, or a staticmethod/classmethod object."""
    return callable(obj) or isinstance(obj, (staticmethod, classmethod))


class _Default:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<default>"


#: ``ttl`` not given: the cache's ``default_ttl``.
DEFAULT: Any = _Default()
