"""The circuit breaker's state machine, driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from tagcache import BackendError, BackendUnavailableError, ConfigurationError
from tagcache.backends.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(failures: int = 3, cooldown: float = 1.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(failures, cooldown, name="Redis at test", clock=clock), clock


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _ = make(failures=3)
    breaker.failure(TimeoutError("t"))
    breaker.failure(TimeoutError("t"))
    breaker.success()  # an answer in between resets the count
    breaker.failure(TimeoutError("t"))
    breaker.failure(TimeoutError("t"))
    assert breaker.closed and breaker.state == "closed"
    breaker.failure(TimeoutError("t"))
    assert not breaker.closed and breaker.state == "open"
    assert breaker.opened == 1
    assert breaker.open_since is not None


def test_open_breaker_refuses_with_a_message_saying_since_when_and_why() -> None:
    breaker, _ = make(failures=1)
    breaker.failure(ConnectionRefusedError("Connection refused"))
    assert breaker.refuses()
    with pytest.raises(BackendUnavailableError) as info:
        breaker.check()
    assert isinstance(info.value, BackendError)
    message = str(info.value)
    assert "Redis at test" in message
    assert "open since" in message
    assert "Connection refused" in message
    assert "probe" in message


def test_one_probe_after_the_cooldown_and_its_success_closes() -> None:
    breaker, clock = make(failures=1, cooldown=2.0)
    breaker.failure(TimeoutError("t"))
    clock.now += 1.9
    with pytest.raises(BackendUnavailableError):
        breaker.check()
    clock.now += 0.2
    assert not breaker.refuses()
    assert breaker.check() is True  # this caller is the probe
    assert breaker.state == "half-open"
    assert breaker.refuses()  # everyone else fails at once while it is in flight
    with pytest.raises(BackendUnavailableError, match="probe is in flight"):
        breaker.check()
    breaker.success()
    assert breaker.closed and breaker.state == "closed" and breaker.open_since is None
    assert breaker.check() is False


def test_failed_probe_opens_again_for_a_full_cooldown() -> None:
    breaker, clock = make(failures=1, cooldown=1.0)
    breaker.failure(TimeoutError("t"))
    clock.now += 1.0
    assert breaker.check() is True
    clock.now += 0.5  # the probe timed out after half a second
    breaker.failure(TimeoutError("t"))
    assert breaker.state == "open"
    assert breaker.opened == 1  # the same incident
    clock.now += 0.9
    assert breaker.refuses()
    clock.now += 0.1
    assert breaker.check() is True


def test_abandoned_probe_lets_the_next_call_probe_at_once() -> None:
    breaker, clock = make(failures=1, cooldown=5.0)
    breaker.failure(TimeoutError("t"))
    clock.now += 5.0
    assert breaker.check() is True
    breaker.abandon()  # the probing caller was cancelled
    assert breaker.check() is True


def test_state_changes_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    breaker, clock = make(failures=2, cooldown=1.0)
    with caplog.at_level(logging.INFO, logger="tagcache"):
        for _ in range(10):
            breaker.failure(TimeoutError("t"))
        for _ in range(3):  # probes that fail: the same incident, not logged again as opening
            clock.now += 1.0
            assert breaker.check() is True
            breaker.failure(TimeoutError("t"))
        clock.now += 1.0
        assert breaker.check() is True
        breaker.success()
        breaker.success()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    recovered = [r for r in caplog.records if "closed" in r.getMessage()]
    assert len(errors) == 1 and "circuit breaker open" in errors[0].getMessage()
    assert len(recovered) == 1


@pytest.mark.parametrize(
    ("failures", "cooldown"), [(0, 1.0), (-1, 1.0), (1.5, 1.0), (3, 0), (3, -1), (3, float("nan")), (3, True)]
)
def test_bad_settings_are_configuration_errors(failures: object, cooldown: object) -> None:
    with pytest.raises(ConfigurationError):
        CircuitBreaker(failures, cooldown)  # type: ignore[arg-type]  # deliberately wrong types
