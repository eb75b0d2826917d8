"""The agent against an in-process fake coordinator: every path of the fleet protocol."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import grpc
import torch
from fake_fleet import FakeFleet
from flwr.app import ConfigRecord, Context, Message, RecordDict

from tinyfleet.client.handlers import HandlerRegistry, default_handlers
from tinyfleet.client.state_dir import Identity, StateDir
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import (
    ERR_HANDLER_FAILED,
    ERR_MESSAGE_TOO_LARGE,
    ERR_UNKNOWN_MESSAGE_TYPE,
    message_from_bytes,
    message_to_bytes,
    new_instruction,
    reply_with_content,
    stamp,
)
from tinyfleet.common.models import build_model
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

DEVICE = "urn:dev:pi-01"


def task(message_type: str, node_id: int, content: RecordDict | None = None,
         deadline_s: float = 30.0) -> tuple[str, fleet_pb2.Task]:
    message = new_instruction(content or RecordDict(), message_type, node_id, run_id=5)
    mid = stamp(message, run_id=5)
    wire = message_to_bytes(message)
    return mid, fleet_pb2.Task(message_id=mid, flower_message=wire, deadline_s=deadline_s)


def train_content(steps: int = 3) -> tuple[RecordDict, dict[str, torch.Tensor]]:
    model = build_model("sine-mlp", seed=0)
    config = ConfigRecord({"model": "sine-mlp", "local_steps": steps, "batch_size": 4, "lr": 0.05})
    return RecordDict({"arrays": to_array_record(model), "config": config}), model.state_dict()


def counting_registry(log: list[str], gate: threading.Event | None = None) -> HandlerRegistry:
    """A 'count' handler that keeps a counter in context.state and may block on `gate`."""
    registry = HandlerRegistry()

    @registry.register("query.count")
    def count(message: Message, context: Context) -> Message:
        log.append(f"start {message.metadata.message_id}")
        if gate is not None:
            assert gate.wait(10)
        record = context.state.config_records.get("counter", ConfigRecord({"n": 0}))
        count = record["n"]
        assert isinstance(count, int)
        record["n"] = count + 1
        context.state["counter"] = record
        log.append(f"end {message.metadata.message_id}")
        return reply_with_content(message, RecordDict({"counter": ConfigRecord({"n": record["n"]})}))

    return registry


def counter_of(reply: fleet_pb2.Reply) -> int:
    count = message_from_bytes(reply.flower_message).content.config_records["counter"]["n"]
    assert isinstance(count, int)
    return count


def test_registers_connects_heartbeats_and_stops_cleanly(fleet: FakeFleet, start_agent) -> None:
    agent = start_agent()
    conn = fleet.wait_connections(1)  # the fake checked the Hello's signature over its challenge
    assert conn.hello.device_id == DEVICE and len(conn.hello.signature) == 64
    assert {"train", "evaluate", "query"} <= set(conn.hello.handlers)
    request = fleet.registrations[0]
    assert request.media_type == "application/td+json" and request.enrollment_token == ""
    assert json.loads(request.description)["id"] == DEVICE
    key_file = agent.state_dir.key_path  # made before the first registration, private to the device
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert request.public_key == agent.state_dir.device_key().public_key == fleet.keys[DEVICE]
    conn.wait_for("heartbeat", count=3)
    identity = agent.state_dir.load_identity()
    assert identity is not None
    assert (identity.device_id, identity.node_id) == (DEVICE, fleet.node_ids[DEVICE])
    status = agent.state_dir.read_status()
    assert status is not None and status["connected"] and status["node_id"] == conn.node_id
    assert agent.stop() == 0
    assert conn.ended.wait(5), "the agent did not close its stream"
    assert agent.state_dir.read_status() is None


def test_train_task_is_answered_with_trained_arrays(fleet: FakeFleet, start_agent) -> None:
    start_agent()
    conn = fleet.wait_connections(1)
    content, sent = train_content(steps=3)
    mid, frame = task("train", conn.node_id, content)
    conn.send(task=frame)
    reply = conn.reply_to(mid)
    assert reply.compute_seconds > 0
    message = message_from_bytes(reply.flower_message)
    assert not message.has_error(), message.error.reason if message.has_error() else ""
    assert message.metadata.reply_to_message_id == mid
    assert message.metadata.src_node_id == conn.node_id and message.metadata.run_id == 5
    arrays = message.content.array_records["arrays"]
    assert set(arrays) == set(sent)
    assert not torch.equal(torch.from_numpy(arrays["0.weight"].numpy()), sent["0.weight"])
    assert message.content.metric_records["metrics"]["num-examples"] == 12


def test_unknown_type_and_undecodable_tasks_get_error_replies(fleet: FakeFleet, start_agent) -> None:
    start_agent(handlers=counting_registry([]))  # handles query.count only
    conn = fleet.wait_connections(1)
    mid, frame = task("evaluate.teleport", conn.node_id)
    conn.send(task=frame)
    error = message_from_bytes(conn.reply_to(mid).flower_message)
    assert error.has_error() and error.error.code == ERR_UNKNOWN_MESSAGE_TYPE
    assert "evaluate.teleport" in str(error.error.reason) and error.metadata.reply_to_message_id == mid
    conn.send(task=fleet_pb2.Task(message_id="garbled", flower_message=b"\x0a\xff\xff", deadline_s=5))
    garbled = message_from_bytes(conn.reply_to("garbled").flower_message)
    assert garbled.error.code == ERR_HANDLER_FAILED and "could not decode" in str(garbled.error.reason)
    conn.send(ping=fleet_pb2.Ping(nonce=99))  # and the agent carries on
    conn.wait_for("pong", lambda f: f.pong.nonce == 99)


def test_oversized_reply_is_replaced_by_an_error_naming_size_and_limit(fleet: FakeFleet, start_agent) -> None:
    fleet.max_message_bytes = 4000  # the sine MLP's arrays alone are ~17 kB
    start_agent()
    conn = fleet.wait_connections(1)
    content, _ = train_content(steps=1)
    mid, frame = task("train", conn.node_id, content)
    conn.send(task=frame)
    reply = conn.reply_to(mid)
    assert len(reply.flower_message) < 4000
    error = message_from_bytes(reply.flower_message)
    assert error.error.code == ERR_MESSAGE_TOO_LARGE
    assert "limit of 4000 bytes" in str(error.error.reason) and "'train'" in str(error.error.reason)


def test_pings_are_answered_while_tasks_run_one_at_a_time_in_order(fleet: FakeFleet, start_agent) -> None:
    log: list[str] = []
    gate = threading.Event()
    start_agent(handlers=counting_registry(log, gate))
    conn = fleet.wait_connections(1)
    first, frame1 = task("query.count", conn.node_id)
    second, frame2 = task("query.count", conn.node_id)
    conn.send(task=frame1)
    conn.send(task=frame2)
    conn.send(ping=fleet_pb2.Ping(nonce=7))
    conn.wait_for("pong", lambda f: f.pong.nonce == 7)  # answered while the handler is blocked
    beats_before = len(conn.wait_for("heartbeat"))
    conn.wait_for("heartbeat", count=beats_before + 1)
    assert log == [f"start {first}"]
    gate.set()
    assert counter_of(conn.reply_to(first)) == 1 and counter_of(conn.reply_to(second)) == 2
    assert log == [f"start {first}", f"end {first}", f"start {second}", f"end {second}"]


def test_reconnects_after_restart_on_the_same_port_keeping_context(
    fleet: FakeFleet, start_agent, tmp_path: Path
) -> None:
    agent = start_agent(handlers=counting_registry([]))
    conn = fleet.wait_connections(1)
    mid, frame = task("query.count", conn.node_id)
    conn.send(task=frame)
    assert counter_of(conn.reply_to(mid)) == 1
    fleet.stop()
    assert conn.ended.wait(5)
    time.sleep(0.3)  # let the agent fail a few attempts while nobody listens
    fleet.start()
    conn2 = fleet.wait_connections(2)
    assert len(fleet.registrations) == 1  # the restarted coordinator still knows the key
    assert conn2.hello.signature != conn.hello.signature  # signed over a fresh challenge
    mid2, frame2 = task("query.count", conn2.node_id)
    conn2.send(task=frame2)
    assert counter_of(conn2.reply_to(mid2)) == 2  # the same Context across connections
    status = agent.state_dir.read_status()
    assert status is not None and status["connected"]
    assert agent.stop() == 0


def test_stream_end_and_shutdown_frame_lead_to_reconnection(fleet: FakeFleet, start_agent) -> None:
    start_agent()
    fleet.wait_connections(1).end()
    conn2 = fleet.wait_connections(2)
    asked_at = time.monotonic()
    conn2.send(shutdown=fleet_pb2.Shutdown(reason="maintenance", reconnect_after_s=0.5))
    fleet.wait_connections(3)
    assert time.monotonic() - asked_at >= 0.5  # the coordinator's hint is honoured


def test_unauthenticated_connect_registers_again_with_the_same_key(
    fleet: FakeFleet, start_agent
) -> None:
    agent = start_agent()
    conn = fleet.wait_connections(1)
    old = fleet.keys.pop(DEVICE)  # the coordinator lost its records
    conn.end()
    fleet.wait_connections(2)
    assert [r.public_key for r in fleet.registrations] == [old, old] and fleet.keys[DEVICE] == old
    first, again = fleet.registrations
    assert again.sequence > first.sequence  # never the same signed request twice
    assert len(fleet.refused) == 1
    identity = agent.state_dir.load_identity()
    assert identity is not None and identity.node_id == fleet.node_ids[DEVICE]


def test_the_enrollment_token_is_presented_under_the_signature(fleet: FakeFleet, start_agent) -> None:
    start_agent(enroll_token="tfe_secret")
    fleet.wait_connections(1)  # the fake verified the signature, which covers the token
    assert fleet.registrations[0].enrollment_token == "tfe_secret"


def test_a_revoked_device_stops_with_the_reason(fleet: FakeFleet, start_agent, caplog) -> None:
    agent = start_agent()
    conn = fleet.wait_connections(1)
    fleet.register_error = (grpc.StatusCode.PERMISSION_DENIED, "device 'urn:dev:pi-01' was revoked: stolen")
    fleet.accept_connect = False
    conn.send(shutdown=fleet_pb2.Shutdown(reason="device revoked: stolen"))
    assert agent.join() == 2
    assert "was revoked: stolen" in caplog.text


def test_a_coordinator_that_never_welcomes_is_left_and_retried(fleet: FakeFleet, start_agent) -> None:
    fleet.send_welcome = False
    start_agent(welcome_timeout_s=0.3)
    fleet.wait_until(lambda: len(fleet.silent) >= 2)  # gave up on the silent stream, tried again
    fleet.send_welcome = True
    fleet.wait_connections(1)


def test_key_refused_after_registering_again_is_fatal(fleet: FakeFleet, start_agent) -> None:
    fleet.accept_connect = False
    agent = start_agent()
    assert agent.join() == 2
    assert len(fleet.registrations) == 2 and len(fleet.refused) == 2


def test_refused_registration_is_fatal_and_stores_nothing(fleet: FakeFleet, start_agent) -> None:
    fleet.register_error = (grpc.StatusCode.INVALID_ARGUMENT, "description fails SHACL: no tf:ramKB")
    agent = start_agent()
    assert agent.join() == 2
    assert agent.state_dir.load_identity() is None and not fleet.connections


def test_waits_for_a_coordinator_that_is_not_up_yet(fleet: FakeFleet, start_agent) -> None:
    fleet.stop()
    agent = start_agent()
    time.sleep(0.3)
    fleet.start()
    assert fleet.wait_connections(1).hello.device_id == DEVICE
    assert agent.stop() == 0


def test_a_restarted_agent_re_registers_idempotently(fleet: FakeFleet, start_agent, tmp_path: Path) -> None:
    first = start_agent()
    fleet.wait_connections(1)
    assert first.stop() == 0
    second = start_agent()
    fleet.wait_connections(2)
    first_request, again = fleet.registrations
    assert again.public_key == first_request.public_key == fleet.keys[DEVICE]
    assert again.sequence > first_request.sequence
    assert second.stop() == 0


def test_state_dir_of_another_device_is_refused(fleet: FakeFleet, start_agent, tmp_path: Path) -> None:
    StateDir(tmp_path / "state").save_identity(Identity("urn:dev:other", 9, fleet.address, 0.0))
    agent = start_agent()
    assert agent.join() == 2
    assert not fleet.registrations


def test_a_corrupt_identity_file_stops_the_agent(fleet: FakeFleet, start_agent, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "identity.json").write_text("{truncated")
    assert start_agent().join() == 2
    assert not fleet.registrations


def test_a_task_past_its_deadline_is_not_run(fleet: FakeFleet, start_agent) -> None:
    log: list[str] = []
    gate = threading.Event()
    start_agent(handlers=counting_registry(log, gate))
    conn = fleet.wait_connections(1)
    slow, frame1 = task("query.count", conn.node_id)
    late, frame2 = task("query.count", conn.node_id, deadline_s=0.2)
    conn.send(task=frame1)
    conn.send(task=frame2)
    conn.wait_for("heartbeat", count=len(conn.frames) + 2)  # > 0.2 s pass while `slow` blocks
    gate.set()
    conn.reply_to(slow)
    after, frame3 = task("query.count", conn.node_id)
    conn.send(task=frame3)
    assert counter_of(conn.reply_to(after)) == 2  # in order: `late` would have run before it
    assert f"start {late}" not in log
    assert not [f for f in conn.frames if f.WhichOneof("kind") == "reply" and f.reply.message_id == late]


def test_default_handlers_are_what_hello_announces() -> None:
    assert "train.fedavg" in default_handlers().message_types


def test_an_answer_that_does_not_encode_gets_an_error_reply_and_later_tasks_are_answered(
    fleet: FakeFleet, start_agent, caplog
) -> None:
    registry = counting_registry([])

    @registry.register("query.broken")
    def broken(message: Message, context: Context) -> Message:
        return None  # type: ignore[return-value]  # a handler bug

    start_agent(handlers=registry)
    conn = fleet.wait_connections(1)
    mid, frame = task("query.broken", conn.node_id)
    conn.send(task=frame)
    error = message_from_bytes(conn.reply_to(mid).flower_message)
    assert error.has_error() and error.error.code == ERR_HANDLER_FAILED
    assert "the answer to 'query.broken' is not a Flower message that encodes" in str(error.error.reason)
    [logged] = [r for r in caplog.records if "query.broken" in r.getMessage()]
    assert logged.levelname == "WARNING" and logged.exc_info is not None
    after, frame = task("query.count", conn.node_id)  # the task thread is still there
    conn.send(task=frame)
    assert counter_of(conn.reply_to(after)) == 1
