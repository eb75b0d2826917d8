"""Keyword clips: WAV reading, log-mel features and the speaker-disjoint word stream, on synthesized tones."""

from __future__ import annotations

import math
import pickle
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tinyfleet.client import keywords
from tinyfleet.client.data_sources import DataSpecError, open_source
from tinyfleet.client.omniglot import data_root

TONES = {"no": 300.0, "up": 1200.0, "yes": 3000.0}  # Hz: one pitch per word
SPEAKERS = ("aa11", "bb22", "cc33", "dd44", "ee55")


def write_wav(
    path: Path, hz: float, seconds: float = 0.5, rate: int = 16_000, channels: int = 1, width: int = 2
) -> None:
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.5 * 32767 * np.sin(2 * math.pi * hz * t)).astype("<i2")
    if channels == 2:
        pcm = np.repeat(pcm, 2)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes() if width == 2 else (pcm // 256 + 128).astype(np.uint8).tobytes())


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """Three words, five speakers each; speaker i's take lasts 0.3 + 0.1 i seconds."""
    for word, hz in TONES.items():
        folder = tmp_path / keywords.FOLDER / word
        folder.mkdir(parents=True)
        for i, speaker in enumerate(SPEAKERS):
            write_wav(folder / f"{speaker}_nohash_0.wav", hz, seconds=0.3 + 0.1 * i)
    keywords.word_features.cache_clear()
    yield tmp_path
    keywords.word_features.cache_clear()


def test_clips_are_listed_by_word_with_their_speakers(data_dir: Path) -> None:
    clips = keywords.list_clips(data_dir)
    assert keywords.list_words(data_dir) == ["no", "up", "yes"]
    assert len(clips) == 15
    assert [(c.word, c.speaker) for c in clips[:2]] == [("no", "aa11"), ("no", "bb22")]


def test_a_clip_reads_as_one_second_zero_padded(tmp_path: Path) -> None:
    write_wav(tmp_path / "a_nohash_0.wav", 440.0, seconds=0.25)
    samples = keywords.read_wav(tmp_path / "a_nohash_0.wav")
    assert samples.shape == (16_000,) and samples.dtype == torch.float32
    assert float(samples[:4000].abs().max()) == pytest.approx(0.5, abs=1e-3)
    assert bool((samples[4000:] == 0).all())


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"channels": 2}, "2 channel"),
        ({"width": 1}, "8-bit"),
        ({"rate": 8000}, "8000 Hz"),
        ({"seconds": 1.5}, "longer than 1 s"),
    ],
)
def test_other_formats_are_refused_by_name(tmp_path: Path, form: dict[str, Any], message: str) -> None:
    path = tmp_path / "odd_nohash_0.wav"
    write_wav(path, 440.0, **form)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        keywords.read_wav(path)


