"""Centralised Reptile: the upper bound the federated variants are measured against.

One process sees a fresh task from the whole training distribution every time
(no device boundaries, no communication) and applies the same inner loop and
the same ε schedule as FedReptile, so the gap between the two is what the fleet
costs: fixed, non-IID devices and compressed updates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord

from tinyfleet.common.arrays import from_numpy_dict, to_numpy_dict
from tinyfleet.common.learning import Sampler, adapt, loss_fn, reset_local
from tinyfleet.common.models import build_model
from tinyfleet.common.optimizer_memory import OptimizerMemory
from tinyfleet.common.reptile_protocol import is_local
from tinyfleet.common.strategy_options import FedReptileOptions


def central_reptile(
    model_name: str,
    arrays: ArrayRecord,
    task: Callable[[int], Sampler],
    rounds: int,
    options: FedReptileOptions,
    *,
    tasks_per_round: int = 1,
    memory: OptimizerMemory | None = None,
    first_round: int = 1,
    model_kwargs: dict[str, Any] | None = None,
    on_round: Callable[[int, Callable[[], ArrayRecord]], bool | None] | None = None,
) -> ArrayRecord:
    """Run rounds `first_round`..`rounds` of Reptile from `arrays` with FedReptile's inner loop,
    local layers and ε schedule (`options`); `task(i)` returns the sampler of the i-th training
    task. Returns the model.

    With `memory` the one learner's inner optimizer state spans tasks (Reptile keeps
    Adam's moments); the caller holds it, so it can checkpoint it between rounds.
    `on_round(round, current)` may return True to stop; `current()` builds the
    model's ArrayRecord only when the caller needs it (e.g. to evaluate).
    """
    model = build_model(model_name, **(model_kwargs or {}))
    local_layers = options.local_layers
    theta = {k: torch.from_numpy(v) for k, v in to_numpy_dict(arrays).items()}
    keys = [k for k in theta if not is_local(k, local_layers)]
    criterion = loss_fn(model_name)
    counter = (first_round - 1) * tasks_per_round  # task i is the same task whenever it is drawn
    for server_round in range(first_round, rounds + 1):
        step = {k: torch.zeros_like(theta[k]) for k in keys}
        for _ in range(tasks_per_round):
            model.load_state_dict(theta, strict=False)
            reset_local(model, local_layers)
            adapt(
                model,
                task(counter),
                steps=options.inner_steps,
                lr=options.inner_lr,
                batch=options.inner_batch,
                criterion=criterion,
                optimizer=options.inner_optimizer,
                local_layers=local_layers,
                reconstruct_steps=options.reconstruct_steps,
                memory=memory,
            )
            counter += 1
            adapted = model.state_dict()
            for k in keys:
                step[k] += adapted[k].detach() - theta[k]
        eps = options.epsilon_for(server_round)
        for k in keys:
            theta[k] = theta[k] + eps * step[k] / tasks_per_round
        if on_round is not None and on_round(server_round, lambda: _record(theta)):
            break
    return _record(theta)


def _record(theta: dict[str, torch.Tensor]) -> ArrayRecord:
    return from_numpy_dict({k: v.numpy() for k, v in theta.items()})
