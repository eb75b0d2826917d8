"""The replay data source: CSV and NPZ files the tests write, rate checked on a fake clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tinyfleet.client.data_sources import DataSpecError, open_source
from tinyfleet.client.replay_source import ReplaySource, read_csv


class FakeClock:
    """Time that moves only when the source sleeps (or the test advances it)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def write_csv(path: Path, rows: int = 10) -> Path:
    lines = ["a,b,label"] + [f"{i},{i * 10},{i % 3}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_streams_in_order_wraps_and_holds_the_tail_out(tmp_path: Path) -> None:
    source = open_source(f"replay:path={write_csv(tmp_path / 'rows.csv')},rate_hz=0")
    x, y = source.next(4)
    assert x.tolist() == [[0, 0], [1, 10], [2, 20], [3, 30]] and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 0] and y.dtype == torch.int64
    x, _ = source.next(6)  # 8 rows stream (the default holdout is a fifth: 2), then it wraps
    assert x[:, 0].tolist() == [4, 5, 6, 7, 0, 1]
    hx, hy = source.holdout(2)
    assert hx[:, 0].tolist() == [8, 9] and hy.tolist() == [2, 0]
    assert torch.equal(source.holdout(1)[0], hx[:1])
    with pytest.raises(ValueError, match="holdout has 2 rows, asked for 3"):
        source.holdout(3)


def test_csv_label_and_feature_columns_by_name(tmp_path: Path) -> None:
    path = tmp_path / "named.csv"
    path.write_text("when,temp,target\nx,1.5,0.25\ny,2.5,0.75\nz,3.5,1.0\n")
    source = open_source(f"replay:path={path},rate_hz=0,label=target,features=temp,holdout=1")
    x, y = source.next(2)
    assert x.tolist() == [[1.5], [2.5]]
    assert y.tolist() == [[0.25], [0.75]] and y.dtype == torch.float32  # not whole numbers: regression
    with pytest.raises(DataSpecError, match=r"named.csv, line 2: column 'when' is not a number: 'x'"):
        open_source(f"replay:path={path},rate_hz=0,label=target")
    with pytest.raises(DataSpecError, match=r"named.csv: no column 'occupied'; its columns: when, temp"):
        open_source(f"replay:path={path},rate_hz=0,label=occupied,features=temp")


def test_npz_arrays(tmp_path: Path) -> None:
    path = tmp_path / "clips.npz"
    np.savez(path, x=np.arange(24, dtype=np.float64).reshape(6, 2, 2), y=np.array([3, 1, 4, 1, 5, 9]))
    source = open_source(f"replay:path={path},rate_hz=0,holdout=2")
    x, y = source.next(5)
    assert x.shape == (5, 2, 2) and y.tolist() == [3, 1, 4, 1, 3]
    assert source.holdout(2)[1].tolist() == [5, 9]
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3), y=np.zeros(3))
    with pytest.raises(DataSpecError, match=r"bad.npz: no array x; its arrays: inputs, y"):
        open_source(f"replay:path={tmp_path / 'bad.npz'},rate_hz=0")


def test_rate_blocks_until_the_samples_are_due(tmp_path: Path) -> None:
    clock = FakeClock()
    x, y = read_csv(write_csv(tmp_path / "rows.csv"), None, None)
    source = ReplaySource(x, y, rate_hz=4.0, holdout_rows=2, name="rows.csv", clock=clock.time,
                          sleep=clock.sleep)
    source.next(1)  # sample 0 is due when the source opens
    assert clock.slept == []
    source.next(2)  # samples 1 and 2: the second is due 0.5 s after opening
    assert clock.now == pytest.approx(100.5)
    clock.now += 3.0  # the learner was busy: samples 3..14 are due now, returned without waiting
    waited = len(clock.slept)
    source.next(12)
    assert len(clock.slept) == waited
    source.next(1)  # sample 15 is due at 103.75
    assert clock.now == pytest.approx(103.75)


def test_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataSpecError, match="needs path=FILE and rate_hz"):
        open_source("replay:rate_hz=1")
    with pytest.raises(DataSpecError, match=r"replay: file .*missing.csv does not exist"):
        open_source(f"replay:path={tmp_path / 'missing.csv'},rate_hz=1")
    path = write_csv(tmp_path / "rows.csv", rows=3)
    with pytest.raises(DataSpecError, match=r"rows.csv: rate_hz must be a number, got 'fast'"):
        open_source(f"replay:path={path},rate_hz=fast")
    with pytest.raises(DataSpecError, match=r"rows.csv: rate_hz must be a finite number >= 0"):
        open_source(f"replay:path={path},rate_hz=-1")
    with pytest.raises(DataSpecError, match=r"rows.csv: holdout must leave rows to stream: 1 to 2 of its 3"):
        open_source(f"replay:path={path},rate_hz=0,holdout=3")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,label\n1,0\n2\n")
    with pytest.raises(DataSpecError, match=r"ragged.csv, line 3: 1 fields, the header has 2"):
        open_source(f"replay:path={ragged},rate_hz=0")
