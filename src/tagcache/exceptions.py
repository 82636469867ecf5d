"""The tagcache error tree.

Every error tagcache raises on purpose derives from :class:`TagCacheError`.
Errors raised by a third-party client (redis-py) are translated where they
enter tagcache into :class:`BackendError`, with the original chained as
``__cause__``. Bad arguments additionally derive from the matching built-in
(:class:`ValueError` or :class:`TypeError`) so ``except ValueError`` keeps
working for code that does not know about tagcache.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "ConfigurationError",
    "InvalidKeyError",
    "InvalidTagError",
    "InvalidTTLError",
    "PartialInvalidationError",
    "SerializationError",
    "TagCacheError",
    "UnsupportedArgumentError",
    "UnsupportedOperationError",
    "ValueTooLargeError",
]


class TagCacheError(Exception):
    """Base class of every error tagcache raises."""


class ConfigurationError(TagCacheError, ValueError):
    """A setting is invalid: an unknown URL scheme, a negative limit, a bad namespace."""


class InvalidKeyError(TagCacheError, ValueError):
    """A cache key is empty, too long, not a ``str`` or contains control characters."""


class InvalidTagError(TagCacheError, ValueError):
    """A tag is empty, too long, not a ``str``, contains control characters,
    or tags were passed as a bare string instead of a list."""


class InvalidTTLError(TagCacheError, ValueError):
    """A TTL is negative, NaN, infinite or of an unsupported type."""


class SerializationError(TagCacheError):
    """A value could not be encoded (on write) or decoded (on read)."""


class ValueTooLargeError(TagCacheError, ValueError):
    """An encoded value is larger than the cache's ``max_value_size``."""


class BackendError(TagCacheError):
    """The storage backend failed (connection refused, timeout, server error).

    The backend's own exception is chained as ``__cause__``.
    """


class BackendUnavailableError(BackendError):
    """The backend's circuit breaker is open: recent calls failed or timed out, so
    calls fail at once without touching the network until a probe succeeds.

    The message says since when the breaker has been open.
    """


class PartialInvalidationError(BackendError):
    """An invalidation reached part of the namespace only: a backend spread over several
    servers (Redis Cluster) applied it on the servers that answered and failed on the others.

    :attr:`scope` names the parts (the namespace's buckets) where it may not have
    been applied. The cache re-applies it there, and meanwhile bypasses itself for
    the keys of those parts only; the other keys keep being served from the cache.
    """

    def __init__(self, message: str, scope: frozenset[int]) -> None:
        super().__init__(message)
        #: The buckets of the namespace where the invalidation may not have been applied.
        self.scope = scope


class UnsupportedArgumentError(TagCacheError, TypeError):
    """A decorated function got an argument whose type has no stable encoding in a
    default cache key; the message names the parameter and suggests ``key=`` or ``ignore=``."""


class UnsupportedOperationError(TagCacheError, NotImplementedError):
    """The backend does not offer an optional capability an operation needs
    (:meth:`tagcache.Cache.peek` or :meth:`tagcache.Cache.keys` on a backend without
    ``peek`` or ``keys``); the message names the backend and the capability."""
