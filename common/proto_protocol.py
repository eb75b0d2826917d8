"""What FedProto's server and devices agree on: message types, record keys, the artifact layout.

Both sides import this module, as FedReptile's share `tinyfleet.common.reptile_protocol`.

**Messages.** A train or evaluate message carries the merged prototype set
(`PROTOTYPES_KEY`: an ArrayRecord from `prototypes.encode`, its labels under
`LABELS_KEY` in the message's config) and names the backbone by the sha256 of its
ArrayRecord bytes (`backbone_sha`). The backbone arrays themselves travel
(`BACKBONE_KEY`) only to a node the server does not know to hold them; the device
checks the sha256 of what it received and keeps it in its Context, so later
messages carry only the sha256.

**No double counting.** A train reply carries the device's *delta*
(`PROTOTYPES_KEY`, with labels and numbers in the `DELTA_KEY` ConfigRecord): the
examples it has folded in since the last merge the server acknowledged. Each
reply is numbered (`SEQ_KEY`, per device and session) and says which
acknowledgement it builds on (`BASE_KEY`); every message tells the device the
highest number the server has merged from it (`ACK_KEY`). The device drops
what the acknowledgement covers and sends the rest again, so a reply lost to a
dropout or a deadline arrives with the next one; the server merges a reply only
when its base is the acknowledgement it holds for that device, so nothing is
merged twice. The server's acknowledgements are checkpointed with each round,
together with the merged set, so a resumed coordinator asks again for exactly
what it had not kept. A new session (another job) starts the device afresh.

**Artifact.** The server's global ArrayRecord (each round's artifact) is the
backbone's arrays plus the merged set under `fedproto.*` keys: means in float64
(repeated merges stay exact), counts, and the labels as UTF-8 JSON bytes
(array records hold numbers only). `CONTRIBUTORS_KEY` names, per class, the
nodes whose examples its prototype holds (a JSON object, label -> node ids), so
the registry can describe each round's classes and the devices behind them from
the artifact store alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Final

import numpy as np
from flwr.app import ArrayRecord

from tinyfleet.common import prototypes
from tinyfleet.common.arrays import from_numpy_dict
from tinyfleet.common.flower_adapter import array_record_to_bytes, array_values, raw_array
from tinyfleet.common.prototypes import Encoding, PrototypeError, PrototypeSet

TRAIN_TYPE: Final = "train.fedproto"
EVALUATE_TYPE: Final = "evaluate.fedproto"
BACKBONE_KEY: Final = "backbone"  # ArrayRecord (down): the backbone, to a node that may lack it
PROTOTYPES_KEY: Final = "prototypes"  # ArrayRecord of an encoded set (down: the merged set; up: a delta)
DELTA_KEY: Final = "delta"  # ConfigRecord (up): the delta's labels, numbers and backbone
LABELS_KEY: Final = "prototype-labels"  # config: the encoded set's labels, in its row order
BACKBONE_SHA_KEY: Final = "backbone-sha"  # config (both ways): sha256 of the backbone's ArrayRecord bytes
SESSION_KEY: Final = "session"  # config (down): the strategy instance the numbers belong to
ACK_KEY: Final = "ack"  # config (down): highest reply number of this device the server has merged
BASE_KEY: Final = "base"  # config (up): the acknowledgement the delta builds on
SEQ_KEY: Final = "seq"  # config (up): this reply's number; the delta covers (base, seq]

ARTIFACT_PREFIX: Final = "fedproto."
MEANS_KEY: Final = ARTIFACT_PREFIX + "means"
COUNTS_KEY: Final = ARTIFACT_PREFIX + "counts"
ARTIFACT_LABELS_KEY: Final = ARTIFACT_PREFIX + "labels"
CONTRIBUTORS_KEY: Final = ARTIFACT_PREFIX + "contributors"


def backbone_sha(backbone: ArrayRecord) -> str:
    """The backbone's content address: the sha256 its ArrayRecord has in the artifact store."""
    return hashlib.sha256(array_record_to_bytes(backbone)).hexdigest()


