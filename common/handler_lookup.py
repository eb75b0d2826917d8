"""Which handler answers a message type: one rule for the agent that runs handlers and the
coordinator that knows, from the agent's Hello, which types it has handlers for.

A handler registered for the exact type ("train.fedreptile") wins; otherwise one registered
for its category ("train"), so a stock Flower strategy's plain "train" and a qualified
"train.fedavg" both reach a default trainer.
"""

from __future__ import annotations

from collections.abc import Collection


def handler_key(registered: Collection[str], message_type: str) -> str | None:
    """The registered type that handles `message_type`, or None when none does."""
    if message_type in registered:
        return message_type
    category, dot, _ = message_type.partition(".")
    return category if dot and category in registered else None
