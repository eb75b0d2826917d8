"""The worker benchmark runs the Omniglot example job in-process and over two worker processes,
and checks both end with the same model. It needs the real Omniglot files: a worker process
builds its devices from the data on disk, so the tiny made-up dataset of the other Omniglot
tests (patched into this process's module) cannot reach it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyfleet.client.omniglot import data_root
from tinyfleet.simulations.benchmarks import sim_workers

DATA = data_root()
pytestmark = pytest.mark.skipif(
    not (DATA / "omniglot" / "images_background.npz").is_file(),
    reason=f"no Omniglot files at {DATA}/omniglot (set TINYFLEET_DATA to run this test)",
)


def test_benchmark_runs_in_process_and_over_workers_with_the_same_model(tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    code = sim_workers.main(["--workers", "0,2", "--rounds", "2", "--per-round", "2", "--json", str(out)])
    assert code == 0  # it exits otherwise: the two settings' models differ
    figures = json.loads(out.read_text())
    assert figures["command"].startswith("python -m tinyfleet.simulations.benchmarks.sim_workers --workers")
    assert set(figures["settings"]) == {"workers_0", "workers_2"}
    assert figures["settings"]["workers_0"]["speedup_over_first"] == 1.0
    assert all(f["wall_s_per_round"] > 0 and f["cpu_s_per_round"] > 0 for f in figures["settings"].values())
