"""FleetGrid over real gRPC on 127.0.0.1 with in-process fake agents."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from tinyfleet.common.arrays import from_numpy_dict, to_array_record
from tinyfleet.common.flower_adapter import ERR_UNKNOWN_MESSAGE_TYPE, message_to_bytes, reply_with_content
from tinyfleet.common.grids import ERROR, REPLIED, TIMEOUT, UNDELIVERABLE
from tinyfleet.common.models import build_model
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.fleet_grid import NodeWaitTimeoutError

from .harness import CoordinatorThread, FakeAgent, answer, reply_frame, settings_for

LIMIT = 200_000  # max_message_bytes of these tests' coordinator


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorThread]:
    running = CoordinatorThread(settings_for(tmp_path / "coord", max_message_bytes=LIMIT))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def agents() -> Iterator[list[FakeAgent]]:
    created: list[FakeAgent] = []
    yield created
    for agent in created:
        agent.close()


def _agent(coordinator: CoordinatorThread, agents: list[FakeAgent], name: str, **kw: object) -> FakeAgent:
    agent = coordinator.agent(f"urn:dev:{name}", **kw)
    agent.register()
    agent.connect()
    agents.append(agent)
    return agent


def _model() -> ArrayRecord:
    return to_array_record(build_model("sine-mlp", seed=0))


def _train_messages(grid, nodes: list[int]) -> list[Message]:
    config = ConfigRecord({"local_steps": 2, "model": "sine-mlp"})
    content = RecordDict({"arrays": _model(), "config": config})
    return [grid.create_message(content, "train", node, "1") for node in nodes]


def _wait_online(grid, count: int) -> None:
    assert grid.wait_for_nodes(count, 10) >= count


def test_replies_resolve_and_silence_times_out(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid
    # Both answer pings, as real agents do: alive for as long as the test takes (a stream quiet for
    # three heartbeat intervals, 6 s here, is closed).
    good = _agent(coordinator, agents, "good", answers_pings=True)
    silent = _agent(coordinator, agents, "silent", behaviour=lambda a, t, m: None, answers_pings=True)
    _wait_online(grid, 2)
    assert set(grid.get_node_ids()) == {good.node_id, silent.node_id}
    grid.reference_arrays = _model()
    # Warm up: the first answer builds the model and data stream (seconds on a loaded machine).
    list(grid.send_and_receive(_train_messages(grid, [good.node_id]), timeout=60))
    assert [d.status for d in grid.take_deliveries()] == [REPLIED]

    started = time.monotonic()  # 3 s: the good node's answer must fit in it on a loaded machine
    replies = list(grid.send_and_receive(_train_messages(grid, [good.node_id, silent.node_id]), timeout=3.0))
    elapsed = time.monotonic() - started
    assert 2.9 <= elapsed < 10
    assert [r.metadata.src_node_id for r in replies] == [good.node_id]
    deliveries = {d.node_id: d for d in grid.take_deliveries()}
    assert deliveries[good.node_id].status == REPLIED and deliveries[good.node_id].bytes_up > 0
    assert deliveries[good.node_id].bytes_down == len(good.tasks[0].flower_message)
    assert deliveries[silent.node_id].status == TIMEOUT
    assert "deadline" in deliveries[silent.node_id].error

    # A late reply to the closed exchange is ignored, and the next exchange is clean.
    silent.send(answer(silent, silent.tasks[0], _decoded(silent.tasks[0])))
    replies = list(grid.send_and_receive(_train_messages(grid, [good.node_id]), timeout=10))
    assert len(replies) == 1 and [d.status for d in grid.take_deliveries()] == [REPLIED]


def _decoded(task: fleet_pb2.Task) -> Message:
    from tinyfleet.common.flower_adapter import message_from_bytes, set_message_id

    message = message_from_bytes(task.flower_message)
    set_message_id(message, task.message_id)
    return message


def test_all_replies_end_the_wait_at_once(coordinator: CoordinatorThread, agents: list[FakeAgent]) -> None:
    grid = coordinator.coordinator.grid
    nodes = [_agent(coordinator, agents, f"n{i}", data=f"sine:seed={i}").node_id for i in range(3)]
    _wait_online(grid, 3)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_train_messages(grid, nodes), timeout=60))
    assert len(replies) == 3 and time.monotonic() - started < 10  # not the 60 s deadline
    assert {d.status for d in grid.take_deliveries()} == {REPLIED}


def test_disconnect_mid_exchange_resolves_immediately(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid

    def die(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> None:
        agent.send(None)  # type: ignore[arg-type]  # ends the request stream: the agent goes away

    dying = _agent(coordinator, agents, "dying", behaviour=die)
    good = _agent(coordinator, agents, "good")
    _wait_online(grid, 2)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_train_messages(grid, [dying.node_id, good.node_id]), timeout=60))
    assert time.monotonic() - started < 10
    assert len(replies) == 1
    deliveries = {d.node_id: d for d in grid.take_deliveries()}
    assert deliveries[dying.node_id].status == UNDELIVERABLE
    assert "disconnected" in deliveries[dying.node_id].error
    assert grid.wait_for_nodes(2, 0.2) == 1  # it is no longer online

    # Sending to a node that is not connected is undeliverable at once as well.
    replies = list(grid.send_and_receive(_train_messages(grid, [dying.node_id]), timeout=60))
    assert replies == [] and grid.take_deliveries()[0].status == UNDELIVERABLE


def _nan_update(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    arrays = {k: v.numpy().copy() for k, v in message.content.array_records["arrays"].items()}
    arrays["2.weight"][0, 0] = np.nan
    reply = reply_with_content(message, RecordDict({"arrays": from_numpy_dict(arrays)}))
    return reply_frame(task, message_to_bytes(reply))


def _wrong_shape(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    arrays = {k: v.numpy().copy() for k, v in message.content.array_records["arrays"].items()}
    arrays["0.bias"] = np.zeros(3, dtype=np.float32)
    reply = reply_with_content(message, RecordDict({"arrays": from_numpy_dict(arrays)}))
    return reply_frame(task, message_to_bytes(reply))


def _sparse_update(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    """Keys that do not overlap the model's (a compressed payload) are not shape-checked."""
    update = from_numpy_dict({"update.values": np.ones(5, dtype=np.float32)})
    reply = reply_with_content(message, RecordDict({"arrays": update}))
    return reply_frame(task, message_to_bytes(reply))


