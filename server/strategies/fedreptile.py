"""FedReptile: federated Reptile (online serial or parallel) with the TinyMetaFed extensions.

The server step is Reptile's: θ ← θ + ε · (weighted mean over replies of θᵢ - θ),
weights = "num-examples". `serial=True` is TinyReptile's online serial variant:
one device per round, visited in turn (sorted node ids) or at random (seeded);
otherwise a seeded fraction of the nodes is sampled.

TinyMetaFed options travel to the devices in the ConfigRecord and shape what
crosses the wire: `local_layers` never leave the device (they are cut from every
outgoing ArrayRecord and left untouched by aggregation); `top_p` and `quantize`
compress the update the device sends (with error feedback on the device).

`compress_downlink` makes the train messages stateful (see
`tinyfleet.common.reptile_protocol`): the server sends only a compressed delta
against the copy of θ it knows each device holds (its replica), and sends the
static config (model, inner loop, compression) only with the dense model when it
(re)syncs a device: first contact, coordinator resume, failed round, changed
config. On sine that config is ~200 bytes, a tenth of a compressed round.
Without the option every message is self-contained, so stock handlers that keep
no state can answer.

Replies carry either "update" (a `tinyfleet.common.codec` payload holding
θᵢ - θ_start) or "arrays" (plain adapted weights, as any Flower "train" handler
returns), so the strategy also runs on nodes without a `train.fedreptile`
handler. Bad replies are skipped, not aggregated, with a warning naming node and
problem; the round's metrics count them as "skipped".
"""

from __future__ import annotations

import hashlib
import logging
import random
import uuid
from collections.abc import Iterable
from typing import Any, ClassVar, Final

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from tinyfleet.common import codec
from tinyfleet.common.arrays import from_numpy_dict, to_numpy_dict
from tinyfleet.common.flower_adapter import aggregate_metricrecords
from tinyfleet.common.message_keys import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SERVER_ROUND_KEY
from tinyfleet.common.reptile_protocol import (
    DELTA_KEY,
    EVALUATE_TYPE,
    PER_MESSAGE_KEYS,
    REPLICA_BASE,
    SYNC_KEY,
    TRAIN_TYPE,
    UPDATE_KEY,
    is_local,
)
from tinyfleet.common.strategy_options import FedReptileOptions

log = logging.getLogger(__name__)

STATE_VERSION: Final = 1


