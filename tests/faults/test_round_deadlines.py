"""A round's phases each run against one deadline: `deadline_s` bounds the whole train phase
(configure, send, replies) and `evaluate_deadline_s` the evaluate phase, so a round can no
longer take the train deadline twice (issue 10, row 11).

Real FleetGrid jobs: the coordinator in this process, fake agents over gRPC on 127.0.0.1.
Each duration is asserted to be at least its deadline and closer to the deadline than to what
the old behaviour took (configure + deadline, or the train deadline for both phases): the
property holds with seconds of slack on a loaded machine, not against a tight absolute bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from server.harness import FakeAgent, answer
from server.test_job_runner import Fleet

from tinyfleet.common.jobspec import JobSpecError, parse_job_spec
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

CONFIGURE_S = 5.0


class SlowConfigureFedAvg(FedAvg):
    """FedAvg whose train configure step takes CONFIGURE_S (as one waiting for nodes would)."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        time.sleep(CONFIGURE_S)
        return super().configure_train(server_round, arrays, config, grid)


def _silent_in(phase: str) -> Callable[[FakeAgent, fleet_pb2.Task, Message], fleet_pb2.AgentFrame | None]:
    """An agent that never answers `phase` messages and answers the others for real."""

    def behaviour(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame | None:
        if message.metadata.message_type == phase:
            return None
        return answer(agent, task, message)

    return behaviour


def _job(strategy: str, round_settings: str) -> str:
    return f"""
name = "deadlines"
strategy = "{strategy}"
model = "sine-mlp"
rounds = 1
seed = 3

[round]
min_nodes = 1
wait_for_nodes_s = 10.0
{round_settings}

[train]
local_steps = 3
lr = 0.02

[evaluate]
eval_samples = 20
"""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    # Fake agents send no heartbeats: a long interval keeps the silent ones connected
    # (timed out, not disconnected) through the deadlines below.
    created = Fleet(tmp_path / "coord", heartbeat_interval_s=30.0)
    try:
        yield created
    finally:
        created.close()


def _node(round_: dict[str, Any], phase: str, node_id: int) -> dict[str, Any]:
    [found] = [n for n in round_["nodes"] if n["phase"] == phase and n["node_id"] == node_id]
    return found


def test_the_train_deadline_covers_the_configure_step(fleet: Fleet) -> None:
    ok = fleet.agent("ok")
    silent = fleet.agent("silent", _silent_in("train"))
    deadline_s = 10.0
    job = fleet.run(_job(f"{__name__}:SlowConfigureFedAvg", f"deadline_s = {deadline_s}"))
    assert job["state"] == "finished", job["reason"]
    [r] = job["rounds"]
    drop = _node(r, "train", silent.node_id)
    assert drop["status"] == "timeout" and f"{deadline_s} s deadline" in drop["error"]
    assert _node(r, "train", ok.node_id)["status"] == "replied"
    # configure (5 s) and the wait for the silent node share the 10 s: not 5 + 10 = 15 s
    before = CONFIGURE_S + deadline_s
    assert deadline_s <= r["train_duration_s"] < before - CONFIGURE_S / 2


def test_the_evaluate_phase_has_its_own_deadline(fleet: Fleet) -> None:
    fleet.agent("ok")
    silent = fleet.agent("silent", _silent_in("evaluate"))
    deadline_s, evaluate_s = 30.0, 1.0
    job = fleet.run(_job("fedavg", f"deadline_s = {deadline_s}\nevaluate_deadline_s = {evaluate_s}"))
    assert job["state"] == "finished", job["reason"]
    [r] = job["rounds"]
    assert _node(r, "train", silent.node_id)["status"] == "replied"
    drop = _node(r, "evaluate", silent.node_id)
    assert drop["status"] == "timeout" and f"{evaluate_s} s deadline" in drop["error"]
    assert evaluate_s <= r["eval_duration_s"] < deadline_s / 2  # not the train phase's 30 s
    assert r["eval_metrics"]["eval_loss"] > 0  # the node that answered still counts


def test_a_round_with_silent_nodes_lasts_at_most_both_deadlines(fleet: Fleet) -> None:
    fleet.agent("ok")
    fleet.agent("silent", _silent_in("train"))
    fleet.agent("mute", _silent_in("evaluate"))
    deadline_s, evaluate_s = 8.0, 1.0
    job = fleet.run(_job("fedavg", f"deadline_s = {deadline_s}\nevaluate_deadline_s = {evaluate_s}"))
    assert job["state"] == "finished", job["reason"]
    [r] = job["rounds"]
    assert r["dropped"] == 1
    assert r["train_duration_s"] >= deadline_s and r["eval_duration_s"] >= evaluate_s
    # 9 s of waiting, not 2 x deadline_s = 16 s: halfway between leaves 3.5 s for a loaded machine
    bounded, before = deadline_s + evaluate_s, 2 * deadline_s
    assert r["eval_duration_s"] < (evaluate_s + deadline_s) / 2
    assert r["duration_s"] < (bounded + before) / 2


JOB_HEAD = 'strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[round]\ndeadline_s = 12\n'


def test_evaluate_deadline_defaults_to_the_train_deadline_and_is_checked() -> None:
    spec = parse_job_spec(JOB_HEAD)
    assert spec.round.evaluate_deadline_s is None and spec.round.evaluate_deadline == 12.0
    spec = parse_job_spec(JOB_HEAD + "evaluate_deadline_s = 3\n")
    assert spec.round.evaluate_deadline == 3.0 and parse_job_spec(spec.to_toml()) == spec
    bad_values = (("0", "greater than 0"), ('"soon"', "expected a number"), ("inf", "expected a number"))
    for bad, words in bad_values:
        with pytest.raises(JobSpecError, match=words) as refused:
            parse_job_spec(JOB_HEAD + f"evaluate_deadline_s = {bad}\n")
        assert refused.value.field == "round.evaluate_deadline_s"
