"""Federated reconnaissance (`sim run omniglot-recon`): missions, count merges and the three curves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tinyfleet.cli import main
from tinyfleet.common.prototypes import PrototypeSet
from tinyfleet.simulations.recon import accuracy, reconnaissance

from .test_protonet import structured_omniglot


def clusters(classes: int, drawings: int, dim: int, noise: float, seed: int = 0) -> np.ndarray:
    """[classes, drawings, dim]: drawings scattered around one random centre per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 1, dim)) * 10
    return centres + noise * rng.normal(size=(classes, drawings, dim))


def test_a_device_alone_names_only_its_own_classes_and_the_merge_names_all() -> None:
    points = reconnaissance(clusters(40, 20, 8, 0.0), devices=4, ways=5, shots=3, queries=4, seed=0)
    assert [p.classes for p in points] == list(range(5, 45, 5))
    assert [p.queries for p in points] == [4 * p.classes for p in points]
    assert all(p.merged == 1.0 and p.central == 1.0 for p in points)
    # each device learned missions d, d+4, ...: after the last, 10 of 40 classes each
    assert points[-1].device_each == (0.25, 0.25, 0.25, 0.25)
    assert points[0].device_each == (1.0, 0.0, 0.0, 0.0)  # device 0 alone knows the first mission
    assert all(p.device_own_classes == 1.0 for p in points)  # and names its own classes right


def test_merged_beats_each_device_alone_and_central_bounds_it_on_noisy_clusters() -> None:
    points = reconnaissance(
        clusters(60, 20, 6, 6.0), devices=5, ways=5, shots=2, queries=5, seed=1, eval_every=2
    )
    assert [p.missions for p in points] == [2, 4, 6, 8, 10, 12]
    assert all(p.merged >= max(p.device_each) for p in points)
    assert np.mean([p.merged - p.device for p in points]) > 0.3
    assert np.mean([p.central for p in points]) >= np.mean([p.merged for p in points])  # 15 drawings vs 2


def test_the_merge_of_missions_equals_prototypes_of_every_support() -> None:
    """Count merging loses nothing: scoring the merged set equals scoring the means of all supports."""
    embeddings = clusters(20, 20, 4, 8.0, seed=2)
    (point,) = reconnaissance(embeddings, devices=3, ways=5, shots=4, queries=5, seed=3, eval_every=4)
    order = np.argsort(np.random.default_rng([3, 23]).random((20, 20)), axis=1)
    whole = PrototypeSet(4)
    for c in range(20):
        whole.add(embeddings[c, order[c, 5:9]], [str(c)] * 4)
    queries = np.concatenate([embeddings[c, order[c, :5]] for c in range(20)])
    assert point.merged == accuracy(whole, queries, [str(c) for c in range(20) for _ in range(5)])


def test_missions_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="do not split into missions of 5"):
        reconnaissance(clusters(12, 20, 2, 1.0), devices=2, ways=5, shots=1, queries=1, seed=0)
    with pytest.raises(ValueError, match="exceed the 20 drawings"):
        reconnaissance(clusters(10, 20, 2, 1.0), devices=2, ways=5, shots=10, queries=11, seed=0)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with structured_omniglot(tmp_path / "data", monkeypatch) as folder:
        yield folder


def test_sim_run_trains_a_backbone_when_given_none_then_reuses_it(data_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["sim", "run", "omniglot-recon", "--data-dir", str(data_dir), "--threads", "1", "--devices", "2"]
    small = ["--option", "classes=20", "--option", "backbone_episodes=4", "--option", "backbone_ways=5"]
    assert main([*argv, "--out", str(first), *small, "--eval-every", "2"]) == 0
    summary = json.loads((first / "summary.json").read_text())
    assert list(summary)[:4] == ["command", "date", "git_commit", "machine"]
    assert summary["backbone"]["trained_here"] and summary["backbone"]["episodes"] == 4
    assert [p["classes"] for p in summary["curve"]] == [10, 20]
    assert summary["final"]["merged"]["acc"] >= summary["final"]["device"]["acc"]
    rows = (first / "metrics.csv").read_text().splitlines()
    assert rows[0] == "missions,classes,queries,method,acc,acc_ci95,each_device,own_classes"
    assert len(rows) == 1 + 2 * 3
    assert (first / "recon.png").stat().st_size > 0
    backbone = first / "models" / "backbone.arrays"
    assert main([*argv, "--out", str(second), *small, "--backbone", str(backbone)]) == 0
    again = json.loads((second / "summary.json").read_text())
    assert again["backbone"]["file"] == str(backbone) and again["final"] == summary["final"]
    assert again["backbone"]["sha256"] == summary["backbone"]["model_file"]["sha256"]


def test_more_classes_than_the_split_tests_is_refused(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sim", "run", "omniglot-recon", "--data-dir", str(data_dir), "--out", str(tmp_path / "x")]
    assert main([*argv, "--option", "classes=600"]) == 2
    assert "at most the 22 test classes of the alphabets split" in capsys.readouterr().err
