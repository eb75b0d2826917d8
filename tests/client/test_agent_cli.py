"""`tinyfleet agent ...` as a user runs it: a real agent process, its exit codes and messages."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_fleet import FakeFleet
from flwr.app import ConfigRecord, RecordDict

from tinyfleet.client.cli import add_commands
from tinyfleet.client.descriptions import minimal_thing_description
from tinyfleet.client.state_dir import Identity, StateDir
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import message_from_bytes, message_to_bytes, new_instruction, stamp
from tinyfleet.common.models import build_model
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

STARTUP_S = 60.0  # a cold interpreter importing torch on a busy 2-core machine


def agent_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyfleet")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    add_commands(parser.add_subparsers())
    return parser


def run_cli(argv: list[str]) -> int:
    args = agent_parser().parse_args(argv)
    return int(args.func(args))


@pytest.mark.slow
def test_agent_process_serves_a_task_and_stops_on_sigterm(fleet: FakeFleet, tmp_path: Path) -> None:
    device = tmp_path / "pi.td.json"
    device.write_text(json.dumps(minimal_thing_description("urn:dev:proc-1", 4096, 65536, "armv8")))
    state = tmp_path / "state"
    cmd = [
        sys.executable, "-m", "tinyfleet", "agent", "run",
        "--server", fleet.address, "--state-dir", str(state), "--device", str(device),
        "--data", "sine:seed=3",
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        conn = fleet.wait_connections(1, timeout=STARTUP_S)
        model = build_model("sine-mlp", seed=1)
        content = RecordDict({
            "arrays": to_array_record(model),
            "config": ConfigRecord({"model": "sine-mlp", "local_steps": 2, "batch_size": 8}),
        })
        message = new_instruction(content, "train.fedavg", conn.node_id, run_id=3)
        mid = stamp(message, run_id=3)
        wire = message_to_bytes(message)
        conn.send(task=fleet_pb2.Task(message_id=mid, flower_message=wire, deadline_s=30))
        reply = message_from_bytes(conn.reply_to(mid, timeout=30).flower_message)
        assert reply.has_content() and set(reply.content.array_records["arrays"]) == set(model.state_dict())
        status = StateDir(state).read_status()
        assert status is not None and status["pid"] == process.pid and status["node_id"] == conn.node_id

        assert run_cli(["agent", "status", "--state-dir", str(state), "--json"]) == 0

        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log_path.read_text()
        assert conn.ended.wait(5)
        assert StateDir(state).read_status() is None
        assert "connected to" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_status_prints_identity_and_key_fingerprint_without_the_secret(tmp_path: Path, capsys) -> None:
    state = StateDir(tmp_path)
    state.save_identity(Identity("urn:dev:s", 42, "127.0.0.1:7000", 1.0))
    key = state.device_key()
    assert run_cli(["agent", "status", "--state-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device_id"] == "urn:dev:s" and report["node_id"] == 42
    assert report["key"] == key.fingerprint
    assert report["running"] is False and report["connected"] is False
    assert run_cli(["agent", "status", "--state-dir", str(tmp_path)]) == 0
    private = state.key_path.read_text().splitlines()[1]  # the PEM's base64 body
    assert private not in capsys.readouterr().out


def test_status_of_an_empty_state_dir_says_so(tmp_path: Path, capsys) -> None:
    assert run_cli(["agent", "status", "--state-dir", str(tmp_path)]) == 2
    assert "no identity yet" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (["--device", "{dir}/missing.json"], "missing.json: cannot read"),
        (["--device", "{dir}/bad.json"], "bad.json: line 1:2: not valid JSON"),
        (["--device-id", "pi-9", "--data", "sine:seed=x"], "seed must be an integer"),
        (["--device-id", "pi-9", "--data", "nope:a=1"], "unknown data kind 'nope'"),
        (["--device-id", "pi-9", "--ca", "{dir}/bad.json"], "not a PEM certificate"),
        (["--device-id", "pi-9", "--server", "localhost"], "expected HOST:PORT"),
        (["--device-id", "pi-9", "--enroll-token-file", "{dir}/missing.txt"], "missing.txt: cannot read"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(tmp_path: Path, capsys, extra: list[str], problem: str) -> None:
    (tmp_path / "bad.json").write_text("{oops")
    argv = ["agent", "run", "--server", "127.0.0.1:1", "--state-dir", str(tmp_path / "s")]
    argv += [part.format(dir=tmp_path) for part in extra]
    assert run_cli(argv) == 2
    assert problem in capsys.readouterr().err


def test_every_agent_command_has_help_with_an_example(capsys) -> None:
    for argv in (["agent", "--help"], ["agent", "run", "--help"], ["agent", "status", "--help"]):
        with pytest.raises(SystemExit) as done:
            agent_parser().parse_args(argv)
        assert done.value.code == 0
        assert "examples:\n  tinyfleet agent" in capsys.readouterr().out
