"""Issue 10, row 2: joining the fleet needs an enrollment token.

A rogue agent process without a token is refused (exit 2, the reason named) and never becomes a
node, so a job without `eligible` trains on the enrolled device only; tokens are checked and
consumed in the registration's transaction (uses, expiry, revocation), listed without the
secret, and operated through `tinyfleet server enroll`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from server.harness import TD, CoordinatorThread, FakeAgent, settings_for, thing

from tinyfleet.cli import main
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.admin_client import AdminClient
from tinyfleet.server.auth import FailedAuthLimiter
from tinyfleet.server.daemon import Hooks
from tinyfleet.server.descriptions import DescriptionError, DescriptionLimits, describe_device, describe_each
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
    assert "no uses left" in str(refused.details())
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
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and expected in str(refused.details())
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
    token_file.chmod(0o600)  # a token file others can read is refused
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


class _Recorder:
    """The coordinator's baseline validation, noting which descriptions reached it."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self._describe = describe_each(describe_device)

    def __call__(self, items: Sequence[tuple[bytes, str]]) -> list[tuple[str, bytes] | DescriptionError]:
        self.seen.extend(description for description, _ in items)
        return self._describe(items)


def _recording_coordinator(tmp_path: Path, **hooks: Any) -> tuple[CoordinatorThread, _Recorder]:
    recorder = _Recorder()
    running = CoordinatorThread(
        settings_for(tmp_path / "coord", admin_token=TOKEN), Hooks(describe_devices=recorder, **hooks)
    )
    return running, recorder


def test_a_caller_that_may_not_join_is_refused_before_its_description_is_validated(tmp_path: Path) -> None:
    """No token, an unknown, used-up or revoked one, the key of a revoked device: refused by
    the admission pre-check, each naming why, and not one of those descriptions reaches
    validation (before, all did, and only the SQL admission after validation refused them).
    The tokens that were no good count as failed authentications; joining without one guesses
    nothing and is never limited."""
    limiter = FailedAuthLimiter(max_failures=3)
    running, recorder = _recording_coordinator(tmp_path, auth_failures=limiter)
    try:
        one_use = running.enroll(uses=1)
        lost = running.enroll(uses=5)
        with AdminClient(running.address, admin_token=TOKEN) as admin:
            [lost_row] = [e for e in admin.enrollments() if e.uses_total == 5]
            admin.revoke_enrollment(lost_row.enrollment_id)
        member = FakeAgent(running.address, "urn:dev:member", enroll_token=one_use)
        assert member.register().created  # takes the token's one use
        assert member.register(enroll_token="").node_id == member.node_id  # its known key suffices
        with AdminClient(running.address, admin_token=TOKEN) as admin:
            admin.revoke_device("urn:dev:member", "stolen")
        allowed = list(recorder.seen)
        cases = {
            "needs an enrollment token": FakeAgent(running.address, "urn:dev:a"),
            "not one this coordinator issued": FakeAgent(running.address, "urn:dev:b", enroll_token="tfe_x"),
            "no uses left": FakeAgent(running.address, "urn:dev:c", enroll_token=one_use),
            "was revoked": FakeAgent(running.address, "urn:dev:d", enroll_token=lost),
            "'urn:dev:member' was revoked: stolen": member,
        }
        for expected, agent in cases.items():
            refused = _refusal(agent, enroll_token="") if agent is member else _refusal(agent)
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, expected
            assert expected in str(refused.details()), refused.details()
        assert recorder.seen == allowed
        assert limiter.retry_after("127.0.0.1") > 0  # the three bad tokens used the budget
        tokenless = FakeAgent(running.address, "urn:dev:e")
        assert _refusal(tokenless).code() == grpc.StatusCode.PERMISSION_DENIED
        guesser = FakeAgent(running.address, "urn:dev:f", enroll_token="tfe_y")
        assert _refusal(guesser).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert recorder.seen == allowed
        for agent in (member, tokenless, guesser, *cases.values()):
            agent.channel.close()
    finally:
        running.stop()


def test_an_oversized_description_is_refused_first_by_the_coordinators_one_limit(tmp_path: Path) -> None:
    """The limits the coordinator is given (Hooks.limits, the registry's) bound Register before
    signature, admission or validation; the large lane is chosen by the same object."""
    limits = DescriptionLimits(max_bytes=2_000, large_bytes=600)
    running, recorder = _recording_coordinator(tmp_path, limits=limits)
    try:
        fleet = running.coordinator.fleet
        assert fleet is not None and fleet.limits is limits
        agent = running.agent("urn:dev:sized")
        padded = thing("urn:dev:sized")[:-1] + b', "note": "' + b"x" * 2_500 + b'"}'
        refused = _refusal(agent, description=padded)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"{len(padded)} bytes; the coordinator accepts at most 2000" in str(refused.details())
        unsigned = fleet_pb2.RegisterRequest(description=padded, media_type=TD)  # no key, no token
        with pytest.raises(grpc.RpcError) as info:
            agent.stub.Register(unsigned, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert recorder.seen == []

        large = thing("urn:dev:sized")[:-1] + b', "note": "' + b"x" * 1_000 + b'"}'
        assert agent.register(large).created and agent.register().node_id == agent.node_id
        assert (fleet._large_validations.items, fleet._validations.items) == (1, 1)
        assert running.coordinator.hooks.auth_failures.retry_after("127.0.0.1") == 0
        agent.channel.close()
    finally:
        running.stop()


def test_an_admin_register_that_does_not_re_key_leaves_a_revocation_standing(tmp_path: Path) -> None:
    """The operator revokes a device just as an admin Register of it (same key) commits: the
    hub must keep refusing it. Only re-keying a revoked device reinstates it (before, every
    admin Register reinstated its device in the hub)."""
    running = CoordinatorThread(settings_for(tmp_path / "coord", admin_token=TOKEN))
    try:
        coordinator = running.coordinator
        agent = running.agent("urn:dev:raced")
        agent.register()
        revoke_after_commit = [True]

        def revoke_now() -> None:  # after the admin Register's commit, before its reply
            if revoke_after_commit and revoke_after_commit.pop():
                coordinator.repo.revoke_device("urn:dev:raced", "lost")
                coordinator.hub.revoke("urn:dev:raced", "lost")

        coordinator.repo.on_outbox(revoke_now)
        admin = (("authorization", f"Bearer {TOKEN}"),)
        agent.register(metadata=admin)
        assert coordinator.hub.revoked("urn:dev:raced") == "lost"

        agent.key = DeviceKey.generate()  # the operator gives it a new key: reinstated
        agent.register(metadata=admin)
        assert coordinator.hub.revoked("urn:dev:raced") is None
        agent.connect()
        agent.close()
    finally:
        running.stop()


def test_a_token_passes_the_pre_check_unasked_only_as_often_as_it_had_uses(tmp_path: Path) -> None:
    """The pre-check remembers a token's spare uses for a moment (a burst enrolling with one
    token asks SQL once), but never lets it through more often than it had uses: the caller
    after the last use is refused before its description is validated."""
    running, recorder = _recording_coordinator(tmp_path)
    try:
        token = running.enroll(uses=2)
        first, second = (FakeAgent(running.address, f"urn:dev:t{n}", enroll_token=token) for n in (1, 2))
        assert first.register().created and second.register().created
        validated = list(recorder.seen)
        third = FakeAgent(running.address, "urn:dev:t3", enroll_token=token)
        refused = _refusal(third)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no uses left" in str(refused.details())
        assert recorder.seen == validated  # refused before validation
        for agent in (first, second, third):
            agent.channel.close()
    finally:
        running.stop()
