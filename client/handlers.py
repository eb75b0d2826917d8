"""ClientApp-style message handlers, keyed by Flower message type.

A handler has Flower's ClientApp signature, `(Message, Context) -> Message`, so
the same function runs inside the tinyfleet agent, inside a simulated client and
inside a Flower SuperNode. Lookup is exact first ("train.fedreptile"), then by
category ("train"), so a stock Flower strategy that sends plain "train" reaches
the default trainer.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from flwr.app import Context, Message

from tinyfleet.common.flower_adapter import (
    ERR_HANDLER_FAILED,
    ERR_UNKNOWN_MESSAGE_TYPE,
    reply_with_error,
)
from tinyfleet.common.handler_lookup import handler_key

Handler = Callable[[Message, Context], Message]
log = logging.getLogger(__name__)


class HandlerRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, *message_types: str) -> Callable[[Handler], Handler]:
        """Decorator: `@handlers.register("train", "train.fedavg")`."""

        def wrap(fn: Handler) -> Handler:
            for message_type in message_types:
                self._handlers[message_type] = fn
            return fn

        return wrap

    @property
    def message_types(self) -> list[str]:
        return sorted(self._handlers)

    def resolve(self, message_type: str) -> Handler | None:
        key = handler_key(self._handlers, message_type)
        return None if key is None else self._handlers[key]

    def handle(self, message: Message, context: Context) -> Message:
        """Run the matching handler; failures come back as error replies, never exceptions."""
        message_type = message.metadata.message_type
        handler = self.resolve(message_type)
        if handler is None:
            return reply_with_error(
                message,
                ERR_UNKNOWN_MESSAGE_TYPE,
                f"no handler for message type {message_type!r}; "
                f"this agent handles: {', '.join(self.message_types)}",
            )
        try:
            return handler(message, context)
        except Exception as exc:  # a handler bug must not take the agent down
            log.warning("handler for %s failed: %s", message_type, exc)
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return reply_with_error(message, ERR_HANDLER_FAILED, reason)


def default_handlers() -> HandlerRegistry:
    """The registry every agent and simulated client starts with (all built-in learners)."""
    from tinyfleet.client import learners, meta_learners, proto_learners

    registry = HandlerRegistry()
    learners.register_all(registry)
    meta_learners.register_all(registry)
    proto_learners.register_all(registry)
    return registry
