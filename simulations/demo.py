"""`tinyfleet demo`: the whole system on one machine, in under two minutes.

A coordinator with a temporary data dir, N agent processes each with its own sine
task, FedAvg for a few rounds over real gRPC on 127.0.0.1, the per-round table,
and everything stopped by PID at the end however the run ends.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

EXAMPLE = """example:
  tinyfleet demo                      # 8 agents, 5 FedAvg rounds
  tinyfleet demo --agents 3 --rounds 2 --keep ./demo-run   # keep data dir and logs
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from tinyfleet.cli import HelpFormatter

    parser = subparsers.add_parser(
        "demo",
        help="run a coordinator and agent processes on loopback and train FedAvg on sine tasks",
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=8, help="agent processes to start (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    parser.add_argument("--keep", type=Path, help="keep the coordinator's data dir and logs here")
    parser.set_defaults(func=_demo)


def demo_job(agents: int, rounds: int) -> str:
    return f"""
name = "demo-sine-fedavg"
strategy = "fedavg"
model = "sine-mlp"
rounds = {rounds}
seed = 0

[round]
deadline_s = 30.0
min_nodes = {agents}
wait_for_nodes_s = 90.0

[train]
local_steps = 50
batch_size = 16
lr = 0.02

[evaluate]
eval_samples = 100
"""


def run_demo(root: Path, agents: int, rounds: int) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tinyfleet.server.job_cli import print_job
    from tinyfleet.server.job_json import job_info_dict
    from tinyfleet.simulations.local_fleet import LocalFleet

    console = Console()
    with LocalFleet(root) as fleet:
        with console.status("starting the coordinator"):
            fleet.start_server()
        console.print(f"coordinator on {fleet.address} (HTTP {fleet.http_address}), data in {fleet.data_dir}")
        fleet.start_agents([f"sine:seed={i + 1}" for i in range(agents)])
        console.print(f"started {agents} agent processes, each with its own sine task")
        job_id = fleet.submit(demo_job(agents, rounds))
        console.print(f"submitted job {job_id}: FedAvg on sine-mlp, {rounds} rounds, quorum {agents}")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("waiting for agents to connect", total=rounds)
            last = fleet.admin().job(job_id)
            for info in fleet.admin().watch(job_id):
                last = info
                label = "training" if info.state == "running" else info.state
                progress.update(task, completed=info.rounds_done, description=label)
        print_job(job_info_dict(last))
        if last.state != "finished":
            console.print(f"[red]job ended {last.state}: {last.reason}[/red] (logs in {fleet.logs})")
            return 1
        return 0


def _demo(args: argparse.Namespace) -> int:
    if args.agents < 1 or args.rounds < 1:
        raise SystemExit("tinyfleet demo: --agents and --rounds must be at least 1")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run_demo(args.keep, args.agents, args.rounds)
    with tempfile.TemporaryDirectory(prefix="tinyfleet-demo-") as tmp:
        return run_demo(Path(tmp), args.agents, args.rounds)
