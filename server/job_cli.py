"""`tinyfleet job ...`: submit, follow, list jobs, and the job table the CLI and the demo print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tinyfleet.cli import HelpFormatter
from tinyfleet.common.message_keys import NUM_EXAMPLES_KEY
from tinyfleet.server.cli import CLIENT_HELP, EXIT_BAD_JOB, EXIT_FAILED, client_args, print_rows, with_client


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    job = subparsers.add_parser(
        "job", help="submit and follow federated jobs", formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet job submit examples/sine-fedavg.toml --server 127.0.0.1:7000\n",
    )
    job.set_defaults(group_parser=job)
    job_sub = job.add_subparsers(dest="job_command", metavar="COMMAND")

    submit = job_sub.add_parser(
        "submit", help="queue a job file; prints the job id", formatter_class=HelpFormatter,
        epilog="example:\n  JOB=$(tinyfleet job submit job.toml --server 127.0.0.1:7000)\n\n"
        "A bad job file exits 2 with the offending field named.\n\n" + CLIENT_HELP,
    )
    submit.add_argument("job_file", type=Path, help="job TOML file")
    client_args(submit)
    submit.set_defaults(func=_job_submit)

    status = job_sub.add_parser(
        "status", help="state and per-round table of a job", formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet job status 3 --server 127.0.0.1:7000 --json\n\n" + CLIENT_HELP,
    )
    status.add_argument("job_id")
    client_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_job_status)

    wait = job_sub.add_parser(
        "wait", help="block until a job ends (exit 0 finished, 1 failed)",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet job wait 3 --server 127.0.0.1:7000 && echo done\n\n" + CLIENT_HELP,
    )
    wait.add_argument("job_id")
    client_args(wait)
    wait.add_argument("--quiet", action="store_true", help="print nothing but errors")
    wait.set_defaults(func=_job_wait)

    listing = job_sub.add_parser(
        "list", help="all jobs with their state", formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet job list --server 127.0.0.1:7000\n\n" + CLIENT_HELP,
    )
    client_args(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_job_list)


def _job_submit(args: argparse.Namespace) -> int:
    from tinyfleet.common.jobspec import JobSpecError, load_job_spec
    from tinyfleet.server.job_strategy import build_strategy

    try:
        build_strategy(load_job_spec(args.job_file))
    except JobSpecError as exc:
        print(f"error: {args.job_file}: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    text = args.job_file.read_text(encoding="utf-8")
    return with_client(args, lambda client: print(client.submit(text).job_id) or 0)


def _job_status(args: argparse.Namespace) -> int:
    from tinyfleet.server.job_json import job_info_dict

    def show(client: Any) -> int:
        job = job_info_dict(client.job(args.job_id))
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print_job(job)
        return 0

    return with_client(args, show)


def _job_wait(args: argparse.Namespace) -> int:
    from tinyfleet.server.job_json import job_info_dict

    def follow(client: Any) -> int:
        last = None
        for info in client.watch(args.job_id):
            if not args.quiet and (last is None or info.rounds_done != last.rounds_done):
                print(f"job {info.job_id}: {info.state}, round {info.rounds_done}/"
                      f"{info.rounds_total}", file=sys.stderr)
            last = info
        if last is None:
            return EXIT_FAILED
        if not args.quiet:
            print_job(job_info_dict(last))
        return 0 if last.state == "finished" else EXIT_FAILED

    return with_client(args, follow)


def _job_list(args: argparse.Namespace) -> int:
    from tinyfleet.server.job_json import job_info_dict

    def show(client: Any) -> int:
        jobs = [job_info_dict(j) for j in client.jobs()]
        print_rows(jobs, args.json, "jobs", ("id", "name", "strategy", "state", "rounds", "reason"),
                    lambda job: (job["job_id"], job["name"], job["strategy"], job["state"],
                                 f"{job['rounds_done']}/{job['rounds_total']}", job["reason"]))
        return 0

    return with_client(args, show)


def print_job(job: dict[str, Any]) -> None:
    """A job's state line, its per-round table (rich) with one column per reported metric, then
    why rounds kept the model or have no evaluation, and each node that did not reply."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        console.width = 200  # piped output: keep rows on one line
    line = (f"job {job['job_id']} {job['name']!r} ({job['strategy']}): {job['state']}, "
            f"{job['rounds_done']}/{job['rounds_total']} rounds")
    # markup=False: names and reasons are text from job files and devices, not rich markup
    console.print(line + (f" - {job['reason']}" if job["reason"] else ""), markup=False)
    if not job["rounds"]:
        return
    metric_columns = _metric_columns(job["rounds"])
    table = Table()
    for column in ("round", "participants", "dropped", *(c for _, c in metric_columns),
                   "bytes down", "bytes up", "duration"):
        table.add_column(Text(column), justify="right")  # metric names come from devices
    for r in job["rounds"]:
        values = [_number((r[kind] or {}).get(key)) for (kind, key), _ in metric_columns]
        table.add_row(
            str(r["round"]), str(r["participants"]), str(r["dropped"]), *values,
            _bytes(r["bytes_down"]), _bytes(r["bytes_up"]), f"{r['duration_s']:.2f} s",
        )
    console.print(table)
    for r in job["rounds"]:
        if r.get("train_error"):
            console.print(f"  round {r['round']} train: model kept: {r['train_error']}", markup=False)
        if r.get("eval_error"):
            console.print(f"  round {r['round']} evaluate: no metrics: {r['eval_error']}", markup=False)
        for node in r.get("nodes", []):
            if node["status"] != "replied":
                console.print(f"  round {r['round']} {node['phase']}: node {node['node_id']} "
                              f"{node['status']}: {node['error']}", markup=False)


def _metric_columns(rounds: list[dict[str, Any]]) -> list[tuple[tuple[str, str], str]]:
    """((record, key), header) for every metric any round reported, except weights."""
    columns: dict[tuple[str, str], str] = {}
    for kind in ("train_metrics", "eval_metrics"):
        for r in rounds:
            for key in r[kind] or {}:
                if key != NUM_EXAMPLES_KEY:
                    columns.setdefault((kind, key), key)
    return list(columns.items())


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
