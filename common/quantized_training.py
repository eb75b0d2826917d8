"""Int8 training with fake-quantised layers and QAS (Lin et al. 2022, arXiv 2206.15472, section 2).

A microcontroller trains the int8 graph itself: a layer stores its weights as int8 in units of a
per-output-channel scale s_W, its bias as int32 in units of s_W * s_x, and quantises its input to
int8 with a per-tensor scale s_x; the real weight is s_W * W_q. The trainable numbers are W_q and
b_q, so their gradients are s_W * dL/dW and s_W s_x * dL/db, and each step moves the real weight
by s_W^2 and the real bias by (s_W s_x)^2 times what the same step does in fp32: with s_W ~ 1e-3
and s_x ~ 1e-2, weights barely move and biases not at all, by amounts that differ per layer and per
channel, so no single learning rate suits them. QAS (quantization-aware scaling) multiplies the
gradient of W_q by s_W^-2 and of b_q by (s_W s_x)^-2, which makes an int8 SGD step move the real
weights as an fp32 step would, and the learning rate of the float model carries over.

Here the int8 graph is simulated in float ("fake quantisation"): forward uses the rounded,
saturated integers times their scales, which is what int8 kernels compute; backward passes
gradients straight through the rounding (STE) and stops them where a value saturates. Scales are
fixed when a float model is converted (weights: max |W| of each output channel / 127; activations:
max |x| on a calibration batch / 127), as a deployed int8 model's are. The weights keep a float
shadow between steps, as the paper's training code does, and are saturated to int8's range after
each step. This lives in common/ because both sides need it: the coordinator can convert a
pretrained model before shipping it, the device trains it.

The optimizer is plain SGD without momentum, as the paper's int8 runs use: momentum would keep a
float copy of every trained weight, the memory the sparse update is there to save.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

#: Symmetric int8: weights use [-127, 127] (so that -W is representable), activations [-128, 127].
WEIGHT_MAX = 127
ACTIVATION_MIN, ACTIVATION_MAX = -128, 127
#: A scale is never below this: an all-zero channel or input would otherwise divide by zero.
_SMALLEST_SCALE = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (x.round() - x).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """The integers (as floats) that represent x at this scale; gradient straight through inside
    [low, high], zero where the value saturates."""
    return torch.clamp(round_ste(x / scale), low, high)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """x as int8 hardware sees it: rounded to a multiple of scale and saturated."""
    return quantize(x, scale, low, high) * scale


def channel_scales(weight: torch.Tensor) -> torch.Tensor:
    """One scale per output channel (dimension 0), mapping the channel's largest |w| to 127."""
    peak = weight.detach().abs().flatten(1).amax(dim=1)
    return torch.clamp(peak / WEIGHT_MAX, min=_SMALLEST_SCALE)


def tensor_scale(peak: float) -> torch.Tensor:
    """The per-tensor activation scale mapping |x| <= peak into int8."""
    return torch.tensor(max(peak / ACTIVATION_MAX, _SMALLEST_SCALE))


