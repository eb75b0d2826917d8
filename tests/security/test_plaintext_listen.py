"""Plaintext on a non-loopback address needs --insecure (issue 10: "TLS on every non-loopback
listener unless --insecure is given", as Flower's SuperLink has it).

The refusal is checked on a real `tinyfleet server start` process (it exits before binding, so
nothing listens beyond 127.0.0.1); the accepted case is checked on the same check the daemon
runs first at start, so the tests never open a port on a public interface.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyfleet.server.daemon import READY_FILE, ServerSettings, check_transport, is_loopback


@pytest.mark.parametrize("where", [["--listen", "0.0.0.0:0"], ["--http", "0.0.0.0:0"]])
def test_server_start_refuses_plaintext_on_a_public_address(tmp_path: Path, where: list[str]) -> None:
    data_dir = tmp_path / "coord"
    started = subprocess.run(
        [sys.executable, "-m", "tinyfleet", "server", "start", "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", "--admin-token", "t", *where],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert started.returncode != 0
    assert "refusing to listen on 0.0.0.0:0 without TLS" in started.stderr
    assert "--insecure" in started.stderr
    assert not (data_dir / READY_FILE).exists()


def test_insecure_accepts_plaintext_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    public = ServerSettings(data_dir=tmp_path, listen="0.0.0.0:7000", http="[::]:7080", insecure=True)
    with caplog.at_level(logging.WARNING, logger="tinyfleet.server.daemon"):
        check_transport(public)
    [warning] = caplog.records
    assert "0.0.0.0:7000, [::]:7080 WITHOUT TLS (--insecure)" in warning.getMessage()

    caplog.clear()
    check_transport(ServerSettings(data_dir=tmp_path, listen="127.0.0.1:7000", http="localhost:7080"))
    check_transport(ServerSettings(data_dir=tmp_path, listen="0.0.0.0:7000", tls_cert=tmp_path / "c.pem",
                                   tls_key=tmp_path / "k.pem"))
    assert not caplog.records  # loopback, or TLS: nothing to warn about


def test_loopback_is_told_apart_from_public_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "no-such-host.invalid"))
