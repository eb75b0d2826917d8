"""Device keys instead of bearer credentials (issue 10, rows 2 and 8).

Register is signed by the device key and carries a sequence number: the same key registers
again idempotently, a replayed request or another key is refused. Connect proves the key by
signing the coordinator's per-stream challenge, so a wrong signature or a proof replayed from
another stream is refused. The coordinator killed after committing a registration but before
replying (row 8) leaves an agent that comes online under its identity once the coordinator is
back. A device writes its own description over HTTP with a request signed by its key.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from server.harness import CoordinatorThread, FakeAgent, settings_for, signed_register

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.common.failpoints import ENV
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry
from tinyfleet.server.repository import Repository
from tinyfleet.simulations.local_fleet import LocalFleet

TD = "application/td+json"
PI = "urn:tinyfleet:device:pi-keyed"


def _td(device_id: str, ram_kb: int = 512) -> bytes:
    return json.dumps(device_thing_description(
        device_id, title=device_id.rsplit(":", 1)[-1], ram_kb=ram_kb, flash_kb=4096, device_class="mcu"
    )).encode()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorThread]:
    running = CoordinatorThread(settings_for(tmp_path / "coord"))
    try:
        yield running
    finally:
        running.stop()


def _error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def test_the_same_key_registers_again_a_replay_or_another_key_does_not(
    coordinator: CoordinatorThread,
) -> None:
    agent = coordinator.agent("urn:dev:keyed")
    first = agent.register()
    again = agent.register(enroll_token="")
    assert first.created and not again.created and again.node_id == first.node_id

    captured = agent.register_request(enroll_token="")
    assert agent.stub.Register(captured).node_id == first.node_id
    replayed = _error(agent.stub.Register, captured)  # the same signed bytes a second time
    assert replayed.code() == grpc.StatusCode.PERMISSION_DENIED and "replayed" in str(replayed.details())

    thief = coordinator.agent("urn:dev:keyed")  # holds a token, but not the device's key
    stolen = _error(thief.register)
    assert stolen.code() == grpc.StatusCode.PERMISSION_DENIED and "another key" in str(stolen.details())

    forged = thief.register_request()
    forged.public_key = agent.key.public_key  # claims the device's key, signs with its own
    assert _error(thief.stub.Register, forged).code() == grpc.StatusCode.UNAUTHENTICATED
    unsigned = fleet_pb2.RegisterRequest(description=forged.description, media_type=TD)
    assert _error(thief.stub.Register, unsigned).code() == grpc.StatusCode.UNAUTHENTICATED
    device = coordinator.coordinator.repo.get_device("urn:dev:keyed")
    assert device is not None and device.public_key == agent.key.public_key
    agent.channel.close()
    thief.channel.close()


def test_connect_with_a_wrong_signature_or_a_replayed_proof_is_refused(
    coordinator: CoordinatorThread,
) -> None:
    agent = coordinator.agent("urn:dev:prover")
    agent.register()
    agent.connect()
    proof = agent.hello  # a valid Hello, signed over the first stream's challenge
    assert proof is not None
    agent.close()

    replay = FakeAgent(coordinator.address, "urn:dev:prover", key=agent.key)
    replay.connect(hello=lambda _nonce: proof, wait=False)
    assert replay.ended.wait(10) and not replay.welcomed.is_set()
    assert replay.error is not None and replay.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "challenge" in str(replay.error.details())

    impostor = FakeAgent(coordinator.address, "urn:dev:prover")  # signs with a key of its own
    impostor.connect(wait=False)
    assert impostor.ended.wait(10) and impostor.error is not None
    assert impostor.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert coordinator.coordinator.hub.online_nodes() == set()

    honest = FakeAgent(coordinator.address, "urn:dev:prover", key=agent.key)
    honest.connect()  # a fresh signature over the new stream's challenge
    assert coordinator.coordinator.hub.online_nodes() == {agent.node_id}
    for each in (replay, impostor, honest):
        each.close()


@pytest.mark.slow
def test_a_crash_after_the_registration_commit_ends_with_the_agent_online_under_its_identity(
    tmp_path: Path,
) -> None:
    """Row 8: killed after the commit, before the reply. The agent never heard its node id; it
    registers again with the same key (its single-use token already spent) and comes online."""
    device_id = "urn:tinyfleet:test:crash-8"
    with LocalFleet(tmp_path) as fleet:
        fleet.start_server(env={ENV: "register.after-sql-commit"})
        agent = fleet.start_agent("sine:seed=1", device_id=device_id)
        assert fleet.server is not None and fleet.server.wait(60) == -signal.SIGKILL
        engine = open_database(default_url(fleet.data_dir))
        try:
            committed = Repository(engine).get_device(device_id)
        finally:
            engine.dispose()
        assert committed is not None, "the registration was committed before the kill"
        assert not (agent.state_dir / "identity.json").exists(), "the agent never got the reply"

        fleet.start_server()
        fleet.wait_online(1, timeout=120)
        assert agent.process.poll() is None, agent.log_path.read_text()
        [device] = fleet.admin().devices()
        assert (device.device_id, device.node_id, device.online) == (device_id, committed.node_id, True)
        identity = json.loads((agent.state_dir / "identity.json").read_text())
        assert (identity["device_id"], identity["node_id"]) == (device_id, committed.node_id)
        [enrollment] = fleet.admin().enrollments()
        assert enrollment.uses_left == 0  # one use, taken once


def test_a_device_writes_its_own_description_over_http_with_a_signed_request(tmp_path: Path) -> None:
    data_dir = tmp_path / "coord"
    # With an admin token: without one (--no-admin-token) a request with no credential is the admin's.
    registry = CoordinatorRegistry.open(data_dir, admin_token="device-keys-admin")
    thread = CoordinatorThread(settings_for(data_dir, http="127.0.0.1:0"), registry.hooks())
    try:
        agent = thread.agent(PI)
        other = thread.agent("urn:tinyfleet:device:pi-other")
        agent.register(_td(PI))
        other.register(_td("urn:tinyfleet:device:pi-other"))
        base = f"http://{thread.coordinator.http_address}"
        path = f"/things/{PI}"
        body = _td(PI, ram_kb=1024)

        def headers(signed_body: bytes = body, key: DeviceKey = agent.key, device: str = PI,
                    target: str = path, timestamp: int | None = None) -> dict[str, str]:
            signed = key.sign_request(device, "PUT", target, signed_body, timestamp)
            return {"authorization": signed.authorization(), "content-type": TD}

        good = headers()
        assert httpx.put(base + path, content=body, headers=good).status_code == 204
        assert httpx.get(base + path).json()["ramKB"] == 1024
        refusals = {
            "already used": good,  # a replay of the accepted request
            "from the coordinator's clock": headers(timestamp=int(time.time()) - 3600),
            "did not sign": headers(signed_body=_td(PI, ram_kb=64)),  # the body was changed
            "its own description": headers(device="urn:tinyfleet:device:pi-other"),
            "needs the admin token": {"content-type": TD},
        }
        for reason, sent in refusals.items():
            answer = httpx.put(base + path, content=body, headers=sent)
            assert answer.status_code == 401 and reason in answer.json()["detail"], (reason, answer.text)
        other_path = "/things/urn:tinyfleet:device:pi-other"
        foreign = headers(target=other_path)  # this device's key, another device's description
        assert httpx.put(base + other_path, content=body, headers=foreign).status_code == 401
        assert httpx.get(base + other_path).json()["ramKB"] == 512
        agent.channel.close()
        other.channel.close()
    finally:
        thread.stop()
        registry.registry.store.close()


def test_a_registration_signed_for_another_description_is_refused(coordinator: CoordinatorThread) -> None:
    key = DeviceKey.generate()
    request = signed_register(_td("urn:dev:a"), key, 1, coordinator.enroll_token)
    request.description = _td("urn:dev:b")  # swapped in transit
    agent = FakeAgent(coordinator.address, "urn:dev:b")
    assert _error(agent.stub.Register, request).code() == grpc.StatusCode.UNAUTHENTICATED
    assert coordinator.coordinator.repo.list_devices() == []
    agent.channel.close()
