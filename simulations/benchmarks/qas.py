"""Benchmark: int8 training with and without QAS against fp32, adapting a pretrained model to drift.

Each seed pretrains the zoo's sine MLP in fp32 on one sine task, then the task drifts (phase
+0.5..1 rad, amplitude x0.8..1.25) and the model adapts on the drifted stream with plain SGD
(batch 10) in three ways: fp32, int8 without QAS, int8 with QAS (common/quantized_training.py).
All three see the same pretrained weights, the same stream and the same number of steps; the
int8 models are converted with activation scales calibrated on pretraining inputs. The
figure is the held-out MSE on the drifted task over its amplitude^2 (1.0: predicting 0).

Each way gets its own learning rate, as in the paper's comparison: the one with the lowest mean
loss over separate tuning seeds, from one log-spaced grid shared by all three. Without QAS the
int8 graph's weights move by s_W^2 and its biases by (s_W s_x)^2 times an fp32 step, amounts that
differ by orders of magnitude between layers and channels, so the grid's best rate is a
compromise: slow for some, unstable for others. A diverged run (non-finite loss) is counted,
not averaged. No timing is involved, so the figures do not depend on the machine's load.

    python -m tinyfleet.simulations.benchmarks.qas --threads 1 --json benchmarks/results/qas.json
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tinyfleet.client.data_sources import SineStream
from tinyfleet.common.models import build_model
from tinyfleet.common.quantized_training import Int8SGD, to_int8_training
from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

METHODS = ("fp32", "int8", "int8 + QAS")
#: Learning rates tried for every method: 10^-3 .. 10^4, three per decade.
LR_GRID = tuple(round(10 ** (k / 3), 6) for k in range(-9, 13))
BATCH = 10
PRETRAIN_STEPS = 1000
HOLDOUT = 100
#: Pretraining inputs the int8 conversion calibrates activation scales on, as post-training
#: quantisation does before deployment (the drifted stream's first batch, 10 samples, leaves
#: inputs beyond its extremes saturated).
CALIBRATION = 200
#: Seeds for choosing learning rates, kept apart from the reported ones.
TUNING_SEEDS = (1000, 1001, 1002, 1003)


@dataclass(frozen=True)
class Drift:
    """A pretrained model and the drifted task it must adapt to."""

    model: nn.Module
    calibration: torch.Tensor  # pretraining inputs that set the int8 activation scales
    seed: int
    amplitude: float
    phase: float

    def stream(self) -> SineStream:
        """The drifted task's stream from its start: every method sees the same samples."""
        return SineStream(self.seed, amplitude=self.amplitude, phase=self.phase)


def pretrained(seed: int) -> Drift:
    """Pretrain the sine MLP in fp32 (Adam) on seed's task, then drift the task."""
    source = SineStream(seed)
    model = build_model("sine-mlp", seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(PRETRAIN_STEPS):
        x, y = source.next(25)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    calibration, _ = source.next(CALIBRATION)
    drift = torch.Generator().manual_seed(seed * 7919 + 3)
    scale, shift = torch.rand(2, generator=drift, dtype=torch.float64).tolist()
    return Drift(
        model,
        calibration,
        seed + 1,  # its own inputs and holdout, not the pretraining ones
        amplitude=source.task.amplitude * (0.8 + 0.45 * scale),
        phase=source.task.phase + 0.5 + 0.5 * shift,
    )


def relative_loss(model: nn.Module, stream: SineStream) -> float:
    x, y = stream.holdout(HOLDOUT)
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y)) / stream.task.amplitude**2


def adapt(drift: Drift, method: str, lr: float, steps: int) -> float:
    """The relative held-out loss after `steps` SGD steps on the drifted stream (inf: diverged)."""
    stream = drift.stream()
    optimizer: torch.optim.SGD | Int8SGD
    if method == "fp32":
        model = copy.deepcopy(drift.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    else:
        model = to_int8_training(drift.model, drift.calibration)
        optimizer = Int8SGD(model, lr=lr, qas=method == "int8 + QAS")
    for _ in range(steps):
        x, y = stream.next(BATCH)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    loss = relative_loss(model, stream)
    return loss if math.isfinite(loss) else math.inf


def summary(losses: Sequence[float]) -> dict[str, Any]:
    finite = [loss for loss in losses if math.isfinite(loss)]
    return {
        "mean": statistics.mean(finite) if finite else None,
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
        "median": statistics.median(finite) if finite else None,
        "diverged": len(losses) - len(finite),
        "per_seed": [loss if math.isfinite(loss) else None for loss in losses],
    }


def tune(method: str, drifts: Sequence[Drift], steps: int) -> float:
    """The grid's learning rate with the lowest mean loss over the tuning drifts (diverging: inf)."""
    return min(LR_GRID, key=lambda lr: statistics.mean(adapt(d, method, lr, steps) for d in drifts))


def run(seeds: Sequence[int], steps: int) -> dict[str, Any]:
    tuning = [pretrained(seed) for seed in TUNING_SEEDS]
    drifts = [pretrained(seed) for seed in seeds]
    methods: dict[str, Any] = {}
    for method in METHODS:
        lr = tune(method, tuning, steps)
        methods[method] = {"lr": lr, **summary([adapt(d, method, lr, steps) for d in drifts])}
    before = summary([relative_loss(d.model, d.stream()) for d in drifts])
    return {"before_adaptation": before, "methods": methods}


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=8, help="reported seeds (0..N-1)")
    parser.add_argument("--steps", type=int, default=200, help="SGD steps of adaptation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    watch = RunWatch()
    figures = run(range(args.seeds), args.steps)
    table = Table(
        title=f"Sine MLP adapting to drift: held-out MSE / amplitude^2 after {args.steps} SGD steps, "
        f"{args.seeds} seeds (before adapting: {_figure(figures['before_adaptation']['mean'])})"
    )
    for column in ("training", "lr (tuned)", "mean", "std", "median", "diverged"):
        table.add_column(column, justify="left" if column == "training" else "right")
    for name, f in figures["methods"].items():
        figures_row = (_figure(f[key]) for key in ("mean", "std", "median"))
        table.add_row(name, f"{f['lr']:g}", *figures_row, str(f["diverged"]))
    Console().print(table)
    if args.json:
        config = {
            "model": "sine-mlp", "seeds": args.seeds, "steps": args.steps, "batch": BATCH,
            "threads": args.threads, "pretrain_steps": PRETRAIN_STEPS, "lr_grid": list(LR_GRID),
            "tuning_seeds": list(TUNING_SEEDS),
        }
        record = watch.record(module_command(__spec__.name, argv), {"config": config, **figures})
        write_results(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
