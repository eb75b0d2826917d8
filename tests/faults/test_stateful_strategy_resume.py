"""A FedAdam job whose coordinator is killed with SIGKILL mid-way ends with the same model, bit for
bit, as the same job never stopped (issue 11): the resumed strategy gets its moments back.

Real processes on 127.0.0.1: `tinyfleet server start`, killed and started again on the same data
dir. The agents speak the Fleet protocol from this process (tests/server/harness.FakeAgent) and
train deterministically: each steps the model it receives a fixed fraction of the way to a
target of its own. A `tinyfleet agent run` draws fresh batches from its data stream for every
task, so the round the kill interrupts would be trained again on other batches and the two
runs would differ for a reason that has nothing to do with the strategy. With deterministic
agents, the same seed (same nodes sampled in the same order) and the model saved as
content-addressed bytes, equal final artifacts mean equal weights.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from server.harness import Behaviour, FakeAgent, reply_frame

from tinyfleet.client.descriptions import minimal_thing_description
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.common.flower_adapter import message_to_bytes, reply_with_content
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.simulations.local_fleet import LocalFleet

pytestmark = pytest.mark.slow

ROUNDS = 6
KILL_AFTER_ROUND = 3
#: Seconds each agent takes to train: the kill lands while the round after KILL_AFTER_ROUND trains.
TRAIN_S = 0.5
JOB = f"""
name = "fedadam-resume"
strategy = "flwr.serverapp.strategy:FedAdam"
model = "sine-mlp"
rounds = {ROUNDS}
seed = 11

[options]
eta = 0.05

[round]
min_nodes = 2
deadline_s = 60.0
wait_for_nodes_s = 90.0
"""


def _target(device: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([device, *shape]).standard_normal(shape)


def _deterministic(device: int, weight: int) -> Behaviour:
    """Train: step a tenth of the way to this device's targets; evaluate: the squared distance."""

    def behaviour(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
        received = {k: a.numpy() for k, a in message.content.array_records["arrays"].items()}
        if message.metadata.message_type == "train":
            time.sleep(TRAIN_S)
            stepped = {
                k: (v + 0.1 * (_target(device, v.shape) - v)).astype(v.dtype) for k, v in received.items()
            }
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in stepped.items()}),
                    "metrics": MetricRecord({"num-examples": weight}),
                }
            )
        else:
            distance = sum(float(np.sum((_target(device, v.shape) - v) ** 2)) for v in received.values())
            content = RecordDict({"metrics": MetricRecord({"eval_loss": distance, "num-examples": weight})})
        return reply_frame(task, message_to_bytes(reply_with_content(message, content)))

    return behaviour


class Devices:
    """Two enrolled devices whose keys outlive the coordinator; `connect` opens their streams anew."""

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet
        self.keys = [DeviceKey.generate() for _ in range(2)]
        self.ids = [f"urn:tinyfleet:test:adam-{i}" for i in range(2)]
        self.agents: list[FakeAgent] = []
        for device, (key, device_id) in enumerate(zip(self.keys, self.ids, strict=True)):
            agent = self._agent(device, key, device_id, fleet.enroll(label=device_id))
            agent.register(json.dumps(minimal_thing_description(device_id)).encode())
            self.agents.append(agent.connect())

    def _agent(self, device: int, key: DeviceKey, device_id: str, token: str = "") -> FakeAgent:
        behaviour = _deterministic(device, weight=10 * (device + 1))
        return FakeAgent(self.fleet.address, device_id, key=key, enroll_token=token, behaviour=behaviour)

    def reconnect(self) -> None:
        self.close()
        self.agents = [
            self._agent(device, key, device_id).connect()
            for device, (key, device_id) in enumerate(zip(self.keys, self.ids, strict=True))
        ]

    def close(self) -> None:
        for agent in self.agents:
            agent.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path) as local:
        local.start_server()
        yield local


def _final(fleet: LocalFleet, job_id: str, timeout: float = 180.0) -> fleet_pb2.JobInfo:
    last = fleet.admin().job(job_id)
    for info in fleet.admin().watch(job_id, timeout=timeout):
        last = info
    assert last.state == "finished", last.reason
    return last


def _artifacts(info: fleet_pb2.JobInfo) -> list[str]:
    rounds = json.loads(info.rounds_json)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    return [r["artifact_sha"] for r in rounds]


def test_fedadam_killed_mid_job_ends_with_the_weights_of_a_job_never_stopped(fleet: LocalFleet) -> None:
    devices = Devices(fleet)
    try:
        never_stopped = _artifacts(_final(fleet, fleet.submit(JOB)))
        assert len(set(never_stopped)) == ROUNDS  # every round moved the model

        job_id = fleet.submit(JOB)
        for progress in fleet.admin().watch(job_id, timeout=120):
            if progress.rounds_done >= KILL_AFTER_ROUND:
                break
        fleet.kill_server(signal.SIGKILL)  # the next round is training on both agents
        killed_at = time.time()
        done = progress.rounds_done
        assert done < ROUNDS and fleet.server is not None and fleet.server.returncode == -signal.SIGKILL
        fleet.start_server()
        devices.reconnect()
        info = _final(fleet, job_id)
        resumed = _artifacts(info)
        rounds = json.loads(info.rounds_json)
        assert [r["round"] for r in rounds if r["started_at"] > killed_at] == list(
            range(done + 1, ROUNDS + 1)
        )
        assert resumed[:done] == never_stopped[:done]
        assert resumed == never_stopped  # every resumed round, and so the final weights
    finally:
        devices.close()
