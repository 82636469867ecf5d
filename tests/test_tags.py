"""Validation rules and glob helpers in :mod:`tagcache.tags`."""

from __future__ import annotations

import enum
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tagcache.exceptions import InvalidKeyError, InvalidTagError, InvalidTTLError
from tagcache.tags import (
    MAX_KEY_LENGTH,
    MAX_TTL,
    check_key,
    check_tags,
    glob_escape,
    glob_to_regex,
    new_token,
    ttl_seconds,
)
from tagcache.testing import memory_cache


class Color(str, enum.Enum):
    RED = "red"


def test_check_key_accepts_text_and_str_subclasses() -> None:
    assert check_key("user:1") == "user:1"
    assert check_key("ключ ✓") == "ключ ✓"
    assert check_key(Color.RED) == "red"
    assert type(check_key(Color.RED)) is str
    assert check_key("x" * MAX_KEY_LENGTH)


def test_check_key_messages_say_what_to_do() -> None:
    with pytest.raises(InvalidKeyError, match="must be str, got int"):
        check_key(5)
    with pytest.raises(InvalidKeyError, match="hashlib"):
        check_key("x" * (MAX_KEY_LENGTH + 1))
    with pytest.raises(InvalidKeyError, match="control character"):
        check_key("a\rb")


class Surrogate(str, enum.Enum):
    BAD = "user:\udc80"


@pytest.mark.parametrize("key", ["user:\ud800", "\udfff", "x" * 100 + "\ud83d", Surrogate.BAD])
def test_keys_that_cannot_be_utf8_encoded_are_rejected(key: str) -> None:
    with pytest.raises(
        InvalidKeyError, match=r"lone surrogate .* at index \d+, which cannot be encoded as UTF-8"
    ):
        check_key(key)


@pytest.mark.parametrize("tag", ["user:\ud800", "\udfff", Surrogate.BAD])
def test_tags_that_cannot_be_utf8_encoded_are_rejected(tag: str) -> None:
    with pytest.raises(InvalidTagError, match=r"lone surrogate .* cannot be encoded as UTF-8"):
        check_tags(["fine", tag])


def test_only_lone_surrogates_are_rejected() -> None:
    assert check_key("emoji:\U0001f600") == "emoji:\U0001f600"  # one astral character: valid
    assert check_tags(["emoji:\U0001f600"]) == ("emoji:\U0001f600",)
    with pytest.raises(InvalidKeyError, match="at index 6"):
        check_key("emoji:\ud83d\ude00")  # the same as two surrogate code points: not UTF-8


async def test_cache_rejects_surrogates_in_keys_and_tags() -> None:
    cache = memory_cache()
    with pytest.raises(InvalidKeyError, match="surrogate"):
        await cache.set("a\ud800", 1)
    with pytest.raises(InvalidKeyError, match="surrogate"):
        await cache.get("a\ud800")
    with pytest.raises(InvalidTagError, match="surrogate"):
        await cache.set("k", 1, tags=["t\ud800"])
    with pytest.raises(InvalidTagError, match="surrogate"):
        await cache.invalidate_tags(["t\ud800"])
    assert await cache.get("k") is None


def test_check_tags_sorts_and_dedupes() -> None:
    assert check_tags(["b", "a", "b"]) == ("a", "b")
    assert check_tags(None) == ()
    assert check_tags(()) == ()
    assert check_tags(t for t in ["x"]) == ("x",)


def test_bare_string_tags_are_rejected_with_the_fix() -> None:
    with pytest.raises(InvalidTagError, match=r"tags=\['users'\]"):
        check_tags("users")
    with pytest.raises(InvalidTagError):
        check_tags(b"users")  # type: ignore[arg-type]  # bad input on purpose
    with pytest.raises(InvalidTagError, match="iterable"):
        check_tags(5)  # type: ignore[arg-type]  # bad input on purpose


def test_ttl_seconds() -> None:
    assert ttl_seconds(None) is None
    assert ttl_seconds(5) == 5.0
    assert ttl_seconds(0.5) == 0.5
    assert ttl_seconds(timedelta(minutes=2)) == 120.0
    for bad in (-1, float("nan"), float("inf"), "5", True, timedelta(seconds=-3)):
        with pytest.raises(InvalidTTLError):
            ttl_seconds(bad)


