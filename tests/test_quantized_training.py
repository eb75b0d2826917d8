"""Int8 training: fake quantisation's error, the QAS gradient scales, and QAS's effect on adaptation."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from tinyfleet.common.quantized_training import (
    ACTIVATION_MAX,
    Int8SGD,
    QuantizedConv2d,
    QuantizedLinear,
    fake_quantize,
    quantized_layers,
    to_int8_training,
)
from tinyfleet.simulations.benchmarks import qas


def test_fake_quantisation_is_within_half_a_step_and_saturates() -> None:
    scale = torch.tensor(0.03)
    inside = torch.linspace(-128 * 0.03, 127 * 0.03, 1001)
    error = (fake_quantize(inside, scale, -128, 127) - inside).abs()
    assert float(error.max()) <= 0.015 + 1e-6
    outside = torch.tensor([-10.0, 10.0])
    assert fake_quantize(outside, scale, -128, 127).tolist() == pytest.approx([-128 * 0.03, 127 * 0.03])


def test_gradients_pass_straight_through_inside_the_range_and_stop_where_saturated() -> None:
    x = torch.tensor([0.011, -0.5, 10.0], requires_grad=True)
    fake_quantize(x, torch.tensor(0.03), -128, 127).sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 0.0]


def hand_made_float_layer() -> nn.Linear:
    """Rows peaking at 0.5 and 1.27: s_W = (0.5, 1.27) / 127, and every weight a whole number of s_W."""
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -64 * 0.5 / 127], [1.27, 0.0]]))
        layer.bias.copy_(torch.tensor([0.1, -0.2]))
    return layer


def hand_made_layer() -> QuantizedLinear:
    """The hand-made layer in int8 with inputs up to 2.54: s_x = 0.02."""
    return QuantizedLinear(hand_made_float_layer(), input_peak=2.54)


def test_qas_scales_weight_gradients_by_s_w_and_bias_gradients_by_s_w_s_x_squared() -> None:
    s_w, s_x, lr = torch.tensor([0.5, 1.27]) / 127, 0.02, 1e-6
    for qas_on, weight_factor, bias_factor in ((True, s_w**-2, (s_w * s_x) ** -2), (False, 1.0, 1.0)):
        layer = hand_made_layer()
        assert torch.allclose(layer.weight_scale, s_w) and float(layer.input_scale) == pytest.approx(s_x)
        assert layer.bias_q is not None
        optimizer = Int8SGD(layer, lr=lr, qas=qas_on)
        before_w, before_b = layer.weight_q.detach().clone(), layer.bias_q.detach().clone()
        layer.weight_q.grad, layer.bias_q.grad = torch.ones(2, 2), torch.ones(2)
        optimizer.step()
        expected_w = before_w - lr * torch.as_tensor(weight_factor).view(-1, 1) * torch.ones(2, 2)
        assert torch.allclose(layer.weight_q.detach(), expected_w.clamp(-127, 127), rtol=1e-5)
        assert torch.allclose(layer.bias_q.detach(), before_b - lr * bias_factor * torch.ones(2), rtol=1e-5)


def test_a_qas_step_moves_the_real_weights_as_an_fp32_step_does() -> None:
    float_layer = hand_made_float_layer()
    x = torch.tensor([[0.02 * 37, -0.02 * 100], [0.02 * 127, 0.02 * 3]])  # exact in int8 at s_x = 0.02
    target, lr = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 1e-3
    int8 = QuantizedLinear(float_layer, input_peak=2.54)
    optimizer = Int8SGD(int8, lr=lr)
    nn.functional.mse_loss(int8(x), target).backward()
    optimizer.step()
    fp32 = torch.optim.SGD(float_layer.parameters(), lr=lr)
    nn.functional.mse_loss(float_layer(x), target).backward()
    fp32.step()
    real_weight = int8.weight_q.detach() * int8.weight_scale.view(-1, 1)  # the float shadow, unrounded
    assert int8.bias_q is not None
    real_bias = int8.bias_q.detach() * int8.weight_scale * int8.input_scale
    # the int8 forward differs from fp32 by the bias's rounding to int32 only: far below the step
    assert torch.allclose(real_weight, float_layer.weight.detach(), atol=1e-6)
    assert torch.allclose(real_bias, float_layer.bias.detach(), atol=1e-5)


def test_conversion_keeps_the_model_and_its_outputs_within_quantisation_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.rand(8, 1, 6, 6)
    int8 = to_int8_training(model, x)
    assert [type(layer) for layer in quantized_layers(int8)] == [QuantizedConv2d, QuantizedLinear]
    assert isinstance(model[0], nn.Conv2d)  # the float model is untouched
    with torch.no_grad():
        expected, got = model(x), int8(x)
    assert float((expected - got).abs().max()) < 0.05 * float(expected.abs().max())
    first = quantized_layers(int8)[0]
    assert float(first.input_scale) == pytest.approx(float(x.abs().max()) / ACTIVATION_MAX)


def test_a_model_without_linear_or_conv_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="no linear or conv layer"):
        to_int8_training(nn.Sequential(nn.ReLU()), torch.zeros(1, 2))


def test_int8_adaptation_with_qas_ends_near_fp32_and_far_better_than_without_at_any_rate() -> None:
    """4 seeds, 200 steps (about 15 CPU s): QAS at fp32's learning rate, int8 without QAS at each
    rate of the benchmark's grid from 10 up (below, it barely moves). Deterministic: no timing."""
    torch.set_num_threads(1)
    drifts = [qas.pretrained(seed) for seed in range(4)]
    lr, steps = 0.021544, 200

    def mean_loss(method: str, rate: float) -> float:
        return statistics.mean(qas.adapt(d, method, rate, steps) for d in drifts)

    fp32, with_qas = mean_loss("fp32", lr), mean_loss("int8 + QAS", lr)
    without = {rate: mean_loss("int8", rate) for rate in qas.LR_GRID if rate >= 10}
    assert with_qas < 2 * fp32, (with_qas, fp32)
    best_rate, best = min(without.items(), key=lambda item: item[1])
    assert 2 * with_qas < best, (with_qas, best_rate, best)
