"""The README's measured table is what benchmarks/results/*.json say: regenerated, never typed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tinyfleet.simulations.benchmarks import readme_table
from tinyfleet.simulations.benchmarks.readme_table import (
    README,
    RESULTS_DIR,
    TableError,
    decode_stall,
    experiment,
    render,
)


def test_the_readme_table_is_the_one_generated_from_the_committed_results(capsys) -> None:
    assert readme_table.main(["--check"]) == 0, capsys.readouterr().out
    assert len(render().splitlines()) > 3, "no results file made a row"


def _copy_readme(tmp_path: Path) -> Path:
    copy = tmp_path / "README.md"
    shutil.copy(README, copy)
    return copy


def test_a_figure_typed_into_the_readme_fails_the_check(tmp_path: Path, capsys) -> None:
    readme = _copy_readme(tmp_path)
    text = readme.read_text()
    row = next(line for line in render().splitlines() if "registry.json" in line)
    changed = row.replace("/s", "0/s", 1)  # e.g. "336/s" becomes "3360/s"
    readme.write_text(text.replace(row, changed))
    assert readme_table.main(["--check", "--readme", str(readme)]) == 1
    assert "0/s" in capsys.readouterr().out
    assert readme_table.main(["--readme", str(readme)]) == 0  # regenerating puts the measured figure back
    assert readme.read_text() == text


def test_a_changed_results_file_fails_the_check_until_the_table_is_regenerated(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS_DIR, results)
    record = json.loads((results / "registry.json").read_text())
    record["sizes"][0]["single_update_ms"] = 123.0
    (results / "registry.json").write_text(json.dumps(record))
    readme = _copy_readme(tmp_path)
    assert readme_table.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert readme_table.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert "single-device update 123 ms" in readme.read_text()


def test_a_results_file_without_a_row_is_refused_by_name(tmp_path: Path, capsys) -> None:
    (tmp_path / "mystery.json").write_text(json.dumps({"command": "x", "figure": 1}))
    with pytest.raises(TableError, match=r"mystery\.json: no README row"):
        render(tmp_path)
    assert readme_table.main(["--check", "--results", str(tmp_path)]) == 2
    assert "mystery.json" in capsys.readouterr().out


def _summary(final_tasks: int, rounds_done: dict[str, int]) -> dict[str, Any]:
    """A made-up `sim run omniglot-reptile` summary: the default final meta-test (no flag)."""
    config = {
        "devices": 10, "serial": True, "fraction": 0.25, "epsilon": 0.3, "epsilon_final": 0.0,
        "epsilon_schedule": "linear", "budget_minutes": 10.0, "top_p": 0.1, "quantize": "int8",
        "compress_downlink": True,
    }
    test = {"tasks": final_tasks, "acc_after": 0.876, "acc_after_ci95": 0.013, "loss_after": 0.4,
            "loss_after_ci95": 0.02}
    arms = {
        arm: {"rounds_done": done, "train_cpu_seconds": 500.0, "meta_test": {"1-shot": test},
              "bytes_per_round_mean": 31625.0 if arm == "fedreptile" else 912888.0}
        for arm, done in rounds_done.items()
    }
    return {
        "command": "tinyfleet sim run omniglot-reptile --out runs/omni --budget-minutes 10",
        "scenario": "omniglot-reptile", "config": config, "arms": arms,
        "meta_test_protocol": {"tasks": {"1-shot": final_tasks}},
        "communication": {"round_bytes_ratio_dense_over_compressed": 28.87, "uplink_bytes_ratio": 30.1,
                          "downlink_bytes_ratio": 27.9},
    }


@pytest.mark.parametrize("options_apart", [False, True], ids=["options-in-settings", "options_used"])
def test_an_experiment_row_is_labelled_with_what_the_run_did(options_apart: bool) -> None:
    summary = _summary(400, {"fedreptile": 9100, "fedreptile-dense": 10000})
    if options_apart:  # summaries since the strategy options became one model
        config = summary["config"]
        options = {k: config.pop(k) for k in list(config) if k not in ("devices", "budget_minutes")}
        options["fraction_train"] = options.pop("fraction")
        config["options_used"] = options
    what, figures = experiment(summary)
    assert "400 unseen 1-shot tasks" in what and "200" not in what  # the default, not a guess
    assert "online serial FedReptile, ε 0.3 → 0" in what
    assert "9,100/10,000 rounds" in what and "CPU budget 10 min per arm" in what
    assert "TinyMetaFed (top-10 % + int8 both ways) 1-shot 87.6 ± 1.3 %" in figures
    assert "9,100 rounds" in figures and "28.9x fewer" in figures


def test_the_decode_stall_row_sets_the_run_beside_its_baseline() -> None:
    stats = {"samples": 40, "median": 1.2, "p99": 3.4, "max": 5.6}
    run = {"pinging_agents": 8, "ping_interval_s": 0.25, "reply_bytes": 48 * 2**20 + 900, "replies": 5,
           "decode_and_check_ms": 210.0, "rtt_ms_quiet": stats, "rtt_ms_during_reply": stats,
           "code_commit": "0123456789abcdef"}
    what, figures = decode_stall({**run, "baseline": {**run, "code_commit": "fedcba9876543210",
                                                       "rtt_ms_during_reply": {**stats, "max": 480.0}}})
    assert "8 agents" in what and "5 large replies of 48 MiB" in what
    assert "during a reply: median 1.2 ms, p99 3.4 ms, max 5.6 ms" in figures
    assert "Before (commit fedcba9876): during a reply median 1.2 ms, p99 3.4 ms, max 480 ms" in figures
