"""CPU time of a process tree, read from /proc (Linux): what a coordinator and the processes it
started spend. The SPARQL sandbox tests and the registry benchmark watch a runaway query with it:
`deadline_to_cpu_stop` is the seconds from the query's deadline until that CPU stops growing.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: A query that runs for hours on a few hundred triples (a 4-way cartesian product).
RUNAWAY = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }"


def _stats() -> dict[int, list[str]]:
    """pid -> /proc/PID/stat fields from field 3 (state) on, for every process."""
    table: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            table[int(entry)] = raw[raw.rindex(")") + 2 :].split()
    return table


def descendants(pid: int, table: dict[int, list[str]] | None = None) -> list[int]:
    table = table if table is not None else _stats()
    children = [p for p, fields in table.items() if int(fields[1]) == pid]
    return children + [d for child in children for d in descendants(child, table)]


def cpu_seconds(pid: int, among: set[int] | None = None) -> float:
    """CPU time of `pid`, its live descendants (only those in `among` if given) and its reaped
    children (user + system): a killed worker's time moves into its parent's children's time,
    so the sum never drops."""
    table = _stats()
    fields = table[pid]
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for child in descendants(pid, table):
        if among is None or child in among:
            ticks += int(table[child][11]) + int(table[child][12])
    return ticks / _CLOCK_TICKS


def worker_pids(pid: int) -> list[int]:
    """The coordinator's SPARQL worker processes (spawned by multiprocessing)."""
    found = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


def deadline_to_cpu_stop(
    pid: int,
    send_runaway: Callable[[], object],
    timeout_s: float,
    *,
    busy: float = 0.5,
    period_s: float = 0.05,
) -> float:
    """Seconds from a runaway query's deadline until the coordinator `pid` and the processes it
    had when the query was sent last used more than `busy` of a core over one sampling period
    (a worker spawned to replace a killed one is new work, not the query's, and not counted).

    `send_runaway` sends the query and returns when it is answered (the coordinator's
    timeout must be `timeout_s`); sampling continues for 3 s after the deadline.
    """
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    before = set(descendants(pid))
    started = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), cpu_seconds(pid, before)))
            time.sleep(period_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    send_runaway()
    deadline = started + timeout_s
    time.sleep(max(0.0, deadline + 3.0 - time.monotonic()))
    done.set()
    sampler.join()
    last_busy = started
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if (c1 - c0) / (t1 - t0) > busy:
            last_busy = t1
    return last_busy - deadline
