"""Every function of the Flower adapter, so a Flower upgrade that moves an internal fails here."""

from __future__ import annotations

import random
import time
from typing import cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore.task_identity import TaskIdentity

from tinyfleet.common import flower_adapter as fa
from tinyfleet.common.arrays import from_numpy_dict, to_array_record
from tinyfleet.common.models import build_model


def _content() -> RecordDict:
    return RecordDict(
        {
            "arrays": from_numpy_dict({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}),
            "config": ConfigRecord({"lr": 0.1, "model": "sine-mlp"}),
        }
    )


def test_pinned_flower_version_is_installed() -> None:
    import flwr

    assert flwr.__version__ == fa.FLOWER_VERSION


def test_ensure_task_identity_lets_stock_message_constructor_work() -> None:
    fa.ensure_task_identity()
    assert TaskIdentity.node_id is not None
    message = Message(content=_content(), dst_node_id=7, message_type="train")
    assert message.metadata.dst_node_id == 7
    assert message.metadata.src_node_id == TaskIdentity.node_id
    before = TaskIdentity.run_id
    fa.ensure_task_identity(run_id=before + 99)  # an identity already set is kept
    assert TaskIdentity.run_id == before


def test_new_instruction_stamp_and_serde_round_trip() -> None:
    message = fa.new_instruction(_content(), "train.fedavg", 42, run_id=5, group_id="3", ttl=60.0)
    assert message.metadata.src_node_id == fa.COORDINATOR_NODE_ID
    assert message.metadata.message_id == ""
    mid = fa.stamp(message, run_id=11)
    assert len(mid) == 32 and message.metadata.message_id == mid
    assert message.metadata.run_id == 11
    assert fa.stamp(message, run_id=11, message_id="fixed") == "fixed"

    wire = fa.message_to_bytes(message)
    back = fa.message_from_bytes(wire)
    assert back.metadata.message_type == "train.fedavg"
    assert back.metadata.dst_node_id == 42 and back.metadata.group_id == "3"
    np.testing.assert_array_equal(
        back.content.array_records["arrays"]["w"].numpy(), np.arange(6).reshape(2, 3)
    )
    assert back.content.config_records["config"]["lr"] == pytest.approx(0.1)


def test_set_message_id_and_replies_point_back_to_the_instruction() -> None:
    message = fa.new_instruction(_content(), "evaluate", 8, run_id=1)
    fa.set_message_id(message, "abc")
    assert message.metadata.message_id == "abc"

    ok = fa.reply_with_content(message, RecordDict({"metrics": MetricRecord({"loss": 1.5})}))
    assert ok.metadata.reply_to_message_id == "abc"
    assert ok.metadata.src_node_id == 8 and ok.metadata.dst_node_id == fa.COORDINATOR_NODE_ID
    assert not ok.has_error()

    bad = fa.reply_with_error(message, fa.ERR_INVALID_UPDATE, "NaN in 'w'")
    assert bad.has_error() and bad.error.code == fa.ERR_INVALID_UPDATE
    assert bad.error.reason == "NaN in 'w'"
    assert fa.message_from_bytes(fa.message_to_bytes(bad)).error.reason == "NaN in 'w'"


def test_error_codes_are_distinct_and_above_flowers_range() -> None:
    codes = [
        fa.ERR_UNKNOWN_MESSAGE_TYPE,
        fa.ERR_HANDLER_FAILED,
        fa.ERR_MESSAGE_TOO_LARGE,
        fa.ERR_INVALID_UPDATE,
        fa.ERR_DEADLINE,
    ]
    assert len(set(codes)) == len(codes) and min(codes) >= 100


def test_message_from_bytes_rejects_garbage() -> None:
    with pytest.raises(fa.MessageDecodeError, match="not a Flower message"):
        fa.message_from_bytes(b"\xff\xff\xff\x01garbage")


def test_array_record_bytes_are_deterministic_and_round_trip() -> None:
    record = to_array_record(build_model("sine-mlp", seed=3))
    data = fa.array_record_to_bytes(record)
    assert data == fa.array_record_to_bytes(to_array_record(build_model("sine-mlp", seed=3)))
    assert data != fa.array_record_to_bytes(to_array_record(build_model("sine-mlp", seed=4)))
    back = fa.array_record_from_bytes(data)
    assert list(back.keys()) == list(record.keys())
    for key in record:
        np.testing.assert_array_equal(back[key].numpy(), record[key].numpy())
    with pytest.raises(fa.MessageDecodeError, match="ArrayRecord"):
        fa.array_record_from_bytes(b"\xff\xff\x01")


