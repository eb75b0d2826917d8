"""One simulation run: FedReptile and its baselines on a scenario, measured in the same run.

Arms (all start from the same seeded initial weights and run the same rounds):

* ``fedreptile``        FedReptile as configured (serial or parallel, compression, local layers)
* ``fedreptile-dense``  the same with dense fp32 both ways (only when ``fedreptile`` compresses):
                        the reference for the communication trade-off
* ``fedavg``            Flower's stock FedAvg on the same devices, same nodes, steps, optimizer
                        and learning rate per round
* ``central``           centralised Reptile on fresh tasks (upper bound)
* ``random``            the initial weights, never trained

Each arm is meta-tested on the scenario's unseen tasks every ``eval_every`` rounds
(``eval_tasks`` of them) and at the end (all of them). Bytes are what the grid
measured for every train message, both directions.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp.strategy import FedAvg, Strategy
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from tinyfleet.client import learners
from tinyfleet.client.data_sources import close_shared_sources
from tinyfleet.client.handlers import HandlerRegistry, default_handlers
from tinyfleet.client.meta_learners import recent_samples
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import array_record_from_bytes, array_record_to_bytes, seed_node_sampling
from tinyfleet.common.models import build_model
from tinyfleet.common.optimizer_memory import OptimizerMemory
from tinyfleet.common.strategy_options import FedReptileOptions
from tinyfleet.server.strategies import FedReptile
from tinyfleet.simulations.central_reptile import central_reptile
from tinyfleet.simulations.checkpoint import (
    FILE_NAME,
    ArmProgress,
    Checkpoint,
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from tinyfleet.simulations.meta_eval import MetaTestProtocol, adapt_on_tasks, summarize
from tinyfleet.simulations.rounds import RoundReport, run_rounds
from tinyfleet.simulations.scenarios import Scenario, scenario_module
from tinyfleet.simulations.sim_grid import SimGrid

ARMS = ("fedreptile", "fedreptile-dense", "fedavg", "central", "random")


@dataclass
class RunSettings:
    """Every knob of a run; written into summary.json so a run can be repeated.

    `options` are the FedReptile options this run sets (`FedReptileOptions` fields);
    the rest come from the scenario's `OPTIONS`, then the model's defaults (see
    `fedreptile_options`). The baselines follow them: FedAvg and centralised
    Reptile train with the same inner loop, central with the same ε schedule.
    """

    scenario: str
    rounds: int
    seed: int = 0
    devices: int = 20
    options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1000
    eval_tasks: int = 50
    final_eval_tasks: int = 200
    arms: tuple[str, ...] = ARMS
    budget_minutes: float | None = None
    checkpoint_every: int = 0  # rounds between checkpoints (0: none); arms finishing always save one
    workers: int = 0  # processes running the simulated devices (0: this one); numbers as on 1 thread
    data_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-specific knobs (e.g. ways)


def fedreptile_options(settings: RunSettings) -> FedReptileOptions:
    """The run's FedReptile options: the model's defaults, overridden by the scenario's `OPTIONS`,
    then by the run's own; the schedule spans the run and sampling follows its seed.
    A bad or unknown option raises OptionsError naming it."""
    scenario = scenario_module(settings.scenario)
    return FedReptileOptions.parse(
        {**scenario.OPTIONS, "num_rounds": settings.rounds, "seed": settings.seed, **settings.options}
    )


@dataclass
class Row:
    """One meta-test point of one arm (a line of metrics.csv)."""

    arm: str
    round: int
    test: str
    tasks: int
    loss_before: float
    loss_after: float
    loss_after_ci95: float
    acc_before: float | None
    acc_after: float | None
    acc_after_ci95: float | None
    train_cpu_seconds: float
    bytes_down_per_round: float
    bytes_up_per_round: float


@dataclass
class ArmResult:
    arm: str
    rounds_done: int
    train_seconds: float
    bytes_down: int = 0
    bytes_up: int = 0
    round_bytes: list[int] = field(default_factory=list)  # train bytes (down + up) of every round
    up_bytes: list[int] = field(default_factory=list)
    model: ArrayRecord | None = None  # the learned initialisation, once the arm is done


class Experiment:
    def __init__(
        self,
        settings: RunSettings,
        progress: Progress | None = None,
        on_rows: Callable[[list[Row]], None] | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        unknown = set(settings.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; known: {', '.join(ARMS)}")
        self.settings = settings
        self.options = fedreptile_options(settings)
        self.scenario: Scenario = scenario_module(settings.scenario).build(settings, self.options)
        self.protocol = MetaTestProtocol(
            steps=self.scenario.eval_steps,
            lr=self.scenario.eval_lr,
            optimizer=self.options.inner_optimizer,
            local_layers=self.options.local_layers,
            reconstruct_steps=self.options.reconstruct_steps,
        )
        self.initial = to_array_record(
            build_model(self.scenario.model, seed=settings.seed, **self.scenario.model_kwargs)
        )
        self.progress = progress
        self.on_rows = on_rows  # sees every meta-test as it lands, so long runs can save partial results
        self.rows: list[Row] = []
        self.results: dict[str, ArmResult] = {}
        self.checkpoint = checkpoint  # where checkpoints go (None: nowhere)
        self._resumed: ArmProgress | None = None  # the arm a resumed run continues

    @classmethod
    def resume(
        cls,
        path: Path,
        progress: Progress | None = None,
        on_rows: Callable[[list[Row]], None] | None = None,
        budget_minutes: float | None = None,
    ) -> Experiment:
        """The run saved at `path` (a checkpoint or the run's --out), ready to `run()` on from there.

        `budget_minutes` replaces the saved budget for arms not finished yet."""
        saved = load_checkpoint(path)
        settings: RunSettings = saved.settings
        if budget_minutes is not None:
            settings.budget_minutes = budget_minutes
        experiment = cls(settings, progress, on_rows, checkpoint=path / FILE_NAME if path.is_dir() else path)
        experiment.rows, experiment.results = saved.rows, saved.results
        experiment._resumed = saved.progress
        restore_rng(saved.rng)
        return experiment

    # -- public -----------------------------------------------------------------
    def run(self) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        arms = [a for a in ARMS if a in self.settings.arms]
        if "fedreptile-dense" in arms and not self.compressed:
            arms.remove("fedreptile-dense")  # fedreptile is already dense
        for arm in arms:
            if arm in self.results:
                continue  # finished before the run was resumed
            getattr(self, "_run_" + arm.replace("-", "_"))()
            self.save(None)

    def save(self, progress: ArmProgress | None) -> None:
        """Checkpoint the run: finished arms, rows, and `progress` of the arm under way."""
        if self.checkpoint is None:
            return
        save_checkpoint(
            self.checkpoint, Checkpoint(self.settings, self.rows, self.results, progress, capture_rng())
        )

    def evaluate(
        self, arm: str, server_round: int, arrays: ArrayRecord, result: ArmResult, final: bool
    ) -> None:
        """Meta-test `eval_tasks` tasks; at the end all of them, also reporting the first
        `eval_tasks` so the curve compares like with like."""
        subset = self.settings.eval_tasks
        if final:
            result.model = arrays
        recent = max(1, len(result.round_bytes[-self.settings.eval_every :]))
        down = sum(result.round_bytes[-recent:]) - sum(result.up_bytes[-recent:])
        up = sum(result.up_bytes[-recent:])
        for name, tasks in self.scenario.meta_tests.items():
            results = adapt_on_tasks(
                self.scenario.model,
                arrays,
                tasks,
                self.protocol,
                model_kwargs=self.scenario.model_kwargs,
                limit=None if final else subset,
            )
            summaries = [summarize(results[:subset])]
            if final and len(results) > subset:
                summaries.append(summarize(results))
            for m in summaries:
                self.rows.append(
                    Row(
                        arm=arm,
                        round=server_round,
                        test=name,
                        tasks=int(m["tasks"]),
                        loss_before=m["loss_before"],
                        loss_after=m["loss_after"],
                        loss_after_ci95=m["loss_after_ci95"],
                        acc_before=m.get("acc_before"),
                        acc_after=m.get("acc_after"),
                        acc_after_ci95=m.get("acc_after_ci95"),
                        train_cpu_seconds=round(result.train_seconds, 3),
                        bytes_down_per_round=down / recent if result.round_bytes else 0.0,
                        bytes_up_per_round=up / recent if result.round_bytes else 0.0,
                    )
                )
        if self.on_rows is not None:
            self.on_rows(self.rows)

    # -- arms -------------------------------------------------------------------
    @property
    def compressed(self) -> bool:
        return self.options.top_p < 1.0 or self.options.quantize != "none"

    def _run_fedreptile(self) -> None:
        self._reptile_arm("fedreptile", self.options)

    def _run_fedreptile_dense(self) -> None:
        dense = self.options.replace(top_p=1.0, quantize="none", compress_downlink=False)
        self._reptile_arm("fedreptile-dense", dense)

    def _reptile_arm(self, arm: str, options: FedReptileOptions) -> None:
        strategy = FedReptile(**options.model_dump())
        self._federated(arm, strategy, default_handlers, ConfigRecord(self._model_config()))

    def _run_fedavg(self) -> None:
        s, o = self.settings, self.options
        per_round = 1 if o.serial else self._parallel_count()
        if not self._resuming("fedavg"):
            seed_node_sampling(s.seed)  # a checkpoint keeps the process-wide `random` it draws from
        strategy = FedAvg(
            fraction_train=per_round / s.devices,
            fraction_evaluate=0.0,
            min_train_nodes=per_round,
            min_available_nodes=per_round,
        )
        config = ConfigRecord(
            {
                **self._model_config(),
                "local_steps": o.inner_steps,
                "lr": o.inner_lr,
                "optimizer": o.inner_optimizer,
                "batch_size": o.inner_batch,
            }
        )
        handlers = functools.partial(fedavg_handlers, self.scenario.episodic)
        self._federated("fedavg", strategy, handlers, config)

    def _run_central(self) -> None:
        s = self.settings
        resumed = self._take_resumed("central")
        if resumed is None:
            result, arrays = ArmResult("central", 0, 0.0), self.initial
            memory = OptimizerMemory() if self.options.keep_optimizer_state else None  # Adam spans tasks
            self.evaluate("central", 0, self.initial, result, final=False)
        else:
            result, arrays, memory = resumed.result, array_record_from_bytes(resumed.arrays), resumed.memory
        task = self._bar("central", result.rounds_done)
        clock = _Clock(result.train_seconds)

        def on_round(server_round: int, current: Callable[[], ArrayRecord]) -> bool:
            result.rounds_done, result.train_seconds = server_round, clock.train
            self._advance(task)
            stop = self._out_of_budget(clock.train)
            if not stop and server_round < s.rounds:
                with clock.paused():
                    if server_round % s.eval_every == 0:
                        self.evaluate("central", server_round, current(), result, final=False)
                    if self._checkpoint_due(server_round):
                        model = array_record_to_bytes(current())
                        self.save(ArmProgress("central", result, model, memory=memory))
            return stop

        with clock.running():
            arrays = central_reptile(
                self.scenario.model,
                arrays,
                lambda i: recent_samples(self.scenario.central_task(i), self.options.inner_samples),
                s.rounds,
                self.options,
                tasks_per_round=1 if self.options.serial else self._parallel_count(),
                memory=memory,
                first_round=result.rounds_done + 1,
                model_kwargs=self.scenario.model_kwargs,
                on_round=on_round,
            )
        result.train_seconds = clock.train
        self.evaluate("central", result.rounds_done, arrays, result, final=True)
        self.results["central"] = result

    def _run_random(self) -> None:
        result = ArmResult("random", 0, 0.0)
        self.evaluate("random", 0, self.initial, result, final=True)
        self.results["random"] = result

    # -- helpers ----------------------------------------------------------------
    def _model_config(self) -> dict[str, Any]:
        return {
            "model": self.scenario.model,
            **{f"model.{k}": v for k, v in self.scenario.model_kwargs.items()},
        }

    def _parallel_count(self) -> int:
        return max(1, int(self.settings.devices * self.options.fraction_train))

    def _federated(
        self,
        arm: str,
        strategy: Strategy,
        handlers: Callable[[], HandlerRegistry],
        config: ConfigRecord,
    ) -> None:
        s = self.settings
        close_shared_sources()  # every arm replays the devices' streams from their start
        grid = SimGrid.from_data_specs(
            self.scenario.device_specs, handler_factory=handlers, workers=s.workers, seed=s.seed,
            keep_sent=False,
        )
        try:
            self._federated_rounds(arm, strategy, grid, config)
        finally:
            grid.close()

    def _federated_rounds(self, arm: str, strategy: Strategy, grid: SimGrid, config: ConfigRecord) -> None:
        s = self.settings
        resumed = self._take_resumed(arm)
        if resumed is None:
            result, arrays = ArmResult(arm, 0, 0.0), self.initial
            self.evaluate(arm, 0, self.initial, result, final=False)
        else:
            if resumed.strategy is None or resumed.grid is None:
                raise CheckpointError(f"the checkpoint of arm {arm!r} lacks its strategy or grid state")
            strategy, result = resumed.strategy, resumed.result
            arrays = array_record_from_bytes(resumed.arrays)
            grid.restore(resumed.grid)
        task = self._bar(arm, result.rounds_done)
        clock = _Clock(result.train_seconds, elsewhere=lambda: grid.worker_cpu_seconds)

        def on_round(report: RoundReport, arrays: ArrayRecord) -> bool:
            up = report.bytes_up
            result.round_bytes.append(report.bytes_down + up)
            result.up_bytes.append(up)
            result.bytes_down += report.bytes_down
            result.bytes_up += up
            result.rounds_done, result.train_seconds = report.round, clock.train
            self._advance(task)
            stop = self._out_of_budget(clock.train)
            if not stop and report.round < s.rounds:
                with clock.paused():
                    if report.round % s.eval_every == 0:
                        self.evaluate(arm, report.round, arrays, result, final=False)
                    if self._checkpoint_due(report.round):
                        model = array_record_to_bytes(arrays)
                        self.save(ArmProgress(arm, result, model, strategy, grid.state()))
            return stop

        with clock.running():
            arrays = run_rounds(
                strategy,
                grid,
                arrays,
                s.rounds - result.rounds_done,
                train_config=config,
                first_round=result.rounds_done + 1,
                on_round=on_round,
            )
        result.train_seconds = clock.train
        self.evaluate(arm, result.rounds_done, arrays, result, final=True)
        self.results[arm] = result

    def _resuming(self, arm: str) -> bool:
        return self._resumed is not None and self._resumed.arm == arm

    def _take_resumed(self, arm: str) -> ArmProgress | None:
        """The saved progress of `arm`, once: the arm continues from it instead of round 0."""
        if not self._resuming(arm):
            return None
        resumed, self._resumed = self._resumed, None
        return resumed

    def _checkpoint_due(self, server_round: int) -> bool:
        every = self.settings.checkpoint_every
        return self.checkpoint is not None and every > 0 and server_round % every == 0

    def _bar(self, arm: str, done: int = 0) -> TaskID | None:
        if self.progress is None:
            return None
        return self.progress.add_task(arm, total=self.settings.rounds, completed=done)

    def _advance(self, task: TaskID | None) -> None:
        """Advance the bar; where stderr is no terminal (nohup, CI logs) the bar cannot redraw,
        so every 5 % of an arm is also printed as a line."""
        if self.progress is None or task is None:
            return
        self.progress.advance(task)
        if not self.progress.console.is_terminal:
            bar = self.progress.tasks[task]
            total = int(bar.total or 0)
            if total and int(bar.completed) % max(1, total // 20) == 0:
                self.progress.console.print(
                    f"{bar.description}: round {int(bar.completed)}/{total}, "
                    f"{bar.elapsed or 0.0:.0f} s elapsed",
                    highlight=False,
                )

    def _out_of_budget(self, train_seconds: float) -> bool:
        budget = self.settings.budget_minutes
        return budget is not None and train_seconds >= budget * 60.0

    def settings_dict(self) -> dict[str, Any]:
        """The run's knobs, its options as set, and every FedReptile option as used (`options_used`)."""
        data = asdict(self.settings)
        data["arms"] = list(self.settings.arms)
        data["options_used"] = self.options.model_dump(mode="json")
        return data


class _Clock:
    """CPU time spent training an arm, excluding the meta-test pauses: this process's, plus
    `elsewhere()` (the grid's worker processes, which only work during rounds).

    CPU time, not wall time: budgets stay comparable on a shared machine."""

    def __init__(self, spent: float = 0.0, elsewhere: Callable[[], float] = lambda: 0.0) -> None:
        self._spent = spent  # a resumed arm goes on counting from what it had spent
        self._since: float | None = None
        self._elsewhere = elsewhere

    @property
    def train(self) -> float:
        return self._here + self._elsewhere()

    @property
    def _here(self) -> float:
        return self._spent + (time.process_time() - self._since if self._since is not None else 0.0)

    @contextmanager
    def running(self) -> Iterator[None]:
        self._since = time.process_time()
        try:
            yield
        finally:
            self._spent, self._since = self._here, None

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._spent, self._since = self._here, None
        try:
            yield
        finally:
            self._since = time.process_time()


def fedavg_handlers(episodic: bool) -> HandlerRegistry:
    """The FedAvg arm's device handlers: the stock learners; on an episodic device (Omniglot)
    each train message starts a fresh task first, as a FedReptile round does."""
    handlers = HandlerRegistry()
    learners.register_all(handlers)
    if episodic:
        handlers.register("train")(_train_on_a_new_task)
    return handlers


def _train_on_a_new_task(message: Message, context: Context) -> Message:
    learners.node_source(context).new_task()  # type: ignore[attr-defined]
    return learners.train(message, context)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<17}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
