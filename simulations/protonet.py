"""Prototypical Networks on Omniglot: episodic training by one learner or by devices under Flower's
FedAvg (the `train.protonet` handler), and the standard N-way K-shot test on test characters.

Snell et al. 2017 (https://arxiv.org/abs/1703.05175): an episode embeds a support and a query set,
takes each class's mean support embedding as its prototype and minimises the queries' cross-entropy
over negative squared distances (`prototypical_loss`); Adam at 1e-3, halved every 2000 episodes.

The test is non-transductive and cheap: in eval mode batch norm uses running statistics, so an
image's embedding does not depend on its batch; the test images are embedded once per evaluation
and every episode is index arithmetic on those embeddings (thousands of episodes in seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from pydantic import Field
from torch import nn

from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.client.learners import node_source, received_model
from tinyfleet.client.omniglot import DRAWERS, OmniglotSplit, TaskStream, images_of
from tinyfleet.common.arrays import load_array_record, to_array_record
from tinyfleet.common.flower_adapter import array_record_from_bytes, reply_with_content, seed_node_sampling
from tinyfleet.common.learning import prototypical_loss
from tinyfleet.common.message_keys import ARRAYS_KEY, METRICS_KEY, MODEL_KEY, NUM_EXAMPLES_KEY
from tinyfleet.common.models import OmniglotConv4, build_model
from tinyfleet.common.strategy_options import Options
from tinyfleet.server.artifacts import sha256_hex
from tinyfleet.simulations.meta_eval import summarize
from tinyfleet.simulations.rounds import run_rounds
from tinyfleet.simulations.sim_grid import SimGrid

MODEL = "omniglot-protonet"
Episode = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # support x, y, query x, y
#: Images embedded per forward pass at test time (memory, not results, depends on it).
EMBED_BATCH = 1000


class EpisodeOptions(Options):
    """What one learner or one `train.protonet` device trains on; a train message's config carries
    these (Flower's FedAvg passes its train config through untouched).

    Parameters
    ----------
    ways, shots, queries : int (default: 60, 5, 5)
        Classes per training episode, support and query images per class (Snell et al.'s
        Omniglot episodes). Episodes draw from the 15 stream drawers: shots + queries <= 15.
    lr : float (default: 0.001)
        Adam's learning rate for this round (the schedule is the caller's).
    local_episodes : int (default: 10)
        Episodes a device trains per round (FedAvg's local epochs, in episodes).
    """

    ways: int = Field(60, ge=2)
    shots: int = Field(5, ge=1)
    queries: int = Field(5, ge=1)
    lr: float = Field(0.001, gt=0)
    local_episodes: int = Field(10, ge=1)


def learning_rate(base: float, episodes_done: int, halve_every: int) -> float:
    """Snell et al.'s schedule: `base`, halved every `halve_every` episodes."""
    return base * 0.5 ** (episodes_done // halve_every)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, episode: Episode) -> tuple[float, float]:
    """One episode of prototypical loss; returns the loss and the queries' accuracy."""
    support, support_y, query, query_y = episode
    model.train()
    embedded = model(torch.cat([support, query]))
    loss, accuracy = prototypical_loss(embedded[: len(support)], support_y, embedded[len(support) :], query_y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), accuracy


def train_protonet(message: Message, context: Context) -> Message:
    """`train.protonet`: `local_episodes` episodes of the node's own classes with a fresh Adam at the
    round's lr, replying with the weights (batch-norm statistics included) for FedAvg to average."""
    _, model, config = received_model(message)
    options = EpisodeOptions.from_config(config)
    source = node_source(context)
    if not isinstance(source, TaskStream):
        raise ValueError(f"train.protonet needs an omniglot: data source, this node streams {source.kind!r}")
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    losses, accuracies = zip(
        *(
            train_step(model, optimizer, source.episode(options.ways, options.shots, options.queries))
            for _ in range(options.local_episodes)
        ),
        strict=True,
    )
    images = options.local_episodes * options.ways * (options.shots + options.queries)
    metrics = MetricRecord(
        {
            "train_loss": float(np.mean(losses)),
            "train_acc": float(np.mean(accuracies)),
            NUM_EXAMPLES_KEY: images,
        }
    )
    return reply_with_content(message, RecordDict({ARRAYS_KEY: to_array_record(model), METRICS_KEY: metrics}))


def protonet_handlers() -> HandlerRegistry:
    """Device handlers of the federated arm: Flower's FedAvg sends "train", answered by train.protonet."""
    handlers = HandlerRegistry()
    handlers.register("train", "train.protonet")(train_protonet)
    return handlers


# -- trainers: one `step` is one unit of training, `episodes` counts every device's ------------------
@dataclass
class CentralTrainer:
    """One learner on episodes over every training class."""

    model: nn.Module
    stream: TaskStream
    options: EpisodeOptions
    halve_every: int
    episodes: int = 0
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.options.lr)

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.options.lr, self.episodes, self.halve_every)
        o = self.options
        loss, _ = train_step(self.model, self.optimizer, self.stream.episode(o.ways, o.shots, o.queries))
        self.losses.append(loss)
        self.episodes += 1


