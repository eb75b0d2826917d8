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

from tinyfleet.client.omniglot import DRAWERS, OmniglotSplit, TaskStream, images_of


def central_task(
    root: Path, ways: int, seed: int, split: str = "alphabets"
) -> Callable[[int], TaskStream]:
    """i -> stream of the i-th task over all training classes (centralised Reptile)."""
    chosen = OmniglotSplit(split)
    images = chosen.images("train", str(root))
    pool = chosen.train_classes()

    def task(index: int) -> TaskStream:
        return TaskStream(images, pool, ways, np.random.default_rng([seed, 7, index]))

    return task


@dataclass
class OmniglotTaskSet:
    """`count` N-way K-shot tasks on the split's test classes, `queries` per class."""

    root: Path
    count: int
    ways: int = 5
    shots: int = 1
    queries: int = 5
    seed: int = 0
    split: str = "alphabets"

    def __post_init__(self) -> None:
        chosen = OmniglotSplit(self.split)
        self.images = chosen.images("test", str(self.root))
        self.classes = chosen.test_classes()

    def __len__(self) -> int:
        return self.count

    def episode(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 11, self.shots, index])
        classes = rng.choice(self.classes, self.ways, replace=False)
        drawers = np.stack([rng.choice(DRAWERS, self.shots + self.queries, replace=False) for _ in classes])

        def pick(columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
            d = drawers[:, columns]
            labels = np.repeat(np.arange(self.ways), d.shape[1])
            return images_of(self.images, classes, labels, d.reshape(-1)), torch.from_numpy(labels)

        support, query = pick(slice(0, self.shots)), pick(slice(self.shots, None))
        return support[0], support[1], query[0], query[1]
