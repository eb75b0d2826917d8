"""Class prototypes with counts: the unit FedProto devices share instead of gradients.

A prototype is the mean embedding of one class with the number of examples behind
it (Prototypical Networks, Snell et al. 2017, https://arxiv.org/abs/1703.05175;
Federated Reconnaissance, Hendryx et al. 2021, https://arxiv.org/abs/2109.00150).
Merging weighs by counts, p <- (k*p + n*p_new)/(k+n), so a merge of any sets, in
any order, is the mean of every embedding behind them: nothing depends on which
device spoke first, classes only some devices know are kept, and a class that
appears late simply joins. Means are kept in float64 so that repeated merges do
not drift from that mean.

On the wire a set is per-class rows in float32 (dim x 4 bytes a class) or int8
with one float32 scale a class (dim + 4 bytes); `encode`/`decode` do both and
`wire_bytes` says what a class costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Encoding = Literal["fp32", "int8"]
Metric = Literal["euclidean", "cosine"]
ENCODINGS: tuple[Encoding, ...] = ("fp32", "int8")


class PrototypeError(ValueError):
    """A prototype set that cannot be merged or decoded; the message names the class or field."""


@dataclass
class PrototypeSet:
    """Per-class mean embeddings (float64) and the number of examples behind each mean."""

    dim: int
    means: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise PrototypeError(f"prototype dimension must be >= 1, got {self.dim}")
        if set(self.means) != set(self.counts):
            raise PrototypeError("every class needs both a mean and a count")
        for label, mean in self.means.items():
            self._check(label, mean, self.counts[label])
            self.means[label] = np.asarray(mean, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def labels(self) -> list[str]:
        return sorted(self.counts)

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, labels: Iterable[object]) -> PrototypeSet:
        """The set whose prototypes are the class means of `embeddings` ([N, dim])."""
        out = cls(dim=int(np.shape(embeddings)[1]))
        out.add(embeddings, labels)
        return out

    def add(self, embeddings: np.ndarray, labels: Iterable[object]) -> None:
        """Fold examples in online: each class's running mean moves by count, as a merge would."""
        x = np.asarray(embeddings, dtype=np.float64)
        names = [str(label) for label in labels]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise PrototypeError(f"embeddings must be [N, {self.dim}], got {list(x.shape)}")
        if len(names) != len(x):
            raise PrototypeError(f"{len(x)} embeddings but {len(names)} labels")
        for label in sorted(set(names)):
            rows = x[[i for i, name in enumerate(names) if name == label]]
            self._fold(label, rows.mean(axis=0), len(rows))

    def merge(self, other: PrototypeSet) -> None:
        """Count-weighted merge of `other` into this set (classes new to this set are added)."""
        if other.dim != self.dim:
            raise PrototypeError(f"cannot merge prototypes of dimension {other.dim} into {self.dim}")
        for label in other.labels:
            self._fold(label, other.means[label], other.counts[label])

    def copy(self) -> PrototypeSet:
        return PrototypeSet(
            self.dim, {k: v.copy() for k, v in self.means.items()}, dict(self.counts)
        )

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """Labels in sorted order and their means as one [C, dim] array."""
        labels = self.labels
        if not labels:
            return labels, np.zeros((0, self.dim))
        return labels, np.stack([self.means[label] for label in labels])

    def classify(self, embeddings: np.ndarray, metric: Metric = "euclidean") -> list[str]:
        """The nearest prototype's label for each embedding (squared Euclidean, or cosine)."""
        labels, protos = self.matrix()
        if not labels:
            raise PrototypeError("no prototypes to classify with: no class has been learned yet")
        x = np.asarray(embeddings, dtype=np.float64)
        if metric == "euclidean":
            scores = -((x[:, None, :] - protos[None, :, :]) ** 2).sum(axis=2)
        elif metric == "cosine":
            unit = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
            scores = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ unit.T
        else:
            raise PrototypeError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        return [labels[i] for i in scores.argmax(axis=1)]

    def _fold(self, label: str, mean: np.ndarray, count: int) -> None:
        self._check(label, mean, count)
        if count == 0:
            return
        k = self.counts.get(label, 0)
        new = np.asarray(mean, dtype=np.float64)
        self.means[label] = new.copy() if k == 0 else (k * self.means[label] + count * new) / (k + count)
        self.counts[label] = k + count

    def _check(self, label: str, mean: np.ndarray, count: int) -> None:
        if np.shape(mean) != (self.dim,):
            shape = list(np.shape(mean))
            raise PrototypeError(f"class {label!r}: prototype shape {shape}, expected [{self.dim}]")
        if not np.all(np.isfinite(mean)):
            raise PrototypeError(f"class {label!r}: prototype has NaN or infinite values")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise PrototypeError(f"class {label!r}: count must be an integer >= 0, got {count!r}")


