"""The admin token is required by default (issue 10, row 11): `server start` without one generates
DATA_DIR/admin-token (mode 0600), logs where it is, keeps it across restarts, and refuses the admin
API (gRPC and the registry's HTTP writes) without it; `--no-admin-token` is an explicit lab flag
that prints a warning."""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path

import grpc
import httpx
import pytest

from tinyfleet.cli import main
from tinyfleet.common.device_description import device_thing_description
from tinyfleet.server.admin_client import AdminClient, admin_token_from
from tinyfleet.server.daemon import LOCK_FILE
from tinyfleet.simulations.local_fleet import LocalFleet

pytestmark = pytest.mark.slow


def test_the_admin_api_is_refused_without_the_token_the_coordinator_generated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TINYFLEET_ADMIN_TOKEN", raising=False)
    with LocalFleet(tmp_path) as fleet:
        fleet.start_server()
        token_file = fleet.data_dir / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and fleet.admin_token == token
        assert f"admin token generated in {token_file}" in (fleet.logs / "server.log").read_text()

        with AdminClient(fleet.address) as anonymous, pytest.raises(grpc.RpcError) as refused:
            anonymous.devices()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "DATA_DIR/admin-token" in str(refused.value.details())
        assert main(["job", "list", "--server", fleet.address]) == 1
        with_file = ["--server", fleet.address, "--admin-token-file", str(token_file)]
        assert main(["job", "list", "--json", *with_file]) == 0
        assert json.loads(capsys.readouterr().out) == []
        monkeypatch.setenv("TINYFLEET_ADMIN_TOKEN", token)
        assert main(["server", "devices", "--json", "--server", fleet.address]) == 0
        monkeypatch.delenv("TINYFLEET_ADMIN_TOKEN")

        device = "urn:tinyfleet:device:by-http"
        td = json.dumps(device_thing_description(device, title="h", ram_kb=64, flash_kb=64))
        things = f"http://{fleet.http_address}/things/{device}"
        headers = {"content-type": "application/td+json"}
        assert httpx.put(things, content=td, headers=headers).status_code == 401
        admin = {**headers, "authorization": f"Bearer {token}"}
        assert httpx.put(things, content=td, headers=admin).status_code == 201

        fleet.kill_server()
        fleet.start_server()  # a restart keeps the token, so operators' files stay valid
        assert token_file.read_text().strip() == token
        assert [d.device_id for d in fleet.admin().devices()] == [device]


def test_no_admin_token_is_an_explicit_lab_flag_with_a_warning(tmp_path: Path) -> None:
    with LocalFleet(tmp_path, server_args=["--no-admin-token"]) as fleet:
        fleet.start_server()
        assert not (fleet.data_dir / "admin-token").exists() and fleet.admin_token is None
        assert "warning: --no-admin-token" in (fleet.logs / "server.log").read_text()
        with AdminClient(fleet.address) as anyone:
            assert anyone.devices() == []


def test_no_admin_token_contradicting_a_token_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["server", "start", "--data-dir", str(tmp_path), "--no-admin-token", "--admin-token", "x"]
    assert main(argv) == 2
    assert "--no-admin-token contradicts" in capsys.readouterr().err


def test_a_start_refused_for_a_held_data_dir_writes_no_admin_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data-dir lock comes before the token is generated: a second first start must not
    write a token of its own over (or beside) the one the holder is using."""
    monkeypatch.delenv("TINYFLEET_ADMIN_TOKEN", raising=False)
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # another holder's flock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["server", "start", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0"]) == 1
    finally:
        os.close(fd)
    assert "is in use by another coordinator" in capsys.readouterr().err
    assert not (tmp_path / "admin-token").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=lambda mode: f"{mode:o}")
def test_an_admin_token_file_others_can_read_or_change_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("secret\n")
    token_file.chmod(mode)
    with pytest.raises(OSError, match=rf"mode {mode:o}\); run chmod 600"):
        admin_token_from(None, token_file)
    assert main(["job", "list", "--server", "127.0.0.1:1", "--admin-token-file", str(token_file)]) == 2
    assert f"{token_file}: the admin token is open to other users (mode {mode:o})" in capsys.readouterr().err
    token_file.chmod(0o600)
    assert admin_token_from(None, token_file) == "secret"


def test_no_admin_token_help_says_what_it_opens(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["server", "start", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no-admin-token lab only: no admin token; everyone who reaches the ports is the admin" \
        in help_text
    assert "SPARQL Update, directory writes and imports are all open" in help_text
