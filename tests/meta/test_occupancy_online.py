"""`sim run occupancy-online` on made-up sensor rows: rooms learn online, alone, federated and central."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyfleet.cli import main
from tinyfleet.client import occupancy
from tinyfleet.client.occupancy import FEATURES, FeatureStats
from tinyfleet.simulations import occupancy_online as oo

HEADER = '"date","Temperature","Humidity","Light","CO2","HumidityRatio","Occupancy"\n'


def write_rows(path: Path, start: datetime, days: int, seed: int, flip: bool = False) -> None:
    """A row every 10 minutes; occupied on weekdays 9:00-17:00, when the light is on (~450 lux, else
    ~5); CO2 is a random walk and the other readings noise, none of them telling. `flip` writes the
    opposite labels (a test file a rule must not read)."""
    rng = np.random.default_rng(seed)
    lines, co2 = [], 600.0
    for i in range(days * 144):
        when = start + timedelta(minutes=10 * i)
        occupied = when.weekday() < 5 and 9 <= when.hour < 17
        co2 += rng.normal(0, 15)
        light = 450 + rng.normal(0, 30) if occupied else 5 + abs(rng.normal(0, 5))
        readings = [20 + rng.normal(0, 0.3), 27 + rng.normal(0, 1), light, co2, 0.0045 + rng.normal(0, 1e-4)]
        label = int(occupied) ^ int(flip)
        values = ",".join(f"{v:.6g}" for v in readings)
        lines.append(f'"{i + 1}","{when.isoformat(sep=" ")}",{values},{label}\n')
    path.write_text(HEADER + "".join(lines), encoding="utf-8")


def write_data(root: Path, flip_tests: bool = False) -> Path:
    folder = root / "occupancy"
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(folder / "datatraining.txt", datetime(2015, 2, 4), 5, seed=1)  # Wed-Sun
    write_rows(folder / "datatest.txt", datetime(2015, 2, 2), 2, seed=2, flip=flip_tests)
    write_rows(folder / "datatest2.txt", datetime(2015, 2, 11), 3, seed=3, flip=flip_tests)
    return root


@pytest.fixture(autouse=True)
def _fresh_tables() -> Iterator[None]:
    occupancy.load_table.cache_clear()
    yield
    occupancy.load_table.cache_clear()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return write_data(tmp_path / "data")


def _tests(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: (x.double().numpy(), y.numpy()) for name, (x, y) in occupancy.load_test_sets(root).items()}


def _training(root: Path) -> occupancy.OccupancyTable:
    return occupancy.load_table(str(root / "occupancy" / "datatraining.txt"))


def test_sim_run_writes_its_outputs_and_the_fleet_learns(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "sim",
        "run",
        "occupancy-online",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    assert main([*argv, "--option", "rows_per_round=24", "--option", "eval_every=2"]) == 0
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "occupancy.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:4] == ["command", "date", "git_commit", "machine"]
    assert summary["config"]["options"]["rows_per_round"] == 24
    occupied_share = {name: float(y.mean()) for name, (_, y) in _tests(data_dir).items()}
    for learner in ("logistic", "prototypes"):
        entry = summary["learners"][learner]
        assert "Light" in entry["features"]["chosen"]
        for arm in ("federated", "central"):
            for test, share in occupied_share.items():
                assert entry["chosen"][arm][test] >= 0.95 > max(share, 1 - share)  # beats always-one-answer
        assert set(entry["chosen"]) >= {f"room-{r}" for r in range(5)} | {"rooms_mean"}
    # a weekend room never saw anyone: its prototypes alone call every row empty
    alone = summary["learners"]["prototypes"]["chosen"]["room-3"]["datatest.txt"]
    assert alone == pytest.approx(1 - occupied_share["datatest.txt"])
    assert summary["learners"]["logistic"]["offline_reference"]["datatest.txt"] >= 0.95
    assert summary["targets_met"]["prototypes"]["federated"] is True
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "learner,features,round,rows,arm,test,acc"


def test_the_feature_choice_reads_training_rows_only(tmp_path: Path) -> None:
    """Test files with every label flipped leave the choice and its validation scores unchanged,
    and the validation blocks are the last days of the training week."""
    records = []
    for flip in (False, True):
        root = write_data(tmp_path / f"data-{flip}", flip_tests=flip)
        out = tmp_path / f"run-{flip}"
        argv = ["sim", "run", "occupancy-online", "--data-dir", str(root), "--out", str(out)]
        assert main([*argv, "--option", "learners=logistic", "--option", "rows_per_round=48"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        records.append(summary["learners"]["logistic"]["features"])
        occupancy.load_table.cache_clear()
    assert records[0] == records[1]
    training = _training(tmp_path / "data-False")
    last = int(training.seconds.max())
    blocks = records[0]["validation_blocks"]
    assert [b["rows"] for b in blocks] == [144, 144, 144]
    assert blocks[-1]["start"] > last - 3 * 86_400 and blocks[0]["end"] == last
    assert len(records[0]["candidates"]) == 2 ** len(FEATURES) - 1


def test_merged_prototypes_are_the_central_prototypes(data_dir: Path) -> None:
    fleet = oo.run_fleet(
        "prototypes",
        FEATURES,
        data_dir,
        _training(data_dir),
        _tests(data_dir),
        rooms=4,
        lr=0.1,
        rows_per_round=25,
        eval_every=100,
    )
    merged, central = fleet.federated.head, fleet.central.head
    assert isinstance(merged, oo.PrototypeHead) and isinstance(central, oo.PrototypeHead)
    assert merged.protos.counts == central.protos.counts == {"0": 576, "1": 144}  # 3 weekdays of 8 h
    for label in ("0", "1"):
        np.testing.assert_allclose(merged.protos.means[label], central.protos.means[label], rtol=1e-12)
    np.testing.assert_allclose(fleet.federated.stats.mean, fleet.central.stats.mean, rtol=1e-12)
    np.testing.assert_allclose(fleet.federated.stats.m2, fleet.central.stats.m2, rtol=1e-9)
    x, _ = _tests(data_dir)["datatest2.txt"]
    same = merged.scores(x, fleet.federated.stats) > 0
    assert (same == (central.scores(x, fleet.central.stats) > 0)).all()


def test_a_logistic_step_is_normalised_sgd_in_standardised_units() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)) * [1, 10, 100, 1000, 0.01] + [20, 30, 200, 600, 0.004]
    y = (x[:, 2] > 200).astype(np.int64)
    stats = FeatureStats.of(torch.from_numpy(x))
    head = oo.LogisticHead([1, 2])
    head.learn(x, y, stats, lr=0.3)
    z = ((x - stats.mean.numpy()) / stats.std.numpy())[:, [1, 2]]
    w, b = np.zeros(2), 0.0
    for row, label in zip(z, y, strict=True):
        step = 0.3 * (1 / (1 + np.exp(-(row @ w + b))) - label) / (1 + row @ row)
        w, b = w - step * row, b - step
    np.testing.assert_allclose(head.scores(x, stats), z @ w + b, rtol=1e-9, atol=1e-9)


def test_the_fleet_average_weighs_rooms_by_their_rows() -> None:
    a, b = oo.LogisticHead([0, 1]), oo.LogisticHead([0, 1])
    a.weight, a.bias = np.array([1.0, 0.0]), 1.0
    b.weight, b.bias = np.array([0.0, 4.0]), -1.0
    mean = oo.average([a, b], [3, 1])
    np.testing.assert_allclose(mean.weight, [0.75, 1.0])
    assert mean.bias == pytest.approx(0.5)


def test_unknown_sensors_are_refused_by_name(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sim", "run", "occupancy-online", "--data-dir", str(data_dir), "--out", str(tmp_path / "x")]
    assert main([*argv, "--option", "features=Light+Noise"]) == 2
    assert "features must be 'auto' or sensors of" in capsys.readouterr().err
    with pytest.raises(ValueError, match="validation_days=9: the training rows must span more than 9 days"):
        oo.select_features(_training(data_dir), "logistic", 0.1, 60, 9)
