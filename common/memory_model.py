"""How much memory a training step under an update plan needs, and the best plan for a budget.

Counted, as Lin et al. 2022 (arXiv 2206.15472) count for on-device training:
the trained parameters, their gradients, the optimizer's state and the
activations kept for the backward pass. Frozen weights are reported apart: on a
microcontroller they stay in flash, on a host they are in RAM. Not counted: the
transient working memory of the forward and backward passes (one layer's input
and output at a time), which inference needs too.

Activations are what autograd keeps when `tinyfleet.client.sparse_training`
runs the plan, tensor by tensor (a tensor kept by two operations counts once):
nothing before the earliest trained layer; a layer whose weight trains keeps its
input; a frozen-weight Linear or Conv2d keeps nothing (its weight suffices for
the input's gradient); batch norm keeps its input and per-channel statistics;
ReLU, tanh and sigmoid keep their output (PyTorch's ReLU mask is its fp32
output; the paper's 1-bit mask is a device-side saving not modelled); max
pooling keeps its input and its argmax indices (int64); the loss keeps the
model's output (log-probabilities or the prediction) and the target.

dtype "int8" models a device that stores weights and activations as int8 and
biases as int32 (the paper's choice); gradients are the size of their parameter,
optimizer state is fp32. Only fp32 is measured (tests/test_memory_model.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, TypedDict, Unpack

import torch
from torch import nn

from tinyfleet.common.update_plan import (
    FRACTIONS,
    PlanError,
    UpdatePlan,
    bias_layer_names,
    parameter_layers,
    trained_channels,
)

Dtype = Literal["fp32", "int8"]
OptimizerName = Literal["sgd", "adam"]
FP32 = 4
INDEX_BYTES = 8
ACTIVATIONS_KEEPING_OUTPUT = (nn.ReLU, nn.Tanh, nn.Sigmoid)
FROZEN_KEEPS_NOTHING = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes a training step needs, by kind."""

    trainable_weights: int
    gradients: int
    optimizer_state: int
    activations: int
    frozen_weights: int
    frozen_in_flash: bool = True

    @property
    def training(self) -> int:
        """What training adds to the frozen model: the part measured in tests."""
        return self.trainable_weights + self.gradients + self.optimizer_state + self.activations

    @property
    def ram(self) -> int:
        return self.training + (0 if self.frozen_in_flash else self.frozen_weights)

    @property
    def flash(self) -> int:
        return self.frozen_weights if self.frozen_in_flash else 0

    @property
    def total(self) -> int:
        """The RAM budget this step needs."""
        return self.ram


@dataclass(frozen=True)
class _Call:
    name: str
    module: nn.Module
    input_key: int
    input_bytes: int
    output_key: int
    output_bytes: int
    output_numel: int


@dataclass(frozen=True)
class Trace:
    """Leaf-module calls of one forward pass in execution order, with their tensors' storages."""

    calls: list[_Call]
    batch: int
    output_numel: int
    task_is_classification: bool


def trace(model: nn.Module, sample_shape: tuple[int, ...], batch: int, classification: bool) -> Trace:
    """Run a copy of `model` once on zeros, recording what each leaf module reads and writes."""
    copied = copy.deepcopy(model)
    calls: list[_Call] = []
    alive: list[torch.Tensor] = []  # keeps storages alive so their addresses stay distinct

    def key(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def hook(name: str) -> object:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0]
            alive.extend([x, output])
            calls.append(_Call(name, module, key(x), x.untyped_storage().nbytes(), key(output),
                               output.untyped_storage().nbytes(), output.numel()))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in copied.named_modules()
        if not list(module.children())
    ]
    try:
        with torch.no_grad():
            out = copied(torch.zeros(batch, *sample_shape))
    finally:
        for handle in handles:
            handle.remove()
    return Trace(calls, batch, out.numel(), classification)


