"""Rooms learning occupancy online from their own sensor rows, alone, as a merged fleet, and centrally.

Each room streams its contiguous block of the training week in time order
(`tinyfleet.client.occupancy.OccupancyRoomStream`, the source agents use) and sees each row once.
Two learners:

- ``logistic``: logistic regression by per-row SGD. Its weights are kept in raw sensor units and
  each step is taken in standardised coordinates (the learner's statistics at that moment), then
  mapped back: statistics that grow as rows arrive rescale the steps, never the function learned
  so far. Steps are normalised (lr / (1 + |z|²), as in normalised LMS): a reading far outside what
  the statistics have seen (the first lit office after a dark night: z in the hundreds) moves the
  row's log-odds by at most lr instead of flinging the weights. The fleet averages rooms' weights
  by the rows each saw that round (FedAvg).
- ``prototypes``: the two class means of raw readings with their counts; classification standardises
  means and rows with the learner's statistics and takes the nearest (squared Euclidean). The fleet
  merges rooms' new rows by counts (`PrototypeSet.merge`): exactly the central means.

Standardisation statistics merge by counts too (`FeatureStats.merged`), so a fleet standardises
with the statistics of every row any room has seen.

Which sensors a learner reads is chosen on training rows only (`select_features`): each of the
last `days` 24-hour blocks of the training week is predicted by the central learner streamed over
every earlier row; the subset with the most validation rows right wins, ties going to the lower
validation log-loss, then to fewer features. The test files are never read here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from tinyfleet.client.occupancy import (
    DAY_S,
    FEATURES,
    FeatureStats,
    OccupancyRoomStream,
    OccupancyTable,
)
from tinyfleet.common.prototypes import PrototypeSet

Learner = Literal["logistic", "prototypes"]
LEARNERS: tuple[Learner, ...] = ("logistic", "prototypes")
RULE = (
    "each of the last {days} 24-hour blocks of the training rows is predicted by the central online "
    "learner streamed over every earlier training row; most validation rows right wins, ties go to "
    "the lower validation log-loss, then to fewer features; test rows are never read"
)


def _columns(features: Sequence[str]) -> list[int]:
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(f"features must be a non-empty subset of {'+'.join(FEATURES)}, got {list(features)}")
    return [FEATURES.index(f) for f in features]


def _std(stats: FeatureStats) -> np.ndarray:
    return stats.std.numpy()


class LogisticHead:
    """w·x + b in raw sensor units over the chosen columns."""

    def __init__(self, columns: list[int]) -> None:
        self.columns = columns
        self.weight = np.zeros(len(columns))
        self.bias = 0.0

    def copy(self) -> LogisticHead:
        out = LogisticHead(self.columns)
        out.weight, out.bias = self.weight.copy(), self.bias
        return out

    def learn(self, x: np.ndarray, y: np.ndarray, stats: FeatureStats, lr: float) -> None:
        """One normalised SGD step per row, in order, in the coordinates `stats` standardises to."""
        mean, std = stats.mean.numpy()[self.columns], _std(stats)[self.columns]
        w, b = self.weight * std, self.bias + float(self.weight @ mean)
        for row, label in zip((x[:, self.columns] - mean) / std, y, strict=True):
            error = 1.0 / (1.0 + math.exp(-float(row @ w + b))) - float(label)
            step = lr * error / (1.0 + float(row @ row))
            w = w - step * row
            b -= step
        self.weight, self.bias = w / std, b - float((w / std) @ mean)

    def scores(self, x: np.ndarray, stats: FeatureStats) -> np.ndarray:
        """Log-odds of occupied (the statistics do not change the function)."""
        return x[:, self.columns] @ self.weight + self.bias


def average(heads: Sequence[LogisticHead], weights: Sequence[int]) -> LogisticHead:
    """Example-weighted mean of the heads' parameters (FedAvg); the weights must not all be 0."""
    total = sum(weights)
    out = heads[0].copy()
    out.weight = np.sum([h.weight * n for h, n in zip(heads, weights, strict=True)], axis=0) / total
    out.bias = sum(h.bias * n for h, n in zip(heads, weights, strict=True)) / total
    return out


