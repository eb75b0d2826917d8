"""`tinyfleet server ...` and `tinyfleet job ...`: run the coordinator, operate jobs.

Exit codes of the job commands: 0 success (for `job wait`: the job finished),
1 the job failed or the server refused, 2 a bad job file (the message names
the field), 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tinyfleet.cli import HelpFormatter

EXIT_FAILED = 1
EXIT_BAD_JOB = 2
EXIT_UNREACHABLE = 3

START_EPILOG = """example:
  tinyfleet server start --data-dir ./fleet --listen 127.0.0.1:7000 --http 127.0.0.1:7080
  tinyfleet server start --data-dir ./fleet --listen 0.0.0.0:7443 --tls-cert server.pem \\
      --tls-key server.key --admin-token "$TINYFLEET_ADMIN_TOKEN" \\
      --db postgresql+psycopg://fleet@db.local/fleet

Port 0 binds an ephemeral port; the actual addresses are written to
DATA_DIR/server.json ({"pid", "listen", "http", "tls"}) once the coordinator is
ready, and the file is removed on a clean exit. SIGINT/SIGTERM stop it gracefully:
the running job keeps its last finished round and resumes on the next start.
"""

CLIENT_HELP = """connection options:
  --server HOST:PORT defaults to $TINYFLEET_SERVER; --admin-token to $TINYFLEET_ADMIN_TOKEN;
  --ca FILE verifies a TLS coordinator against that CA certificate.
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    server = subparsers.add_parser(
        "server", help="run and inspect the coordinator", formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet server start --data-dir ./fleet --listen 127.0.0.1:7000\n",
    )
    server.set_defaults(group_parser=server)
    server_sub = server.add_subparsers(dest="server_command", metavar="COMMAND")

    start = server_sub.add_parser(
        "start", help="run the coordinator in the foreground", formatter_class=HelpFormatter,
        epilog=START_EPILOG,
    )
    start.add_argument("--data-dir", type=Path, required=True,
                       help="state: SQLite database, artifact blobs, server.json")
    start.add_argument("--listen", default="127.0.0.1:7000", help="gRPC address (port 0: any)")
    start.add_argument("--http", default=None, help="HTTP JSON API address (port 0: any)")
    start.add_argument("--db", default=None,
                       help="SQLAlchemy URL (default: SQLite in the data dir), e.g. "
                            "postgresql+psycopg://user@host/db")
    start.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (chain)")
    start.add_argument("--tls-key", type=Path, default=None, help="PEM private key")
    start.add_argument("--admin-token", default=os.environ.get("TINYFLEET_ADMIN_TOKEN"),
                       help="require this token for admin calls (default: $TINYFLEET_ADMIN_TOKEN)")
    start.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024,
                       help="largest task or reply accepted (default: 64 MiB); gRPC admits 4 MiB "
                            "more so an oversized reply is recorded as an error naming its size "
                            "while the stream stays up")
    start.add_argument("--heartbeat-interval", type=float, default=5.0,
                       help="seconds between agent heartbeats (3 missed close the stream)")
    start.add_argument("--registry", default=None,
                       help="SPARQL 1.1 dataset server for the fleet registry (BASE/query, BASE/update); "
                            "default: an embedded store in DATA_DIR/registry")
    start.set_defaults(func=_server_start)

    devices = server_sub.add_parser(
        "devices", help="list registered devices and whether they are online",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet server devices --server 127.0.0.1:7000 --json\n\n" + CLIENT_HELP,
    )
    _client_args(devices)
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")
    devices.set_defaults(func=_server_devices)

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
    _client_args(submit)
    submit.set_defaults(func=_job_submit)

    status = job_sub.add_parser(
        "status", help="state and per-round table of a job", formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet job status 3 --server 127.0.0.1:7000 --json\n\n" + CLIENT_HELP,
    )
    status.add_argument("job_id")
    _client_args(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=_job_status)

    wait = job_sub.add_parser(
        "wait", help="block until a job ends (exit 0 finished, 1 failed)",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet job wait 3 --server 127.0.0.1:7000 && echo done\n\n" + CLIENT_HELP,
    )
    wait.add_argument("job_id")
    _client_args(wait)
    wait.add_argument("--quiet", action="store_true", help="print nothing but errors")
    wait.set_defaults(func=_job_wait)

    listing = job_sub.add_parser(
        "list", help="all jobs with their state", formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet job list --server 127.0.0.1:7000\n\n" + CLIENT_HELP,
    )
    _client_args(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_job_list)


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("TINYFLEET_SERVER"),
                        help="coordinator HOST:PORT (default: $TINYFLEET_SERVER)")
    parser.add_argument("--admin-token", default=None, help="admin token ($TINYFLEET_ADMIN_TOKEN)")
    parser.add_argument("--ca", type=Path, default=None, help="CA certificate for TLS")


