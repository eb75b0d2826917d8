"""FedReptile over real agents: `tinyfleet server start` + three `tinyfleet agent run --data sine:seed=N`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tinyfleet.simulations.local_fleet import LocalFleet

pytestmark = pytest.mark.slow

JOB = """
name = "tinymetafed-sine"
strategy = "fedreptile"
model = "sine-mlp"
rounds = 6

[options]
serial = true
epsilon = 0.5
epsilon_schedule = "linear"
num_rounds = 6
inner_steps = 5
inner_batch = 10
local_layers = ["4"]
reconstruct_steps = 2
top_p = 0.1
quantize = "int8"
compress_downlink = true
evaluate_every = 3
eval_shots = 10
eval_queries = 40

[round]
deadline_s = 60.0
min_nodes = 1
wait_for_nodes_s = 60.0
"""


def test_fedreptile_job_runs_end_to_end_over_real_agents(tmp_path: Path) -> None:
    with LocalFleet(tmp_path) as fleet:
        fleet.start_server()
        fleet.start_agents([f"sine:seed={i}" for i in range(3)])
        deadline = time.monotonic() + 90
        while sum(d.online for d in fleet.admin().devices()) < 3:
            assert time.monotonic() < deadline, "agents did not come online"
            time.sleep(0.2)
        job_id = fleet.submit(JOB)
        last = fleet.admin().job(job_id)
        for info in fleet.admin().watch(job_id, timeout=240):
            last = info
        assert last.state == "finished", last.reason
        rounds = json.loads(last.rounds_json)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    trained = [[n["node_id"] for n in r["nodes"] if n["phase"] == "train"] for r in rounds]
    assert all(len(nodes) == 1 for nodes in trained)  # serial: one device per round
    order = [nodes[0] for nodes in trained]
    assert order[:3] == sorted(order[:3]) and order[3:] == order[:3]  # round robin, in turn
    assert all(r["dropped"] == 0 for r in rounds)
    assert [round(r["train_metrics"]["epsilon"], 6) for r in rounds] == [
        0.5,
        0.416667,
        0.333333,
        0.25,
        0.166667,
        0.083333,
    ]
    assert len({r["artifact_sha"] for r in rounds}) == 6
    # first contact with each device sends the dense model, later rounds only a compressed delta
    assert rounds[4]["bytes_down"] * 4 < rounds[1]["bytes_down"]
    evaluated = [r for r in rounds if r["eval_metrics"]]
    assert [r["round"] for r in evaluated] == [3, 6]
    assert all(r["eval_metrics"]["loss_after"] < r["eval_metrics"]["loss_before"] for r in evaluated)
