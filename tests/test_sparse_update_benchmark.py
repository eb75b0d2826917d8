"""The sparse-update benchmark in --quick mode: its JSON record and the memory model against measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyfleet.client.omniglot import data_root

PLANS = {"full", "last-layer", "biases", "planner 64 KB", "planner 128 KB", "planner 256 KB"}


@pytest.mark.skipif(not (data_root() / "occupancy").is_dir(), reason="shared data (occupancy, keywords, "
                    "omniglot) not found; set TINYFLEET_DATA")
def test_quick_run_writes_every_task_and_plan_with_the_model_within_20_percent(tmp_path: Path) -> None:
    out = tmp_path / "sparse_update.json"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    subprocess.run(
        [sys.executable, "-m", "tinyfleet.simulations.benchmarks.sparse_update", "--quick", "--threads", "1",
         "--json", str(out)],
        check=True, timeout=600, env=env, capture_output=True, text=True,
    )
    record = json.loads(out.read_text())
    assert {"command", "date", "git_commit", "machine", "config", "tasks"} <= set(record)
    assert record["config"]["quick"] is True
    assert set(record["tasks"]) == {"occupancy", "keywords", "omniglot"}
    for task, result in record["tasks"].items():
        assert set(result["plans"]) == PLANS, task
        assert set(result["planner_256kb_vs_full"]) == {
            "memory_fraction_of_full", "accuracy_points_below_full", "met"
        }
        for name, row in result["plans"].items():
            assert set(row) == {
                "plan", "modelled_bytes", "measured_bytes", "modelled_over_measured", "accuracy"
            }
            assert 0.8 <= row["modelled_bytes"] / row["measured_bytes"] <= 1.2, (task, name, row)
            assert 0.0 <= row["accuracy"] <= 1.0
        budgets = {name: int(name.split()[1]) * 1024 for name in PLANS if name.startswith("planner")}
        for name, budget in budgets.items():
            assert result["plans"][name]["modelled_bytes"] <= budget, (task, name)
