"""FedReptile on SimGrid: the exact server step, serial visiting, local layers, compression, resume."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from tinyfleet.client import learners, meta_learners
from tinyfleet.client.data_sources import close_shared_sources
from tinyfleet.client.handlers import HandlerRegistry, default_handlers
from tinyfleet.common import codec
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import (
    message_from_bytes,
    raw_array,
    reply_with_content,
    stamp,
)
from tinyfleet.common.models import build_model
from tinyfleet.server.strategies import FedReptile
from tinyfleet.simulations.rounds import RoundReport, run_rounds
from tinyfleet.simulations.sim_grid import SimGrid

SINE_CONFIG = ConfigRecord({"model": "sine-mlp"})


def _grid(devices: int, handlers: HandlerRegistry | None = None) -> SimGrid:
    return SimGrid.from_data_specs([f"sine:seed={i}" for i in range(devices)], handlers=handlers)


def _theta() -> ArrayRecord:
    return to_array_record(build_model("sine-mlp", seed=0))


def _run(strategy: FedReptile, grid: SimGrid, rounds: int) -> tuple[ArrayRecord, list[RoundReport]]:
    reports: list[RoundReport] = []
    arrays = run_rounds(
        strategy,
        grid,
        _theta(),
        rounds,
        train_config=SINE_CONFIG,
        on_round=lambda report, _arrays: reports.append(report),
    )
    return arrays, reports


@pytest.mark.parametrize("reply_key", ["update", "arrays"])
def test_server_step_is_theta_plus_epsilon_times_weighted_mean_difference(reply_key: str) -> None:
    theta = _theta()
    strategy = FedReptile(epsilon=0.3, serial=False, fraction_train=1.0)
    messages = list(strategy.configure_train(1, theta, ConfigRecord({"model": "sine-mlp"}), _grid(3)))
    assert len(messages) == 3
    rng = np.random.default_rng(0)
    adapted, weights, replies = [], [7.0, 1.0, 2.0], []
    for message, weight in zip(messages, weights, strict=True):
        stamp(message, run_id=0)
        new = {k: v.numpy() + rng.standard_normal(v.shape).astype(np.float32) for k, v in theta.items()}
        adapted.append(new)
        payload = (
            codec.encode({k: new[k] - theta[k].numpy() for k in new})
            if reply_key == "update"
            else ArrayRecord({k: Array(v) for k, v in new.items()})
        )
        content = RecordDict({reply_key: payload, "metrics": MetricRecord({"num-examples": weight})})
        reply = reply_with_content(message, content)
        replies.append(reply)
    new_theta, metrics = strategy.aggregate_train(1, replies)
    assert new_theta is not None and metrics is not None and metrics["nodes"] == 3
    for key, array in theta.items():
        mean = sum(w * a[key].astype(np.float64) for w, a in zip(weights, adapted, strict=True)) / sum(
            weights
        )
        expected = array.numpy() + 0.3 * (mean - array.numpy())
        np.testing.assert_allclose(new_theta[key].numpy(), expected, rtol=0, atol=1e-6)


def test_serial_round_robin_contacts_exactly_one_device_per_round_in_turn() -> None:
    grid = _grid(4)
    _, reports = _run(FedReptile(serial=True, inner_steps=1), grid, 9)
    assert all(len(r.deliveries) == 1 and r.replied == 1 for r in reports)
    visited = [r.deliveries[0].node_id for r in reports]
    nodes = sorted(grid.get_node_ids())
    assert visited == [nodes[i % 4] for i in range(9)]


def test_serial_random_order_is_seeded() -> None:
    def visits(seed: int) -> list[int]:
        close_shared_sources()
        strategy = FedReptile(serial=True, visit_order="random", seed=seed, inner_steps=1)
        return [r.deliveries[0].node_id for r in _run(strategy, _grid(5), 12)[1]]

    first = visits(3)
    assert first == visits(3)
    assert first != visits(4)
    assert len(set(first)) > 1


def test_state_dict_resumes_the_visit_order() -> None:
    grid = _grid(3)
    strategy = FedReptile(serial=True, inner_steps=1)
    arrays, reports = _run(strategy, grid, 2)
    state = strategy.state_dict()
    assert state["rounds_done"] == 2 and state["last_node"] == reports[-1].deliveries[0].node_id
    resumed = FedReptile(serial=True, inner_steps=1)
    resumed.load_state_dict(state)
    later: list[RoundReport] = []
    run_rounds(
        resumed,
        grid,
        arrays,
        1,
        train_config=SINE_CONFIG,
        first_round=3,
        on_round=lambda r, _a: later.append(r),
    )
    assert later[0].deliveries[0].node_id == sorted(grid.get_node_ids())[2]
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({"version": 99})


@pytest.mark.parametrize("compress_downlink", [False, True])
def test_local_layers_never_appear_in_any_message(compress_downlink: bool) -> None:
    grid, replies = _recording_grid(2)
    strategy = FedReptile(
        local_layers="4",
        reconstruct_steps=2,
        inner_steps=2,
        top_p=0.1,
        quantize="int8",
        compress_downlink=compress_downlink,
    )
    _, reports = _run(strategy, grid, 5)
    assert all(r.replied == 1 for r in reports)
    global_layout = codec.Layout.of({k: v.numpy() for k, v in _theta().items() if not k.startswith("4.")})
    contents = [message_from_bytes(wire).content for wire in grid.sent] + replies
    kinds = set()
    for content in contents:
        for record in content.array_records.values():
            assert not any(key.startswith("4.") for key in record), sorted(record)
            kinds.add(codec.payload_kind(record))
            codec.decode(record, global_layout)  # the payload covers exactly the global layers
    assert codec.SPARSE_INT8 in kinds
    assert any("delta" in c.array_records for c in contents) == compress_downlink


def test_compressed_downlink_keeps_device_replica_equal_to_the_servers_copy() -> None:
    grid = _grid(2)
    strategy = FedReptile(top_p=0.1, quantize="int8", compress_downlink=True, inner_steps=2)
    _, reports = _run(strategy, grid, 6)
    first_down = [r.bytes_down for r in reports[:2]]
    later_down = [r.bytes_down for r in reports[2:]]
    assert max(later_down) * 5 < min(first_down)  # dense first contact, deltas afterwards
    for node, (sync, replica_round, replica) in strategy._replicas.items():
        state = grid.clients[node].context.state
        meta = state.config_records[meta_learners.REPLICA_META_STATE]
        assert (meta["sync"], meta[meta_learners.REPLICA_ROUND]) == (sync, replica_round)
        held = state.array_records[meta_learners.REPLICA_STATE]
        for key, values in replica.items():
            np.testing.assert_array_equal(held[key].numpy(), values)


#: the static config a sync carries on sine (the job's [train] model and the strategy's client options)
STATIC = {
    "model",
    "inner_steps",
    "inner_lr",
    "inner_batch",
    "inner_optimizer",
    "inner_samples",
    "keep_optimizer_state",
    "reconstruct_steps",
    "top_p",
    "quantize",
}


def _recording_grid(devices: int) -> tuple[SimGrid, list[RecordDict]]:
    """A grid whose devices' successful train replies are also kept (the grid keeps what it sends)."""
    replies: list[RecordDict] = []
    handlers = default_handlers()

    def recording_train(message: Message, context: Context) -> Message:
        reply = meta_learners.train(message, context)
        replies.append(reply.content)
        return reply

    handlers.register("train.fedreptile")(recording_train)
    return _grid(devices, handlers), replies


