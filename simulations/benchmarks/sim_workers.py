"""Benchmark: wall time of parallel FedReptile rounds on Omniglot with the simulated devices in
this process against the same devices spread over worker processes.

The job is `examples/omniglot-reptile.toml` as the coordinator builds it, made
parallel: `--per-round` of the 10 devices train each round (Reptile's meta-batch).
Each setting runs the same seeded rounds from the same start; the final models
must be equal (the benchmark stops otherwise), so the only difference is where
the devices run (in-process rounds use one torch thread, as each worker does: convolutions
sum in a different order with more threads). The table shows wall seconds per round, CPU seconds per round
(this process plus the workers) and the speed-up over in-process measured in the
same run.

    python -m tinyfleet.simulations.benchmarks.sim_workers --data-dir ../shared/data \
        --json benchmarks/results/sim_workers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tinyfleet.client.data_sources import close_shared_sources
from tinyfleet.client.omniglot import data_root
from tinyfleet.common.flower_adapter import ensure_task_identity
from tinyfleet.common.jobspec import load_job_spec
from tinyfleet.server.job_strategy import build_strategy, initial_arrays, train_config
from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results
from tinyfleet.simulations.rounds import run_rounds
from tinyfleet.simulations.sim_grid import SimGrid

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "omniglot-reptile.toml"
DEVICES = 10


def measure(workers: int, rounds: int, per_round: int, data_dir: Path) -> tuple[dict[str, float], dict]:
    spec = load_job_spec(EXAMPLE)
    options = {**spec.options, "serial": False, "fraction_train": per_round / DEVICES, "epsilon": 1.0}
    spec = dataclasses.replace(spec, options=options, rounds=rounds)
    close_shared_sources()
    specs = [f"omniglot:device={d},devices={DEVICES},dir={data_dir}" for d in range(DEVICES)]
    with SimGrid.from_data_specs(specs, workers=workers, keep_sent=False) as grid:
        strategy = build_strategy(spec)
        first = run_rounds(strategy, grid, initial_arrays(spec), 1, train_config=train_config(spec))
        wall, cpu = time.perf_counter(), time.process_time() + grid.worker_cpu_seconds  # round 1 warms up
        arrays = run_rounds(strategy, grid, first, rounds, train_config=train_config(spec), first_round=2)
        wall = time.perf_counter() - wall
        cpu = time.process_time() + grid.worker_cpu_seconds - cpu
    figures = {"wall_s_per_round": wall / rounds, "cpu_s_per_round": cpu / rounds}
    return figures, {k: v.numpy() for k, v in arrays.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="folder holding omniglot/ (default: as sim run finds it)")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts (0: in-process)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per setting")
    parser.add_argument("--per-round", type=int, default=5, help="devices training each round")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    watch = RunWatch()
    ensure_task_identity()
    torch.set_num_threads(1)  # as in every worker
    data_dir = data_root(args.data_dir)
    counts = [int(w) for w in args.workers.split(",")]
    results: dict[str, dict[str, float]] = {}
    reference: dict[str, np.ndarray] | None = None
    console = Console()
    for workers in counts:
        console.print(f"{workers} worker(s): {args.rounds} rounds of {args.per_round} devices ...")
        figures, model = measure(workers, args.rounds, args.per_round, data_dir)
        if reference is None:
            reference = model
        elif not all(np.array_equal(reference[k], model[k]) for k in reference):
            raise SystemExit(f"the model after {workers} workers differs from the first setting's")
        results[f"workers_{workers}"] = figures
    base = results[f"workers_{counts[0]}"]["wall_s_per_round"]
    for entry in results.values():
        entry["speedup_over_first"] = base / entry["wall_s_per_round"]
    table = Table(title=f"parallel FedReptile, Omniglot, {args.per_round} of {DEVICES} devices a round")
    for column in ("devices run in", "wall s / round", "CPU s / round", f"vs {counts[0]} workers"):
        table.add_column(column, justify="left" if column == "devices run in" else "right")
    for workers, f in zip(counts, results.values(), strict=True):
        table.add_row(
            "this process" if workers == 0 else f"{workers} worker processes",
            f"{f['wall_s_per_round']:.3f}",
            f"{f['cpu_s_per_round']:.3f}",
            f"{f['speedup_over_first']:.2f}x",
        )
    console.print(table)
    if args.json:
        config = {"rounds": args.rounds, "per_round": args.per_round, "devices": DEVICES, "workers": counts}
        record = watch.record(module_command(__spec__.name, argv), {"config": config, "settings": results})
        write_results(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
