"""Round latency of the coordinator and the fleet protocol with real agent processes.

For each fleet size, a coordinator and N agent processes on 127.0.0.1 run FedAvg
on the sine model with one local step (so client compute is small and the
transport shows). Per round: the train phase's wall time on the coordinator
(send, wait, receive, aggregate, checkpoint) and the coordinator+transport
overhead = that time minus the slowest participant's own compute time.

The coordinator's own CPU time per round and the agents' summed CPU time per
round (from /proc) separate what the coordinator costs from what 32 agent
processes queueing for 2 cores cost.

Reference, measured in the same run: the same strategy on SimGrid, where
messages are serialized exactly as on the wire but no process or socket is
involved. Its per-round overhead (round time minus the slowest client's compute)
is the floor that serialization and aggregation alone impose; the ratio column
says how far the real transport is from it. Target: overhead <= 50 ms median at
32 agents.

    python -m tinyfleet.simulations.benchmarks.round_latency --agents 2,8,32 \
        --json benchmarks/results/round_latency.json
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

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


def process_cpu_s(pid: int) -> float:
    """User+system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_fleet(agents: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Run a real fleet of `agents` processes; per-round times from the coordinator's records.

    A warm-up job runs first (imports, first connections); around the measured job
    the coordinator's and the agents' CPU time is read, so the table can say how
    much of a round the coordinator itself costs and how much CPU the agents need
    (on 2 cores, 32 agents queue for the CPU: that shows up as overhead too).
    """
    from tinyfleet.server.job_json import job_info_dict
    from tinyfleet.simulations.local_fleet import LocalFleet

    with tempfile.TemporaryDirectory(prefix="tinyfleet-bench-") as tmp, LocalFleet(Path(tmp)) as fleet:
        fleet.start_server()
        fleet.start_agents([f"sine:seed={i}" for i in range(agents)])
        warm = job_info_dict(fleet.wait(fleet.submit(job_toml(agents, warmup))))
        if warm["state"] != "finished":
            raise RuntimeError(f"{agents}-agent warm-up job ended {warm['state']}: {warm['reason']}")
        assert fleet.server is not None
        pids = [a.process.pid for a in fleet.agents]
        server_cpu, agents_cpu = process_cpu_s(fleet.server.pid), sum(map(process_cpu_s, pids))
        info = job_info_dict(fleet.wait(fleet.submit(job_toml(agents, rounds))))
        server_cpu = process_cpu_s(fleet.server.pid) - server_cpu
        agents_cpu = sum(map(process_cpu_s, pids)) - agents_cpu
    if info["state"] != "finished":
        raise RuntimeError(f"{agents}-agent job ended {info['state']}: {info['reason']}")
    round_ms, overhead_ms = [], []
    for row in info["rounds"]:
        compute = [n["compute_s"] for n in row["nodes"] if n["phase"] == "train" and n["status"] == "replied"]
        round_ms.append(row["train_duration_s"] * 1000)
        overhead_ms.append((row["train_duration_s"] - max(compute)) * 1000)
    summary = _summary(agents, round_ms, overhead_ms)
    summary["coordinator_cpu_ms_per_round"] = server_cpu * 1000 / rounds
    summary["agents_cpu_ms_per_round_total"] = agents_cpu * 1000 / rounds
    return summary


def measure_simgrid(agents: int, rounds: int, warmup: int) -> dict[str, Any]:
    """The same strategy and messages on SimGrid (serialized, in-process): the reference floor."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from tinyfleet.common.arrays import to_array_record
    from tinyfleet.common.models import build_model
    from tinyfleet.simulations.sim_grid import SimGrid

    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every round at INFO
    grid = SimGrid.from_data_specs([f"sine:seed={i}" for i in range(agents)], keep_sent=False)
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=agents, min_available_nodes=agents)
    config = ConfigRecord({"model": "sine-mlp", "local_steps": 1, "batch_size": 8, "lr": 0.01})
    arrays = to_array_record(build_model("sine-mlp", seed=0))
    round_ms, overhead_ms = [], []
    for server_round in range(1, rounds + warmup + 1):
        started = time.perf_counter()
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, config, grid))
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            raise RuntimeError(f"FedAvg on SimGrid aggregated no model in round {server_round}")
        arrays = aggregated
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
    watch = RunWatch()
    console = Console(width=max(Console().width, 140))
    results = []
    for agents in sizes:
        with console.status(f"{agents} agent processes: {args.rounds + args.warmup} rounds"):
            fleet = measure_fleet(agents, args.rounds, args.warmup)
            reference = measure_simgrid(agents, args.rounds, args.warmup)
        results.append({"fleet_grid": fleet, "sim_grid_reference": reference})

    table = Table(title="round latency: FedAvg, sine-mlp, 1 local step, real agent processes on 127.0.0.1")
    for column in ("agents", "round median", "round p90", "overhead median", "overhead p90",
                   "coordinator CPU / round", "agents' CPU / round", "SimGrid overhead median",
                   "ratio to SimGrid", f"target <= {TARGET_OVERHEAD_MS:g} ms"):
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
            f"{fleet['coordinator_cpu_ms_per_round']:.1f} ms",
            f"{fleet['agents_cpu_ms_per_round_total']:.1f} ms",
            f"{ref['overhead_ms_median']:.1f} ms", f"{ratio:.1f}x",
            "yes" if row["meets_target"] else "NO",
        )
    console.print(table)
    console.print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        figures = {
            "target_overhead_ms_median": TARGET_OVERHEAD_MS,
            "rounds_measured": args.rounds,
            "warmup_rounds": args.warmup,
            "sizes": results,
        }
        write_results(args.json, watch.record(module_command(__spec__.name, argv), figures))
        console.print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
