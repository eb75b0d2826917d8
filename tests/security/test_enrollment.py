"""Issue 10, row 2: joining the fleet needs an enrollment token.

A rogue agent process without a token is refused (exit 2, the reason named) and never becomes a
node, so a job without `eligible` trains on the enrolled device only; tokens are checked and
consumed in the registration's transaction (uses, expiry, revocation), listed without the
secret, and operated through `tinyfleet server enroll`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server.harness import CoordinatorThread, FakeAgent, settings_for

from tinyfleet.cli import main
from tinyfleet.server.admin_client import AdminClient
from tinyfleet.simulations.local_fleet import LocalFleet

TOKEN = "enrollment-test-admin"

JOB = """
name = "enrolled-only"
strategy = "fedavg"
model = "sine-mlp"
rounds = 1

[round]
deadline_s = 60.0
min_nodes = 1
wait_for_nodes_s = 60.0

[train]
local_steps = 5
"""


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorThread]:
    running = CoordinatorThread(settings_for(tmp_path / "coord", admin_token=TOKEN))
    try:
        yield running
    finally:
        running.stop()


def _refusal(agent: FakeAgent, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        agent.register(**kwargs)  # type: ignore[arg-type]
    return info.value


@pytest.mark.slow
def test_a_rogue_agent_without_a_token_is_refused_and_never_becomes_a_node(tmp_path: Path) -> None:
    with LocalFleet(tmp_path) as fleet:
        fleet.start_server()
        rogue = fleet.start_agent("sine:seed=9", device_id="urn:tinyfleet:test:rogue", enroll_token="")
        assert rogue.process.wait(60) == 2
        log = rogue.log_path.read_text()
        assert "PERMISSION_DENIED" in log and "needs an enrollment token" in log
        assert not (rogue.state_dir / "identity.json").exists()

        enrolled = fleet.start_agent("sine:seed=1", device_id="urn:tinyfleet:test:enrolled")
        fleet.wait_online(1)
        assert [d.device_id for d in fleet.admin().devices()] == ["urn:tinyfleet:test:enrolled"]
        info = fleet.wait(fleet.submit(JOB))  # no `eligible`: every online node may take part
        assert info.state == "finished", info.reason
        [round_one] = json.loads(info.rounds_json)
        node_id = json.loads((enrolled.state_dir / "identity.json").read_text())["node_id"]
        assert {n["node_id"] for n in round_one["nodes"]} == {node_id}


def test_a_token_enrolls_as_many_new_devices_as_it_has_uses(coordinator: CoordinatorThread) -> None:
    token = coordinator.enroll(uses=2)
    first, second, third = (FakeAgent(coordinator.address, f"urn:dev:shelf-{i}", enroll_token=token)
                            for i in range(3))
    assert first.register().created and second.register().created
    refused = _refusal(third)
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no uses left" in refused.details()
    assert first.register(enroll_token="").node_id == first.node_id  # its own key needs no token
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:
        [listed] = admin.enrollments()
        assert (listed.uses_total, listed.uses_left) == (2, 0)
        assert [d.device_id for d in admin.devices()] == ["urn:dev:shelf-0", "urn:dev:shelf-1"]
    for agent in (first, second, third):
        agent.channel.close()


def test_an_expired_revoked_or_unknown_token_refuses_only_its_own_registration(
    coordinator: CoordinatorThread,
) -> None:
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:
        short = admin.enroll(uses=5, ttl_s=1.0, label="short").token
        revoked = admin.enroll(uses=5, ttl_s=3600, label="lost")
        good = admin.enroll(uses=5, ttl_s=3600, label="good").token
        assert admin.revoke_enrollment(revoked.enrollment.enrollment_id).revoked
        time.sleep(1.2)  # the short token's lifetime passes
        cases = {"expired at": short, "was revoked": revoked.token, "not one this coordinator": "tfe_made-up"}
        for expected, token in cases.items():
            agent = FakeAgent(coordinator.address, f"urn:dev:{expected.split()[0]}", enroll_token=token)
            refused = _refusal(agent)
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and expected in refused.details()
            agent.channel.close()
        allowed = FakeAgent(coordinator.address, "urn:dev:allowed", enroll_token=good)
        assert allowed.register().created
        allowed.channel.close()
        rows = {e.label: e for e in admin.enrollments()}
        assert rows["good"].uses_left == 4 and rows["lost"].revoked and rows["short"].uses_left == 5
        assert rows["short"].expires_at < time.time() < rows["good"].expires_at
        assert [d.device_id for d in admin.devices()] == ["urn:dev:allowed"]


def test_the_admin_token_registers_without_an_enrollment_token(coordinator: CoordinatorThread) -> None:
    agent = FakeAgent(coordinator.address, "urn:dev:by-operator")
    assert _refusal(agent).code() == grpc.StatusCode.PERMISSION_DENIED
    assert agent.register(metadata=(("authorization", f"Bearer {TOKEN}"),)).created
    agent.channel.close()


def test_server_enroll_issues_lists_and_revokes(
    coordinator: CoordinatorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    server = ["--server", coordinator.address, "--admin-token-file", str(token_file)]
    assert main(["server", "enroll", "--uses", "3", "--ttl", "2h", "--label", "shelf-3", *server]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("tfe_") and "\n" not in token and "shown only now" in err
    agent = FakeAgent(coordinator.address, "urn:dev:cli-enrolled", enroll_token=token)
    assert agent.register().created
    agent.channel.close()

    assert main(["server", "enroll", "--list", "--json", *server]) == 0
    listing = capsys.readouterr().out
    [row] = json.loads(listing)
    assert token not in listing
    assert (row["label"], row["uses_total"], row["uses_left"], row["revoked"]) == ("shelf-3", 3, 2, False)
    assert 7100 < row["expires_at"] - row["created_at"] <= 7200

    assert main(["server", "enroll", "--revoke", row["enrollment_id"], *server]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["server", "enroll", "--list", "--json", *server]) == 0
    assert json.loads(capsys.readouterr().out)[0]["revoked"] is True
    assert main(["server", "enroll", "--revoke", "nope", *server]) == 1
    assert "no enrollment 'nope'" in capsys.readouterr().err
    assert main(["server", "enroll", "--list", "--uses", "2", *server]) == 2


def test_server_enroll_refuses_a_bad_ttl_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["server", "enroll", "--ttl", "soon", "--server", "127.0.0.1:1"])
    assert done.value.code == 2 and "'soon' is not a positive duration" in capsys.readouterr().err


def test_open_enrollment_lets_a_device_join_without_a_token(coordinator: CoordinatorThread) -> None:
    fleet = coordinator.coordinator.fleet
    assert fleet is not None
    rogue = FakeAgent(coordinator.address, "urn:dev:lab")
    assert _refusal(rogue).code() == grpc.StatusCode.PERMISSION_DENIED
    fleet.open_enrollment = True  # what `server start --open-enrollment` sets
    assert rogue.register().created
    rogue.channel.close()


@pytest.mark.slow
def test_server_start_open_enrollment_warns_and_admits_devices_without_a_token(tmp_path: Path) -> None:
    with LocalFleet(tmp_path, server_args=["--open-enrollment"]) as fleet:
        fleet.start_server()
        assert "warning: --open-enrollment" in (fleet.logs / "server.log").read_text()
        fleet.start_agent("sine:seed=1", device_id="urn:tinyfleet:test:lab", enroll_token="")
        fleet.wait_online(1)