def _sent_configs(grid: SimGrid) -> list[tuple[dict, set[str]]]:
    """(config, array record keys) of every train message the grid sent, as it crossed the wire."""
    out = []
    for wire in grid.sent:
        content = message_from_bytes(wire).content
        out.append((dict(content.config_records["config"]), set(content.array_records)))
    return out


def test_static_config_travels_only_with_syncs_and_the_device_trains_with_it() -> None:
    grid, replies = _recording_grid(2)
    strategy = FedReptile(top_p=0.1, quantize="int8", compress_downlink=True, inner_steps=3, inner_batch=4)
    _, reports = _run(strategy, grid, 6)
    assert all(r.replied == 1 for r in reports)
    sent = _sent_configs(grid)
    for config, arrays in sent[:2]:  # first contact with each device: the model and the whole config
        assert arrays == {"arrays"} and set(config) >= STATIC
        assert config["inner_steps"] == 3 and set(config) - STATIC == {"server-round", "sync"}
    (sync,) = {config["sync"] for config, _ in sent}
    for index, (config, arrays) in enumerate(sent[2:], start=2):  # then deltas and three keys
        assert arrays == {"delta"}
        assert config == {"server-round": index + 1, "sync": sync, "replica-base": index - 1}
    # every round trained with the synced config: 3 steps of 4 samples, not the defaults (5 x 10)
    assert [r["metrics"]["num-examples"] for r in replies] == [12] * 6


