"""Benchmark: CPU time of one inner training step of the Omniglot net, against the plain setup.

A step is what every FedReptile round repeats on a device: forward, backward and
an Adam update of the 4x64 conv net on a batch of 10 images. Two things change
its cost on CPU, and each variant runs in its own process (the allocator setting
cannot be undone inside one):

* activations NCHW (PyTorch's default) or channels-last (what the zoo model does),
* glibc's default malloc, which returns freed activation buffers to the OS so the
  next step faults them in again, or `keep_freed_memory()` (what `sim run` and
  the agent do).

Variants run in turn, several times, so a busy machine slows them alike; the
table shows the median CPU time per step, page faults per step and the speed-up
over the plain setup measured in the same run.

    python -m tinyfleet.simulations.benchmarks.train_step --json benchmarks/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tinyfleet.simulations.benchmarks.results_file import RunWatch, module_command, write_results

VARIANTS = {  # name -> (channels-last activations, keep freed buffers)
    "plain (NCHW, default malloc)": (False, False),
    "channels-last": (True, False),
    "kept buffers": (False, True),
    "channels-last + kept buffers (tinyfleet)": (True, True),
}
REFERENCE = "plain (NCHW, default malloc)"

WORKER = """
import json, resource, sys, time
import torch
from torch import nn
from tinyfleet.common.allocator import keep_freed_memory
from tinyfleet.common.models import build_model

channels_last, kept, steps, threads, batch = json.loads(sys.argv[1])
torch.set_num_threads(threads)
if kept:
    assert keep_freed_memory(), "mallopt refused"
model = build_model("omniglot-conv4", seed=0, ways=5)
if not channels_last:
    model.features[0].__class__ = nn.Conv2d  # the first conv's output stays NCHW, as do the rest
opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 5, (batch,))

def step():
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()

for _ in range(10):
    step()
faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
for _ in range(steps):
    step()
cpu = time.process_time() - cpu
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"ms_per_step": 1000 * cpu / steps, "faults_per_step": faults / steps}))
"""


def measure(channels_last: bool, kept: bool, steps: int, threads: int, batch: int) -> dict[str, float]:
    params = json.dumps([channels_last, kept, steps, threads, batch])
    done = subprocess.run(
        [sys.executable, "-c", WORKER, params], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(repeats: int, steps: int, threads: int, batch: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with Progress(transient=True) as progress:
        task = progress.add_task("train steps", total=repeats * len(VARIANTS))
        for _ in range(repeats):
            for name, (channels_last, kept) in VARIANTS.items():
                samples[name].append(measure(channels_last, kept, steps, threads, batch))
                progress.advance(task)
    figures = {
        name: {
            "ms_per_step_median": statistics.median(s["ms_per_step"] for s in runs),
            "ms_per_step_min": min(s["ms_per_step"] for s in runs),
            "page_faults_per_step": statistics.median(s["faults_per_step"] for s in runs),
        }
        for name, runs in samples.items()
    }
    reference = figures[REFERENCE]["ms_per_step_median"]
    for entry in figures.values():
        entry["speedup_over_plain"] = reference / entry["ms_per_step_median"]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each variant, taken in turn")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--batch", type=int, default=10, help="images per step (FedReptile's inner batch)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    watch = RunWatch()
    figures = run(args.repeats, args.steps, args.threads, args.batch)
    table = Table(title=f"Omniglot conv net, one Adam step on {args.batch} images, {args.threads} thread(s)")
    for column in ("variant", "CPU ms / step (median)", "min", "page faults / step", "vs plain"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, f in figures.items():
        table.add_row(
            name,
            f"{f['ms_per_step_median']:.2f}",
            f"{f['ms_per_step_min']:.2f}",
            f"{f['page_faults_per_step']:.0f}",
            f"{f['speedup_over_plain']:.2f}x",
        )
    Console().print(table)
    if args.json:
        config = {"repeats": args.repeats, "steps": args.steps, "threads": args.threads, "batch": args.batch}
        record = watch.record(module_command(__spec__.name, argv), {"config": config, "variants": figures})
        write_results(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
