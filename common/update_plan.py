"""Sparse-update plans: which parameters of a model a device trains.

On-device training under a memory budget (Lin et al. 2022, arXiv 2206.15472;
mit-han-lab/tiny-training) updates only part of a network: the biases of the
last n layers, and the weights of a few chosen layers, each on a fraction of its
channels. A plan is the same on server and device, so it is checked against a
model here and travels in a job's ConfigRecord as JSON text.

Layers are the model's leaf modules that own parameters, in registration order
(the order in which the zoo's models run them). A fraction selects a layer's
first channels along its output dimension (rows of a Linear or Conv2d weight,
entries of a norm's affine weight). tiny-training masks input channels instead,
chosen by weight norm; output rows keep the trained part one contiguous slice.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from torch import nn

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def _fraction(value: float) -> float:
    if value not in FRACTIONS:
        raise ValueError(f"channel fraction {value} is not one of {', '.join(map(str, FRACTIONS))}")
    return value


Fraction = Annotated[float, AfterValidator(_fraction)]
STANDARD_PLANS = ("full", "last-layer", "biases")
PARTIAL_TYPES = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)


class PlanError(ValueError):
    """A plan that cannot be used with a model, or plan text that does not parse."""


class UpdatePlan(BaseModel):
    """Biases of the last `bias_layers` layers that have a bias, and weights of the layers in `weights`
    on the given fraction of their output channels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    bias_layers: int = Field(default=0, ge=0)
    weights: dict[str, Fraction] = Field(default_factory=dict)

    def to_json(self) -> str:
        """The plan as a ConfigRecord string value."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> UpdatePlan:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<plan>'}: {e['msg']}" for e in exc.errors()
            )
            raise PlanError(f"update plan does not parse: {problems}") from None

    def check(self, model: nn.Module) -> None:
        """Refuse a plan naming a layer the model lacks, a partial fraction on a layer that cannot
        be split by channel, or more bias layers than the model has."""
        layers = dict(parameter_layers(model))
        for name, fraction in self.weights.items():
            if name not in layers:
                raise PlanError(f"update plan names layer {name!r}, which the model lacks; "
                                f"its layers: {', '.join(layers) or 'none'}")
            module = layers[name]
            if getattr(module, "weight", None) is None:
                raise PlanError(f"update plan trains the weight of layer {name!r}, which has none")
            if fraction != 1.0 and not isinstance(module, PARTIAL_TYPES):
                raise PlanError(f"layer {name!r} ({type(module).__name__}) trains only whole, "
                                f"not a {fraction} fraction of its channels")
        available = len(bias_layer_names(model))
        if self.bias_layers > available:
            raise PlanError(f"update plan trains the biases of {self.bias_layers} layers; the model has "
                            f"{available} layers with a bias")

    def trained_biases(self, model: nn.Module) -> list[str]:
        """Names of the layers whose bias trains (the last `bias_layers` with a bias)."""
        names = bias_layer_names(model)
        return names[len(names) - self.bias_layers:] if self.bias_layers else []


def parameter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules that own parameters, in registration order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if not list(module.children()) and list(module.parameters(recurse=False))
    ]


def bias_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in parameter_layers(model) if getattr(module, "bias", None) is not None]


def trained_channels(module: nn.Module, fraction: float) -> int:
    """Output channels a fraction selects: at least one."""
    weight = module.weight
    assert isinstance(weight, nn.Parameter)
    return max(1, int(weight.shape[0] * fraction))


def standard_plan(name: str, model: nn.Module) -> UpdatePlan:
    """"full" (every parameter), "last-layer" (the last layer's weight and bias), "biases" (every bias)."""
    layers = [n for n, m in parameter_layers(model) if getattr(m, "weight", None) is not None]
    biases = len(bias_layer_names(model))
    if name == "full":
        return UpdatePlan(name=name, bias_layers=biases, weights={n: 1.0 for n in layers})
    if name == "last-layer":
        if not layers:
            raise PlanError("plan 'last-layer': the model has no layer with a weight")
        last = layers[-1]
        has_bias = getattr(dict(parameter_layers(model))[last], "bias", None) is not None
        return UpdatePlan(name=name, bias_layers=int(has_bias), weights={last: 1.0})
    if name == "biases":
        return UpdatePlan(name=name, bias_layers=biases)
    raise PlanError(f"unknown standard plan {name!r}; known: {', '.join(STANDARD_PLANS)}")
