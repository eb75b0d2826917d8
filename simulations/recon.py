"""Federated reconnaissance with prototypes: devices learn new classes mission by mission from a few
examples and merge what they learned by counts (Hendryx et al. 2021, https://arxiv.org/abs/2109.00150).

Classes come in a seeded order; mission m goes to device m mod `devices` and teaches it the next
`ways` classes from `shots` drawings each, embedded by a frozen backbone. After its mission the
device sends the prototypes learned since its last merge (only those: nothing is counted twice),
the server merges them by counts (`PrototypeSet.merge`) and sends the merged set back. As classes
accumulate, queries of every class seen by any device (fixed drawings, never a support) are
classified by nearest prototype with

- ``merged``: the server's merged set (what every device holds after its merge);
- ``device``: each device's own prototypes, never merged (the mean over devices, and its 95 % CI
  over devices): a device alone cannot name classes others learned (its accuracy on queries of its
  own classes is reported beside);
- ``central``: prototypes from every non-query drawing of every seen class (an upper bound: more
  examples per class than any device had).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tinyfleet.common.prototypes import PrototypeSet

METHODS = ("merged", "device", "central")
#: Values a classification chunk may hold ([queries, classes, dim] float64): ~32 MB.
CHUNK_VALUES = 4_000_000


@dataclass(frozen=True)
class ReconPoint:
    """The three accuracies once `classes` classes have been learned over `missions` missions."""

    missions: int
    classes: int
    queries: int
    merged: float
    merged_ci95: float
    device: float
    device_ci95: float
    device_each: tuple[float, ...]
    device_own_classes: float  # mean over devices that learned a class: accuracy on queries of its own
    central: float
    central_ci95: float


def accuracy(protos: PrototypeSet, queries: np.ndarray, labels: list[str]) -> float:
    """Share of `queries` whose nearest prototype is their class; a set without a class scores 0.
    Classified in chunks: `PrototypeSet.classify` holds a [queries, classes, dim] array."""
    if len(protos) == 0:
        return 0.0
    chunk = max(1, CHUNK_VALUES // (len(protos) * protos.dim))
    correct = 0
    for start in range(0, len(queries), chunk):
        predicted = protos.classify(queries[start : start + chunk])
        correct += sum(p == t for p, t in zip(predicted, labels[start : start + chunk], strict=True))
    return correct / len(queries)


def _binomial_ci95(p: float, n: int) -> float:
    return 1.96 * math.sqrt(p * (1 - p) / n) if n else 0.0


def reconnaissance(
    embeddings: np.ndarray,
    *,
    devices: int,
    ways: int,
    shots: int,
    queries: int,
    seed: int,
    eval_every: int = 1,
    on_point: Callable[[ReconPoint], None] | None = None,
) -> list[ReconPoint]:
    """Run every mission over `embeddings` ([classes, drawings, dim], in the order classes are
    taught: mission m teaches classes m*ways ... m*ways+ways-1); score every `eval_every` missions
    and after the last. Drawings per class are shuffled (seeded): the first `queries` are queries,
    the next `shots` the mission's support, all but the queries the central set."""
    classes, drawings, dim = embeddings.shape
    if shots + queries > drawings:
        raise ValueError(f"{shots} shots + {queries} queries exceed the {drawings} drawings of a class")
    if classes % ways:
        raise ValueError(f"{classes} classes do not split into missions of {ways}")
    rng = np.random.default_rng([seed, 23])
    order = np.argsort(rng.random((classes, drawings)), axis=1)
    server = PrototypeSet(dim)
    own = [PrototypeSet(dim) for _ in range(devices)]
    central = PrototypeSet(dim)
    query_x, query_y = np.zeros((0, dim)), []
    missions = classes // ways
    points: list[ReconPoint] = []
    for mission in range(missions):
        taught = range(mission * ways, (mission + 1) * ways)
        new = PrototypeSet(dim)  # what the device learned since its last merge
        for c in taught:
            label = str(c)
            new.add(embeddings[c, order[c, queries : queries + shots]], [label] * shots)
            central.add(embeddings[c, order[c, queries:]], [label] * (drawings - queries))
            query_x = np.concatenate([query_x, embeddings[c, order[c, :queries]]])
            query_y += [label] * queries
        own[mission % devices].merge(new)
        server.merge(new)
        if (mission + 1) % eval_every and mission + 1 != missions:
            continue
        merged, middle = accuracy(server, query_x, query_y), accuracy(central, query_x, query_y)
        each = tuple(accuracy(p, query_x, query_y) for p in own)
        own_classes = []
        for learned in (p for p in own if len(p)):
            rows = [i for i, label in enumerate(query_y) if label in learned.counts]
            own_classes.append(accuracy(learned, query_x[rows], [query_y[i] for i in rows]))
        point = ReconPoint(
            missions=mission + 1,
            classes=len(server),
            queries=len(query_y),
            merged=merged,
            merged_ci95=_binomial_ci95(merged, len(query_y)),
            device=float(np.mean(each)),
            device_ci95=float(1.96 * np.std(each, ddof=1) / math.sqrt(devices)) if devices > 1 else 0.0,
            device_each=each,
            device_own_classes=float(np.mean(own_classes)),
            central=middle,
            central_ci95=_binomial_ci95(middle, len(query_y)),
        )
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points
