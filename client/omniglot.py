"""Omniglot as a device's data source: loading, and one device's stream of a non-IID fleet.

Images come from ``omniglot/images_{background,evaluation}.npz`` under the data
folder (``--data-dir``, else ``$TINYFLEET_DATA``, else ``../shared/data`` next to
the project), downsampled to 28x28 with ink = 1. Background characters train:
the 30 alphabets are dealt round-robin to the devices (each sees a few
alphabets), and each character's four 90° rotations are distinct classes.
Drawers 0-14 feed a device's stream and 15-19 are its held-back samples.
Meta-test tasks (tinyfleet.simulations.omniglot) use the evaluation characters,
which no device ever sees.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tinyfleet.client.data_sources import DataSpecError

#: Characters per alphabet in the original numbering (ids run contiguously by alphabet).
BACKGROUND_ALPHABETS: tuple[tuple[str, int], ...] = (
    ("Alphabet_of_the_Magi", 20),
    ("Anglo-Saxon_Futhorc", 29),
    ("Arcadian", 26),
    ("Armenian", 41),
    ("Asomtavruli_(Georgian)", 40),
    ("Balinese", 24),
    ("Bengali", 46),
    ("Blackfoot_(Canadian_Aboriginal_Syllabics)", 14),
    ("Braille", 26),
    ("Burmese_(Myanmar)", 34),
    ("Cyrillic", 33),
    ("Early_Aramaic", 22),
    ("Futurama", 26),
    ("Grantha", 43),
    ("Greek", 24),
    ("Gujarati", 48),
    ("Hebrew", 22),
    ("Inuktitut_(Canadian_Aboriginal_Syllabics)", 16),
    ("Japanese_(hiragana)", 52),
    ("Japanese_(katakana)", 47),
    ("Korean", 40),
    ("Latin", 26),
    ("Malay_(Jawi_-_Arabic)", 40),
    ("Mkhedruli_(Georgian)", 41),
    ("N_Ko", 33),
    ("Ojibwe_(Canadian_Aboriginal_Syllabics)", 14),
    ("Sanskrit", 42),
    ("Syriac_(Estrangelo)", 23),
    ("Tagalog", 17),
    ("Tifinagh", 55),
)
SIZE = 28
DRAWERS = 20
STREAM_DRAWERS = tuple(range(15))
HELD_BACK_DRAWERS = tuple(range(15, 20))


def data_root(data_dir: str | Path | None = None) -> Path:
    """The folder holding omniglot/: the argument, else $TINYFLEET_DATA, else ../shared/data."""
    if data_dir:
        return Path(data_dir)
    if os.environ.get("TINYFLEET_DATA"):
        return Path(os.environ["TINYFLEET_DATA"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@functools.lru_cache(maxsize=4)
def load_split(split: str, root: str) -> torch.Tensor:
    """[characters, 20, 1, 28, 28] float32 images of a split, ink = 1 (cached per process)."""
    path = Path(root) / "omniglot" / f"images_{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"Omniglot {split} set not found at {path}; pass --data-dir DIR (the folder holding "
            "omniglot/) or set TINYFLEET_DATA"
        )
    with np.load(path) as data:
        images = data["images"]
    chars = images.shape[0]
    out = torch.empty(chars, DRAWERS, 1, SIZE, SIZE)
    for start in range(0, chars, 64):  # chunks keep the float copy of 105x105 images small
        block = torch.from_numpy(~images[start : start + 64]).float().reshape(-1, 1, 105, 105)
        small = F.interpolate(block, size=(SIZE, SIZE), mode="area")
        out[start : start + 64] = small.reshape(-1, DRAWERS, 1, SIZE, SIZE)
    if split == "background" and chars != sum(n for _, n in BACKGROUND_ALPHABETS):
        raise ValueError(
            f"{path} holds {chars} characters; the background alphabets add up to "
            f"{sum(n for _, n in BACKGROUND_ALPHABETS)}"
        )
    return out


def alphabet_characters(alphabet: int) -> range:
    start = sum(n for _, n in BACKGROUND_ALPHABETS[:alphabet])
    return range(start, start + BACKGROUND_ALPHABETS[alphabet][1])


def device_alphabets(device: int, devices: int) -> list[int]:
    """Alphabets dealt round-robin: device d sees alphabets d, d+devices, ..."""
    return list(range(device, len(BACKGROUND_ALPHABETS), devices))


def images_of(
    images: torch.Tensor, classes: np.ndarray, labels: np.ndarray, drawers: np.ndarray
) -> torch.Tensor:
    """Images for (class, drawer) pairs; a class is (character, rotation) packed as char * 4 + rot."""
    batch = images[torch.from_numpy(classes[labels] // 4), torch.from_numpy(drawers)]
    rotations = classes[labels] % 4
    for r in (1, 2, 3):
        sel = torch.from_numpy(np.flatnonzero(rotations == r))
        if len(sel):
            batch[sel] = torch.rot90(batch[sel], r, dims=(2, 3))
    return batch


class TaskStream:
    """Samples of one N-way task at a time from a pool of classes; `new_task` draws the next task."""

    kind = "omniglot"

    def __init__(self, images: torch.Tensor, pool: np.ndarray, ways: int, rng: np.random.Generator) -> None:
        if len(pool) < ways:
            raise DataSpecError(f"omniglot: {len(pool)} classes available, a {ways}-way task needs more")
        self.images, self.pool, self.ways, self.rng = images, pool, ways, rng
        self.classes = self.rng.choice(self.pool, self.ways, replace=False)

    def new_task(self) -> None:
        self.classes = self.rng.choice(self.pool, self.ways, replace=False)

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.rng.integers(self.ways, size=n)
        drawers = self.rng.choice(np.array(STREAM_DRAWERS), size=n)
        return images_of(self.images, self.classes, labels, drawers), torch.from_numpy(labels)


class OmniglotDeviceStream(TaskStream):
    """One device of a non-IID fleet: tasks from its own alphabets, held-back drawers for evaluation."""

    def __init__(self, device: int, devices: int, ways: int, seed: int, root: Path) -> None:
        if not 0 <= device < devices <= len(BACKGROUND_ALPHABETS):
            raise DataSpecError(
                f"omniglot: need 0 <= device < devices <= {len(BACKGROUND_ALPHABETS)}, "
                f"got device={device}, devices={devices}"
            )
        chars = [c for a in device_alphabets(device, devices) for c in alphabet_characters(a)]
        pool = np.array([c * 4 + r for c in chars for r in range(4)])
        super().__init__(
            load_split("background", str(root)), pool, ways, np.random.default_rng([seed, device])
        )
        held = np.random.default_rng([seed, device, 1])
        self._holdout_classes = held.choice(pool, ways, replace=False)
        self._root = str(root)

    def __getstate__(self) -> dict[str, object]:
        """Checkpoints keep the stream's position, not the 60 MB of images every device shares."""
        return {k: v for k, v in self.__dict__.items() if k != "images"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.images = load_split("background", self._root)

    @classmethod
    def from_spec(
        cls, device: str = "0", devices: str = "10", ways: str = "5", seed: str = "0", dir: str | None = None
    ) -> OmniglotDeviceStream:
        try:
            numbers = int(device), int(devices), int(ways), int(seed)
        except ValueError:
            raise DataSpecError("omniglot: device, devices, ways and seed must be integers") from None
        return cls(*numbers, root=data_root(dir))

    def holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed task on held-back drawers, class-interleaved: the first `ways * k` are a k-shot support."""
        labels = np.arange(n) % self.ways
        drawers = np.array(HELD_BACK_DRAWERS)[(np.arange(n) // self.ways) % len(HELD_BACK_DRAWERS)]
        return images_of(self.images, self._holdout_classes, labels, drawers), torch.from_numpy(labels)