def estimate(
    model: nn.Module,
    plan: UpdatePlan,
    sample_shape: tuple[int, ...],
    batch: int = 1,
    dtype: Dtype = "fp32",
    optimizer: OptimizerName = "sgd",
    classification: bool = True,
    frozen_in_flash: bool = True,
    traced: Trace | None = None,
) -> MemoryBreakdown:
    """Memory of one training step of `model` under `plan` on batches of `batch` samples."""
    plan.check(model)
    traced = traced or trace(model, sample_shape, batch, classification)
    act_scale = 1 / FP32 if dtype == "int8" else 1.0
    weight_bytes = 1 if dtype == "int8" else FP32
    layers = dict(parameter_layers(model))
    biases = set(plan.trained_biases(model))

    trained_elems: dict[str, tuple[int, int]] = {}  # layer -> (weight elements, bias elements) that train
    for name, module in layers.items():
        weight_elems = 0
        if name in plan.weights:
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            weight_elems = trained_channels(module, plan.weights[name]) * (weight.numel() // weight.shape[0])
        bias = getattr(module, "bias", None)
        bias_elems = bias.numel() if name in biases and isinstance(bias, torch.Tensor) else 0
        if weight_elems or bias_elems:
            trained_elems[name] = (weight_elems, bias_elems)

    trainable = sum(w * weight_bytes + b * FP32 for w, b in trained_elems.values())
    tensors = sum((w > 0) + (b > 0) for w, b in trained_elems.values())
    elems = sum(w + b for w, b in trained_elems.values())
    opt_state = 2 * elems * FP32 + tensors * FP32 if optimizer == "adam" else 0
    all_bytes = sum(
        p.numel() * (FP32 if pname.endswith("bias") else weight_bytes)
        for pname, p in model.named_parameters()
    )
    return MemoryBreakdown(
        trainable_weights=trainable,
        gradients=trainable,
        optimizer_state=opt_state,
        activations=int(_saved_activation_bytes(traced, plan, trained_elems) * act_scale),
        frozen_weights=all_bytes - trainable,
        frozen_in_flash=frozen_in_flash,
    )


def _saved_activation_bytes(traced: Trace, plan: UpdatePlan, trained: dict[str, tuple[int, int]]) -> int:
    saved: dict[int, int] = {}
    grad_in = False  # does the current call's input need a gradient (a trained layer ran before)?
    for call in traced.calls:
        weight_trains = call.name in trained and trained[call.name][0] > 0
        trains = call.name in trained
        module = call.module
        if weight_trains:
            saved[call.input_key] = call.input_bytes
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (grad_in or trains):
            saved[call.input_key] = call.input_bytes
            saved[-id(call)] = 2 * module.num_features * FP32 + (
                module.num_features * FP32 if call.name in plan.weights and plan.weights[call.name] < 1 else 0
            )
        elif grad_in and isinstance(module, ACTIVATIONS_KEEPING_OUTPUT):
            saved[call.output_key] = call.output_bytes
        elif grad_in and isinstance(module, nn.MaxPool2d):
            saved[call.input_key] = call.input_bytes
            saved[-id(call) - 1] = call.output_numel * INDEX_BYTES
        grad_in = grad_in or trains
    if grad_in:  # the loss keeps the output (or its log-softmax) and the target
        target = traced.batch * INDEX_BYTES if traced.task_is_classification else traced.output_numel * FP32
        saved[-1] = traced.output_numel * FP32 + target
    return sum(saved.values())


def candidate_plans(model: nn.Module) -> list[UpdatePlan]:
    """Ever larger plans, later layers first: for each layer from the last, its bias, then its
    weight on 1/8, 1/4, 1/2 and all of its channels. Each plan contains the one before it."""
    bias_names = bias_layer_names(model)
    layers = parameter_layers(model)
    plans: list[UpdatePlan] = []
    bias_layers = 0
    weights: dict[str, float] = {}
    for name, module in reversed(layers):
        if name in bias_names:
            bias_layers += 1
            plans.append(UpdatePlan(name="planner", bias_layers=bias_layers, weights=dict(weights)))
        if getattr(module, "weight", None) is None:
            continue
        splittable = UpdatePlan(weights={name: 0.125})
        fractions: tuple[float, ...] = FRACTIONS
        try:
            splittable.check(model)
        except PlanError:
            fractions = (1.0,)
        for fraction in fractions:
            weights[name] = fraction
            plans.append(UpdatePlan(name="planner", bias_layers=bias_layers, weights=dict(weights)))
    return plans


class StepSetup(TypedDict, total=False):
    """How the training step runs beyond model and plan: `estimate`'s keyword arguments."""

    batch: int
    dtype: Dtype
    optimizer: OptimizerName
    classification: bool
    frozen_in_flash: bool


def plan_for_budget(
    model: nn.Module, budget_bytes: int, sample_shape: tuple[int, ...], **setup: Unpack[StepSetup]
) -> tuple[UpdatePlan, MemoryBreakdown]:
    """The largest plan of `candidate_plans` whose step fits `budget_bytes` of RAM, with its memory.

    Candidates are taken in order until one does not fit, so a larger budget never trains fewer
    parameters. Refuses a budget not even the smallest candidate fits, naming what it needs.
    """
    candidates = candidate_plans(model)
    if not candidates:
        raise PlanError("the model has no parameters to train")
    traced = trace(model, sample_shape, setup.get("batch", 1), setup.get("classification", True))
    chosen: tuple[UpdatePlan, MemoryBreakdown] | None = None
    for plan in candidates:
        memory = estimate(model, plan, sample_shape, traced=traced, **setup)
        if memory.total > budget_bytes:
            break
        chosen = (plan, memory)
    if chosen is None:
        need = estimate(model, candidates[0], sample_shape, traced=traced, **setup).total
        raise PlanError(
            f"no update plan fits {budget_bytes} bytes: "
            f"the smallest ({candidates[0].to_json()}) needs {need} bytes"
        )
    plan, memory = chosen
    return plan.model_copy(update={"name": f"budget-{budget_bytes}"}), memory
