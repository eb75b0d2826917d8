"""Moving weights between torch modules, numpy and Flower ArrayRecords, and checking them.

Every module that turns numpy arrays into a record, reads a record back, or checks
a record against the model it belongs to does it here, so a record is built and
checked the same way on the devices, the coordinator and in the simulations.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.typing import DTypeLike
from torch import nn

from tinyfleet.common.flower_adapter import array_values

#: Anything with a shape: a tensor, a numpy array, a Flower Array, or the shape itself.
Shaped = np.ndarray | torch.Tensor | Array | tuple[int, ...]


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
    """The record's arrays as writable numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def from_numpy_dict(arrays: Mapping[str, np.ndarray], dtype: DTypeLike | None = None) -> ArrayRecord:
    """A record of Flower's own (.npy) Arrays holding the values in C order, converted to `dtype` if given."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=dtype)) for k, v in arrays.items()})


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


def check_compatible(
    found: Mapping[str, Shaped], expected: Mapping[str, Shaped], *, what: str = "update"
) -> None:
    """Raise InvalidUpdateError unless `found` holds exactly the tensors of `expected`, same shapes;
    `what` names the record in the message ("update", "'arrays'", ...)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise InvalidUpdateError(
            f"{what} does not match the global model's tensors: "
            f"missing {_some(missing)}, unexpected {_some(extra)}"
        )
    for key, reference in expected.items():
        shape, wanted = _shape(found[key]), _shape(reference)
        if shape != wanted:
            raise InvalidUpdateError(f"{what} array {key!r} has shape {shape}, the model's is {wanted}")


def _shape(value: Shaped) -> tuple[int, ...]:
    return tuple(int(d) for d in (value if isinstance(value, tuple) else value.shape))


def _some(names: list[str], shown: int = 5) -> str:
    """A few names of a possibly long list (a reply may carry thousands of keys)."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{names[:shown]}{more}"
