"""The update guard (`[round] max_update_ratio`) against a rogue agent that scales its weights by 1000.

Real FleetGrid jobs (coordinator in this process, agents over gRPC on 127.0.0.1):
FedAvg, whose replies carry full arrays, and FedReptile with the TinyMetaFed
wire format (top-10 % int8 update payloads, compressed downlink, a local layer).
Each scenario runs twice on the same fleet: with the guard the rogue's replies
are dropped with the ratio and the bound named and the model stays sane; without
it the rogue wins, which shows the test can fail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from server.harness import FakeAgent, reply_frame
from server.test_job_runner import Fleet

from tinyfleet.client.meta_learners import REPLICA_STATE
from tinyfleet.common import codec
from tinyfleet.common.arrays import from_numpy_dict
from tinyfleet.common.flower_adapter import array_record_from_bytes, message_to_bytes, reply_with_content
from tinyfleet.common.jobspec import JobSpecError, parse_job_spec
from tinyfleet.common.reptile_protocol import UPDATE_KEY
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

SCALE = 1000.0
BOUND = 10.0

FEDAVG = """
name = "guarded-fedavg"
strategy = "fedavg"
model = "sine-mlp"
rounds = 2
seed = 3

[round]
deadline_s = 30.0
min_nodes = 2
wait_for_nodes_s = 10.0
{guard}

[train]
local_steps = 3
lr = 0.02

[evaluate]
eval_samples = 20
"""

FEDREPTILE = """
name = "guarded-fedreptile"
strategy = "fedreptile"
model = "sine-mlp"
rounds = 2
seed = 3

[options]
serial = false
epsilon = 0.5
inner_steps = 5
inner_batch = 10
local_layers = ["4"]
reconstruct_steps = 2
top_p = 0.1
quantize = "int8"
compress_downlink = true
evaluate_every = 1
eval_shots = 10
eval_queries = 40

[round]
deadline_s = 30.0
min_nodes = 2
wait_for_nodes_s = 10.0
{guard}
"""


Scale = Callable[[FakeAgent, RecordDict], RecordDict]


def _rogue(scale: Scale) -> Callable[..., fleet_pb2.AgentFrame]:
    """An agent that trains honestly, then sends `scale(reply content)`; it evaluates honestly."""

    def behaviour(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
        reply = agent.handlers.handle(message, agent.context)
        if message.metadata.message_type.startswith("train") and not reply.has_error():
            reply = reply_with_content(message, scale(agent, reply.content))
        return reply_frame(task, message_to_bytes(reply))

    return behaviour


def _scaled_weights(agent: FakeAgent, content: RecordDict) -> RecordDict:
    """FedAvg reply: the trained weights x1000."""
    arrays = {k: v.numpy() * SCALE for k, v in content.array_records["arrays"].items()}
    return RecordDict({"arrays": from_numpy_dict(arrays), "metrics": content.metric_records["metrics"]})


def _scaled_update(agent: FakeAgent, content: RecordDict) -> RecordDict:
    """FedReptile reply: the weights the device adapted to, x1000, sent as its update payload the
    way the device encodes it (top-10 % int8 of 1000 * adapted - start)."""
    start = {k: v.numpy() for k, v in agent.context.state.array_records[REPLICA_STATE].items()}
    assert codec.payload_kind(content.array_records[UPDATE_KEY]) == codec.SPARSE_INT8
    update = codec.decode(content.array_records[UPDATE_KEY], codec.Layout.of(start))
    rogue = {k: SCALE * (start[k] + update[k]) - start[k] for k in start}
    payload = codec.encode(rogue, top_p=0.1, quantize="int8")
    return RecordDict({UPDATE_KEY: payload, "metrics": content.metric_records["metrics"]})


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    created = Fleet(tmp_path / "coord")
    try:
        yield created
    finally:
        created.close()


def _ratio_in(error: str) -> float:
    found = re.search(r"update norm is ([0-9.e+]+)x the global model's, above max_update_ratio 10", error)
    assert found, error
    return float(found.group(1))


def _run_both(fleet: Fleet, job: str, scale: Scale) -> tuple[dict, dict, int]:
    fleet.agent("honest-1", seed=1)
    fleet.agent("honest-2", seed=2)
    rogue = fleet.agent("rogue", _rogue(scale), seed=3)
    guarded = fleet.run(job.format(guard=f"max_update_ratio = {BOUND}"))
    unguarded = fleet.run(job.format(guard=""))
    return guarded, unguarded, rogue.node_id


def _train_results(job: dict[str, Any], node_id: int) -> list[dict[str, Any]]:
    return [n for r in job["rounds"] for n in r["nodes"] if n["phase"] == "train" and n["node_id"] == node_id]


def test_fedavg_drops_a_rogue_scaling_its_weights_and_stays_sane(fleet: Fleet) -> None:
    guarded, unguarded, rogue = _run_both(fleet, FEDAVG, _scaled_weights)

    assert guarded["state"] == "finished", guarded["reason"]
    for result in _train_results(guarded, rogue):
        assert result["status"] == "error"
        assert _ratio_in(result["error"]) > 100  # weights x1000: the update is ~999x the model
    assert all(r["dropped"] == 1 and r["participants"] == 3 for r in guarded["rounds"])
    honest = [n for r in guarded["rounds"] for n in r["nodes"]
              if n["phase"] == "train" and n["node_id"] != rogue]
    assert len(honest) == 4 and all(n["status"] == "replied" for n in honest)  # honest ones pass
    sane = guarded["rounds"][-1]["eval_metrics"]["eval_loss"]
    assert np.isfinite(sane) and sane < 10

    assert unguarded["state"] == "finished", unguarded["reason"]
    assert all(n["status"] == "replied" for n in _train_results(unguarded, rogue))
    ruined = unguarded["rounds"][-1]["eval_metrics"]["eval_loss"]
    assert ruined > 1000 * sane  # without the guard the rogue wins


def _model_norms(fleet: Fleet, job: dict[str, Any]) -> tuple[float, float]:
    """L2 norms of the job's initial and final global models (its artifacts)."""
    repo, store = fleet.running.coordinator.repo, fleet.running.coordinator.store
    first = repo.get_artifact(job["rounds"][0]["artifact_sha"])
    assert first is not None and first.parent_sha is not None

    def norm(sha: str) -> float:
        record = array_record_from_bytes(store.get(sha))
        return float(np.sqrt(sum(np.square(a.numpy(), dtype=np.float64).sum() for a in record.values())))

    return norm(first.parent_sha), norm(job["rounds"][-1]["artifact_sha"])


