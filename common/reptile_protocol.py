"""What FedReptile's server and devices agree on: message types, record keys, local layers.

Both sides import this module, so neither the device code depends on the
server package nor the server on device code. Flower's own keys ("arrays",
"config", "metrics", "server-round") are `tinyfleet.common.message_keys`'.

With a compressed downlink the train messages are *stateful*. A **sync** is one
dense copy of θ (the device's replica) plus the static config (everything in the
ConfigRecord but `PER_MESSAGE_KEYS`: model, inner loop, compression), sent together
under a sync id. Until the next sync, a message carries only `PER_MESSAGE_KEYS`
and a delta against the replica the device made in round `REPLICA_BASE`; the
device keeps replica and config in its Context state. The sync id changes with
the static config and with every coordinator session, so a changed config or a
resumed coordinator resyncs, and a device whose state does not match (restart,
missed reply) refuses the message, after which the server resyncs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from tinyfleet.common.message_keys import SERVER_ROUND_KEY

TRAIN_TYPE: Final = "train.fedreptile"
EVALUATE_TYPE: Final = "evaluate.fedreptile"
UPDATE_KEY: Final = "update"  # codec payload of θᵢ - θ_start (up), instead of "arrays"
DELTA_KEY: Final = "delta"  # codec payload of θ - replica (down, compressed downlink), instead of "arrays"
SYNC_KEY: Final = "sync"  # config: the sync (static config + replica lineage) a stateful message belongs to
REPLICA_BASE: Final = "replica-base"  # config: the round whose replica a delta applies to
#: config keys that change every message; SERVER_ROUND_KEY also names the replica a round leaves behind
PER_MESSAGE_KEYS: Final = (SERVER_ROUND_KEY, SYNC_KEY, REPLICA_BASE)


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
