from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from tinyfleet.common.learning import make_optimizer
from tinyfleet.common.optimizer_memory import OptimizerMemory


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def test_a_remembered_adam_continues_exactly_where_one_long_adam_would_be() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(4, 3) for _ in range(6)]
    one = nn.Linear(3, 2)
    two = nn.Linear(3, 2)
    two.load_state_dict(one.state_dict())
    _steps(one, make_optimizer("adam", one.parameters(), 0.01), batches)

    memory = OptimizerMemory()
    for part in (batches[:3], batches[3:]):  # a fresh optimizer object per "round"
        opt = make_optimizer("adam", two.parameters(), 0.01)
        memory.restore(opt, two.named_parameters())
        _steps(two, opt, part)
        memory = OptimizerMemory.from_record(memory_record(memory, opt, two))  # through the wire format
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(one.state_dict())
    _steps(fresh, make_optimizer("adam", fresh.parameters(), 0.01), batches[3:])
    assert not torch.allclose(fresh.weight, two.weight)  # without the memory the path differs


def memory_record(memory: OptimizerMemory, opt: torch.optim.Optimizer, model: nn.Module) -> ArrayRecord:
    memory.capture(opt, model.named_parameters())
    record = memory.to_record()
    assert set(record) >= {"weight::exp_avg_sq", "weight::step", "bias::exp_avg"}
    return record


def test_state_of_a_reshaped_parameter_is_dropped_and_bad_keys_are_named() -> None:
    small = nn.Linear(3, 2)
    opt = make_optimizer("adam", small.parameters(), 0.01)
    _steps(small, opt, [torch.randn(2, 3)])
    memory = OptimizerMemory()
    memory.capture(opt, small.named_parameters())
    bigger = nn.Linear(3, 5)
    fresh = make_optimizer("adam", bigger.parameters(), 0.01)
    memory.restore(fresh, bigger.named_parameters())
    assert fresh.state[bigger.weight] == {} and fresh.state[bigger.bias] == {}
    with pytest.raises(ValueError, match="'weight' is not 'parameter::field'"):
        OptimizerMemory.from_record(ArrayRecord({"weight": Array(torch.zeros(2).numpy())}))
