"""Jobs end to end inside one process: Admin API -> runner -> FleetGrid -> fake agents over gRPC.

Deadlines, quorum, drops, invalid updates, checkpoints, strategy state, and a
graceful stop that leaves the job running so a restart resumes it.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from tinyfleet.common.arrays import from_numpy_dict
from tinyfleet.common.flower_adapter import (
    ERR_HANDLER_FAILED,
    array_record_from_bytes,
    message_from_bytes,
    message_to_bytes,
    reply_with_content,
    reply_with_error,
)
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.admin_client import AdminClient
from tinyfleet.server.job_cli import print_job
from tinyfleet.server.job_json import job_info_dict

from .harness import CoordinatorThread, FakeAgent, answer, reply_frame, settings_for


class CountingFedAvg(FedAvg):
    """FedAvg with checkpointable state: how many rounds it aggregated."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aggregated = 0

    def aggregate_train(self, server_round, replies):
        self.aggregated += 1
        return super().aggregate_train(server_round, replies)

    def state_dict(self) -> dict[str, int]:
        return {"aggregated": self.aggregated}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.aggregated = state["aggregated"]


def job_toml(rounds: int = 2, *, min_nodes: int = 1, deadline_s: float = 20.0, wait_s: float = 10.0,
             strategy: str = "fedavg", round_extra: str = "") -> str:
    return f"""
name = "test-job"
strategy = "{strategy}"
model = "sine-mlp"
rounds = {rounds}
seed = 3

[round]
deadline_s = {deadline_s}
min_nodes = {min_nodes}
wait_for_nodes_s = {wait_s}
{round_extra}

[train]
local_steps = 3
lr = 0.02

[evaluate]
eval_samples = 20
"""


class Fleet:
    """A coordinator in this process and fake agents connected to it."""

    def __init__(self, data_dir: Path, **settings: object) -> None:
        self.data_dir = data_dir
        self.running = CoordinatorThread(settings_for(data_dir, **settings))
        self.agents: list[FakeAgent] = []

    def agent(self, name: str, behaviour=answer, *, seed: int = 1) -> FakeAgent:
        agent = self.running.agent(f"urn:dev:{name}", data=f"sine:seed={seed}", behaviour=behaviour)
        agent.register()
        agent.connect()
        self.agents.append(agent)
        return agent

    def admin(self) -> AdminClient:
        return AdminClient(self.running.address)

    def run(self, spec: str) -> dict[str, Any]:
        with self.admin() as client:
            job_id = client.submit(spec).job_id
            states = [info.state for info in client.watch(job_id)]
            assert states[-1] in ("finished", "failed")
            return job_info_dict(client.job(job_id))

    def close(self) -> None:
        """Stop the coordinator first (as an operator would), then the agents."""
        try:
            self.running.stop()
        finally:
            for agent in self.agents:
                agent.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    created = Fleet(tmp_path / "coord")
    try:
        yield created
    finally:
        created.close()


