"""Benchmark: sparse-update fine-tuning, its peak training memory (modelled and measured) and accuracy.

Three fine-tuning tasks, each from a briefly pretrained model (nothing is cached):

- occupancy: the zoo's occupancy MLP pretrained on the first two thirds of the training week
  (standardised readings), fine-tuned on the last third (another stretch of days: a room of its
  own), accuracy on datatest.txt;
- keywords: the zoo's keyword embedding with a linear head, pretrained as a classifier of the
  20 seen words (sorted words, every third unseen, as `sim run keywords-proto`), then a fresh
  10-way head fine-tuned on the unseen words' stream clips, accuracy on clips of held-out speakers;
- omniglot: conv4 pretrained as a classifier of background characters, then a fresh 5-way head
  fine-tuned on 5-way tasks of evaluation characters (stream drawers 0-14), accuracy on drawers
  15-19, averaged over tasks.

Every plan starts from the same weights and head and sees the same batches (plain SGD, batch 8,
one learning rate per task). Plans: full backprop, last layer only, biases only, and the planner
(`plan_for_budget`, later layers first) at 64, 128 and 256 KB. Memory is what training adds to
the frozen model (trained weights, gradients, optimizer state, activations kept for backward);
modelled by `common.memory_model.estimate`, measured by `client.sparse_training.measure_step` in a
fresh process per model (its tensor hooks count what autograd keeps, so another process is not
needed for correctness; it keeps the measured models apart from the trained ones, as the memory
model's test does).

    python -m tinyfleet.simulations.benchmarks.sparse_update --threads 1 \
        --json benchmarks/results/sparse_update.json
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from tinyfleet.client.keywords import KeywordStream, list_words, word_features
from tinyfleet.client.occupancy import TRAINING, load_table, load_test_sets, occupancy_path
from tinyfleet.client.omniglot import HELD_BACK_DRAWERS, STREAM_DRAWERS, OmniglotSplit, data_root, images_of
from tinyfleet.client.sparse_training import train_steps
from tinyfleet.common.memory_model import estimate, plan_for_budget
from tinyfleet.common.models import KeywordsProtoNet, OmniglotConv4, occupancy_mlp
from tinyfleet.common.update_plan import PlanError, UpdatePlan, standard_plan
from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

BATCH = 8
BUDGETS_KB = (64, 128, 256)
KB = 1024
KEYWORD_WAYS = 10
OMNIGLOT_WAYS = 5
OMNIGLOT_PRETRAIN_CLASSES = 200


def architecture(task: str) -> nn.Module:
    """The fine-tuned model's layers (weights aside): what memory is modelled and measured on."""
    if task == "occupancy":
        return occupancy_mlp()
    if task == "keywords":
        return nn.Sequential(KeywordsProtoNet(), nn.Linear(64, KEYWORD_WAYS))
    if task == "omniglot":
        return OmniglotConv4(ways=OMNIGLOT_WAYS)
    raise ValueError(f"unknown task {task!r}; known: occupancy, keywords, omniglot")


SAMPLE_SHAPES = {"occupancy": (5,), "keywords": (1, 40, 101), "omniglot": (1, 28, 28)}
TASKS = tuple(SAMPLE_SHAPES)


#: A model to fine-tune, its batches, its test inputs and labels.
Episode = tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]


@dataclass
class FineTuning:
    """A pretrained model with its fresh head, and the data to fine-tune and test it on (one or more
    episodes: Omniglot's tasks each have their own data and head)."""

    task: str
    lr: float
    episodes: list[Episode]