def test_make_context_and_empty_run() -> None:
    context = fa.make_context(17, {"data": "sine:seed=1"})
    assert context.node_id == 17 and context.node_config["data"] == "sine:seed=1"
    assert len(context.state) == 0
    assert fa.empty_run(23).run_id == 23


@pytest.mark.parametrize(
    "values",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.random.default_rng(0).random((64, 64)).astype(np.float16),
        np.asfortranarray(np.ones((3, 4))),  # not C order: falls back to np.load
        np.array([1, 2], dtype=">i4"),  # not native byte order: falls back to np.load
        np.zeros((0, 3), dtype=np.int8),
        np.array(3.0),
    ],
    ids=["f32", "f16", "fortran", "big-endian", "empty", "scalar"],
)
def test_array_values_equal_what_flower_decodes(values: np.ndarray) -> None:
    from flwr.app import Array

    from tinyfleet.common.flower_adapter import array_values

    array = Array(values)
    decoded = array_values(array)
    assert decoded.dtype == array.numpy().dtype and decoded.shape == values.shape
    assert np.array_equal(decoded, values)


@pytest.mark.parametrize(
    "values",
    [
        np.frombuffer(b"TFC2 packed bytes", dtype=np.uint8),
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([1, -2, 3], dtype=">i4"),  # stored little-endian, same values
        np.zeros(0, dtype=np.uint8),
        np.array(7.0, dtype=np.float32),  # 0-d, e.g. an optimizer's step count
    ],
    ids=["bytes", "f32-2d", "big-endian", "empty", "scalar"],
)
def test_raw_arrays_cross_flower_serde_and_object_store_unchanged(values: np.ndarray) -> None:
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    array = fa.raw_array(values)
    assert array.stype == fa.RAW_STYPE and array.shape == values.shape
    assert len(array.data) == values.nbytes  # the values alone: no .npy header
    with pytest.raises(TypeError):
        array.numpy()  # Flower's own accessor only reads .npy; array_values reads both
    content = RecordDict({"update": ArrayRecord({"payload": array})})
    message = fa.new_instruction(content, "train.fedreptile", 3, run_id=1)
    fa.stamp(message, run_id=1)
    via_serde = fa.message_from_bytes(fa.message_to_bytes(message))
    # what a SuperLink/SuperNode does: the message as content-addressed objects, inflated again
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    via_store = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(via_store, Message)
    for back in (via_serde, via_store):
        received = back.content.array_records["update"]["payload"]
        assert isinstance(received, Array)
        assert (received.dtype, received.shape, received.stype) == (array.dtype, array.shape, fa.RAW_STYPE)
        decoded = fa.array_values(received)
        assert decoded.dtype == values.dtype.newbyteorder("<") and np.array_equal(decoded, values)


@pytest.mark.parametrize(
    ("dtype", "shape", "data", "problem"),
    [
        ("uint8", (5,), b"\x00" * 4, "needs 5 bytes, holds 4"),
        ("float32", (2,), b"\x00" * 9, "needs 8 bytes, holds 9"),
        ("no-such-type", (1,), b"\x00", "unknown dtype"),
        ("object", (1,), b"\x00" * 8, "Python objects"),
    ],
)
def test_raw_arrays_that_do_not_fit_their_dtype_and_shape_are_refused(
    dtype: str, shape: tuple[int, ...], data: bytes, problem: str
) -> None:
    from flwr.app import Array

    with pytest.raises(ValueError, match=problem):
        fa.array_values(Array(dtype=dtype, shape=shape, stype=fa.RAW_STYPE, data=data))


class _Nodes:
    """All a Flower strategy's configure step asks of a grid: the online node ids, as each poll sees them."""

    def __init__(self, *polls: list[int]) -> None:
        self.polls = list(polls)
        self.times: list[float] = []

    def get_node_ids(self) -> list[int]:
        self.times.append(time.monotonic())
        return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]


def test_sample_nodes_polls_at_the_pinned_rhythm_until_enough_nodes_are_online() -> None:
    grid = _Nodes([1], [1, 2])
    sampled, online = sample_nodes(cast(Grid, grid), 2, 2)
    assert sorted(sampled) == [1, 2] and online == [1, 2]
    [gap] = np.diff(grid.times)
    assert fa.SAMPLE_NODES_POLL_S * 0.9 <= gap < fa.SAMPLE_NODES_POLL_S * 1.5


