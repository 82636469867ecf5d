"""A circuit breaker for a backend that talks to a server.

A server that refuses connections fails fast by itself; one that hangs
(paused, overloaded, behind a network partition) makes every call wait its
timeout. The breaker bounds what a bad day costs: after ``failures``
consecutive failed calls it *opens*, and while open no call touches the
network (each raises :class:`~tagcache.BackendUnavailableError` at once, so
fail-open callers run their loader without waiting). After ``cooldown``
seconds it lets *one* call through as a probe (*half-open*); the probe's
success closes it, its failure opens it again for another cool-down.

Only transport failures count (connection refused or reset, timeouts): a
server that answers with an error reply is up. Each state change is logged
once, on the ``tagcache`` logger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from tagcache.exceptions import BackendUnavailableError, ConfigurationError

__all__ = ["CircuitBreaker"]

logger: Final = logging.getLogger("tagcache")

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half-open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single probe after a cool-down.

    Args:
        failures: consecutive failed calls that open the breaker (reads
            batched into one round trip count one each).
        cooldown: seconds the breaker stays open before letting one probe through.
        name: what the breaker guards, for log lines and error messages
            (e.g. ``"Redis at 127.0.0.1:6379"``).
        clock: monotonic seconds (tests drive it by hand).

    The hot path reads only :attr:`closed` and :attr:`failing`: while both say
    all is well, a call costs two attribute reads.
    """

    __slots__ = (
        "_clock",
        "_last_error",
        "_opened_at",
        "_opened_wall",
        "_probing",
        "closed",
        "cooldown",
        "failing",
        "name",
        "opened",
        "threshold",
    )

    def __init__(
        self,
        failures: int = 3,
        cooldown: float = 1.0,
        *,
        name: str = "the backend",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if type(failures) is not int or failures < 1:
            raise ConfigurationError(f"breaker failures must be a positive int, got {failures!r}")
        if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)) or not 0 < cooldown <= 3600:
            raise ConfigurationError(f"breaker cooldown must be seconds in (0, 3600], got {cooldown!r}")
        self.threshold = failures
        self.cooldown = float(cooldown)
        self.name = name
        self._clock = clock
        #: True while the breaker is closed (calls go through).
        self.closed = True
        #: Consecutive failures so far (0 while all is well).
        self.failing = 0
        #: How many times the breaker opened.
        self.opened = 0
        self._opened_at = 0.0
        self._opened_wall: float | None = None
        self._probing = False
        self._last_error = ""

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (a probe is in flight)."""
        if self.closed:
            return CLOSED
        return HALF_OPEN if self._probing else OPEN

    @property
    def open_since(self) -> float | None:
        """Unix time the breaker opened, or ``None`` while closed."""
        return None if self.closed else self._opened_wall

    def check(self) -> bool:
        """Called before a round trip while :attr:`closed` is false.

        Returns ``True`` when this call is the probe (it must end with
        :meth:`success`, :meth:`failure` or :meth:`abandon`); raises
        :class:`~tagcache.BackendUnavailableError` when the call must not
        touch the network.
        """
        if self.closed:
            return False
        now = self._clock()
        if not self._probing and now - self._opened_at >= self.cooldown:
            self._probing = True
            logger.info("tagcache: %s: circuit breaker half-open, probing", self.name)
            return True
        raise self.error(now)

    def refuses(self) -> bool:
        """Whether a call must fail at once now, without waiting in any queue: the
        breaker is open and either cooling down or already probing. (Taking the
        probe is :meth:`check`'s job, right before the round trip.)"""
        if self.closed:
            return False
        return self._probing or self._clock() - self._opened_at < self.cooldown

    def error(self, now: float | None = None) -> BackendUnavailableError:
        """The error a call gets while the breaker is open."""
        if now is None:
            now = self._clock()
        opened = self._opened_wall or time.time()
        wait = max(0.0, self._opened_at + self.cooldown - now)
        return BackendUnavailableError(
            f"{self.name} is unavailable: the circuit breaker has been open since "
            f"{time.strftime('%H:%M:%S', time.localtime(opened))} ({time.time() - opened:.1f} s) after "
            f"{self.threshold} consecutive failures (last: {self._last_error}); calls fail at once "
            + ("while a probe is in flight" if self._probing else f"until a probe in {wait:.1f} s succeeds")
        )

    def success(self) -> None:
        """Record a round trip that got its replies."""
        self.failing = 0
        if not self.closed:
            self.closed = True
            self._probing = False
            logger.warning("tagcache: %s answers again: circuit breaker closed", self.name)

    def failure(self, exc: BaseException, calls: int = 1) -> None:
        """Record ``calls`` calls that failed in transport (refused, reset, timed out):
        a round trip, or reads that were queued behind one and failed with it."""
        self.failing += calls
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self.closed:
            if self.failing >= self.threshold:
                self._open()
                logger.error(
                    "tagcache: %s failing (%s): circuit breaker open; calls fail at once for %.1f s, "
                    "then one probe is let through",
                    self.name,
                    self._last_error,
                    self.cooldown,
                )
        elif self._probing:
            self._probing = False
            self._opened_at = self._clock()  # another cool-down, same incident: not logged again

    def abandon(self) -> None:
        """The probe ended without an answer either way (cancelled): let the next call probe."""
        if self._probing:
            self._probing = False
            self._opened_at = self._clock() - self.cooldown

    def _open(self) -> None:
        self.closed = False
        self._probing = False
        self.opened += 1
        self._opened_at = self._clock()
        self._opened_wall = time.time()

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name}, {self.state}, failing={self.failing}, opened={self.opened})"
