"""Spoken keywords (Speech Commands subset) as log-mel spectrograms, and a device's stream of chosen words.

Clips live in ``speech_commands_subset/WORD/SPEAKER_nohash_N.wav`` under the data
folder (``dir=`` in the spec or ``--data-dir``, else ``$TINYFLEET_DATA``, else
``../shared/data``): 16 kHz mono 16-bit, at most 1 s, zero-padded to 1 s.
Features are computed in torch (no torchaudio wheel matches the CPU torch):
a 25 ms Hann window every 10 ms, 512-point FFT, 40 mel bands (HTK scale,
20 Hz to 8 kHz), log power; a clip becomes [1, 40, 101].
"""

from __future__ import annotations

import functools
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyfleet.client.data_sources import DataSpecError
from tinyfleet.client.omniglot import data_root

SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s
N_FFT = 512
WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_MELS = 40
F_MIN, F_MAX = 20.0, SAMPLE_RATE / 2
FRAMES = 1 + CLIP_SAMPLES // HOP_LENGTH
LOG_FLOOR = 1e-6  # keeps silence (zero padding) finite
FOLDER = "speech_commands_subset"
_CLIP_NAME = re.compile(r"^(?P<speaker>.+)_nohash_(?P<take>\d+)\.wav$")


@dataclass(frozen=True)
class Clip:
    word: str
    speaker: str
    path: Path


def keywords_folder(root: str | Path | None = None) -> Path:
    folder = data_root(root) / FOLDER
    if not folder.is_dir():
        raise FileNotFoundError(
            f"keyword clips not found at {folder}; pass dir=DIR in the --data spec or --data-dir DIR "
            f"(the folder holding {FOLDER}/), or set TINYFLEET_DATA"
        )
    return folder


def list_clips(root: str | Path | None = None) -> tuple[Clip, ...]:
    """Every clip, by word then file name; a word is a folder holding WAV files."""
    clips = []
    for word_dir in sorted(p for p in keywords_folder(root).iterdir() if p.is_dir()):
        for path in sorted(word_dir.glob("*.wav")):
            match = _CLIP_NAME.match(path.name)
            if match is None:
                raise ValueError(f"{path}: clip names must be SPEAKER_nohash_N.wav")
            clips.append(Clip(word_dir.name, match["speaker"], path))
    if not clips:
        raise FileNotFoundError(f"no WAV clips under {keywords_folder(root)}/WORD/")
    return tuple(clips)


def list_words(root: str | Path | None = None) -> list[str]:
    return sorted({c.word for c in list_clips(root)})


