"""SimGrid: a simulated fleet behind Flower's Grid interface.

Every simulated client runs the same ClientApp-style handlers as a real agent,
and every message is serialized with Flower's serde both ways, exactly as on the
wire, so byte counts are real and a strategy that works here sends nothing a real
agent could not receive. Dropouts are drawn from a seeded generator. The devices
run in this process, or with `workers=N` in N processes (`sim_workers`), so the
devices of a parallel round train on several cores; the numbers are those of an
in-process run on one torch thread.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message

from tinyfleet.client.data_sources import DataSource, restore_shared_sources, shared_sources
from tinyfleet.client.handlers import HandlerRegistry, default_handlers
from tinyfleet.common.flower_adapter import (
    make_context,
    message_from_bytes,
    message_to_bytes,
    set_message_id,
    stamp,
)
from tinyfleet.common.grids import ERROR, REPLIED, Delivery, TrackingGrid
from tinyfleet.simulations.sim_workers import Job, WorkerPool


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
    sources: dict[str, DataSource]  # the devices' data streams by spec, where they stand


class SimGrid(TrackingGrid):
    def __init__(
        self,
        clients: Iterable[SimClient],
        handlers: HandlerRegistry | None = None,
        *,
        seed: int = 0,
        run_id: int = 0,
        keep_sent: bool = True,
        workers: int = 0,
        handler_factory: Callable[[], HandlerRegistry] | None = None,
    ) -> None:
        """`workers` > 0 runs the devices in that many processes, each building its handlers
        with `handler_factory` (a module-level function: it is sent to the workers by name)."""
        super().__init__(run_id)
        self.keep_sent = keep_sent  # long simulations turn this off: `sent` would grow without bound
        self.clients = {c.node_id: c for c in clients}
        if workers > 0 and handlers is not None:
            raise ValueError("with workers, give handler_factory (each worker builds its own handlers)")
        factory = handler_factory or default_handlers
        self.handlers = handlers or factory()
        self._pool = WorkerPool(list(self.clients.values()), factory, workers) if workers > 0 else None
        self._rng = random.Random(seed)
        self._replies: dict[str, Message] = {}
        self.sent: list[bytes] = []  # every instruction as it crossed the "wire" (tests inspect it)

    @classmethod
    def from_data_specs(cls, specs: list[str], **kwargs: object) -> SimGrid:
        clients = [SimClient(node_id=i + 1000, node_config={"data": s}) for i, s in enumerate(specs)]
        return cls(clients, **kwargs)  # type: ignore[arg-type]

    def state(self) -> GridState:
        if self._pool is not None:
            contexts, sources = self._pool.state()
        else:
            contexts = {nid: c.context for nid, c in self.clients.items()}
            sources = shared_sources({str(c.node_config.get("data")) for c in self.clients.values()})
        return GridState(
            contexts=contexts,
            online={nid: c.online for nid, c in self.clients.items()},
            rng=self._rng.getstate(),
            sources=sources,
        )

    def restore(self, state: GridState) -> None:
        """Continue from `state`; the fleet must be the same nodes it was taken from."""
        if set(state.contexts) != set(self.clients):
            raise ValueError(
                f"grid state holds nodes {sorted(state.contexts)}, this grid has {sorted(self.clients)}"
            )
        for nid, client in self.clients.items():
            client.online = state.online[nid]
        if self._pool is not None:
            self._pool.restore(state.contexts, state.sources)
        else:
            for nid, client in self.clients.items():
                client.context = state.contexts[nid]
            restore_shared_sources(state.sources)
        self._rng.setstate(state.rng)

    @property
    def worker_cpu_seconds(self) -> float:
        """CPU time the worker processes spent on messages (0 in-process: it is this process's)."""
        return self._pool.cpu_seconds if self._pool is not None else 0.0

    def close(self) -> None:
        """Stop the worker processes (a no-op for an in-process grid)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> SimGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_node_ids(self) -> Iterable[int]:
        return [nid for nid, c in self.clients.items() if c.online]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        jobs: list[Job] = []
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
            if self._pool is not None:
                jobs.append((mid, client.node_id, wire))
                continue
            received = message_from_bytes(wire)
            set_message_id(received, mid)
            started = time.perf_counter()
            reply_wire = message_to_bytes(self.handlers.handle(received, client.context))
            self._record(mid, reply_wire, time.perf_counter() - started)
        if self._pool is not None and jobs:
            for mid, reply_wire, compute in self._pool.handle(jobs):
                self._record(mid, reply_wire, compute)
        return ids

    def _record(self, mid: str, reply_wire: bytes, compute: float) -> None:
        reply = self._replies[mid] = message_from_bytes(reply_wire)
        self._update(
            mid,
            status=ERROR if reply.has_error() else REPLIED,
            error=reply.error.reason or "" if reply.has_error() else "",
            bytes_up=len(reply_wire),
            compute_s=compute,
            replied_at=time.time(),
        )

    def wait_for_replies(self, message_ids: list[str], timeout: float | None) -> None:
        return None  # handlers ran synchronously in push_messages

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]
