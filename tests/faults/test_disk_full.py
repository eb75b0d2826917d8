"""Disk full (issue 10, row 9): a real `tinyfleet server start` process whose data dir is a small
tmpfs, filled to the last byte and freed again, without restarting the coordinator.

- Everything on the full disk: HTTP writes answer 507 problem+json and store nothing (neither
  SQL nor the registry has the device); once space is freed writes and projection work again.
- SQL elsewhere, the registry store on the full disk: SQL keeps the write (202: durable, not
  yet visible), /healthz shows the outbox lag and the reason; once space is freed the projector
  reopens the store and catches up by itself, and the lag goes back to 0.

Mounting needs root (CAP_SYS_ADMIN); where that is not allowed the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tinyfleet.client.descriptions import minimal_thing_description
from tinyfleet.simulations.benchmarks.process_cpu import descendants
from tinyfleet.simulations.local_fleet import LocalFleet

pytestmark = pytest.mark.slow

TOKEN = "disk-full-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}", "content-type": "application/td+json"}
DISK_SIZE = "24m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_SIZE mounted under tmp_path (unmounted afterwards, see `_unmount`)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the disk-full tests run as root (e.g. in CI's container)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        _unmount(mount_point)


def _unmount(mount_point: Path) -> None:
    """Stop the processes this test started that still use the disk, then unmount it; if that
    fails, detach it lazily and warn. Never raises: the test's own failure must stay visible."""
    holders = _holders(mount_point)
    for pid in holders:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in holders:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # only our children can be reaped; the others go with them
    unmounted = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True, check=False)
    if unmounted.returncode != 0:
        lazy = subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, text=True, check=False)
        warnings.warn(
            f"umount {mount_point} failed ({unmounted.stderr.strip()}); stopped {holders or 'no'} "
            f"processes first; lazy unmount: {'done' if lazy.returncode == 0 else lazy.stderr.strip()}",
            stacklevel=1,
        )


def _holders(mount_point: Path) -> list[int]:
    """This test's descendant processes with their working directory or an open file on the disk."""
    inside = str(mount_point)
    found = []
    for pid in descendants(os.getpid()):
        proc = Path(f"/proc/{pid}")
        try:
            links = [proc / "cwd", *(proc / "fd").iterdir()]
        except OSError:  # gone meanwhile
            continue
        for link in links:
            with contextlib.suppress(OSError):
                target = os.readlink(link)
                if target == inside or target.startswith(inside + "/"):
                    found.append(pid)
                    break
    return found


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left; returns it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * (1 << 12), b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def thing(device_id: str) -> bytes:
    """An agent's Thing Description grown to ~20 KB: every write of it needs fresh pages, in SQL
    and in RocksDB (a small one could fit the slack of a page already allocated)."""
    return json.dumps({**minimal_thing_description(device_id), "description": "x" * 20_000}).encode()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.2)


class Coordinator:
    """A coordinator process (LocalFleet) with its data dir on the small disk."""

    def __init__(self, fleet: LocalFleet) -> None:
        self.fleet = fleet
        fleet.start_server()
        assert fleet.server is not None
        self.pid = fleet.server.pid
        self.base = f"http://{fleet.http_address}"

    def put(self, device_id: str) -> httpx.Response:
        url = f"{self.base}/things/{device_id}"
        return httpx.put(url, content=thing(device_id), headers=ADMIN, timeout=30)

    def visible(self, device_id: str) -> bool:
        return httpx.get(f"{self.base}/things/{device_id}", timeout=30).status_code == 200

    def in_sql(self, device_id: str) -> bool:
        return device_id in {d.device_id for d in self.fleet.admin().devices()}

    def outbox(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/healthz", timeout=30).json()["outbox"]

    def still_the_same_process(self) -> bool:
        assert self.fleet.server is not None
        return self.fleet.server.poll() is None and self.fleet.server_info["pid"] == self.pid


def _fleet(tmp_path: Path, disk: Path, **options: object) -> LocalFleet:
    fleet = LocalFleet(tmp_path / "fleet", admin_token=TOKEN, **options)  # type: ignore[arg-type]
    fleet.data_dir = disk / "coordinator"  # state on the small disk, logs off it
    return fleet


def test_a_full_disk_refuses_writes_with_507_and_stores_nothing_then_recovers(
    small_disk: Path, tmp_path: Path
) -> None:
    with _fleet(tmp_path, small_disk) as fleet:
        coordinator = Coordinator(fleet)
        assert coordinator.put("urn:dev:before").status_code == 201
        filler = fill(small_disk)

        refused = coordinator.put("urn:dev:while-full")
        assert refused.status_code == 507, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["status"] == 507 and "disk is full" in problem["detail"]
        assert "nothing was stored" in problem["detail"]
        assert not coordinator.in_sql("urn:dev:while-full") and not coordinator.visible("urn:dev:while-full")
        assert coordinator.visible("urn:dev:before")  # reads go on

        filler.unlink()
        assert coordinator.put("urn:dev:after").status_code == 201
        assert coordinator.visible("urn:dev:after") and coordinator.in_sql("urn:dev:after")
        assert coordinator.put("urn:dev:while-full").status_code == 201  # the refused write, retried
        assert coordinator.visible("urn:dev:while-full")
        wait_for(lambda: coordinator.outbox()["lag"] == 0, "the outbox is applied")
        assert coordinator.still_the_same_process()


def test_the_projector_catches_up_by_itself_once_the_disk_has_space(small_disk: Path, tmp_path: Path) -> None:
    sql = f"sqlite:///{tmp_path / 'elsewhere.db'}"  # SQL keeps writing; the registry store cannot
    with _fleet(tmp_path, small_disk, db_url=sql) as fleet:
        coordinator = Coordinator(fleet)
        assert coordinator.put("urn:dev:before").status_code == 201
        assert coordinator.outbox() == {"lag": 0, "oldest_age_s": None, "error": None}
        filler = fill(small_disk)

        accepted = coordinator.put("urn:dev:while-full")
        assert accepted.status_code == 202, accepted.text  # durable in SQL, not yet in the registry
        assert "disk is full" in accepted.json()["detail"]
        assert coordinator.in_sql("urn:dev:while-full") and not coordinator.visible("urn:dev:while-full")
        lag = coordinator.outbox()
        wait_for(lambda: coordinator.outbox()["lag"] >= 1, "/healthz shows the outbox lag")
        lag = coordinator.outbox()
        assert lag["oldest_age_s"] is not None and lag["oldest_age_s"] >= 0
        assert lag["error"] == "the registry cannot write: the disk is full"

        filler.unlink()
        wait_for(lambda: coordinator.visible("urn:dev:while-full"), "the projector catches up")
        wait_for(lambda: coordinator.outbox() == {"lag": 0, "oldest_age_s": None, "error": None},
                 "/healthz shows no lag")
        assert coordinator.put("urn:dev:after").status_code == 201
        assert coordinator.visible("urn:dev:after")
        assert coordinator.still_the_same_process()
