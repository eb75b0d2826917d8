"""Building occupancy (UCI Occupancy Detection) as a fleet of rooms streaming sensor rows in time order.

The files live in ``occupancy/`` under the data folder (``dir=`` in the spec or
``--data-dir``, else ``$TINYFLEET_DATA``, else ``../shared/data``). They are CSV
whose header names 7 columns while every row carries 8 fields: a quoted row id
comes first. ``datatraining.txt`` (Feb 4-10) feeds the rooms; ``datatest.txt``
(Feb 2-4, door closed) and ``datatest2.txt`` (Feb 11-18, door open) are the
test sets, disjoint in time from the training rows.

Rooms are contiguous stretches of the training week, not interleaved minutes:
interleaving would give every room the same days sampled more sparsely, while
contiguous blocks give each room its own days (a weekend room may never see
anyone), the non-IID fleet that merging is for.
"""

from __future__ import annotations

import calendar
import csv
import functools
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from tinyfleet.client.data_sources import DataSpecError
from tinyfleet.client.omniglot import data_root

FEATURES: tuple[str, ...] = ("Temperature", "Humidity", "Light", "CO2", "HumidityRatio")
HEADER: tuple[str, ...] = ("date", *FEATURES, "Occupancy")
TRAINING = "datatraining.txt"
TEST_SETS: tuple[str, ...] = ("datatest.txt", "datatest2.txt")
DAY_S = 86_400


@dataclass(frozen=True)
class OccupancyTable:
    """One file's rows sorted by time: raw sensor readings, 0/1 labels, timestamps in seconds."""

    row_ids: torch.Tensor  # int64 [n], the quoted first field
    seconds: torch.Tensor  # int64 [n], the reading's time (naive timestamps read as UTC)
    readings: torch.Tensor  # float32 [n, 5], FEATURES in order
    occupied: torch.Tensor  # int64 [n]

    def __len__(self) -> int:
        return len(self.occupied)

    def features(self, time_of_day: bool = False) -> torch.Tensor:
        """The five readings, plus sin/cos of the time of day if asked (cyclic: 23:59 is near 00:00)."""
        if not time_of_day:
            return self.readings
        angle = (self.seconds % DAY_S).double() * (2 * math.pi / DAY_S)
        clock = torch.stack([torch.sin(angle), torch.cos(angle)], dim=1).float()
        return torch.cat([self.readings, clock], dim=1)


def occupancy_path(name: str, root: str | Path | None = None) -> Path:
    """The path of one occupancy file, failing with how to point at the data when it is absent."""
    path = data_root(root) / "occupancy" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"occupancy file not found at {path}; pass dir=DIR in the --data spec or --data-dir DIR "
            "(the folder holding occupancy/), or set TINYFLEET_DATA"
        )
    return path


@functools.lru_cache(maxsize=8)
def load_table(path: str) -> OccupancyTable:
    """Parse one occupancy CSV (cached per process); rows come back in time order, whatever the file's."""
    rows: list[tuple[int, int, list[float], int]] = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = tuple(next(reader, ()))
        if header != HEADER:
            raise ValueError(f"{path}: header {list(header)} is not the occupancy header {list(HEADER)}")
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(HEADER) + 1:
                raise ValueError(
                    f"{path}:{line}: {len(fields)} fields; an occupancy row has {len(HEADER) + 1} "
                    "(a row id, then the header's columns)"
                )
            try:
                stamp = calendar.timegm(datetime.fromisoformat(fields[1]).timetuple())
                readings = [float(v) for v in fields[2:7]]
                rows.append((int(fields[0]), stamp, readings, int(fields[7])))
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
    if not rows:
        raise ValueError(f"{path} holds no rows")
    rows.sort(key=lambda r: r[1])  # stable: equal timestamps keep file order
    ids, stamps, values, labels = zip(*rows, strict=True)
    occupied = torch.tensor(labels, dtype=torch.int64)
    if not set(occupied.tolist()) <= {0, 1}:
        raise ValueError(f"{path}: Occupancy must be 0 or 1")
    return OccupancyTable(
        row_ids=torch.tensor(ids, dtype=torch.int64),
        seconds=torch.tensor(stamps, dtype=torch.int64),
        readings=torch.tensor(values, dtype=torch.float32),
        occupied=occupied,
    )


