"""Reconnect delays: exponential backoff with full jitter.

A whole fleet loses its coordinator at the same moment (restart, network cut);
if every agent retried on the same schedule they would all arrive together.
Full jitter (a uniform draw between 0 and the exponential ceiling) spreads them
out, and the cap bounds how long a device stays away once the coordinator is back.
"""

from __future__ import annotations

import random

BASE_S = 0.5
CAP_S = 30.0


class Backoff:
    """`next_delay()` after each failed attempt; `reset()` after a successful Welcome."""

    def __init__(self, base_s: float = BASE_S, cap_s: float = CAP_S,
                 rng: random.Random | None = None) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError(f"backoff needs 0 < base ({base_s}) <= cap ({cap_s})")
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The largest delay the next draw may return."""
        # min() on the exponent first keeps 2**attempt from growing without bound.
        return min(self.cap_s, self.base_s * 2 ** min(self.attempt, 62))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
