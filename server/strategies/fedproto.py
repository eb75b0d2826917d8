"""FedProto: devices learn classes on their own and share prototypes (mean embeddings with counts).

The server keeps the merged prototype set inside the global ArrayRecord, next to
the frozen backbone (`tinyfleet.common.proto_protocol` gives the layout), so each
round's artifact holds the classes the fleet knows and a resumed job continues
from it. A round asks the sampled devices for what they learned since their last
merge, sends them the merged set and the backbone's sha256 (the backbone itself
only to a node not known to hold it), and folds the replies in by counts:
p <- (k*p + n*p_new)/(k+n). Classes only some devices saw stay; classes that
appear in later rounds join. Replies are numbered and acknowledged per device
(see `proto_protocol`), so a lost reply arrives later exactly once and none is
merged twice. An evaluation sends the merged set; devices classify held-back
samples by the nearest prototype.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Final

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from tinyfleet.common.arrays import check_compatible
from tinyfleet.common.flower_adapter import aggregate_metricrecords, array_record_from_bytes
from tinyfleet.common.message_keys import CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, SERVER_ROUND_KEY
from tinyfleet.common.proto_protocol import (
    ACK_KEY,
    BACKBONE_KEY,
    BACKBONE_SHA_KEY,
    BASE_KEY,
    DELTA_KEY,
    EVALUATE_TYPE,
    LABELS_KEY,
    PROTOTYPES_KEY,
    SEQ_KEY,
    SESSION_KEY,
    TRAIN_TYPE,
    backbone_sha,
    from_wire,
    join_global,
    split_global,
    to_wire,
)
from tinyfleet.common.prototypes import PrototypeError, PrototypeSet, wire_bytes
from tinyfleet.common.strategy_options import FedProtoOptions

log = logging.getLogger(__name__)

STATE_VERSION: Final = 1


class FedProto(Strategy):
    """Prototype averaging for class-incremental fleets: Federated Reconnaissance (Hendryx et al.
    2021, https://arxiv.org/abs/2109.00150) over Prototypical Networks' class means (Snell et al.
    2017, https://arxiv.org/abs/1703.05175).

    Parameters
    ----------
    **options
        The fields of `tinyfleet.common.strategy_options.FedProtoOptions`, each documented
        there: `backbone`, `samples_per_round`, `encoding`, `eval_samples`, `metric`,
        `fraction_train`, `min_train_nodes`, `fraction_evaluate`, `min_evaluate_nodes`,
        `min_available_nodes`, `evaluate_every`, `seed`. A job file's [options] table holds
        the same keys. An unknown or invalid option raises `OptionsError` (a ValueError)
        naming it; a `backbone` file that cannot be read raises ValueError naming its path.

    Attributes
    ----------
    acked : dict of int to int
        Per node, the number of its last reply merged (checkpointed with the merged set).
    contributors : dict of str to set of int
        Per class, the nodes whose examples its prototype holds.
    """

    options_model: ClassVar[type[FedProtoOptions]] = FedProtoOptions

    def __init__(self, **options: Any) -> None:
        self.options = FedProtoOptions.parse(options)
        self._train_config = self.options.train_options().model_dump()
        self._eval_config = self.options.eval_options().model_dump()
        self._backbone_file = None if self.options.backbone is None else _read(self.options.backbone)
        # Checkpointed: which replies are merged, and from whom each class came.
        self.session = uuid.uuid4().hex
        self.acked: dict[int, int] = {}
        self.contributors: dict[str, set[int]] = {}
        self.rounds_done = 0
        # Per round, or rebuilt from the global arrays (not checkpointed).
        self._holders: set[int] = set()  # nodes known to hold the backbone
        self._backbone = ArrayRecord()
        self._sha = ""
        self._merged: PrototypeSet | None = None
        self._asked: set[int] = set()
        self._bytes_down = 0

    # -- Flower Strategy API ------------------------------------------------
    def summary(self) -> None:
        log.info(
            "FedProto: backbone %s, %d samples a round, %s on the wire, %s, fraction %s",
            self.options.backbone or "of the job's model",
            self.options.samples_per_round,
            self.options.encoding,
            self.options.metric,
            self.options.fraction_train,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._load(arrays)
        nodes = self._sample(server_round, "train", grid, self.options.fraction_train,
                             self.options.min_train_nodes)
        self._asked = set(nodes)
        merged = self._merged
        self._bytes_down = 0 if merged is None else (
            len(nodes) * len(merged) * wire_bytes(merged.dim, self.options.encoding)
        )
        static = {**dict(config), **self._train_config, SERVER_ROUND_KEY: server_round,
                  SESSION_KEY: self.session}
        messages = []
        for node in nodes:
            content = self._content(node, {**static, ACK_KEY: self.acked.get(node, 0)})
            messages.append(Message(content=content, message_type=TRAIN_TYPE, dst_node_id=node))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        merged = None if self._merged is None else self._merged.copy()
        known = set() if merged is None else set(merged.labels)
        contents, skipped, classes_up, dim = [], 0, 0, None
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d replied with an error: %s", server_round, node,
                            reply.error.reason)
                self._holders.discard(node)  # it may have lost the backbone
                continue
            try:
                delta, seq = self._read_reply(reply, node, merged)
            except (PrototypeError, ValueError, KeyError) as exc:
                log.warning("round %d: prototypes from node %d skipped: %s", server_round, node, exc)
                skipped += 1
                continue
            self._holders.add(node)
            self.acked[node] = seq
            if merged is None:
                merged = delta.copy()
            else:
                merged.merge(delta)
            for label in delta.labels:
                self.contributors.setdefault(label, set()).add(node)
            classes_up += len(delta)
            dim = delta.dim
            contents.append(reply.content)
        self.rounds_done = server_round
        if merged is None or not contents:
            return None, None
        per_class = wire_bytes(merged.dim if dim is None else dim, self.options.encoding)
        metrics = aggregate_metricrecords(contents, NUM_EXAMPLES_KEY)
        metrics.update(
            {
                "nodes": len(contents),
                "skipped": skipped,
                "classes": len(merged),
                "new_classes": len(set(merged.labels) - known),
                "examples": sum(merged.counts.values()),
                "bytes_per_class": per_class,
                "prototype_bytes_up": classes_up * per_class,
                "prototype_bytes_down": self._bytes_down,
            }
        )
        self._merged = merged
        return join_global(self._backbone, merged, self.contributors), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round % self.options.evaluate_every:
            return []
        self._load(arrays)
        if self._merged is None:
            return []
        nodes = self._sample(server_round, "evaluate", grid, self.options.fraction_evaluate,
                             self.options.min_evaluate_nodes)
        static = {**dict(config), **self._eval_config, SERVER_ROUND_KEY: server_round}
        return [
            Message(content=self._content(node, dict(static)), message_type=EVALUATE_TYPE,
                    dst_node_id=node)
            for node in nodes
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        contents = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: evaluation on node %d failed: %s", server_round, node,
                            reply.error.reason)
                self._holders.discard(node)
            elif NUM_EXAMPLES_KEY in reply.content.metric_records.get(METRICS_KEY, {}):
                self._holders.add(node)
                contents.append(RecordDict({METRICS_KEY: reply.content.metric_records[METRICS_KEY]}))
        return aggregate_metricrecords(contents, NUM_EXAMPLES_KEY) if contents else None

    # -- checkpointing --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the session and acknowledgements that go with the round's merged set (which
        the round's artifact holds), and each class's contributors. Who holds the backbone is not
        kept: after a resume every node is sent it once more."""
        return {
            "version": STATE_VERSION,
            "session": self.session,
            "rounds_done": self.rounds_done,
            "acked": {str(node): seq for node, seq in sorted(self.acked.items())},
            "contributors": {label: sorted(nodes) for label, nodes in sorted(self.contributors.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"FedProto state version {state.get('version')!r} is not {STATE_VERSION}")
        self.session = str(state["session"])
        self.rounds_done = int(state["rounds_done"])
        self.acked = {int(node): int(seq) for node, seq in state["acked"].items()}
        self.contributors = {str(k): {int(n) for n in v} for k, v in state["contributors"].items()}
        self._holders = set()

    # -- helpers --------------------------------------------------------------
    def _load(self, arrays: ArrayRecord) -> None:
        """Backbone and merged set from the global arrays; a `backbone` file replaces the job's
        initial weights (same tensors and shapes)."""
        backbone, self._merged = split_global(arrays)
        if self._backbone_file is not None:
            check_compatible(self._backbone_file, backbone, what=f"backbone {self.options.backbone!r}")
            backbone = self._backbone_file
        self._backbone, self._sha = backbone, backbone_sha(backbone)

    def _content(self, node: int, config: dict[str, Any]) -> RecordDict:
        """A message's content: config, merged set (if any), backbone if the node may lack it."""
        config[BACKBONE_SHA_KEY] = self._sha
        content = RecordDict()
        if self._merged is not None:
            record, labels = to_wire(self._merged, self.options.encoding)
            content[PROTOTYPES_KEY] = record
            config[LABELS_KEY] = labels
        if node not in self._holders:
            content[BACKBONE_KEY] = self._backbone
        content[CONFIG_KEY] = ConfigRecord(config)
        return content

    def _sample(self, server_round: int, purpose: str, grid: Grid, fraction: float, fewest: int) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if fraction == 0.0 or not nodes or len(nodes) < self.options.min_available_nodes:
            if fraction:
                log.warning("round %d: %d node(s) available, %d needed; nobody is asked to %s",
                            server_round, len(nodes), self.options.min_available_nodes, purpose)
            return []
        count = min(len(nodes), max(int(len(nodes) * fraction), fewest))
        return sorted(random.Random(f"{self.options.seed}:{purpose}:{server_round}").sample(nodes, count))

    def _read_reply(
        self, reply: Message, node: int, merged: PrototypeSet | None
    ) -> tuple[PrototypeSet, int]:
        """The delta a reply carries and its number; one that is stale, already merged or
        does not fit the merged set raises ValueError/PrototypeError saying why."""
        if node not in self._asked:
            raise ValueError("node was not asked for prototypes this round")
        content = reply.content
        info = content.config_records.get(DELTA_KEY)
        record = content.array_records.get(PROTOTYPES_KEY)
        if info is None or record is None:
            raise ValueError(f"reply carries no {DELTA_KEY!r} ConfigRecord and {PROTOTYPES_KEY!r} arrays")
        metrics = list(content.metric_records.values())
        examples = metrics[0].get(NUM_EXAMPLES_KEY) if len(metrics) == 1 else None
        if not isinstance(examples, int) or examples < 0:
            raise ValueError(f"reply needs one MetricRecord with an integer {NUM_EXAMPLES_KEY!r} >= 0 "
                             "(the round's metrics are weighted by it)")
        if info.get(BACKBONE_SHA_KEY) != self._sha:
            raise ValueError(f"prototypes embedded with backbone {info.get(BACKBONE_SHA_KEY)!r}, "
                             f"not this job's {self._sha}")
        base, seq = info.get(BASE_KEY), info.get(SEQ_KEY)
        if not isinstance(base, int) or not isinstance(seq, int) or seq <= base:
            raise ValueError(f"reply numbers base={base!r}, seq={seq!r} are not integers with seq > base")
        if base != self.acked.get(node, 0):
            raise ValueError(f"delta builds on reply {base}, but the last merged from this node is "
                             f"{self.acked.get(node, 0)}: already merged or stale")
        delta = from_wire(record, info.get(LABELS_KEY))
        if merged is not None and delta.dim != merged.dim:
            raise PrototypeError(f"prototypes of dimension {delta.dim}, the merged set's is {merged.dim}")
        return delta, seq


def _read(path: str) -> ArrayRecord:
    try:
        return array_record_from_bytes(Path(path).expanduser().read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"backbone {path!r} is not a readable ArrayRecord file: {exc}") from exc
