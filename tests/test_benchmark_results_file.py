"""A results file says what else used the machine while its figures were measured: another
process's CPU counts as other work and is named by its program (never its arguments), the run's
own child processes count as the run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

# Burns 0.6 s of CPU, then says so in a file and waits to be stopped; with "fork" it first leaves
# its parent, so it belongs to no one in this test's process tree (as another helper's job would).
BUSY = """
import os, sys, time
signal_file, fork = sys.argv[1], sys.argv[2] == "fork"
if fork and os.fork():
    os._exit(0)
end = time.process_time() + 0.6
while time.process_time() < end:
    pass
open(signal_file, "w").write(str(os.getpid()))
time.sleep(60)
"""
SECRET = "--admin-token=s3cret-value"


def _busy(tmp_path: Path, name: str, fork: bool) -> tuple[Path, subprocess.Popen[bytes]]:
    script, done = tmp_path / f"{name}.py", tmp_path / f"{name}.done"
    script.write_text(BUSY)
    started = subprocess.Popen([sys.executable, str(script), str(done), "fork" if fork else "stay", SECRET])
    if fork:
        started.wait()  # the parent leaves at once; its child goes on alone
    return done, started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_record_counts_other_processes_cpu_apart_from_the_runs_own(tmp_path: Path) -> None:
    watch = RunWatch()
    started = [_busy(tmp_path, "tinyfleet_other", fork=True), _busy(tmp_path, "tinyfleet_own", fork=False)]
    try:
        deadline = time.monotonic() + 60
        while not all(f.is_file() and f.read_text() for f, _ in started):
            assert time.monotonic() < deadline, "the busy processes did not finish their work"
            time.sleep(0.05)
        command = module_command("tinyfleet.simulations.benchmarks.x", ["--json", "a b.json"])
        record = watch.record(command, {"figure": 1.5})
        others = watch.others_cpu_seconds()
    finally:
        for f, process in started:
            if f.is_file() and f.read_text():
                os.kill(int(f.read_text()), signal.SIGKILL)
            process.wait()
    assert record["command"] == "python -m tinyfleet.simulations.benchmarks.x --json 'a b.json'"
    assert record["date"] and record["figure"] == 1.5
    machine = record["machine"]
    assert machine["cpus"] == os.cpu_count()
    assert others["python tinyfleet_other.py"] >= 0.5, others
    assert "python tinyfleet_own.py" not in others, others
    assert machine["cpu_seconds_this_run"] >= 0.5  # the own child's work
    assert machine["cpu_seconds_other_processes"] >= 0.5
    path = tmp_path / "results" / "x.json"
    write_results(path, record)
    assert json.loads(path.read_text()) == record
    assert "s3cret" not in path.read_text()
