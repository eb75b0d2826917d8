"""Omniglot federated reconnaissance: 5 devices learn 5 new test classes per mission from a few
examples, merging prototypes by counts after each mission, until the fleet knows 600 classes.

The embedding is a frozen backbone: ``--backbone PATH`` (e.g. ``models/central.arrays`` of an
``omniglot-protonet`` run, or FedReptile's omniglot-conv4), else one trained here first on
training classes (``backbone_episodes`` episodes, or ``--budget-minutes`` of CPU), written to
``models/backbone.arrays`` and reported as such. Curves (`tinyfleet.simulations.recon`): merged
prototypes, each device alone, central prototypes on all non-query drawings (upper bound), as the
classes seen by any device grow; one plot, ``recon.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from rich.progress import Progress
from torch import nn

from tinyfleet.client.omniglot import DRAWERS, OmniglotSplit, data_root
from tinyfleet.common.models import build_model
from tinyfleet.common.strategy_options import Options as BaseOptions
from tinyfleet.simulations.omniglot import central_task
from tinyfleet.simulations.protonet import (
    MODEL,
    CentralTrainer,
    EpisodeOptions,
    calibration_images,
    embed_classes,
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
from tinyfleet.simulations.recon import METHODS, ReconPoint, reconnaissance

PLOT_FILE = "recon.png"


class Options(BaseOptions):
    """Knobs of `sim run omniglot-recon` (--option NAME=VALUE, or the flag of the same name).

    Parameters
    ----------
    split : {"alphabets", "characters"} (default: "alphabets")
        Omniglot's split; missions teach its test classes.
    devices : int (default: 5)
    ways : int (default: 5)
        New classes per mission.
    shots : int (default: 5)
        Drawings a device learns a class from.
    queries : int (default: 5)
        Drawings per class the accuracy is measured on (never a support).
    classes : int (default: 600)
        Classes taught in all (missions = classes / ways, dealt round-robin to the devices).
    eval_every : int (default: 4)
        Missions between points of the curves.
    backbone : path (default: none)
        The embedding (.arrays); without one a small protonet is trained first.
    backbone_episodes, backbone_ways : int (default: 1500, 20)
        That small protonet's training: 5-shot 5-query episodes over every training class.
    """

    split: Literal["alphabets", "characters"] = "alphabets"
    devices: int = Field(5, ge=1)
    ways: int = Field(5, ge=1)
    shots: int = Field(5, ge=1)
    queries: int = Field(5, ge=1)
    classes: int = Field(600, ge=1)
    eval_every: int = Field(4, ge=1)
    backbone: str | None = None
    backbone_episodes: int = Field(1500, ge=1)
    backbone_ways: int = Field(20, ge=2)


def run(settings: RunnerSettings, out: Path, progress: Progress | None) -> Outcome:
    o = settings.options
    assert isinstance(o, Options)
    if o.shots + o.queries > DRAWERS:
        raise ValueError(f"shots {o.shots} + queries {o.queries} exceed the {DRAWERS} drawings of a class")
    root = str(data_root(settings.data_dir))
    split = OmniglotSplit(o.split)
    test_images, test_classes = split.images("test", root), split.test_classes()
    if o.classes > len(test_classes) or o.classes % o.ways:
        raise ValueError(
            f"classes {o.classes}: need a multiple of ways={o.ways} and at most the {len(test_classes)} "
            f"test classes of the {o.split} split"
        )
    files = [PLOT_FILE]
    backbone: dict[str, Any]
    if o.backbone:
        loaded = load_backbone(o.backbone, lambda: calibration_images(split, root, settings.seed))
        model, backbone = loaded.module, loaded.record()
    else:
        model, backbone = _train_backbone(settings, o, progress)
        backbone["model_file"] = write_model(out, "backbone", model)
        files.append("models/backbone.arrays")
    taught = np.random.default_rng([settings.seed, 29]).permutation(test_classes)[: o.classes]
    embeddings = embed_classes(model, test_images, taught).numpy()
    log = MetricsLog(out / METRICS_FILE)
    bar = Bar(progress, "missions", o.classes // o.ways)

    def on_point(point: ReconPoint) -> None:
        bar.to(point.missions)
        for method in METHODS:
            log.add(
                missions=point.missions,
                classes=point.classes,
                queries=point.queries,
                method=method,
                acc=getattr(point, method),
                acc_ci95=getattr(point, f"{method}_ci95"),
                each_device=" ".join(f"{a:.4f}" for a in point.device_each) if method == "device" else "",
                own_classes=point.device_own_classes if method == "device" else "",
            )

    points = reconnaissance(
        embeddings,
        devices=o.devices,
        ways=o.ways,
        shots=o.shots,
        queries=o.queries,
        seed=settings.seed,
        eval_every=o.eval_every,
        on_point=on_point,
    )
    _plot(points, o, out / PLOT_FILE)
    last = points[-1]
    final = {m: {"acc": getattr(last, m), "acc_ci95": getattr(last, f"{m}_ci95")} for m in METHODS}
    final["device"]["own_classes_acc"] = last.device_own_classes
    figures = {
        "split": o.split,
        "backbone": backbone,
        "protocol": {
            "devices": o.devices,
            "missions": o.classes // o.ways,
            "classes_per_mission": o.ways,
            "shots": o.shots,
            "queries_per_class": o.queries,
            "central_drawings_per_class": DRAWERS - o.queries,
            "metric": "squared Euclidean, nearest prototype",
        },
        "final": {"classes": last.classes, "queries": last.queries, **final},
        "curve": [{"classes": p.classes, **{m: round(getattr(p, m), 4) for m in METHODS}} for p in points],
    }
    lines = [
        f"{m:8} {last.classes} classes: {final[m]['acc'] * 100:5.1f} ± {final[m]['acc_ci95'] * 100:.1f} %"
        for m in METHODS
    ]
    lines[1] += f"  ({last.device_own_classes * 100:.1f} % on its own classes)"
    return Outcome(figures=figures, lines=lines, files=files)


def _train_backbone(
    settings: RunnerSettings, o: Options, progress: Progress | None
) -> tuple[nn.Module, dict[str, Any]]:
    """A small protonet on training classes, for runs given no --backbone."""
    model = build_model(MODEL, seed=settings.seed)
    episodes = EpisodeOptions(ways=o.backbone_ways, shots=5, queries=5)
    stream = central_task(Path(data_root(settings.data_dir)), 5, settings.seed, split=o.split)(0)
    trainer = CentralTrainer(model, stream, episodes, halve_every=2000)
    clock, bar = CpuClock(settings.budget_minutes), Bar(progress, "backbone", o.backbone_episodes)
    while trainer.episodes < o.backbone_episodes and not clock.exhausted:
        with clock.counting():
            trainer.step()
        bar.advance()
    return model, {
        "model": MODEL,
        "trained_here": True,
        "episodes": trainer.episodes,
        "episode": episodes.model_dump(exclude={"local_episodes"}),
        "train_cpu_seconds": round(clock.seconds, 1),
        "last_100_episodes_loss": float(np.mean(trainer.losses[-100:])) if trainer.losses else None,
    }


def _plot(points: list[ReconPoint], o: Options, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    classes = [p.classes for p in points]
    labels = {
        "merged": "merged prototypes (fleet)",
        "device": f"each device alone (mean of {o.devices}, 95 % CI)",
        "central": f"central, {DRAWERS - o.queries} drawings a class (upper bound)",
    }
    for method in METHODS:
        values = np.array([getattr(p, method) for p in points]) * 100
        ci = np.array([getattr(p, f"{method}_ci95") for p in points]) * 100
        (line,) = ax.plot(classes, values, marker="o", markersize=3, label=labels[method])
        ax.fill_between(classes, values - ci, values + ci, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("classes seen by any device")
    ax.set_ylabel("accuracy on every class seen (%)")
    ax.set_title(
        f"omniglot-recon ({o.split} split): {o.devices} devices, {o.ways} new classes a mission, "
        f"{o.shots}-shot"
    )
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
