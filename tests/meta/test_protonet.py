"""Prototypical Networks on Omniglot (`sim run omniglot-protonet`), the runner it shares with other
non-FedReptile scenarios, and --split reaching every Omniglot scenario's task sets: on a small
made-up Omniglot whose characters are learnable (a blocky pattern each, drawn with noise)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyfleet.cli import main
from tinyfleet.client import omniglot
from tinyfleet.common.arrays import load_array_record, to_array_record
from tinyfleet.common.flower_adapter import array_record_from_bytes, array_record_to_bytes
from tinyfleet.common.models import OmniglotConv4, build_model
from tinyfleet.server.artifacts import sha256_hex
from tinyfleet.simulations.experiment import RunSettings, fedreptile_options
from tinyfleet.simulations.omniglot import central_task
from tinyfleet.simulations.protonet import (
    TESTS,
    CentralTrainer,
    EpisodeOptions,
    embed,
    embed_classes,
    episode_accuracies,
    few_shot_test,
    freeze_batch_norm,
)
from tinyfleet.simulations.scenarios import scenario_module

BACKGROUND = (("A", 3), ("B", 4), ("C", 5), ("D", 3))  # 15 characters, 60 classes with rotations
EVALUATION = (("E", 12), ("F", 10))  # 22: enough for 20-way test episodes
CHARACTER_SPLIT_TRAIN = 20  # of 37


@contextmanager
def structured_omniglot(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """images_{background,evaluation}.npz under folder/omniglot: each character a random 7x7 block
    pattern at 105x105, each drawing that pattern with a fifth of its pixels flipped; the loaders'
    caches are emptied before and after."""
    monkeypatch.setattr(omniglot, "BACKGROUND_ALPHABETS", BACKGROUND)
    monkeypatch.setattr(omniglot, "EVALUATION_ALPHABETS", EVALUATION)
    monkeypatch.setattr(omniglot, "CHARACTER_SPLIT_TRAIN", CHARACTER_SPLIT_TRAIN)
    omniglot.load_split.cache_clear()
    omniglot.load_all.cache_clear()
    rng = np.random.default_rng(0)
    (folder / "omniglot").mkdir(parents=True)
    for split, alphabets in (("background", BACKGROUND), ("evaluation", EVALUATION)):
        chars = sum(n for _, n in alphabets)
        patterns = np.kron(rng.random((chars, 1, 7, 7)) > 0.5, np.ones((1, 1, 15, 15), dtype=bool))
        images = patterns ^ (rng.random((chars, 20, 105, 105)) < 0.2)
        labels = np.repeat(np.arange(chars)[:, None], 20, axis=1)
        np.savez(folder / "omniglot" / f"images_{split}.npz", images=images, labels=labels)
    try:
        yield folder
    finally:
        omniglot.load_split.cache_clear()
        omniglot.load_all.cache_clear()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with structured_omniglot(tmp_path / "data", monkeypatch) as folder:
        yield folder


SMALL_RUN = [
    "--threads", "1", "--ways", "5", "--eval-every", "3", "--eval-tasks", "4", "--final-eval-tasks", "6",
    "--devices", "2", "--option", "episodes=6", "--option", "shots=1", "--option", "queries=2",
    "--option", "curve_classes=20", "--option", "devices_per_round=2", "--option", "local_episodes=1",
    "--option", "test_queries=2",
]  # fmt: skip


def test_episodes_are_n_way_k_shot_from_distinct_drawers(data_dir: Path) -> None:
    stream = central_task(data_dir, 5, seed=0)(0)
    support, support_y, query, query_y = stream.episode(6, 2, 3)
    assert support.shape == (12, 1, 28, 28) and query.shape == (18, 1, 28, 28)
    assert support_y.tolist() == [c for c in range(6) for _ in range(2)]
    assert query_y.tolist() == [c for c in range(6) for _ in range(3)]
    assert not any(torch.equal(s, q) for s in support[:2] for q in query[:3])  # other drawings of class 0
    with pytest.raises(ValueError, match="needs 6 classes and 16 drawers"):
        stream.episode(6, 8, 8)


def test_training_lowers_the_loss_and_beats_chance(data_dir: Path) -> None:
    model = build_model("omniglot-protonet", seed=0)
    trainer = CentralTrainer(
        model, central_task(data_dir, 5, seed=0)(0), EpisodeOptions(ways=10, shots=2, queries=3), 1000
    )
    for _ in range(40):
        trainer.step()
    assert np.mean(trainer.losses[-10:]) < 0.5 * np.mean(trainer.losses[:5])
    split = omniglot.OmniglotSplit("alphabets")
    embeddings = embed_classes(model, split.images("test", str(data_dir)), split.test_classes())
    assert embeddings.shape == (22, 20, 64)
    results = few_shot_test(embeddings, episodes=20, queries=5, seed=0)
    assert set(results) == set(TESTS)
    assert results["5-way 1-shot"]["acc"] > 0.6 and results["20-way 1-shot"]["acc"] > 0.3  # chance 0.2, 0.05


def test_episode_accuracy_is_nearest_class_mean() -> None:
    # class c sits at c on the first axis: every query is nearest its own class mean
    embeddings = torch.zeros(6, 20, 3)
    embeddings[:, :, 0] = torch.arange(6.0)[:, None] * 10 + torch.randn(6, 20)
    assert episode_accuracies(embeddings, 5, 1, 4, count=10, seed=0).tolist() == [1.0] * 10
    embeddings[:, :, 0] = torch.randn(6, 20)  # no class structure: near chance
    assert episode_accuracies(embeddings, 5, 1, 4, count=200, seed=0).mean() < 0.4
    with pytest.raises(ValueError, match="need 7 classes"):
        episode_accuracies(embeddings, 7, 1, 4, count=1, seed=0)


def test_a_fedreptile_backbone_embeds_each_image_alone() -> None:
    features = OmniglotConv4().features  # batch norm from each batch's own statistics
    images = torch.rand(40, 1, 28, 28)
    alone = lambda: torch.cat([embed(features, images[i : i + 1]) for i in range(3)])  # noqa: E731
    assert not torch.allclose(alone(), embed(features, images)[:3], atol=1e-4)
    freeze_batch_norm(features, torch.rand(200, 1, 28, 28))
    assert torch.allclose(alone(), embed(features, images)[:3], atol=1e-5)


def test_sim_run_writes_curves_summary_and_models_for_fedproto(data_dir: Path, tmp_path: Path) -> None:
    conv4 = tmp_path / "fedreptile.arrays"
    conv4.write_bytes(array_record_to_bytes(to_array_record(OmniglotConv4())))
    out = tmp_path / "run"
    argv = ["sim", "run", "omniglot-protonet", "--out", str(out), "--data-dir", str(data_dir), *SMALL_RUN]
    assert main([*argv, "--backbone", str(conv4)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:4] == ["command", "date", "git_commit", "machine"]  # the results record first
    assert summary["config"]["options"]["ways"] == 5 and summary["split"] == "alphabets"
    assert set(summary["arms"]) == {"central", "federated", "backbone"}
    assert summary["arms"]["backbone"]["model"] == "omniglot-conv4"
    assert summary["arms"]["backbone"]["sha256"] == sha256_hex(conv4.read_bytes())
    for arm in ("central", "federated"):
        entry = summary["arms"][arm]
        assert entry["episodes"] == 6 and set(entry["final"]) == set(TESTS)
        model = build_model("omniglot-protonet")
        load_array_record(model, array_record_from_bytes((out / entry["model"]["file"]).read_bytes()))
    assert (
        summary["arms"]["federated"]["rounds"] == 3
        and summary["arms"]["federated"]["bytes_per_round_mean"] > 0
    )
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("arm,episodes,train_cpu_seconds")
    # per trained arm: curve points at 0, 3, 6 episodes and the final test, 4 settings each; backbone: final
    assert len(rows) - 1 == 2 * 4 * 4 + 4
    assert (out / "few_shot.png").stat().st_size > 0


def test_options_the_scenario_lacks_are_refused_by_name(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["sim", "run", "omniglot-protonet", "--out", str(tmp_path / "x"), "--data-dir", str(data_dir)]
    assert main([*base, "--option", "episodez=3"]) == 2
    assert "'episodez': unknown option" in capsys.readouterr().err
    assert main([*base, "--epsilon", "0.5"]) == 2  # a FedReptile flag
    assert "'epsilon'" in capsys.readouterr().err
    assert main([*base, "--rounds", "5"]) == 2
    assert "'rounds'" in capsys.readouterr().err


def test_split_reaches_the_protonet_test_set(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "chars"
    argv = ["sim", "run", "omniglot-protonet", "--out", str(out), "--data-dir", str(data_dir), *SMALL_RUN]
    assert main([*argv, "--split", "characters", "--arms", "central"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "characters"
    assert summary["test_protocol"]["final_classes"] == 4 * (37 - CHARACTER_SPLIT_TRAIN)  # with rotations


def test_split_reaches_the_reptile_devices_central_tasks_and_meta_tests(
    data_dir: Path, tmp_path: Path
) -> None:
    settings = RunSettings(
        scenario="omniglot-reptile",
        rounds=1,
        devices=2,
        data_dir=str(data_dir),
        extra={"split": "characters"},
    )
    scenario = scenario_module("omniglot-reptile").build(settings, fedreptile_options(settings))
    assert all("split=characters" in spec.split(",") for spec in scenario.device_specs)
    characters = omniglot.OmniglotSplit("characters")
    assert set(scenario.central_task(0).pool) == set(characters.train_classes())
    for tasks in scenario.meta_tests.values():
        assert set(tasks.classes) == set(characters.test_classes())
    out = tmp_path / "reptile"
    argv = [
        "sim",
        "run",
        "omniglot-reptile",
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--split",
        "characters",
        "--arms",
        "random",
        "--rounds",
        "1",
        "--eval-tasks",
        "2",
        "--final-eval-tasks",
        "2",
    ]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["extra"]["split"] == "characters"
