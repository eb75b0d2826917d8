"""Few-shot keywords (Speech Commands subset): an embedding trained on 20 words, 10 new words learned
by devices from a few clips and merged as prototypes (`tinyfleet.simulations.keywords_proto`).

The embedding (zoo model ``keywords-protonet``) trains on prototypical-loss episodes of the seen
words for ``episodes`` episodes or ``--budget-minutes`` of training CPU, and is tested every
``eval_every`` episodes and at the end: N-way K-shot episodes over the unseen words, queries by
anyone and queries by held-out speakers only, mean and 95 % CI, beside the same test of the
untrained network and of raw log-mel spectrograms. Then the unseen words' clips are dealt to
``devices`` devices; each device alone, the merge of their prototypes by counts (fp32 and int8)
and central prototypes name the held-out speakers' clips. The model goes to
``models/keywords-protonet.arrays`` (FedProto's backbone for ``keywords:`` devices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator
from rich.progress import Progress

from tinyfleet.client.omniglot import data_root
from tinyfleet.common.models import build_model, parameter_count
from tinyfleet.common.strategy_options import Options as BaseOptions
from tinyfleet.simulations.keywords_proto import (
    MODEL,
    EpisodeTrainer,
    KeywordCorpus,
    deal,
    embed,
    few_shot_tests,
    fleet_prototypes,
)
from tinyfleet.simulations.prototype_runs import (
    METRICS_FILE,
    Bar,
    CpuClock,
    MetricsLog,
    Outcome,
    RunnerSettings,
    write_model,
)

PLOT_FILE = "keywords.png"
TESTS = ("unseen words", "unseen words, unseen speakers")


class Options(BaseOptions):
    """Knobs of `sim run keywords-proto` (--option NAME=VALUE, or the flag of the same name).

    Parameters
    ----------
    ways, shots, queries : int (default: 20, 2, 2)
        Training episodes: seen words per episode, support and query clips per word (a seen word
        keeps about 6 clips once held-out speakers are removed).
    lr, halve_every : float, int (default: 0.001, 400)
        Adam's rate, halved every `halve_every` episodes.
    episodes : int (default: 1200)
        Training episodes, unless --budget-minutes of training CPU ends it first.
    held_per_word : int (default: 3)
        Clips of each unseen word by held-out speakers (speakers never trained on, never a support).
    tests : "WAYSxSHOTS,..." (default: "5x1,5x5,10x1,10x5")
        The few-shot settings tested.
    test_queries : int (default: 5)
        Query clips per word in a test episode with queries by anyone.
    eval_every, eval_tasks, final_eval_tasks : int (default: 200, 200, 1000)
        The curve: every `eval_every` episodes, `eval_tasks` episodes per setting; at the end
        `final_eval_tasks`.
    devices, devices_per_word : int (default: 5, 2)
        Devices the unseen words' clips are dealt to, and how many devices learn each word.
    """

    ways: int = Field(20, ge=2)
    shots: int = Field(2, ge=1)
    queries: int = Field(2, ge=1)
    lr: float = Field(0.001, gt=0)
    halve_every: int = Field(400, ge=1)
    episodes: int = Field(1200, ge=0)
    held_per_word: int = Field(3, ge=1)
    tests: tuple[tuple[int, int], ...] = ((5, 1), (5, 5), (10, 1), (10, 5))
    test_queries: int = Field(5, ge=1)
    eval_every: int = Field(200, ge=1)
    eval_tasks: int = Field(200, ge=2)
    final_eval_tasks: int = Field(1000, ge=2)
    devices: int = Field(5, ge=1)
    devices_per_word: int = Field(2, ge=1)

    @field_validator("tests", mode="before")
    @classmethod
    def _settings(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            pairs = [tuple(int(n) for n in item.split("x")) for item in value.split(",")]
        except ValueError:
            pairs = []
        if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ValueError(f"tests must be WAYSxSHOTS joined by commas (e.g. 5x1,10x5), got {value!r}")
        return tuple(pairs)


def run(settings: RunnerSettings, out: Path, progress: Progress | None) -> Outcome:
    o = settings.options
    assert isinstance(o, Options)
    keep = max(shots for _, shots in o.tests)
    corpus = KeywordCorpus.load(data_root(settings.data_dir), o.held_per_word, keep, settings.seed)
    model = build_model(MODEL, seed=settings.seed)
    untrained = embed(model, corpus.features)
    trainer = EpisodeTrainer(
        model,
        corpus,
        ways=o.ways,
        shots=o.shots,
        queries=o.queries,
        lr=o.lr,
        halve_every=o.halve_every,
        seed=settings.seed,
    )
    log = MetricsLog(out / METRICS_FILE)
    clock, bar = CpuClock(settings.budget_minutes), Bar(progress, "episodes", o.episodes)

    def test(arm: str, embeddings: np.ndarray, tasks: int, final: bool) -> dict[str, Any]:
        results = few_shot_tests(embeddings, corpus, o.tests, o.test_queries, tasks, settings.seed)
        recent = trainer.losses[-o.eval_every :] if arm == "trained" else []
        for name, by_setting in results.items():
            for setting, r in by_setting.items():
                log.add(
                    arm=arm,
                    episodes=trainer.episodes if arm == "trained" else 0,
                    train_cpu_seconds=round(clock.seconds, 1),
                    train_loss=float(np.mean(recent)) if recent else None,
                    test=name,
                    setting=setting,
                    final=final,
                    tasks=int(r["tasks"]),
                    acc=r["acc"],
                    acc_ci95=r["acc_ci95"],
                )
        return {
            name: {s: {"acc": r["acc"], "acc_ci95": r["acc_ci95"]} for s, r in by_setting.items()}
            for name, by_setting in results.items()
        }

    test("trained", untrained, o.eval_tasks, final=False)  # the curve's first point: no training yet
    while trainer.episodes < o.episodes and not clock.exhausted:
        with clock.counting():
            trainer.step()
        bar.advance()
        if trainer.episodes % o.eval_every == 0 and trainer.episodes < o.episodes:
            test("trained", embed(model, corpus.features), o.eval_tasks, final=False)
    trained = embed(model, corpus.features)
    arms = {
        "trained": test("trained", trained, o.final_eval_tasks, final=True),
        "untrained": test("untrained", untrained, o.final_eval_tasks, final=True),
        "log-mel": test("log-mel", corpus.features.flatten(1).numpy(), o.final_eval_tasks, final=True),
    }
    fleet = fleet_prototypes(trained, corpus, deal(corpus, o.devices, o.devices_per_word, settings.seed))
    model_file = write_model(out, MODEL, model)
    _plot(log.rows, fleet, o, out / PLOT_FILE)
    figures = {
        "model": {"name": MODEL, "parameters": parameter_count(model), **model_file},
        "data": corpus.record(),
        "training": {
            "episodes": trainer.episodes,
            "train_cpu_seconds": round(clock.seconds, 1),
            "stopped_by": "budget" if clock.exhausted else "episodes",
            "last_100_episodes_loss": float(np.mean(trainer.losses[-100:])) if trainer.losses else None,
        },
        "test_protocol": {
            "settings": [f"{w}-way {s}-shot" for w, s in o.tests],
            "episodes": o.final_eval_tasks,
            "unseen words": f"supports and {o.test_queries} queries a word drawn from all its clips",
            "unseen words, unseen speakers": "queries: every clip of the word by a held-out speaker; "
            "supports: clips by the other speakers",
            "metric": "squared Euclidean, nearest prototype; embeddings in eval mode",
        },
        "few_shot": arms,
        "devices": {"count": o.devices, "devices_per_word": o.devices_per_word, **fleet},
    }
    lines = [
        f"{arm:9} {name:30} {setting}: {r['acc'] * 100:5.1f} ± {r['acc_ci95'] * 100:.1f} %"
        for arm, results in arms.items()
        for name, by_setting in results.items()
        for setting, r in by_setting.items()
    ]
    alone, merged, central = fleet["device_alone"], fleet["merged"]["acc"], fleet["central"]["acc"]
    lines.append(
        f"devices: merged {merged * 100:.1f} % (central {central * 100:.1f} %, "
        f"int8 {fleet['merged_int8']['acc'] * 100:.1f} %), each alone {alone['acc_mean'] * 100:.1f} % "
        f"({alone['own_words_acc_mean'] * 100:.1f} % among its own words), {fleet['queries']} clips of "
        f"held-out speakers"
    )
    return Outcome(figures=figures, lines=lines, files=[PLOT_FILE, model_file["file"]])


def _plot(rows: list[dict[str, Any]], fleet: dict[str, Any], o: Options, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    for setting in dict.fromkeys(r["setting"] for r in rows):
        color = None
        for name, style in zip(TESTS, ("-", "--"), strict=True):
            points = [
                r for r in rows if r["arm"] == "trained" and r["setting"] == setting and r["test"] == name
            ]
            (line,) = curve.plot(
                [r["episodes"] for r in points],
                [r["acc"] * 100 for r in points],
                style,
                marker="o",
                markersize=3,
                color=color,
                label=f"{setting}, {name}",
            )
            color = line.get_color()
    curve.set_xlabel("training episodes")
    curve.set_ylabel("accuracy on unseen words (%)")
    curve.set_title(f"keywords-proto: {MODEL} (dashed: queries by held-out speakers)")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=7)
    alone = fleet["device_alone"]["each"]
    labels = [f"device {i}" for i in range(len(alone))] + ["merged", "merged int8", "central"]
    values = [*alone, fleet["merged"]["acc"], fleet["merged_int8"]["acc"], fleet["central"]["acc"]]
    bars.bar(labels, [v * 100 for v in values], color=["grey"] * len(alone) + ["C0", "C1", "C2"])
    bars.set_ylabel("accuracy (%)")
    bars.set_title(f"{fleet['words']} unseen words, {fleet['queries']} clips of held-out speakers")
    bars.tick_params(axis="x", labelrotation=45)
    bars.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