# -- server ------------------------------------------------------------------------
def _server_start(args: argparse.Namespace) -> int:
    from tinyfleet.server.daemon import ServerSettings, run

    settings = ServerSettings(
        data_dir=args.data_dir,
        listen=args.listen,
        http=args.http,
        db_url=args.db,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        admin_token=args.admin_token or None,
        max_message_bytes=args.max_message_bytes,
        heartbeat_interval_s=args.heartbeat_interval,
    )
    if settings.max_message_bytes <= 0:
        print("error: --max-message-bytes must be positive", file=sys.stderr)
        return 2
    from sqlalchemy.exc import SQLAlchemyError

    from tinyfleet.server.registry.coordinator_hooks import CoordinatorRegistry
    from tinyfleet.server.registry.store import StoreError

    try:
        registry = CoordinatorRegistry.open(settings.data_dir, args.registry, settings.admin_token)
        try:
            return run(settings, registry.hooks())
        finally:
            registry.registry.store.close()
    except (OSError, ValueError, SQLAlchemyError, StoreError) as exc:
        print(f"error: cannot start the coordinator: {exc}", file=sys.stderr)
        return 1


def _server_devices(args: argparse.Namespace) -> int:
    def show(client: Any) -> int:
        devices = client.devices()
        rows = [
            {"device_id": d.device_id, "node_id": d.node_id, "online": d.online,
             "last_seen": d.last_seen or None, "registered_at": d.registered_at}
            for d in devices
        ]
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} devices")
        for column in ("device", "node id", "online", "last seen"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["device_id"], str(row["node_id"]), "yes" if row["online"] else "no",
                          _when(row["last_seen"]))
        Console().print(table)
        return 0

    return _with_client(args, show)


# -- jobs --------------------------------------------------------------------------
def _job_submit(args: argparse.Namespace) -> int:
    from tinyfleet.common.jobspec import JobSpecError, load_job_spec
    from tinyfleet.server.job_strategy import build_strategy

    try:
        build_strategy(load_job_spec(args.job_file))
    except JobSpecError as exc:
        print(f"error: {args.job_file}: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    text = args.job_file.read_text(encoding="utf-8")
    return _with_client(args, lambda client: print(client.submit(text).job_id) or 0)


def _job_status(args: argparse.Namespace) -> int:
    from tinyfleet.server.job_views import job_info_dict

    def show(client: Any) -> int:
        job = job_info_dict(client.job(args.job_id))
        if args.json:
            print(json.dumps(job, indent=2))
        else:
            print_job(job)
        return 0

    return _with_client(args, show)


def _job_wait(args: argparse.Namespace) -> int:
    from tinyfleet.server.job_views import job_info_dict

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

    return _with_client(args, follow)


def _job_list(args: argparse.Namespace) -> int:
    from tinyfleet.server.job_views import job_info_dict

    def show(client: Any) -> int:
        jobs = [job_info_dict(j) for j in client.jobs()]
        if args.json:
            print(json.dumps(jobs, indent=2))
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(jobs)} jobs")
        for column in ("id", "name", "strategy", "state", "rounds", "reason"):
            table.add_column(column)
        for job in jobs:
            table.add_row(job["job_id"], job["name"], job["strategy"], job["state"],
                          f"{job['rounds_done']}/{job['rounds_total']}", job["reason"])
        Console().print(table)
        return 0

    return _with_client(args, show)


def print_job(job: dict[str, Any]) -> None:
    """A job's state line and its per-round table (rich), one column per reported metric."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console.width = 200  # piped output: keep rows on one line
    line = (f"job {job['job_id']} {job['name']!r} ({job['strategy']}): {job['state']}, "
            f"{job['rounds_done']}/{job['rounds_total']} rounds")
    console.print(line + (f" - {job['reason']}" if job["reason"] else ""))
    if not job["rounds"]:
        return
    metric_columns = _metric_columns(job["rounds"])
    table = Table()
    for column in ("round", "participants", "dropped", *(c for _, c in metric_columns),
                   "bytes down", "bytes up", "duration"):
        table.add_column(column, justify="right")
    for r in job["rounds"]:
        values = [_number((r[kind] or {}).get(key)) for (kind, key), _ in metric_columns]
        table.add_row(
            str(r["round"]), str(r["participants"]), str(r["dropped"]), *values,
            _bytes(r["bytes_down"]), _bytes(r["bytes_up"]), f"{r['duration_s']:.2f} s",
        )
    console.print(table)
    for r in job["rounds"]:
        for node in r.get("nodes", []):
            if node["status"] != "replied":
                console.print(f"  round {r['round']} {node['phase']}: node {node['node_id']} "
                              f"{node['status']}: {node['error']}")


def _metric_columns(rounds: list[dict[str, Any]]) -> list[tuple[tuple[str, str], str]]:
    """((record, key), header) for every metric any round reported, except weights."""
    columns: dict[tuple[str, str], str] = {}
    for kind in ("train_metrics", "eval_metrics"):
        for r in rounds:
            for key in r[kind] or {}:
                if key != "num-examples":
                    columns.setdefault((kind, key), key)
    return list(columns.items())


def _number(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _with_client(args: argparse.Namespace, action: Any) -> int:
    """Run `action(client)`; gRPC errors become a message and an exit code."""
    import grpc

    from tinyfleet.server.admin_client import AdminClient

    if not args.server:
        print("error: no coordinator address: pass --server HOST:PORT or set TINYFLEET_SERVER",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        with AdminClient(args.server, admin_token=args.admin_token, ca=args.ca) as client:
            return int(action(client))
    except grpc.RpcError as exc:
        code, detail = exc.code(), exc.details()  # type: ignore[attr-defined]
        print(f"error: {detail} ({code.name})", file=sys.stderr)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return EXIT_BAD_JOB
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EXIT_UNREACHABLE
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