def split_global(arrays: ArrayRecord) -> tuple[ArrayRecord, PrototypeSet | None]:
    """A global ArrayRecord's backbone and merged set (None before any class was merged)."""
    backbone = ArrayRecord({k: v for k, v in arrays.items() if not k.startswith(ARTIFACT_PREFIX)})
    if MEANS_KEY not in arrays:
        return backbone, None
    try:
        means, counts = arrays[MEANS_KEY].numpy(), arrays[COUNTS_KEY].numpy()
        labels = json.loads(arrays[ARTIFACT_LABELS_KEY].numpy().tobytes().decode("utf-8"))
    except (KeyError, ValueError) as exc:
        raise PrototypeError(f"global arrays hold a malformed prototype set: {exc}") from None
    if not isinstance(labels, list) or len(labels) != len(means) or len(counts) != len(means):
        raise PrototypeError(
            f"global arrays hold {len(means)} prototypes, {len(counts)} counts and labels {labels!r}"
        )
    merged = PrototypeSet(
        dim=int(means.shape[1]),
        means={str(label): means[i] for i, label in enumerate(labels)},
        counts={str(label): int(counts[i]) for i, label in enumerate(labels)},
    )
    return backbone, merged


def join_global(
    backbone: ArrayRecord, merged: PrototypeSet, contributors: Mapping[str, Iterable[int]]
) -> ArrayRecord:
    """The global ArrayRecord (a round's artifact): the backbone and the merged set, exactly, and
    each class's contributing nodes."""
    labels, means = merged.matrix()
    counts = np.array([merged.counts[label] for label in labels], dtype=np.int64)
    nodes = {label: sorted(contributors.get(label, ())) for label in labels}
    merged_arrays = from_numpy_dict(
        {
            MEANS_KEY: means.astype(np.float64),
            COUNTS_KEY: counts,
            ARTIFACT_LABELS_KEY: _json_bytes(labels),
            CONTRIBUTORS_KEY: _json_bytes(nodes),
        }
    )
    return ArrayRecord({**dict(backbone.items()), **dict(merged_arrays.items())})


def global_contributors(arrays: ArrayRecord) -> dict[str, list[int]]:
    """Per class of a global ArrayRecord, the nodes whose examples its prototype holds ({} when it
    names none); a malformed entry raises PrototypeError."""
    if CONTRIBUTORS_KEY not in arrays:
        return {}
    try:
        nodes = json.loads(arrays[CONTRIBUTORS_KEY].numpy().tobytes().decode("utf-8"))
    except ValueError as exc:
        raise PrototypeError(f"{CONTRIBUTORS_KEY} is not UTF-8 JSON: {exc}") from None
    if not isinstance(nodes, dict) or not all(
        isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in nodes.values()
    ):
        raise PrototypeError(f"{CONTRIBUTORS_KEY} must map each label to node ids, got {nodes!r}")
    return {str(label): list(ids) for label, ids in nodes.items()}


def _json_bytes(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value, sort_keys=True).encode("utf-8"), dtype=np.uint8).copy()


def to_wire(protos: PrototypeSet, encoding: Encoding) -> tuple[ArrayRecord, list[str]]:
    """A set as it travels: its encoded arrays (raw bytes, no .npy headers) and its labels."""
    labels = protos.labels
    arrays = prototypes.encode(protos, encoding)
    return ArrayRecord({k: raw_array(v) for k, v in arrays.items()}), labels


def from_wire(record: ArrayRecord, labels: object) -> PrototypeSet:
    """The set `to_wire` sent; malformed arrays or labels raise PrototypeError naming the problem."""
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise PrototypeError(f"prototype labels must be a list of strings, got {labels!r}")
    try:
        arrays = {k: array_values(v) for k, v in record.items()}
    except ValueError as exc:
        raise PrototypeError(f"prototype arrays do not load: {exc}") from None
    return prototypes.decode(labels, arrays)