def test_job_runs_rounds_checkpoints_and_records_everything(fleet: Fleet) -> None:
    nodes = {fleet.agent(f"a{i}", seed=i).node_id for i in range(2)}
    job = fleet.run(job_toml(rounds=3, min_nodes=2))
    assert job["state"] == "finished" and job["rounds_done"] == 3 and job["reason"] == ""
    rounds = job["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    repo, store = fleet.running.coordinator.repo, fleet.running.coordinator.store
    parents = [repo.get_artifact(r["artifact_sha"]).parent_sha for r in rounds]  # type: ignore[union-attr]
    assert parents[1:] == [r["artifact_sha"] for r in rounds[:2]]  # provenance chain
    assert parents[0] is not None and store.exists(parents[0])  # the initial model
    for r in rounds:
        assert r["participants"] == 2 and r["dropped"] == 0
        assert r["train_metrics"]["train_loss"] > 0 and r["eval_metrics"]["eval_loss"] > 0
        assert r["bytes_down"] > 4 * 17_000 and r["bytes_up"] > 2 * 17_000
        assert r["duration_s"] >= r["train_duration_s"] + r["eval_duration_s"] > 0
        assert {n["node_id"] for n in r["nodes"]} == nodes
        assert {(n["phase"], n["status"]) for n in r["nodes"]} == {("train", "replied"),
                                                                   ("evaluate", "replied")}
        assert all(n["compute_s"] > 0 for n in r["nodes"])
        for node in r["nodes"]:  # what each node reported, for per-node tables
            key = "train_loss" if node["phase"] == "train" else "eval_loss"
            assert node["metrics"][key] > 0
        arrays = array_record_from_bytes(store.get(r["artifact_sha"]))
        assert np.isfinite(arrays["0.weight"].numpy()).all()
    losses = [r["eval_metrics"]["eval_loss"] for r in rounds]
    assert losses[-1] < losses[0]  # FedAvg on two sine tasks makes progress


def test_no_node_wait_at_all_still_runs_when_the_nodes_are_there(fleet: Fleet) -> None:
    fleet.agent("ready")
    job = fleet.run(job_toml(rounds=1, min_nodes=1, wait_s=0.0))
    assert job["state"] == "finished", job["reason"]


def test_quorum_not_reached_fails_the_job_with_the_reason(fleet: Fleet) -> None:
    fleet.agent("only")
    job = fleet.run(job_toml(min_nodes=2, wait_s=0.3))
    assert job["state"] == "failed" and job["rounds_done"] == 0
    assert job["reason"].startswith("quorum not reached: 1 of 2 nodes online")


def _silent(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> None:
    return None


def test_a_silent_node_is_dropped_at_the_deadline_and_the_job_goes_on(fleet: Fleet) -> None:
    fleet.agent("ok1", seed=1)
    fleet.agent("ok2", seed=2)
    silent = fleet.agent("silent", _silent)
    job = fleet.run(job_toml(rounds=1, min_nodes=2, deadline_s=1.0))
    assert job["state"] == "finished"
    [r] = job["rounds"]
    assert r["participants"] == 3 and r["dropped"] == 1
    [drop] = [n for n in r["nodes"] if n["phase"] == "train" and n["status"] != "replied"]
    assert drop["node_id"] == silent.node_id and drop["status"] == "timeout"
    assert "1.0 s deadline" in drop["error"]


def test_agents_are_told_the_deadline_of_each_phase(fleet: Fleet) -> None:
    agent = fleet.agent("told")
    job = fleet.run(job_toml(rounds=1, deadline_s=20.0, round_extra="evaluate_deadline_s = 5.0"))
    assert job["state"] == "finished", job["reason"]
    told = {message_from_bytes(t.flower_message).metadata.message_type: t.deadline_s for t in agent.tasks}
    assert told == {"train": 20.0, "evaluate": 5.0}


def test_quorum_failed_in_a_round_ends_the_job(fleet: Fleet) -> None:
    fleet.agent("ok")
    fleet.agent("silent", _silent)
    job = fleet.run(job_toml(rounds=2, min_nodes=2, deadline_s=0.5))
    assert job["state"] == "failed" and job["rounds_done"] == 0
    assert job["reason"].startswith("quorum failed in round 1: 1 of 2 required nodes replied")
    assert "timeout" in job["reason"]


def _nan(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    """Trains for real, then poisons one array of the update."""
    reply = agent.handlers.handle(message, agent.context)
    if message.metadata.message_type != "train":
        return reply_frame(task, message_to_bytes(reply))
    arrays = {k: v.numpy().copy() for k, v in reply.content.array_records["arrays"].items()}
    arrays["4.bias"][:] = np.inf
    content = RecordDict({"arrays": from_numpy_dict(arrays),
                          "metrics": reply.content.metric_records["metrics"]})
    return reply_frame(task, message_to_bytes(reply_with_content(message, content)))


def test_nan_updates_are_recorded_and_not_aggregated(fleet: Fleet) -> None:
    fleet.agent("ok")
    bad = fleet.agent("nan", _nan)
    job = fleet.run(job_toml(rounds=1, min_nodes=1))
    assert job["state"] == "finished"
    [r] = job["rounds"]
    [error] = [n for n in r["nodes"] if n["node_id"] == bad.node_id and n["phase"] == "train"]
    assert error["status"] == "error" and "NaN/Inf" in error["error"] and "'4.bias'" in error["error"]
    assert r["dropped"] == 1
    arrays = array_record_from_bytes(fleet.running.coordinator.store.get(r["artifact_sha"]))
    assert np.isfinite(arrays["4.bias"].numpy()).all()


class NothingInRoundOne(FedAvg):
    """Aggregates nothing in round 1, as when every reply of a serial round is refused."""

    def aggregate_train(self, server_round, replies):
        if server_round == 1:
            list(replies)
            return None, None
        return super().aggregate_train(server_round, replies)


def test_a_round_that_aggregates_nothing_keeps_the_model_and_the_job_goes_on(fleet: Fleet) -> None:
    fleet.agent("only")
    job = fleet.run(job_toml(rounds=2, min_nodes=1, strategy=f"{__name__}:NothingInRoundOne"))
    assert job["state"] == "finished", job["reason"]
    first, second = job["rounds"]
    repo = fleet.running.coordinator.repo
    kept = repo.get_artifact(first["artifact_sha"])
    assert kept is not None and kept.round == 0  # round 1 points at the initial model, unchanged
    assert not first["train_metrics"]
    made = repo.get_artifact(second["artifact_sha"])
    assert made is not None and made.round == 2 and made.parent_sha == first["artifact_sha"]
    assert second["artifact_sha"] != first["artifact_sha"]


def test_graceful_stop_keeps_the_job_running_and_a_restart_resumes_it(tmp_path: Path) -> None:
    spec = job_toml(rounds=3, min_nodes=1, deadline_s=30.0,
                    strategy=f"{__name__}:CountingFedAvg")
    first = Fleet(tmp_path / "coord")
    round_two = threading.Event()

    def stall_in_round_two(agent: FakeAgent, task: fleet_pb2.Task, message: Message):
        if message.content.config_records["config"].get("server-round") == 2:
            round_two.set()
            return None
        return answer(agent, task, message)

    try:
        agent = first.agent("resumer", stall_in_round_two)
        with first.admin() as client:
            job_id = client.submit(spec).job_id
        assert round_two.wait(30)
    finally:
        first.close()  # graceful stop in the middle of round 2
    repo_job = first.running.coordinator.repo
    state = job_info_dict_from_repo(repo_job, int(job_id))
    assert state["state"] == "running" and state["rounds_done"] == 1
    first_round = state["rounds"][0]

    second = Fleet(tmp_path / "coord")
    try:
        again = FakeAgent(second.running.address, "urn:dev:resumer", data="sine:seed=1", key=agent.key)
        again.node_id = agent.node_id
        again.context = agent.context
        again.connect()
        second.agents.append(again)
        with second.admin() as client:
            for _ in client.watch(job_id):
                pass
            job = job_info_dict(client.job(job_id))
    finally:
        second.close()
    assert job["state"] == "finished" and [r["round"] for r in job["rounds"]] == [1, 2, 3]
    assert job["rounds"][0] == first_round  # the checkpointed round is kept as it was
    repo = second.running.coordinator.repo
    round_two_artifact = repo.get_artifact(job["rounds"][1]["artifact_sha"])
    assert round_two_artifact.parent_sha == first_round["artifact_sha"]  # type: ignore[union-attr]
    assert repo.get_job(int(job_id)).strategy_state == {"aggregated": 3}  # type: ignore[union-attr]


def job_info_dict_from_repo(repo, job_id: int) -> dict[str, Any]:
    from tinyfleet.server.job_json import job_dict

    return job_dict(repo.get_job(job_id), repo.get_rounds(job_id))


def test_a_job_runs_with_postgresql_as_the_store(tmp_path: Path, pg_url: str) -> None:
    running = CoordinatorThread(settings_for(tmp_path / "coord", db_url=pg_url))
    agent = running.agent("urn:dev:pg")
    try:
        assert running.coordinator.repo.engine.dialect.name == "postgresql"
        agent.register()
        agent.connect()
        with AdminClient(running.address) as client:
            job_id = client.submit(job_toml(rounds=2)).job_id
            list(client.watch(job_id))
            job = job_info_dict(client.job(job_id))
        assert job["state"] == "finished" and [r["round"] for r in job["rounds"]] == [1, 2]
        assert running.coordinator.repo.get_device("urn:dev:pg").online  # type: ignore[union-attr]
    finally:
        running.stop()
        agent.close()


def test_queued_jobs_run_one_at_a_time_in_submission_order(fleet: Fleet) -> None:
    fleet.agent("fifo")
    with fleet.admin() as client:
        ids = [client.submit(job_toml(rounds=2)).job_id for _ in range(3)]
        for job_id in ids:
            list(client.watch(job_id))
    jobs = [fleet.running.coordinator.repo.get_job(int(i)) for i in ids]
    assert all(j is not None and j.state == "finished" for j in jobs)
    for earlier, later in itertools.pairwise(jobs):
        assert earlier.finished_at <= later.started_at  # type: ignore[union-attr, operator]


def test_strategies_with_a_schedule_get_the_job_length() -> None:
    from tinyfleet.common.jobspec import parse_job_spec
    from tinyfleet.server.job_strategy import build_strategy
    from tinyfleet.server.strategies import FedReptile

    spec = parse_job_spec(
        'strategy = "fedreptile"\nmodel = "sine-mlp"\nrounds = 40\n'
        '[options]\nepsilon_schedule = "linear"\nepsilon = 0.5\n'
    )
    strategy = build_strategy(spec)
    assert isinstance(strategy, FedReptile) and strategy.options.num_rounds == 40
    stock = build_strategy(parse_job_spec('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 40'))
    assert not hasattr(stock, "num_rounds")  # only strategies that take the argument get it


def _no_examples(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    """A real answer from a device that learned from no example (an online stream still empty)."""
    reply = agent.handlers.handle(message, agent.context)
    reply.content.metric_records["metrics"]["num-examples"] = 0
    return reply_frame(task, message_to_bytes(reply))


def test_a_round_whose_replies_all_weigh_zero_examples_is_recorded_and_the_job_goes_on(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet.agent("empty-1", _no_examples)
    fleet.agent("empty-2", _no_examples, seed=2)
    job = fleet.run(job_toml(rounds=2, min_nodes=2))
    assert job["state"] == "finished", job["reason"]  # was: failed, "ZeroDivisionError: division by zero"
    first, second = job["rounds"]
    reason = ("every valid reply (2) reports num-examples = 0, so there is no weighted mean to take; "
              "nothing was aggregated")
    assert first["train_error"] == second["train_error"] == reason
    assert first["eval_error"] == reason and first["eval_metrics"] is None
    assert fleet.running.coordinator.repo.get_artifact(second["artifact_sha"]).round == 0  # type: ignore[union-attr]
    print_job(job)
    shown = capsys.readouterr().out
    assert f"round 2 train: model kept: {reason}" in shown
    assert f"round 2 evaluate: no metrics: {reason}" in shown


class EvaluationBug(FedAvg):
    """Evaluation metrics cannot be aggregated: a bug in the strategy."""

    def aggregate_evaluate(self, server_round, replies):
        raise ValueError("metric [/bold] aggregation broke")


def _evaluate_refused(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    if message.metadata.message_type.startswith("evaluate"):
        reply = reply_with_error(message, ERR_HANDLER_FAILED, "no evaluation data on this device")
        return reply_frame(task, message_to_bytes(reply))
    return answer(agent, task, message)


@pytest.mark.parametrize(
    ("strategy", "behaviour", "expected"),
    [
        (f"{__name__}:EvaluationBug", answer, "ValueError: metric [/bold] aggregation broke"),
        ("fedavg", _evaluate_refused, "the strategy aggregated no metrics (node {node}: error node reported "
                                      f"error {ERR_HANDLER_FAILED}: no evaluation data on this device)"),
    ],
)
def test_evaluation_errors_are_stored_on_the_round_and_shown_by_job_status(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], strategy: str, behaviour: Any, expected: str
) -> None:
    agent = fleet.agent("evaluated", behaviour)
    job = fleet.run(job_toml(rounds=1, min_nodes=1, strategy=strategy))
    assert job["state"] == "finished", job["reason"]
    [r] = job["rounds"]
    expected = expected.format(node=agent.node_id)
    assert r["eval_error"] == expected and r["eval_metrics"] is None
    assert r["train_error"] == "" and r["train_metrics"]
    print_job(job)
    assert f"round 1 evaluate: no metrics: {expected}" in capsys.readouterr().out
