"""FedReptile over real agents: `tinyfleet server start` + `tinyfleet agent run --data sine:seed=N` processes;
the stateful downlink survives an agent restart and a coordinator resume."""

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
        fleet.wait_online(3, timeout=90)
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


RESYNC_JOB = """
name = "tinymetafed-resync"
strategy = "fedreptile"
model = "sine-mlp"
rounds = 60

[options]
serial = false
fraction_train = 1.0
epsilon = 0.5
inner_steps = 600
top_p = 0.1
quantize = "int8"
compress_downlink = true
evaluate_every = 1000

[round]
deadline_s = 60.0
min_nodes = 1
wait_for_nodes_s = 60.0
"""


def _train_results(info: object, node_id: int, after: float) -> list[dict]:
    """The node's train results in the rounds that finished after `after`, in round order."""
    rounds = json.loads(info.rounds_json)  # type: ignore[attr-defined]
    return [
        {**n, "started_at": r["started_at"]}
        for r in rounds
        if r["finished_at"] > after
        for n in r["nodes"]
        if n["phase"] == "train" and n["node_id"] == node_id
    ]


def _resynced(results: list[dict]) -> bool:
    """Whether the node missed a round and then replied twice (resync, then delta)."""
    missed = [i for i, r in enumerate(results) if r["status"] != "replied"]
    return bool(missed) and sum(r["status"] == "replied" for r in results[missed[0] :]) >= 2


def test_a_restarted_agent_and_a_resumed_coordinator_are_resynced(tmp_path: Path) -> None:
    """Parallel TinyMetaFed on two real agents. Agent 0 is killed and started again (its Context,
    with replica and config, is gone): it misses one round (the delta it cannot apply, or the round
    it was killed in) and then gets the dense model and config again. Then the coordinator is killed
    and resumed from its checkpoint: a new session resyncs both agents, and no round drops a node."""
    with LocalFleet(tmp_path) as fleet:
        fleet.start_server()
        fleet.start_agents([f"sine:seed={i}" for i in range(2)])
        fleet.wait_online(2, timeout=90)
        node = {d.device_id: d.node_id for d in fleet.admin().devices()}[fleet.agents[0].device_id]
        job_id = fleet.submit(RESYNC_JOB)
        for info in fleet.admin().watch(job_id, timeout=240):
            if info.rounds_done >= 2:
                break
        restarted_at = time.time()
        fleet.restart_agent(fleet.agents[0])
        for info in fleet.admin().watch(job_id, timeout=240):
            results = _train_results(info, node, after=restarted_at)
            if _resynced(results) or info.state != "running":
                break
        assert info.state == "running", f"job ended before the restarted agent was resynced: {info.reason}"
        first_miss = next(i for i, r in enumerate(results) if r["status"] != "replied")
        assert all(r["started_at"] < restarted_at for r in results[:first_miss])  # replied before the kill
        missed, resync, delta = results[first_miss : first_miss + 3]
        if missed["status"] == "error":  # else undeliverable or timed out: it died in that round
            assert "out of sync" in missed["error"]
        assert resync["status"] == delta["status"] == "replied"
        assert resync["bytes_down"] > 5 * delta["bytes_down"]  # dense model + config, then a delta

        fleet.kill_server()
        killed_at = time.time()
        fleet.start_server()
        last = fleet.admin().job(job_id)
        for info in fleet.admin().watch(job_id, timeout=300):
            last = info
        assert last.state == "finished", last.reason
        resumed = [r for r in json.loads(last.rounds_json) if r["started_at"] > killed_at]
        assert len(resumed) >= 2 and all(r["dropped"] == 0 for r in resumed)
        for agent in fleet.agents:
            agent_node = {d.device_id: d.node_id for d in fleet.admin().devices()}[agent.device_id]
            after_resume = _train_results(last, agent_node, after=killed_at)
            assert after_resume[0]["bytes_down"] > 5 * after_resume[-1]["bytes_down"]  # resynced first
