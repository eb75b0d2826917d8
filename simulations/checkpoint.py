"""A simulation run's whole state between two rounds, so a run of hours survives being stopped.

Reaching Reptile's Omniglot figures takes several CPU-hours of serial rounds;
a run that dies with its process must start again from round 0. The checkpoint
holds everything the next round depends on: the model, the strategy (with its
per-device copies of the model), every simulated device's Context (optimizer
moments, error-feedback residuals, copy of the model), every device's stream
position, the grid's dropout generator and the global random generators, and
the meta-tests and bytes recorded so far. A resumed run therefore computes the
same numbers as one that was never stopped.

The file is a pickle: it is this machine's own state, written and read by the
same code (like a `torch.save` checkpoint), not something to accept from others.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy

from tinyfleet.common.atomic_files import write_atomically
from tinyfleet.common.optimizer_memory import OptimizerMemory
from tinyfleet.simulations.sim_grid import GridState

FORMAT = "tinyfleet-sim-checkpoint/2"  # 2: RunSettings hold FedReptile options as one table
FILE_NAME = "checkpoint.pkl"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and why."""


@dataclass
class ArmProgress:
    """An arm stopped between rounds: `result.rounds_done` rounds are done."""

    arm: str
    result: Any  # experiment.ArmResult
    arrays: bytes  # the model after the last finished round (Flower ArrayRecord serde)
    strategy: Strategy | None = None  # federated arms
    grid: GridState | None = None  # the devices' Contexts and streams
    memory: OptimizerMemory | None = None  # centralised Reptile's inner optimizer


@dataclass
class Checkpoint:
    settings: Any  # experiment.RunSettings
    rows: list[Any]
    results: dict[str, Any]  # finished arms
    progress: ArmProgress | None
    rng: dict[str, Any]
    format: str = FORMAT


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Replace the checkpoint atomically: a crash while writing leaves the previous one whole."""
    write_atomically(path, pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(path: Path) -> Checkpoint:
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (a run writes {FILE_NAME} into its --out)")
    try:
        checkpoint = pickle.loads(path.read_bytes())
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(checkpoint, Checkpoint) or checkpoint.format != FORMAT:
        found = getattr(checkpoint, "format", type(checkpoint).__name__)
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this version reads {FORMAT!r}")
    return checkpoint