def test_ttl_limit_is_ten_years() -> None:
    assert MAX_TTL == 10 * 365 * 86400
    assert ttl_seconds(MAX_TTL) == MAX_TTL
    assert type(ttl_seconds(MAX_TTL)) is float
    assert ttl_seconds(float(MAX_TTL)) == MAX_TTL
    assert ttl_seconds(timedelta(seconds=MAX_TTL)) == MAX_TTL
    with pytest.raises(InvalidTTLError, match="limit"):
        ttl_seconds(MAX_TTL + 1)
    with pytest.raises(InvalidTTLError, match="limit"):
        ttl_seconds(timedelta(seconds=MAX_TTL, microseconds=1))


@pytest.mark.parametrize(
    "ttl",
    [
        MAX_TTL + 1,
        MAX_TTL + 0.001,
        1e16,
        pytest.param(10**400, id="10**400"),
        pytest.param(timedelta(days=10 * 366), id="timedelta(days=3660)"),
        pytest.param(timedelta.max, id="timedelta.max"),
    ],
)
def test_ttl_above_the_limit_is_rejected(ttl: object) -> None:
    with pytest.raises(InvalidTTLError, match=rf"longer than the limit of {MAX_TTL} seconds.*pass None"):
        ttl_seconds(ttl)


def test_ttl_errors_name_the_setting_and_survive_huge_ints() -> None:
    with pytest.raises(InvalidTTLError, match=r"^lease_ttl is 1e\+16, longer than"):
        ttl_seconds(1e16, what="lease_ttl")
    with pytest.raises(InvalidTTLError, match=r"^ttl is an int of \d+ bits, longer than"):
        ttl_seconds(10**5000)  # too long for repr()
    with pytest.raises(InvalidTTLError, match=r"^ttl must not be negative, got an int of \d+ bits"):
        ttl_seconds(-(10**5000))


async def test_cache_rejects_a_too_long_ttl_and_keeps_the_value() -> None:
    cache = memory_cache()
    await cache.set("k", "old")
    with pytest.raises(InvalidTTLError, match="limit"):
        await cache.set("k", 1, ttl=1e16)
    assert await cache.get("k") == "old"
    with pytest.raises(InvalidTTLError, match=r"^default_ttl is"):
        memory_cache(default_ttl=timedelta(days=10 * 366))


def test_tokens_are_random_64_bit_hex() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in tokens)


@pytest.mark.parametrize(
    ("pattern", "matches", "rejects"),
    [
        ("user:*", ["user:", "user:1", "user:a:b"], ["users:1", "xuser:1"]),
        ("user:?", ["user:1"], ["user:12", "user:"]),
        ("k[ab]", ["ka", "kb"], ["kc", "k"]),
        ("k[^a]", ["kb"], ["ka"]),
        ("k[a-c]", ["kb"], ["kd"]),
        (r"user:\*", ["user:*"], ["user:1"]),
        ("a.b", ["a.b"], ["axb"]),
        ("k[ab", ["k[ab"], ["ka"]),
        ("k[z-a]", ["ka", "km", "kz"], ["k-", "kA"]),  # a reversed range, as Redis reads it
        ("k[]", [], ["k", "ka", "k[]"]),
        ("k[^]", ["ka", "k]"], ["k", "kab"]),
    ],
)
def test_glob_to_regex(pattern: str, matches: list[str], rejects: list[str]) -> None:
    regex = glob_to_regex(pattern)
    assert all(regex.match(m) for m in matches)
    assert not any(regex.match(r) for r in rejects)


@given(st.text(alphabet="ab-^[]\\*?", max_size=12))
def test_every_pattern_compiles(pattern: str) -> None:
    glob_to_regex(pattern)  # never re.error: keys(pattern) must not fail on a user's pattern


@given(st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), max_size=30))
def test_glob_escape_matches_only_itself(text: str) -> None:
    regex = glob_to_regex(glob_escape(text))
    assert regex.match(text)
    assert not regex.match(text + "x")
