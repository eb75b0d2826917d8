"""`tinyfleet sim ...`: simulated fleets on this machine."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from tinyfleet.simulations.experiment import Experiment, Row

RUN_EXAMPLES = """examples:
  tinyfleet sim run sine-reptile --out runs/sine              # 20 devices, serial FedReptile + baselines
  tinyfleet sim run sine-reptile --out runs/sine-tmf --top-p 0.1 --quantize int8 --compress-downlink
  tinyfleet sim run sine-reptile --out runs/quick --rounds 500 --eval-every 100 --arms fedreptile,random
  tinyfleet sim run omniglot-reptile --out runs/omni-mb5 --parallel --fraction 0.5 --epsilon 1 --workers 2
  tinyfleet sim run omniglot-reptile --out runs/omni --budget-minutes 10 --data-dir ../shared/data

A run checkpoints itself into --out every --checkpoint-every rounds (default: at every
meta-test); a run that was stopped goes on with `tinyfleet sim resume runs/omni`.
FedReptile options left out take the scenario's values (its OPTIONS: ε schedule, inner loop),
else FedReptileOptions' defaults; --option NAME=VALUE sets any of them (e.g. --option
visit_order=random). summary.json records the full configuration used. Omniglot reads
omniglot/images_*.npz from --data-dir, else $TINYFLEET_DATA, else ../shared/data next to the project.
"""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from tinyfleet.cli import HelpFormatter

    sim = subparsers.add_parser(
        "sim",
        help="simulated fleets: meta-learning experiments and demos",
        description="Run simulated fleets in this process (SimGrid: every message really serialized).",
        epilog="examples:\n  tinyfleet sim run sine-reptile --out runs/sine\n",
        formatter_class=HelpFormatter,
    )
    sim.set_defaults(group_parser=sim)
    commands = sim.add_subparsers(dest="sim_command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a meta-learning scenario with its baselines; writes metrics.csv, summary.json, plots",
        description="Run FedReptile on a simulated fleet and meta-test it against random init, "
        "FedAvg and centralised Reptile in the same run.",
        epilog=RUN_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    run.add_argument(
        "scenario",
        choices=[
            "sine-reptile",
            "omniglot-reptile",
            "omniglot-protonet",
            "omniglot-recon",
            "keywords-proto",
            "occupancy-online",
        ],
    )
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument("--rounds", type=int, help="training rounds per arm")
    run.add_argument("--seed", type=int, default=0, help="seed of data, sampling and initial weights")
    run.add_argument("--devices", type=int, help="simulated devices")
    # FedReptile options: each dest is a FedReptileOptions field, checked there and named in any error
    run.add_argument("--epsilon", help="meta step size ε (initial value when linear)")
    run.add_argument("--epsilon-final", help="ε at the end of a linear schedule")
    run.add_argument("--epsilon-schedule", help="constant or linear")
    run.add_argument(
        "--parallel",
        dest="serial",
        action="store_const",
        const=False,
        help="sample --fraction of devices per round (default: one device per round, serial)",
    )
    run.add_argument("--fraction", dest="fraction_train", help="share of devices per parallel round")
    run.add_argument("--visit-order", help="serial rounds: round-robin or random")
    run.add_argument("--inner-steps", help="device optimizer steps per round")
    run.add_argument("--inner-lr", help="device learning rate")
    run.add_argument("--inner-batch", help="samples per device step")
    run.add_argument("--inner-optimizer", help="sgd or adam")
    run.add_argument(
        "--inner-samples", help="steps cycle over this many recent samples (0: a fresh batch every step)"
    )
    run.add_argument(
        "--fresh-optimizer",
        dest="keep_optimizer_state",
        action="store_const",
        const=False,
        help="start the inner optimizer afresh every round (default: keep Adam's moments, as Reptile does)",
    )
    run.add_argument("--local-layers", help="comma-separated layer names kept on the devices (e.g. head)")
    run.add_argument("--reconstruct-steps", help="steps rebuilding local layers before adapting")
    run.add_argument("--top-p", help="fraction of the update sent (0.1 = top 10 %%)")
    run.add_argument("--quantize", help="none or int8")
    run.add_argument(
        "--compress-downlink",
        action="store_const",
        const=True,
        help="also send devices compressed deltas against their copy of the model, and the static "
        "config only when (re)syncing that copy",
    )
    run.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other FedReptile option (a field of FedReptileOptions, e.g. visit_order=random); "
        "repeatable",
    )
    run.add_argument("--eval-every", type=int, help="rounds between meta-tests")
    run.add_argument("--eval-tasks", type=int, help="tasks per intermediate meta-test")
    run.add_argument("--final-eval-tasks", type=int, help="tasks in the final meta-test")
    run.add_argument("--arms", help="comma-separated arms: fedreptile,fedreptile-dense,fedavg,central,random")
    run.add_argument(
        "--budget-minutes", type=float, help="stop an arm once its training CPU time exceeds this"
    )
    run.add_argument("--data-dir", help="folder holding omniglot/ (omniglot-reptile)")
    run.add_argument(
        "--split",
        choices=["alphabets", "characters"],
        help="Omniglot scenarios: train on 30 background alphabets and test on the 20 others (default), "
        "or the papers' split of 1200 training characters and the rest with rotations",
    )
    run.add_argument(
        "--backbone",
        help="a trained model (.arrays): the embedding omniglot-recon uses, or one omniglot-protonet "
        "tests beside its arms (e.g. a FedReptile model of omniglot-reptile)",
    )
    run.add_argument("--ways", type=int, help="classes per task (omniglot-reptile)")
    run.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    run.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes running the simulated devices, one torch thread each, so the devices of a "
        "--parallel round train on several cores (default 0: in this process; the numbers are those "
        "of an in-process run with --threads 1)",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        help="rounds between checkpoints in --out (default: every meta-test; 0: only when an arm ends)",
    )
    run.set_defaults(func=run_command)

    resume = commands.add_parser(
        "resume",
        help="go on with a stopped `sim run` from its last checkpoint",
        description="Continue a run from the checkpoint in its output directory: finished arms are "
        "kept, the arm under way goes on from its last checkpointed round, and the outputs are the "
        "same as if the run had never stopped.",
        epilog="examples:\n  tinyfleet sim resume runs/omni\n"
        "  tinyfleet sim resume runs/omni --threads 1 --budget-minutes 300\n",
        formatter_class=HelpFormatter,
    )
    resume.add_argument("out", type=Path, help="the stopped run's --out directory")
    resume.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    resume.add_argument(
        "--budget-minutes", type=float, help="new CPU budget per arm for the arms not finished yet"
    )
    resume.set_defaults(func=resume_command)


def _prepare(threads: int | None) -> None:
    import torch

    from tinyfleet.common.allocator import keep_freed_memory

    keep_freed_memory()  # a conv step faulted its activations in anew (benchmarks/results/train_step.json)
    if threads:
        torch.set_num_threads(threads)


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyfleet.simulations.checkpoint import FILE_NAME
    from tinyfleet.simulations.experiment import ARMS, Experiment, RunSettings, fedreptile_options
    from tinyfleet.simulations.scenarios import scenario_module

    console = Console(stderr=True)
    _prepare(args.threads)
    module = scenario_module(args.scenario)
    if hasattr(module, "run"):  # not a FedReptile experiment: the scenario runs itself
        from tinyfleet.simulations.prototype_runs import run_scenario

        return run_scenario(module, args, console, _options)
    defaults = module.DEFAULTS

    def pick(name: str) -> int:
        value = getattr(args, name)
        return int(defaults[name] if value is None else value)

    arms = tuple(a.strip() for a in args.arms.split(",")) if args.arms else ARMS
    extra = {"ways": args.ways} if args.ways else {}
    if args.split:
        if not args.scenario.startswith("omniglot"):
            console.print(f"[red]error:[/red] --split chooses Omniglot's split; {args.scenario} has none")
            return 2
        extra["split"] = args.split
    try:
        settings = RunSettings(
            scenario=args.scenario,
            rounds=pick("rounds"),
            seed=args.seed,
            devices=pick("devices"),
            options=_options(args),
            eval_every=pick("eval_every"),
            eval_tasks=pick("eval_tasks"),
            final_eval_tasks=pick("final_eval_tasks"),
            arms=arms,
            budget_minutes=args.budget_minutes,
            workers=args.workers,
            checkpoint_every=pick("eval_every") if args.checkpoint_every is None else args.checkpoint_every,
            data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,  # resumable elsewhere
            extra=extra,
        )
        fedreptile_options(settings)  # a bad option fails here, naming it, before anything runs
    except (ValueError, KeyError) as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    if (args.out / FILE_NAME).is_file():
        console.print(
            f"[red]error:[/red] {args.out} holds a stopped run's checkpoint; go on with "
            f"`tinyfleet sim resume {args.out}`, or choose another --out",
            soft_wrap=True,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    return _execute(
        args.out,
        lambda progress, on_rows: Experiment(settings, progress, on_rows, checkpoint=args.out / FILE_NAME),
        console,
        args.command_line,
    )


def _options(args: argparse.Namespace) -> dict[str, object]:
    """The FedReptile options the command line sets: the flags named (as their dest) after an
    option, then --option NAME=VALUE. Values stay text; FedReptileOptions converts and checks them.
    `--seed` is the run's (RunSettings.seed), which FedReptile's sampling follows."""
    from tinyfleet.common.strategy_options import FedReptileOptions

    flags = set(FedReptileOptions.model_fields) - {"seed"}
    options: dict[str, object] = {n: v for n, v in vars(args).items() if n in flags and v is not None}
    for item in args.option:
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or not name:
            raise ValueError(f"--option {item!r}: expected NAME=VALUE")
        if name in options:
            raise ValueError(f"option {name!r} is set twice (a flag and --option, or two --option)")
        options[name] = value.strip()
    return options


def resume_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tinyfleet.simulations.experiment import Experiment

    _prepare(args.threads)
    return _execute(
        args.out,
        lambda progress, on_rows: Experiment.resume(
            args.out, progress, on_rows, budget_minutes=args.budget_minutes
        ),
        Console(stderr=True),
        args.command_line,
    )


def _execute(
    out: Path,
    start: Callable[[Progress, Callable[[list[Row]], None]], Experiment],
    console: Console,
    command: str,
) -> int:
    """Run (or go on with) an experiment with a progress bar, then write and print its outputs."""
    from tinyfleet.simulations.benchmarks.results_file import RunWatch
    from tinyfleet.simulations.checkpoint import FILE_NAME, CheckpointError
    from tinyfleet.simulations.experiment import progress_bar
    from tinyfleet.simulations.report import write_csv, write_outputs

    watch = RunWatch()  # summary.json records the machine's load and other processes meanwhile
    try:
        with progress_bar() as progress:
            experiment = start(progress, lambda rows: write_csv(rows, out / "metrics.csv"))
            experiment.run()
    except KeyboardInterrupt:
        hint = f"; go on with: tinyfleet sim resume {out}" if (out / FILE_NAME).is_file() else ""
        console.print(f"interrupted{hint}", soft_wrap=True)  # one line: the command can be copied
        return 130
    except (CheckpointError, ValueError, KeyError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    summary = write_outputs(experiment, out, command, watch)
    (out / FILE_NAME).unlink(missing_ok=True)  # the run is complete: its outputs replace the checkpoint
    metric = summary["main_metric"]
    for arm, entry in summary["arms"].items():
        for test, row in entry["meta_test"].items():
            extra_acc = f"  acc {row['acc_after']:.3f}" if "acc_after" in row else ""
            bytes_text = (
                f"  {entry['bytes_per_round_mean']:.0f} B/round" if "bytes_per_round_mean" in entry else ""
            )
            console.print(
                f"{arm:17} {test:8} {metric} {row[metric]:.4f} ± {row[metric + '_ci95']:.4f}"
                f"{extra_acc}{bytes_text}  ({entry['rounds_done']} rounds, "
                f"{entry['train_cpu_seconds']:.0f} CPU s)"
            )
    console.print(f"wrote {out}/metrics.csv, summary.json, meta_test.png, bytes_per_round.png, models/")
    return 0