class QuantizedLayer(nn.Module):
    """What int8 linear and conv layers share: integer-unit parameters, their scales, QAS factors.

    `weight_q` holds W / s_W (per output channel), `bias_q` holds b / (s_W s_x); both are float
    tensors whose forward use is rounded, so the parameter names differ from the float layer's on
    purpose: a float state dict cannot be loaded into an int8 layer by mistake.
    """

    weight_scale: torch.Tensor  # [out_channels]
    input_scale: torch.Tensor  # scalar

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_peak: float) -> None:
        super().__init__()
        scales = channel_scales(weight)
        x_scale = tensor_scale(input_peak)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("weight_scale", scales)
        self.register_buffer("input_scale", x_scale)
        self.weight_q = nn.Parameter((weight.detach() / scales.view(shape)).round())
        self.bias_q = (
            None if bias is None else nn.Parameter((bias.detach() / (scales * x_scale)).round())
        )

    def _shape(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self.weight_q.dim() - 1)

    def real_weight(self) -> torch.Tensor:
        """The weight the int8 kernel multiplies by, in float units (gradient flows to weight_q)."""
        integers = torch.clamp(round_ste(self.weight_q), -WEIGHT_MAX, WEIGHT_MAX)
        return integers * self.weight_scale.view(self._shape())

    def real_bias(self) -> torch.Tensor | None:
        """The int32 bias in float units; int32 does not saturate at the sizes trained here."""
        if self.bias_q is None:
            return None
        return round_ste(self.bias_q) * self.weight_scale * self.input_scale

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.input_scale, ACTIVATION_MIN, ACTIVATION_MAX)

    def qas_factors(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """Each parameter with what QAS multiplies its gradient by: s_W^-2 for the weight,
        (s_W s_x)^-2 for the bias, per output channel."""
        yield self.weight_q, self.weight_scale.pow(-2).view(self._shape())
        if self.bias_q is not None:
            yield self.bias_q, (self.weight_scale * self.input_scale).pow(-2)

    @torch.no_grad()
    def saturate_(self) -> None:
        """Keep the stored weights within int8's range after an update."""
        self.weight_q.clamp_(-WEIGHT_MAX, WEIGHT_MAX)


class QuantizedLinear(QuantizedLayer):
    def __init__(self, layer: nn.Linear, input_peak: float) -> None:
        super().__init__(layer.weight, layer.bias, input_peak)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.real_weight(), self.real_bias())


class QuantizedConv2d(QuantizedLayer):
    def __init__(self, layer: nn.Conv2d, input_peak: float) -> None:
        if layer.padding_mode != "zeros":
            raise ValueError(f"int8 conv supports zero padding only, not padding_mode={layer.padding_mode!r}")
        super().__init__(layer.weight, layer.bias, input_peak)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.quantized_input(x),
            self.real_weight(),
            self.real_bias(),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


def quantized_layers(model: nn.Module) -> list[QuantizedLayer]:
    return [m for m in model.modules() if isinstance(m, QuantizedLayer)]


@torch.no_grad()
def to_int8_training(model: nn.Module, calibration_input: torch.Tensor) -> nn.Module:
    """A copy of `model` whose linear and conv layers train as int8 (the original is untouched).

    Activation scales come from one forward pass over `calibration_input` (a batch the device
    has, e.g. the first of its stream): each layer's largest |input| maps to 127. Other modules
    (activations, pooling, batch norm) stay float.
    """
    converted = copy.deepcopy(model)
    peaks: dict[str, float] = {}
    handles = []
    for name, module in converted.named_modules():
        if isinstance(module, nn.Linear | nn.Conv2d):

            def record(_: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
                peaks[name] = max(peaks.get(name, 0.0), float(inputs[0].abs().max()))

            handles.append(module.register_forward_pre_hook(record))
    if not handles:
        raise ValueError(f"{type(model).__name__} has no linear or conv layer to quantise")
    was_training = converted.training
    converted.eval()
    converted(calibration_input)
    converted.train(was_training)
    for handle in handles:
        handle.remove()
    for name, peak in peaks.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = converted.get_submodule(parent_name)
        layer = getattr(parent, attribute)
        int8: QuantizedLayer = (
            QuantizedLinear(layer, peak) if isinstance(layer, nn.Linear) else QuantizedConv2d(layer, peak)
        )
        setattr(parent, attribute, int8)
    return converted


class Int8SGD:
    """Plain SGD (no momentum) over an int8-training model, with QAS unless `qas=False`.

    Parameters outside the int8 layers (e.g. batch norm's) get unscaled gradients. Each step
    scales the gradients in place, updates, and saturates the int8 weights.
    """

    def __init__(self, model: nn.Module, lr: float, qas: bool = True) -> None:
        self.layers = quantized_layers(model)
        if not self.layers:
            raise ValueError("the model has no int8 layer: convert it with to_int8_training first")
        self.qas = qas
        self.factors = [f for layer in self.layers for f in layer.qas_factors()] if qas else []
        self.sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)

    def zero_grad(self) -> None:
        self.sgd.zero_grad()

    @torch.no_grad()
    def step(self) -> None:
        for parameter, factor in self.factors:
            if parameter.grad is not None:
                parameter.grad.mul_(factor)
        self.sgd.step()
        for layer in self.layers:
            layer.saturate_()
