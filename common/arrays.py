"""Moving weights between torch modules and Flower ArrayRecords, and checking them."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from tinyfleet.common.flower_adapter import array_values


class InvalidUpdateError(ValueError):
    """An update that must not be aggregated (NaN/Inf, wrong keys or shapes)."""


def to_array_record(module_or_state: nn.Module | dict[str, torch.Tensor]) -> ArrayRecord:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def load_array_record(module: nn.Module, record: ArrayRecord, *, strict: bool = True) -> None:
    """Load arrays into a module; with strict=False, keys the record lacks keep their values."""
    state = {k: torch.as_tensor(v.numpy().copy()) for k, v in record.items()}
    module.load_state_dict(state, strict=strict)


def to_numpy_dict(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def from_numpy_dict(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def check_finite(record: ArrayRecord) -> None:
    """Raise InvalidUpdateError naming the first array that holds NaN or Inf or does not load."""
    for key, array in record.items():
        try:
            values = array_values(array)
        except (TypeError, ValueError) as exc:
            raise InvalidUpdateError(f"array {key!r} does not load: {exc}") from exc
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise InvalidUpdateError(f"array {key!r} holds {bad} NaN/Inf value(s)")


def check_compatible(record: ArrayRecord, reference: ArrayRecord) -> None:
    """Raise InvalidUpdateError when keys or shapes differ from the global model's."""
    missing = set(reference.keys()) - set(record.keys())
    extra = set(record.keys()) - set(reference.keys())
    if missing or extra:
        raise InvalidUpdateError(
            f"update keys differ from the model: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for key, array in record.items():
        if tuple(array.shape) != tuple(reference[key].shape):
            raise InvalidUpdateError(
                f"array {key!r} has shape {tuple(array.shape)}, model has {tuple(reference[key].shape)}"
            )
