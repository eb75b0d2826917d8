"""Omniglot loading, the non-IID device stream and meta-test tasks, on a tiny made-up dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyfleet.client import omniglot
from tinyfleet.client.data_sources import open_source
from tinyfleet.simulations.omniglot import OmniglotTaskSet

ALPHABETS = (("A", 3), ("B", 4), ("C", 5), ("D", 3))  # 15 characters
EVALUATION = (("E", 5), ("F", 3))  # 8 characters


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(omniglot, "BACKGROUND_ALPHABETS", ALPHABETS)
    monkeypatch.setattr(omniglot, "EVALUATION_ALPHABETS", EVALUATION)
    monkeypatch.setattr(omniglot, "CHARACTER_SPLIT_TRAIN", 16)
    omniglot.load_split.cache_clear()
    omniglot.load_all.cache_clear()
    rng = np.random.default_rng(0)
    folder = tmp_path / "omniglot"
    folder.mkdir()
    for split, chars in (("background", 15), ("evaluation", 8)):
        images = rng.random((chars, 20, 105, 105)) > 0.1  # True = background, as in the real files
        labels = np.repeat(np.arange(chars)[:, None], 20, axis=1)
        np.savez(folder / f"images_{split}.npz", images=images, labels=labels)
    yield tmp_path
    omniglot.load_split.cache_clear()
    omniglot.load_all.cache_clear()


def _stream(spec: str) -> omniglot.OmniglotDeviceStream:
    stream = open_source(spec)
    assert isinstance(stream, omniglot.OmniglotDeviceStream)
    return stream


def test_missing_data_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "omniglot" / "images_background.npz")):
        omniglot.load_split("background", str(tmp_path))


def test_images_are_28x28_with_ink_as_one(data_dir: Path) -> None:
    images = omniglot.load_split("background", str(data_dir))
    assert images.shape == (15, 20, 1, 28, 28)
    assert 0.0 < float(images.mean()) < 0.5  # ink (False in the file) is the minority


def test_devices_see_disjoint_alphabets_and_labels_stay_within_ways(data_dir: Path) -> None:
    streams = [_stream(f"omniglot:device={d},devices=2,ways=3,seed=1,dir={data_dir}") for d in range(2)]
    pools = [set(s.pool // 4) for s in streams]
    assert pools[0].isdisjoint(pools[1])
    assert pools[0] | pools[1] == set(range(15))
    x, y = streams[0].next(12)
    assert x.shape == (12, 1, 28, 28) and y.dtype == torch.int64 and int(y.max()) < 3
    tasks = set()
    for _ in range(5):
        streams[0].new_task()
        assert set(streams[0].classes) <= set(streams[0].pool)
        tasks.add(tuple(streams[0].classes))
    assert len(tasks) > 1


def test_holdout_is_fixed_class_interleaved_and_from_held_back_drawers(data_dir: Path) -> None:
    stream = _stream(f"omniglot:device=0,devices=2,ways=3,seed=1,dir={data_dir}")
    x1, y1 = stream.holdout(9)
    stream.next(30)
    x2, y2 = stream.holdout(9)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and y1.tolist() == [0, 1, 2] * 3
    images = omniglot.load_split("background", str(data_dir))
    char, rotation = divmod(int(stream._holdout_classes[0]), 4)
    expected = torch.rot90(images[char, omniglot.HELD_BACK_DRAWERS[0]], rotation, dims=(1, 2))
    assert torch.equal(x1[0], expected)


def test_meta_test_tasks_use_evaluation_characters_and_repeat(data_dir: Path) -> None:
    tasks = OmniglotTaskSet(data_dir, count=3, ways=3, shots=1, queries=2, seed=0)
    sx, sy, qx, qy = tasks.episode(1)
    assert sx.shape == (3, 1, 28, 28) and qx.shape == (6, 1, 28, 28)
    assert sorted(sy.tolist()) == [0, 1, 2] and sorted(qy.tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(tasks.episode(1)[2], qx)


def test_the_alphabet_split_tests_unseen_alphabets_without_rotations(data_dir: Path) -> None:
    split = omniglot.OmniglotSplit("alphabets")
    assert set(split.train_classes() // 4) == set(range(15))
    assert set(split.test_classes() % 4) == {0}
    assert len(split.test_classes()) == 8
    assert split.images("train", str(data_dir)).shape[0] == 15
    assert split.images("test", str(data_dir)).shape[0] == 8


def test_the_character_split_is_disjoint_complete_and_rotated(data_dir: Path) -> None:
    split = omniglot.OmniglotSplit("characters")
    train, test = set(split.train_classes() // 4), set(split.test_classes() // 4)
    assert len(train) == 16 and len(test) == 7
    assert train.isdisjoint(test) and train | test == set(range(23))
    assert len(split.test_classes()) == 4 * 7 and set(split.test_classes() % 4) == {0, 1, 2, 3}
    assert split.images("test", str(data_dir)).shape[0] == 23  # one numbering over both files
    # Devices deal the training characters of every alphabet that has some, and see no test character.
    streams = [
        _stream(f"omniglot:device={d},devices=3,ways=3,seed=1,split=characters,dir={data_dir}")
        for d in range(3)
    ]
    pools = [set(s.pool // 4) for s in streams]
    assert set().union(*pools) == train
    assert all(a.isdisjoint(b) for i, a in enumerate(pools) for b in pools[i + 1 :])
    # Meta-test episodes draw only test classes, rotations included.
    tasks = OmniglotTaskSet(data_dir, count=20, ways=3, shots=1, queries=2, seed=0, split="characters")
    images = omniglot.load_all(str(data_dir))
    seen: set[int] = set()
    for index in range(len(tasks)):
        sx, _, _, _ = tasks.episode(index)
        for x in sx:
            matches = {
                c * 4 + r
                for c in range(23)
                for r in range(4)
                for d in range(20)
                if torch.equal(torch.rot90(images[c, d], r, dims=(1, 2)), x)
            }
            assert matches and matches <= set(split.test_classes().tolist())
            seen |= matches
    assert {c % 4 for c in seen} - {0}, "no rotated test class was ever drawn"


def test_an_unknown_split_is_refused_by_name(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of alphabets, characters, got 'vinyals'"):
        open_source(f"omniglot:device=0,devices=2,split=vinyals,dir={data_dir}")


def test_bad_device_spec_is_refused(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="device"):
        open_source(f"omniglot:device=5,devices=2,dir={data_dir}")


def test_the_omniglot_example_job_trains_and_evaluates_on_omniglot_devices(data_dir: Path) -> None:
    """examples/omniglot-reptile.toml as the coordinator would build it, on two SimGrid devices."""
    from tinyfleet.common.jobspec import load_job_spec
    from tinyfleet.server.job_strategy import build_strategy, evaluate_config, initial_arrays, train_config
    from tinyfleet.simulations.rounds import RoundReport, run_rounds
    from tinyfleet.simulations.sim_grid import SimGrid

    spec = load_job_spec(Path(__file__).resolve().parents[2] / "examples" / "omniglot-reptile.toml")
    strategy = build_strategy(spec)
    grid = SimGrid.from_data_specs([f"omniglot:device={d},devices=2,dir={data_dir}" for d in range(2)])
    reports: list[RoundReport] = []
    start = initial_arrays(spec)
    arrays = run_rounds(
        strategy, grid, start, 2, train_config=train_config(spec),
        on_round=lambda report, _arrays: reports.append(report),
    )
    assert [r.replied for r in reports] == [1, 1]  # serial: one device a round, both answered
    assert any(not np.array_equal(arrays[k].numpy(), start[k].numpy()) for k in start)
    every = spec.options["evaluate_every"]
    messages = list(strategy.configure_evaluate(every, arrays, evaluate_config(spec), grid))
    replies = list(grid.send_and_receive(messages))
    assert replies and not replies[0].has_error(), replies[0].error.reason if replies else "no reply"
    accuracy = replies[0].content.metric_records["metrics"]["acc_after"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0


def test_a_checkpointed_stream_continues_where_it_stopped_without_pickling_the_images(data_dir: Path) -> None:
    import pickle

    stream = _stream(f"omniglot:device=0,devices=2,ways=3,seed=1,dir={data_dir}")
    stream.next(4)
    saved = pickle.dumps(stream)
    assert len(saved) < stream.images.numel()  # the images (4 bytes each) stay out of the checkpoint
    expected = stream.next(6)
    restored = pickle.loads(saved)
    got = restored.next(6)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
