"""Time, passed in: the worker schedules its periodic work (commits, progress reports; timers
and triggers later) on a :class:`Clock`, so that a test can move time by hand
(:class:`ManualClock`, used by streamcore.testing.TestDriver) instead of waiting for it.
Liveness checks (health, the group's poll interval) stay on the real clock: they watch the
process, not the job."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from abc import ABC, abstractmethod

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(ABC):
    @abstractmethod
    def now_ms(self) -> int:
        """Wall-clock time in milliseconds since the epoch (record timestamps)."""

    @abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Return once seconds of this clock's time have passed."""


class SystemClock(Clock):
    def now_ms(self) -> int:
        return int(time.time() * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock(Clock):
    """Time that moves only when :meth:`advance` is called. Sleepers whose time has come are
    woken by :meth:`advance`; call it on the thread of the event loop they sleep on (the
    test driver's thread, between runs of its loop)."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now = start_ms / 1000
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now_ms(self) -> int:
        return round(self._now * 1000)

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    def next_wakeup(self) -> float | None:
        """Seconds from now until the earliest sleeper is due (None: nobody sleeps)."""
        while self._sleepers and self._sleepers[0][2].done():  # cancelled sleepers
            heapq.heappop(self._sleepers)
        return max(0.0, self._sleepers[0][0] - self._now) if self._sleepers else None

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come (once each: a sleeper
        that sleeps again is woken by a later advance)."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
