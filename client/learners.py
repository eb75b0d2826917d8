"""Built-in learners: the handlers that train and evaluate a zoo model on local data.

These answer stock Flower strategies too: they read arrays from "arrays" and the
config from "config" and reply with "arrays" and "metrics" carrying
"num-examples", which is what Flower's FedAvg family expects. Flower's FedProx
adds "proximal-mu" to the config; training then applies its proximal term.
The config's options and their defaults are `LocalLearnerOptions`.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from tinyfleet.client.data_sources import DataSource, shared_source
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.common.arrays import load_array_record, to_array_record
from tinyfleet.common.flower_adapter import reply_with_content
from tinyfleet.common.learning import loss_fn, make_optimizer
from tinyfleet.common.message_keys import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, MODEL_KEY, NUM_EXAMPLES_KEY
from tinyfleet.common.models import build_model, get_model_spec
from tinyfleet.common.strategy_options import LocalLearnerOptions

DEFAULT_MODEL = "sine-mlp"
#: What a MetricRecord holds (its constructor wants exactly this dict type).
Metrics = dict[str, int | float | list[int] | list[float]]
MODEL_KWARG_PREFIX = "model."


def node_source(context: Context) -> DataSource:
    spec = context.node_config.get("data")
    if not isinstance(spec, str) or not spec:
        raise ValueError("this node has no data source (start the agent with --data KIND:...)")
    return shared_source(spec)


def model_from_config(config: ConfigRecord) -> tuple[str, nn.Module]:
    """The zoo model the config names; keys "model.<kw>" (e.g. "model.ways") become build kwargs."""
    name = str(config.get(MODEL_KEY, DEFAULT_MODEL))
    kwargs: dict[str, Any] = {
        k[len(MODEL_KWARG_PREFIX) :]: v for k, v in config.items() if k.startswith(MODEL_KWARG_PREFIX)
    }
    return name, build_model(name, **kwargs)


def received_model(message: Message) -> tuple[str, nn.Module, ConfigRecord]:
    """The model named in the config (its name, the module), loaded with the arrays the message carries."""
    content = message.content
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    name, model = model_from_config(config)
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ValueError(f"message carries no ArrayRecord under {ARRAYS_KEY!r}")
    load_array_record(model, arrays)
    return name, model, config


def train(message: Message, context: Context) -> Message:
    """FedAvg-style local training: `local_steps` steps on fresh stream batches.

    With μ = "proximal-mu" > 0 (Flower's FedProx) the loss minimised is FedProx's,
    loss + μ/2 · ||w - w_global||², w_global being the weights received; the
    reported train_loss is the task loss alone, comparable across μ.
    """
    name, model, config = received_model(message)
    options = LocalLearnerOptions.from_config(config)
    source = node_source(context)
    criterion = loss_fn(name)
    optimizer = make_optimizer(options.optimizer, model.parameters(), options.lr)
    anchor = [p.detach().clone() for p in model.parameters()] if options.proximal_mu > 0 else []
    model.train()
    total = 0.0
    for _ in range(options.local_steps):
        x, y = source.next(options.batch_size)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        objective = loss + _proximal_term(model, anchor, options.proximal_mu) if anchor else loss
        objective.backward()
        optimizer.step()
        total += loss.item()
    metrics = MetricRecord(
        {
            "train_loss": total / max(options.local_steps, 1),
            NUM_EXAMPLES_KEY: options.local_steps * options.batch_size,
        }
    )
    return reply_with_content(
        message, RecordDict({ARRAYS_KEY: to_array_record(model), METRICS_KEY: metrics})
    )


def _proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """μ/2 · ||w - w_global||² over every parameter (FedProx, Li et al. 2020)."""
    squares = [((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)]
    return mu / 2 * torch.stack(squares).sum()


def evaluate(message: Message, context: Context) -> Message:
    """Loss (and accuracy for classifiers) of the received model on held-back local samples."""
    model_name, model, config = received_model(message)
    n = LocalLearnerOptions.from_config(config).eval_samples
    x, y = node_source(context).holdout(n)
    model.eval()
    with torch.no_grad():
        out = model(x)
        values: Metrics = {"eval_loss": float(loss_fn(model_name)(out, y)), NUM_EXAMPLES_KEY: n}
        if get_model_spec(model_name).task == "classification":
            values["eval_acc"] = float((out.argmax(dim=1) == y).float().mean())
    return reply_with_content(message, RecordDict({METRICS_KEY: MetricRecord(values)}))


def query(message: Message, context: Context) -> Message:
    """What this node is: its data kind and node id (used by health checks and the CLI)."""
    info = ConfigRecord(
        {"data": str(context.node_config.get("data", "")), "node_id": str(context.node_id)}
    )
    return reply_with_content(message, RecordDict({"info": info}))


def register_all(registry: HandlerRegistry) -> None:
    registry.register("train", "train.fedavg")(train)
    registry.register("evaluate", "evaluate.fedavg")(evaluate)
    registry.register("query")(query)

