"""Few-shot keywords with prototypes: an embedding learned on some words, new words learned by devices.

The Speech Commands subset has 10 clips of each of 30 words by 41 speakers, far too little to
train a classifier of every word, enough to learn an embedding in which a word's clips lie close
(Prototypical Networks, Snell et al. 2017) and to name new words from a few clips.

- Words: in sorted order, every third is unseen (`UNSEEN_RULE`): 10 of 30, never trained on.
- Speakers: some are held out (`hold_out_speakers`, seeded): none of their clips, of any word,
  is trained on or used as a support, so their clips test voices the model never heard.
- Training: episodes of the seen words' clips by the other speakers, prototypical loss, with
  SpecAugment-style masking, time shifts and gain (`augment`): ~6 clips a word overfit fast.
- Test: N-way K-shot episodes over the unseen words, queries by anyone, and queries by held-out
  speakers only (supports from the others).
- Devices: the unseen words' clips by non-held speakers are dealt to devices (each word to a few
  of them); a device learns prototypes of its words, the server merges them by counts; each
  device alone and the merge name the held-out speakers' clips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tinyfleet.client.keywords import Clip, list_clips, word_features
from tinyfleet.common.learning import prototypical_loss
from tinyfleet.common.prototypes import PrototypeSet, decode, encode, merge_all, wire_bytes
from tinyfleet.simulations.meta_eval import summarize
from tinyfleet.simulations.recon import accuracy

MODEL = "keywords-protonet"
UNSEEN_RULE = "words in sorted order; every third (positions 2, 5, 8, ...) is unseen: never trained on"
EMBED_BATCH = 256  # clips embedded per forward pass
#: Augmentation bounds: frames (10 ms), mel bands, log-power offset (natural log: ±1 is ±4.3 dB).
SHIFT_FRAMES, TIME_MASK_FRAMES, BAND_MASK, GAIN = 15, 15, 5, 1.0


def split_words(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """(seen, unseen) by `UNSEEN_RULE`."""
    ordered = sorted(words)
    unseen = ordered[2::3]
    if not unseen:
        raise ValueError(f"keywords-proto needs at least 3 words to hold one out, got {ordered}")
    return [w for w in ordered if w not in unseen], unseen


def hold_out_speakers(
    clips: Sequence[Clip], unseen: Sequence[str], per_word: int, keep: int, seed: int
) -> set[str]:
    """Speakers never heard in training: walking the speakers in seeded order, take one while some
    unseen word it said has fewer than `per_word` held clips and every unseen word it said keeps at
    least `keep` clips by other speakers (the supports of a `keep`-shot test)."""
    speakers = sorted({c.speaker for c in clips})
    held: set[str] = set()
    held_count = dict.fromkeys(unseen, 0)
    kept = {w: sum(c.word == w for c in clips) for w in unseen}
    for i in np.random.default_rng([seed, 41]).permutation(len(speakers)):
        said = [c.word for c in clips if c.speaker == speakers[i] and c.word in held_count]
        if any(held_count[w] < per_word for w in said) and all(kept[w] - said.count(w) >= keep for w in said):
            held.add(speakers[i])
            for w in said:
                held_count[w] += 1
                kept[w] -= 1
    short = [w for w in unseen if held_count[w] < per_word]
    if short:
        raise ValueError(
            f"too few speakers to hold {per_word} clip(s) of {', '.join(short)} out while keeping "
            f"{keep} for supports; lower held_per_word or the largest shot count"
        )
    return held


@dataclass(frozen=True)
class KeywordCorpus:
    """Every clip's features [N, 1, 40, 101], its word (index into `words`) and whether its speaker
    is held out."""

    words: list[str]
    seen: list[str]
    unseen: list[str]
    clips: list[Clip]
    features: torch.Tensor
    word: np.ndarray
    held: np.ndarray
    held_speakers: list[str]

    @classmethod
    def load(cls, root: str | Path, held_per_word: int, keep: int, seed: int) -> KeywordCorpus:
        clips = list(list_clips(root))
        words = sorted({c.word for c in clips})
        seen, unseen = split_words(words)
        held = hold_out_speakers(clips, unseen, held_per_word, keep, seed)
        ordered: list[Clip] = []
        blocks: list[torch.Tensor] = []
        for w in words:
            word_clips, features = word_features(str(root), w)
            ordered += word_clips
            blocks.append(features)
        return cls(
            words=words,
            seen=seen,
            unseen=unseen,
            clips=ordered,
            features=torch.cat(blocks),
            word=np.array([words.index(c.word) for c in ordered]),
            held=np.array([c.speaker in held for c in ordered]),
            held_speakers=sorted(held),
        )

    def indices(self, word: str, held: bool | None = None) -> np.ndarray:
        """Clips of `word`: all, or only those by held-out (True) or other (False) speakers."""
        mask = self.word == self.words.index(word)
        if held is not None:
            mask &= self.held == held
        return np.flatnonzero(mask)

    def record(self) -> dict[str, Any]:
        training = [self.indices(w, held=False) for w in self.seen]
        return {
            "unseen_rule": UNSEEN_RULE,
            "seen_words": self.seen,
            "unseen_words": self.unseen,
            "clips": len(self.clips),
            "speakers": len({c.speaker for c in self.clips}),
            "held_out_speakers": self.held_speakers,
            "training_clips": int(sum(len(t) for t in training)),
            "training_clips_per_word_min": int(min(len(t) for t in training)),
            "unseen_clips_by_held_out_speakers": {w: len(self.indices(w, held=True)) for w in self.unseen},
        }


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each clip shifted in time (circularly, up to ±150 ms), one stretch of time and one band of
    mel bands set to the clip's mean (SpecAugment), and its level offset (gain)."""
    out = x.clone()
    frames, bands = x.shape[-1], x.shape[-2]
    for clip in out:
        clip.copy_(torch.roll(clip, int(rng.integers(-SHIFT_FRAMES, SHIFT_FRAMES + 1)), dims=-1))
        mean = float(clip.mean())
        width = int(rng.integers(0, TIME_MASK_FRAMES + 1))
        start = int(rng.integers(0, frames - width + 1))
        clip[..., start : start + width] = mean
        height = int(rng.integers(0, BAND_MASK + 1))
        low = int(rng.integers(0, bands - height + 1))
        clip[..., low : low + height, :] = mean
        clip += float(rng.uniform(-GAIN, GAIN))
    return out


