"""What FedReptile's server and devices agree on: message types, record keys, local layers.

Both sides import this module, so neither the device code depends on the
server package nor the server on device code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

TRAIN_TYPE: Final = "train.fedreptile"
EVALUATE_TYPE: Final = "evaluate.fedreptile"
ARRAYS_KEY: Final = "arrays"  # dense global weights (down) or adapted weights (up, stock handlers)
UPDATE_KEY: Final = "update"  # codec payload of θᵢ - θ_start (up)
DELTA_KEY: Final = "delta"  # codec payload of θ - replica (down, compressed downlink)
CONFIG_KEY: Final = "config"
METRICS_KEY: Final = "metrics"
REPLICA_BASE: Final = "replica-base"  # config: replica version a delta applies to
REPLICA_VERSION: Final = "replica-version"  # config: replica version after this message


def is_local(name: str, local_layers: Sequence[str]) -> bool:
    """Whether a parameter name belongs to one of the local layers (prefix match on dotted names)."""
    return any(name == layer or name.startswith(layer + ".") for layer in local_layers)


def parse_layers(value: object) -> tuple[str, ...]:
    """Local layers as a tuple; accepts a list or a comma-separated string (job files allow both)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"local_layers must be layer names, got {value!r}")
    return tuple(i.strip() for i in items if i.strip())
