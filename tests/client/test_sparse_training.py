"""Training under an update plan touches only what the plan trains."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinyfleet.client.sparse_training import Optimizer, planned, train_steps
from tinyfleet.common.models import build_model
from tinyfleet.common.update_plan import UpdatePlan, standard_plan


def _batches(n: int, shape: tuple[int, ...], classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, *shape, generator=g), torch.randint(0, classes, (8,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_partial_channels_leave_the_other_channels_bit_identical(optimizer: Optimizer) -> None:
    model = build_model("omniglot-conv4", seed=0, ways=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = UpdatePlan(bias_layers=0, weights={"head": 0.5, "features.12": 0.25, "features.13": 0.125})
    batches = _batches(3, (1, 28, 28), 5)
    train_steps(model, plan, batches, F.cross_entropy, optimizer, lr=0.1, weight_decay=0.1)
    after = model.state_dict()
    for name, rows in [("head.weight", 2), ("features.12.weight", 16), ("features.13.weight", 8)]:
        assert not torch.equal(after[name][:rows], before[name][:rows]), f"{name}: trained rows did not move"
        assert torch.equal(after[name][rows:], before[name][rows:]), f"{name}: frozen rows moved"
    untouched = [k for k in before if k.split(".")[-1] in ("weight", "bias")
                 and k not in ("head.weight", "features.12.weight", "features.13.weight")]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)


def test_frozen_parameters_get_no_gradient_and_the_model_is_restored() -> None:
    model = build_model("omniglot-conv4", seed=0, ways=5)
    plan = UpdatePlan(bias_layers=3, weights={"features.12": 0.5})
    x, y = _batches(1, (1, 28, 28), 5)[0]
    with planned(model, plan) as params:
        F.cross_entropy(model(x), y).backward()
        graded = {n for n, p in model.named_parameters() if p.grad is not None}
        assert graded == {"head.bias", "features.13.bias", "features.12.bias"}
        assert len(params) == 4 and all(p.grad is not None for p in params)  # 3 biases, the 32-row slice
        assert params[-1].shape == (32, 64, 3, 3)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())


def test_bias_only_training_moves_only_biases_and_learns() -> None:
    model = build_model("occupancy-mlp", seed=0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 2] > 0).long()  # "light" decides
    plan = standard_plan("biases", model)
    losses = train_steps(model, plan, [(x, y)] * 60, F.cross_entropy, "adam", lr=0.05)
    assert losses[-1] < losses[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_a_frozen_convolution_passes_the_right_gradient_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 2, 8, 8)
    plan = UpdatePlan(bias_layers=1, weights={"0": 1.0})  # the last conv is bias-only: its weight is frozen
    with planned(model, plan):
        model(x).square().sum().backward()
    reference(x).square().sum().backward()
    sides = (("", model), ("ref.", reference))
    grads = {f"{side}{n}": p.grad for side, m in sides for n, p in m.named_parameters()}
    assert grads["0.weight"] is not None and grads["ref.0.weight"] is not None
    assert torch.allclose(grads["0.weight"], grads["ref.0.weight"], atol=1e-5)
    assert grads["2.bias"] is not None and grads["ref.2.bias"] is not None
    assert torch.allclose(grads["2.bias"], grads["ref.2.bias"], atol=1e-5)
    assert grads["2.weight"] is None