def _renamed_record(agent: FakeAgent, content: RecordDict) -> RecordDict:
    """FedAvg reply: the trained weights x1000 under another record name (the guard measured
    only "arrays"/"update", and Flower aggregates whatever single ArrayRecord a reply has)."""
    arrays = {k: v.numpy() * SCALE for k, v in content.array_records["arrays"].items()}
    return RecordDict({"weights": from_numpy_dict(arrays), "metrics": content.metric_records["metrics"]})


def _disjoint_keys(agent: FakeAgent, content: RecordDict) -> RecordDict:
    """FedAvg reply: "arrays" whose keys share nothing with the model (the guard measured 0 of 0)."""
    arrays = {f"rogue.{k}": v.numpy() * SCALE for k, v in content.array_records["arrays"].items()}
    return RecordDict({"arrays": from_numpy_dict(arrays), "metrics": content.metric_records["metrics"]})


@pytest.mark.parametrize(
    ("scale", "reason"),
    [
        (_renamed_record, "train reply must carry exactly one ArrayRecord, 'arrays'; it carries 'weights'"),
        (_disjoint_keys, "'arrays' does not match the global model's tensors: missing ["),
    ],
    ids=["other-record-name", "disjoint-keys"],
)
def test_fedavg_drops_a_reply_the_guard_cannot_measure(
    fleet: Fleet, scale: Scale, reason: str
) -> None:
    fleet.agent("honest-1", seed=1)
    fleet.agent("honest-2", seed=2)
    rogue = fleet.agent("rogue", _rogue(scale), seed=3).node_id
    job = fleet.run(FEDAVG.format(guard=f"max_update_ratio = {BOUND}"))

    assert job["state"] == "finished", job["reason"]
    results = _train_results(job, rogue)
    assert len(results) == 2
    for result in results:
        assert result["status"] == "error" and reason in result["error"], result
    assert all(r["dropped"] == 1 and r["participants"] == 3 for r in job["rounds"])
    eval_loss = job["rounds"][-1]["eval_metrics"]["eval_loss"]
    assert np.isfinite(eval_loss) and eval_loss < 10
    initial, final = _model_norms(fleet, job)
    assert final < 2 * initial
    model = fleet.running.coordinator.store.get(job["rounds"][-1]["artifact_sha"])
    assert not any(k.startswith("rogue.") for k in array_record_from_bytes(model))


def test_fedreptile_measures_the_decoded_sparse_int8_update(fleet: Fleet) -> None:
    guarded, unguarded, rogue = _run_both(fleet, FEDREPTILE, _scaled_update)

    assert guarded["state"] == "finished", guarded["reason"]
    results = _train_results(guarded, rogue)
    assert len(results) == 2 and all(n["status"] == "error" for n in results)
    assert all(_ratio_in(n["error"]) > 100 for n in results)
    # the honest replies (compressed against the model minus its local layer) pass the guard
    assert all(r["dropped"] == 1 and r["train_metrics"]["nodes"] == 2 for r in guarded["rounds"])
    assert np.isfinite(guarded["rounds"][-1]["eval_metrics"]["loss_after"])
    initial, final = _model_norms(fleet, guarded)
    assert final < 2 * initial

    assert unguarded["state"] == "finished", unguarded["reason"]
    assert all(r["dropped"] == 0 and r["train_metrics"]["nodes"] == 3 for r in unguarded["rounds"])
    initial, final = _model_norms(fleet, unguarded)
    assert final > 1000 * initial  # without the guard the rogue wins: the global model blows up


def test_the_bound_is_off_by_default_and_must_be_a_positive_number() -> None:
    head = 'strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[round]\n'
    assert parse_job_spec(head).round.max_update_ratio is None
    assert parse_job_spec(head + "max_update_ratio = 5\n").round.max_update_ratio == 5.0
    for bad, words in (("0", "greater than 0"), ("-2.5", "greater than 0"), ("true", "expected a number")):
        with pytest.raises(JobSpecError, match=words) as refused:
            parse_job_spec(head + f"max_update_ratio = {bad}\n")
        assert refused.value.field == "round.max_update_ratio"
