"""Real processes on 127.0.0.1: `tinyfleet server start` and three `tinyfleet agent run`.

One fleet serves the module, in order: a FedAvg job end to end; a job during
which an agent is killed mid-round (the drop is recorded, the job finishes);
a job during which the coordinator is killed with SIGKILL, restarted, and the
job resumes at the next round while the agents reconnect by themselves;
finally SIGTERM stops the coordinator with exit code 0.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.simulations.local_fleet import LocalFleet

pytestmark = pytest.mark.slow


def job(rounds: int, *, min_nodes: int, local_steps: int, deadline_s: float = 60.0) -> str:
    return f"""
name = "e2e"
strategy = "fedavg"
model = "sine-mlp"
rounds = {rounds}

[round]
deadline_s = {deadline_s}
min_nodes = {min_nodes}
wait_for_nodes_s = 60.0

[train]
local_steps = {local_steps}
lr = 0.02

[evaluate]
eval_samples = 50
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    root = tmp_path_factory.mktemp("e2e")
    with LocalFleet(root) as local:
        local.start_server()
        local.start_agents([f"sine:seed={i}" for i in range(3)])
        local.wait_online(3, timeout=60)
        yield local


def _rounds(info: fleet_pb2.JobInfo) -> list[dict]:
    return json.loads(info.rounds_json)


def _wait(fleet: LocalFleet, job_id: str, timeout: float) -> fleet_pb2.JobInfo:
    """The job's final state, following it with WatchJob (bounded, so a bug cannot hang CI)."""
    last = fleet.admin().job(job_id)
    for info in fleet.admin().watch(job_id, timeout=timeout):
        last = info
    return last


def _watch_until(fleet: LocalFleet, job_id: str, rounds_done: int) -> None:
    for info in fleet.admin().watch(job_id, timeout=120):
        if info.rounds_done >= rounds_done:
            return
    raise AssertionError(f"job {job_id} ended before round {rounds_done}")


def test_three_agents_run_fedavg_end_to_end(fleet: LocalFleet) -> None:
    job_id = fleet.submit(job(3, min_nodes=3, local_steps=20))
    info = _wait(fleet, job_id, timeout=120)
    assert info.state == "finished", info.reason
    rounds = _rounds(info)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["participants"] == 3 and r["dropped"] == 0 for r in rounds)
    assert len({r["artifact_sha"] for r in rounds}) == 3  # every round moved the global model
    assert all(r["eval_metrics"]["eval_loss"] > 0 for r in rounds)


def test_an_agent_killed_mid_round_is_dropped_and_the_job_finishes(fleet: LocalFleet) -> None:
    victim = fleet.agents[2]
    job_id = fleet.submit(job(3, min_nodes=2, local_steps=1500))
    _watch_until(fleet, job_id, 1)  # round 2 is now training on every agent
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    info = _wait(fleet, job_id, timeout=180)
    assert info.state == "finished", info.reason
    rounds = _rounds(info)
    assert rounds[1]["participants"] == 3 and rounds[1]["dropped"] == 1
    [drop] = [n for n in rounds[1]["nodes"] if n["status"] != "replied"]
    assert drop["phase"] == "train" and drop["status"] in ("undeliverable", "timeout")
    assert rounds[2]["participants"] == 2  # gone for good: no longer sampled


def test_coordinator_killed_mid_job_resumes_and_agents_reconnect(fleet: LocalFleet) -> None:
    job_id = fleet.submit(job(4, min_nodes=2, local_steps=1500))
    _watch_until(fleet, job_id, 1)
    fleet.kill_server(signal.SIGKILL)
    killed_at = time.time()
    before = fleet.server_info
    fleet.start_server()
    assert fleet.address == before["listen"]  # same port: agents find it again
    info = _wait(fleet, job_id, timeout=240)
    assert info.state == "finished", info.reason
    rounds = _rounds(info)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    resumed = [r for r in rounds if r["started_at"] > killed_at]
    assert resumed and all(r["participants"] == 2 for r in resumed)
    assert all(r["dropped"] == 0 for r in resumed)
    online = [d for d in fleet.admin().devices() if d.online]
    assert len(online) == 2  # the two live agents reconnected by themselves


def test_sigterm_stops_the_coordinator_cleanly(fleet: LocalFleet) -> None:
    assert fleet.server is not None
    ready = fleet.data_dir / "server.json"
    assert ready.exists()
    started = time.monotonic()
    fleet.server.send_signal(signal.SIGTERM)
    assert fleet.server.wait(15) == 0
    assert time.monotonic() - started < 10
    assert not ready.exists()
    assert all(agent.process.poll() is None for agent in fleet.agents[:2])  # agents keep running


def test_a_real_agent_over_tls_with_a_throwaway_ca(tmp_path: Path) -> None:
    from .harness import throwaway_ca

    ca, cert, key = throwaway_ca(tmp_path)
    server_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with LocalFleet(tmp_path / "fleet", server_args=server_args, agent_args=["--ca", str(ca)], ca=ca) as tls:
        assert tls.start_server()["tls"] is True
        tls.start_agent("sine:seed=7")
        with tls.admin() as client:
            deadline = time.monotonic() + 60
            while not any(d.online for d in client.devices()):
                assert time.monotonic() < deadline, "the agent did not connect over TLS"
                time.sleep(0.2)
            job_id = client.submit(job(1, min_nodes=1, local_steps=5)).job_id
            states = [info.state for info in client.watch(job_id, timeout=120)]
        assert states[-1] == "finished"
