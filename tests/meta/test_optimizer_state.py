"""Devices keep their inner Adam's state across FedReptile rounds (as Reptile keeps it across tasks)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord

from tinyfleet.client.meta_learners import OPTIMIZER_STATE
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import array_values
from tinyfleet.common.models import build_model
from tinyfleet.server.strategies import FedReptile
from tinyfleet.simulations.rounds import run_rounds
from tinyfleet.simulations.sim_grid import SimGrid


def _device_state_after(rounds: int, **options: object) -> dict[str, np.ndarray]:
    grid = SimGrid.from_data_specs(["sine:seed=1", "sine:seed=2"])
    strategy = FedReptile(inner_optimizer="adam", inner_lr=0.01, inner_steps=3, serial=True, **options)
    run_rounds(
        strategy,
        grid,
        to_array_record(build_model("sine-mlp", seed=0)),
        rounds,
        train_config=ConfigRecord({"model": "sine-mlp"}),
    )
    first = grid.clients[min(grid.clients)]
    record = first.context.state.array_records.get(OPTIMIZER_STATE)
    return {k: array_values(v) for k, v in (record or {}).items()}


@pytest.mark.parametrize("compress_downlink", [False, True])
def test_each_device_keeps_its_adam_moments_and_step_count_across_rounds(compress_downlink: bool) -> None:
    state = _device_state_after(4, compress_downlink=compress_downlink, top_p=0.5, quantize="int8")
    # serial round-robin over 2 devices: the first device trained in rounds 1 and 3, 3 steps each
    assert float(state["0.weight::step"]) == 6.0
    assert state["0.weight::exp_avg_sq"].shape == (64, 1) and (state["0.weight::exp_avg_sq"] > 0).all()


def test_a_fresh_optimizer_every_round_leaves_no_state_behind() -> None:
    assert _device_state_after(4, keep_optimizer_state=False) == {}
