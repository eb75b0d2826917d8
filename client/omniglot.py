"""Omniglot as a device's data source: loading, the two train/test splits, and one device's stream.

Images come from ``omniglot/images_{background,evaluation}.npz`` under the data
folder (``--data-dir``, else ``$TINYFLEET_DATA``, else ``../shared/data`` next to
the project), downsampled to 28x28 with ink = 1. Two splits (`OmniglotSplit`):

- "alphabets" (Lake et al.'s own): train on the 964 characters of the 30
  background alphabets, test on the 659 of the 20 evaluation alphabets, so test
  alphabets are unseen; test classes without rotations.
- "characters" (Vinyals et al. 2016, https://arxiv.org/abs/1606.04080, as used by
  MAML, Reptile and Prototypical Networks): all 1623 characters, 1200 train and
  423 test, drawn by a fixed seeded shuffle as MAML's and Reptile's code do (their
  own lists are not shipped with the data, so the characters differ from theirs;
  the sizes and the protocol are the same), test classes with rotations.

Training alphabets (the characters of an alphabet that fall into the training
part) are dealt round-robin to the devices, so each device sees a few alphabets
(non-IID), and each character's four 90° rotations are distinct classes.
Drawers 0-14 feed a device's stream and 15-19 are its held-back samples.
Meta-test tasks (tinyfleet.simulations.omniglot) use the test characters, which
no device ever sees.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
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
#: The evaluation alphabets, numbered after the background ones in the combined numbering.
EVALUATION_ALPHABETS: tuple[tuple[str, int], ...] = (
    ("Angelic", 20),
    ("Atemayar_Qelisayer", 26),
    ("Atlantean", 26),
    ("Aurek-Besh", 26),
    ("Avesta", 26),
    ("Ge_ez", 26),
    ("Glagolitic", 45),
    ("Gurmukhi", 45),
    ("Kannada", 41),
    ("Keble", 26),
    ("Malayalam", 47),
    ("Manipuri", 40),
    ("Mongolian", 30),
    ("Old_Church_Slavonic_(Cyrillic)", 45),
    ("Oriya", 46),
    ("Sylheti", 28),
    ("Syriac_(Serto)", 23),
    ("Tengwar", 25),
    ("Tibetan", 42),
    ("ULOG", 26),
)
SPLITS = ("alphabets", "characters")
#: Training characters of the "characters" split (Vinyals et al. 2016); the rest are the test set.
CHARACTER_SPLIT_TRAIN = 1200
CHARACTER_SPLIT_SEED = 1
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
    alphabets = BACKGROUND_ALPHABETS if split == "background" else EVALUATION_ALPHABETS
    if chars != sum(n for _, n in alphabets):
        raise ValueError(
            f"{path} holds {chars} characters; the {split} alphabets add up to {sum(n for _, n in alphabets)}"
        )
    return out


@functools.lru_cache(maxsize=2)
def load_all(root: str) -> torch.Tensor:
    """Background then evaluation characters in one tensor: the combined numbering (cached)."""
    return torch.cat([load_split("background", root), load_split("evaluation", root)])


def alphabet_characters(alphabet: int) -> range:
    """Character ids of one alphabet (background alphabets first) in the combined numbering."""
    sizes = [n for _, n in BACKGROUND_ALPHABETS + EVALUATION_ALPHABETS]
    start = sum(sizes[:alphabet])
    return range(start, start + sizes[alphabet])


def device_alphabets(device: int, devices: int, alphabets: int | None = None) -> list[int]:
    """Alphabets dealt round-robin: device d sees alphabets d, d+devices, ..."""
    return list(range(device, len(BACKGROUND_ALPHABETS) if alphabets is None else alphabets, devices))


@dataclass(frozen=True)
class OmniglotSplit:
    """Which characters train and which test; ids index the tensor `images` returns for that part."""

    name: str = "alphabets"

    def __post_init__(self) -> None:
        if self.name not in SPLITS:
            raise DataSpecError(f"omniglot: split must be one of {', '.join(SPLITS)}, got {self.name!r}")

    def images(self, part: str, root: str) -> torch.Tensor:
        if self.name == "characters":
            return load_all(root)
        return load_split("background" if part == "train" else "evaluation", root)

    def _character_order(self) -> np.ndarray:
        total = sum(n for _, n in BACKGROUND_ALPHABETS + EVALUATION_ALPHABETS)
        return np.random.default_rng(CHARACTER_SPLIT_SEED).permutation(total)

    def train_alphabets(self) -> list[list[int]]:
        """Per alphabet with training characters, those characters (the unit devices are dealt)."""
        if self.name == "alphabets":
            return [list(alphabet_characters(a)) for a in range(len(BACKGROUND_ALPHABETS))]
        train = set(self._character_order()[:CHARACTER_SPLIT_TRAIN].tolist())
        alphabets = len(BACKGROUND_ALPHABETS) + len(EVALUATION_ALPHABETS)
        groups = [[c for c in alphabet_characters(a) if c in train] for a in range(alphabets)]
        return [g for g in groups if g]

    def train_classes(self) -> np.ndarray:
        """Every training class: character * 4 + rotation."""
        chars = [c for group in self.train_alphabets() for c in group]
        return np.array([c * 4 + r for c in chars for r in range(4)])

    def test_classes(self) -> np.ndarray:
        """Test classes (character * 4 + rotation): evaluation characters unrotated, or the
        characters split's 423 with their rotations."""
        if self.name == "alphabets":
            return np.arange(sum(n for _, n in EVALUATION_ALPHABETS)) * 4
        chars = np.sort(self._character_order()[CHARACTER_SPLIT_TRAIN:])
        return np.array([c * 4 + r for c in chars for r in range(4)])


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

    def episode(
        self, ways: int, shots: int, queries: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fresh `ways`-way episode from the whole pool (Prototypical Networks' training unit):
        support and query images of distinct stream drawers, labels 0..ways-1 in class order."""
        if len(self.pool) < ways or shots + queries > len(STREAM_DRAWERS):
            raise DataSpecError(
                f"omniglot: a {ways}-way episode of {shots}+{queries} drawers needs {ways} classes and "
                f"{shots + queries} drawers; this stream has {len(self.pool)} and {len(STREAM_DRAWERS)}"
            )
        classes = self.rng.choice(self.pool, ways, replace=False)
        drawers = np.stack(
            [self.rng.choice(np.array(STREAM_DRAWERS), shots + queries, replace=False) for _ in classes]
        )
        labels = np.repeat(np.arange(ways), shots + queries)
        images = images_of(self.images, classes, labels, drawers.reshape(-1))
        images = images.reshape(ways, shots + queries, 1, SIZE, SIZE)
        y = torch.arange(ways)
        support, query = images[:, :shots].flatten(0, 1), images[:, shots:].flatten(0, 1)
        return support, y.repeat_interleave(shots), query, y.repeat_interleave(queries)


class OmniglotDeviceStream(TaskStream):
    """One device of a non-IID fleet: tasks from its own alphabets, held-back drawers for evaluation."""

    def __init__(
        self, device: int, devices: int, ways: int, seed: int, root: Path, split: str = "alphabets"
    ) -> None:
        self.split = OmniglotSplit(split)
        alphabets = self.split.train_alphabets()
        if not 0 <= device < devices <= len(alphabets):
            raise DataSpecError(
                f"omniglot: need 0 <= device < devices <= {len(alphabets)} (training alphabets of the "
                f"{split} split), got device={device}, devices={devices}"
            )
        chars = [c for a in device_alphabets(device, devices, len(alphabets)) for c in alphabets[a]]
        pool = np.array([c * 4 + r for c in chars for r in range(4)])
        super().__init__(
            self.split.images("train", str(root)), pool, ways, np.random.default_rng([seed, device])
        )
        held = np.random.default_rng([seed, device, 1])
        self._holdout_classes = held.choice(pool, ways, replace=False)
        self._root = str(root)

    def __getstate__(self) -> dict[str, object]:
        """Checkpoints keep the stream's position, not the 60 MB of images every device shares."""
        return {k: v for k, v in self.__dict__.items() if k != "images"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.images = self.split.images("train", self._root)

    @classmethod
    def from_spec(
        cls,
        device: str = "0",
        devices: str = "10",
        ways: str = "5",
        seed: str = "0",
        dir: str | None = None,
        split: str = "alphabets",
    ) -> OmniglotDeviceStream:
        try:
            numbers = int(device), int(devices), int(ways), int(seed)
        except ValueError:
            raise DataSpecError("omniglot: device, devices, ways and seed must be integers") from None
        return cls(*numbers, root=data_root(dir), split=split)

    def label_names(self, labels: torch.Tensor, held: bool = False) -> list[str]:
        """The class each task label stands for in the current task (or the held-back one), named by
        its id in the split's training classes (character * 4 + rotation): the same on every device."""
        classes = self._holdout_classes if held else self.classes
        return [str(int(classes[i])) for i in labels.tolist()]

    def holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed task on held-back drawers, class-interleaved: the first `ways * k` are a k-shot support."""
        labels = np.arange(n) % self.ways
        drawers = np.array(HELD_BACK_DRAWERS)[(np.arange(n) // self.ways) % len(HELD_BACK_DRAWERS)]
        return images_of(self.images, self._holdout_classes, labels, drawers), torch.from_numpy(labels)
