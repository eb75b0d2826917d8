"""Every place tinyfleet touches Flower internals, pinned to flwr==1.42.0.

Flower's public Message API is what jobs and handlers are written against; what
follows is what a *grid* needs beyond it: building messages outside Flower's own
runtime, stamping ids, the protobuf serde that carries a whole message across our
own transport, and Arrays that carry raw bytes instead of Flower's .npy files.
It also holds what tinyfleet knows of how Flower's strategies work inside: how
`sample_nodes` waits and draws, the metric average FedAvg uses, and where the
stateful strategies keep their server-side state between rounds.
Keep this module small; its tests (tests/test_flower_adapter.py) fail loudly when
a Flower upgrade moves any of it.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, SType
from flwr.common.serde import (
    array_record_from_proto,
    array_record_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord  # pylint: disable=E0611
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi, strategy_utils
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

FLOWER_VERSION: Final = "1.42.0"
_NPY_MAGIC: Final = b"\x93NUMPY"
#: `Array.stype` of arrays whose `data` is the values' own little-endian C-order bytes (see `raw_array`).
RAW_STYPE: Final = "raw"
COORDINATOR_NODE_ID: Final = SUPERLINK_NODE_ID
#: Error codes used in error replies (Flower reserves small numbers; ours start at 100).
ERR_UNKNOWN_MESSAGE_TYPE: Final = 100
ERR_HANDLER_FAILED: Final = 101
ERR_MESSAGE_TOO_LARGE: Final = 102
ERR_INVALID_UPDATE: Final = 103
ERR_DEADLINE: Final = 104
#: Seconds Flower's `sample_nodes` sleeps between polls of `Grid.get_node_ids` while fewer nodes
#: than it needs are online; it polls until they are, so only the grid can end that wait.
SAMPLE_NODES_POLL_S: Final = 1.0


class MessageDecodeError(ValueError):
    """Bytes that claim to be a Flower message but do not parse as one."""


def ensure_task_identity(run_id: int = 0, node_id: int = COORDINATOR_NODE_ID) -> None:
    """Let `Message(content, dst_node_id, message_type)` work in this process.

    Flower 1.42 reads the sender's run/node/task ids from the process-wide
    TaskIdentity, which only Flower's own runtime sets. Stock strategies build
    messages that way, so a grid outside that runtime must set it; the grid then
    rewrites run id and message id per message (see `stamp`).
    """
    for name, value in (("run_id", run_id), ("node_id", node_id), ("task_id", 1)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


def new_instruction(
    content: RecordDict,
    message_type: str,
    dst_node_id: int,
    *,
    run_id: int,
    group_id: str = "",
    ttl: float | None = None,
    src_node_id: int = COORDINATOR_NODE_ID,
) -> Message:
    """Build an instruction message without relying on the process-wide TaskIdentity."""
    metadata = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=ttl if ttl is not None else 43200.0,
        message_type=message_type,
        src_task_id=1,
    )
    # `metadata` is in Flower's constructor but none of its public overloads.
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload]


def stamp(message: Message, *, run_id: int, message_id: str | None = None) -> str:
    """Give an outgoing instruction its run id and a fresh unique message id."""
    mid = message_id or uuid.uuid4().hex
    message.metadata.__dict__["_message_id"] = mid
    message.metadata.__dict__["_run_id"] = run_id
    return mid


def set_message_id(message: Message, message_id: str) -> None:
    """Set the id of a message received over the wire (the transport owns ids)."""
    message.metadata.__dict__["_message_id"] = message_id


def reply_with_content(instruction: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=instruction)


def reply_with_error(instruction: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=instruction)


def message_to_bytes(message: Message) -> bytes:
    """Serialize a whole message (metadata and content) with Flower's own serde."""
    return message_to_proto(message).SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """Parse bytes produced by `message_to_bytes`; bad bytes raise MessageDecodeError."""
    proto = ProtoMessage()
    try:
        proto.ParseFromString(data)
        message = message_from_proto(proto)
    except Exception as exc:  # protobuf and Flower raise several unrelated types
        raise MessageDecodeError(f"not a Flower message ({len(data)} bytes): {exc}") from exc
    return message


def array_record_to_bytes(record: ArrayRecord) -> bytes:
    """Serialize an ArrayRecord alone (checkpoints, artifacts) with Flower's serde.

    Deterministic, so equal records give equal bytes and the sha256 of the bytes
    is a stable content address.
    """
    return array_record_to_proto(record).SerializeToString(deterministic=True)


def array_record_from_bytes(data: bytes) -> ArrayRecord:
    """Parse bytes produced by `array_record_to_bytes`; bad bytes raise MessageDecodeError."""
    proto = ProtoArrayRecord()
    try:
        proto.ParseFromString(data)
        return array_record_from_proto(proto)
    except Exception as exc:  # protobuf and Flower raise several unrelated types
        raise MessageDecodeError(f"not a Flower ArrayRecord ({len(data)} bytes): {exc}") from exc


def raw_array(values: np.ndarray) -> Array:
    """An Array whose `data` is the values' bytes alone (little-endian, C order), stype `RAW_STYPE`.

    Flower's own `Array(ndarray)` stores `.npy` bytes, whose header costs ~128 bytes
    per array: more than a top-10 % int8 update of a small model saves by being
    sparse. Flower's serde, its SuperLink and SuperNodes carry `dtype`, `shape`,
    `stype` and `data` as they are, so the header is redundant on the wire;
    `array_values` reads these arrays back (`Array.numpy()` accepts only .npy).
    """
    values = np.asarray(values, dtype=values.dtype.newbyteorder("<"), order="C")  # keeps 0-d shapes
    shape = tuple(int(d) for d in values.shape)
    return Array(dtype=str(values.dtype), shape=shape, stype=RAW_STYPE, data=values.tobytes())


