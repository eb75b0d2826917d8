"""Omniglot Prototypical Networks: the embedding FedProto's devices use, trained centrally and federated.

Arms (same seeded initial weights, same training episodes, same test episodes):

* ``central``    one learner on episodes over every training class
* ``federated``  devices train on episodes of their own alphabets (`train.protonet`), Flower's FedAvg
                 averages the weights every round, on a SimGrid
* ``backbone``   with ``--backbone PATH``: a model trained elsewhere, only tested (e.g. the
                 FedReptile model of ``omniglot-reptile``: its conv features as the embedding)

Each arm trains until ``episodes`` (every device's episodes counted) or ``--budget-minutes`` of
training CPU (per arm), is tested every ``eval_every`` episodes on ``eval_tasks`` episodes drawn from a fixed
subset of ``curve_classes`` test classes, and at the end on ``final_eval_tasks`` episodes over all
test classes: 5-way and 20-way, 1-shot and 5-shot, mean and 95 % CI. Models go to
``models/<arm>.arrays`` for FedProto and ``omniglot-recon --backbone`` to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from rich.progress import Progress

from tinyfleet.client.omniglot import DRAWERS, OmniglotSplit, data_root
from tinyfleet.common.models import build_model
from tinyfleet.common.strategy_options import Options as BaseOptions
from tinyfleet.simulations.omniglot import central_task
from tinyfleet.simulations.protonet import (
    MODEL,
    TESTS,
    CentralTrainer,
    EpisodeOptions,
    FederatedTrainer,
    calibration_images,
    embed_classes,
    few_shot_test,
    load_backbone,
)
from tinyfleet.simulations.prototype_runs import (
    METRICS_FILE,
    Bar,
    CpuClock,
    MetricsLog,
    Outcome,
    RunnerSettings,
    write_model,
)

ARMS: tuple[Literal["central", "federated"], ...] = ("central", "federated")
#: The targets of issue 12 and Prototypical Networks' own figures (Snell et al. 2017, table 1).
TARGETS = {"5-way 1-shot": 0.97, "20-way 1-shot": 0.93}
PUBLISHED = {"5-way 1-shot": 0.988, "5-way 5-shot": 0.997, "20-way 1-shot": 0.960, "20-way 5-shot": 0.989}
PLOT_FILE = "few_shot.png"


class Options(BaseOptions):
    """Knobs of `sim run omniglot-protonet` (--option NAME=VALUE, or the flag of the same name).

    Parameters
    ----------
    arms : "central,federated" (default: both)
    split : {"alphabets", "characters"} (default: "alphabets")
        Omniglot's split (`tinyfleet.client.omniglot.OmniglotSplit`); "characters" is the
        protocol of the papers compared with.
    ways, shots, queries : int (default: 60, 1, 2)
        Training episodes. Snell et al. train 60-way 5-shot with 5 queries; here 60-way 1-shot
        episodes with 2 queries learned the most per CPU second (the 1-shot tests are the targets;
        benchmarks/results/omniglot-protonet.json, "episode_size_pilot").
    lr : float (default: 0.001)
        Adam's initial learning rate.
    halve_every : int (default: 2000)
        Episodes between halvings of the learning rate (Snell et al.).
    episodes : int (default: 20000)
        Training episodes per arm, unless --budget-minutes of training CPU ends it first.
    devices, devices_per_round, local_episodes : int (default: 10, 5, 10)
        The federated arm's fleet, devices FedAvg samples each round, episodes each trains.
    eval_every, eval_tasks, curve_classes : int (default: 500, 200, 200)
        The curve: every `eval_every` episodes, `eval_tasks` test episodes per setting drawn from
        `curve_classes` fixed test classes.
    final_eval_tasks : int (default: 1000)
        Test episodes per setting at the end, over every test class.
    test_queries : int (default: 15)
        Query images per class in a test episode (shots + queries <= 20 drawers).
    backbone : path (default: none)
        A saved model (.arrays) tested beside the arms: omniglot-protonet or FedReptile's omniglot-conv4.
    """

    arms: tuple[Literal["central", "federated"], ...] = ARMS
    split: Literal["alphabets", "characters"] = "alphabets"
    ways: int = Field(60, ge=2)
    shots: int = Field(1, ge=1)
    queries: int = Field(2, ge=1)
    lr: float = Field(0.001, gt=0)
    halve_every: int = Field(2000, ge=1)
    episodes: int = Field(20000, ge=0)
    devices: int = Field(10, ge=1)
    devices_per_round: int = Field(5, ge=1)
    local_episodes: int = Field(10, ge=1)
    eval_every: int = Field(500, ge=1)
    eval_tasks: int = Field(200, ge=2)
    curve_classes: int = Field(200, ge=20)
    final_eval_tasks: int = Field(1000, ge=2)
    test_queries: int = Field(15, ge=1, le=DRAWERS - 5)
    backbone: str | None = None

    @field_validator("arms", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else value

    def episode_options(self) -> EpisodeOptions:
        return EpisodeOptions(
            ways=self.ways,
            shots=self.shots,
            queries=self.queries,
            lr=self.lr,
            local_episodes=self.local_episodes,
        )


def run(settings: RunnerSettings, out: Path, progress: Progress | None) -> Outcome:
    options = settings.options
    assert isinstance(options, Options)
    if options.devices_per_round > options.devices:
        raise ValueError(f"devices_per_round {options.devices_per_round} > devices {options.devices}")
    root = data_root(settings.data_dir)
    split = OmniglotSplit(options.split)
    test_images = split.images("test", str(root))  # fails now, naming a missing file
    test_classes = split.test_classes()
    curve_classes = np.sort(
        np.random.default_rng([settings.seed, 17]).choice(
            test_classes, min(options.curve_classes, len(test_classes)), replace=False
        )
    )
    state = _Run(
        settings, options, root, test_images, test_classes, curve_classes, MetricsLog(out / METRICS_FILE)
    )
    arms: dict[str, dict[str, Any]] = {}
    for arm in options.arms:
        arms[arm] = state.train(arm, progress)
        arms[arm]["model"] = write_model(out, arm, state.models[arm])
    if options.backbone:
        arms["backbone"] = state.backbone(options.backbone)
    _plot(state.log.rows, options, out / PLOT_FILE)
    lines = [
        f"{arm:10} {test:14} {entry['final'][test]['acc'] * 100:5.1f} ± "
        f"{entry['final'][test]['acc_ci95'] * 100:.1f} %  ({entry['episodes']} episodes, "
        f"{entry['train_cpu_seconds']:.0f} CPU s)"
        for arm, entry in arms.items()
        for test in TESTS
    ]
    figures = {
        "model": MODEL,
        "split": options.split,
        "test_protocol": {
            "settings": {name: {"ways": w, "shots": s} for name, (w, s) in TESTS.items()},
            "queries_per_class": options.test_queries,
            "final_episodes": options.final_eval_tasks,
            "final_classes": len(test_classes),
            "curve_episodes": options.eval_tasks,
            "curve_classes": len(curve_classes),
            "embedding": "eval mode (batch-norm running statistics): each image embedded alone",
        },
        "targets": TARGETS,
        "published_snell_2017": PUBLISHED,
        "arms": arms,
    }
    files = [PLOT_FILE, *(f"models/{arm}.arrays" for arm in options.arms)]
    return Outcome(figures=figures, lines=lines, files=files)


class _Run:
    """The state one run's arms share: test images, the classes its curve and final test draw from."""

    def __init__(
        self,
        settings: RunnerSettings,
        options: Options,
        root: Path,
        test_images: torch.Tensor,
        test_classes: np.ndarray,
        curve_classes: np.ndarray,
        log: MetricsLog,
    ) -> None:
        self.settings, self.options, self.root, self.log = settings, options, root, log
        self.test_images, self.test_classes, self.curve_classes = test_images, test_classes, curve_classes
        self.models: dict[str, torch.nn.Module] = {}

    def train(self, arm: str, progress: Progress | None) -> dict[str, Any]:
        s, o = self.settings, self.options
        model = build_model(MODEL, seed=s.seed)
        trainer: CentralTrainer | FederatedTrainer
        if arm == "central":
            stream = central_task(self.root, 5, s.seed, split=o.split)(0)
            trainer = CentralTrainer(model, stream, o.episode_options(), o.halve_every)
        else:
            location = f",dir={s.data_dir}" if s.data_dir else ""
            specs = [
                f"omniglot:device={d},devices={o.devices},ways=5,seed={s.seed},split={o.split}{location}"
                for d in range(o.devices)
            ]
            trainer = FederatedTrainer(
                model, specs, o.episode_options(), o.halve_every, o.devices_per_round, s.seed
            )
        clock = CpuClock(s.budget_minutes)
        bar = Bar(progress, arm, o.episodes)
        self._curve_point(arm, trainer, clock, 0)
        next_eval, seen_losses = o.eval_every, 0
        try:
            while trainer.episodes < o.episodes and not clock.exhausted:
                before = trainer.episodes
                with clock.counting():
                    trainer.step()
                bar.advance(trainer.episodes - before)
                if trainer.episodes >= next_eval:
                    self._curve_point(arm, trainer, clock, seen_losses)
                    seen_losses = len(trainer.losses)
                    next_eval = (trainer.episodes // o.eval_every + 1) * o.eval_every
        finally:
            if isinstance(trainer, FederatedTrainer):
                trainer.close()
        if not self.log.rows or self.log.rows[-1]["episodes"] != trainer.episodes:
            self._curve_point(arm, trainer, clock, seen_losses)
        self.models[arm] = model
        entry: dict[str, Any] = {
            "episodes": trainer.episodes,
            "train_cpu_seconds": round(clock.seconds, 1),
            "stopped_by": "budget" if clock.exhausted else "episodes",
        }
        if isinstance(trainer, FederatedTrainer):
            entry.update(
                rounds=trainer.rounds,
                devices=o.devices,
                devices_per_round=o.devices_per_round,
                local_episodes=o.local_episodes,
                bytes_per_round_mean=float(np.mean(trainer.round_bytes)) if trainer.round_bytes else 0.0,
            )
        entry["final"] = self._final(arm, model, trainer.episodes, clock.seconds)
        return entry

    def backbone(self, path: str) -> dict[str, Any]:
        split, seed = OmniglotSplit(self.options.split), self.settings.seed
        backbone = load_backbone(path, lambda: calibration_images(split, str(self.root), seed))
        entry: dict[str, Any] = {**backbone.record(), "episodes": 0, "train_cpu_seconds": 0.0}
        entry["final"] = self._final("backbone", backbone.module, 0, 0.0)
        return entry

    def _curve_point(
        self, arm: str, trainer: CentralTrainer | FederatedTrainer, clock: CpuClock, seen_losses: int
    ) -> None:
        o = self.options
        embeddings = embed_classes(trainer.model, self.test_images, self.curve_classes)
        recent = trainer.losses[seen_losses:]
        for test, result in few_shot_test(
            embeddings, o.eval_tasks, o.test_queries, self.settings.seed
        ).items():
            self._row(
                arm,
                trainer.episodes,
                clock.seconds,
                test,
                result,
                final=False,
                train_loss=float(np.mean(recent)) if recent else None,
            )

    def _final(self, arm: str, model: torch.nn.Module, episodes: int, cpu: float) -> dict[str, Any]:
        o = self.options
        embeddings = embed_classes(model, self.test_images, self.test_classes)
        results = few_shot_test(embeddings, o.final_eval_tasks, o.test_queries, self.settings.seed)
        for test, result in results.items():
            self._row(arm, episodes, cpu, test, result, final=True, train_loss=None)
        return {
            test: {"acc": r["acc"], "acc_ci95": r["acc_ci95"], "tasks": int(r["tasks"])}
            for test, r in results.items()
        }

    def _row(
        self,
        arm: str,
        episodes: int,
        cpu: float,
        test: str,
        result: dict[str, float],
        *,
        final: bool,
        train_loss: float | None,
    ) -> None:
        self.log.add(
            arm=arm,
            episodes=episodes,
            train_cpu_seconds=round(cpu, 1),
            train_loss=train_loss,
            test=test,
            final=final,
            classes=len(self.test_classes if final else self.curve_classes),
            tasks=int(result["tasks"]),
            acc=result["acc"],
            acc_ci95=result["acc_ci95"],
        )


def _plot(rows: list[dict[str, Any]], options: Options, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for ax, test in zip(axes.flat, TESTS, strict=True):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            curve = [r for r in rows if r["arm"] == arm and r["test"] == test and not r["final"]]
            final = next(r for r in rows if r["arm"] == arm and r["test"] == test and r["final"])
            color = None
            if curve:
                (line,) = ax.plot(
                    [r["train_cpu_seconds"] / 60 for r in curve],
                    [r["acc"] * 100 for r in curve],
                    marker="o",
                    markersize=3,
                    label=f"{arm} ({curve[0]['tasks']} episodes, {curve[0]['classes']} classes)",
                )
                color = line.get_color()
                ax.errorbar(
                    [final["train_cpu_seconds"] / 60],
                    [final["acc"] * 100],
                    yerr=[final["acc_ci95"] * 100],
                    marker="*",
                    markersize=10,
                    capsize=3,
                    color=color,
                    linestyle="none",
                    label=f"{arm} final ({final['tasks']} episodes, 95 % CI)",
                )
            else:
                ax.axhline(
                    final["acc"] * 100, linestyle="--", color="grey", label=f"{arm} (trained elsewhere)"
                )
        if test in TARGETS:
            ax.axhline(TARGETS[test] * 100, linestyle=":", color="red", label="target")
        ax.axhline(PUBLISHED[test] * 100, linestyle=":", color="black", label="Snell et al. 2017")
        ax.set_title(f"omniglot-protonet ({options.split} split): {test}")
        ax.set_xlabel("training CPU minutes")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
