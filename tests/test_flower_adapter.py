"""Every function of the Flower adapter, so a Flower upgrade that moves an internal fails here."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
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
