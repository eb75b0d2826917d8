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

With the guard on, a train reply must carry exactly the one ArrayRecord the
strategy aggregates (`records`): "update" or "arrays" for FedReptile, the
strategy's `arrayrecord_key` ("arrays") for Flower's stock strategies, whose
aggregation takes whatever single ArrayRecord the first reply names. An "arrays"
record must hold the global model's keys (local layers aside) with its shapes.
Anything else (another record name, extra records, disjoint keys) cannot be
measured and is dropped with the reason: measuring only what is recognised let
such a reply through unbounded, becoming the global model when it was the only
valid reply and failing the round's aggregation when it was not. FleetGrid
applies the guard as a reply arrives, so a dropped reply is an error reply the
strategy skips and the round's node results record why.

Not bounded here: the weight a reply claims (`num-examples` in its metrics). A
device that inflates it dominates a weighted mean with an update inside the
bound; against that, robust aggregation (FedMedian, Krum, ...) is the
strategy's choice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from tinyfleet.common import codec
from tinyfleet.common.arrays import InvalidUpdateError, check_compatible
from tinyfleet.common.flower_adapter import array_values
from tinyfleet.common.message_keys import ARRAYS_KEY
from tinyfleet.common.reptile_protocol import UPDATE_KEY, is_local, parse_layers
from tinyfleet.server.strategies.fedreptile import FedReptile


@dataclass(frozen=True)
class UpdateGuard:
    max_ratio: float
    #: Layers that stay on the devices (a strategy's `local_layers`): not part of any update.
    local_layers: tuple[str, ...] = ()
    #: The ArrayRecord names the strategy aggregates from a train reply; a reply carries exactly one.
    records: tuple[str, ...] = (ARRAYS_KEY,)

    def check(self, content: RecordDict, global_model: ArrayRecord) -> str:
        """'' when the reply may be aggregated, else why it is dropped (ratio found and bound).
        A reply whose update cannot be measured raises InvalidUpdateError naming the problem."""
        ratio = self.ratio(content, global_model)
        if ratio <= self.max_ratio:
            return ""
        return (
            f"update norm is {ratio:.4g}x the global model's, above max_update_ratio "
            f"{self.max_ratio:g}; dropped"
        )

    def ratio(self, content: RecordDict, global_model: ArrayRecord) -> float:
        """||update|| / ||θ|| over the global model's tensors (local layers aside)."""
        theta = {
            k: array_values(v) for k, v in global_model.items() if not is_local(k, self.local_layers)
        }
        name, record = self._the_record(content)
        if name == UPDATE_KEY:
            layout = codec.Layout.of({k: tuple(v.shape) for k, v in theta.items()})
            try:
                update = codec.decode(record, layout)
            except codec.CodecError as exc:
                raise InvalidUpdateError(f"update {UPDATE_KEY!r} cannot be measured: {exc}") from exc
        else:
            weights = {k: v for k, v in record.items() if not is_local(k, self.local_layers)}
            check_compatible(weights, theta, what=repr(name))  # what is not measured must not be aggregated
            update = {k: array_values(weights[k]).astype(np.float64) - theta[k] for k in theta}
        return _ratio(_norm(update.values()), _norm(theta[k] for k in update))

    def _the_record(self, content: RecordDict) -> tuple[str, ArrayRecord]:
        """The one ArrayRecord the strategy will aggregate; any other shape of reply is refused."""
        names = sorted(content.array_records)
        if len(names) != 1 or names[0] not in self.records:
            wanted = " or ".join(repr(r) for r in self.records)
            found = ", ".join(repr(n) for n in names) or "none"
            raise InvalidUpdateError(
                f"train reply must carry exactly one ArrayRecord, {wanted}; it carries {found}"
            )
        return names[0], content.array_records[names[0]]


def _norm(arrays: Iterable[np.ndarray]) -> float:
    """L2 norm of the tensors taken as one vector, in float64 (float32 squares overflow)."""
    return math.sqrt(sum(float(np.square(a, dtype=np.float64).sum()) for a in arrays))


def _ratio(update_norm: float, model_norm: float) -> float:
    if model_norm > 0:
        return update_norm / model_norm
    return math.inf if update_norm > 0 else 0.0


def guard_for(max_ratio: float | None, strategy: object) -> UpdateGuard | None:
    """The job's guard (None when `max_update_ratio` is not set); a strategy's `local_layers`
    (FedReptile's TinyMetaFed option) are left out of the norms. FedReptile aggregates an
    "update" payload (or "arrays" from stock handlers); other strategies the ArrayRecord named
    by their `arrayrecord_key` (Flower's stock strategies: "arrays")."""
    if max_ratio is None:
        return None
    if isinstance(strategy, FedReptile):
        records: tuple[str, ...] = (UPDATE_KEY, ARRAYS_KEY)
    else:
        records = (str(getattr(strategy, "arrayrecord_key", ARRAYS_KEY)),)
    return UpdateGuard(
        float(max_ratio), parse_layers(getattr(strategy, "local_layers", None)), records
    )
