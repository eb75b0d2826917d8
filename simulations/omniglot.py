"""Omniglot task sets for simulations: centralised Reptile's tasks and the meta-test episodes.

The data and the device streams are the client's (tinyfleet.client.omniglot): a
simulated device reads Omniglot exactly as an agent started with
`--data omniglot:...` does. Meta-test tasks use the evaluation characters, which
no device ever sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyfleet.client.omniglot import DRAWERS, TaskStream, load_split


def central_task(root: Path, ways: int, seed: int) -> Callable[[int], TaskStream]:
    """i -> stream of the i-th task over all background classes (centralised Reptile)."""
    images = load_split("background", str(root))
    pool = np.arange(images.shape[0] * 4)

    def task(index: int) -> TaskStream:
        return TaskStream(images, pool, ways, np.random.default_rng([seed, 7, index]))

    return task


@dataclass
class OmniglotTaskSet:
    """`count` N-way K-shot tasks on evaluation characters (no rotations), `queries` per class."""

    root: Path
    count: int
    ways: int = 5
    shots: int = 1
    queries: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        self.images = load_split("evaluation", str(self.root))

    def __len__(self) -> int:
        return self.count

    def episode(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 11, self.shots, index])
        chars = rng.choice(self.images.shape[0], self.ways, replace=False)
        drawers = np.stack([rng.choice(DRAWERS, self.shots + self.queries, replace=False) for _ in chars])

        def pick(columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
            d = drawers[:, columns]
            labels = np.repeat(np.arange(self.ways), d.shape[1])
            x = self.images[torch.from_numpy(chars[labels]), torch.from_numpy(d.reshape(-1))]
            return x, torch.from_numpy(labels)

        support, query = pick(slice(0, self.shots)), pick(slice(self.shots, None))
        return support[0], support[1], query[0], query[1]
