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

from tinyfleet.common.jobspec import JobSpec, JobSpecError, resolve_strategy_class
from tinyfleet.common.message_keys import MODEL_KEY
from tinyfleet.common.strategy_options import Options, OptionsError
from tinyfleet.server.strategies import FedProto


def round_defaults(spec: JobSpec) -> dict[str, Any]:
    """Arguments implied by the job itself: sampling from [round], and the job's length for
    strategies with schedules over it (e.g. FedReptile's linear ε decay)."""
    return {
        "num_rounds": spec.rounds,
        "fraction_train": spec.round.fraction,
        "fraction_evaluate": spec.round.fraction,
        "min_train_nodes": spec.round.min_nodes,
        "min_evaluate_nodes": spec.round.min_nodes,
        "min_available_nodes": spec.round.min_nodes,
    }


def build_strategy(spec: JobSpec) -> Strategy:
    """Instantiate the job's strategy; bad [options] raise JobSpecError naming the field.

    A strategy with an `options_model` (tinyfleet's, e.g. FedReptile) has its options
    validated by that model; any other (Flower's stock strategies) by its constructor's
    signature.
    """
    cls = resolve_strategy_class(spec.strategy_path)
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise JobSpecError("strategy", f"{spec.strategy_path!r} is not a Flower Strategy class")
    model = getattr(cls, "options_model", None)
    if isinstance(model, type) and issubclass(model, Options):
        kwargs = _with_round_defaults(spec, set(model.model_fields))
        try:
            model.parse(kwargs)
        except OptionsError as exc:
            raise JobSpecError(f"options.{exc.option}", exc.reason) from None
    else:
        kwargs = _with_round_defaults(spec, _checked_parameters(cls, spec))
    if spec.round.max_update_ratio is not None and issubclass(cls, FedProto):
        raise JobSpecError(
            "round.max_update_ratio",
            "bounds weight updates, and fedproto's replies are prototype means with counts, not weights "
            "(each is checked for its classes' shape and finite values as it is merged); remove it",
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise JobSpecError("options", f"{cls.__name__}({kwargs}) failed: {exc}") from exc


def _with_round_defaults(spec: JobSpec, parameters: set[str]) -> dict[str, Any]:
    """[options], plus the round defaults the strategy takes and [options] leaves unset."""
    return {**{k: v for k, v in round_defaults(spec).items() if k in parameters}, **spec.options}


def _checked_parameters(cls: type, spec: JobSpec) -> set[str]:
    """The constructor's named arguments; an [options] key that is none of them raises JobSpecError."""
    accepts_any = _takes_var_keyword(cls)
    parameters = _init_parameters(cls, through_bases=accepts_any)
    if not accepts_any:
        unknown = sorted(set(spec.options) - parameters)
        if unknown:
            raise JobSpecError(
                f"options.{unknown[0]}",
                f"{cls.__name__} has no argument {unknown[0]!r}; it takes: " + ", ".join(sorted(parameters)),
            )
    return parameters


def _init_parameters(cls: type, *, through_bases: bool) -> set[str]:
    """Named constructor arguments; with through_bases also those of the bases a
    `**kwargs` constructor passes them on to."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, Strategy):
            try:
                signature = inspect.signature(klass.__init__)
            except (TypeError, ValueError):
                continue
            names |= {
                n for n, p in signature.parameters.items()
                if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            }
            if not through_bases:
                break
    return names


def _takes_var_keyword(cls: type) -> bool:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def train_config(spec: JobSpec) -> ConfigRecord:
    return ConfigRecord({**spec.train, MODEL_KEY: spec.model})


def evaluate_config(spec: JobSpec) -> ConfigRecord:
    return ConfigRecord({**spec.evaluate, MODEL_KEY: spec.model})


def initial_arrays(spec: JobSpec) -> ArrayRecord:
    """The job's starting model (torch is imported here so `tinyfleet job submit` stays light)."""
    from tinyfleet.common.arrays import to_array_record
    from tinyfleet.common.models import build_model

    return to_array_record(build_model(spec.model, seed=spec.seed))
