"""Fill signals shared by the backends: how a :class:`~tagcache.backends.base.FillWatch`
registers interest in a key and waits for it in this process.

A backend keeps a ``dict`` of :class:`KeySignal` per watched key and calls
:meth:`KeySignal.fire` when the key is filled, released, set or deleted (the
Redis backend when a notification arrives). A signal fired after a watch was
entered and before its ``wait`` is kept by the generation counter.

Signals survive a change of event loop (a backend used under successive
``asyncio.run`` calls): a waiter's future belongs to the loop that waits,
and a future left by an earlier loop is replaced rather than awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from types import TracebackType
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class KeySignal:
    """The fill signals of one watched key: a generation counter and the future
    its current waiters await (replaced at each signal)."""

    __slots__ = ("future", "gen", "refs")

    def __init__(self) -> None:
        self.gen = 0
        self.future: asyncio.Future[None] | None = None
        # Watches entered on the key; the record is dropped when none is left.
        self.refs = 0

    def fire(self) -> None:
        """Wake every waiter of the key and count the signal."""
        self.gen += 1
        fut = self.future
        if fut is not None:
            self.future = None
            # A future of a closed event loop (its waiters are gone with it) cannot
            # schedule their wake-up: leave it.
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_result(None)


class SignalWatch(Generic[K]):
    """The in-process half of a fill watch: registration in ``signals`` under ``ident``
    and waiting. Backends subclass it to make their signal channel ready on entry."""

    __slots__ = ("_ident", "_seen", "_signal", "_signals")

    def __init__(self, signals: dict[K, KeySignal], ident: K) -> None:
        self._signals = signals
        self._ident = ident
        self._signal: KeySignal | None = None
        self._seen = 0

    def _join(self) -> None:
        if self._signal is not None:
            raise RuntimeError("this watch is already entered")
        signal = self._signals.get(self._ident)
        if signal is None:
            signal = self._signals[self._ident] = KeySignal()
        signal.refs += 1
        self._signal = signal
        self._seen = signal.gen

    def _leave(self) -> None:
        signal, self._signal = self._signal, None
        if signal is None:
            return
        signal.refs -= 1
        if signal.refs <= 0 and self._signals.get(self._ident) is signal:
            del self._signals[self._ident]

    async def __aenter__(self) -> SignalWatch[K]:
        """Register interest in the key."""
        self._join()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Drop the interest in the key."""
        self._leave()

    async def wait(self, timeout: float) -> bool:
        """Wait until the key is signalled since the watch was entered (or since the
        previous ``wait`` returned ``True``); ``False`` after ``timeout`` seconds without.

        Also returns ``True`` when the backend is closed or (on Redis) its
        notification connection is lost: a signal may have been missed, and the
        caller reads the key again either way.
        """
        signal = self._signal
        if signal is None:
            raise RuntimeError("enter the watch (async with) before waiting")
        if signal.gen == self._seen and timeout > 0:
            fut = signal.future
            loop = asyncio.get_running_loop()
            if fut is None or fut.get_loop() is not loop:
                # (A future of an earlier event loop is replaced: its waiters are gone.)
                fut = signal.future = loop.create_future()
            await asyncio.wait((fut,), timeout=timeout)
        if signal.gen != self._seen:
            self._seen = signal.gen
            return True
        return False
