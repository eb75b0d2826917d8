"""Replay a recorded CSV or NPZ file as a sensor stream at a given rate.

`replay:path=FILE,rate_hz=R[,label=COLUMN][,features=A+B][,holdout=N]`

- CSV: a header row, then rows of numbers; `label` names the label column (default: the last),
  `features` the feature columns (default: every other column). NPZ: arrays `x` (samples first)
  and `y`.
- Labels whose values are all integers come back as int64 of shape [n] (class indices); any
  other labels as float32 [n, 1] (regression targets).
- The last `holdout` rows (default: a fifth, at least one) are the holdout, never streamed;
  the stream wraps around to its first row after the last streamed one.

Rate: sample i (counted from 0 since the source opened) is due `i / rate_hz` seconds after it
opened, so the first is due at once. `next(n)` blocks until the n-th sample it returns is due and
then returns exactly n: an online learner asks for the samples it wants and trains on them as
they arrive, as it would on a sensor, and a learner that falls behind gets its backlog at once
(nothing is dropped, so two runs over the same file see the same samples). `rate_hz=0` never
waits.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tinyfleet.client.data_sources import DataSpecError


class ReplaySource:
    """One file's rows as an endless stream at `rate_hz`, with its tail held out."""

    kind = "replay"

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        rate_hz: float,
        holdout_rows: int,
        name: str,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_hz < 0 or not math.isfinite(rate_hz):
            raise DataSpecError(f"replay {name}: rate_hz must be a finite number >= 0, got {rate_hz}")
        if not 0 < holdout_rows < len(y):
            raise DataSpecError(
                f"replay {name}: holdout must leave rows to stream: 1 to {len(y) - 1} of its {len(y)} rows, "
                f"got {holdout_rows}"
            )
        streamed = len(y) - holdout_rows
        self.name = name
        self.rate_hz = rate_hz
        self._x, self._y = x[:streamed], y[:streamed]
        self._holdout = x[streamed:], y[streamed:]
        self._clock, self._sleep = clock, sleep
        self._start = clock()
        self.position = 0

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next n samples, once the last of them is due (see the module's docstring)."""
        if n < 1:
            raise ValueError(f"replay {self.name}: next takes at least one sample, asked for {n}")
        if self.rate_hz > 0:
            due = self._start + (self.position + n - 1) / self.rate_hz
            while (wait := due - self._clock()) > 0:
                self._sleep(wait)
        idx = torch.arange(self.position, self.position + n) % len(self._y)
        self.position += n
        return self._x[idx], self._y[idx]

    def holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n rows of the held-out tail."""
        rows = len(self._holdout[1])
        if not 0 < n <= rows:
            raise ValueError(f"replay {self.name}: holdout has {rows} rows, asked for {n}")
        return self._holdout[0][:n], self._holdout[1][:n]

    @classmethod
    def from_spec(
        cls,
        path: str | None = None,
        rate_hz: str | None = None,
        label: str | None = None,
        features: str | None = None,
        holdout: str | None = None,
    ) -> ReplaySource:
        if path is None or rate_hz is None:
            raise DataSpecError("replay: needs path=FILE and rate_hz=R (samples per second, 0: no waiting)")
        try:
            rate = float(rate_hz)
        except ValueError:
            raise DataSpecError(f"replay {path}: rate_hz must be a number, got {rate_hz!r}") from None
        file = Path(path)
        if not file.is_file():
            raise DataSpecError(f"replay: file {path} does not exist")
        if file.suffix.lower() == ".npz":
            if label is not None or features is not None:
                raise DataSpecError(f"replay {path}: label= and features= name CSV columns; NPZ has x and y")
            x, y = read_npz(file)
        else:
            x, y = read_csv(file, label, features.split("+") if features else None)
        rows = len(y)
        if holdout is None:
            held = max(1, rows // 5)
        else:
            try:
                held = int(holdout)
            except ValueError:
                raise DataSpecError(f"replay {path}: holdout must be a row count, got {holdout!r}") from None
        return cls(x, y, rate, held, str(file))


def _labels(values: np.ndarray) -> torch.Tensor:
    """Whole-number labels of one value per sample as class indices; others as float targets [n, ...]."""
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim == 1 and np.all(np.mod(values, 1) == 0):
        return torch.from_numpy(values.astype(np.int64))
    targets = torch.from_numpy(values.astype(np.float32))
    return targets.unsqueeze(1) if targets.dim() == 1 else targets


def read_csv(path: Path, label: str | None, features: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature columns as float32 [n, k] and the label column, failing with the file, row and column."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if len(header) < 2:
            raise DataSpecError(f"replay {path}: the header must name feature columns and a label column, "
                                f"got {header}")
        label = label if label is not None else header[-1]
        features = features if features is not None else [name for name in header if name != label]
        missing = [name for name in [label, *features] if name not in header]
        if missing:
            raise DataSpecError(f"replay {path}: no column {', '.join(map(repr, missing))}; "
                                f"its columns: {', '.join(header)}")
        columns = [header.index(name) for name in [*features, label]]
        names = [*features, label]
        rows: list[list[float]] = []
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataSpecError(f"replay {path}, line {line}: {len(fields)} fields, the header has "
                                    f"{len(header)}")
            row = []
            for name, column in zip(names, columns, strict=True):
                try:
                    row.append(float(fields[column]))
                except ValueError:
                    raise DataSpecError(f"replay {path}, line {line}: column {name!r} is not a number: "
                                        f"{fields[column]!r}") from None
            rows.append(row)
    if not rows:
        raise DataSpecError(f"replay {path}: no rows after the header")
    table = np.asarray(rows, dtype=np.float64)
    return torch.from_numpy(table[:, :-1].astype(np.float32)), _labels(table[:, -1])


def read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrays x (samples first) and y of one NPZ file."""
    with np.load(path, allow_pickle=False) as arrays:
        missing = [name for name in ("x", "y") if name not in arrays.files]
        if missing:
            raise DataSpecError(f"replay {path}: no array {' or '.join(missing)}; "
                                f"its arrays: {', '.join(arrays.files) or 'none'}")
        x, y = arrays["x"], arrays["y"]
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y) or len(y) == 0:
        raise DataSpecError(f"replay {path}: x and y must hold the same number (> 0) of samples, "
                            f"got shapes {x.shape} and {y.shape}")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise DataSpecError(f"replay {path}: x and y must be numeric, got {x.dtype} and {y.dtype}")
    return torch.from_numpy(x.astype(np.float32)), _labels(y)