def test_a_device_that_lost_its_state_fails_once_then_gets_model_and_config_again() -> None:
    grid, replies = _recording_grid(1)
    strategy = FedReptile(top_p=0.5, compress_downlink=True, inner_steps=2, inner_batch=3)
    arrays, _ = _run(strategy, grid, 2)
    grid.clients[sorted(grid.clients)[0]].context.state.clear()  # e.g. the agent restarted
    later: list[RoundReport] = []
    run_rounds(
        strategy,
        grid,
        arrays,
        3,
        train_config=SINE_CONFIG,
        first_round=3,
        on_round=lambda r, _a: later.append(r),
    )
    assert [d.status for r in later for d in r.deliveries] == ["error", "replied", "replied"]
    assert "out of sync: this device holds sync None" in later[0].deliveries[0].error
    statuses = [arrays for _, arrays in _sent_configs(grid)]
    assert statuses == [{"arrays"}, {"delta"}, {"delta"}, {"arrays"}, {"delta"}]
    resync = _sent_configs(grid)[3][0]
    assert set(resync) >= STATIC and resync["inner_steps"] == 2
    assert [r["metrics"]["num-examples"] for r in replies] == [6] * 4  # the refused round trained nothing


def test_a_changed_config_or_a_resumed_coordinator_resyncs_every_device() -> None:
    grid = _grid(2)
    strategy = FedReptile(top_p=0.2, quantize="int8", compress_downlink=True, inner_steps=1)
    arrays, _ = _run(strategy, grid, 4)
    changed = ConfigRecord({"model": "sine-mlp", "tag": "second"})  # the job's [train] changed
    reports: list[RoundReport] = []

    def record(report: RoundReport, _arrays: ArrayRecord) -> None:
        reports.append(report)

    arrays = run_rounds(strategy, grid, arrays, 4, train_config=changed, first_round=5, on_round=record)
    resumed = FedReptile(top_p=0.2, quantize="int8", compress_downlink=True, inner_steps=1)
    resumed.load_state_dict(strategy.state_dict())  # a coordinator that restarted from its checkpoint
    run_rounds(resumed, grid, arrays, 4, train_config=changed, first_round=9, on_round=record)
    assert all(r.replied == 1 for r in reports)
    sent = _sent_configs(grid)
    assert [arrays for _, arrays in sent] == [{"arrays"}, {"arrays"}, {"delta"}, {"delta"}] * 3
    assert [config.get("tag") for config, _ in sent] == [None] * 4 + ["second"] * 2 + [None] * 2 + [
        "second"
    ] * 2 + [None] * 2
    syncs = [config["sync"] for config, _ in sent]
    assert len(set(syncs[:4])) == len(set(syncs[4:8])) == len(set(syncs[8:])) == 1
    assert len({syncs[0], syncs[4], syncs[8]}) == 3


def test_runs_on_nodes_with_only_a_stock_train_handler() -> None:
    stock = HandlerRegistry()
    learners.register_all(stock)  # "train.fedreptile" falls back to the plain "train" handler
    strategy = FedReptile(epsilon=0.5, serial=False)
    arrays, reports = _run(strategy, _grid(3, stock), 2)
    assert all(r.replied == 3 for r in reports)
    assert any(not np.array_equal(arrays[k].numpy(), _theta()[k].numpy()) for k in arrays)


def _packed_update(theta: ArrayRecord, cut: int | None = None, *, extra: bool = False) -> ArrayRecord:
    update = {k: np.ones(v.shape, np.float32) for k, v in theta.items()}
    if extra:
        update["extra"] = np.ones(3, np.float32)
    data = codec.encode(update, top_p=0.5, quantize="int8")[codec.PAYLOAD_KEY].data[:cut]
    return ArrayRecord({codec.PAYLOAD_KEY: raw_array(np.frombuffer(data, dtype=np.uint8))})


