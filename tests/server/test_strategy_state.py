"""The state committed with a round: our strategies' JSON as it was, Flower's arrays by artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from tinyfleet.common import flower_adapter as fa
from tinyfleet.server.artifacts import ArtifactStore
from tinyfleet.server.strategies import FedReptile
from tinyfleet.server.strategy_state import (
    FLOWER_ARRAYS_KEY,
    StrategyStateError,
    restore_state,
    save_state,
)


def _moments(strategy: FedAdam) -> None:
    strategy.m_t = {"w": np.arange(4, dtype=np.float64).reshape(2, 2)}
    strategy.v_t = {"w": np.full((2, 2), 1e-9, dtype=np.float32)}


def test_flower_arrays_go_to_the_artifact_store_and_come_back_bit_for_bit(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    before = FedAdam()
    _moments(before)
    state = save_state(before, store)
    assert state is not None and set(state) == {FLOWER_ARRAYS_KEY}
    assert store.exists(state[FLOWER_ARRAYS_KEY])

    after = FedAdam()
    restore_state(after, state, store)
    assert after.m_t is not None and after.v_t is not None
    for name in ("m_t", "v_t"):
        original, restored = getattr(before, name)["w"], getattr(after, name)["w"]
        assert restored.dtype == original.dtype and restored.tobytes() == original.tobytes()


def test_a_strategy_without_state_saves_none_and_ours_save_their_own_json(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert save_state(FedAvg(), store) is None
    reptile = FedReptile()
    reptile.rounds_done = 3
    state = save_state(reptile, store)
    assert state == reptile.state_dict()
    fresh = FedReptile()
    restore_state(fresh, state, store)
    assert fresh.rounds_done == 3
    restore_state(fresh, None, store)  # a job that never finished a round
    assert fresh.rounds_done == 3


def test_missing_state_arrays_fail_the_resume_naming_the_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    strategy = FedAdam()
    _moments(strategy)
    state = save_state(strategy, store)
    assert state is not None
    store.path(state[FLOWER_ARRAYS_KEY]).unlink()
    with pytest.raises(
        StrategyStateError, match=f"FedAdam back its state \\(artifact {state[FLOWER_ARRAYS_KEY]}"
    ):
        restore_state(FedAdam(), state, store)
    wrong = {FLOWER_ARRAYS_KEY: store.put(fa.array_record_to_bytes(fa.strategy_arrays(strategy)))}
    with pytest.raises(StrategyStateError, match="is not one of"):
        restore_state(FedAvgM(server_momentum=0.5), wrong, store)
