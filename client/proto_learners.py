"""Device side of FedProto: the `train.fedproto` and `evaluate.fedproto` handlers.

Training embeds the next stream samples with the frozen backbone (eval mode, no
gradients: batch norm uses its running statistics, so one sample embeds the same
alone or in a batch) and folds them into running per-class means. What goes back
is the device's delta: everything not yet acknowledged as merged, numbered as
`tinyfleet.common.proto_protocol` describes, so a reply lost on the way is sent
again and an acknowledged one never is. The unacknowledged rows, the backbone and
its sha256 live in `context.state`; a device keeps one Context for its life, and
a new session (another job) or backbone starts its rows afresh.

Evaluation classifies held-back samples by the nearest merged prototype
(squared Euclidean, or cosine) and reports accuracy.

Class names must mean the same class on every device: a source may say how its
integer labels are named (`label_names(labels, held=...)`: a word, a global
character id); otherwise integer labels are named by their value ("0", "1").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from tinyfleet.client.data_sources import DataSource
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.client.learners import model_from_config, node_source
from tinyfleet.common.arrays import from_numpy_dict, load_array_record
from tinyfleet.common.flower_adapter import reply_with_content
from tinyfleet.common.message_keys import CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from tinyfleet.common.proto_protocol import (
    ACK_KEY,
    BACKBONE_KEY,
    BACKBONE_SHA_KEY,
    BASE_KEY,
    DELTA_KEY,
    LABELS_KEY,
    PROTOTYPES_KEY,
    SEQ_KEY,
    SESSION_KEY,
    backbone_sha,
    from_wire,
    to_wire,
)
from tinyfleet.common.prototypes import PrototypeSet
from tinyfleet.common.strategy_options import ProtoEvalOptions, ProtoTrainOptions

BACKBONE_STATE = "fedproto.backbone"  # ArrayRecord: the backbone this device holds
BACKBONE_META_STATE = "fedproto.backbone-meta"  # ConfigRecord: its sha256
PENDING_STATE = "fedproto.pending"  # ArrayRecord: the unacknowledged rows (seqs, counts, means)
PENDING_META_STATE = "fedproto.pending-meta"  # ConfigRecord: their labels, session, backbone, last number
EMBED_BATCH = 256  # samples embedded per forward pass


@dataclass
class Pending:
    """Rows (reply number, class, count, mean) folded in but not yet acknowledged as merged."""

    session: str
    sha: str
    last_seq: int
    seqs: list[int]
    labels: list[str]
    counts: list[int]
    means: list[np.ndarray]

    @classmethod
    def load(cls, context: Context, session: str, sha: str) -> Pending:
        """This session's rows; another session's or backbone's are dropped."""
        meta = context.state.config_records.get(PENDING_META_STATE)
        rows = context.state.array_records.get(PENDING_STATE)
        owner = None if meta is None else (meta.get(SESSION_KEY), meta.get(BACKBONE_SHA_KEY))
        if meta is None or rows is None or owner != (session, sha):
            return cls(session, sha, 0, [], [], [], [])
        labels = meta[LABELS_KEY]
        last = meta[SEQ_KEY]
        if not isinstance(labels, list) or not isinstance(last, int):
            raise ValueError(
                f"device state {PENDING_META_STATE!r} is malformed: labels {labels!r}, seq {last!r}"
            )
        means = rows["means"].numpy()
        return cls(session, sha, last, rows["seqs"].numpy().tolist(), [str(v) for v in labels],
                   rows["counts"].numpy().tolist(), list(means))

    def save(self, context: Context, dim: int) -> None:
        means = np.stack(self.means) if self.means else np.zeros((0, dim))
        context.state[PENDING_STATE] = from_numpy_dict(
            {
                "seqs": np.array(self.seqs, dtype=np.int64),
                "counts": np.array(self.counts, dtype=np.int64),
                "means": means.astype(np.float64),
            }
        )
        context.state[PENDING_META_STATE] = ConfigRecord(
            {LABELS_KEY: list(self.labels), SESSION_KEY: self.session, BACKBONE_SHA_KEY: self.sha,
             SEQ_KEY: self.last_seq}
        )

    def acknowledge(self, ack: int) -> None:
        """Drop the rows the server has merged (numbers up to `ack`)."""
        keep = [i for i, seq in enumerate(self.seqs) if seq > ack]
        self.seqs = [self.seqs[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self.counts = [self.counts[i] for i in keep]
        self.means = [self.means[i] for i in keep]
        self.last_seq = max(self.last_seq, ack)

    def add(self, seq: int, fresh: PrototypeSet) -> None:
        for label in fresh.labels:
            self.seqs.append(seq)
            self.labels.append(label)
            self.counts.append(fresh.counts[label])
            self.means.append(fresh.means[label])
        self.last_seq = seq

    def total(self, dim: int) -> PrototypeSet:
        out = PrototypeSet(dim)
        for label, count, mean in zip(self.labels, self.counts, self.means, strict=True):
            out.merge(PrototypeSet(dim, {label: mean}, {label: count}))
        return out


def train(message: Message, context: Context) -> Message:
    """Fold the next stream samples into this device's class means; reply with all it has not
    seen acknowledged as merged."""
    config = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
    options = ProtoTrainOptions.from_config(config)
    session, ack = config.get(SESSION_KEY), config.get(ACK_KEY)
    if not isinstance(session, str) or not isinstance(ack, int) or ack < 0:
        raise ValueError(f"train message needs a string {SESSION_KEY!r} and an integer {ACK_KEY!r} >= 0, "
                         f"got {session!r} and {ack!r}")
    model, sha = _backbone(message, context)
    source = node_source(context)
    new_task = getattr(source, "new_task", None)
    if callable(new_task):  # episodic sources (e.g. omniglot) bring new classes each round
        new_task()
    x, y = source.next(options.samples_per_round)
    fresh = PrototypeSet.from_embeddings(embed(model, x), label_names(source, y))
    pending = Pending.load(context, session, sha)
    pending.acknowledge(ack)
    seq = pending.last_seq + 1
    pending.add(seq, fresh)
    pending.save(context, fresh.dim)
    record, labels = to_wire(pending.total(fresh.dim), options.encoding)
    delta = ConfigRecord({LABELS_KEY: labels, BASE_KEY: ack, SEQ_KEY: seq, BACKBONE_SHA_KEY: sha})
    metrics = MetricRecord({NUM_EXAMPLES_KEY: len(y), "classes_sent": len(labels)})
    return reply_with_content(
        message, RecordDict({PROTOTYPES_KEY: record, DELTA_KEY: delta, METRICS_KEY: metrics})
    )


def evaluate(message: Message, context: Context) -> Message:
    """Accuracy of the nearest merged prototype on held-back samples."""
    content = message.content
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    options = ProtoEvalOptions.from_config(config)
    record = content.array_records.get(PROTOTYPES_KEY)
    if record is None:
        raise ValueError(f"evaluate message carries no prototypes under {PROTOTYPES_KEY!r}")
    merged = from_wire(record, config.get(LABELS_KEY))
    model, _ = _backbone(message, context)
    source = node_source(context)
    x, y = source.holdout(options.eval_samples)
    truth = label_names(source, y, held=True)
    predicted = merged.classify(embed(model, x), options.metric)
    correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
    known = set(merged.labels)
    metrics = MetricRecord(
        {
            "accuracy": correct / len(truth),
            "known_fraction": sum(t in known for t in truth) / len(truth),
            NUM_EXAMPLES_KEY: len(truth),
        }
    )
    return reply_with_content(message, RecordDict({METRICS_KEY: metrics}))


def register_all(registry: HandlerRegistry) -> None:
    registry.register("train.fedproto")(train)
    registry.register("evaluate.fedproto")(evaluate)


def embed(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Embeddings [N, dim] (float64) of a frozen backbone: eval mode, no gradients."""
    model.eval()
    with torch.no_grad():
        parts = [model(x[i : i + EMBED_BATCH]) for i in range(0, len(x), EMBED_BATCH)]
    return torch.cat(parts).reshape(len(x), -1).double().numpy()


def label_names(source: DataSource, labels: torch.Tensor, held: bool = False) -> list[str]:
    """The class names of a source's integer labels (from its stream, or held back)."""
    names = getattr(source, "label_names", None)
    if callable(names):
        return list(names(labels, held=held))
    if labels.dtype.is_floating_point or labels.dim() != 1:
        raise ValueError(
            f"data source {source.kind!r} has no class labels (labels of dtype {labels.dtype}, "
            f"shape {list(labels.shape)}); FedProto needs one integer class per sample"
        )
    return [str(v) for v in labels.tolist()]


def _backbone(message: Message, context: Context) -> tuple[nn.Module, str]:
    """The zoo model the config names with the backbone the message names by sha256: received
    now (checked and kept) or kept from an earlier message."""
    config = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
    sha = config.get(BACKBONE_SHA_KEY)
    if not isinstance(sha, str) or not sha:
        raise ValueError(f"message names no backbone (config {BACKBONE_SHA_KEY!r})")
    received = message.content.array_records.get(BACKBONE_KEY)
    state = context.state
    if received is not None:
        got = backbone_sha(received)
        if got != sha:
            raise ValueError(f"the backbone received has sha256 {got}, the message names {sha}")
        state[BACKBONE_STATE] = received
        state[BACKBONE_META_STATE] = ConfigRecord({BACKBONE_SHA_KEY: sha})
    else:
        held = state.config_records.get(BACKBONE_META_STATE, ConfigRecord()).get(BACKBONE_SHA_KEY)
        if held != sha or BACKBONE_STATE not in state.array_records:
            raise ValueError(
                f"backbone {sha[:12]} is not on this device (it holds {str(held)[:12] if held else 'none'}); "
                "the server sends it with the next message"
            )
        received = state.array_records[BACKBONE_STATE]
    _, model = model_from_config(config)
    load_array_record(model, received)
    model.requires_grad_(False)
    return model, sha
