"""Training that follows an update plan: only the planned parameters get gradients.

Frozen parameters have requires_grad=False, so autograd records nothing before
the earliest trained layer and keeps no activation the plan does not need. Three
layer shapes need more than that flag:

- a partial-channel layer trains a copy of its first k output rows as its own
  parameter and runs the rest from a view of the frozen weight; the optimizer
  never sees the frozen rows, so neither its state nor weight decay can move
  them, and the trained rows are written back when the plan is lifted;
- a frozen-weight convolution whose input needs a gradient runs through a
  function that keeps only the weight (torch's convolution keeps its input too,
  which only a weight gradient needs);
- a bias-only convolution adds its bias after the convolution, so a frozen
  input is not kept for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

from tinyfleet.common.update_plan import PlanError, UpdatePlan, parameter_layers, trained_channels

Optimizer = Literal["sgd", "adam"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _FrozenConv2d(torch.autograd.Function):
    """conv2d with a frozen weight: backward needs only the weight, so only the weight is kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_shape = x.shape
        ctx.conv = conv
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        conv = ctx.conv
        grad_input = conv2d_input(
            ctx.input_shape, weight, grad, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        return grad_input, None, None


def _conv(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    if weight.requires_grad:
        return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    if x.requires_grad:
        return _FrozenConv2d.apply(x, weight, conv)
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.view(shape)


def _planned_forward(
    module: nn.Module, trained: nn.Parameter | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward for `module` under the plan: `trained` is the copy of its first output rows that trains
    (None: the weight is whole, trained or frozen)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    frozen = weight.detach()[trained.shape[0]:] if trained is not None else weight

    def parts(conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
              dim: int) -> torch.Tensor:
        if trained is None:
            return conv(x, frozen)
        return torch.cat([conv(x, trained), conv(x, frozen)], dim=dim)

    if isinstance(module, nn.Conv2d):
        conv_module = module

        def conv_forward(x: torch.Tensor) -> torch.Tensor:
            y = parts(lambda inp, w: _conv(inp, w, conv_module), x, 1)
            return _add_bias(y, conv_module.bias, 1)

        return conv_forward
    if isinstance(module, nn.Linear):
        linear = module

        def linear_forward(x: torch.Tensor) -> torch.Tensor:
            return _add_bias(parts(lambda inp, w: F.linear(inp, w), x, -1), linear.bias, -1)

        return linear_forward
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and trained is not None:
        norm = module

        def norm_forward(x: torch.Tensor) -> torch.Tensor:
            # _BatchNorm.forward with the assembled affine weight
            momentum = norm.momentum or 0.0
            if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
                norm.num_batches_tracked.add_(1)
                if norm.momentum is None:
                    momentum = 1.0 / float(norm.num_batches_tracked)
            keep_stats = not norm.training or norm.track_running_stats
            return F.batch_norm(
                x,
                norm.running_mean if keep_stats else None,
                norm.running_var if keep_stats else None,
                torch.cat([trained, frozen]),
                norm.bias,
                norm.training or norm.running_mean is None,
                momentum,
                norm.eps,
            )

        return norm_forward
    raise PlanError(f"{type(module).__name__} layers cannot run a partial-channel plan")


@dataclass
class _Lifted:
    module: nn.Module
    trained: nn.Parameter


@contextmanager
def planned(model: nn.Module, plan: UpdatePlan) -> Iterator[list[nn.Parameter]]:
    """Within the block, `model` trains only what `plan` says; yields the parameters to optimise.

    On exit the trained rows of partial-channel layers are written into their weights and the
    model's forwards and requires_grad flags are as before.
    """
    plan.check(model)
    layers = dict(parameter_layers(model))
    flags = {p: p.requires_grad for p in model.parameters()}
    patched: list[nn.Module] = []
    lifted: list[_Lifted] = []
    trainable: list[nn.Parameter] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in plan.trained_biases(model):
            bias = layers[name].bias
            assert isinstance(bias, nn.Parameter)
            bias.requires_grad_(True)
            trainable.append(bias)
        for name, fraction in plan.weights.items():
            module = layers[name]
            weight = module.weight
            assert isinstance(weight, nn.Parameter)
            k = trained_channels(module, fraction)
            if k == weight.shape[0]:
                weight.requires_grad_(True)
                trainable.append(weight)
                continue
            trained = nn.Parameter(weight.detach()[:k].clone())
            lifted.append(_Lifted(module, trained))
            trainable.append(trained)
        partial = {id(item.module): item.trained for item in lifted}
        for _, module in layers.items():
            needs_patch = id(module) in partial or (
                isinstance(module, nn.Conv2d) and not module.weight.requires_grad
            )
            if needs_patch:
                if "forward" in vars(module):
                    raise PlanError(f"{type(module).__name__} already has its own forward; cannot plan it")
                if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                    raise PlanError(
                        f"convolution padding mode {module.padding_mode!r} is not planned; only 'zeros'"
                    )
                module.forward = _planned_forward(module, partial.get(id(module)))
                patched.append(module)
        yield trainable
    finally:
        with torch.no_grad():
            for item in lifted:
                weight = item.module.weight
                assert isinstance(weight, torch.Tensor)
                weight[: item.trained.shape[0]].copy_(item.trained)
        for module in patched:
            delattr(module, "forward")
        for p, flag in flags.items():
            p.requires_grad_(flag)


def make_optimizer(params: list[nn.Parameter], optimizer: Optimizer, lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def train_steps(
    model: nn.Module,
    plan: UpdatePlan,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    optimizer: Optimizer = "sgd",
    lr: float = 0.01,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train `model` in place on `batches` under `plan`; returns each step's loss."""
    losses = []
    with planned(model, plan) as params:
        opt = make_optimizer(params, optimizer, lr, weight_decay)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def task_loss(task: str) -> LossFn:
    """The zoo tasks' losses: cross entropy for classifiers, MSE for regression and embeddings."""
    if task == "classification":
        return F.cross_entropy
    return F.mse_loss


@dataclass(frozen=True)
class MeasuredStep:
    """What one training step held at its peak (bytes), measured from the tensors themselves."""

    trainable: int
    gradients: int
    optimizer_state: int
    saved_activations: int

    @property
    def total(self) -> int:
        return self.trainable + self.gradients + self.optimizer_state + self.saved_activations


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def measure_step(model: nn.Module, plan: UpdatePlan, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                 optimizer: Optimizer = "sgd") -> MeasuredStep:
    """One planned training step, measuring what autograd keeps and what the optimizer holds.

    Saved activations: every tensor autograd saves for the backward pass, seen by a
    saved_tensors_hooks pack hook, counted once per storage (a view and its base are one
    allocation), parameters' storages excluded (they are weights, counted as trainable or frozen).
    They are all alive together at the end of the forward pass. Trainable: bytes of the tensors
    the optimizer updates; gradients: their .grad after backward; optimizer state: every tensor
    in the optimizer's state after the step.
    """
    model.zero_grad(set_to_none=True)
    params_storage = {_storage(p)[0] for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = _storage(t)
        if ptr not in params_storage:
            saved[ptr] = nbytes
        return t

    with planned(model, plan) as params:
        params_storage |= {_storage(p)[0] for p in params}
        opt = make_optimizer(params, optimizer, lr=1e-3)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        frozen_grads = [p for p in model.parameters() if p.grad is not None and not p.requires_grad]
        if frozen_grads:
            raise AssertionError(f"{len(frozen_grads)} frozen parameters got a gradient")
        measured = MeasuredStep(
            trainable=sum(p.nbytes for p in params),
            gradients=sum(p.grad.nbytes for p in params if p.grad is not None),
            optimizer_state=sum(
                t.nbytes for state in opt.state.values() for t in state.values() if torch.is_tensor(t)
            ),
            saved_activations=sum(saved.values()),
        )
    return measured
