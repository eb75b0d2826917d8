"""Fleet and Admin services over real gRPC: registration, device keys, streams, artifacts,
admin token, HTTP JSON API, and the whole path over TLS with a throwaway CA."""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.admin_client import AdminClient
from tinyfleet.server.daemon import READY_FILE

from .harness import (
    TD,
    CoordinatorThread,
    FakeAgent,
    settings_for,
    signed_register,
    thing,
    throwaway_ca,
)

TOKEN = "s3cret-admin"


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorThread]:
    running = CoordinatorThread(settings_for(tmp_path / "coord", http="127.0.0.1:0", admin_token=TOKEN))
    try:
        yield running
    finally:
        running.stop()


def _code(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__"):
            list(result)
    return info.value


def test_ready_file_names_the_bound_ports_and_stop_sends_shutdown_and_removes_it(tmp_path: Path) -> None:
    running = CoordinatorThread(settings_for(tmp_path / "c", http="127.0.0.1:0"))
    ready = json.loads((tmp_path / "c" / READY_FILE).read_text())
    assert ready["listen"] == running.address and not ready["listen"].endswith(":0")
    assert ready["http"].startswith("127.0.0.1:") and ready["tls"] is False and ready["pid"] > 0
    agent = running.agent("urn:dev:stopping")
    agent.register()
    agent.connect()
    running.stop()
    assert not (tmp_path / "c" / READY_FILE).exists()
    assert agent.ended.wait(10)
    assert agent.frames[-1].shutdown.reason == "coordinator shutting down"
    agent.close()


def test_register_is_idempotent_with_the_same_key_and_refused_with_another(
    coordinator: CoordinatorThread,
) -> None:
    agent = coordinator.agent("urn:dev:pi-1")
    first = agent.register()
    assert first.created and first.node_id > 1
    again = agent.register(thing("urn:dev:pi-1").replace(b'"title"', b'"description": "v2", "title"'),
                           enroll_token="")
    assert not again.created and again.node_id == first.node_id
    stored = coordinator.coordinator.repo.get_device("urn:dev:pi-1")
    assert stored is not None and b"v2" in stored.description and stored.public_key == agent.key.public_key

    intruder = coordinator.agent("urn:dev:pi-1")  # a token, but another key
    error = _code(intruder.register)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "another key" in str(error.details())
    assert b"v2" in coordinator.coordinator.repo.get_device("urn:dev:pi-1").description  # type: ignore[union-attr]

    # The admin token may re-key a device whose key was lost.
    response = intruder.register(metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert response.node_id == first.node_id and not response.created
    assert coordinator.coordinator.repo.get_device("urn:dev:pi-1").public_key == intruder.key.public_key  # type: ignore[union-attr]
    assert _code(agent.register).code() == grpc.StatusCode.PERMISSION_DENIED  # the old key is out
    agent.channel.close()
    intruder.channel.close()


@pytest.mark.parametrize(
    ("description", "media_type", "expected"),
    [
        (b"{not json", TD, "not valid JSON"),
        (b'{"title": "no id"}', TD, "/@context: missing"),
        (b"<urn:a> <urn:b> ", "text/turtle", "not valid Turtle"),
        (b"<urn:a> <urn:b> <urn:c> .", "text/turtle", "no subject is typed as a device"),
        (b"{}", "image/png", "unsupported media type"),
    ],
)
def test_malformed_descriptions_are_refused_and_nothing_is_stored(
    coordinator: CoordinatorThread, description: bytes, media_type: str, expected: str
) -> None:
    agent = coordinator.agent("urn:dev:malformed")
    request = signed_register(description, agent.key, 1, agent.enroll_token, media_type)
    error = _code(agent.stub.Register, request)
    agent.channel.close()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in str(error.details())
    assert coordinator.coordinator.repo.list_devices() == []


def test_turtle_descriptions_name_their_device(coordinator: CoordinatorThread) -> None:
    turtle = b"""@prefix td: <https://www.w3.org/2019/wot/td#> . @prefix tf: <https://w3id.org/tinyfleet#> .
        <urn:dev:ttl-1> a td:Thing ; td:title "pi" ; tf:ramKB 512 ; tf:flashKB 1024 ."""
    agent = coordinator.agent("urn:dev:ttl-1")
    response = agent.stub.Register(signed_register(turtle, agent.key, 1, agent.enroll_token, "text/turtle"))
    agent.channel.close()
    assert response.device_id == "urn:dev:ttl-1" and response.created


def test_connect_checks_the_key_and_device_identity(coordinator: CoordinatorThread) -> None:
    alice = coordinator.agent("urn:dev:alice")
    bob = coordinator.agent("urn:dev:bob")
    alice.register()
    bob.register()

    wrong = FakeAgent(coordinator.address, "urn:dev:alice")  # a key the coordinator never saw
    wrong.connect(wait=False)
    assert wrong.ended.wait(10) and wrong.error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[union-attr]

    # Bob's key does not let him speak for Alice.
    bob.connect(hello=lambda nonce: bob.signed_hello(nonce, "urn:dev:alice"), wait=False)
    assert bob.ended.wait(10) and bob.error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[union-attr]
    assert coordinator.coordinator.hub.online_nodes() == set()

    alice.connect()
    assert coordinator.coordinator.hub.online_nodes() == {alice.node_id}
    assert [f.WhichOneof("kind") for f in alice.frames[:2]] == ["challenge", "welcome"]
    assert alice.frames[1].welcome.node_id == alice.node_id
    assert alice.frames[1].welcome.heartbeat_interval_s == 2.0
    for agent in (alice, bob, wrong):
        agent.close()


def test_second_connect_replaces_the_first_and_unknown_frames_are_ignored(
    coordinator: CoordinatorThread,
) -> None:
    first = coordinator.agent("urn:dev:twice")
    first.register()
    first.connect()
    first.send(fleet_pb2.AgentFrame())  # no kind set: logged and ignored
    first.send(fleet_pb2.AgentFrame(heartbeat=fleet_pb2.Heartbeat()))
    second = FakeAgent(coordinator.address, "urn:dev:twice", key=first.key)
    second.node_id = first.node_id
    second.connect()
    assert first.ended.wait(10)
    assert first.frames[-1].WhichOneof("kind") == "shutdown"
    assert "replaced" in first.frames[-1].shutdown.reason
    assert coordinator.coordinator.hub.online_nodes() == {first.node_id}
    assert coordinator.coordinator.repo.get_device("urn:dev:twice").online  # type: ignore[union-attr]
    first.close()
    second.close()


def test_get_artifact_streams_chunks_with_resume_and_needs_a_signed_request(
    coordinator: CoordinatorThread,
) -> None:
    blob = bytes(range(256)) * 40
    sha = coordinator.coordinator.store.put(blob)
    agent = coordinator.agent("urn:dev:dl")
    agent.register()

    def signed(artifact: str) -> tuple[tuple[str, str], ...]:
        return agent.key.sign_request("urn:dev:dl", "GetArtifact", artifact).metadata()

    request = fleet_pb2.GetArtifactRequest(sha256=sha, offset=0, chunk_size=4000)
    chunks = list(agent.stub.GetArtifact(request, metadata=signed(sha)))
    assert [c.offset for c in chunks] == [0, 4000, 8000]
    assert b"".join(c.data for c in chunks) == blob
    assert {(c.total_size, c.sha256) for c in chunks} == {(len(blob), sha)}
    resumed = agent.stub.GetArtifact(fleet_pb2.GetArtifactRequest(sha256=sha, offset=9000),
                                     metadata=signed(sha))
    assert b"".join(c.data for c in resumed) == blob[9000:]

    unknown = fleet_pb2.GetArtifactRequest(sha256="a" * 64)
    missing = _code(agent.stub.GetArtifact, unknown, metadata=signed("a" * 64))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert _code(agent.stub.GetArtifact, request).code() == grpc.StatusCode.UNAUTHENTICATED
    other = FakeAgent(coordinator.address, "urn:dev:dl")  # not the device's key
    forged = other.key.sign_request("urn:dev:dl", "GetArtifact", sha).metadata()
    assert _code(agent.stub.GetArtifact, request, metadata=forged).code() == grpc.StatusCode.UNAUTHENTICATED
    for_another = _code(agent.stub.GetArtifact, request, metadata=signed("b" * 64))
    assert for_another.code() == grpc.StatusCode.UNAUTHENTICATED
    other.channel.close()
    admin = [("authorization", f"Bearer {TOKEN}")]
    assert b"".join(c.data for c in agent.stub.GetArtifact(request, metadata=admin)) == blob
    agent.channel.close()


def test_admin_calls_need_the_token_and_bad_jobs_are_refused_by_the_server(
    coordinator: CoordinatorThread,
) -> None:
    with AdminClient(coordinator.address, admin_token="wrong") as client:
        assert _code(client.jobs).code() == grpc.StatusCode.UNAUTHENTICATED
    with AdminClient(coordinator.address) as client:
        assert _code(client.devices).code() == grpc.StatusCode.UNAUTHENTICATED
    with AdminClient(coordinator.address, admin_token=TOKEN) as client:
        error = _code(client.submit, 'strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 0\n')
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'rounds'" in str(error.details())
        error = _code(client.submit, 'strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n'
                                     '[options]\nbogus = 1\n')
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.bogus" in str(error.details())
        error = _code(client.submit, 'strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n'
                                     '[round]\neligible = "SELECT ?d WHERE {}"\n')
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "round.eligible" in str(error.details())
        assert client.jobs() == []
        assert _code(client.job, "42").code() == grpc.StatusCode.NOT_FOUND
        assert _code(client.job, "x").code() == grpc.StatusCode.INVALID_ARGUMENT


def test_http_api_serves_health_jobs_and_devices(coordinator: CoordinatorThread) -> None:
    agent = coordinator.agent("urn:dev:web")
    agent.register()
    agent.connect()
    base = f"http://{coordinator.coordinator.http_address}"
    health = httpx.get(f"{base}/healthz").json()
    assert (health["status"], health["online_nodes"], health["outbox"]["lag"]) == ("ok", 1, 0)
    admin = {"authorization": f"Bearer {TOKEN}"}  # /api/* needs the admin token, as its gRPC twins
    [device] = httpx.get(f"{base}/api/devices", headers=admin).json()
    assert device["device_id"] == "urn:dev:web" and device["online"] is True
    assert httpx.get(f"{base}/api/jobs", headers=admin).json() == []
    assert httpx.get(f"{base}/api/jobs/7", headers=admin).status_code == 404
    assert httpx.get(f"{base}/api/jobs/x", headers=admin).status_code == 400
    agent.close()


def test_fleet_path_over_tls_with_a_throwaway_ca(tmp_path: Path) -> None:
    ca, cert, key = throwaway_ca(tmp_path)
    running = CoordinatorThread(settings_for(tmp_path / "c", tls_cert=cert, tls_key=key,
                                             http="127.0.0.1:0"))
    try:
        assert json.loads((tmp_path / "c" / READY_FILE).read_text())["tls"] is True
        trusted = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        agent = running.agent("urn:dev:tls", channel_credentials=trusted)
        agent.register()
        agent.connect()
        grid = running.coordinator.grid
        assert grid.wait_for_nodes(1, 10) == 1
        with AdminClient(running.address, ca=ca) as client:
            assert [d.device_id for d in client.devices()] == ["urn:dev:tls"]
        verify = ssl.create_default_context(cafile=str(ca))
        health = httpx.get(f"https://{running.coordinator.http_address}/healthz", verify=verify)
        assert health.json()["online_nodes"] == 1
        agent.close()

        # A client that does not trust the CA cannot even register.
        untrusted = FakeAgent(running.address, "urn:dev:mallory",
                              channel_credentials=grpc.ssl_channel_credentials())
        with pytest.raises(grpc.RpcError) as info:
            untrusted.register()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        untrusted.channel.close()
    finally:
        running.stop()


def test_a_silent_stream_is_closed_after_missed_heartbeats_and_marked_offline(tmp_path: Path) -> None:
    running = CoordinatorThread(settings_for(tmp_path / "c", heartbeat_interval_s=0.2))
    try:
        quiet = running.agent("urn:dev:quiet")  # sends no heartbeats
        quiet.register()
        quiet.connect()
        assert quiet.ended.wait(10)  # 3 missed heartbeats (0.6 s) end the stream
        grid = running.coordinator.grid
        assert grid.wait_for_nodes(1, 0.1) == 0
        device = running.coordinator.repo.get_device("urn:dev:quiet")
        assert device is not None and not device.online and device.last_seen is not None
        quiet.close()
    finally:
        running.stop()


def _hello(agent: FakeAgent, **declared: object):
    """A Hello signed by `agent` that also declares `agent_version` and/or `handlers`."""
    def make(nonce: bytes) -> fleet_pb2.Hello:
        hello = agent.signed_hello(nonce)
        return fleet_pb2.Hello(device_id=hello.device_id, signature=hello.signature, **declared)  # type: ignore[arg-type]
    return make


def test_keepalive_pings_give_round_trips_that_devices_lists_with_the_agent_version(tmp_path: Path) -> None:
    running = CoordinatorThread(settings_for(tmp_path / "c", heartbeat_interval_s=0.1, admin_token=TOKEN))
    try:
        agent = running.agent("urn:dev:pinged", answers_pings=True)
        agent.register()
        agent.connect(hello=_hello(agent, agent_version="9.8.7", handlers=["train", "evaluate"]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(f.HasField("ping") for f in agent.frames) < 4:
            time.sleep(0.05)
        time.sleep(0.2)  # the last pong's way back
        with AdminClient(running.address, admin_token=TOKEN) as client:
            [info] = client.devices()
        assert info.online and info.agent_version == "9.8.7" and list(info.handlers) == ["evaluate", "train"]
        assert 0 < info.rtt_ms <= info.rtt_max_ms < 1000
        assert running.coordinator.repo.get_device("urn:dev:pinged").agent_version == "9.8.7"  # type: ignore[union-attr]
        nonces = {f.ping.nonce for f in agent.frames if f.HasField("ping")}
        assert len(nonces) >= 4  # a fresh nonce each time: a pong answers one ping only

        agent.close()  # offline: the version stays, the stream's figures go
        deadline = time.monotonic() + 10
        while running.coordinator.hub.online_nodes() and time.monotonic() < deadline:
            time.sleep(0.05)
        with AdminClient(running.address, admin_token=TOKEN) as client:
            [info] = client.devices()
        assert not info.online and info.agent_version == "9.8.7"
        assert info.rtt_ms == 0 and not info.handlers
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ({"agent_version": "v" * 65}, "agent_version is 65 characters; at most 64"),
        ({"handlers": [f"query.t{i}" for i in range(257)]}, "257 handlers; at most 256"),
        ({"handlers": ["train", "x" * 129]}, "must have 1 to 128 characters"),
    ],
)
def test_a_hello_declaring_too_much_is_refused_by_name(
    coordinator: CoordinatorThread, declared: dict[str, object], expected: str
) -> None:
    agent = coordinator.agent("urn:dev:verbose")
    agent.register()
    agent.connect(hello=_hello(agent, **declared), wait=False)
    assert agent.ended.wait(10) and agent.error is not None
    assert agent.error.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in str(agent.error.details())
    assert coordinator.coordinator.hub.online_nodes() == set()
    agent.close()


def test_an_unforeseen_error_in_the_stream_reader_is_a_warning_with_its_traceback(
    coordinator: CoordinatorThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = coordinator.agent("urn:dev:unlucky")
    agent.register()
    agent.connect()

    def broken(device_id: str) -> None:
        raise RuntimeError("liveness bookkeeping broke")

    monkeypatch.setattr(coordinator.coordinator.hub, "touch", broken)
    with caplog.at_level(logging.WARNING, logger="tinyfleet.server.fleet_service"):
        agent.send(fleet_pb2.AgentFrame(heartbeat=fleet_pb2.Heartbeat()))
        assert agent.ended.wait(10)  # this stream ends: nothing is known about its state
    [record] = [r for r in caplog.records if "reading its stream failed" in r.getMessage()]
    assert record.levelno == logging.WARNING and "urn:dev:unlucky" in record.getMessage()
    assert record.exc_info is not None and "liveness bookkeeping broke" in str(record.exc_info[1])
    agent.close()


def test_a_heartbeat_interval_that_is_not_positive_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="heartbeat interval must be positive, got 0 s"):
        CoordinatorThread(settings_for(tmp_path / "c", heartbeat_interval_s=0.0))
    running = CoordinatorThread(settings_for(tmp_path / "c"))  # the failed start left nothing held
    running.stop()
