"""SimGrid: an in-process simulated fleet behind Flower's Grid interface.

Every simulated client runs the same ClientApp-style handlers as a real agent,
and every message is serialized with Flower's serde both ways, exactly as on the
wire, so byte counts are real and a strategy that works here sends nothing a real
agent could not receive. Dropouts are drawn from a seeded generator.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message

from tinyfleet.client.handlers import HandlerRegistry, default_handlers
from tinyfleet.common.flower_adapter import (
    make_context,
    message_from_bytes,
    message_to_bytes,
    set_message_id,
    stamp,
)
from tinyfleet.common.grids import ERROR, REPLIED, Delivery, TrackingGrid


@dataclass
class SimClient:
    """One simulated device: its node id, node config (e.g. data spec) and behaviour."""

    node_id: int
    node_config: dict[str, str | int | float | bool]
    dropout: float = 0.0
    online: bool = True
    context: Context = field(init=False)

    def __post_init__(self) -> None:
        self.context = make_context(self.node_id, self.node_config)


@dataclass
class GridState:
    """What a SimGrid carries from one round to the next (for checkpoints)."""

    contexts: dict[int, Context]
    online: dict[int, bool]
    rng: tuple[Any, ...]  # random.Random state: the dropout draws


class SimGrid(TrackingGrid):
    def __init__(
        self,
        clients: Iterable[SimClient],
        handlers: HandlerRegistry | None = None,
        *,
        seed: int = 0,
        run_id: int = 0,
        keep_sent: bool = True,
    ) -> None:
        super().__init__(run_id)
        self.keep_sent = keep_sent  # long simulations turn this off: `sent` would grow without bound
        self.clients = {c.node_id: c for c in clients}
        self.handlers = handlers or default_handlers()
        self._rng = random.Random(seed)
        self._replies: dict[str, Message] = {}
        self.sent: list[bytes] = []  # every instruction as it crossed the "wire" (tests inspect it)

    @classmethod
    def from_data_specs(cls, specs: list[str], **kwargs: object) -> SimGrid:
        clients = [SimClient(node_id=i + 1000, node_config={"data": s}) for i, s in enumerate(specs)]
        return cls(clients, **kwargs)  # type: ignore[arg-type]

    def state(self) -> GridState:
        return GridState(
            contexts={nid: c.context for nid, c in self.clients.items()},
            online={nid: c.online for nid, c in self.clients.items()},
            rng=self._rng.getstate(),
        )

    def restore(self, state: GridState) -> None:
        """Continue from `state`; the fleet must be the same nodes it was taken from."""
        if set(state.contexts) != set(self.clients):
            raise ValueError(
                f"grid state holds nodes {sorted(state.contexts)}, this grid has {sorted(self.clients)}"
            )
        for nid, client in self.clients.items():
            client.context, client.online = state.contexts[nid], state.online[nid]
        self._rng.setstate(state.rng)

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid, c in self.clients.items() if c.online]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            mid = stamp(message, run_id=self._run.run_id)
            wire = message_to_bytes(message)
            if self.keep_sent:
                self.sent.append(wire)
            delivery = Delivery(
                message_id=mid,
                node_id=message.metadata.dst_node_id,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
                bytes_down=len(wire),
            )
            self._track(delivery)
            ids.append(mid)
            client = self.clients.get(delivery.node_id)
            if client is None or not client.online or self._rng.random() < client.dropout:
                continue  # never answers: the exchange will time out for it
            received = message_from_bytes(wire)
            set_message_id(received, mid)
            started = time.perf_counter()
            reply = self.handlers.handle(received, client.context)
            compute = time.perf_counter() - started
            reply_wire = message_to_bytes(reply)
            self._replies[mid] = message_from_bytes(reply_wire)
            self._update(
                mid,
                status=ERROR if reply.has_error() else REPLIED,
                error=reply.error.reason or "" if reply.has_error() else "",
                bytes_up=len(reply_wire),
                compute_s=compute,
                replied_at=time.time(),
            )
        return ids

    def wait_for_replies(self, message_ids: list[str], timeout: float | None) -> None:
        return None  # handlers ran synchronously in push_messages

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]
