"""Turning a job file into a ready strategy, its configs and its initial model.

Any Flower strategy class works (short names map through STRATEGY_ALIASES). The
job's [round] settings fill the usual sampling arguments of a strategy when its
constructor takes them (fraction_train/evaluate, min_train/evaluate/available
nodes) and [options] does not set them, so `min_nodes = 1` on a one-device fleet
does not leave a stock FedAvg waiting for its default of two nodes.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.jobspec import JobSpec, JobSpecError, resolve_strategy_class
from tinyfleet.common.models import build_model


def round_defaults(spec: JobSpec) -> dict[str, Any]:
    """Sampling arguments implied by the job's [round] table."""
    return {
        "fraction_train": spec.round.fraction,
        "fraction_evaluate": spec.round.fraction,
        "min_train_nodes": spec.round.min_nodes,
        "min_evaluate_nodes": spec.round.min_nodes,
        "min_available_nodes": spec.round.min_nodes,
    }


def build_strategy(spec: JobSpec) -> Strategy:
    """Instantiate the job's strategy; bad [options] raise JobSpecError naming the field."""
    cls = resolve_strategy_class(spec.strategy_path)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise JobSpecError("strategy", f"{spec.strategy_path!r} is not a Flower Strategy class")
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not accepts_any:
        unknown = sorted(set(spec.options) - set(parameters))
        if unknown:
            raise JobSpecError(
                f"options.{unknown[0]}",
                f"{cls.__name__} has no argument {unknown[0]!r}; it takes: "
                + ", ".join(n for n in parameters if n != "self"),
            )
    kwargs = {k: v for k, v in round_defaults(spec).items() if k in parameters}
    kwargs.update(spec.options)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise JobSpecError("options", f"{cls.__name__}({kwargs}) failed: {exc}") from exc


def train_config(spec: JobSpec) -> ConfigRecord:
    return ConfigRecord({**spec.train, "model": spec.model})


def evaluate_config(spec: JobSpec) -> ConfigRecord:
    return ConfigRecord({**spec.evaluate, "model": spec.model})


def initial_arrays(spec: JobSpec) -> ArrayRecord:
    return to_array_record(build_model(spec.model, seed=spec.seed))
