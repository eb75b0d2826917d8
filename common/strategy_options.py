"""Typed options of tinyfleet's strategies and of the device handlers that answer them.

Each option has one definition here (type, bounds, default). The strategy
constructor, job-file validation (`tinyfleet.server.job_strategy`), the device
handlers (which read their part from the message's ConfigRecord) and
`tinyfleet sim run` all validate through these models, so an option has the same
default from every entry point and a bad or unknown one is refused by name.
Scenarios and example job files override defaults; they do not define their own.

Flower's stock strategies (FedAvg, FedProx, ...) keep their own constructors;
`LocalLearnerOptions` is what tinyfleet's default handlers read from the configs
those strategies send.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tinyfleet.common.message_keys import NUM_EXAMPLES_KEY, PROXIMAL_MU_KEY
from tinyfleet.common.reptile_protocol import parse_layers

ConfigScalar = int | float | str | bool | list[str]


class OptionsError(ValueError):
    """Options that cannot be used; the message names each problem, `option` and `reason` the first."""

    def __init__(self, model: str, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"option {name!r}: {reason}" for name, reason in problems))
        self.model = model
        self.option, self.reason = problems[0]


class Options(BaseModel):
    """Base of every options model: immutable, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True)

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> Self:
        """Validate `values`; problems raise OptionsError naming each option and what is wrong."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise _options_error(cls, exc) from None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """The options a message's ConfigRecord carries; its other keys (model, round, ...)
        belong to others and are left alone."""
        return cls.parse({k: config[k] for k in cls.config_keys() if k in config})

    @classmethod
    def config_keys(cls) -> list[str]:
        """Option names as they appear in job files and ConfigRecords."""
        return [
            info.validation_alias if isinstance(info.validation_alias, str) else name
            for name, info in cls.model_fields.items()
        ]

    def replace(self, **changes: Any) -> Self:
        """A validated copy with `changes` applied (`model_copy` would not validate them)."""
        return self.parse({**self.model_dump(), **changes})


def _options_error(model: type[Options], exc: ValidationError) -> OptionsError:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "<options>"
        if error["type"] == "extra_forbidden":
            reason = f"unknown option; {model.__name__} takes: {', '.join(sorted(model.config_keys()))}"
        elif error["type"] == "value_error":  # a validator's own message already names the value
            reason = str(error.get("ctx", {}).get("error", error["msg"]))
        else:
            reason = f"{error['msg']}, got {error['input']!r}"
        problems.append((name, reason))
    return OptionsError(model.__name__, problems)


class AdaptOptions(Options):
    """How a device adapts the model to its data; shared by training and evaluation.

    Parameters
    ----------
    inner_lr : float (default: 0.02)
        Learning rate of the device's optimizer.
    inner_optimizer : {"sgd", "adam"} (default: "sgd")
        The device's optimizer; "adam" is Reptile's, without momentum (β1 = 0).
    local_layers : list of str (default: none)
        Layers that never leave the device (TinyMetaFed's partial local
        reconstruction): names or dotted prefixes of the model's parameters; a
        comma-separated string is accepted too.
    reconstruct_steps : int (default: 0)
        Steps that rebuild the local layers from zero, the global layers frozen,
        before adapting the whole model.
    """

    inner_lr: float = Field(0.02, gt=0)
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    local_layers: tuple[str, ...] = ()
    reconstruct_steps: int = Field(0, ge=0)

    @field_validator("local_layers", mode="before")
    @classmethod
    def _layers(cls, value: object) -> tuple[str, ...]:
        return parse_layers(value)

    def to_config(self) -> dict[str, ConfigScalar]:
        """These options as ConfigRecord values (no local layers: no key)."""
        values = self.model_dump()
        layers = values.pop("local_layers")
        return {
            **{k: v for k, v in values.items() if v is not None},
            **({"local_layers": list(layers)} if layers else {}),
        }


class ReptileTrainOptions(AdaptOptions):
    """What the `train.fedreptile` handler reads from its ConfigRecord.

    Parameters
    ----------
    inner_steps : int (default: 5)
        Optimizer steps a device takes per round (Reptile's inner loop).
    inner_batch : int (default: 10)
        Samples per inner step.
    inner_samples : int (default: 0)
        Steps cycle in minibatches over the device's this many most recent
        samples; 0 takes a fresh batch from the stream every step.
    keep_optimizer_state : bool (default: True)
        Keep the inner optimizer's state (Adam's moments) on the device from
        round to round, as Reptile keeps it across tasks.
    top_p : float (default: 1.0)
        Fraction of the update's largest-magnitude values a device sends
        (0.1 sends 10 %); the rest is kept and added to the next update (error
        feedback). With `compress_downlink`, also the fraction of the model
        delta the server sends.
    quantize : {"none", "int8"} (default: "none")
        Quantise what is sent to int8 with one scale per tensor; true and false
        stand for "int8" and "none".
    """

    inner_steps: int = Field(5, ge=1)
    inner_batch: int = Field(10, ge=1)
    inner_samples: int = Field(0, ge=0)
    keep_optimizer_state: bool = True
    top_p: float = Field(1.0, gt=0, le=1)
    quantize: Literal["none", "int8"] = "none"

    @field_validator("quantize", mode="before")
    @classmethod
    def _quantize(cls, value: object) -> object:
        if isinstance(value, bool):
            return "int8" if value else "none"
        return value


class ReptileEvalOptions(AdaptOptions):
    """What the `evaluate.fedreptile` handler reads from its ConfigRecord.

    Parameters
    ----------
    eval_shots : int (default: 10)
        Held-back samples a device adapts on (the K of K-shot).
    eval_queries : int (default: 50)
        Held-back samples scored before and after adapting.
    eval_steps : int (default: 32)
        Full-batch optimizer steps on the shots.
    eval_lr : float, optional
        Learning rate of those steps; `inner_lr` when not set.
    """

    eval_shots: int = Field(10, ge=1)
    eval_queries: int = Field(50, ge=1)
    eval_steps: int = Field(32, ge=0)
    eval_lr: float | None = Field(None, gt=0)

    @property
    def adapt_lr(self) -> float:
        return self.inner_lr if self.eval_lr is None else self.eval_lr


class FedReptileOptions(ReptileTrainOptions, ReptileEvalOptions):
    """Options of `tinyfleet.server.strategies.FedReptile`: federated Reptile and TinyMetaFed.

    Reptile (Nichol et al. 2018, https://arxiv.org/abs/1803.02999) moves the
    model towards the weights a learner reaches on a task:
    θ ← θ + ε · (weighted mean over replies of θᵢ - θ). TinyReptile
    (https://arxiv.org/abs/2304.05201) runs it online and serially, one device a
    round; TinyMetaFed (https://arxiv.org/abs/2307.06822) adds partial local
    reconstruction (`local_layers`), top-P sparse updates and int8 quantisation
    with error feedback. The device-side options (`ReptileTrainOptions`,
    `ReptileEvalOptions`, documented there) travel in the ConfigRecords.

    Parameters
    ----------
    epsilon : float (default: 1.0)
        Meta step size ε in (0, 1]; the first round's with a linear schedule.
        Serial rounds carry one task each, so a smaller ε (the scenarios and
        example jobs use 0.3-0.5) keeps one device from overwriting the model.
    epsilon_final : float (default: 0.0)
        ε at the end of a linear schedule, in [0, 1].
    epsilon_schedule : {"constant", "linear"} (default: "constant")
        "linear" anneals ε to `epsilon_final` over `num_rounds`, as Reptile does.
    num_rounds : int, optional
        Total rounds of the job (a job fills it in); needed by a linear schedule.
    serial : bool (default: True)
        TinyReptile's online serial variant: one device per round, chosen by
        `visit_order`. False samples `fraction_train` of the nodes each round.
    visit_order : {"round-robin", "random"} (default: "round-robin")
        Serial rounds visit the nodes in turn (sorted node ids) or at random (seeded).
    fraction_train : float (default: 1.0)
        Share of the available nodes a parallel round trains, in [0, 1].
    min_train_nodes : int (default: 1)
        Fewest nodes a parallel round trains.
    fraction_evaluate : float (default: 1.0)
        Share of the nodes an evaluation round asks, in [0, 1]; 0 turns evaluation off.
    min_evaluate_nodes : int (default: 1)
        Fewest nodes an evaluation round asks.
    min_available_nodes : int (default: 1)
        Nodes that must be online for a round to train at all.
    evaluate_every : int (default: 1)
        Rounds between evaluations.
    compress_downlink : bool (default: False)
        Send each device a compressed delta against its copy of the model (with
        `top_p` and `quantize`) and the static config only when (re)syncing it.
    seed : int (default: 0)
        Seed of the node sampling.
    weighted_by_key : str (default: "num-examples")
        Reply metric that weights the mean of the updates and metrics.
    """

    epsilon: float = Field(1.0, gt=0, le=1)
    epsilon_final: float = Field(0.0, ge=0, le=1)
    epsilon_schedule: Literal["constant", "linear"] = "constant"
    num_rounds: int | None = Field(None, ge=1, validate_default=True)
    serial: bool = True
    visit_order: Literal["round-robin", "random"] = "round-robin"
    fraction_train: float = Field(1.0, ge=0, le=1)
    min_train_nodes: int = Field(1, ge=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_evaluate_nodes: int = Field(1, ge=0)
    min_available_nodes: int = Field(1, ge=0)
    evaluate_every: int = Field(1, ge=1)
    compress_downlink: bool = False
    seed: int = Field(0, ge=0)
    weighted_by_key: str = NUM_EXAMPLES_KEY

    @field_validator("num_rounds")
    @classmethod
    def _rounds_for_schedule(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None and info.data.get("epsilon_schedule") == "linear":
            raise ValueError("epsilon_schedule 'linear' needs num_rounds (the job's total rounds)")
        return value

    def epsilon_for(self, server_round: int) -> float:
        """ε of a round (1-based); a linear schedule goes from `epsilon` towards `epsilon_final`."""
        if self.epsilon_schedule == "constant" or self.num_rounds is None:
            return self.epsilon
        done = min(max(server_round - 1, 0), self.num_rounds) / self.num_rounds
        return self.epsilon + (self.epsilon_final - self.epsilon) * done

    def train_options(self) -> ReptileTrainOptions:
        return ReptileTrainOptions.parse(self.model_dump(include=set(ReptileTrainOptions.model_fields)))

    def eval_options(self) -> ReptileEvalOptions:
        return ReptileEvalOptions.parse(self.model_dump(include=set(ReptileEvalOptions.model_fields)))


class LocalLearnerOptions(Options):
    """What tinyfleet's default `train` and `evaluate` handlers read: the configs of Flower's
    stock strategies (FedAvg, FedProx, ...), set in a job file's [train] and [evaluate].

    Parameters
    ----------
    local_steps : int (default: 10)
        Optimizer steps per round, each on a fresh batch from the device's stream.
    batch_size : int (default: 16)
        Samples per step.
    lr : float (default: 0.01)
        Learning rate.
    optimizer : {"sgd", "adam"} (default: "sgd")
        The optimizer ("adam" without momentum, as in `AdaptOptions`).
    proximal_mu : float (default: 0.0)
        FedProx's μ (Li et al. 2020, https://arxiv.org/abs/1812.06127): the loss
        gains μ/2 · ||w - w_global||², keeping local training near the model it
        started from. Flower's FedProx sends it as "proximal-mu".
    eval_samples : int (default: 100)
        Held-back samples an evaluation scores.
    """

    local_steps: int = Field(10, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    proximal_mu: float = Field(0.0, ge=0, validation_alias=PROXIMAL_MU_KEY)
    eval_samples: int = Field(100, ge=1)


class ProtoTrainOptions(Options):
    """What the `train.fedproto` handler reads from its ConfigRecord.

    Parameters
    ----------
    samples_per_round : int (default: 100)
        Stream samples a device embeds with its frozen backbone and folds into
        its running class means each round.
    encoding : {"fp32", "int8"} (default: "fp32")
        How prototypes travel, both ways: float32 (dim x 4 bytes a class) or
        int8 with one float32 scale a class (dim + 4 bytes).
    """

    samples_per_round: int = Field(100, ge=1)
    encoding: Literal["fp32", "int8"] = "fp32"


class ProtoEvalOptions(Options):
    """What the `evaluate.fedproto` handler reads from its ConfigRecord.

    Parameters
    ----------
    eval_samples : int (default: 100)
        Held-back samples a device classifies by the nearest merged prototype.
    metric : {"euclidean", "cosine"} (default: "euclidean")
        Nearness: squared Euclidean distance, as Prototypical Networks, or cosine similarity.
    """

    eval_samples: int = Field(100, ge=1)
    metric: Literal["euclidean", "cosine"] = "euclidean"


class FedProtoOptions(ProtoTrainOptions, ProtoEvalOptions):
    """Options of `tinyfleet.server.strategies.FedProto`: prototype averaging.

    Devices share per-class mean embeddings and counts (Federated Reconnaissance,
    Hendryx et al. 2021, https://arxiv.org/abs/2109.00150; Prototypical Networks,
    Snell et al. 2017, https://arxiv.org/abs/1703.05175). The device-side options
    (`ProtoTrainOptions`, `ProtoEvalOptions`, documented there) travel in the
    ConfigRecords.

    Parameters
    ----------
    backbone : str, optional
        Path, where the strategy runs, of an ArrayRecord file holding the
        embedding's weights (e.g. `models/central.arrays` of a `tinyfleet sim run
        omniglot-protonet`); without it the backbone is the job's initial model.
    fraction_train : float (default: 1.0)
        Share of the available nodes a round asks for their new prototypes, in [0, 1].
    min_train_nodes : int (default: 1)
        Fewest nodes a round asks.
    fraction_evaluate : float (default: 1.0)
        Share of the nodes an evaluation asks, in [0, 1]; 0 turns evaluation off.
    min_evaluate_nodes : int (default: 1)
        Fewest nodes an evaluation asks.
    min_available_nodes : int (default: 1)
        Nodes that must be online for a round to ask any.
    evaluate_every : int (default: 1)
        Rounds between evaluations.
    seed : int (default: 0)
        Seed of the node sampling.
    """

    backbone: str | None = None
    fraction_train: float = Field(1.0, ge=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_train_nodes: int = Field(1, ge=1)
    min_evaluate_nodes: int = Field(1, ge=0)
    min_available_nodes: int = Field(1, ge=0)
    evaluate_every: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)

    def train_options(self) -> ProtoTrainOptions:
        return ProtoTrainOptions.parse(self.model_dump(include=set(ProtoTrainOptions.model_fields)))

    def eval_options(self) -> ProtoEvalOptions:
        return ProtoEvalOptions.parse(self.model_dump(include=set(ProtoEvalOptions.model_fields)))