def merge_all(sets: Iterable[PrototypeSet], dim: int) -> PrototypeSet:
    """One set from many (the server's merge of a round's replies)."""
    out = PrototypeSet(dim)
    for item in sets:
        out.merge(item)
    return out


def wire_bytes(dim: int, encoding: Encoding) -> int:
    """Bytes one class's prototype costs on the wire (values only; the count and label ride along)."""
    if encoding == "fp32":
        return 4 * dim
    if encoding == "int8":
        return dim + 4  # one float32 scale per class
    raise PrototypeError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def encode(protos: PrototypeSet, encoding: Encoding) -> dict[str, np.ndarray]:
    """Arrays to send: "values" ([C, dim] float32 or int8), "counts" (int64), "scales" (int8 only).

    Labels travel separately (in order, e.g. in a ConfigRecord) because array records carry numbers.
    """
    labels, means = protos.matrix()
    counts = np.array([protos.counts[label] for label in labels], dtype=np.int64)
    if encoding == "fp32":
        return {"values": means.astype(np.float32), "counts": counts}
    if encoding == "int8":
        scales = np.abs(means).max(axis=1) / 127.0 if len(labels) else np.zeros(0)
        safe = np.where(scales > 0, scales, 1.0)
        values = np.clip(np.rint(means / safe[:, None]), -127, 127).astype(np.int8)
        return {"values": values, "counts": counts, "scales": scales.astype(np.float32)}
    raise PrototypeError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def decode(labels: list[str], arrays: Mapping[str, np.ndarray]) -> PrototypeSet:
    """The set `encode` sent, from its arrays and labels; malformed input is refused by name."""
    try:
        values, counts = np.asarray(arrays["values"]), np.asarray(arrays["counts"])
    except KeyError as exc:
        raise PrototypeError(f"prototype arrays lack {exc.args[0]!r}") from None
    if values.ndim != 2 or len(values) != len(labels) or counts.shape != (len(labels),):
        raise PrototypeError(
            f"{len(labels)} labels but values {list(values.shape)} and counts {list(counts.shape)}"
        )
    if len(set(labels)) != len(labels):
        raise PrototypeError("a label appears twice in one prototype set")
    if values.dtype == np.int8:
        if "scales" not in arrays or np.shape(arrays["scales"]) != (len(labels),):
            raise PrototypeError("int8 prototypes need one scale per class under 'scales'")
        means = values.astype(np.float64) * np.asarray(arrays["scales"], dtype=np.float64)[:, None]
    elif values.dtype == np.float32:
        means = values.astype(np.float64)
    else:
        raise PrototypeError(f"prototype values must be float32 or int8, got {values.dtype}")
    if not np.issubdtype(counts.dtype, np.integer):
        raise PrototypeError(f"prototype counts must be integers, got {counts.dtype}")
    return PrototypeSet(
        dim=int(values.shape[1]),
        means={label: means[i] for i, label in enumerate(labels)},
        counts={label: int(counts[i]) for i, label in enumerate(labels)},
    )