def array_values(array: Array) -> np.ndarray:
    """An Array's values as a read-only view of its bytes, without `np.load`.

    Flower 1.42 keeps each Array as .npy bytes; `Array.numpy()` re-parses the
    header with `ast` on every call, which dominated the coordinator's reply checks
    at 32 nodes. The dtype and shape are already on the Array, so the values are a
    `frombuffer` at the header's end; anything unexpected falls back to `numpy()`.
    Arrays made by `raw_array` are a `frombuffer` of the whole data. A raw array
    whose dtype is unknown or whose data does not fit its dtype and shape raises
    ValueError naming the mismatch.
    """
    data = array.data
    if array.stype == RAW_STYPE:
        try:
            dtype = np.dtype(array.dtype).newbyteorder("<")
        except TypeError as exc:
            raise ValueError(f"raw array has an unknown dtype {array.dtype!r}") from exc
        if dtype.hasobject:
            raise ValueError(f"raw array of dtype {array.dtype} would hold Python objects")
        count = math.prod(array.shape)
        if len(data) != count * dtype.itemsize:
            raise ValueError(
                f"raw array of dtype {array.dtype} and shape {tuple(array.shape)} needs "
                f"{count * dtype.itemsize} bytes, holds {len(data)}"
            )
        return np.frombuffer(data, dtype=dtype, count=count).reshape(array.shape)
    if array.stype == SType.NUMPY and data[:6] == _NPY_MAGIC and data[6] in (1, 2, 3):
        size_bytes = 2 if data[6] == 1 else 4
        start = 8 + size_bytes
        end = start + int.from_bytes(data[8:start], "little")
        dtype = np.dtype(array.dtype)
        header = data[start:end]
        count = math.prod(array.shape)
        if (
            f"'descr': '{dtype.str}'".encode() in header
            and b"'fortran_order': False" in header
            and len(data) - end == count * dtype.itemsize
        ):
            return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(array.shape)
    return array.numpy()


def make_context(node_id: int, node_config: Mapping[str, str | int | float | bool]) -> Context:
    """A Flower Context for running ClientApp-style handlers outside a SuperNode."""
    return Context(
        run_id=0,
        node_id=node_id,
        node_config=dict(node_config),
        state=RecordDict(),
        run_config={},
    )


def empty_run(run_id: int) -> Run:
    """The Run record a Grid reports; only `run_id` is meaningful outside Flower's runtime."""
    return Run.create_empty(run_id)


def seed_node_sampling(seed: int | str) -> None:
    """Make the nodes Flower's stock strategies sample repeatable.

    `sample_nodes` draws with the process-wide `random` module, not a generator of
    the strategy's own, so the only handle on its choice is that module's seed.
    """
    random.seed(seed)


def aggregate_metricrecords(contents: Sequence[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The average of the replies' MetricRecords weighted by `weighted_by_key`, as FedAvg forms it.

    Flower's own function (not in its public API), so strategies of ours report
    metrics exactly as the stock ones do.
    """
    return strategy_utils.aggregate_metricrecords(list(contents), weighted_by_key)


#: Where Flower's stateful strategies keep, between rounds, server-side state that the round's
#: model does not hold: the first and second moments of FedAdam, FedYogi and FedAdagrad (dicts
#: keyed like the model's arrays) and FedAvgM's momentum (a list in the model's order). Their
#: `current_arrays` is not state: FedOpt sets it from the arrays of every `configure_train`, and
#: FedAvgM's equals the last aggregated model, which the job's checkpoint holds.
_STATE_ATTRIBUTES: Final[tuple[tuple[tuple[type, ...], dict[str, type]], ...]] = (
    ((FedAdam, FedYogi, FedAdagrad), {"m_t": dict, "v_t": dict}),
    ((FedAvgM,), {"momentum_vector": list}),
)


def _state_attributes(strategy: object) -> dict[str, type]:
    for classes, attributes in _STATE_ATTRIBUTES:
        if isinstance(strategy, classes):
            return attributes
    return {}


def has_array_state(strategy: object) -> bool:
    """True for a strategy whose server-side state `strategy_arrays` can save."""
    return bool(_state_attributes(strategy))


def strategy_arrays(strategy: object) -> ArrayRecord:
    """A stateful Flower strategy's server-side state as one ArrayRecord, exact to the bit.

    Keys are "attribute/key" for dict state and "attribute/index" for list state;
    state not set yet (before the first aggregation) has no keys. A strategy
    without such state gives an empty record.
    """
    record = ArrayRecord()
    for name, kind in _state_attributes(strategy).items():
        value = getattr(strategy, name)
        if not value:
            continue
        items = value.items() if kind is dict else enumerate(value)
        for key, array in items:
            record[f"{name}/{key}"] = raw_array(np.asarray(array))
    return record


def load_strategy_arrays(strategy: object, record: ArrayRecord) -> None:
    """Give a freshly built strategy the state `strategy_arrays` took from its predecessor."""
    attributes = _state_attributes(strategy)
    found: dict[str, dict[str, np.ndarray]] = {}
    for full_key in record:
        name, sep, key = full_key.partition("/")
        if not sep or name not in attributes:
            raise ValueError(
                f"state key {full_key!r} is not one of {type(strategy).__name__}'s "
                f"({', '.join(attributes) or 'it keeps no array state'})"
            )
        found.setdefault(name, {})[key] = np.array(array_values(record[full_key]))
    for name, values in found.items():
        if attributes[name] is dict:
            setattr(strategy, name, values)
        else:
            setattr(strategy, name, [values[str(i)] for i in range(len(values))])