def _pretrain(model: nn.Module, draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int,
              lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x, y = draw()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _batches(x: torch.Tensor, y: torch.Tensor, steps: int, rng: np.random.Generator
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    picks = [torch.from_numpy(rng.integers(len(y), size=BATCH)) for _ in range(steps)]
    return [(x[p], y[p]) for p in picks]


def occupancy(pretrain_steps: int, steps: int, seed: int) -> FineTuning:
    table = load_table(str(occupancy_path(TRAINING)))
    split = 2 * len(table) // 3
    mean, std = table.readings[:split].mean(0), table.readings[:split].std(0)
    x, y = (table.readings - mean) / std, table.occupied
    rng = np.random.default_rng(seed)
    model = occupancy_mlp()
    _pretrain(model, lambda: _pick(x[:split], y[:split], rng, 64), pretrain_steps, 3e-3)
    test_x, test_y = load_test_sets()["datatest.txt"]
    episode = (model, _batches(x[split:], y[split:], steps, rng), (test_x - mean) / std, test_y)
    return FineTuning("occupancy", 0.05, [episode])


def _pick(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, n: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.from_numpy(rng.integers(len(y), size=n))
    return x[p], y[p]


def keywords(pretrain_steps: int, steps: int, seed: int) -> FineTuning:
    root = str(data_root())
    ordered = sorted(list_words(root))
    unseen = ordered[2::3][:KEYWORD_WAYS]
    seen = [w for w in ordered if w not in unseen]
    features = [word_features(root, w)[1] for w in seen]
    x = torch.cat(features)
    y = torch.cat([torch.full((len(f),), i) for i, f in enumerate(features)])
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    backbone = KeywordsProtoNet()
    _pretrain(nn.Sequential(backbone, nn.Linear(64, len(seen))), lambda: _pick(x, y, rng, 32), pretrain_steps,
              3e-3)
    stream = KeywordStream(unseen, seed, holdout=3, root=data_root())
    batches = [stream.next(BATCH) for _ in range(steps)]
    test_x, test_y = stream.holdout(3 * len(unseen))
    model = nn.Sequential(backbone, nn.Linear(64, len(unseen)))
    return FineTuning("keywords", 0.05, [(model, batches, test_x, test_y)])


def omniglot(pretrain_steps: int, steps: int, seed: int, tasks: int) -> FineTuning:
    root = str(data_root())
    split = OmniglotSplit("alphabets")
    rng = np.random.default_rng(seed)
    train_images = split.images("train", root)
    pool = rng.choice(split.train_classes(), OMNIGLOT_PRETRAIN_CLASSES, replace=False)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(len(pool), size=32)
        drawers = rng.choice(np.array(STREAM_DRAWERS), size=32)
        return images_of(train_images, pool, labels, drawers), torch.from_numpy(labels)

    torch.manual_seed(seed)
    pretrained = OmniglotConv4(ways=OMNIGLOT_PRETRAIN_CLASSES)
    _pretrain(pretrained, draw, pretrain_steps, 3e-3)
    test_images = split.images("test", root)
    episodes: list[Episode] = []
    for _ in range(tasks):
        classes = rng.choice(split.test_classes(), OMNIGLOT_WAYS, replace=False)
        labels = np.repeat(np.arange(OMNIGLOT_WAYS), len(STREAM_DRAWERS))
        drawers = np.tile(np.array(STREAM_DRAWERS), OMNIGLOT_WAYS)
        x = images_of(test_images, classes, labels, drawers)
        test_labels = np.repeat(np.arange(OMNIGLOT_WAYS), len(HELD_BACK_DRAWERS))
        test_drawers = np.tile(np.array(HELD_BACK_DRAWERS), OMNIGLOT_WAYS)
        test_x = images_of(test_images, classes, test_labels, test_drawers)
        model = copy.deepcopy(pretrained)
        model.head = nn.Linear(model.head.in_features, OMNIGLOT_WAYS)
        episodes.append((model, _batches(x, torch.from_numpy(labels), steps, rng), test_x,
                         torch.from_numpy(test_labels)))
    return FineTuning("omniglot", 0.05, episodes)


def plans(task: str) -> dict[str, UpdatePlan | str]:
    """Plan by row name; a budget no plan fits is the planner's refusal (text)."""
    model = architecture(task)
    out: dict[str, UpdatePlan | str] = {
        name: standard_plan(name, model) for name in ("full", "last-layer", "biases")
    }
    for kb in BUDGETS_KB:
        try:
            out[f"planner {kb} KB"] = plan_for_budget(model, kb * KB, SAMPLE_SHAPES[task], batch=BATCH)[0]
        except PlanError as exc:
            out[f"planner {kb} KB"] = str(exc)
    return out


def accuracy(setup: FineTuning, plan: UpdatePlan) -> float:
    """Mean test accuracy over the setup's episodes after fine-tuning a copy of each under `plan`."""
    correct = total = 0
    for pretrained, batches, test_x, test_y in setup.episodes:
        model = copy.deepcopy(pretrained)
        model.train()
        train_steps(model, plan, batches, F.cross_entropy, "sgd", setup.lr)
        with torch.no_grad():
            correct += int((model(test_x).argmax(1) == test_y).sum())
        total += len(test_y)
    return correct / total


# One process per model: one planned step per plan, measured as tests/test_memory_model.py does.
MEASURE = """
import json, sys, torch
import torch.nn.functional as F
from tinyfleet.client.sparse_training import measure_step
from tinyfleet.common.update_plan import UpdatePlan
from tinyfleet.simulations.benchmarks.sparse_update import BATCH, SAMPLE_SHAPES, architecture
task, plans = json.loads(sys.stdin.read())
torch.manual_seed(0)
model = architecture(task)
model.train()
x = torch.randn(BATCH, *SAMPLE_SHAPES[task])
with torch.no_grad():
    classes = model(x).shape[1]
y = torch.randint(0, classes, (BATCH,))
print(json.dumps([measure_step(model, UpdatePlan.from_json(p), x, y, F.cross_entropy).total for p in plans]))
"""


def measured(task: str, plan_list: list[UpdatePlan], threads: int) -> list[int]:
    code = f"import torch; torch.set_num_threads({threads})\n" + MEASURE
    request = json.dumps([task, [p.to_json() for p in plan_list]])
    done = subprocess.run([sys.executable, "-c", code], input=request, capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {task} in a fresh process failed: {done.stderr.strip()[-2000:]}")
    return [int(v) for v in json.loads(done.stdout)]


def run(quick: bool, threads: int, seed: int = 0) -> dict[str, Any]:
    pretrain, steps, tasks = (60, 40, 1) if quick else (400, 150, 4)
    setups = {
        "occupancy": lambda: occupancy(pretrain, steps, seed),
        "keywords": lambda: keywords(pretrain, steps, seed),
        "omniglot": lambda: omniglot(pretrain, steps, seed, tasks),
    }
    results: dict[str, Any] = {}
    for task, setup_of in setups.items():
        model = architecture(task)
        by_name = plans(task)
        usable = {name: plan for name, plan in by_name.items() if isinstance(plan, UpdatePlan)}
        measures = dict(zip(usable, measured(task, list(usable.values()), threads), strict=True))
        setup = setup_of()
        rows: dict[str, Any] = {}
        for name, plan in by_name.items():
            if not isinstance(plan, UpdatePlan):
                rows[name] = {"refused": plan}
                continue
            modelled = estimate(model, plan, SAMPLE_SHAPES[task], BATCH).training
            rows[name] = {
                "plan": json.loads(plan.to_json()),
                "modelled_bytes": modelled,
                "measured_bytes": measures[name],
                "modelled_over_measured": round(modelled / measures[name], 4),
                "accuracy": round(accuracy(setup, plan), 4),
            }
        full = rows["full"]
        top = rows[f"planner {BUDGETS_KB[-1]} KB"]
        target = None
        if "measured_bytes" in top:
            target = {
                "memory_fraction_of_full": round(top["measured_bytes"] / full["measured_bytes"], 4),
                "accuracy_points_below_full": round(100 * (full["accuracy"] - top["accuracy"]), 2),
            }
            fits = full["measured_bytes"] <= BUDGETS_KB[-1] * KB  # the planner then trains everything
            target["met"] = "full backprop fits the budget" if fits else (
                target["memory_fraction_of_full"] <= 0.25 and target["accuracy_points_below_full"] <= 2)
        results[task] = {"plans": rows, "planner_256kb_vs_full": target}
    return results


def _kb(value: int) -> str:
    return f"{value / KB:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short pretraining and fine-tuning (tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    watch = RunWatch()
    figures = run(args.quick, args.threads)
    table = Table(title=f"Sparse-update fine-tuning, batch {BATCH}, SGD: training memory (KB) and accuracy")
    for column in ("task", "plan", "modelled KB", "measured KB", "model/measured", "accuracy"):
        table.add_column(column, justify="left" if column in ("task", "plan") else "right")
    for task, result in figures.items():
        for name, row in result["plans"].items():
            if "refused" in row:
                table.add_row(task, name, "-", "-", "-", row["refused"])
                continue
            table.add_row(task, name, _kb(row["modelled_bytes"]), _kb(row["measured_bytes"]),
                          f"{row['modelled_over_measured']:.3f}", f"{100 * row['accuracy']:.1f} %")
    console = Console(width=120)
    console.print(table)
    for task, result in figures.items():
        console.print(f"{task}: planner at 256 KB vs full backprop: {result['planner_256kb_vs_full']}")
    if args.json:
        config = {"batch": BATCH, "optimizer": "sgd", "budgets_kb": list(BUDGETS_KB), "quick": args.quick,
                  "threads": args.threads, "keyword_ways": KEYWORD_WAYS, "omniglot_ways": OMNIGLOT_WAYS}
        record = watch.record(module_command(__spec__.name, argv), {"config": config, "tasks": figures})
        write_results(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
