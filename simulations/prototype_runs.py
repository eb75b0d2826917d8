"""`tinyfleet sim run NAME` for scenarios that are not FedReptile experiments (prototype learning).

A scenario module for this runner defines

- ``Options``: a `tinyfleet.common.strategy_options.Options` model of its knobs, with defaults;
  `sim run` flags that name a field (``--rounds``, ``--devices``, ``--eval-every``, ``--eval-tasks``,
  ``--final-eval-tasks``, ``--arms``, ``--ways``, ``--split``, ``--backbone``) and
  ``--option NAME=VALUE`` set them, and anything else is refused by name;
- ``run(settings: RunnerSettings, out: Path, progress: Progress | None) -> Outcome``: trains and
  measures, logging rows to ``MetricsLog(out / METRICS_FILE)`` as they land and writing its plots
  (and ``models/``, `write_model`) into `out`.

The runner writes ``summary.json``: the results record of
`tinyfleet.simulations.benchmarks.results_file` (command, date, commit, machine), then the
scenario's name and full configuration, then the outcome's figures; a copy in
benchmarks/results/ feeds the README's table.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.atomic_files import write_atomically
from tinyfleet.common.flower_adapter import array_record_to_bytes
from tinyfleet.common.strategy_options import Options
from tinyfleet.server.artifacts import sha256_hex

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
MODELS_DIR = "models"
#: `sim run` flags a runner scenario may take, by the option they set (their argparse dest).
FLAG_OPTIONS = (
    "rounds",
    "devices",
    "eval_every",
    "eval_tasks",
    "final_eval_tasks",
    "arms",
    "ways",
    "split",
    "backbone",
)


@dataclass(frozen=True)
class RunnerSettings:
    """What every runner scenario gets: the run's seed, data folder, CPU budget, and its options."""

    scenario: str
    options: Options
    seed: int = 0
    data_dir: str | None = None
    budget_minutes: float | None = None  # training CPU a scenario may spend (its docstring says on what)

    def record(self) -> dict[str, Any]:
        """The configuration as summary.json records it (every option, set or default)."""
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "data_dir": self.data_dir,
            "budget_minutes": self.budget_minutes,
            "options": self.options.model_dump(mode="json"),
        }


@dataclass
class Outcome:
    """What a scenario hands back: `figures` go into summary.json, `lines` are printed at the end,
    `files` name what it wrote besides metrics.csv and summary.json."""

    figures: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


class MetricsLog:
    """metrics.csv, rewritten as each row lands, so a long run leaves its rows so far; columns are
    every key seen, in first-seen order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        columns = list(dict.fromkeys(key for r in self.rows for key in r))
        with self.path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


class CpuClock:
    """Training CPU time (this process, user + system), counted only inside `counting()`:
    evaluation pauses are left out, and budgets stay comparable on a shared machine."""

    def __init__(self, budget_minutes: float | None = None) -> None:
        self.budget_seconds = None if budget_minutes is None else budget_minutes * 60.0
        self.seconds = 0.0

    @contextmanager
    def counting(self) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds += time.process_time() - start

    @property
    def exhausted(self) -> bool:
        return self.budget_seconds is not None and self.seconds >= self.budget_seconds


class Bar:
    """One stage's progress bar; where stderr is no terminal (nohup, CI logs) the bar cannot redraw,
    so every 5 % is also printed as a line."""

    def __init__(self, progress: Progress | None, name: str, total: int) -> None:
        self.progress, self.name, self.total, self.done = progress, name, total, 0
        self.task: TaskID | None = None if progress is None else progress.add_task(name, total=total)

    def advance(self, steps: int = 1) -> None:
        self.to(self.done + steps)

    def to(self, done: int) -> None:
        """Mark `done` of `total` complete."""
        before, self.done = self.done, done
        if self.progress is None or self.task is None:
            return
        self.progress.update(self.task, completed=done)
        every = max(1, self.total // 20)
        if not self.progress.console.is_terminal and done // every > before // every:
            elapsed = self.progress.tasks[self.task].elapsed or 0.0
            self.progress.console.print(
                f"{self.name}: {done}/{self.total}, {elapsed:.0f} s elapsed", highlight=False
            )


def write_model(out: Path, name: str, model: nn.Module) -> dict[str, Any]:
    """`models/<name>.arrays` (a Flower ArrayRecord in Flower's serde, as every sim run writes its
    models); returns {file, bytes, sha256} for summary.json."""
    blob = array_record_to_bytes(to_array_record(model))
    folder = out / MODELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / f"{name}.arrays", blob)
    return {"file": f"{MODELS_DIR}/{name}.arrays", "bytes": len(blob), "sha256": sha256_hex(blob)}


def settings_from_args(
    module: Any, args: argparse.Namespace, options: Callable[[argparse.Namespace], dict[str, object]]
) -> RunnerSettings:
    """The run's settings: the scenario's Options from the flags that name one of its fields and
    `options(args)` (--option NAME=VALUE; FedReptile flags end up there too and are refused by
    name). Raises ValueError (OptionsError) naming what is wrong."""
    values = {name: getattr(args, name) for name in FLAG_OPTIONS if getattr(args, name, None) is not None}
    for name, value in options(args).items():
        if name in values:
            raise ValueError(f"option {name!r} is set twice (a flag and --option)")
        values[name] = value
    if args.workers or args.checkpoint_every is not None:
        raise ValueError(
            f"--workers and --checkpoint-every apply to FedReptile scenarios, not {args.scenario}"
        )
    return RunnerSettings(
        scenario=args.scenario,
        options=module.Options.parse(values),
        seed=args.seed,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
        budget_minutes=args.budget_minutes,
    )


def run_scenario(
    module: Any,
    args: argparse.Namespace,
    console: Console,
    options: Callable[[argparse.Namespace], dict[str, object]],
) -> int:
    """`sim run` of a runner scenario: settings, the run under a progress bar, summary.json."""
    import torch

    from tinyfleet.simulations.benchmarks.results_file import RunWatch, write_results
    from tinyfleet.simulations.experiment import progress_bar

    try:
        settings = settings_from_args(module, args, options)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    watch = RunWatch()
    try:
        with progress_bar() as progress:
            outcome = module.run(settings, out, progress)
    except KeyboardInterrupt:
        console.print(f"interrupted; the rows so far are in {out / METRICS_FILE}", soft_wrap=True)
        return 130
    except (ValueError, KeyError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    figures = {"scenario": settings.scenario, "config": settings.record(), **outcome.figures}
    summary = watch.record(args.command_line, figures)
    summary["machine"].update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    write_results(out / SUMMARY_FILE, summary)
    for line in outcome.lines:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}/{', '.join([METRICS_FILE, SUMMARY_FILE, *outcome.files])}", soft_wrap=True)
    return 0
