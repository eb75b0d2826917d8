"""`tinyfleet agent ...`: run the edge agent, show what a state directory holds."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tinyfleet.cli import HelpFormatter
from tinyfleet.common.device_description import DEVICE_CLASSES
from tinyfleet.common.process_liveness import pid_alive

RUN_EXAMPLES = """examples:
  tinyfleet agent run --server 127.0.0.1:7000 --state-dir ./agent1 --device pi.td.json \\
      --data sine:seed=1 --enroll-token-file token.txt
  tinyfleet agent run --server fleet.example:7000 --ca ca.pem --state-dir /var/lib/tinyfleet \\
      --device pi.ttl --data sine:seed=2
  TINYFLEET_ENROLL_TOKEN=tfe_... tinyfleet agent run --server 127.0.0.1:7000 --state-dir ./agent2 \\
      --device-id pi-02 --data sine:seed=2

A new device needs an enrollment token from the operator (tinyfleet server enroll),
given by --enroll-token-file, $TINYFLEET_ENROLL_TOKEN or --enroll-token (visible to
other users in the process list). The agent makes its Ed25519 key in
STATE_DIR/device.key (mode 0600) on the first start; a restart with the same state dir
re-registers with that key, idempotently and without a token, and updates the
description. While connected, STATE_DIR/agent.json holds {"device_id", "node_id", "pid", ...}.
Exit codes: 0 stopped by SIGINT/SIGTERM, 2 bad input, registration refused or device revoked.
"""

ENROLL_TOKEN_ENV = "TINYFLEET_ENROLL_TOKEN"

STATUS_EXAMPLES = """examples:
  tinyfleet agent status --state-dir ./agent1
  tinyfleet agent status --state-dir ./agent1 --json
