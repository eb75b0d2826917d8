"""tinyfleet's handlers as a stock Flower ClientApp, so a Flower SuperNode runs them.

Every message type the registry knows is registered with Flower's own decorators
(`@app.train("fedreptile")` for "train.fedreptile", `@app.train()` for plain
"train"), and each one runs `registry.handle`, so a handler that fails answers
with tinyfleet's error reply exactly as it does in the agent and in SimGrid.
The node's data source is the SuperNode's node config, `--node-config
"data='sine:seed=3'"`, which is where the handlers already look
(`context.node_config["data"]`).

One difference from the agent: Flower routes by exact message type, so an
action the registry does not name (e.g. "train.fedprox") gets Flower's "no train
function registered" error instead of falling back to the plain "train" handler.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from tinyfleet.client.handlers import HandlerRegistry, default_handlers

#: The action Flower gives a bare category ("train" is routed as "train.default").
FLOWER_DEFAULT_ACTION = "default"


def make_client_app(handlers: HandlerRegistry | None = None) -> ClientApp:
    """A ClientApp answering every message type of `handlers` (default: all built-in learners)."""
    registry = handlers if handlers is not None else default_handlers()
    app = ClientApp()
    decorators: dict[str, Callable[[str], Callable]] = {
        "train": app.train,
        "evaluate": app.evaluate,
        "query": app.query,
    }

    def handle(message: Message, context: Context) -> Message:
        return registry.handle(message, context)

    for message_type in registry.message_types:
        category, _, action = message_type.partition(".")
        if category not in decorators:
            raise ValueError(
                f"handler for {message_type!r} cannot run in a Flower ClientApp: Flower routes only "
                f"the categories {', '.join(decorators)}"
            )
        decorators[category](action or FLOWER_DEFAULT_ACTION)(handle)
    return app
