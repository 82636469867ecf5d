"""tagcache: async caching with O(1), race-free tag invalidation.

Quick start::

    from tagcache import Cache

    async with Cache.from_url("redis://127.0.0.1:6379/0", namespace="app") as cache:
        await cache.set("user:1", {"name": "Ada"}, ttl=600, tags=["users", "user:1"])
        await cache.get("user:1")
        await cache.invalidate_tags(["user:1"])
"""

from tagcache.backends.local import LocalCache
from tagcache.cache import Cache, EntryView
from tagcache.codec import Codec, JsonCodec, KeyBoundCodec, PickleCodec
from tagcache.decorator import CachedFunction
from tagcache.exceptions import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    InvalidKeyError,
    InvalidTagError,
    InvalidTTLError,
    PartialInvalidationError,
    SerializationError,
    TagCacheError,
    UnsupportedArgumentError,
    UnsupportedOperationError,
    ValueTooLargeError,
)
from tagcache.sentinel import MISSING, Missing
from tagcache.stats import CacheStats, FunctionStats
from tagcache.warming import CacheWarmer, JobReport, JobStats, WarmingReport

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "Cache",
    "CacheStats",
    "CacheWarmer",
    "CachedFunction",
    "Codec",
    "ConfigurationError",
    "EntryView",
    "FunctionStats",
    "InvalidKeyError",
    "InvalidTTLError",
    "InvalidTagError",
    "JobReport",
    "JobStats",
    "JsonCodec",
    "KeyBoundCodec",
    "LocalCache",
    "MISSING",
    "Missing",
    "PartialInvalidationError",
    "PickleCodec",
    "SerializationError",
    "TagCacheError",
    "UnsupportedArgumentError",
    "UnsupportedOperationError",
    "ValueTooLargeError",
    "WarmingReport",
]

__version__ = "0.1.0.dev0"