def _oversized(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    big = from_numpy_dict({"blob": np.zeros(LIMIT // 4 + 1000, dtype=np.float32)})
    return reply_frame(task, message_to_bytes(reply_with_content(message, RecordDict({"x": big}))))


def _garbage(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    return reply_frame(task, b"\xff\xfe not a flower message")


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (_nan_update, "NaN/Inf in 'arrays'"),
        (_wrong_shape, "'0.bias' has shape (3,)"),
        (_oversized, f"exceeds max_message_bytes ({LIMIT})"),
        (_garbage, "does not decode"),
    ],
)
def test_bad_replies_are_errors_and_the_stream_keeps_working(
    coordinator: CoordinatorThread, agents: list[FakeAgent], behaviour, expected: str
) -> None:
    grid = coordinator.coordinator.grid
    agent = _agent(coordinator, agents, "bad", behaviour=behaviour)
    _wait_online(grid, 1)
    grid.reference_arrays = _model()
    replies = list(grid.send_and_receive(_train_messages(grid, [agent.node_id]), timeout=20))
    [delivery] = grid.take_deliveries()
    assert delivery.status == ERROR and expected in delivery.error
    assert len(replies) == 1 and replies[0].has_error()  # strategies see an error reply
    assert expected in str(replies[0].error.reason)

    agent.behaviour = answer  # same stream, now a good reply: still served
    replies = list(grid.send_and_receive(_train_messages(grid, [agent.node_id]), timeout=20))
    assert [d.status for d in grid.take_deliveries()] == [REPLIED]
    assert not replies[0].has_error() and not agent.ended.is_set()


def test_partial_payloads_that_do_not_overlap_the_model_pass(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid
    agent = _agent(coordinator, agents, "sparse", behaviour=_sparse_update)
    _wait_online(grid, 1)
    grid.reference_arrays = _model()
    list(grid.send_and_receive(_train_messages(grid, [agent.node_id]), timeout=20))
    assert [d.status for d in grid.take_deliveries()] == [REPLIED]


def test_stock_fedavg_runs_unchanged_on_fleet_grid(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid
    for i in range(3):
        _agent(coordinator, agents, f"fedavg{i}", data=f"sine:seed={i}")
    _wait_online(grid, 3)
    strategy = FedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    initial = _model()
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=2, timeout=30,
        train_config=ConfigRecord({"local_steps": 5, "lr": 0.02, "model": "sine-mlp"}),
        evaluate_config=ConfigRecord({"model": "sine-mlp"}),
    )
    assert set(result.train_metrics_clientapp) == {1, 2}
    assert set(result.evaluate_metrics_clientapp) == {1, 2}
    assert not np.allclose(result.arrays["0.weight"].numpy(), initial["0.weight"].numpy())
    assert all(len(a.tasks) == 4 for a in agents)  # 2 rounds x (train + evaluate)


def test_strategy_asking_for_more_nodes_than_online_fails_instead_of_looping(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid
    _agent(coordinator, agents, "alone")
    _wait_online(grid, 1)
    grid.begin_phase(wait_s=0.5)
    started = time.monotonic()
    with pytest.raises(NodeWaitTimeoutError, match="more nodes"):
        FedAvg(min_available_nodes=2).configure_train(1, _model(), ConfigRecord(), grid)
    assert time.monotonic() - started < 5


def test_eligibility_filter_limits_the_nodes(coordinator: CoordinatorThread, agents: list[FakeAgent]) -> None:
    grid = coordinator.coordinator.grid
    first = _agent(coordinator, agents, "e1")
    _agent(coordinator, agents, "e2")
    _wait_online(grid, 2)
    grid.eligible_nodes = lambda: {first.node_id}
    try:
        assert list(grid.get_node_ids()) == [first.node_id]
        assert grid.wait_for_nodes(2, 0.2) == 1
    finally:
        grid.eligible_nodes = None


def test_a_frame_beyond_the_transport_limit_ends_only_that_stream(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    from tinyfleet.server.daemon import GRPC_HEADROOM_BYTES

    def huge(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
        return reply_frame(task, b"\0" * (LIMIT + GRPC_HEADROOM_BYTES + 1000))

    grid = coordinator.coordinator.grid
    giant = _agent(coordinator, agents, "giant", behaviour=huge)
    good = _agent(coordinator, agents, "fine")
    _wait_online(grid, 2)
    started = time.monotonic()
    replies = list(grid.send_and_receive(_train_messages(grid, [giant.node_id, good.node_id]), timeout=60))
    assert time.monotonic() - started < 20 and len(replies) == 1
    deliveries = {d.node_id: d for d in grid.take_deliveries()}
    assert deliveries[giant.node_id].status == UNDELIVERABLE
    assert deliveries[good.node_id].status == REPLIED
    assert giant.ended.wait(10) and grid.available_nodes() == {good.node_id}


class _Exploding:
    """A hub listener with a bug: it raises on every event."""

    def on_reply(self, node_id: int, reply: fleet_pb2.Reply) -> None:
        raise RuntimeError("listener bug on reply")

    def on_disconnect(self, node_id: int) -> None:
        raise RuntimeError("listener bug on disconnect")


def test_a_failing_listener_is_logged_and_does_not_drop_the_stream(
    coordinator: CoordinatorThread, agents: list[FakeAgent], caplog: pytest.LogCaptureFixture
) -> None:
    grid = coordinator.coordinator.grid
    coordinator.coordinator.hub.add_listener(_Exploding())
    agent = _agent(coordinator, agents, "steady")
    _wait_online(grid, 1)
    with caplog.at_level(logging.WARNING, logger="tinyfleet.server.connections"):
        for _ in range(2):  # the same stream serves the second exchange
            replies = list(grid.send_and_receive(_train_messages(grid, [agent.node_id]), timeout=20))
            assert len(replies) == 1 and [d.status for d in grid.take_deliveries()] == [REPLIED]
        assert not agent.ended.wait(0.5) and grid.available_nodes() == {agent.node_id}
    failures = [r for r in caplog.records if "on_reply of _Exploding failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.levelno == logging.WARNING for r in failures)
    assert all(r.exc_info and "listener bug on reply" in str(r.exc_info[1]) for r in failures)


class _BrokenGuard:
    """An update guard with a bug nobody foresaw."""

    def check(self, content: RecordDict, reference: ArrayRecord) -> str:
        raise RuntimeError("guard bug")


def test_a_reply_whose_checks_fail_unforeseen_is_an_error_at_once_and_the_stream_stays(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid
    agent = _agent(coordinator, agents, "checked")
    _wait_online(grid, 1)
    grid.reference_arrays = _model()
    grid.update_guard = _BrokenGuard()  # type: ignore[assignment]
    try:
        started = time.monotonic()
        [reply] = grid.send_and_receive(_train_messages(grid, [agent.node_id]), timeout=30)
        assert time.monotonic() - started < 10  # resolved as it arrived, not at the deadline
    finally:
        grid.update_guard = None
    [delivery] = grid.take_deliveries()
    assert delivery.status == ERROR
    assert delivery.error == "reply could not be checked: RuntimeError: guard bug"
    assert reply.has_error() and "guard bug" in str(reply.error.reason)
    assert not agent.ended.is_set() and grid.available_nodes() == {agent.node_id}


def test_a_task_of_a_type_the_agent_has_no_handler_for_is_not_sent(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid
    agent = coordinator.agent("urn:dev:evaluator")
    agent.register()
    agent.connect(hello=lambda nonce: fleet_pb2.Hello(
        device_id=agent.device_id, signature=agent.signed_hello(nonce).signature, handlers=["evaluate"],
    ))
    agents.append(agent)
    _wait_online(grid, 1)
    [refused] = grid.send_and_receive(_train_messages(grid, [agent.node_id]), timeout=30)
    [delivery] = grid.take_deliveries()
    assert delivery.status == ERROR and delivery.bytes_down == 0 and agent.tasks == []
    assert delivery.error == (f"node {agent.node_id}'s agent has no handler for 'train' "
                              "(it handles evaluate); not sent")
    assert refused.has_error() and refused.error.code == ERR_UNKNOWN_MESSAGE_TYPE
    assert refused.metadata.src_node_id == agent.node_id

    content = RecordDict({"arrays": _model(), "config": ConfigRecord({"model": "sine-mlp"})})
    [answered] = grid.send_and_receive(  # its category covers a qualified type
        [grid.create_message(content, "evaluate.fedavg", agent.node_id, "1")], timeout=30
    )
    assert not answered.has_error() and len(agent.tasks) == 1


class _Slow:
    """A listener that takes its time over a reply, as decoding 64 MiB does."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def on_reply(self, node_id: int, reply: fleet_pb2.Reply) -> None:
        self.started.set()
        self.release.wait(15)

    def on_disconnect(self, node_id: int) -> None:
        pass


def test_a_reply_being_checked_does_not_hold_up_the_other_streams(
    coordinator: CoordinatorThread, agents: list[FakeAgent]
) -> None:
    grid = coordinator.coordinator.grid
    slow = _Slow()
    coordinator.coordinator.hub.add_listener(slow)
    first = _agent(coordinator, agents, "large-reply")
    _wait_online(grid, 1)
    exchange = threading.Thread(
        target=lambda: list(grid.send_and_receive(_train_messages(grid, [first.node_id]), timeout=30))
    )
    exchange.start()
    try:
        assert slow.started.wait(20)
        started = time.monotonic()
        second = _agent(coordinator, agents, "meanwhile")  # Register and Connect need the loop
        assert second.welcomed.is_set() and time.monotonic() - started < 5
        assert not slow.release.is_set()  # the first reply is still being "checked"
    finally:
        slow.release.set()
        exchange.join(30)
    assert [d.status for d in grid.take_deliveries()] == [REPLIED]
