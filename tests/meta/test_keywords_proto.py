"""`sim run keywords-proto` on synthesized words: the embedding, the few-shot tests and the devices' merge."""

from __future__ import annotations

import json
import math
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyfleet.cli import main
from tinyfleet.client import keywords
from tinyfleet.common.learning import prototypical_loss
from tinyfleet.common.models import build_model
from tinyfleet.simulations import keywords_proto as kp

#: 9 words, each two tones (Hz) in turn; 6 speakers, each a pitch and an onset of their own.
WORDS = {
    "alpha": (300, 900), "bravo": (900, 300), "charlie": (500, 2500), "delta": (2500, 500),
    "echo": (700, 700), "foxtrot": (1500, 1500), "golf": (400, 3200), "hotel": (3200, 400),
    "india": (1100, 2000),
}  # fmt: skip
SPEAKERS = {"s1": (0.92, 0.0), "s2": (0.96, 0.1), "s3": (1.0, 0.2), "s4": (1.04, 0.05), "s5": (1.08, 0.15),
            "s6": (1.12, 0.25)}  # fmt: skip


def write_word(path: Path, tones: tuple[int, int], pitch: float, onset: float, seed: int) -> None:
    rate, half = 16_000, 0.25
    t = np.arange(int(rate * half)) / rate
    sound = np.concatenate([np.sin(2 * math.pi * f * pitch * t) for f in tones])
    noise = np.random.default_rng(seed).normal(0, 0.02, int(rate * onset) + len(sound))
    noise[int(rate * onset) :] += 0.5 * sound
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(noise, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    for w, (word, tones) in enumerate(WORDS.items()):
        folder = tmp_path / keywords.FOLDER / word
        folder.mkdir(parents=True)
        for s, (speaker, (pitch, onset)) in enumerate(SPEAKERS.items()):
            write_word(folder / f"{speaker}_nohash_0.wav", tones, pitch, onset, seed=10 * w + s)
    keywords.word_features.cache_clear()
    yield tmp_path
    keywords.word_features.cache_clear()


SMALL = ["--option", "tests=3x1,3x2", "--option", "held_per_word=1", "--option", "ways=3"]
SMALL += ["--option", "episodes=30", "--option", "eval_every=10", "--option", "eval_tasks=20"]
SMALL += ["--option", "final_eval_tasks=40", "--option", "test_queries=3", "--devices", "3"]


def test_sim_run_writes_its_outputs_and_learning_beats_chance(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["sim", "run", "keywords-proto", "--data-dir", str(data_dir), "--out", str(out), "--threads", "1"]
    assert main([*argv, *SMALL]) == 0
    written = {p.name for p in out.iterdir()}
    assert written == {"metrics.csv", "summary.json", "keywords.png", "models"}
    assert (out / "models" / "keywords-protonet.arrays").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[:4] == ["command", "date", "git_commit", "machine"]
    data = summary["data"]
    assert data["unseen_words"] == ["charlie", "foxtrot", "india"] and len(data["seen_words"]) == 6
    assert data["training_clips"] == 6 * (6 - len(data["held_out_speakers"]))
    trained = summary["few_shot"]["trained"]
    assert set(trained) == {"unseen words", "unseen words, unseen speakers"}
    for results in trained.values():
        assert set(results) == {"3-way 1-shot", "3-way 2-shot"}
        assert results["3-way 2-shot"]["acc"] > 0.6  # chance: 1/3
    assert summary["training"]["episodes"] == 30
    devices = summary["devices"]
    assert devices["merged_equals_central"] is True
    assert devices["merged"]["acc"] == devices["central"]["acc"]
    assert devices["merged"]["acc"] >= max(devices["device_alone"]["each"])
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("arm,episodes,train_cpu_seconds,train_loss,test,setting,final")
    curve_episodes = {int(r.split(",")[1]) for r in rows[1:] if r.startswith("trained,") and ",False," in r}
    assert curve_episodes == {0, 10, 20}


def test_training_lowers_the_prototypical_loss(data_dir: Path) -> None:
    corpus = kp.KeywordCorpus.load(data_dir, held_per_word=1, keep=2, seed=0)
    model = build_model(kp.MODEL, seed=0)
    trainer = kp.EpisodeTrainer(model, corpus, ways=3, shots=2, queries=2, lr=0.003, halve_every=100, seed=0)

    def loss_on_training_words() -> float:
        """Every seen word: its first 2 training clips the support, the other 3 the queries."""
        embedded = torch.from_numpy(kp.embed(model, corpus.features))
        support = torch.cat([embedded[pool[:2]] for pool in trainer.pools])
        query = torch.cat([embedded[pool[2:]] for pool in trainer.pools])
        labels = torch.arange(len(trainer.pools))
        loss, _ = prototypical_loss(support, labels.repeat_interleave(2), query, labels.repeat_interleave(3))
        return float(loss)

    before = loss_on_training_words()
    for _ in range(40):
        trainer.step()
    assert loss_on_training_words() < 0.5 * before


def test_held_out_speakers_are_never_trained_on_nor_supports(data_dir: Path) -> None:
    corpus = kp.KeywordCorpus.load(data_dir, held_per_word=2, keep=2, seed=3)
    assert len(corpus.held_speakers) == 2  # each says every word once
    held = set(corpus.held_speakers)
    trainer = kp.EpisodeTrainer(
        build_model(kp.MODEL, seed=0), corpus, ways=3, shots=2, queries=2, lr=1e-3, halve_every=1, seed=0
    )
    assert all(corpus.clips[i].speaker not in held for pool in trainer.pools for i in pool)
    assert all(corpus.clips[i].word in corpus.seen for pool in trainer.pools for i in pool)
    dealt = kp.deal(corpus, devices=4, devices_per_word=2, seed=0)
    on_devices = np.concatenate(dealt)
    assert sorted(on_devices) == sorted(i for w in corpus.unseen for i in corpus.indices(w, held=False))
    assert not {corpus.clips[i].speaker for i in on_devices} & held
    # each word on exactly two devices
    for w in corpus.unseen:
        assert sum(bool(set(d) & set(corpus.indices(w))) for d in dealt) == 2


def test_the_words_split_by_a_fixed_rule_and_speakers_that_cannot_be_held_are_named() -> None:
    assert kp.split_words(list("abcdefg")) == (["a", "b", "d", "e", "g"], ["c", "f"])
    clips = [keywords.Clip(w, s, Path(f"{w}/{s}_nohash_0.wav")) for w in "abc" for s in ("p", "q")]
    with pytest.raises(ValueError, match=r"hold 1 clip\(s\) of c out while keeping 2"):
        kp.hold_out_speakers(clips, ["c"], per_word=1, keep=2, seed=0)


def test_merging_devices_equals_central_prototypes_and_each_names_only_its_words(data_dir: Path) -> None:
    corpus = kp.KeywordCorpus.load(data_dir, held_per_word=1, keep=2, seed=0)
    embeddings = corpus.features.flatten(1).numpy()  # raw log-mel: the merge math needs no training
    fleet = kp.fleet_prototypes(embeddings, corpus, kp.deal(corpus, devices=3, devices_per_word=1, seed=1))
    assert fleet["merged_equals_central"] is True and fleet["merged_minus_central_max_abs"] < 1e-9
    alone = fleet["device_alone"]
    assert alone["words_each"] == [1, 1, 1]
    assert all(acc <= 1 / 3 + 1e-9 for acc in alone["each"])  # one word of three, the queries balanced
    assert alone["own_words_each"] == [1.0, 1.0, 1.0]  # alone among its own words: one choice


def test_a_clip_embeds_the_same_alone_or_in_a_batch() -> None:
    model = build_model(kp.MODEL, seed=0)
    batch = torch.randn(4, 1, 40, 101)
    model.train()
    model(batch * 3 + 1)  # running statistics move off their initial values
    together = kp.embed(model, batch)
    alone = np.concatenate([kp.embed(model, batch[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert together.shape == (4, 64)


def test_malformed_test_settings_are_refused_by_name(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["sim", "run", "keywords-proto", "--data-dir", str(data_dir), "--out", str(tmp_path / "x")]
    assert main([*argv, "--option", "tests=5by1"]) == 2
    assert "tests must be WAYSxSHOTS joined by commas" in capsys.readouterr().err
