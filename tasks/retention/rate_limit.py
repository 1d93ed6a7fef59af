"""Pacing for deletes, so that maintenance never starves the heartbeats of user flows.

- `TokenBucket`: at most `rate` runs per second on average, with at most one second of
  burst. A batch bigger than the bucket simply waits longer (the bucket goes into debt).
- `Throttle`: the bucket plus adaptive back-off. When a batch takes much longer than the
  running median of recent batches (the database or the API is struggling), or the API
  answers 429/5xx or times out, the rate is halved; healthy batches win it back slowly.
  With no configured limit, back-off starts from the rate recent batches sustained.
- `Deadline`: `max_minutes`, checked at batch boundaries only, so work stops cleanly.

The clock and the sleep are injectable so that the rules can be checked without waiting.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# A batch slower than this many times the recent median means "back off".
SLOW_FACTOR = 3.0
# Below this, latency noise (scheduling, a GC pause) is not a sign of load.
SLOW_FLOOR_SECONDS = 0.2
RECENT_BATCHES = 20
# Never slow below this share of the configured rate; recover by this factor per healthy batch.
MINIMUM_SHARE = 1 / 64
RECOVERY_FACTOR = 1.25


class TokenBucket:
    """Average `rate` tokens per second, burst of at most one second's worth; 0 means unlimited."""

    def __init__(self, rate: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._tokens = rate
        self._refilled_at = clock()

    async def acquire(self, tokens: float) -> float:
        """Take `tokens`, waiting as long as the rate requires; returns the seconds waited."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now
        self._tokens -= tokens
        if self._tokens >= 0:
            return 0.0
        wait = -self._tokens / self.rate
        await self._sleep(wait)
        return wait


class Throttle:
    """A token bucket whose rate falls when batches slow down or the API pushes back."""

    def __init__(self, rate: float, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.configured_rate = rate
        self.share = 1.0
        self.slowdowns = 0
        self.waited_seconds = 0.0
        self._bucket = TokenBucket(rate, clock=clock, sleep=sleep)
        self._sleep = sleep
        self._recent: deque[float] = deque(maxlen=RECENT_BATCHES)

    @property
    def current_rate(self) -> float:
        return self._bucket.rate

    async def before_batch(self, runs: int) -> None:
        self.waited_seconds += await self._bucket.acquire(runs)

    def after_batch(self, seconds: float, runs: int) -> None:
        """Record how long a batch of `runs` took; back off if it was far slower than usual."""
        per_run = seconds / max(runs, 1)
        slow = (
            len(self._recent) >= 3
            and seconds > SLOW_FLOOR_SECONDS
            and per_run > SLOW_FACTOR * statistics.median(self._recent)
        )
        self._recent.append(per_run)
        if slow:
            self.slow_down()
        else:
            self._set_share(min(1.0, self.share * RECOVERY_FACTOR))

    def slow_down(self) -> None:
        self.slowdowns += 1
        self._set_share(max(MINIMUM_SHARE, self.share / 2))

    async def after_pushback(self, attempt: int) -> None:
        """The API answered 429/5xx or timed out: slow down, and wait before trying again."""
        self.slow_down()
        delay = min(30.0, 0.5 * 2**attempt)
        self.waited_seconds += delay
        await self._sleep(delay)

    def _set_share(self, share: float) -> None:
        self.share = share
        if self.configured_rate > 0:
            self._bucket.rate = self.configured_rate * share
        elif share >= 1.0:
            self._bucket.rate = 0.0
        elif self._recent:
            # Unlimited until now: slow down from what the system has just sustained.
            self._bucket.rate = share / max(statistics.median(self._recent), 1e-6)


class Deadline:
    """`max_minutes` from now (None: no limit)."""

    def __init__(self, minutes: float | None, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._ends_at = None if minutes is None else clock() + minutes * 60

    @property
    def passed(self) -> bool:
        return self._ends_at is not None and self._clock() >= self._ends_at
