from __future__ import annotations

import random

import pytest

from tinyfleet.client.backoff import Backoff


def test_delays_are_jittered_below_a_doubling_ceiling_that_caps() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(1))
    ceilings, delays = [], []
    for _ in range(12):
        ceilings.append(backoff.ceiling())
        delays.append(backoff.next_delay())
    assert ceilings[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert set(ceilings[6:]) == {30.0}
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # full jitter: no two attempts wait the same


def test_jitter_spreads_over_the_whole_range() -> None:
    backoff = Backoff(1.0, 1.0, random.Random(2))
    draws = [backoff.next_delay() for _ in range(400)]
    assert min(draws) < 0.1 and max(draws) > 0.9  # uniform over [0, ceiling], not clustered


def test_reset_after_success_starts_over() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(3))
    for _ in range(20):
        backoff.next_delay()
    assert backoff.ceiling() == 30.0
    backoff.reset()
    assert backoff.ceiling() == 0.5 and backoff.next_delay() <= 0.5


def test_many_failures_stay_bounded() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(4))
    assert max(backoff.next_delay() for _ in range(5000)) <= 30.0


def test_same_seed_same_schedule() -> None:
    a, b = Backoff(rng=random.Random(9)), Backoff(rng=random.Random(9))
    assert [a.next_delay() for _ in range(5)] == [b.next_delay() for _ in range(5)]


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (2.0, 1.0), (-1.0, 5.0)])
def test_nonsense_settings_are_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base, cap)