BAD_UPDATES = {
    "NaN": (
        lambda theta: ArrayRecord({k: Array(np.full(v.shape, np.nan, np.float32)) for k, v in theta.items()}),
        "must hold finite floats",
    ),
    "truncated packed payload": (lambda theta: _packed_update(theta, cut=-5), "truncated"),
    "packed payload of another layout": (
        lambda theta: _packed_update(theta, extra=True),
        "encoded for another model layout",
    ),
    "raw bytes that do not fit the array": (
        lambda theta: ArrayRecord(
            {codec.PAYLOAD_KEY: Array(dtype="uint8", shape=(64,), stype="raw", data=b"TFC2")}
        ),
        "needs 64 bytes, holds 4",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_bad_updates_are_skipped_not_aggregated(case: str, caplog: pytest.LogCaptureFixture) -> None:
    make_bad, problem = BAD_UPDATES[case]
    theta = _theta()
    strategy = FedReptile(serial=False)
    messages = list(strategy.configure_train(1, theta, SINE_CONFIG, _grid(2)))
    good = ArrayRecord({k: Array(np.ones(v.shape, np.float32)) for k, v in theta.items()})
    replies = []
    for message, update in zip(messages, [make_bad(theta), good], strict=True):
        stamp(message, run_id=0)
        content = RecordDict({"update": update, "metrics": MetricRecord({"num-examples": 1})})
        reply = reply_with_content(message, content)
        replies.append(reply)
    new_theta, metrics = strategy.aggregate_train(1, replies)
    assert new_theta is not None and metrics is not None and (metrics["nodes"], metrics["skipped"]) == (1, 1)
    for key in theta:
        np.testing.assert_allclose(new_theta[key].numpy(), theta[key].numpy() + 1.0, atol=1e-6)
    bad_node = messages[0].metadata.dst_node_id
    assert f"update from node {bad_node} skipped" in caplog.text and problem in caplog.text


def test_a_malformed_delta_is_refused_by_the_device_naming_the_problem_and_changes_nothing() -> None:
    grid = _grid(1)
    strategy = FedReptile(top_p=0.1, quantize="int8", compress_downlink=True, inner_steps=1)
    arrays, _ = _run(strategy, grid, 1)
    (node,) = grid.clients
    sync, replica_round, _ = strategy._replicas[node]
    config = ConfigRecord({"server-round": 2, "sync": sync, "replica-base": replica_round})
    delta = _packed_update(_theta(), extra=True)  # a delta that does not fit the device's model
    message = Message(content=RecordDict({"config": config, "delta": delta}), dst_node_id=node,
                      message_type="train.fedreptile")
    stamp(message, run_id=0)
    reply = grid.handlers.handle(message, grid.clients[node].context)
    assert reply.has_error() and "encoded for another model layout" in str(reply.error.reason)
    meta = grid.clients[node].context.state.config_records[meta_learners.REPLICA_META_STATE]
    assert (meta["sync"], meta[meta_learners.REPLICA_ROUND]) == (sync, replica_round)
    later: list[RoundReport] = []  # so the next delta the server sends still applies
    run_rounds(strategy, grid, arrays, 2, train_config=SINE_CONFIG, first_round=2,
               on_round=lambda r, _a: later.append(r))
    assert [d.status for r in later for d in r.deliveries] == ["replied", "replied"]


def test_bad_options_are_refused_with_the_option_named() -> None:
    with pytest.raises(ValueError, match="num_rounds"):
        FedReptile(epsilon_schedule="linear")
    with pytest.raises(ValueError, match="top_p"):
        FedReptile(top_p=10)
    with pytest.raises(ValueError, match="epsilon_schedule"):
        FedReptile(epsilon_schedule="cosine")
    strategy = FedReptile(local_layers=["head"])
    with pytest.raises(ValueError, match="local layer 'head'"):
        list(strategy.configure_train(1, _theta(), SINE_CONFIG, _grid(1)))


def test_linear_schedule_decays_towards_epsilon_final() -> None:
    strategy = FedReptile(epsilon=1.0, epsilon_final=0.0, epsilon_schedule="linear", num_rounds=4)
    assert [strategy.epsilon_for(r) for r in (1, 2, 3, 4)] == [1.0, 0.75, 0.5, 0.25]
