"""Simulation scenarios: a fleet of devices, a model, and the meta-test that scores it.

`tinyfleet sim run NAME` looks scenarios up here. Each module defines where its
FedReptile options depart from `FedReptileOptions`' defaults (`OPTIONS`), the
defaults of the run's own knobs (`DEFAULTS`: rounds, devices, meta-tests) and
`build(settings, options)`, returning a `Scenario`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinyfleet.client.meta_learners import Stream
from tinyfleet.simulations.meta_eval import TaskSet

#: scenario name -> module (imported on demand: omniglot loads data, sine does not)
SCENARIOS: dict[str, str] = {
    "sine-reptile": "tinyfleet.simulations.scenarios.sine",
    "omniglot-reptile": "tinyfleet.simulations.scenarios.omniglot",
    # scenarios with their own `run` (tinyfleet.simulations.prototype_runs), not FedReptile experiments
    "omniglot-protonet": "tinyfleet.simulations.scenarios.omniglot_protonet",
    "omniglot-recon": "tinyfleet.simulations.scenarios.omniglot_recon",
    "keywords-proto": "tinyfleet.simulations.scenarios.keywords_proto",
    "occupancy-online": "tinyfleet.simulations.scenarios.occupancy_online",
}


@dataclass
class Scenario:
    name: str
    model: str
    device_specs: list[str]
    meta_tests: dict[str, TaskSet]  # name (e.g. "1-shot") -> fixed unseen tasks
    eval_steps: int
    eval_lr: float
    central_task: Callable[[int], Stream]  # i -> stream of the i-th fresh training task
    episodic: bool = False  # devices start a new task each round (new_task())
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    main_metric: str = "loss_after"  # what the headline and targets read


def scenario_module(name: str) -> Any:
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(sorted(SCENARIOS))}")
    return importlib.import_module(SCENARIOS[name])
