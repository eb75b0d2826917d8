"""`tinyfleet job ...` and `tinyfleet server ...` through the real CLI entry point."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tinyfleet.cli import main

from .harness import CoordinatorThread, settings_for

TOKEN = "cli-token"
GOOD_JOB = """
name = "cli-job"
strategy = "fedavg"
model = "sine-mlp"
rounds = 2

[round]
deadline_s = 20.0
min_nodes = 1

[train]
local_steps = 2
"""


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorThread]:
    running = CoordinatorThread(settings_for(tmp_path / "coord", admin_token=TOKEN))
    agent = running.agent("urn:dev:cli")
    agent.register()
    agent.connect()
    try:
        yield running
    finally:
        running.stop()
        agent.close()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('strategy = "fedavg"\nrounds = 1\n', "'model'"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = "three"\n', "'rounds'"),
        ('strategy = "nope"\nmodel = "sine-mlp"\nrounds = 1\n', "'strategy'"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[round]\ndeadline_s = -1\n',
         "'round.deadline_s'"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[options]\nfraction_trian = 0.5\n',
         "'options.fraction_trian'"),
        ("rounds = [", "'<file>'"),
    ],
)
def test_bad_job_files_exit_2_naming_the_field_without_a_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, field: str
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    assert main(["job", "submit", str(job), "--server", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert field in err and str(job) in err


def test_submit_wait_status_list_and_devices(
    coordinator: CoordinatorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(GOOD_JOB)
    server = ["--server", coordinator.address, "--admin-token", TOKEN]

    assert main(["job", "submit", str(job), *server]) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.isdigit()

    assert main(["job", "wait", job_id, *server]) == 0
    out = capsys.readouterr().out
    assert "finished, 2/2 rounds" in out and "train_loss" in out and "eval_loss" in out

    assert main(["job", "status", job_id, "--json", *server]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "finished" and [r["round"] for r in status["rounds"]] == [1, 2]
    assert status["rounds"][0]["nodes"][0]["compute_s"] > 0

    assert main(["job", "list", "--json", *server]) == 0
    assert [j["job_id"] for j in json.loads(capsys.readouterr().out)] == [job_id]

    assert main(["server", "devices", "--json", *server]) == 0
    [device] = json.loads(capsys.readouterr().out)
    assert device["device_id"] == "urn:dev:cli" and device["online"] is True


def test_wrong_token_and_unreachable_server_have_their_exit_codes(
    coordinator: CoordinatorThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TINYFLEET_ADMIN_TOKEN", raising=False)
    assert main(["job", "list", "--server", coordinator.address]) == 1
    assert "admin token required" in capsys.readouterr().err
    assert main(["job", "status", "1", "--server", "127.0.0.1:1"]) == 3
    monkeypatch.delenv("TINYFLEET_SERVER", raising=False)
    assert main(["job", "list"]) == 3
    assert "--server" in capsys.readouterr().err


def test_a_failed_job_makes_wait_exit_1(
    coordinator: CoordinatorThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(GOOD_JOB.replace("min_nodes = 1", "min_nodes = 5\nwait_for_nodes_s = 0.2"))
    server = ["--server", coordinator.address, "--admin-token", TOKEN]
    assert main(["job", "submit", str(job), *server]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main(["job", "wait", job_id, *server]) == 1
    assert "quorum not reached: 1 of 5" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [["server", "start"], ["server", "devices"], ["job", "submit"], ["job", "status"],
     ["job", "wait"], ["job", "list"]],
)
def test_every_command_has_help_with_an_example(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out
