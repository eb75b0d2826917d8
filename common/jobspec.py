"""Job files: what a user writes to start federated training, parsed and checked field by field.

A job file is TOML::

    name = "sine-fedavg"
    strategy = "fedavg"            # short name, or "package.module:StrategyClass"
    model = "sine-mlp"
    rounds = 5
    seed = 0

    [options]                      # keyword arguments of the strategy: for FedReptile the
    fraction_evaluate = 0.5        # fields of common.strategy_options.FedReptileOptions

    [round]
    deadline_s = 30.0              # bounds the whole train phase: configure, send, replies
    evaluate_deadline_s = 10.0     # bounds the evaluate phase (default: deadline_s)
    min_nodes = 2                  # quorum: fewer replies than this ends the job
    fraction = 1.0                 # share of eligible online nodes sampled per round
    wait_for_nodes_s = 60.0        # how long a round may wait for min_nodes to be online
    eligible = "SELECT ?device WHERE { ... }"   # optional SPARQL scope (registry)
    max_update_ratio = 10.0        # optional: drop a train reply whose update has an L2 norm
                                   # above 10x the global model's (off by default)

A round therefore lasts at most deadline_s + evaluate_deadline_s once its quorum is
online (plus aggregation): a node that has not answered when its phase's deadline
passes is recorded as timed out and the round goes on without it.

    [train]                        # ConfigRecord sent with every train message
    local_steps = 20
    lr = 0.02

    [evaluate]                     # ConfigRecord sent with every evaluate message
"""

from __future__ import annotations

import importlib
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinyfleet.common.models import MODELS

#: Short strategy names and the import path they stand for.
STRATEGY_ALIASES: dict[str, str] = {
    "fedavg": "flwr.serverapp.strategy:FedAvg",
    "fedreptile": "tinyfleet.server.strategies:FedReptile",
    "fedproto": "tinyfleet.server.strategies:FedProto",
}

ConfigValue = int | float | str | bool


class JobSpecError(ValueError):
    """A job file that cannot run; `field` names the offending key (dotted)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"job file field '{field_name}': {message}")
        self.field = field_name


@dataclass(frozen=True)
class RoundSettings:
    deadline_s: float = 30.0
    min_nodes: int = 1
    fraction: float = 1.0
    wait_for_nodes_s: float = 60.0
    eligible: str | None = None
    #: None: the evaluate phase gets deadline_s as well.
    evaluate_deadline_s: float | None = None
    #: None: the update guard is off (see tinyfleet.server.update_guard).
    max_update_ratio: float | None = None

    @property
    def evaluate_deadline(self) -> float:
        """Seconds the evaluate phase may take."""
        return self.deadline_s if self.evaluate_deadline_s is None else self.evaluate_deadline_s


@dataclass(frozen=True)
class JobSpec:
    name: str
    strategy: str
    model: str
    rounds: int
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    round: RoundSettings = field(default_factory=RoundSettings)
    train: dict[str, ConfigValue] = field(default_factory=dict)
    evaluate: dict[str, ConfigValue] = field(default_factory=dict)

    @property
    def strategy_path(self) -> str:
        return STRATEGY_ALIASES.get(self.strategy, self.strategy)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["round"] = {k: v for k, v in data["round"].items() if v is not None}
        return data

    def to_toml(self) -> str:
        return _dump_toml(self.to_dict())


_TOP_KEYS = {"name", "strategy", "model", "rounds", "seed", "options", "round", "train", "evaluate"}
_ROUND_KEYS = {f for f in RoundSettings.__dataclass_fields__}


def parse_job_spec(text: str) -> JobSpec:
    """Parse TOML text into a JobSpec; every problem raises JobSpecError naming its field."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError("<file>", f"not valid TOML: {exc}") from exc
    return job_spec_from_dict(data)


def load_job_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobSpecError("<file>", f"cannot read {path}: {exc.strerror}") from exc
    return parse_job_spec(text)


