"""A server.json left behind by kill -9 is not taken for a running coordinator (issue 10, row 11).

The file carries its writer's pid; `read_ready_file`, which every launcher uses (LocalFleet,
hence `tinyfleet demo` and the end-to-end tests), treats the file of a dead process, or of a
killed one not yet reaped (a zombie), as absent. Real `tinyfleet server start` processes.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tinyfleet.server.daemon import READY_FILE, read_ready_file
from tinyfleet.simulations.local_fleet import LocalFleet

pytestmark = pytest.mark.slow


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"


def test_a_killed_coordinators_server_json_is_stale_and_a_restart_replaces_it(tmp_path: Path) -> None:
    with LocalFleet(tmp_path, admin_token="stale-admin-token") as fleet:
        info = fleet.start_server()
        assert fleet.server is not None
        killed = fleet.server
        assert info["pid"] == killed.pid and read_ready_file(fleet.data_dir) == info

        killed.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not _zombie(killed.pid):  # dead, not yet reaped: its pid still exists
            assert time.monotonic() < deadline, "the killed coordinator did not die"
            time.sleep(0.05)
        left = fleet.data_dir / READY_FILE
        assert json.loads(left.read_text()) == info  # kill -9 leaves the file behind
        assert read_ready_file(fleet.data_dir) is None  # ...but a zombie's file is stale
        killed.wait()
        assert read_ready_file(fleet.data_dir) is None  # and so is a reaped process's

        again = fleet.start_server()  # same data dir and ports: the lock died with the process
        assert fleet.server.pid != killed.pid and again["pid"] == fleet.server.pid
        assert read_ready_file(fleet.data_dir) == again
        assert again["listen"] == info["listen"]
