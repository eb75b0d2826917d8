"""The model zoo: every model a job can name, built the same way on server and device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """What the fleet needs to know about a model without building it."""

    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    task: str
    description: str


def sine_mlp() -> nn.Module:
    """1-64-64-1 tanh MLP: the sine-regression model of the Reptile and TinyReptile papers."""
    return nn.Sequential(
        nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
    )


def occupancy_mlp(inputs: int = 5, hidden: int = 16) -> nn.Module:
    """5-16-16-2 ReLU MLP: room occupied or not from five sensor readings, small enough to train on an MCU."""
    return nn.Sequential(
        nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
    )


class _ChannelsLastConv2d(nn.Conv2d):
    """A convolution whose output is channels-last (NHWC).

    On CPU, mkldnn's pooling, batch norm and ReLU run several times faster on
    NHWC activations, and every later layer keeps the layout. The first layer
    has one input channel, for which NCHW and NHWC strides coincide, so the
    layout has to be set on its output. Parameters keep their usual layout and
    names, so state dicts are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous(memory_format=torch.channels_last)


def conv_blocks(
    channels: int, *, running_stats: bool = True, ceil_mode: bool = False, channels_last: bool = True
) -> list[nn.Module]:
    """4 blocks (conv3x3, batch norm, ReLU, 2x2 max-pool) from one input channel; the first conv's
    output is channels-last (`_ChannelsLastConv2d`) unless `channels_last` is False."""
    blocks: list[nn.Module] = []
    in_ch = 1
    for block in range(4):
        conv = _ChannelsLastConv2d if block == 0 and channels_last else nn.Conv2d
        blocks += [
            conv(in_ch, channels, 3, padding=1),
            nn.BatchNorm2d(channels, track_running_stats=running_stats),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=ceil_mode),
        ]
        in_ch = channels
    return blocks


class OmniglotConv4(nn.Module):
    """4 conv blocks of 64 channels (conv3x3, batch norm, ReLU, 2x2 max-pool) and a linear head.

    MAML's few-shot classifier on 28x28 Omniglot; `features` is the embedding
    (64 channels x 2 x 2 = 256 values) used by prototype methods, `head` the N-way
    classifier. Reptile's paper uses stride-2 convolutions instead of pooling, at a
    third of the CPU per step; measured here, that net learns less per CPU second
    in the budgets a 2-core machine gives (centralised Reptile, 1-shot: 67 % after
    7500 tasks in 388 CPU s against 77 % after 3000 tasks in 322 CPU s for this one).
    """

    def __init__(self, ways: int = 5, channels: int = 64) -> None:
        super().__init__()
        blocks = conv_blocks(channels, running_stats=False, ceil_mode=True)
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(channels * 2 * 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ProtoConv4(nn.Module):
    """Prototypical Networks' Omniglot embedding: 4 blocks (conv3x3, batch norm, ReLU, 2x2 max-pool).

    Snell et al. 2017 (https://arxiv.org/abs/1703.05175): 28x28 -> 64 values, no head; classes are
    the nearest mean embedding. Batch norm keeps running statistics, so in eval mode a device can
    embed one sample at a time, as an online learner must.
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_blocks(channels), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class KeywordsProtoNet(nn.Module):
    """A keyword embedding on log-mel spectrograms [1, 40, 101] (`tinyfleet.client.keywords`).

    Batch norm on the input standardises log power with running statistics (a device feeds raw
    features); 4 blocks (conv3x3, batch norm, ReLU, 2x2 max-pool) shrink 40x101 to 2x6; the mean
    over time makes the embedding (2 bands x `channels`) indifferent to where in the second the
    word falls. Small (about 28k parameters at 32 channels), as ~130 training clips call for.
    """

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.BatchNorm2d(1), *conv_blocks(channels, channels_last=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=3).flatten(1)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("sine-mlp", sine_mlp, (1,), "regression",
                  "1-64-64-1 tanh MLP for sine-wave regression"),
        ModelSpec("omniglot-conv4", OmniglotConv4, (1, 28, 28), "classification",
                  "4x64-channel conv net for 28x28 few-shot character classification"),
        ModelSpec("omniglot-protonet", ProtoConv4, (1, 28, 28), "embedding",
                  "4x64-channel conv embedding (64 values) for nearest-prototype classification, 28x28"),
        ModelSpec("keywords-protonet", KeywordsProtoNet, (1, 40, 101), "embedding",
                  "4x32-channel conv embedding (64 values) of 1 s log-mel spectrograms, nearest prototype"),
        ModelSpec("occupancy-mlp", occupancy_mlp, (5,), "classification",
                  "5-16-16-2 ReLU MLP: occupancy from temperature, humidity, light, CO2 and humidity ratio"),
        ModelSpec("identity", nn.Identity, (5,), "embedding",
                  "no parameters: a sample's features are its embedding (FedProto on raw features, "
                  "e.g. occupancy's five sensor readings)"),
    )
}


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def build_model(name: str, seed: int | None = None, **kwargs: object) -> nn.Module:
    """Build a zoo model; with a seed, its initial weights are reproducible."""
    spec = get_model_spec(name)
    if seed is None:
        return spec.build(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.build(**kwargs)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
