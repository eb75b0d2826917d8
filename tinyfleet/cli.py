"""The `tinyfleet` command: one entry point, sub-commands contributed by each folder.

Each module listed in COMMAND_MODULES exposes `add_commands(subparsers)` and sets
`func` on its parsers; modules import their heavy dependencies (torch, grpc)
inside the command functions so `tinyfleet --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

COMMAND_MODULES = [
    "tinyfleet.server.cli",
    "tinyfleet.server.job_cli",
    "tinyfleet.server.registry.cli",
    "tinyfleet.client.cli",
    "tinyfleet.simulations.cli",
    "tinyfleet.simulations.demo",
]

EXAMPLES = """examples:
  tinyfleet demo                                   # coordinator + 8 agents + FedAvg, on loopback
  tinyfleet server start --data-dir ./fleet --listen 127.0.0.1:7000 --http 127.0.0.1:7080
  tinyfleet server enroll --server 127.0.0.1:7000 --admin-token-file ./fleet/admin-token > token.txt
  tinyfleet agent run --server 127.0.0.1:7000 --state-dir ./agent1 --device pi.td.json --data sine:seed=1 \\
      --enroll-token-file token.txt
  tinyfleet job submit job.toml --server 127.0.0.1:7000 --admin-token-file ./fleet/admin-token
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-written example blocks in epilogs as they are."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyfleet",
        description="Federated meta-learning and on-device learning for fleets of small devices.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["tinyfleet", *(sys.argv[1:] if argv is None else argv)])  # results files
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        # A command group without a sub-command: show that group's help.
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