def test_filterbank_covers_every_band_up_to_nyquist() -> None:
    bank = keywords.mel_filterbank()
    assert bank.shape == (keywords.N_MELS, keywords.N_FFT // 2 + 1)
    assert bool((bank.sum(dim=1) > 0).all())  # no empty band at the low end
    peaks = bank.argmax(dim=1)
    assert bool((peaks.diff() >= 0).all()) and int(peaks[-1]) > int(peaks[0])


def test_log_mel_has_the_documented_shape_and_puts_a_tone_in_its_band(data_dir: Path) -> None:
    bands = {}
    for word in TONES:
        _, features = keywords.word_features(str(data_dir), word)
        assert features.shape == (5, 1, keywords.N_MELS, keywords.FRAMES)
        assert bool(torch.isfinite(features).all())
        bands[word] = int(features[0, 0, :, 10].argmax())  # a frame inside the tone
    assert bands["no"] < bands["up"] < bands["yes"]
    no, yes = (keywords.word_features(str(data_dir), w)[1][0] for w in ("no", "yes"))
    assert float((no - yes).abs().mean()) > 1.0


def test_labels_index_the_words_as_given(data_dir: Path) -> None:
    source = open_source(f"keywords:words=yes+no,seed=3,holdout=2,dir={data_dir}")
    x, y = source.next(20)
    assert x.shape == (20, 1, keywords.N_MELS, keywords.FRAMES) and y.dtype == torch.int64
    assert set(y.tolist()) == {0, 1}
    yes_band = keywords.word_features(str(data_dir), "yes")[1][0, 0, :, 10].argmax()
    assert bool((x[y == 0][:, 0, :, 10].argmax(dim=1) == yes_band).all())  # label 0 is "yes"


def test_labels_are_named_by_their_word_whatever_the_order_a_device_gives(data_dir: Path) -> None:
    """FedProto merges classes by name: "no" is one class on devices that list the words differently."""
    first = keywords.KeywordStream.from_spec(words="yes+no", dir=str(data_dir))
    second = keywords.KeywordStream.from_spec(words="no+up", dir=str(data_dir))
    assert first.label_names(torch.tensor([1, 0, 1])) == ["no", "yes", "no"]
    assert second.label_names(torch.tensor([0, 1]), held=True) == ["no", "up"]


def test_holdout_is_fixed_interleaved_and_from_speakers_the_stream_never_plays(data_dir: Path) -> None:
    source = keywords.KeywordStream.from_spec(words="no+up+yes", seed="1", holdout="2", dir=str(data_dir))
    assert len(source.held_speakers) == 2
    for label in range(3):
        held = {c.speaker for c in source.clips_of(label, held=True)}
        streamed = {c.speaker for c in source.clips_of(label)}
        assert held == source.held_speakers and streamed.isdisjoint(held)
    x, y = source.holdout(9)
    again, _ = source.holdout(9)
    assert torch.equal(x, again) and y.tolist() == [0, 1, 2] * 3
    streamed_x, _ = source.next(60)
    held_rows = {tuple(r.flatten().tolist()) for r in x}
    assert held_rows.isdisjoint(tuple(r.flatten().tolist()) for r in streamed_x)


def test_the_held_speakers_depend_on_the_seed(data_dir: Path) -> None:
    held = {
        frozenset(keywords.KeywordStream(["no", "up"], seed, 2, data_dir).held_speakers) for seed in range(6)
    }
    assert len(held) > 1


def test_a_stream_survives_pickling_at_its_position(data_dir: Path) -> None:
    source = keywords.KeywordStream(["no", "up"], 0, 1, data_dir)
    source.next(3)
    copy = pickle.loads(pickle.dumps(source))
    assert torch.equal(copy.next(5)[0], source.next(5)[0])


def test_missing_folder_names_the_path_and_how_to_pass_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / keywords.FOLDER}.*dir=DIR"):
        open_source(f"keywords:words=yes,dir={tmp_path}")


@pytest.mark.parametrize(
    ("words", "message"),
    [("yes+maybe", "among no\\+up\\+yes"), ("yes+yes", "distinct"), ("", "distinct")],
)
def test_unknown_or_repeated_words_are_refused(data_dir: Path, words: str, message: str) -> None:
    with pytest.raises(DataSpecError, match=message):
        open_source(f"keywords:words={words},dir={data_dir}")


def test_a_word_with_a_single_speaker_cannot_be_split(data_dir: Path) -> None:
    (data_dir / keywords.FOLDER / "solo").mkdir()
    write_wav(data_dir / keywords.FOLDER / "solo" / "ff66_nohash_0.wav", 700.0)
    with pytest.raises(DataSpecError, match="'solo' has too few speakers"):
        keywords.KeywordStream(["solo", "yes"], 0, 1, data_dir)


REAL = data_root() / keywords.FOLDER


@pytest.mark.skipif(not REAL.is_dir(), reason=f"real keyword clips not at {REAL} (set TINYFLEET_DATA)")
def test_the_real_clips() -> None:
    clips = keywords.list_clips(REAL.parent)
    assert len(clips) == 300 and len(keywords.list_words(REAL.parent)) == 30
    assert len({c.speaker for c in clips}) == 41
    _, features = keywords.word_features(str(REAL.parent), "yes")
    assert features.shape == (10, 1, keywords.N_MELS, keywords.FRAMES)
    assert bool(torch.isfinite(features).all())