"""


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "agent",
        help="the edge agent (runs on the device)",
        description="The edge agent: registers the device and answers the coordinator's tasks.",
        epilog="examples:\n  tinyfleet agent run --help\n  tinyfleet agent status --state-dir ./agent1\n",
        formatter_class=HelpFormatter,
    )
    group.set_defaults(group_parser=group)
    sub = group.add_subparsers(dest="agent_command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="register this device and serve the coordinator until stopped",
        description=(
            "Register the device, open the long-lived stream to the coordinator, heartbeat, "
            "answer train/evaluate/query tasks, and reconnect with backoff when it goes away."
        ),
        epilog=RUN_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    run.add_argument("--server", required=True, metavar="HOST:PORT", help="the coordinator's fleet address")
    run.add_argument("--state-dir", required=True, metavar="DIR",
                     help="where the device key, identity and status live")
    device = run.add_mutually_exclusive_group(required=True)
    device.add_argument(
        "--device", metavar="FILE",
        help="device description: W3C WoT Thing Description (.json/.jsonld) or Turtle (.ttl)",
    )
    device.add_argument(
        "--device-id", metavar="ID",
        help="instead of --device: generate a minimal TD 1.1 for this id (urn:tinyfleet:device:ID "
             "unless ID is an IRI) with this host's RAM, storage and CPU; for tests and demos",
    )
    run.add_argument("--ram-kb", type=int, help="with --device-id: RAM to declare (default: measured)")
    run.add_argument("--flash-kb", type=int, help="with --device-id: storage to declare (default: measured)")
    run.add_argument("--cpu", help="with --device-id: CPU to declare (default: this machine's)")
    run.add_argument(
        "--device-class", default="sbc", choices=DEVICE_CLASSES,
        help="with --device-id: tf:deviceClass (default: sbc)",
    )
    run.add_argument(
        "--data", metavar="KIND:key=value,...",
        help="this device's data source, e.g. sine:seed=3 (a synthetic sine-task stream)",
    )
    run.add_argument("--ca", metavar="FILE", help="PEM root certificate(s): connect with TLS and verify")
    token = run.add_mutually_exclusive_group()
    token.add_argument("--enroll-token", metavar="TOKEN",
                       help="enrollment token for a new device (default: $TINYFLEET_ENROLL_TOKEN)")
    token.add_argument("--enroll-token-file", metavar="FILE", help="read the enrollment token from FILE")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser(
        "status",
        help="show the identity and connection status kept in a state dir (no secrets)",
        description="Print the device id, node id and connection status an agent keeps in its state dir.",
        epilog=STATUS_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    status.add_argument("--state-dir", required=True, metavar="DIR")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def enroll_token(args: argparse.Namespace) -> str:
    """--enroll-token, else --enroll-token-file, else $TINYFLEET_ENROLL_TOKEN, else ''."""
    if args.enroll_token:
        return str(args.enroll_token).strip()
    if args.enroll_token_file:
        from pathlib import Path

        name = f"--enroll-token-file {args.enroll_token_file}"
        try:
            text = Path(args.enroll_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise OSError(f"{name}: cannot read: {exc.strerror}") from exc
        if not text:
            raise OSError(f"{name}: the file is empty")
        return text
    return os.environ.get(ENROLL_TOKEN_ENV, "").strip()


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from tinyfleet.client.agent import Agent, AgentConfig
    from tinyfleet.client.connection import ConfigError, check_address, read_ca
    from tinyfleet.client.data_sources import DataSpecError, shared_source
    from tinyfleet.client.descriptions import DescriptionError, load_description, minimal_description
    from tinyfleet.client.state_dir import StateDir, StateDirError
    from tinyfleet.common.allocator import keep_freed_memory

    if args.verbose == 0:  # the agent's own progress is worth seeing by default
        logging.getLogger("tinyfleet.client").setLevel(logging.INFO)
    try:
        check_address(args.server)
        root_certificates = read_ca(args.ca) if args.ca else None
        if args.device:
            description = load_description(args.device)
        else:
            description = minimal_description(
                args.device_id, ram_kb=args.ram_kb, flash_kb=args.flash_kb, cpu=args.cpu,
                device_class=args.device_class,
            )
        if args.data:
            shared_source(args.data)  # a typo in --data fails now, not at the first task
        state_dir = StateDir(args.state_dir)
        state_dir.ensure()
        token = enroll_token(args)
    except (ConfigError, DescriptionError, DataSpecError, StateDirError, OSError) as exc:
        return _fail(str(exc))

    keep_freed_memory()  # training rounds reuse their buffers instead of faulting them in
    agent = Agent(
        AgentConfig(
            server=args.server,
            state_dir=state_dir,
            description=description,
            data_spec=args.data,
            root_certificates=root_certificates,
            enroll_token=token,
        )
    )

    def request_stop(signum: int, _frame: object) -> None:
        # stop() cancels the gRPC call, which must not run inside a signal handler
        # interrupting gRPC's own code on this thread: hand it to another thread.
        logging.getLogger(__name__).info("%s received; stopping", signal.Signals(signum).name)
        threading.Thread(target=agent.stop, name="tinyfleet-stop", daemon=True).start()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return agent.run()


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tinyfleet.client.state_dir import StateDir, StateDirError

    state_dir = StateDir(args.state_dir)
    try:
        identity = state_dir.load_identity()
        status = state_dir.read_status()
    except StateDirError as exc:
        return _fail(str(exc))
    if identity is None:
        return _fail(f"{state_dir.path}: no identity yet (the agent has not registered from here)")
    report: dict[str, Any] = asdict(identity)
    if state_dir.key_path.exists():
        try:
            report["key"] = state_dir.device_key().fingerprint
        except StateDirError as exc:
            return _fail(str(exc))
    running = status is not None and pid_alive(int(status.get("pid", 0)))
    report["running"] = running
    report["connected"] = bool(running and status and status.get("connected"))
    if running and status:
        report["pid"] = status["pid"]
        report["node_id"] = status.get("node_id", identity.node_id)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        from datetime import UTC, datetime

        report["registered_at"] = datetime.fromtimestamp(identity.registered_at, UTC).isoformat()
        width = max(map(len, report))
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0
