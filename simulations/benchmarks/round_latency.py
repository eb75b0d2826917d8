"""Round latency of the coordinator and the fleet protocol with real agent processes.

For each fleet size, a coordinator and N agent processes on 127.0.0.1 run FedAvg
on the sine model with one local step (so client compute is small and the
transport shows). Per round: the train phase's wall time on the coordinator
(send, wait, receive, aggregate, checkpoint) and the coordinator+transport
overhead = that time minus the slowest participant's own compute time.

Reference, measured in the same run: the same strategy on SimGrid, where
messages are serialized exactly as on the wire but no process or socket is
involved. Its per-round overhead (round time minus the slowest client's compute)
is the floor that serialization and aggregation alone impose; the ratio column
says how far the real transport is from it. Target: overhead <= 50 ms median at
32 agents.

    python -m tinyfleet.simulations.benchmarks.round_latency [--agents 2,8,32] [--rounds 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_OVERHEAD_MS = 50.0


def job_toml(agents: int, rounds: int) -> str:
    return f"""
name = "round-latency-{agents}"
strategy = "fedavg"
model = "sine-mlp"
rounds = {rounds}

[options]
fraction_evaluate = 0.0

[round]
deadline_s = 60.0
min_nodes = {agents}
wait_for_nodes_s = 300.0

[train]
local_steps = 1
batch_size = 8
lr = 0.01
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure_fleet(agents: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Run a real fleet of `agents` processes; per-round times from the coordinator's records."""
    from tinyfleet.server.job_views import job_info_dict
    from tinyfleet.simulations.local_fleet import LocalFleet

    with tempfile.TemporaryDirectory(prefix="tinyfleet-bench-") as tmp, LocalFleet(Path(tmp)) as fleet:
        fleet.start_server()
        fleet.start_agents([f"sine:seed={i}" for i in range(agents)])
        job_id = fleet.submit(job_toml(agents, rounds + warmup))
        info = job_info_dict(fleet.wait(job_id))
    if info["state"] != "finished":
        raise RuntimeError(f"{agents}-agent job ended {info['state']}: {info['reason']}")
    rows = info["rounds"][warmup:]
    round_ms, overhead_ms = [], []
    for row in rows:
        compute = [n["compute_s"] for n in row["nodes"] if n["phase"] == "train" and n["status"] == "replied"]
        round_ms.append(row["train_duration_s"] * 1000)
        overhead_ms.append((row["train_duration_s"] - max(compute)) * 1000)
    return _summary(agents, round_ms, overhead_ms)


def measure_simgrid(agents: int, rounds: int, warmup: int) -> dict[str, Any]:
    """The same strategy and messages on SimGrid (serialized, in-process): the reference floor."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg
    from tinyfleet.common.arrays import to_array_record
    from tinyfleet.common.models import build_model
    from tinyfleet.simulations.sim_grid import SimGrid

    grid = SimGrid.from_data_specs([f"sine:seed={i}" for i in range(agents)], keep_sent=False)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=agents, min_available_nodes=agents)
    config = ConfigRecord({"model": "sine-mlp", "local_steps": 1, "batch_size": 8, "lr": 0.01})
    arrays = to_array_record(build_model("sine-mlp", seed=0))
    round_ms, overhead_ms = [], []
    for server_round in range(1, rounds + warmup + 1):
        started = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, config, grid))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        elapsed = time.perf_counter() - started
        deliveries = grid.take_deliveries()
        if server_round > warmup:
            # SimGrid runs clients one after another: their compute is summed, not overlapped.
            compute = sum(d.compute_s for d in deliveries)
            round_ms.append(elapsed * 1000)
            overhead_ms.append((elapsed - compute) * 1000)
    return _summary(agents, round_ms, overhead_ms)


def _summary(agents: int, round_ms: list[float], overhead_ms: list[float]) -> dict[str, Any]:
    return {
        "agents": agents,
        "rounds_measured": len(round_ms),
        "round_ms_median": statistics.median(round_ms),
        "round_ms_p90": _percentile(round_ms, 0.9),
        "overhead_ms_median": statistics.median(overhead_ms),
        "overhead_ms_p90": _percentile(overhead_ms, 0.9),
    }


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", default="2,8,32", help="comma-separated fleet sizes (default 2,8,32)")
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds per size (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds discarded first (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.agents.split(",") if s.strip()]
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round at INFO
    console = Console(width=max(Console().width, 140))
    results = []
    for agents in sizes:
        with console.status(f"{agents} agent processes: {args.rounds + args.warmup} rounds"):
            fleet = measure_fleet(agents, args.rounds, args.warmup)
            reference = measure_simgrid(agents, args.rounds, args.warmup)
        results.append({"fleet_grid": fleet, "sim_grid_reference": reference})

    table = Table(title="round latency: FedAvg, sine-mlp, 1 local step, real agent processes on 127.0.0.1")
    for column in ("agents", "round median", "round p90", "overhead median", "overhead p90",
                   "SimGrid overhead median", "ratio to SimGrid", f"target <= {TARGET_OVERHEAD_MS:g} ms"):
        table.add_column(column, justify="right")
    for row in results:
        fleet, ref = row["fleet_grid"], row["sim_grid_reference"]
        ratio = fleet["overhead_ms_median"] / max(ref["overhead_ms_median"], 1e-6)
        row["overhead_ratio_to_sim_grid"] = ratio
        row["meets_target"] = fleet["overhead_ms_median"] <= TARGET_OVERHEAD_MS
        table.add_row(
            str(fleet["agents"]),
            f"{fleet['round_ms_median']:.1f} ms", f"{fleet['round_ms_p90']:.1f} ms",
            f"{fleet['overhead_ms_median']:.1f} ms", f"{fleet['overhead_ms_p90']:.1f} ms",
            f"{ref['overhead_ms_median']:.1f} ms", f"{ratio:.1f}x",
            "yes" if row["meets_target"] else "NO",
        )
    console.print(table)
    if args.json:
        payload = {
            "benchmark": "round_latency",
            "target_overhead_ms_median": TARGET_OVERHEAD_MS,
            "rounds_measured": args.rounds,
            "warmup_rounds": args.warmup,
            "sizes": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        console.print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
