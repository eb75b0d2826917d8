"""A job's strategy state: saved with every finished round, given back when the job resumes.

Strategies of our own (FedReptile) expose `state_dict()`/`load_state_dict()`: JSON-able
round bookkeeping, stored as it is. Flower's stateful strategies (FedAdam, FedYogi,
FedAdagrad, FedAvgM) keep server-side moments as arrays in attributes of their own
(`flower_adapter.strategy_arrays` knows which); without them a resumed FedAdam would
start its moments from zero and end elsewhere than a job never stopped. Those arrays go
to the artifact store as one ArrayRecord, like the round's model: written (atomic,
content-addressed) before the round's SQL commit, and named in the JSON state by
sha256, so the state committed with a round always exists and is exactly what the
strategy held after that round.
"""

from __future__ import annotations

from typing import Any, Final

from tinyfleet.common.flower_adapter import (
    array_record_from_bytes,
    array_record_to_bytes,
    has_array_state,
    load_strategy_arrays,
    strategy_arrays,
)
from tinyfleet.server.artifacts import ArtifactCorruptError, ArtifactNotFoundError, ArtifactStore

#: Key of the JSON state naming the artifact that holds a Flower strategy's arrays.
FLOWER_ARRAYS_KEY: Final = "flower-arrays"


class StrategyStateError(RuntimeError):
    """A saved strategy state that cannot be given back (its arrays are gone or do not fit)."""


def save_state(strategy: object, store: ArtifactStore) -> dict[str, Any] | None:
    """The state to commit with a finished round (None: the strategy keeps none)."""
    own: dict[str, Any] | None = strategy.state_dict() if hasattr(strategy, "state_dict") else None
    if not has_array_state(strategy):
        return own
    sha = store.put(array_record_to_bytes(strategy_arrays(strategy)))
    return {**(own or {}), FLOWER_ARRAYS_KEY: sha}


def restore_state(strategy: object, state: dict[str, Any] | None, store: ArtifactStore) -> None:
    """Give a freshly built strategy the state `save_state` took after the last finished round."""
    if state is None:
        return
    own = dict(state)
    sha = own.pop(FLOWER_ARRAYS_KEY, None)
    if sha is not None:
        try:
            load_strategy_arrays(strategy, array_record_from_bytes(store.get(sha)))
        except (ArtifactNotFoundError, ArtifactCorruptError, ValueError) as exc:
            raise StrategyStateError(
                f"cannot give {type(strategy).__name__} back its state (artifact {sha}): {exc}"
            ) from exc
    if hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict(own)
