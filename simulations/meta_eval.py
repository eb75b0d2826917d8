"""Meta-test: how well an initialisation adapts to tasks no device trained on.

Each task gives a support set (the K shots) and a query set. The model starts
from the weights under test (local layers from zero, rebuilt on the support set
when the job keeps layers local), adapts with a fixed number of full-batch steps
and learning rate, and is scored on the queries before and after. The
adaptation is `common.learning.adapt`, the very routine devices run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord

from tinyfleet.common.arrays import load_array_record
from tinyfleet.common.learning import episode_metrics, reset_local
from tinyfleet.common.models import build_model

Episode = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class TaskSet(Protocol):
    """A fixed, reproducible list of meta-test tasks."""

    def __len__(self) -> int: ...

    def episode(self, index: int) -> Episode:
        """(support_x, support_y, query_x, query_y) of task `index`, the same on every call."""
        ...


@dataclass(frozen=True)
class MetaTestProtocol:
    steps: int
    lr: float
    optimizer: str = "sgd"
    local_layers: tuple[str, ...] = ()
    reconstruct_steps: int = 0


def adapt_on_tasks(
    model_name: str,
    arrays: ArrayRecord,
    tasks: TaskSet,
    protocol: MetaTestProtocol,
    *,
    model_kwargs: dict[str, Any] | None = None,
    limit: int | None = None,
) -> list[dict[str, float]]:
    """Per-task query metrics before/after adaptation, for the first `limit` tasks (all by default)."""
    model = build_model(model_name, **(model_kwargs or {}))
    results: list[dict[str, float]] = []
    for index in range(min(len(tasks), limit) if limit else len(tasks)):
        load_array_record(model, arrays, strict=False)
        reset_local(model, protocol.local_layers)
        sx, sy, qx, qy = tasks.episode(index)
        results.append(
            episode_metrics(
                model,
                model_name,
                (sx, sy),
                (qx, qy),
                steps=protocol.steps,
                lr=protocol.lr,
                optimizer=protocol.optimizer,
                local_layers=protocol.local_layers,
                reconstruct_steps=protocol.reconstruct_steps,
            )
        )
    return results


def summarize(results: Sequence[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {"tasks": float(len(results))}
    for key in results[0]:
        values = np.array([r[key] for r in results], dtype=np.float64)
        out[key] = float(values.mean())
        out[f"{key}_ci95"] = (
            float(1.96 * values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
        )
    return out
