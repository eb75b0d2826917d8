"""Building occupancy learned online by a fleet of rooms (UCI Occupancy Detection).

`rooms` rooms each stream a contiguous block of the training week once, in time order,
`rows_per_round` rows a round (`tinyfleet.simulations.occupancy_online`). For each learner
(online logistic regression, class prototypes) the run reports every room alone, the federated
fleet (weights averaged by rows each round; prototypes merged by counts) and one central learner
streaming every training row, on ``datatest.txt`` and ``datatest2.txt``; the sensors come from a
validation rule on training rows only (or ``features=A+B``), and the same arms on all five sensors
are reported beside them. A logistic regression fitted offline on every training row is the
reference an online learner is measured against. No random choices: ``--seed`` changes nothing,
and the run takes seconds (``--budget-minutes`` does not apply).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator
from rich.progress import Progress

from tinyfleet.client.occupancy import (
    FEATURES,
    TEST_SETS,
    TRAINING,
    OccupancyRoomStream,
    load_table,
    load_test_sets,
    occupancy_path,
)
from tinyfleet.client.omniglot import data_root
from tinyfleet.common.strategy_options import Options as BaseOptions
from tinyfleet.simulations.occupancy_online import (
    LEARNERS,
    Fleet,
    Learner,
    Point,
    accuracy,
    batch_logistic,
    run_fleet,
    select_features,
)
from tinyfleet.simulations.prototype_runs import METRICS_FILE, Bar, MetricsLog, Outcome, RunnerSettings

PLOT_FILE = "occupancy.png"
#: Issue 12's targets, and the published figures they stand beside (Candanedo & Feldheim 2016:
#: logistic regression and random forest, the paper's best feature sets).
TARGETS = {"datatest.txt": 0.97, "datatest2.txt": 0.985}
PUBLISHED = {
    "logistic_regression": {"datatest.txt": 0.979, "datatest2.txt": 0.990},
    "random_forest": {"datatest.txt": 0.9505, "datatest2.txt": 0.9716},
}


class Options(BaseOptions):
    """Knobs of `sim run occupancy-online` (--option NAME=VALUE).

    Parameters
    ----------
    learners : "logistic,prototypes" (default: both)
    rooms : int (default: 5)
        Contiguous blocks the training week is cut into (``occupancy:room=N,rooms=R``).
    rows_per_round : int (default: 60)
        Rows each room streams between merges (a row a minute: an hour).
    lr : float (default: 0.5)
        Normalised SGD step of the logistic learner (the most a row's log-odds move per step; set
        before any run, mid-range of normalised LMS's stable (0, 2)).
    features : "auto" or sensors joined by "+" (default: "auto")
        "auto": the validation rule picks per learner; otherwise e.g. "Light+CO2" for both.
    validation_days : int (default: 3)
        24-hour blocks at the end of the training week the rule validates on.
    eval_every : int (default: 1)
        Rounds between points of the curves.
    """

    learners: tuple[Learner, ...] = LEARNERS
    rooms: int = Field(5, ge=1)
    rows_per_round: int = Field(60, ge=1)
    lr: float = Field(0.5, gt=0, lt=2)
    features: str = "auto"
    validation_days: int = Field(3, ge=1)
    eval_every: int = Field(1, ge=1)

    @field_validator("learners", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return tuple(a.strip() for a in value.split(",") if a.strip()) if isinstance(value, str) else value

    @field_validator("features")
    @classmethod
    def _known_sensors(cls, value: str) -> str:
        if value != "auto" and (not value or any(f not in FEATURES for f in value.split("+"))):
            raise ValueError(
                f"features must be 'auto' or sensors of {'+'.join(FEATURES)} joined by '+', got {value!r}"
            )
        return value


def run(settings: RunnerSettings, out: Path, progress: Progress | None) -> Outcome:
    o = settings.options
    assert isinstance(o, Options)
    root = data_root(settings.data_dir)
    training = load_table(str(occupancy_path(TRAINING, root)))
    tests = {name: (x.double().numpy(), y.numpy()) for name, (x, y) in load_test_sets(root).items()}
    log = MetricsLog(out / METRICS_FILE)
    bar = Bar(progress, "fleets", 2 * len(o.learners))  # each learner: chosen sensors, all five
    learners: dict[str, Any] = {}
    curves: dict[str, list[Point]] = {}
    for learner in o.learners:
        if o.features == "auto":
            selection = select_features(training, learner, o.lr, o.rows_per_round, o.validation_days)
            chosen, chosen_record = selection.features, selection.record()
        else:
            chosen = tuple(o.features.split("+"))
            chosen_record = {"chosen": list(chosen), "rule": "given (features=...)"}
        entry: dict[str, Any] = {"features": chosen_record}
        for which, features in (("chosen", chosen), ("all_five", FEATURES)):
            points: list[Point] = []

            def on_points(batch: list[Point], which: str = which, points: list[Point] = points) -> None:
                points.extend(batch)
                for p in batch:
                    log.add(
                        learner=p.learner,
                        features=which,
                        round=p.round,
                        rows=p.rows,
                        arm=p.arm,
                        test=p.test,
                        acc=p.acc,
                    )

            fleet = run_fleet(
                learner,
                features,
                root,
                training,
                tests,
                rooms=o.rooms,
                lr=o.lr,
                rows_per_round=o.rows_per_round,
                eval_every=o.eval_every,
                on_points=on_points,
            )
            entry[which] = _final(fleet, tests)
            bar.advance()
            if which == "chosen":
                curves[learner] = points
        if learner == "logistic":
            head, stats = batch_logistic(chosen, training)
            entry["offline_reference"] = {
                "what": "logistic regression fitted on every training row at once (L-BFGS), same sensors",
                **{name: accuracy(head, stats, x, y) for name, (x, y) in tests.items()},
            }
        learners[learner] = entry
    _plot(curves, learners, out / PLOT_FILE)
    rooms = [OccupancyRoomStream(r, o.rooms, root) for r in range(o.rooms)]
    figures = {
        "data": {
            "training_rows": len(training),
            "test_rows": {name: len(y) for name, (_, y) in tests.items()},
            "rooms": [
                {
                    "room": s.room,
                    "rows": len(s.y),
                    "occupied": int(s.y.sum()),
                    "start": int(s.seconds[0]),
                    "end": int(s.seconds[-1]),
                }
                for s in rooms
            ],
        },
        "protocol": {
            "stream": "each room streams its rows once, in time order; nothing is revisited",
            "federated": "logistic: rows-weighted average of the rooms' weights every round (FedAvg); "
            "prototypes: new rows merged by counts every round",
            "central": "one learner over every training row in time order, as many rows a round as the fleet",
            "rooms": o.rooms,
            "rows_per_round": o.rows_per_round,
        },
        "targets": TARGETS,
        "published": PUBLISHED,
        "learners": learners,
        "targets_met": {
            learner: {
                arm: all(entry["chosen"][arm][t] >= TARGETS[t] for t in TEST_SETS)
                for arm in ("federated", "central")
            }
            for learner, entry in learners.items()
        },
    }
    lines = [
        f"{learner:10} {arm:10} {'+'.join(entry['features']['chosen']):28} "
        + "  ".join(f"{t} {entry['chosen'][arm][t] * 100:5.2f} %" for t in TEST_SETS)
        for learner, entry in learners.items()
        for arm in ("federated", "central", "rooms_mean")
    ]
    return Outcome(figures=figures, lines=lines, files=[PLOT_FILE])


def _final(fleet: Fleet, tests: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Every arm's accuracy on each test set after the last round, and the rooms' mean."""
    final: dict[str, Any] = {
        arm: {name: accuracy(a.head, a.stats, x, y) for name, (x, y) in tests.items()}
        for arm, a in fleet.arms().items()
    }
    rooms = [arm for arm in final if arm.startswith("room-")]
    final["rooms_mean"] = {name: float(np.mean([final[r][name] for r in rooms])) for name in tests}
    final["rows"] = fleet.federated.rows
    final["rounds"] = fleet.round
    return final


def _plot(curves: dict[str, list[Point]], learners: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TEST_SETS), figsize=(12, 5), squeeze=False)
    for ax, test in zip(axes.flat, TEST_SETS, strict=True):
        for learner, points in curves.items():
            sensors = "+".join(learners[learner]["features"]["chosen"])
            for arm, style in (("federated", "-"), ("central", "--")):
                chosen = [p for p in points if p.arm == arm and p.test == test]
                ax.plot(
                    [p.rows for p in chosen],
                    [p.acc * 100 for p in chosen],
                    style,
                    label=f"{learner} {arm} ({sensors})",
                )
            rooms = learners[learner]["chosen"]["rooms_mean"][test] * 100
            ax.axhline(rooms, linestyle=":", color="grey", alpha=0.6)
            ax.annotate(f"{learner}: rooms alone, mean", (0, rooms), fontsize=7, color="grey")
        if "logistic" in learners:
            ax.axhline(
                learners["logistic"]["offline_reference"][test] * 100,
                color="black",
                linewidth=0.8,
                label="logistic regression, offline on all rows",
            )
        ax.axhline(TARGETS[test] * 100, linestyle=":", color="red", label="target")
        ax.set_title(f"occupancy-online: {test}")
        ax.set_xlabel("training rows streamed by the fleet")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(50, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
