"""One coordinator per gRPC port and per data dir (issue 10, row 10).

gRPC sets SO_REUSEPORT by default on Linux, so a second coordinator could bind the port of a
running one and the kernel split the agents' connections (and their registrations) between two
databases. Real `tinyfleet server start` processes on 127.0.0.1: the second one must exit
non-zero, naming the pid that holds the port or the data dir, and the first keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server.harness import CoordinatorThread, settings_for

from tinyfleet.server.daemon import Coordinator
from tinyfleet.simulations.local_fleet import LocalFleet

pytestmark = pytest.mark.slow

TOKEN = "exclusive-admin-token"
START_TIMEOUT_S = 60.0


@pytest.fixture
def first(tmp_path: Path) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path / "first", admin_token=TOKEN) as fleet:
        fleet.start_server()
        yield fleet


def second_coordinator(data_dir: Path, listen: str) -> subprocess.CompletedProcess[str]:
    """`tinyfleet server start` that must refuse to run; if it runs instead, it is stopped
    (by its pid) and the test fails."""
    command = [sys.executable, "-m", "tinyfleet", "server", "start", "--data-dir", str(data_dir),
               "--listen", listen, "--http", "127.0.0.1:0", "--admin-token", TOKEN]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = process.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"a second coordinator on {listen} / {data_dir} kept running:\n{err[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_a_second_coordinator_on_the_same_port_exits_naming_the_holder(
    first: LocalFleet, tmp_path: Path
) -> None:
    assert first.server is not None
    refused = second_coordinator(tmp_path / "second", first.address)
    assert refused.returncode != 0
    assert f"cannot listen on {first.address}: the port is in use by pid {first.server.pid}" in refused.stderr
    assert not (tmp_path / "second" / "coordinator.db").exists()  # refused before touching its database
    assert first.server.poll() is None and first.admin().devices() == []  # the first one still serves


def test_a_second_coordinator_on_the_same_data_dir_exits_naming_the_holder(first: LocalFleet) -> None:
    assert first.server is not None
    refused = second_coordinator(first.data_dir, "127.0.0.1:0")
    assert refused.returncode != 0
    assert f"is in use by another coordinator (pid {first.server.pid}" in refused.stderr
    assert first.server.poll() is None and first.admin().devices() == []


def test_a_start_refused_for_its_port_frees_its_data_dir(tmp_path: Path) -> None:
    """In one process (as tests and embedders run it): the refused start releases what it took."""
    first = CoordinatorThread(settings_for(tmp_path / "first"))
    try:
        clashing = Coordinator(settings_for(tmp_path / "second", listen=first.address))
        with pytest.raises(OSError, match=f"the port is in use by pid {os.getpid()}"):
            asyncio.run(clashing.start())
        second = CoordinatorThread(settings_for(tmp_path / "second"))  # the dir is free again
        second.stop()
    finally:
        first.stop()