def job_spec_from_dict(data: dict[str, Any]) -> JobSpec:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise JobSpecError(sorted(unknown)[0], f"unknown field; allowed: {', '.join(sorted(_TOP_KEYS))}")
    strategy = _require_str(data, "strategy")
    _check_strategy(strategy)
    model = _require_str(data, "model")
    if model not in MODELS:
        raise JobSpecError("model", f"unknown model {model!r}; known: {', '.join(sorted(MODELS))}")
    rounds = _int(data, "rounds", None, minimum=1)
    seed = _int(data, "seed", 0, minimum=0)
    name = data.get("name", f"{strategy}-{model}")
    if not isinstance(name, str) or not name.strip():
        raise JobSpecError("name", "expected a non-empty string")
    options = _table(data, "options")
    round_data = _table(data, "round")
    unknown_round = set(round_data) - _ROUND_KEYS
    if unknown_round:
        key = sorted(unknown_round)[0]
        raise JobSpecError(f"round.{key}", f"unknown field; allowed: {', '.join(sorted(_ROUND_KEYS))}")
    eligible = round_data.get("eligible")
    if eligible is not None and (not isinstance(eligible, str) or not eligible.strip()):
        raise JobSpecError("round.eligible", "expected a SPARQL SELECT query or a named query")
    settings = RoundSettings(
        deadline_s=_float(round_data, "deadline_s", 30.0, "round.", positive=True),
        min_nodes=_int(round_data, "min_nodes", 1, minimum=1, prefix="round."),
        fraction=_float(round_data, "fraction", 1.0, "round.", positive=True, at_most=1.0),
        wait_for_nodes_s=_float(round_data, "wait_for_nodes_s", 60.0, "round.", positive=False),
        eligible=eligible,
        evaluate_deadline_s=_optional_float(round_data, "evaluate_deadline_s", "round."),
        max_update_ratio=_optional_float(round_data, "max_update_ratio", "round."),
    )
    return JobSpec(
        name=name,
        strategy=strategy,
        model=model,
        rounds=rounds,
        seed=seed,
        options=options,
        round=settings,
        train=_config_table(data, "train"),
        evaluate=_config_table(data, "evaluate"),
    )


def resolve_strategy_class(path: str) -> type:
    """Import `package.module:Class`; errors name the job field."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise JobSpecError("strategy", f"cannot import module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise JobSpecError("strategy", f"module {module_name!r} has no class {attr!r}") from None


def _check_strategy(strategy: str) -> None:
    if strategy in STRATEGY_ALIASES:
        return
    if ":" not in strategy:
        raise JobSpecError(
            "strategy",
            f"unknown strategy {strategy!r}; use one of {', '.join(sorted(STRATEGY_ALIASES))} "
            "or an import path such as 'flwr.serverapp.strategy:FedMedian'",
        )
    cls = resolve_strategy_class(strategy)
    from flwr.serverapp.strategy import Strategy

    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise JobSpecError("strategy", f"{strategy!r} is not a flwr.serverapp.strategy.Strategy")


def _require_str(data: dict[str, Any], key: str) -> str:
    if key not in data:
        raise JobSpecError(key, "missing (required)")
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise JobSpecError(key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _int(
    data: dict[str, Any], key: str, default: int | None, *, minimum: int, prefix: str = ""
) -> int:
    if key not in data:
        if default is None:
            raise JobSpecError(prefix + key, "missing (required)")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(prefix + key, f"expected an integer, got {value!r}")
    if value < minimum:
        raise JobSpecError(prefix + key, f"must be at least {minimum}, got {value}")
    return value


def _float(
    data: dict[str, Any],
    key: str,
    default: float,
    prefix: str,
    *,
    positive: bool,
    at_most: float | None = None,
) -> float:
    if key not in data:
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JobSpecError(prefix + key, f"expected a number, got {value!r}")
    if positive and value <= 0:
        raise JobSpecError(prefix + key, f"must be greater than 0, got {value}")
    if value < 0:
        raise JobSpecError(prefix + key, f"must not be negative, got {value}")
    if at_most is not None and value > at_most:
        raise JobSpecError(prefix + key, f"must be at most {at_most}, got {value}")
    return float(value)


def _optional_float(data: dict[str, Any], key: str, prefix: str) -> float | None:
    """A positive number, or None when the key is absent (the setting's documented default)."""
    if key not in data:
        return None
    return _float(data, key, 0.0, prefix, positive=True)


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise JobSpecError(key, f"expected a table ([{key}]), got {value!r}")
    return dict(value)


def _config_table(data: dict[str, Any], key: str) -> dict[str, ConfigValue]:
    table = _table(data, key)
    for name, value in table.items():
        if not isinstance(value, int | float | str | bool):
            raise JobSpecError(f"{key}.{name}", f"expected a number, string or boolean, got {value!r}")
    return table


def _dump_toml(data: dict[str, Any]) -> str:
    """Write the small TOML subset job files use (scalars and one level of tables)."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in data.items() if isinstance(v, dict) and v]
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars]
    for name, table in tables:
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
