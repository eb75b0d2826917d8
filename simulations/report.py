"""What a simulation run leaves behind: metrics.csv, summary.json, PNG plots and the learned models.

summary.json is also the run's results file: it starts with the command, date and machine (as
every benchmark's JSON does), so a copy in benchmarks/results/ can feed the README's table.
Each arm's final model is written as `models/<arm>.arrays`: a Flower ArrayRecord
in Flower's serde, the same encoding the coordinator stores round artifacts in,
so a model learned in simulation can be read back with
`tinyfleet.common.flower_adapter.array_record_from_bytes`.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from tinyfleet.common.atomic_files import write_atomically
from tinyfleet.common.flower_adapter import array_record_to_bytes
from tinyfleet.server.artifacts import sha256_hex
from tinyfleet.simulations.benchmarks.results_file import RunWatch, write_results
from tinyfleet.simulations.experiment import Experiment, Row

MODELS_DIR = "models"


def write_outputs(experiment: Experiment, out: Path, command: str, watch: RunWatch) -> dict[str, Any]:
    """Every output; `command` is the run's command line and `watch` was started with it."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(experiment.rows, out / "metrics.csv")
    models = write_models(experiment, out / MODELS_DIR)
    summary = watch.record(command, summarize(experiment))
    summary["machine"].update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    for arm, model in models.items():
        summary["arms"][arm]["model"] = model
    write_results(out / "summary.json", summary)
    plot(experiment, out)
    return summary


def write_csv(rows: list[Row], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def write_models(experiment: Experiment, folder: Path) -> dict[str, dict[str, Any]]:
    """Each finished arm's model; returns {arm: {file, bytes, sha256}} for summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, Any]] = {}
    for arm, result in experiment.results.items():
        if result.model is None:
            continue
        blob = array_record_to_bytes(result.model)
        write_atomically(folder / f"{arm}.arrays", blob)
        written[arm] = {"file": f"{MODELS_DIR}/{arm}.arrays", "bytes": len(blob), "sha256": sha256_hex(blob)}
    return written


def final_rows(experiment: Experiment) -> dict[str, dict[str, Row]]:
    """The last meta-test of each arm and test (the one over all tasks)."""
    last: dict[str, dict[str, Row]] = {}
    for row in experiment.rows:
        last.setdefault(row.arm, {})[row.test] = row
    return last


def summarize(experiment: Experiment) -> dict[str, Any]:
    scenario = experiment.scenario
    metric = scenario.main_metric
    finals = final_rows(experiment)
    arms: dict[str, Any] = {}
    for arm, tests in finals.items():
        result = experiment.results.get(arm)
        entry: dict[str, Any] = {
            "rounds_done": result.rounds_done if result else 0,
            "train_cpu_seconds": round(result.train_seconds, 2) if result else 0.0,
            "meta_test": {
                name: {k: v for k, v in asdict(row).items() if k not in ("arm", "test") and v is not None}
                for name, row in tests.items()
            },
        }
        if result and result.round_bytes:
            entry["bytes_per_round_mean"] = statistics.fmean(result.round_bytes)
            entry["bytes_per_round_median"] = statistics.median(result.round_bytes)
            entry["bytes_up_per_round_mean"] = statistics.fmean(result.up_bytes)
            entry["bytes_down_per_round_mean"] = (
                entry["bytes_per_round_mean"] - entry["bytes_up_per_round_mean"]
            )
            entry["bytes_total"] = result.bytes_down + result.bytes_up
        arms[arm] = entry
    summary: dict[str, Any] = {
        "scenario": scenario.name,
        "model": scenario.model,
        "main_metric": metric,
        "config": experiment.settings_dict(),
        "meta_test_protocol": {
            "steps": scenario.eval_steps,
            "lr": scenario.eval_lr,
            "optimizer": experiment.protocol.optimizer,
            "tasks": {n: len(t) for n, t in scenario.meta_tests.items()},
        },
        "arms": arms,
    }
    if "fedreptile" in arms and "fedreptile-dense" in arms:
        summary["communication"] = communication(arms["fedreptile"], arms["fedreptile-dense"], metric)
    return summary


def communication(compressed: dict[str, Any], dense: dict[str, Any], metric: str) -> dict[str, Any]:
    """Bytes saved by compression and what it cost in meta-test quality."""
    out: dict[str, Any] = {
        "round_bytes_ratio_dense_over_compressed": dense["bytes_per_round_mean"]
        / compressed["bytes_per_round_mean"],
        "round_bytes_ratio_median": dense["bytes_per_round_median"] / compressed["bytes_per_round_median"],
        "uplink_bytes_ratio": dense["bytes_up_per_round_mean"] / compressed["bytes_up_per_round_mean"],
        "downlink_bytes_ratio": dense["bytes_down_per_round_mean"] / compressed["bytes_down_per_round_mean"],
    }
    for name, row in compressed["meta_test"].items():
        c, d = row[metric], dense["meta_test"][name][metric]
        out[f"{name}:{metric}:compressed"] = c
        out[f"{name}:{metric}:dense"] = d
        out[f"{name}:{metric}:relative_change"] = (c - d) / d if d else None
    return out


def plot(experiment: Experiment, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = list(experiment.scenario.meta_tests)
    classification = any(r.acc_after is not None for r in experiment.rows)
    metrics = [("loss_after", "meta-test loss after adaptation")]
    if classification:
        metrics.append(("acc_after", "meta-test accuracy after adaptation"))
    fig, axes = plt.subplots(
        len(metrics), len(tests), figsize=(6 * len(tests), 4 * len(metrics)), squeeze=False
    )
    subset = experiment.settings.eval_tasks
    for i, (key, label) in enumerate(metrics):
        for j, test in enumerate(tests):
            ax = axes[i][j]
            for arm in dict.fromkeys(r.arm for r in experiment.rows):
                rows = [r for r in experiment.rows if r.arm == arm and r.test == test]
                final = rows[-1]
                if arm == "random":
                    ax.axhline(
                        getattr(final, key),
                        linestyle="--",
                        color="grey",
                        label=f"random init ({final.tasks} tasks)",
                    )
                    continue
                curve = [(r.round, getattr(r, key)) for r in rows if r.tasks == min(subset, final.tasks)]
                (line,) = ax.plot(
                    *zip(*curve, strict=True),
                    marker="o",
                    markersize=3,
                    label=f"{arm} ({min(subset, final.tasks)} tasks)",
                )
                if final.tasks > subset:
                    ci = getattr(final, key + "_ci95")
                    ax.errorbar(
                        [final.round],
                        [getattr(final, key)],
                        yerr=[ci],
                        marker="*",
                        markersize=10,
                        color=line.get_color(),
                        capsize=3,
                        linestyle="none",
                        label=f"{arm} final ({final.tasks} tasks, 95 % CI)",
                    )
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            ax.set_title(f"{experiment.scenario.name}: {test}")
            if key == "loss_after" and not classification:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "meta_test.png", dpi=120)
    plt.close(fig)

    federated = [a for a, r in experiment.results.items() if r.round_bytes]
    if not federated:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm in federated:
        result = experiment.results[arm]
        ax.plot(range(1, len(result.round_bytes) + 1), result.round_bytes, linewidth=0.6, label=arm)
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel("bytes per round (train messages, both ways)")
    ax.set_title(f"{experiment.scenario.name}: communication")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes_per_round.png", dpi=120)
    plt.close(fig)
