"""Revocation: `tinyfleet server devices revoke ID` closes the device's stream with a Shutdown
naming the reason, and the coordinator refuses its key from then on (Register and Connect answer
PERMISSION_DENIED naming the revocation); the agent exits non-zero with that message instead of
retrying forever. Only the admin token re-admits the device, with a new key."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from server.harness import CoordinatorThread, FakeAgent

from tinyfleet.cli import main
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.server.admin_client import AdminClient
from tinyfleet.simulations.local_fleet import LocalFleet

TOKEN = "revocation-test-admin"


@pytest.mark.slow
def test_revoke_closes_the_stream_and_the_agent_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    device_id = "urn:tinyfleet:test:stolen"
    with LocalFleet(tmp_path) as fleet:
        fleet.start_server()
        agent = fleet.start_agent("sine:seed=1", device_id=device_id)
        fleet.wait_online(1)
        client = ["--server", fleet.address, "--admin-token-file", str(fleet.data_dir / "admin-token")]
        assert main(["server", "devices", "revoke", device_id, "--reason", "stolen", *client]) == 0
        assert f"device {device_id} revoked: stolen" in capsys.readouterr().out

        assert agent.process.wait(60) == 2
        log = agent.log_path.read_text()
        assert "coordinator shut down: device revoked: stolen" in log
        assert "PERMISSION_DENIED" in log and "was revoked: stolen" in log
        assert main(["server", "devices", "--json", *client]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert (row["device_id"], row["online"], row["revoked"], row["revoked_reason"]) == (
            device_id, False, True, "stolen"
        )

        key = DeviceKey.load(agent.state_dir / "device.key")  # what the thief holds
        thief = FakeAgent(fleet.address, device_id, key=key)
        with pytest.raises(grpc.RpcError) as refused:
            thief.register((agent.state_dir / "device.td.json").read_bytes())
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "was revoked: stolen" in str(refused.value.details())
        thief.connect(wait=False)
        assert thief.ended.wait(10) and thief.error is not None
        assert thief.error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in str(thief.error.details())
        thief.close()

        fleet.restart_agent(agent)  # the agent started again on its state dir: still refused
        assert agent.process.wait(60) == 2


def test_a_revoked_device_is_refused_until_the_operator_gives_it_a_new_key(
    coordinator: CoordinatorThread,
) -> None:
    agent = coordinator.agent("urn:dev:lost")
    agent.register()
    agent.connect()
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:
        with pytest.raises(grpc.RpcError) as unknown:
            admin.revoke_device("urn:dev:never")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        info = admin.revoke_device("urn:dev:lost", "left on a train")
        assert info.revoked and info.revoked_reason == "left on a train"
    assert agent.ended.wait(10)
    assert agent.frames[-1].shutdown.reason == "device revoked: left on a train"
    assert coordinator.coordinator.hub.online_nodes() == set()

    again = FakeAgent(coordinator.address, "urn:dev:lost", key=agent.key)
    again.connect(wait=False)
    assert again.ended.wait(10) and again.error is not None
    assert again.error.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as same_key:  # not even the admin token revives the old key
        again.register(metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert same_key.value.code() == grpc.StatusCode.PERMISSION_DENIED

    reflashed = FakeAgent(coordinator.address, "urn:dev:lost")  # a new key, admitted by the operator
    assert reflashed.register(metadata=(("authorization", f"Bearer {TOKEN}"),)).node_id == agent.node_id
    reflashed.connect()
    assert coordinator.coordinator.hub.online_nodes() == {agent.node_id}
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:
        [device] = admin.devices()
        assert not device.revoked and device.online
    for each in (agent, again, reflashed):
        each.close()