class EpisodeTrainer:
    """Prototypical-loss episodes over the seen words' clips by speakers not held out; Adam, its
    rate halved every `halve_every` episodes (Snell et al.)."""

    def __init__(
        self,
        model: nn.Module,
        corpus: KeywordCorpus,
        *,
        ways: int,
        shots: int,
        queries: int,
        lr: float,
        halve_every: int,
        seed: int,
    ) -> None:
        self.pools = [corpus.indices(w, held=False) for w in corpus.seen]
        short = [w for w, p in zip(corpus.seen, self.pools, strict=True) if len(p) < shots + queries]
        if ways > len(self.pools) or short:
            raise ValueError(
                f"training episodes of {ways} ways x ({shots} shots + {queries} queries) need {ways} seen "
                f"words with that many training clips; {len(self.pools)} seen words, too few clips of "
                f"{', '.join(short) or 'none'}"
            )
        self.model, self.features = model, corpus.features
        self.ways, self.shots, self.queries = ways, shots, queries
        self.lr, self.halve_every = lr, halve_every
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.rng = np.random.default_rng([seed, 43])
        self.episodes = 0
        self.losses: list[float] = []

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 ** (self.episodes // self.halve_every)
        chosen = self.rng.choice(len(self.pools), self.ways, replace=False)
        drawn = [self.rng.choice(self.pools[c], self.shots + self.queries, replace=False) for c in chosen]
        support = np.concatenate([d[: self.shots] for d in drawn])
        query = np.concatenate([d[self.shots :] for d in drawn])
        x = augment(self.features[np.concatenate([support, query])], self.rng)
        self.model.train()
        embedded = self.model(x)
        loss, _ = prototypical_loss(
            embedded[: len(support)],
            torch.arange(self.ways).repeat_interleave(self.shots),
            embedded[len(support) :],
            torch.arange(self.ways).repeat_interleave(self.queries),
        )
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        self.episodes += 1


@torch.no_grad()
def embed(model: nn.Module, features: torch.Tensor) -> np.ndarray:
    """Embeddings in eval mode (batch-norm running statistics: a clip embeds the same alone)."""
    model.eval()
    return torch.cat(
        [model(features[i : i + EMBED_BATCH]) for i in range(0, len(features), EMBED_BATCH)]
    ).numpy()


def episode_accuracies(
    embeddings: np.ndarray,
    corpus: KeywordCorpus,
    *,
    ways: int,
    shots: int,
    queries: int,
    unseen_speakers: bool,
    count: int,
    seed: int,
) -> np.ndarray:
    """Accuracy of `count` seeded `ways`-way `shots`-shot episodes over the unseen words, nearest
    prototype by squared Euclidean distance. Queries: `queries` other clips of each word, or with
    `unseen_speakers` every clip by a held-out speaker (supports then from the other speakers)."""
    if ways > len(corpus.unseen):
        raise ValueError(f"{ways}-way episodes need {ways} unseen words; there are {len(corpus.unseen)}")
    if unseen_speakers:
        supports = [corpus.indices(w, held=False) for w in corpus.unseen]
        tests = [corpus.indices(w, held=True) for w in corpus.unseen]
    else:
        supports = [corpus.indices(w) for w in corpus.unseen]
        short = [w for w, s in zip(corpus.unseen, supports, strict=True) if len(s) < shots + queries]
        if short:
            raise ValueError(f"{shots} shots + {queries} queries exceed the clips of {', '.join(short)}")
    rng = np.random.default_rng([seed, 47, ways, shots, int(unseen_speakers)])
    out = np.empty(count)
    for e in range(count):
        chosen = rng.choice(len(corpus.unseen), ways, replace=False)
        prototypes, query_x, query_y = [], [], []
        for label, c in enumerate(chosen):
            if unseen_speakers:
                support, query = rng.choice(supports[c], shots, replace=False), tests[c]
            else:
                drawn = rng.choice(supports[c], shots + queries, replace=False)
                support, query = drawn[:shots], drawn[shots:]
            prototypes.append(embeddings[support].mean(axis=0))
            query_x.append(embeddings[query])
            query_y += [label] * len(query)
        x, centres = np.concatenate(query_x), np.stack(prototypes)
        distances = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        out[e] = float((distances.argmin(axis=1) == np.array(query_y)).mean())
    return out


def few_shot_tests(
    embeddings: np.ndarray,
    corpus: KeywordCorpus,
    settings: Sequence[tuple[int, int]],
    queries: int,
    count: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """{"unseen words" | "unseen words, unseen speakers": {"N-way K-shot": mean acc, 95 % CI}}."""
    return {
        test: {
            f"{ways}-way {shots}-shot": summarize(
                [
                    {"acc": float(a)}
                    for a in episode_accuracies(
                        embeddings,
                        corpus,
                        ways=ways,
                        shots=shots,
                        queries=queries,
                        unseen_speakers=held,
                        count=count,
                        seed=seed,
                    )
                ]
            )
            for ways, shots in settings
        }
        for test, held in (("unseen words", False), ("unseen words, unseen speakers", True))
    }


# -- devices --------------------------------------------------------------------------------------
def deal(corpus: KeywordCorpus, devices: int, devices_per_word: int, seed: int) -> list[np.ndarray]:
    """Clip indices per device: unseen word i goes to devices s+i, ..., s+i+devices_per_word-1 (mod
    `devices`, s seeded), its clips by non-held speakers shuffled and dealt among them in turn."""
    if not 1 <= devices_per_word <= devices:
        raise ValueError(f"devices_per_word must be 1 to devices ({devices}), got {devices_per_word}")
    rng = np.random.default_rng([seed, 53])
    start = int(rng.integers(devices))
    dealt: list[list[int]] = [[] for _ in range(devices)]
    for i, w in enumerate(corpus.unseen):
        owners = [(start + i + j) % devices for j in range(devices_per_word)]
        for k, clip in enumerate(rng.permutation(corpus.indices(w, held=False))):
            dealt[owners[k % devices_per_word]].append(int(clip))
    return [np.array(sorted(d), dtype=np.int64) for d in dealt]


def fleet_prototypes(
    embeddings: np.ndarray, corpus: KeywordCorpus, dealt: list[np.ndarray]
) -> dict[str, Any]:
    """Each device's prototypes of its words, their merge by counts (fp32, and int8 as sent on the
    wire), and central prototypes of every dealt clip; each names the held-out speakers' clips of
    the unseen words."""
    dim = embeddings.shape[1]

    def names(indices: np.ndarray) -> list[str]:
        return [corpus.words[corpus.word[i]] for i in indices]

    sets = [PrototypeSet.from_embeddings(embeddings[d], names(d)) for d in dealt]
    merged = merge_all(sets, dim)
    merged_int8 = merge_all((decode(s.labels, encode(s, "int8")) for s in sets), dim)
    central = PrototypeSet.from_embeddings(embeddings[np.concatenate(dealt)], names(np.concatenate(dealt)))
    queries = np.concatenate([corpus.indices(w, held=True) for w in corpus.unseen])
    qx, qy = embeddings[queries], names(queries)
    alone = [accuracy(s, qx, qy) for s in sets]
    own = []
    for s in sets:
        mine = [i for i, label in enumerate(qy) if label in s.counts]
        own.append(accuracy(s, qx[mine], [qy[i] for i in mine]) if mine else 0.0)
    difference = max(float(np.abs(merged.means[w] - central.means[w]).max()) for w in central.labels)
    merged_acc = accuracy(merged, qx, qy)
    return {
        "queries": len(qy),
        "words": len(central),
        "merged": {"acc": merged_acc, "acc_ci95": _binomial_ci95(merged_acc, len(qy))},
        "merged_int8": {"acc": accuracy(merged_int8, qx, qy)},
        "central": {"acc": accuracy(central, qx, qy)},
        "merged_equals_central": merged.counts == central.counts and difference < 1e-9,
        "merged_minus_central_max_abs": difference,
        "device_alone": {
            "acc_mean": float(np.mean(alone)),
            "acc_ci95": _mean_ci95(alone),
            "each": alone,
            "own_words_acc_mean": float(np.mean(own)),
            "own_words_each": own,
            "words_each": [len(s) for s in sets],
            "clips_each": [len(d) for d in dealt],
        },
        "wire_bytes_per_word": {"fp32": wire_bytes(dim, "fp32"), "int8": wire_bytes(dim, "int8")},
    }


def _binomial_ci95(p: float, n: int) -> float:
    return 1.96 * math.sqrt(p * (1 - p) / n) if n else 0.0


def _mean_ci95(values: Sequence[float]) -> float:
    return float(1.96 * np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
