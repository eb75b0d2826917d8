"""Whether a process named in a status file (server.json, an agent's status) is still running: a
pid file outlives a kill -9, so readers must check the pid before they believe the file."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (a killed, unreaped child)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: existence is all we can tell
    return stat.rpartition(")")[2].split()[0] != "Z"
