"""Learning primitives the device handlers and the simulations share, so training and meta-testing
adapt, predict and score the same way.

`adapt` is the one K-shot adaptation routine (partial local reconstruction first, then every
parameter); `predict` is non-transductive for batch-statistics models; `episode_metrics` scores a
support/query episode before and after adaptation. `prototypical_loss` trains an embedding the way
Prototypical Networks do, for devices that then classify by nearest class mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from tinyfleet.common.models import get_model_spec
from tinyfleet.common.optimizer_memory import OptimizerMemory
from tinyfleet.common.reptile_protocol import is_local

Sampler = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def loss_fn(model_name: str) -> nn.Module:
    return nn.MSELoss() if get_model_spec(model_name).task == "regression" else nn.CrossEntropyLoss()


def make_optimizer(kind: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """"sgd", or "adam" as Reptile uses it: no momentum (beta1 = 0), so steps stay task-local."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {kind!r}")


def reset_local(model: nn.Module, local_layers: Sequence[str]) -> None:
    """Local layers restart from zero: a new task's head owes nothing to the last one."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_local(name, local_layers):
                param.zero_()


def adapt(
    model: nn.Module,
    sample: Sampler,
    *,
    steps: int,
    lr: float,
    batch: int,
    criterion: nn.Module,
    optimizer: str = "sgd",
    local_layers: Sequence[str] = (),
    reconstruct_steps: int = 0,
    memory: OptimizerMemory | None = None,
) -> list[float]:
    """Reconstruct local layers (global frozen), then `steps` steps on all parameters; returns losses.

    With `memory`, the optimizer of the main phase starts from the state the last
    adaptation left there and leaves its own (Reptile keeps Adam's moments across tasks).
    """
    model.train()
    losses: list[float] = []
    phases: list[tuple[list[nn.Parameter], int, OptimizerMemory | None]] = []
    if local_layers and reconstruct_steps > 0:
        local = [p for n, p in model.named_parameters() if is_local(n, local_layers)]
        phases.append((local, reconstruct_steps, None))
    phases.append((list(model.parameters()), steps, memory))
    for params, count, kept in phases:
        opt = make_optimizer(optimizer, params, lr)
        if kept is not None:
            kept.restore(opt, model.named_parameters())
        for _ in range(count):
            x, y = sample(batch)
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if kept is not None:
            kept.capture(opt, model.named_parameters())
    return losses


def predict(model: nn.Module, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    """Outputs for the queries. With batch-statistics normalisation each query is
    evaluated together with the support set alone (non-transductive), so one
    query never informs another's prediction."""
    model.train()  # batch norm without running stats always uses batch statistics
    with torch.no_grad():
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return model(query_x)
        outs = [model(torch.cat([support_x, q[None]]))[-1] for q in query_x]
        return torch.stack(outs)


def task_loss(model_name: str, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    values = {"loss": float(loss_fn(model_name)(out, y))}
    if get_model_spec(model_name).task == "classification":
        values["acc"] = float((out.argmax(dim=1) == y).float().mean())
    return values


def episode_metrics(
    model: nn.Module,
    model_name: str,
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    lr: float,
    optimizer: str,
    local_layers: Sequence[str],
    reconstruct_steps: int,
) -> dict[str, float]:
    """Query loss/accuracy before and after full-batch adaptation on the support set."""
    before = task_loss(model_name, predict(model, support[0], query[0]), query[1])
    adapt(
        model,
        lambda _n: support,
        steps=steps,
        lr=lr,
        batch=len(support[0]),
        criterion=loss_fn(model_name),
        optimizer=optimizer,
        local_layers=local_layers,
        reconstruct_steps=reconstruct_steps,
    )
    after = task_loss(model_name, predict(model, support[0], query[0]), query[1])
    return {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}}


def prototypical_loss(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of queries over negative squared distances to the support's class means
    (Snell et al. 2017, https://arxiv.org/abs/1703.05175), and the queries' accuracy.

    Labels are 0..N-1; each class needs at least one support embedding.
    """
    ways = int(support_y.max()) + 1
    counts = torch.bincount(support_y, minlength=ways)
    if bool((counts == 0).any()):
        raise ValueError(f"every class 0..{ways - 1} needs a support example; missing: "
                         f"{torch.nonzero(counts == 0).flatten().tolist()}")
    sums = torch.zeros(ways, support.shape[1], dtype=support.dtype).index_add_(0, support_y, support)
    prototypes = sums / counts[:, None].to(support.dtype)
    logits = -torch.cdist(query, prototypes).pow(2)
    loss = nn.functional.cross_entropy(logits, query_y)
    return loss, float((logits.argmax(dim=1) == query_y).float().mean())
