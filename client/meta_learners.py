"""Device side of FedReptile / TinyMetaFed: the `train.fedreptile` and `evaluate.fedreptile` handlers.

Training starts from the weights the coordinator sent (or its compressed delta
applied to the device's copy, with the config kept from the last sync), rebuilds
the local layers from local data (partial local reconstruction: they start at
zero and train alone for `reconstruct_steps`, global layers frozen), then takes
`inner_steps` steps on stream batches (fresh each step, or cycling over its
`inner_samples` most recent samples).
What goes back is the update of the global layers only,
compressed with top-P and int8 when asked; the part not sent stays in
`context.state` and is added to the next update (error feedback). With
`keep_optimizer_state` the inner optimizer's state (Adam's moments) is kept there
too, as Reptile keeps it across tasks. A device keeps one Context for its life,
so this state spans rounds.

Adaptation and scoring are tinyfleet.common.learning's, shared with the
meta-test harness (tinyfleet.simulations.meta_eval), so training and evaluation
adapt the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.client.learners import Metrics, model_from_config, node_source
from tinyfleet.common import codec
from tinyfleet.common.arrays import check_compatible, from_numpy_dict, to_numpy_dict
from tinyfleet.common.flower_adapter import reply_with_content
from tinyfleet.common.learning import Sampler, adapt, episode_metrics, loss_fn, reset_local
from tinyfleet.common.message_keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SERVER_ROUND_KEY,
)
from tinyfleet.common.optimizer_memory import OptimizerMemory
from tinyfleet.common.reptile_protocol import (
    DELTA_KEY,
    PER_MESSAGE_KEYS,
    REPLICA_BASE,
    SYNC_KEY,
    UPDATE_KEY,
    is_local,
)
from tinyfleet.common.strategy_options import ReptileEvalOptions, ReptileTrainOptions

RESIDUAL_STATE = "fedreptile.residual"
REPLICA_STATE = "fedreptile.replica"
REPLICA_META_STATE = "fedreptile.replica-meta"  # the sync id and round of the replica
REPLICA_ROUND = "round"
CONFIG_STATE = "fedreptile.config"  # the static config of the sync the device holds
OPTIMIZER_STATE = "fedreptile.optimizer"  # the inner optimizer's state, kept across rounds


class Stream(Protocol):
    """What `recent_samples` draws from: a stream of (x, y) batches (every DataSource is one)."""

    def next(self, n: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def recent_samples(source: Stream, samples: int) -> Sampler:
    """Steps on the device's `samples` most recent samples, cycling through them in minibatches;
    with samples <= 0 every step takes a fresh batch from the stream instead."""
    if samples <= 0:
        return source.next
    x, y = source.next(samples)
    position = 0

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal position
        index = torch.arange(position, position + n) % samples
        position = (position + n) % samples
        return x[index], y[index]

    return sample


def train(message: Message, context: Context) -> Message:
    """One FedReptile round on this device: adapt from the received weights, return the update."""
    config, start = _round_inputs(message.content, context)
    model_name, model = model_from_config(config)
    options = ReptileTrainOptions.from_config(config)
    _load_global_part(model, start, options.local_layers)
    source = node_source(context)
    new_task = getattr(source, "new_task", None)
    if callable(new_task):  # episodic sources (e.g. omniglot) start a fresh task each round
        new_task()
    memory = (
        OptimizerMemory.from_record(context.state.array_records.get(OPTIMIZER_STATE))
        if options.keep_optimizer_state
        else None
    )
    losses = adapt(
        model,
        recent_samples(source, options.inner_samples),
        steps=options.inner_steps,
        lr=options.inner_lr,
        batch=options.inner_batch,
        criterion=loss_fn(model_name),
        optimizer=options.inner_optimizer,
        local_layers=options.local_layers,
        reconstruct_steps=options.reconstruct_steps,
        memory=memory,
    )
    if memory is not None and memory.values:
        context.state[OPTIMIZER_STATE] = memory.to_record()
    adapted = {k: v.detach().numpy() for k, v in model.state_dict().items() if k in start}
    update = {k: adapted[k] - start[k] for k in start}
    if codec.kind_for(options.top_p, options.quantize) == codec.DENSE:
        record = codec.encode(update)
    else:
        residual = _stored(context, RESIDUAL_STATE, codec.Layout.of(update))
        record, _, residual = codec.compress(
            update, residual, top_p=options.top_p, quantize=options.quantize
        )
        context.state[RESIDUAL_STATE] = from_numpy_dict(residual, dtype=np.float32)
    metrics = MetricRecord(
        {"train_loss": float(np.mean(losses)), NUM_EXAMPLES_KEY: options.inner_steps * options.inner_batch}
    )
    return reply_with_content(message, RecordDict({UPDATE_KEY: record, METRICS_KEY: metrics}))


def evaluate(message: Message, context: Context) -> Message:
    """K-shot adaptation on held-back local samples: query loss (and accuracy) before and after."""
    content = message.content
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    model_name, model = model_from_config(config)
    options = ReptileEvalOptions.from_config(config)
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ValueError(f"evaluate message carries no ArrayRecord under {ARRAYS_KEY!r}")
    _load_global_part(model, to_numpy_dict(arrays), options.local_layers)
    shots, queries = options.eval_shots, options.eval_queries
    x, y = node_source(context).holdout(shots + queries)
    metrics = episode_metrics(
        model,
        model_name,
        (x[:shots], y[:shots]),
        (x[shots:], y[shots:]),
        steps=options.eval_steps,
        lr=options.adapt_lr,
        optimizer=options.inner_optimizer,
        local_layers=options.local_layers,
        reconstruct_steps=options.reconstruct_steps,
    )
    values: Metrics = {**metrics, NUM_EXAMPLES_KEY: int(len(x) - shots)}
    return reply_with_content(message, RecordDict({METRICS_KEY: MetricRecord(values)}))


def register_all(registry: HandlerRegistry) -> None:
    registry.register("train.fedreptile")(train)
    registry.register("evaluate.fedreptile")(evaluate)


# -- helpers -------------------------------------------------------------------


def _round_inputs(content: RecordDict, context: Context) -> tuple[ConfigRecord, dict[str, np.ndarray]]:
    """The round's whole config and starting θ, from the message and, for a delta, the sync's state.

    A dense message with a sync id (re)syncs: its static config, and the replica
    θ, are kept in `context.state`. A delta applies to that replica and extends
    that config; if the device does not hold the sync and replica round the
    delta names (restart, missed reply, other coordinator), it is refused, and
    the coordinator resyncs the device next time.
    """
    received = content.config_records.get(CONFIG_KEY, ConfigRecord())
    sync, server_round = received.get(SYNC_KEY), received.get(SERVER_ROUND_KEY)
    if sync is not None and not isinstance(server_round, int):
        raise ValueError(
            f"message of sync {sync!r} needs an integer {SERVER_ROUND_KEY!r}, got {server_round!r}"
        )
    arrays, state = content.array_records, context.state
    if ARRAYS_KEY in arrays:
        config = received
        start = to_numpy_dict(arrays[ARRAYS_KEY])
        if sync is not None:
            static = {k: v for k, v in received.items() if k not in PER_MESSAGE_KEYS}
            state[CONFIG_STATE] = ConfigRecord(static)
    elif DELTA_KEY in arrays:
        meta = state.config_records.get(REPLICA_META_STATE, ConfigRecord())
        held = (meta.get(SYNC_KEY), meta.get(REPLICA_ROUND))
        wanted = (sync, received.get(REPLICA_BASE))
        kept = REPLICA_STATE in state.array_records and CONFIG_STATE in state.config_records
        if held != wanted or not kept:
            raise ValueError(
                f"out of sync: this device holds sync {held[0]!r} with the replica of round {held[1]!r}, "
                f"the delta is against sync {wanted[0]!r}, round {wanted[1]!r}"
            )
        config = ConfigRecord({**state.config_records[CONFIG_STATE], **received})
        replica = to_numpy_dict(state.array_records[REPLICA_STATE])
        decoded = codec.decode(arrays[DELTA_KEY], codec.Layout.of(replica))
        start = {k: replica[k] + decoded[k] for k in replica}
    else:
        raise ValueError(f"train message carries neither {ARRAYS_KEY!r} nor {DELTA_KEY!r}")
    if sync is not None and isinstance(server_round, int):  # (a sync without a round was refused)
        state[REPLICA_STATE] = from_numpy_dict(start, dtype=np.float32)
        state[REPLICA_META_STATE] = ConfigRecord({SYNC_KEY: str(sync), REPLICA_ROUND: server_round})
    return config, start


def _load_global_part(model: nn.Module, received: dict[str, np.ndarray], local_layers: Sequence[str]) -> None:
    """Load the received global part (exactly the model's tensors but the local layers, same
    shapes) and restart the local layers from zero."""
    state = model.state_dict()
    check_compatible(
        received, {k: v for k, v in state.items() if not is_local(k, local_layers)}, what="received arrays"
    )
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in received.items()}, strict=False)
    reset_local(model, local_layers)


def _stored(context: Context, key: str, layout: codec.Layout) -> dict[str, np.ndarray] | None:
    record = context.state.array_records.get(key)
    if record is None:
        return None
    values = to_numpy_dict(record)
    return values if codec.Layout.of(values) == layout else None
