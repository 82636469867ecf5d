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
    check_key,
    check_tags,
    glob_escape,
    glob_to_regex,
    new_token,
    ttl_seconds,
)


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
    ],
)
def test_glob_to_regex(pattern: str, matches: list[str], rejects: list[str]) -> None:
    regex = glob_to_regex(pattern)
    assert all(regex.match(m) for m in matches)
    assert not any(regex.match(r) for r in rejects)


@given(st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cs"]), max_size=30))
def test_glob_escape_matches_only_itself(text: str) -> None:
    regex = glob_to_regex(glob_escape(text))
    assert regex.match(text)
    assert not regex.match(text + "x")
