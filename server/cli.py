"""`tinyfleet server ...`: run the coordinator, enroll and revoke devices; the connection
options and exit codes every admin command shares (`tinyfleet job ...` lives in job_cli).

Exit codes of the client commands: 0 success (for `job wait`: the job finished),
1 the job failed or the server refused, 2 a bad job file or argument (the message
names it), 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinyfleet.cli import HelpFormatter

EXIT_FAILED = 1
EXIT_BAD_JOB = 2
EXIT_UNREACHABLE = 3

START_EPILOG = """example:
  tinyfleet server start --data-dir ./fleet --listen 127.0.0.1:7000 --http 127.0.0.1:7080
  tinyfleet server start --data-dir ./fleet --listen 0.0.0.0:7443 --tls-cert server.pem \\
      --tls-key server.key --admin-token-file /etc/tinyfleet/admin-token \\
      --db postgresql+psycopg://fleet@db.local/fleet

The admin API needs a token. Without --admin-token, --admin-token-file or
$TINYFLEET_ADMIN_TOKEN the coordinator uses DATA_DIR/admin-token, generating it
(mode 0600) on the first start; clients pass --admin-token-file DATA_DIR/admin-token.
New devices need an enrollment token (tinyfleet server enroll). --no-admin-token and
--open-enrollment switch these off for labs, with a warning.