def load_test_sets(
    root: str | Path | None = None, time_of_day: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Both test files as (features, labels), in time order, keyed by file name."""
    out = {}
    for name in TEST_SETS:
        table = load_table(str(occupancy_path(name, root)))
        out[name] = (table.features(time_of_day), table.occupied)
    return out


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature count, mean and sum of squared deviations; merging by counts is exact and order-free
    (Chan et al.), so rooms' statistics combine into the statistics of all their rows."""

    count: int
    mean: torch.Tensor  # float64 [d]
    m2: torch.Tensor  # float64 [d]

    @classmethod
    def of(cls, x: torch.Tensor) -> FeatureStats:
        x = x.double()
        if len(x) == 0:
            return cls(0, x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1]))
        mean = x.mean(dim=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(dim=0))

    def merged(self, other: FeatureStats) -> FeatureStats:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return FeatureStats(count, mean, m2)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation; a constant feature gets 1 so standardising never divides by 0."""
        std = (self.m2 / max(self.count, 1)).sqrt()
        return torch.where(std > 0, std, torch.ones_like(std))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no rows seen yet: standardisation statistics are empty")
        return ((x.double() - self.mean) / self.std).float()


def training_stats(root: str | Path | None = None, time_of_day: bool = False) -> FeatureStats:
    """Statistics of every training row: the central reference (what all rooms' merged statistics reach)."""
    return FeatureStats.of(load_table(str(occupancy_path(TRAINING, root))).features(time_of_day))


class OccupancyRoomStream:
    """One room: a contiguous block of the training rows, streamed in time order.

    `next` wraps from the room's last row back to its first (`passes` counts completed passes).
    `seen` holds the statistics of the distinct rows streamed so far: a device standardises with
    what it has observed, never with test rows or other rooms' rows; rows repeated after a wrap
    are not counted again. `holdout` draws from ``datatest.txt``, the same rows for every room.
    """

    kind = "occupancy"

    def __init__(self, room: int, rooms: int, root: Path, time_of_day: bool = False) -> None:
        table = load_table(str(occupancy_path(TRAINING, root)))
        if not 0 <= room < rooms <= len(table):
            raise DataSpecError(
                f"occupancy: need 0 <= room < rooms <= {len(table)} (training rows), "
                f"got room={room}, rooms={rooms}"
            )
        start, end = room * len(table) // rooms, (room + 1) * len(table) // rooms
        self.room, self.rooms, self.time_of_day, self._root = room, rooms, time_of_day, str(root)
        self.x = table.features(time_of_day)[start:end]
        self.y = table.occupied[start:end]
        self.seconds = table.seconds[start:end]
        self.position = 0  # rows streamed so far, over all passes
        self.seen = FeatureStats.of(self.x[:0])

    @classmethod
    def from_spec(
        cls, room: str = "0", rooms: str = "1", time_of_day: str = "0", dir: str | None = None
    ) -> OccupancyRoomStream:
        try:
            numbers = int(room), int(rooms)
        except ValueError:
            raise DataSpecError(
                f"occupancy: room and rooms must be integers, got {room!r} and {rooms!r}"
            ) from None
        if time_of_day not in ("0", "1"):
            raise DataSpecError(f"occupancy: time_of_day must be 0 or 1, got {time_of_day!r}")
        return cls(*numbers, root=data_root(dir), time_of_day=time_of_day == "1")

    @property
    def passes(self) -> int:
        return self.position // len(self.y)

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(self.position, self.position + n)
        first_pass = steps[steps < len(self.y)]
        self.seen = self.seen.merged(FeatureStats.of(self.x[first_pass]))
        self.position += n
        idx = steps % len(self.y)
        return self.x[idx], self.y[idx]

    def holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n rows of ``datatest.txt`` evenly spaced over its two days (both classes, time order)."""
        table = load_table(str(occupancy_path(TEST_SETS[0], self._root)))
        if not 0 < n <= len(table):
            raise ValueError(
                f"occupancy: holdout takes 1 to {len(table)} rows of {TEST_SETS[0]}, asked for {n}"
            )
        idx = torch.arange(n) * len(table) // n
        return table.features(self.time_of_day)[idx], table.occupied[idx]
