"""The update guard: a train reply whose update is too large for the global model is dropped.

One rule for every strategy (job option `[round] max_update_ratio = r`, off by default):

    ||θᵢ - θ|| <= r · ||θ||        (L2 norms over the tensors the update covers)

A device that scales its weights by 1000 moves FedAvg's mean by ~333x its own
size; Flower's averaging strategies take every reply at face value, so one such
reply ruins the model. The bound is relative because model scales differ; robust
aggregation (FedMedian, Krum, ...) stays a choice of strategy, this only refuses
replies no honest round produces.

What "the update" is depends on what the reply carries:

* "update" (FedReptile, `reptile_protocol.UPDATE_KEY`): a `common.codec` payload
  (dense, top-P% sparse or int8) holding θᵢ - θ_start, where θ_start is the model
  the device started from (the global model, or its replica plus the compressed
  downlink delta). The payload is decoded against the global part's layout (the
  model minus the strategy's local layers, which never leave the device) and IS
  the update: what aggregation will add. Its raw bytes are not weights.
* "arrays" (Flower's convention: FedAvg and the stock strategies, FedReptile's
  stock-handler replies): the device's weights θᵢ; the update is θᵢ - θ over the
  tensors it carries, local layers excluded.

A reply carrying neither (prototypes, metrics only) has no weight update to
bound. FleetGrid applies the guard as a reply arrives, so a dropped reply is an
error reply the strategy skips and the round's node results record the ratio
found and the bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from tinyfleet.common import codec
from tinyfleet.common.arrays import InvalidUpdateError
from tinyfleet.common.flower_adapter import array_values
from tinyfleet.common.reptile_protocol import ARRAYS_KEY, UPDATE_KEY, is_local, parse_layers


@dataclass(frozen=True)
class UpdateGuard:
    max_ratio: float
    #: Layers that stay on the devices (a strategy's `local_layers`): not part of any update.
    local_layers: tuple[str, ...] = ()

    def check(self, content: RecordDict, global_model: ArrayRecord) -> str:
        """'' when the reply may be aggregated, else why it is dropped (ratio found and bound).
        A payload that cannot be measured raises InvalidUpdateError naming the problem."""
        ratio = self.ratio(content, global_model)
        if ratio is None or ratio <= self.max_ratio:
            return ""
        return (
            f"update norm is {ratio:.4g}x the global model's, above max_update_ratio "
            f"{self.max_ratio:g}; dropped"
        )

    def ratio(self, content: RecordDict, global_model: ArrayRecord) -> float | None:
        """||update|| / ||θ|| over the tensors the update covers; None when the reply carries none."""
        theta = {
            k: array_values(v) for k, v in global_model.items() if not is_local(k, self.local_layers)
        }
        records = content.array_records
        if UPDATE_KEY in records:
            layout = codec.Layout.of({k: tuple(v.shape) for k, v in theta.items()})
            try:
                update = codec.decode(records[UPDATE_KEY], layout)
            except codec.CodecError as exc:
                raise InvalidUpdateError(f"update {UPDATE_KEY!r} cannot be measured: {exc}") from exc
            covered = list(update)
        elif ARRAYS_KEY in records:
            weights = records[ARRAYS_KEY]
            covered = [k for k in weights if k in theta]
            update = {k: array_values(weights[k]).astype(np.float64) - theta[k] for k in covered}
        else:
            return None
        return _ratio(_norm(update.values()), _norm(theta[k] for k in covered))


def _norm(arrays: Iterable[np.ndarray]) -> float:
    """L2 norm of the tensors taken as one vector, in float64 (float32 squares overflow)."""
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays))


def _ratio(update_norm: float, model_norm: float) -> float:
    if model_norm > 0:
        return update_norm / model_norm
    return math.inf if update_norm > 0 else 0.0


def guard_for(max_ratio: float | None, strategy: object) -> UpdateGuard | None:
    """The job's guard (None when `max_update_ratio` is not set); a strategy's `local_layers`
    (FedReptile's TinyMetaFed option) are left out of the norms."""
    if max_ratio is None:
        return None
    return UpdateGuard(float(max_ratio), parse_layers(getattr(strategy, "local_layers", None)))