Port 0 binds an ephemeral port; the actual addresses are written to
DATA_DIR/server.json ({"pid", "listen", "http", "tls"}) once the coordinator is
ready, and the file is removed on a clean exit. SIGINT/SIGTERM stop it gracefully:
the running job keeps its last finished round and resumes on the next start.
"""

CLIENT_HELP = """connection options:
  --server HOST:PORT defaults to $TINYFLEET_SERVER; --admin-token to $TINYFLEET_ADMIN_TOKEN
  (or --admin-token-file FILE, e.g. the coordinator's DATA_DIR/admin-token);
  --ca FILE verifies a TLS coordinator against that CA certificate.
"""

ENROLL_EPILOG = """examples:
  tinyfleet server enroll --uses 10 --ttl 24h --label shelf-3 --server 127.0.0.1:7000 > token.txt
  tinyfleet agent run --enroll-token-file token.txt --server 127.0.0.1:7000 ...   # on each device
  tinyfleet server enroll --list --server 127.0.0.1:7000
  tinyfleet server enroll --revoke 3f9a0c1d2e4b --server 127.0.0.1:7000

The token is printed once, on stdout; the coordinator keeps only its hash. Each new
device takes one use; a device registering again with its own key takes none.
--ttl takes seconds or a number with s, m, h or d.

""" + CLIENT_HELP

ADMIN_TOKEN_FILE = "admin-token"
DEFAULT_ENROLL_TTL_S = 24 * 3600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "15m", "24h", "7d" (argparse type)."""
    match = _DURATION.match(text.lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration such as 90s, 15m, 24h or 7d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


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
    start.add_argument("--insecure", action="store_true",
                       help="allow plaintext (no TLS) on a non-loopback --listen/--http address; "
                            "without it such a start is refused")
    start.add_argument("--admin-token", default=None,
                       help="the token admin calls need (default: $TINYFLEET_ADMIN_TOKEN, else "
                            "DATA_DIR/admin-token, generated on the first start)")
    start.add_argument("--admin-token-file", type=Path, default=None,
                       help="read the admin token from this file")
    start.add_argument("--no-admin-token", action="store_true",
                       help="lab only: no admin token; everyone who reaches the ports is the admin: "
                            "the admin API (jobs, devices, enrollment, revocation), /api/*, SPARQL "
                            "Update, directory writes and imports are all open (a bearer token "
                            "sent is accepted whatever it is; device signatures are still checked)")
    start.add_argument("--open-enrollment", action="store_true",
                       help="lab only: new devices join without an enrollment token")
    start.add_argument("--max-message-bytes", type=int, default=64 * 1024 * 1024,
                       help="largest task or reply accepted (default: 64 MiB); gRPC admits 4 MiB "
                            "more so an oversized reply is recorded as an error naming its size "
                            "while the stream stays up")
    start.add_argument("--max-description-bytes", type=int, default=256 * 1024,
                       help="largest device description accepted (default: 256 KiB), refused "
                            "before it is parsed (gRPC Register and HTTP /things)")
    start.add_argument("--heartbeat-interval", type=float, default=5.0,
                       help="seconds between agent heartbeats (3 missed close the stream)")
    start.add_argument("--registry", default=None,
                       help="SPARQL 1.1 dataset server for the fleet registry (BASE/query, BASE/update); "
                            "default: an embedded store in DATA_DIR/registry")
    start.add_argument("--sparql-timeout", type=float, default=30.0,
                       help="seconds a /sparql query may run, waiting included; then it is stopped (503)")
    start.add_argument("--sparql-workers", type=int, default=2,
                       help="SPARQL queries run at once, each in its own worker process (default: 2)")
    start.add_argument("--sparql-queue", type=int, default=16,
                       help="SPARQL queries that may wait for a worker; more get 503 + Retry-After")
    start.add_argument("--sparql-service-allow", action="append", default=[], metavar="URL",
                       help="an endpoint SPARQL SERVICE may call (repeatable; exact IRI); default: none")
    start.add_argument("--sparql-memory-mb", type=int, default=None,
                       help="memory one SPARQL query may allocate in its worker; past it the query "
                       "fails with a message saying so (default: 1024)")
    start.set_defaults(func=_server_start)

    devices = server_sub.add_parser(
        "devices", help="list registered devices and whether they are online; revoke one",
        formatter_class=HelpFormatter,
        epilog="examples:\n  tinyfleet server devices --server 127.0.0.1:7000 --json\n"
        "  tinyfleet server devices revoke urn:tinyfleet:device:pi-07 --reason 'stolen' "
        "--server 127.0.0.1:7000\n\n" + CLIENT_HELP,
    )
    client_args(devices)
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")
    devices.set_defaults(func=_server_devices)
    devices_sub = devices.add_subparsers(dest="devices_command", metavar="COMMAND")
    revoke = devices_sub.add_parser(
        "revoke", help="close a device's stream and refuse its key from now on",
        formatter_class=HelpFormatter,
        epilog="example:\n  tinyfleet server devices revoke urn:tinyfleet:device:pi-07 --reason stolen\n\n"
        "Its agent exits with an error naming the revocation. Only the admin token can\n"
        "re-admit the device, with a new key.\n\n" + CLIENT_HELP,
    )
    revoke.add_argument("device_id", help="the device id, as `server devices` lists it")
    revoke.add_argument("--reason", default="", help="told to the device and shown in the device list")
    client_args(revoke, inherit=True)
    revoke.set_defaults(func=_server_devices_revoke)

    enroll = server_sub.add_parser(
        "enroll", help="issue an enrollment token for new devices (--list, --revoke ID)",
        formatter_class=HelpFormatter, epilog=ENROLL_EPILOG,
    )
    what = enroll.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true",
                      help="list enrollment tokens: id, label, uses left, expiry, revoked (never the token)")
    what.add_argument("--revoke", metavar="ID",
                      help="revoke an enrollment token; no new device joins with it")
    enroll.add_argument("--uses", type=int, default=None, help="new devices the token may enroll (default 1)")
    enroll.add_argument("--ttl", type=parse_duration, default=None,
                        help="how long the token is valid (default 24h)")
    enroll.add_argument("--label", default=None, help="a note for the list, e.g. where the devices go")
    enroll.add_argument("--json", action="store_true", help="print JSON")
    client_args(enroll)
    enroll.set_defaults(func=_server_enroll)


def client_args(parser: argparse.ArgumentParser, *, inherit: bool = False) -> None:
    """--server, --admin-token(-file), --ca. `inherit`: a sub-command under a parser that has them
    too; its options then only override what was given before the sub-command name."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if inherit else value

    parser.add_argument("--server", default=default(os.environ.get("TINYFLEET_SERVER")),
                        help="coordinator HOST:PORT (default: $TINYFLEET_SERVER)")
    parser.add_argument("--admin-token", default=default(None), help="admin token ($TINYFLEET_ADMIN_TOKEN)")
    parser.add_argument("--admin-token-file", type=Path, default=default(None),
                        help="read the admin token from this file (e.g. DATA_DIR/admin-token)")
    parser.add_argument("--ca", type=Path, default=default(None), help="CA certificate for TLS")


# -- server ------------------------------------------------------------------------
def _coordinator_admin_token(args: argparse.Namespace) -> str | None:
    """The token the coordinator will require: given, or DATA_DIR/admin-token (made on the first
    start, mode 0600, and kept so restarts and clients agree); None with --no-admin-token."""
    from tinyfleet.common.atomic_files import write_atomically
    from tinyfleet.server.admin_client import admin_token_from

    token = admin_token_from(args.admin_token, args.admin_token_file)
    if args.no_admin_token:
        if token:
            raise ValueError("--no-admin-token contradicts the admin token given "
                             "(--admin-token, --admin-token-file or $TINYFLEET_ADMIN_TOKEN)")
        print("warning: --no-admin-token: the admin API (jobs, devices, enrollment, revocation) is "
              "open to anyone who can reach the coordinator; use this only in a lab", file=sys.stderr)
        return None
    if token:
        return token
    path = Path(args.data_dir) / ADMIN_TOKEN_FILE
    if path.exists():
        return admin_token_from(None, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
    print(f"admin token generated in {path} (mode 0600); clients use --admin-token-file {path}",
          file=sys.stderr)
    return admin_token_from(None, path)


def _server_start(args: argparse.Namespace) -> int:
    from tinyfleet.server.daemon import DataDirLock

    if args.max_message_bytes <= 0:
        print("error: --max-message-bytes must be positive", file=sys.stderr)
        return 2
    if args.max_description_bytes <= 0:
        print("error: --max-description-bytes must be positive", file=sys.stderr)
        return 2
    try:
        # The data dir is ours before DATA_DIR/admin-token may be generated: two first starts
        # would otherwise each write a token, and one of them would be refused with the wrong one.
        # Before the registry store too, so refusals name the holder.
        lock = DataDirLock.acquire(args.data_dir)
    except OSError as exc:
        print(f"error: cannot start the coordinator: {exc}", file=sys.stderr)
        return 1
    try:
        return _start_holding_data_dir(args)
    finally:
        lock.release()


def _start_holding_data_dir(args: argparse.Namespace) -> int:
    from tinyfleet.server.daemon import ServerSettings, run

    try:
        admin_token = _coordinator_admin_token(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.open_enrollment:
        print("warning: --open-enrollment: any device that reaches the coordinator can join the fleet "
              "and take part in jobs without an enrollment token; use this only in a lab", file=sys.stderr)
    settings = ServerSettings(
        data_dir=args.data_dir,
        listen=args.listen,
        http=args.http,
        db_url=args.db,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        admin_token=admin_token,
        max_message_bytes=args.max_message_bytes,
        heartbeat_interval_s=args.heartbeat_interval,
        insecure=args.insecure,
        open_enrollment=args.open_enrollment,
    )
    from sqlalchemy.exc import SQLAlchemyError

    from tinyfleet.server.descriptions import DescriptionLimits
    from tinyfleet.server.http.sparql import SparqlOptions
    from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry
    from tinyfleet.server.registry.store import StoreError

    try:
        sparql = SparqlOptions(
            timeout_s=args.sparql_timeout, workers=args.sparql_workers, queue=args.sparql_queue,
            service_allow=tuple(args.sparql_service_allow),
            **({} if args.sparql_memory_mb is None else {"memory_mb": args.sparql_memory_mb}),
        )
        registry = CoordinatorRegistry.open(settings.data_dir, args.registry, settings.admin_token, sparql)
        registry.registry.limits = DescriptionLimits(max_bytes=args.max_description_bytes)
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
             "last_seen": d.last_seen or None, "registered_at": d.registered_at,
             "revoked": d.revoked, "revoked_reason": d.revoked_reason, "agent_version": d.agent_version,
             "rtt_ms": d.rtt_ms or None, "rtt_max_ms": d.rtt_max_ms or None, "handlers": list(d.handlers)}
            for d in devices
        ]
        print_rows(rows, args.json, "devices",
                   ("device", "node id", "online", "last seen", "agent", "rtt ms (worst)", "revoked"),
                   lambda row: (row["device_id"], str(row["node_id"]), "yes" if row["online"] else "no",
                                _when(row["last_seen"]), row["agent_version"] or "-",
                                f"{row['rtt_ms']:.1f} ({row['rtt_max_ms']:.1f})" if row["rtt_ms"] else "-",
                                (row["revoked_reason"] or "yes") if row["revoked"] else ""))
        return 0

    return with_client(args, show)


def _server_devices_revoke(args: argparse.Namespace) -> int:
    def revoke(client: Any) -> int:
        device = client.revoke_device(args.device_id, args.reason)
        print(f"device {device.device_id} revoked: {device.revoked_reason}")
        return 0

    return with_client(args, revoke)


def _enrollment_row(info: Any) -> dict[str, Any]:
    return {"enrollment_id": info.enrollment_id, "label": info.label, "uses_total": info.uses_total,
            "uses_left": info.uses_left, "created_at": info.created_at, "expires_at": info.expires_at,
            "revoked": info.revoked}


def _server_enroll(args: argparse.Namespace) -> int:
    issuing_options = [name for name in ("uses", "ttl", "label") if getattr(args, name) is not None]
    if (args.list or args.revoke) and issuing_options:
        print(f"error: --{issuing_options[0]} applies only when issuing a token, not with "
              f"{'--list' if args.list else '--revoke'}", file=sys.stderr)
        return EXIT_BAD_JOB

    def issue(client: Any) -> int:
        issued = client.enroll(uses=1 if args.uses is None else args.uses,
                               ttl_s=args.ttl or DEFAULT_ENROLL_TTL_S, label=args.label or "")
        row = _enrollment_row(issued.enrollment)
        if args.json:
            print(json.dumps({"token": issued.token, **row}, indent=2))
        else:
            print(issued.token)
        print(f"enrollment {row['enrollment_id']}{' (' + row['label'] + ')' if row['label'] else ''}: "
              f"{row['uses_total']} use(s), expires {_when(row['expires_at'])}; the token is shown only "
              "now", file=sys.stderr)
        return 0

    def listing(client: Any) -> int:
        rows = [_enrollment_row(e) for e in client.enrollments()]
        print_rows(rows, args.json, "enrollment tokens", ("id", "label", "uses left", "expires", "revoked"),
                    lambda row: (row["enrollment_id"], row["label"],
                                 f"{row['uses_left']}/{row['uses_total']}",
                                 _when(row["expires_at"]), "yes" if row["revoked"] else ""))
        return 0

    def revoke(client: Any) -> int:
        info = client.revoke_enrollment(args.revoke)
        print(f"enrollment {info.enrollment_id} revoked ({info.uses_left} unused)")
        return 0

    return with_client(args, listing if args.list else revoke if args.revoke else issue)


def print_rows(
    rows: list[dict[str, Any]],
    as_json: bool,
    what: str,
    columns: tuple[str, ...],
    cells: Callable[[dict[str, Any]], tuple[str, ...]],
) -> None:
    """A listing as JSON (`--json`) or as a table titled with its count."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} {what}")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*cells(row))
    Console().print(table)


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def with_client(args: argparse.Namespace, action: Any) -> int:
    """Run `action(client)`; gRPC errors become a message and an exit code."""
    import grpc

    from tinyfleet.server.admin_client import AdminClient, admin_token_from

    if not args.server:
        print("error: no coordinator address: pass --server HOST:PORT or set TINYFLEET_SERVER",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        token = admin_token_from(args.admin_token, args.admin_token_file)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    try:
        with AdminClient(args.server, admin_token=token, ca=args.ca) as client:
            return int(action(client))
    except grpc.RpcError as exc:
        code, detail = exc.code(), exc.details()
        print(f"error: {detail} ({code.name})", file=sys.stderr)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return EXIT_BAD_JOB
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return EXIT_UNREACHABLE
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