class FederatedTrainer:
    """Devices train on episodes of their own alphabets; Flower's FedAvg averages the weights each
    round, on a SimGrid (every message serialized as on the wire, bytes counted)."""

    def __init__(
        self,
        model: nn.Module,
        device_specs: list[str],
        options: EpisodeOptions,
        halve_every: int,
        per_round: int,
        seed: int,
    ) -> None:
        logging.getLogger("flwr").setLevel(logging.WARNING)  # not a line per round
        self.model, self.options, self.halve_every, self.per_round = model, options, halve_every, per_round
        self.grid = SimGrid.from_data_specs(
            device_specs, handler_factory=protonet_handlers, seed=seed, keep_sent=False
        )
        seed_node_sampling(seed)  # FedAvg samples the round's devices from the process-wide random
        self.strategy = FedAvg(
            fraction_train=per_round / len(device_specs),
            fraction_evaluate=0.0,
            min_train_nodes=per_round,
            min_available_nodes=per_round,
        )
        self.arrays: ArrayRecord = to_array_record(model)
        self.episodes = self.rounds = 0
        self.losses: list[float] = []
        self.round_bytes: list[int] = []

    def step(self) -> None:
        lr = learning_rate(self.options.lr, self.episodes, self.halve_every)
        config = ConfigRecord({MODEL_KEY: MODEL, **self.options.replace(lr=lr).model_dump()})
        reports = []
        self.arrays = run_rounds(
            self.strategy,
            self.grid,
            self.arrays,
            1,
            train_config=config,
            first_round=self.rounds + 1,
            on_round=lambda report, _: reports.append(report),
        )
        (report,) = reports
        if report.replied < self.per_round:
            raise RuntimeError(
                f"round {self.rounds + 1}: {report.replied} of {self.per_round} devices replied"
            )
        load_array_record(self.model, self.arrays)
        self.rounds += 1
        self.episodes += self.per_round * self.options.local_episodes
        self.losses.append(report.metrics["train_loss"])
        self.round_bytes.append(report.bytes_down + report.bytes_up)

    def close(self) -> None:
        self.grid.close()