class PrototypeHead:
    """Raw class means with counts over the chosen columns (labels "0" and "1")."""

    def __init__(self, columns: list[int], protos: PrototypeSet | None = None) -> None:
        self.columns = columns
        self.protos = PrototypeSet(len(columns)) if protos is None else protos

    def copy(self) -> PrototypeHead:
        return PrototypeHead(self.columns, self.protos.copy())

    def learn(self, x: np.ndarray, y: np.ndarray, stats: FeatureStats, lr: float) -> None:
        self.protos.add(x[:, self.columns], [str(int(v)) for v in y])

    def scores(self, x: np.ndarray, stats: FeatureStats) -> np.ndarray:
        """d²(row, "0") - d²(row, "1") in standardised units (the log-odds of a prototypical network); a
        class never seen is infinitely far."""
        mean, std = stats.mean.numpy()[self.columns], _std(stats)[self.columns]
        z = (x[:, self.columns] - mean) / std
        distance = {}
        for label in ("0", "1"):
            if label in self.protos.counts:
                centre = (self.protos.means[label] - mean) / std
                distance[label] = ((z - centre) ** 2).sum(axis=1)
            else:
                distance[label] = np.full(len(z), np.inf)
        with np.errstate(invalid="ignore"):  # neither class known: inf - inf, scored as 0 (unoccupied)
            return np.nan_to_num(distance["0"] - distance["1"], nan=-np.inf)


Head = LogisticHead | PrototypeHead


def new_head(learner: Learner, columns: list[int]) -> Head:
    if learner == "logistic":
        return LogisticHead(columns)
    if learner == "prototypes":
        return PrototypeHead(columns)
    raise ValueError(f"learner must be one of {LEARNERS}, got {learner!r}")


def accuracy(head: Head, stats: FeatureStats, x: np.ndarray, y: np.ndarray) -> float:
    return float(((head.scores(x, stats) > 0) == (y == 1)).mean())


