"""Built-in learners: the handlers that train and evaluate a zoo model on local data.

These answer stock Flower strategies too: they read arrays from "arrays" and the
config from "config" and reply with "arrays" and "metrics" carrying
"num-examples", which is what Flower's FedAvg family expects.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from tinyfleet.client.data_sources import DataSource, shared_source
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.common.arrays import load_array_record, to_array_record
from tinyfleet.common.flower_adapter import reply_with_content
from tinyfleet.common.learning import loss_fn, make_optimizer
from tinyfleet.common.models import build_model, get_model_spec

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"


def node_source(context: Context) -> DataSource:
    spec = context.node_config.get("data")
    if not isinstance(spec, str) or not spec:
        raise ValueError("this node has no data source (start the agent with --data KIND:...)")
    return shared_source(spec)


def received_model(message: Message) -> tuple[nn.Module, ConfigRecord]:
    """The model named in the config, loaded with the arrays the message carries."""
    content = message.content
    config = content.config_records.get(CONFIG_KEY, ConfigRecord())
    model_name = str(config.get("model", "sine-mlp"))
    model = build_model(model_name)
    arrays = content.array_records.get(ARRAYS_KEY)
    if arrays is None:
        raise ValueError(f"message carries no ArrayRecord under {ARRAYS_KEY!r}")
    load_array_record(model, arrays)
    return model, config


def train(message: Message, context: Context) -> Message:
    """FedAvg-style local training: `local_steps` steps ("optimizer": sgd or adam) on fresh stream batches."""
    model, config = received_model(message)
    source = node_source(context)
    steps = int(config.get("local_steps", 10))
    batch = int(config.get("batch_size", 16))
    lr = float(config.get("lr", 0.01))
    criterion = loss_fn(str(config.get("model", "sine-mlp")))
    optimizer = make_optimizer(str(config.get("optimizer", "sgd")), model.parameters(), lr)
    model.train()
    total = 0.0
    for _ in range(steps):
        x, y = source.next(batch)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item()
    metrics = MetricRecord({"train_loss": total / max(steps, 1), "num-examples": steps * batch})
    return reply_with_content(
        message, RecordDict({ARRAYS_KEY: to_array_record(model), METRICS_KEY: metrics})
    )


def evaluate(message: Message, context: Context) -> Message:
    """Loss (and accuracy for classifiers) of the received model on held-back local samples."""
    model, config = received_model(message)
    source = node_source(context)
    n = int(config.get("eval_samples", 100))
    model_name = str(config.get("model", "sine-mlp"))
    x, y = source.holdout(n)
    model.eval()
    with torch.no_grad():
        out = model(x)
        values = {"eval_loss": float(loss_fn(model_name)(out, y)), "num-examples": n}
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


__all__ = ["ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "ArrayRecord", "register_all"]
