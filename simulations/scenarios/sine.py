"""Sine regression (Reptile / TinyReptile): each device observes one sine wave as a stream.

Tasks: amplitude U(0.1, 5), phase U(0, π), x U(-5, 5); model 1-64-64-1 tanh.
Meta-test: 10 samples, 32 SGD steps at lr 0.02, MSE on 50 evenly spaced points
in [-5, 5], over 200 tasks drawn from seeds no device uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tinyfleet.client.data_sources import SineStream, SineTask
from tinyfleet.common.strategy_options import FedReptileOptions
from tinyfleet.simulations.meta_eval import Episode
from tinyfleet.simulations.scenarios import Scenario

#: Seed ranges kept apart so meta-test and centralised tasks never coincide with a device's task.
DEVICE_SEED_BASE = 0
META_TEST_SEED_BASE = 10_000_000
CENTRAL_SEED_BASE = 20_000_000

#: Where this scenario departs from FedReptileOptions' defaults (TinyReptile's sine setting).
OPTIONS: dict[str, Any] = {
    "epsilon": 0.5,
    "epsilon_final": 0.0,
    "epsilon_schedule": "linear",
    "fraction_train": 0.25,  # parallel rounds (--parallel) train a quarter of the devices
}
#: The run's own knobs (RunSettings) when `sim run` leaves them out.
DEFAULTS: dict[str, Any] = {
    "rounds": 30000,
    "devices": 20,
    "eval_every": 5000,
    "eval_tasks": 50,
    "final_eval_tasks": 200,
}


@dataclass
class SineTaskSet:
    """`count` unseen sine tasks: `shots` random support points, `points` evenly spaced queries."""

    count: int
    seed: int = 0
    shots: int = 10
    points: int = 50
    _episodes: list[Episode] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        query_x = torch.linspace(-5.0, 5.0, self.points).unsqueeze(1)
        for index in range(self.count):
            gen = torch.Generator().manual_seed(META_TEST_SEED_BASE + self.seed * 100_000 + index)
            task = SineTask.sample(gen)
            support_x = torch.rand(self.shots, 1, generator=gen) * 10.0 - 5.0
            self._episodes.append((support_x, task(support_x), query_x, task(query_x)))

    def __len__(self) -> int:
        return self.count

    def episode(self, index: int) -> Episode:
        return self._episodes[index]


def build(settings: Any, options: FedReptileOptions) -> Scenario:
    seed = settings.seed
    return Scenario(
        name="sine-reptile",
        model="sine-mlp",
        device_specs=[f"sine:seed={DEVICE_SEED_BASE + seed * 100_000 + d}" for d in range(settings.devices)],
        meta_tests={"10-shot": SineTaskSet(count=settings.final_eval_tasks, seed=seed)},
        eval_steps=32,
        eval_lr=0.02,
        central_task=lambda i: SineStream(seed=CENTRAL_SEED_BASE + seed * 1_000_000 + i),
    )