def read_wav(path: Path) -> torch.Tensor:
    """A clip as float32 samples in [-1, 1), zero-padded at the end to exactly 1 s."""
    with wave.open(str(path), "rb") as clip:
        form = (clip.getnchannels(), clip.getsampwidth(), clip.getframerate())
        if form != (1, 2, SAMPLE_RATE):
            raise ValueError(
                f"{path}: {form[0]} channel(s), {8 * form[1]}-bit, {form[2]} Hz; "
                f"expected mono 16-bit {SAMPLE_RATE} Hz"
            )
        if clip.getnframes() > CLIP_SAMPLES:
            raise ValueError(f"{path}: {clip.getnframes()} samples, longer than 1 s ({CLIP_SAMPLES})")
        raw = clip.readframes(clip.getnframes())
    samples = torch.zeros(CLIP_SAMPLES)
    pcm = np.frombuffer(raw, dtype="<i2")
    samples[: len(pcm)] = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    return samples


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.lru_cache(maxsize=2)
def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, centres evenly spaced on the mel scale."""
    low, high = _hz_to_mel(torch.tensor([F_MIN, F_MAX])).tolist()
    edges = _mel_to_hz(torch.linspace(low, high, n_mels + 2))
    bins = torch.linspace(0.0, SAMPLE_RATE / 2, n_fft // 2 + 1)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - left) / (centre - left)
    falling = (right - bins) / (right - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel(samples: torch.Tensor) -> torch.Tensor:
    """[..., CLIP_SAMPLES] waveforms -> [..., N_MELS, FRAMES] log mel power."""
    spectrum = torch.stft(
        samples,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=torch.hann_window(WIN_LENGTH),
        center=True,
        return_complex=True,
    )
    return torch.log(mel_filterbank() @ spectrum.abs().pow(2) + LOG_FLOOR)


@functools.lru_cache(maxsize=64)
def word_features(root: str, word: str) -> tuple[tuple[Clip, ...], torch.Tensor]:
    """One word's clips and their features [clips, 1, N_MELS, FRAMES] (cached per process, per word,
    so a device computes only the words it streams)."""
    clips = tuple(c for c in list_clips(root) if c.word == word)
    if not clips:
        raise DataSpecError(f"keywords: no clips of {word!r} under {keywords_folder(root)}")
    with torch.no_grad():
        features = log_mel(torch.stack([read_wav(c.path) for c in clips]))
    return clips, features.unsqueeze(1)


def held_out_speakers(clips: list[Clip], words: list[str], per_word: int, seed: int) -> set[str]:
    """Speakers whose clips only the holdout sees: walking the speakers in seeded order, take one while
    some word it said still has fewer than `per_word` held clips and each of its words keeps a clip
    for the stream (a taken speaker may give other words more than `per_word`)."""
    speakers = sorted({c.speaker for c in clips})
    held: set[str] = set()
    held_count = dict.fromkeys(words, 0)
    stream_count = {w: sum(c.word == w for c in clips) for w in words}
    for i in np.random.default_rng(seed).permutation(len(speakers)):
        said = [c.word for c in clips if c.speaker == speakers[i]]
        if any(held_count[w] < per_word for w in said) and all(stream_count[w] > said.count(w) for w in said):
            held.add(speakers[i])
            for w in said:
                held_count[w] += 1
                stream_count[w] -= 1
    return held


class KeywordStream:
    """A device learning `words`: label i is words[i]. The stream and the holdout are speaker-disjoint,
    so evaluation hears voices the device never heard."""

    kind = "keywords"

    def __init__(self, words: list[str], seed: int, holdout: int, root: Path) -> None:
        known = list_words(root)
        unknown = [w for w in words if w not in known]
        if unknown or not words or len(set(words)) != len(words):
            raise DataSpecError(
                f"keywords: words must be distinct and among {'+'.join(known)}; got {'+'.join(words)!r}"
            )
        if holdout < 1:
            raise DataSpecError(f"keywords: holdout (clips held back per word) must be >= 1, got {holdout}")
        self.words, self.seed, self._root = words, seed, str(root)
        clips = [c for w in words for c in word_features(self._root, w)[0]]
        self.held_speakers = held_out_speakers(clips, words, holdout, seed)
        self._stream_idx: list[np.ndarray] = []
        self._held_idx: list[np.ndarray] = []
        for w in words:
            held = np.array([c.speaker in self.held_speakers for c in word_features(self._root, w)[0]])
            if held.all() or not held.any():
                raise DataSpecError(
                    f"keywords: {w!r} has too few speakers to hold some back and stream the rest"
                )
            self._stream_idx.append(np.flatnonzero(~held))
            self._held_idx.append(np.flatnonzero(held))
        self.rng = np.random.default_rng([seed, 1])

    @classmethod
    def from_spec(
        cls, words: str = "", seed: str = "0", holdout: str = "3", dir: str | None = None
    ) -> KeywordStream:
        try:
            numbers = int(seed), int(holdout)
        except ValueError:
            raise DataSpecError(
                f"keywords: seed and holdout must be integers, got {seed!r} and {holdout!r}"
            ) from None
        return cls(words.split("+") if words else [], *numbers, root=data_root(dir))

    def label_names(self, labels: torch.Tensor, held: bool = False) -> list[str]:
        """The word each label stands for, the same on every device whatever its word order."""
        return [self.words[i] for i in labels.tolist()]

    def clips_of(self, label: int, held: bool = False) -> list[Clip]:
        """The clips of words[label] in the stream (or in the holdout)."""
        clips = word_features(self._root, self.words[label])[0]
        return [clips[i] for i in (self._held_idx if held else self._stream_idx)[label]]

    def _take(self, labels: np.ndarray, positions: np.ndarray, pools: list[np.ndarray]) -> torch.Tensor:
        features = [word_features(self._root, w)[1] for w in self.words]
        pairs = zip(labels, positions, strict=True)
        return torch.stack([features[lab][pools[lab][pos % len(pools[lab])]] for lab, pos in pairs])

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n stream clips: a uniformly drawn word, then one of its stream clips."""
        labels = self.rng.integers(len(self.words), size=n)
        sizes = np.array([len(p) for p in self._stream_idx])
        positions = (self.rng.random(n) * sizes[labels]).astype(np.int64)
        return self._take(labels, positions, self._stream_idx), torch.from_numpy(labels)

    def holdout(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, class-interleaved set of held-back clips: the first `len(words) * k` are a k-shot
        support (a word's clips repeat once all have been used)."""
        labels = np.arange(n) % len(self.words)
        positions = np.arange(n) // len(self.words)
        return self._take(labels, positions, self._held_idx), torch.from_numpy(labels)
