"""A run stopped between checkpoints and resumed computes exactly what an unstopped run computes."""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyfleet.cli import main
from tinyfleet.client.data_sources import close_shared_sources
from tinyfleet.common.flower_adapter import array_record_from_bytes, array_record_to_bytes
from tinyfleet.simulations import experiment as experiment_module
from tinyfleet.simulations.checkpoint import CheckpointError, load_checkpoint
from tinyfleet.simulations.experiment import ARMS, Experiment, RunSettings


class Interrupted(Exception):
    """Stands in for the process being killed."""


def _settings() -> RunSettings:
    return RunSettings(
        scenario="sine-reptile",
        rounds=40,
        devices=20,
        options={
            "top_p": 0.1,
            "quantize": "int8",
            "compress_downlink": True,
            "local_layers": "4",  # the head stays on the devices: their Contexts hold it
            "reconstruct_steps": 2,
        },
        eval_every=20,
        eval_tasks=4,
        final_eval_tasks=6,
        checkpoint_every=10,
        arms=ARMS,
    )


def _outcome(experiment: Experiment) -> tuple[list[dict[str, object]], dict[str, tuple[object, ...]]]:
    rows: list[dict[str, object]] = [
        {k: v for k, v in asdict(r).items() if k != "train_cpu_seconds"} for r in experiment.rows
    ]
    results: dict[str, tuple[object, ...]] = {
        arm: (r.rounds_done, r.round_bytes, r.up_bytes, array_record_to_bytes(r.model))
        for arm, r in experiment.results.items()
        if r.model is not None
    }
    return rows, results


def _kill_during(
    monkeypatch: pytest.MonkeyPatch,
    loop: str,
    call: int,
    at_round: int,
    error: type[BaseException] = Interrupted,
) -> None:
    """Raise inside the `call`-th run of `loop` (run_rounds or central_reptile) at round `at_round`."""
    original = getattr(experiment_module, loop)
    calls = 0

    def wrapper(*args: object, on_round, **kwargs: object):
        nonlocal calls
        calls += 1
        if calls != call:
            return original(*args, on_round=on_round, **kwargs)

        def hooked(done, *rest):
            if (done if isinstance(done, int) else done.round) == at_round:
                raise error
            return on_round(done, *rest)

        return original(*args, on_round=hooked, **kwargs)

    monkeypatch.setattr(experiment_module, loop, wrapper)


@pytest.fixture(scope="module")
def unstopped() -> tuple[list[dict[str, object]], dict[str, tuple[object, ...]]]:
    """What the run computes when nothing stops it (one run shared by the parametrized tests)."""
    close_shared_sources()
    experiment = Experiment(_settings())
    experiment.run()
    close_shared_sources()
    return _outcome(experiment)


@pytest.mark.parametrize(
    ("loop", "call", "arm"),
    [("run_rounds", 1, "fedreptile"), ("run_rounds", 3, "fedavg"), ("central_reptile", 1, "central")],
)
def test_resumed_run_equals_an_unstopped_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unstopped: tuple[list[dict[str, object]], dict[str, tuple[object, ...]]],
    loop: str,
    call: int,
    arm: str,
) -> None:
    path = tmp_path / "checkpoint.pkl"
    stopped = Experiment(_settings(), checkpoint=path)
    _kill_during(monkeypatch, loop, call, at_round=25)  # 5 rounds after the checkpoint of round 20
    with pytest.raises(Interrupted):
        stopped.run()
    monkeypatch.undo()
    saved = load_checkpoint(tmp_path)
    assert saved.progress is not None and saved.progress.arm == arm
    assert saved.progress.result.rounds_done == 20

    # a new process: no streams open, global generators elsewhere
    close_shared_sources()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    resumed = Experiment.resume(tmp_path)
    resumed.run()
    assert _outcome(resumed) == unstopped
    assert set(resumed.results) == set(ARMS)


def test_a_finished_arm_is_not_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pkl"
    settings = _settings()
    settings.arms = ("fedreptile", "central")
    _kill_during(monkeypatch, "central_reptile", 1, at_round=5)  # before central's first checkpoint
    with pytest.raises(Interrupted):
        Experiment(settings, checkpoint=path).run()
    monkeypatch.undo()
    saved = load_checkpoint(path)
    assert saved.progress is None and set(saved.results) == {"fedreptile"}
    resumed = Experiment.resume(path)
    rows_before = len(resumed.rows)
    resumed.run()
    assert {r.arm for r in resumed.rows[rows_before:]} == {"central"}
    assert resumed.results["fedreptile"].rounds_done == 40 and resumed.results["central"].rounds_done == 40


def test_unreadable_checkpoints_are_named_and_explained(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(tmp_path)
    bad = tmp_path / "checkpoint.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=f"{bad}: not a readable checkpoint"):
        load_checkpoint(bad)
    bad.write_bytes(pickle.dumps({"rounds": 3}))
    with pytest.raises(CheckpointError, match="checkpoint format 'dict'"):
        load_checkpoint(bad)


def test_sim_run_stopped_by_ctrl_c_goes_on_with_sim_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    command = ["sim", "run", "sine-reptile", "--out", str(out), "--rounds", "30", "--eval-every", "15"]
    command += ["--eval-tasks", "3", "--final-eval-tasks", "4", "--arms", "fedreptile,random"]
    _kill_during(monkeypatch, "run_rounds", 1, at_round=20, error=KeyboardInterrupt)
    assert main(command) == 130
    assert f"go on with: tinyfleet sim resume {out}" in capsys.readouterr().err
    monkeypatch.undo()
    stopped = load_checkpoint(out).progress
    assert stopped is not None and stopped.result.rounds_done == 15  # checkpoints come with the meta-tests

    assert main(command) == 2  # a new run would overwrite the stopped one
    assert "holds a stopped run's checkpoint" in capsys.readouterr().err

    close_shared_sources()
    assert main(["sim", "resume", str(out)]) == 0
    assert not (out / "checkpoint.pkl").exists()  # complete: the outputs replace it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["fedreptile"]["rounds_done"] == 30
    model = summary["arms"]["fedreptile"]["model"]
    arrays = array_record_from_bytes((out / model["file"]).read_bytes())
    assert set(arrays) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert main(["sim", "resume", str(out)]) == 2
    assert "no checkpoint here" in capsys.readouterr().err


def test_devices_in_worker_processes_give_the_same_run_and_resume_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parallel(workers: int) -> RunSettings:
        settings = _settings()
        settings.options["serial"], settings.rounds, settings.eval_every = False, 20, 10
        settings.workers, settings.arms = workers, ("fedreptile", "fedavg")
        return settings

    straight = Experiment(parallel(0))
    straight.run()
    close_shared_sources()
    path = tmp_path / "checkpoint.pkl"
    _kill_during(monkeypatch, "run_rounds", 2, at_round=15)  # FedAvg, after its checkpoint of round 10
    with pytest.raises(Interrupted):
        Experiment(parallel(2), checkpoint=path).run()
    monkeypatch.undo()
    resumed = Experiment.resume(path)
    assert resumed.settings.workers == 2
    resumed.run()
    assert _outcome(resumed) == _outcome(straight)
