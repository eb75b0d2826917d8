"""Inner-optimizer state that outlives a round.

Reptile's reference implementation keeps its inner Adam's moment estimates
across tasks (only the model's weights are reset between inner loops), so the
per-parameter step sizes reflect the long-run gradient scale instead of the
first gradients of each new task. A device is a long-lived online learner, so
it keeps that state too: across rounds in its Context, and across tasks in
centralised Reptile. The state is held by parameter name, so it survives a new
optimizer object and is dropped, not misapplied, when the model's layout changes.
It is stored as raw arrays: this runs every round, and `.npy` headers written and
parsed per tensor cost more than the training step's optimizer update.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord
from torch import nn

from tinyfleet.common.flower_adapter import array_values, raw_array

SEPARATOR = "::"


class OptimizerMemory:
    """Per-parameter optimizer state (e.g. Adam's step count and moments) by parameter name."""

    def __init__(self, values: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        self.values: dict[str, dict[str, torch.Tensor]] = values or {}

    def restore(self, optimizer: torch.optim.Optimizer, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Seed a fresh optimizer with the remembered state of every parameter whose shape still fits."""
        for name, param in named:
            held = self.values.get(name)
            if held is None or any(
                t.dim() > 0 and tuple(t.shape) != tuple(param.shape) for t in held.values()
            ):
                continue
            optimizer.state[param] = {k: t.clone() for k, t in held.items()}

    def capture(self, optimizer: torch.optim.Optimizer, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        for name, param in named:
            state = optimizer.state.get(param)
            if state:
                self.values[name] = {k: t.detach().clone() for k, t in state.items() if torch.is_tensor(t)}

    def to_record(self) -> ArrayRecord:
        return ArrayRecord(
            {
                f"{name}{SEPARATOR}{field}": raw_array(t.numpy())
                for name, fields in self.values.items()
                for field, t in fields.items()
            }
        )

    @classmethod
    def from_record(cls, record: ArrayRecord | None) -> OptimizerMemory:
        values: dict[str, dict[str, torch.Tensor]] = {}
        for key, array in (record or ArrayRecord()).items():
            name, _, field = key.rpartition(SEPARATOR)
            if not name:
                raise ValueError(f"optimizer state key {key!r} is not 'parameter{SEPARATOR}field'")
            values.setdefault(name, {})[field] = torch.from_numpy(array_values(array).copy())
        return cls(values)