class FedReptile(Strategy):
    """Federated Reptile (Nichol et al. 2018, https://arxiv.org/abs/1803.02999), online and serial
    as TinyReptile (https://arxiv.org/abs/2304.05201), with the communication options of
    TinyMetaFed (https://arxiv.org/abs/2307.06822).

    Parameters
    ----------
    **options
        The fields of `tinyfleet.common.strategy_options.FedReptileOptions`, each documented
        there; a job file's [options] table holds the same keys. An unknown or invalid option
        raises `OptionsError` (a ValueError) naming it.
    """

    options_model: ClassVar[type[FedReptileOptions]] = FedReptileOptions

    def __init__(self, **options: Any) -> None:
        self.options = FedReptileOptions.parse(options)
        self._train_config = self.options.train_options().to_config()
        self._eval_config = self.options.eval_options().to_config()
        # Round bookkeeping (checkpointed) and per-exchange state (not checkpointed).
        self.rounds_done = 0
        self.last_node: int | None = None
        self.visits = 0
        self._session = uuid.uuid4().hex
        self._theta: ArrayRecord | None = None
        self._starts: dict[int, dict[str, np.ndarray]] = {}
        # node -> (sync id, round of the replica, the replica) the node holds or will hold
        self._pending: dict[int, tuple[str, int, dict[str, np.ndarray]]] = {}
        self._replicas: dict[int, tuple[str, int, dict[str, np.ndarray]]] = {}

    @property
    def local_layers(self) -> tuple[str, ...]:
        """Layers that stay on the devices (read by the update guard, as of any strategy)."""
        return self.options.local_layers

    # -- Flower Strategy API ------------------------------------------------
    def summary(self) -> None:
        log.info(
            "FedReptile: ε=%s→%s (%s), %s, inner %s, local layers %s, top_p=%s, quantize=%s, downlink %s",
            self.options.epsilon,
            self.options.epsilon_final,
            self.options.epsilon_schedule,
            f"serial ({self.options.visit_order})"
            if self.options.serial
            else f"parallel (fraction {self.options.fraction_train})",
            self._train_config,
            list(self.local_layers) or "none",
            self.options.top_p,
            self.options.quantize,
            "compressed" if self.options.compress_downlink else "dense",
        )

    def epsilon_for(self, server_round: int) -> float:
        return self.options.epsilon_for(server_round)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._theta = arrays
        global_part = self._global_part(arrays)
        nodes = self._sample_train(server_round, sorted(grid.get_node_ids()))
        self._starts, self._pending = {}, {}
        if not nodes:
            return []
        static = {
            k: v for k, v in {**dict(config), **self._train_config}.items() if k not in PER_MESSAGE_KEYS
        }
        sync = self._sync_id(static) if self.options.compress_downlink else None
        theta = to_numpy_dict(global_part)
        messages = []
        for node in nodes:
            cfg: dict[str, Any] = {SERVER_ROUND_KEY: server_round}
            content = RecordDict()
            start = theta
            held = self._replicas.get(node) if sync is not None else None
            if held is not None and held[0] == sync:
                _, base_round, base = held
                delta = {k: theta[k] - base[k] for k in theta}
                record = codec.encode(delta, top_p=self.options.top_p, quantize=self.options.quantize)
                decoded = codec.decode(record, codec.Layout.of(theta))
                start = {k: base[k] + decoded[k] for k in theta}
                cfg.update({SYNC_KEY: sync, REPLICA_BASE: base_round})
                content[DELTA_KEY] = record
            else:  # self-contained message, or a (re)sync: the dense model and the whole config
                cfg.update(static)
                if sync is not None:
                    cfg[SYNC_KEY] = sync
                content[ARRAYS_KEY] = global_part
            content[CONFIG_KEY] = ConfigRecord(cfg)
            if sync is not None:
                self._pending[node] = (sync, server_round, start)
            self._starts[node] = start
            messages.append(Message(content=content, message_type=TRAIN_TYPE, dst_node_id=node))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._theta is None:
            raise RuntimeError("aggregate_train called before configure_train")
        theta = self._theta
        layout = codec.Layout.of({k: tuple(v.shape) for k, v in self._global_part(theta).items()})
        deltas, weights, contents = [], [], []
        answered: set[int] = set()
        skipped = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning(
                    "round %d: node %d replied with an error: %s", server_round, node, reply.error.reason
                )
                continue
            try:
                delta, weight = self._read_reply(reply, node, layout)
            except (codec.CodecError, ValueError, KeyError) as exc:
                log.warning("round %d: update from node %d skipped: %s", server_round, node, exc)
                skipped += 1
                continue
            answered.add(node)
            deltas.append(delta)
            weights.append(weight)
            contents.append(reply.content)
        if self.options.compress_downlink:
            for node, replica in self._pending.items():
                if node in answered:
                    self._replicas[node] = replica
                else:  # its copy is unknown now: resync it (model and config) next time
                    self._replicas.pop(node, None)
        self._pending = {}
        self.rounds_done = server_round
        if not deltas:
            return None, None
        eps = self.epsilon_for(server_round)
        total = float(sum(weights))
        factors = [w / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)
        new = {}
        for key, array in theta.items():
            values = array.numpy()
            if key in layout.names:
                step = sum(f * d[key].astype(np.float64) for f, d in zip(factors, deltas, strict=True))
                values = (values.astype(np.float64) + eps * step).astype(values.dtype)
            new[key] = values
        metrics = aggregate_metricrecords(contents, self.options.weighted_by_key)
        metrics["epsilon"] = eps
        metrics["nodes"] = len(deltas)
        metrics["skipped"] = skipped
        return from_numpy_dict(new), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.options.fraction_evaluate == 0.0 or server_round % self.options.evaluate_every:
            return []
        nodes = sorted(grid.get_node_ids())
        wanted = max(int(len(nodes) * self.options.fraction_evaluate), self.options.min_evaluate_nodes)
        count = min(len(nodes), wanted)
        chosen = self._rng(server_round, "evaluate").sample(nodes, count)
        global_part = self._global_part(arrays)
        cfg = {**dict(config), **self._eval_config, SERVER_ROUND_KEY: server_round}
        return [
            Message(
                content=RecordDict({ARRAYS_KEY: global_part, CONFIG_KEY: ConfigRecord(dict(cfg))}),
                message_type=EVALUATE_TYPE,
                dst_node_id=node,
            )
            for node in chosen
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        contents = []
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: evaluation on node %d failed: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
            elif self.options.weighted_by_key in reply.content.metric_records.get(METRICS_KEY, {}):
                contents.append(RecordDict({METRICS_KEY: reply.content.metric_records[METRICS_KEY]}))
        return aggregate_metricrecords(contents, self.options.weighted_by_key) if contents else None

    # -- checkpointing --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able round bookkeeping; what devices hold is not kept (every device resyncs after resume)."""
        return {
            "version": STATE_VERSION,
            "rounds_done": self.rounds_done,
            "last_node": self.last_node,
            "visits": self.visits,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"FedReptile state version {state.get('version')!r} is not {STATE_VERSION}")
        self.rounds_done = int(state["rounds_done"])
        last = state.get("last_node")
        self.last_node = None if last is None else int(last)
        self.visits = int(state["visits"])
        self._replicas = {}

    # -- helpers --------------------------------------------------------------
    def _global_part(self, arrays: ArrayRecord) -> ArrayRecord:
        for layer in self.local_layers:
            if not any(is_local(k, (layer,)) for k in arrays):
                raise ValueError(
                    f"local layer {layer!r} matches no array of the model; arrays: {', '.join(arrays.keys())}"
                )
        return ArrayRecord({k: v for k, v in arrays.items() if not is_local(k, self.local_layers)})

    def _sync_id(self, static: dict[str, Any]) -> str:
        """Names this session's static config: a new session or a changed config is a new sync."""
        text = repr((self._session, sorted(static.items())))
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def _rng(self, server_round: int, purpose: str) -> random.Random:
        return random.Random(f"{self.options.seed}:{purpose}:{server_round}")

    def _sample_train(self, server_round: int, nodes: list[int]) -> list[int]:
        if len(nodes) < self.options.min_available_nodes or not nodes:
            log.warning(
                "round %d: %d node(s) available, %d needed; nobody trains",
                server_round,
                len(nodes),
                self.options.min_available_nodes,
            )
            return []
        if not self.options.serial:
            if self.options.fraction_train == 0.0:
                return []
            wanted = max(int(len(nodes) * self.options.fraction_train), self.options.min_train_nodes)
            count = min(len(nodes), wanted)
            return sorted(self._rng(server_round, "train").sample(nodes, count))
        if self.options.visit_order == "random":
            node = self._rng(server_round, "train").choice(nodes)
        else:
            later = [n for n in nodes if self.last_node is not None and n > self.last_node]
            node = later[0] if later else nodes[0]
        self.last_node = node
        self.visits += 1
        return [node]

    def _read_reply(
        self, reply: Message, node: int, layout: codec.Layout
    ) -> tuple[dict[str, np.ndarray], float]:
        content = reply.content
        metrics, key = content.metric_records.get(METRICS_KEY), self.options.weighted_by_key
        if metrics is None or key not in metrics:
            raise ValueError(f"reply has no MetricRecord {METRICS_KEY!r} with {key!r}")
        weight = float(metrics[key])  # type: ignore[arg-type]
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"{key} must be a non-negative number, got {weight}")
        if node not in self._starts:
            raise ValueError("node was not asked to train this round")
        start = self._starts[node]
        if UPDATE_KEY in content.array_records:
            delta = codec.decode(content.array_records[UPDATE_KEY], layout)
        elif ARRAYS_KEY in content.array_records:
            record = content.array_records[ARRAYS_KEY]
            adapted = {k: v for k, v in record.items() if not is_local(k, self.local_layers)}
            weights = codec.decode(ArrayRecord(adapted), layout)
            delta = {k: weights[k] - start[k] for k in layout.names}
        else:
            raise ValueError(f"reply carries neither {UPDATE_KEY!r} nor {ARRAYS_KEY!r}")
        for key, values in delta.items():
            if not np.isfinite(values).all():
                raise ValueError(f"update for {key!r} holds NaN/Inf")
        return delta, weight