# -- the few-shot test ---------------------------------------------------------------------------
@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Embeddings of `images` in eval mode, in batches."""
    model.eval()
    return torch.cat([model(images[i : i + EMBED_BATCH]) for i in range(0, len(images), EMBED_BATCH)])


def embed_classes(model: nn.Module, images: torch.Tensor, classes: np.ndarray) -> torch.Tensor:
    """[classes, 20 drawers, dim]: every drawing of each class (character * 4 + rotation)."""
    per_batch = max(1, EMBED_BATCH // DRAWERS)
    blocks = []
    for start in range(0, len(classes), per_batch):
        chosen = classes[start : start + per_batch]
        labels = np.repeat(np.arange(len(chosen)), DRAWERS)
        drawers = np.tile(np.arange(DRAWERS), len(chosen))
        blocks.append(
            embed(model, images_of(images, chosen, labels, drawers)).reshape(len(chosen), DRAWERS, -1)
        )
    return torch.cat(blocks)


def episode_accuracies(
    embeddings: torch.Tensor, ways: int, shots: int, queries: int, count: int, seed: int
) -> np.ndarray:
    """Query accuracy of `count` seeded `ways`-way `shots`-shot episodes over the embedded classes
    ([classes, drawers, dim]): nearest prototype by squared Euclidean distance."""
    classes, drawers = embeddings.shape[:2]
    if classes < ways or drawers < shots + queries:
        raise ValueError(
            f"{ways}-way {shots}+{queries} episodes need {ways} classes of {shots + queries} "
            f"drawings; the test set has {classes} of {drawers}"
        )
    rng = np.random.default_rng([seed, 13, ways, shots])
    out = np.empty(count)
    truth = torch.arange(ways).repeat_interleave(queries)
    for i in range(count):
        chosen = torch.from_numpy(rng.choice(classes, ways, replace=False))
        order = torch.from_numpy(np.argsort(rng.random((ways, drawers)), axis=1)[:, : shots + queries])
        picked = embeddings[chosen[:, None], order]  # [ways, shots + queries, dim]
        prototypes = picked[:, :shots].mean(dim=1)
        distances = torch.cdist(picked[:, shots:].reshape(ways * queries, -1), prototypes)
        out[i] = float((distances.argmin(dim=1) == truth).float().mean())
    return out


#: The standard Omniglot test: (ways, shots); name -> setting
TESTS: dict[str, tuple[int, int]] = {
    "5-way 1-shot": (5, 1),
    "5-way 5-shot": (5, 5),
    "20-way 1-shot": (20, 1),
    "20-way 5-shot": (20, 5),
}


def few_shot_test(
    embeddings: torch.Tensor, episodes: int, queries: int, seed: int
) -> dict[str, dict[str, float]]:
    """Every `TESTS` setting over the same embeddings: mean accuracy and its 95 % CI."""
    results = {}
    for name, (ways, shots) in TESTS.items():
        accuracies = episode_accuracies(embeddings, ways, shots, queries, episodes, seed)
        results[name] = summarize([{"acc": float(a)} for a in accuracies])
    return results


# -- backbones trained elsewhere -----------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """An embedding trained elsewhere: its zoo model, the module that embeds, and the file it came
    from (with its sha256, so results name the very model a run used)."""

    model: str
    module: nn.Module
    file: str
    sha256: str

    def record(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256, "model": self.model}


def load_backbone(path: str, calibration: Callable[[], torch.Tensor]) -> Backbone:
    """The embedding of a saved model (.arrays): an omniglot-protonet, or an omniglot-conv4
    (FedReptile's) whose features are the embedding.

    The conv4 net normalises with each batch's own statistics (no running statistics), so an
    image's embedding would depend on its batch; its batch norm is fixed to the statistics of
    `calibration()` (training images), making the test non-transductive like the protonet's.
    """
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"backbone {path} not found (a models/<arm>.arrays of a sim run)") from None
    record, file = array_record_from_bytes(blob), str(Path(path).resolve())
    if "head.weight" not in record:
        model = build_model(MODEL)
        load_array_record(model, record)
        return Backbone(MODEL, model, file, sha256_hex(blob))
    conv4 = OmniglotConv4(ways=int(record["head.weight"].shape[0]))
    load_array_record(conv4, record)
    return Backbone(
        "omniglot-conv4", freeze_batch_norm(conv4.features, calibration()), file, sha256_hex(blob)
    )


def calibration_images(split: OmniglotSplit, root: str, seed: int, count: int = 2000) -> torch.Tensor:
    """`count` random drawings of training classes: what `load_backbone` fixes batch norm to."""
    rng = np.random.default_rng([seed, 19])
    classes = split.train_classes()
    labels = rng.integers(len(classes), size=count)
    return images_of(split.images("train", root), classes, labels, rng.integers(DRAWERS, size=count))


@torch.no_grad()
def freeze_batch_norm(module: nn.Module, images: torch.Tensor) -> nn.Module:
    """Give batch norms without running statistics the statistics of `images`, used from now on."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d) and not m.track_running_stats]
    for norm in norms:
        norm.track_running_stats, norm.momentum = True, None  # momentum None: a cumulative average
        norm.register_buffer("running_mean", torch.zeros(norm.num_features))
        norm.register_buffer("running_var", torch.ones(norm.num_features))
        norm.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
    module.train()
    for start in range(0, len(images), EMBED_BATCH):
        module(images[start : start + EMBED_BATCH])
    return module.eval()