def log_loss(head: Head, stats: FeatureStats, x: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of the scores read as log-odds."""
    s = head.scores(x, stats)
    with np.errstate(invalid="ignore"):
        per_row = np.where(y == 1, np.logaddexp(0.0, -s), np.logaddexp(0.0, s))
    return float(np.nan_to_num(per_row, nan=0.0).mean())


@dataclass
class OnlineLearner:
    """A head and the statistics of the rows it has seen."""

    head: Head
    stats: FeatureStats
    rows: int = 0

    def stream(self, x: np.ndarray, y: np.ndarray, lr: float) -> FeatureStats:
        """Fold in new rows (statistics first, so the step standardises with them); returns their
        statistics."""
        new = FeatureStats.of(torch.from_numpy(x))
        self.stats = self.stats.merged(new)
        self.head.learn(x, y, self.stats, lr)
        self.rows += len(y)
        return new


def fresh(learner: Learner, columns: list[int]) -> OnlineLearner:
    return OnlineLearner(new_head(learner, columns), FeatureStats.of(torch.zeros(0, len(FEATURES))))


def stream_central(
    learner: Learner, columns: list[int], x: np.ndarray, y: np.ndarray, lr: float, chunk: int
) -> OnlineLearner:
    """One learner over rows in order, `chunk` rows at a time (statistics updated per chunk)."""
    out = fresh(learner, columns)
    for start in range(0, len(y), chunk):
        out.stream(x[start : start + chunk], y[start : start + chunk], lr)
    return out


# -- choosing the sensors --------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    features: tuple[str, ...]
    correct: int
    rows: int
    log_loss: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows


@dataclass(frozen=True)
class Selection:
    """The chosen sensors, the rule, the validation blocks (training-row times) and every candidate."""

    learner: Learner
    features: tuple[str, ...]
    rule: str
    blocks: list[dict[str, int]]  # {"start": s, "end": s, "rows": n, "occupied": n}
    candidates: list[Candidate] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        ranked = sorted(self.candidates, key=_rank)
        return {
            "chosen": list(self.features),
            "rule": self.rule,
            "validation_blocks": self.blocks,
            "candidates": [
                {
                    "features": list(c.features),
                    "val_acc": round(c.accuracy, 5),
                    "val_log_loss": round(c.log_loss, 5),
                }
                for c in ranked
            ],
        }


def _rank(c: Candidate) -> tuple[int, float, int]:
    return (-c.correct, c.log_loss, len(c.features))


def validation_blocks(seconds: np.ndarray, days: int) -> list[np.ndarray]:
    """Masks of the last `days` 24-hour blocks of the training rows (the latest first)."""
    end = int(seconds.max()) + 1
    blocks = [(seconds >= end - (j + 1) * DAY_S) & (seconds < end - j * DAY_S) for j in range(days)]
    if days < 1 or not blocks[-1].any() or bool(blocks[-1].all()):
        raise ValueError(f"validation_days={days}: the training rows must span more than {days} days")
    return blocks


def select_features(
    training: OccupancyTable, learner: Learner, lr: float, chunk: int, days: int
) -> Selection:
    """The subset of sensors `RULE` picks; reads the training table only."""
    seconds = training.seconds.numpy()
    x, y = training.readings.double().numpy(), training.occupied.numpy()
    blocks = validation_blocks(seconds, days)
    candidates = []
    for size in range(1, len(FEATURES) + 1):
        for names in itertools.combinations(FEATURES, size):
            correct, loss = 0, 0.0
            for block in blocks:
                before = seconds < seconds[block].min()
                fitted = stream_central(learner, _columns(names), x[before], y[before], lr, chunk)
                scores_right = (fitted.head.scores(x[block], fitted.stats) > 0) == (y[block] == 1)
                correct += int(scores_right.sum())
                loss += log_loss(fitted.head, fitted.stats, x[block], y[block]) * int(block.sum())
            rows = int(sum(int(b.sum()) for b in blocks))
            candidates.append(Candidate(names, correct, rows, loss / rows))
    best = min(candidates, key=_rank)
    described = [
        {
            "start": int(seconds[b].min()),
            "end": int(seconds[b].max()),
            "rows": int(b.sum()),
            "occupied": int(y[b].sum()),
        }
        for b in blocks
    ]
    return Selection(learner, best.features, RULE.format(days=days), described, candidates)


# -- the fleet -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """Accuracies after `round` rounds, when the fleet (and the central learner) had seen `rows` rows."""

    round: int
    rows: int
    learner: Learner
    arm: str  # "federated", "central" or "room-K"
    test: str
    acc: float


@dataclass
class Fleet:
    """One learner kind on `rooms` rooms: each alone, the federated merge, and central (same rows
    per round as the whole fleet, in time order)."""

    learner: Learner
    columns: list[int]
    streams: list[OccupancyRoomStream]
    central_x: np.ndarray
    central_y: np.ndarray
    lr: float
    rows_per_round: int
    alone: list[OnlineLearner] = field(init=False)
    federated: OnlineLearner = field(init=False)
    central: OnlineLearner = field(init=False)
    round: int = 0

    def __post_init__(self) -> None:
        self.alone = [fresh(self.learner, self.columns) for _ in self.streams]
        self.federated = fresh(self.learner, self.columns)
        self.central = fresh(self.learner, self.columns)

    @property
    def rounds(self) -> int:
        return math.ceil(max(len(s.y) for s in self.streams) / self.rows_per_round)

    def step(self) -> None:
        """One round: every room streams its next rows, learns alone and on the fleet's model; the
        server merges the fleet's replies; central streams as many rows."""
        replies: list[tuple[Head, int]] = []
        new_stats: list[FeatureStats] = []
        for stream, alone in zip(self.streams, self.alone, strict=True):
            n = min(self.rows_per_round, len(stream.y) - stream.position)
            if n <= 0:
                continue
            x, y = (t.numpy() for t in stream.next(n))
            x = x.astype(np.float64)
            delta = alone.stream(x, y, self.lr)
            local = OnlineLearner(self._start_from_fleet(), self.federated.stats)
            local.stream(x, y, self.lr)
            replies.append((local.head, n))
            new_stats.append(delta)
        for delta in new_stats:
            self.federated.stats = self.federated.stats.merged(delta)
        self._merge(replies)
        self.federated.rows += sum(n for _, n in replies)
        start = self.central.rows
        end = start + sum(n for _, n in replies)
        self.central.stream(self.central_x[start:end], self.central_y[start:end], self.lr)
        self.round += 1

    def _start_from_fleet(self) -> Head:
        """What a room trains from: the fleet's logistic weights, or an empty set of new prototypes
        (a room sends only the rows it has not sent, so nothing is counted twice)."""
        if isinstance(self.federated.head, LogisticHead):
            return self.federated.head.copy()
        return PrototypeHead(self.columns)

    def _merge(self, replies: list[tuple[Head, int]]) -> None:
        if not replies:
            return
        head = self.federated.head
        if isinstance(head, LogisticHead):
            self.federated.head = average(
                [h for h, _ in replies if isinstance(h, LogisticHead)], [n for _, n in replies]
            )
            return
        for reply, _ in replies:
            assert isinstance(reply, PrototypeHead)
            head.protos.merge(reply.protos)

    def arms(self) -> dict[str, OnlineLearner]:
        return {
            "federated": self.federated,
            "central": self.central,
            **{f"room-{s.room}": a for s, a in zip(self.streams, self.alone, strict=True)},
        }

    def evaluate(self, tests: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[Point]:
        return [
            Point(self.round, self.federated.rows, self.learner, arm, name, accuracy(a.head, a.stats, x, y))
            for arm, a in self.arms().items()
            for name, (x, y) in tests.items()
        ]


def run_fleet(
    learner: Learner,
    features: Sequence[str],
    root: Path,
    training: OccupancyTable,
    tests: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    rooms: int,
    lr: float,
    rows_per_round: int,
    eval_every: int,
    on_points: Callable[[list[Point]], None] | None = None,
) -> Fleet:
    """Stream every room's rows once; score every arm every `eval_every` rounds and after the last."""
    fleet = Fleet(
        learner,
        _columns(features),
        [OccupancyRoomStream(room, rooms, root) for room in range(rooms)],
        training.readings.double().numpy(),
        training.occupied.numpy(),
        lr,
        rows_per_round,
    )
    total = fleet.rounds
    while fleet.round < total:
        fleet.step()
        if fleet.round % eval_every == 0 or fleet.round == total:
            points = fleet.evaluate(tests)
            if on_points is not None:
                on_points(points)
    return fleet


def batch_logistic(
    features: Sequence[str], training: OccupancyTable, iterations: int = 200
) -> tuple[LogisticHead, FeatureStats]:
    """Logistic regression fitted on every training row at once (L-BFGS, standardised features): the
    offline reference an online learner is measured against."""
    columns = _columns(features)
    stats = FeatureStats.of(training.readings)
    z = stats.standardize(training.readings).double()[:, columns]
    y = training.occupied.double()
    w = torch.zeros(len(columns), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    head = LogisticHead(columns)
    mean, std = stats.mean.numpy()[columns], _std(stats)[columns]
    head.weight = w.detach().numpy() / std
    head.bias = float(b.detach()) - float(head.weight @ mean)
    return head, stats