def test_seed_node_sampling_decides_what_flower_samples() -> None:
    nodes = list(range(100, 120))
    draws = []
    for seed in ("7:1", "7:2", "7:1"):
        fa.seed_node_sampling(seed)
        sampled, _ = sample_nodes(cast(Grid, _Nodes(nodes)), 2, 5)
        assert sampled == random.Random(seed).sample(nodes, 5)  # the global `random`, drawn by sample()
        draws.append(sampled)
    assert draws[0] == draws[2] != draws[1]


def test_aggregate_metricrecords_is_the_weighted_average_fedavg_reports() -> None:
    contents = [
        RecordDict({"metrics": MetricRecord({"loss": 1.0, "num-examples": 1})}),
        RecordDict({"metrics": MetricRecord({"loss": 3.0, "num-examples": 3})}),
    ]
    averaged = fa.aggregate_metricrecords(contents, "num-examples")
    assert averaged["loss"] == pytest.approx(2.5)
    assert FedAvg().train_metrics_aggr_fn(contents, "num-examples") == averaged


def _targets(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {
        "w": rng.standard_normal((3, 2)).astype(np.float32),
        "b": rng.standard_normal(2).astype(np.float32),
    }


def _train_round(strategy: Strategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One round with two deterministic nodes that each step a tenth of the way to a target of their own."""
    fa.ensure_task_identity()
    replies = []
    for message in strategy.configure_train(server_round, arrays, ConfigRecord(), cast(Grid, _Nodes([1, 2]))):
        node = message.metadata.dst_node_id
        received = {k: a.numpy() for k, a in message.content.array_records["arrays"].items()}
        stepped = {k: v + 0.1 * (_targets(node)[k] - v) for k, v in received.items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in stepped.items()}),
                "metrics": MetricRecord({"num-examples": node * 10}),
            }
        )
        replies.append(fa.reply_with_content(message, content))
    new, _ = strategy.aggregate_train(server_round, replies)
    assert new is not None
    return new


STATEFUL = {
    "FedAdam": (lambda: FedAdam(eta=0.05), {"m_t/w", "m_t/b", "v_t/w", "v_t/b"}),
    "FedYogi": (lambda: FedYogi(eta=0.05), {"m_t/w", "m_t/b", "v_t/w", "v_t/b"}),
    "FedAdagrad": (lambda: FedAdagrad(eta=0.05), {"m_t/w", "m_t/b", "v_t/w", "v_t/b"}),
    "FedAvgM": (lambda: FedAvgM(server_momentum=0.9), {"momentum_vector/0", "momentum_vector/1"}),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_strategy_given_its_arrays_back_continues_as_if_never_stopped(name: str) -> None:
    make, keys = STATEFUL[name]
    start = ArrayRecord({"w": Array(np.zeros((3, 2), np.float32)), "b": Array(np.ones(2, np.float32))})

    never_stopped = make()
    assert len(fa.strategy_arrays(never_stopped)) == 0  # no state before the first aggregation
    arrays = start
    for server_round in range(1, 5):
        arrays = _train_round(never_stopped, server_round, arrays)
        if server_round == 2:
            after_two, saved = arrays, fa.array_record_to_bytes(fa.strategy_arrays(never_stopped))

    assert set(fa.array_record_from_bytes(saved)) == keys  # the attributes Flower keeps its state in
    for restored in (True, False):
        resumed = make()
        if restored:
            fa.load_strategy_arrays(resumed, fa.array_record_from_bytes(saved))
        again = after_two
        for server_round in (3, 4):
            again = _train_round(resumed, server_round, again)
        same = fa.array_record_to_bytes(again) == fa.array_record_to_bytes(arrays)
        assert same == restored, f"{name}: restored={restored}"


def test_load_strategy_arrays_refuses_state_of_another_kind() -> None:
    state = ArrayRecord({"momentum_vector/0": fa.raw_array(np.zeros(2))})
    with pytest.raises(ValueError, match="'momentum_vector/0' is not one of FedAdam's"):
        fa.load_strategy_arrays(FedAdam(), state)
    with pytest.raises(ValueError, match="keeps no array state"):
        fa.load_strategy_arrays(FedAvg(), state)
    assert not fa.has_array_state(FedAvg()) and fa.has_array_state(FedAvgM())
