"""The results file a benchmark or experiment leaves (benchmarks/results/NAME.json): its figures
beside the command that made them, the date, the commit, and what the machine was doing meanwhile
(cores, load, the CPU other processes took), so a figure can be traced and measured again, and
the README's table is generated from these files, never typed.

Other processes are named by program only (`python -m pytest`, `beam.smp`): their arguments
may hold secrets and have no place in a committed file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_REPOSITORY = Path(__file__).resolve().parents[2]
#: Where committed results live (the README table reads them).
RESULTS_DIR = _REPOSITORY / "benchmarks" / "results"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Other processes named in a record: those alive at the end that used the most CPU meanwhile.
_OTHERS_LISTED = 5


def module_command(module: str, argv: Sequence[str] | None) -> str:
    """`python -m MODULE ARGS` as typed (`argv` None: this process's own arguments)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def git_commit() -> str | None:
    """The checkout's commit, when the code runs from one (uncommitted edits are not recorded)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(_REPOSITORY), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:  # no git here
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@dataclass(frozen=True)
class _Process:
    program: str  # e.g. "python -m pytest", "beam.smp", "[kworker/0:1]"
    parent: int
    cpu_ticks: int  # user + system


def _program(argv: list[str], name: str) -> str:
    """The program a command line runs, without its arguments (python: its module or script)."""
    if not argv:
        return f"[{name}]"  # a kernel thread
    program = os.path.basename(argv[0])
    if program.startswith("python") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2:
            return f"python -m {argv[2]}"
        return "python -c" if argv[1] == "-c" else f"python {os.path.basename(argv[1])}"
    return program


def _process_table() -> dict[int, _Process]:
    """Every process (Linux /proc)."""
    table: dict[int, _Process] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        program = _program([a.decode(errors="replace") for a in argv if a], name)
        table[int(entry)] = _Process(program, int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _descendants(table: Mapping[int, _Process]) -> set[int]:
    """This process's live descendants."""
    found: set[int] = set()
    parents = {os.getpid()}
    while parents:
        parents = {p for p, process in table.items() if process.parent in parents and p not in found}
        found |= parents
    return found


def _ancestors(table: Mapping[int, _Process]) -> set[int]:
    """The processes that started this one (the shell, the terminal): not "other" work."""
    found, pid = set(), table[os.getpid()].parent if os.getpid() in table else 0
    while pid in table and pid > 1 and pid not in found:
        found.add(pid)
        pid = table[pid].parent
    return found


def _busy_ticks() -> int:
    """CPU ticks every core has spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def _own_cpu_seconds() -> float:
    """This process and its reaped children, user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class RunWatch:
    """Started before a run, asked for the record after it: the load average at both ends, the
    CPU the run took (this process and every process it started), the CPU the rest of the machine
    took meanwhile, and the other processes that took the most and are still running."""

    def __init__(self) -> None:
        self._load_at_start = os.getloadavg()
        self._wall = time.monotonic()
        self._busy = _busy_ticks()
        self._own = _own_cpu_seconds()
        self._before = {pid: process.cpu_ticks for pid, process in _process_table().items()}

    def others_cpu_seconds(self) -> dict[str, float]:
        """Program -> CPU seconds taken since the start by live processes not of this run."""
        table = _process_table()
        ours = _descendants(table) | _ancestors(table) | {os.getpid()}
        used: dict[str, float] = {}
        for pid, process in table.items():
            spent = (process.cpu_ticks - self._before.get(pid, 0)) / _CLOCK_TICKS
            if pid not in ours and spent > 0:
                used[process.program] = used.get(process.program, 0.0) + spent
        return used

    def machine(self) -> dict[str, Any]:
        table = _process_table()
        live_children = sum(table[p].cpu_ticks - self._before.get(p, 0) for p in _descendants(table))
        run = _own_cpu_seconds() - self._own + live_children / _CLOCK_TICKS
        busy = (_busy_ticks() - self._busy) / _CLOCK_TICKS
        busiest = sorted(self.others_cpu_seconds().items(), key=lambda item: -item[1])[:_OTHERS_LISTED]
        return {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in self._load_at_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "wall_seconds": round(time.monotonic() - self._wall, 1),
            "cpu_seconds_this_run": round(run, 1),
            # every core's busy time meanwhile, less this run's: processes that came and went count too
            "cpu_seconds_other_processes": round(max(0.0, busy - run), 1),
            "other_programs_busiest": [
                {"program": p, "cpu_seconds": round(s, 1)} for p, s in busiest if s >= 0.1
            ],
        }

    def record(self, command: str, figures: Mapping[str, Any]) -> dict[str, Any]:
        """`figures` under the command, date, commit and machine (`figures`' keys come after those)."""
        return {
            "command": command,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "machine": self.machine(),
            **figures,
        }


def write_results(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
