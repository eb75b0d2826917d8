"""SimGrid's worker processes: the simulated devices spread over processes, so that the devices
of one round train at the same time on different cores.

Each device lives in one worker for the whole run: its Context and its data stream
stay there, as they would on a real device, and only serialized messages cross
the pipe (the same bytes SimGrid counts). A round's messages are sent to all
workers first and collected after, so a parallel round takes as long as its
busiest worker. Workers are spawned (not forked): torch's thread pools do not
survive a fork. Each worker uses one torch thread, so a run gives the numbers of an
in-process run with one thread (more threads sum convolution gradients in another order).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from tinyfleet.client.data_sources import DataSource

if TYPE_CHECKING:
    from tinyfleet.client.handlers import HandlerRegistry
    from tinyfleet.simulations.sim_grid import SimClient

Job = tuple[str, int, bytes]  # message id, node id, instruction on the wire
Done = tuple[str, bytes, float]  # message id, reply on the wire, handler seconds
STOP_TIMEOUT_S = 10.0


class WorkerError(RuntimeError):
    """A worker process died or failed outside a handler (handler failures are error replies)."""


def _serve(
    conn: Connection, clients: list[SimClient], handler_factory: Callable[[], HandlerRegistry], threads: int
) -> None:
    import torch

    from tinyfleet.client.data_sources import restore_shared_sources, shared_sources
    from tinyfleet.common.allocator import keep_freed_memory
    from tinyfleet.common.flower_adapter import (
        ensure_task_identity,
        message_from_bytes,
        message_to_bytes,
        set_message_id,
    )

    torch.set_num_threads(threads)
    keep_freed_memory()
    ensure_task_identity()
    handlers = handler_factory()
    nodes = {c.node_id: c for c in clients}
    specs = {str(c.node_config.get("data")) for c in clients}
    while True:
        command, payload = conn.recv()
        try:
            if command == "handle":
                done: list[Done] = []
                cpu = time.process_time()
                for mid, node_id, wire in payload:
                    received = message_from_bytes(wire)
                    set_message_id(received, mid)
                    started = time.perf_counter()
                    reply = handlers.handle(received, nodes[node_id].context)
                    done.append((mid, message_to_bytes(reply), time.perf_counter() - started))
                conn.send(("ok", (done, time.process_time() - cpu)))
            elif command == "state":
                contexts = {nid: c.context for nid, c in nodes.items()}
                conn.send(("ok", (contexts, shared_sources(specs))))
            elif command == "restore":
                contexts, sources = payload
                for nid, client in nodes.items():
                    client.context = contexts[nid]
                restore_shared_sources(sources)
                conn.send(("ok", None))
            elif command == "stop":
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {command!r}"))
        except Exception:  # report it to the grid, which raises it with the worker named
            conn.send(("error", traceback.format_exc(limit=5)))


class WorkerPool:
    """`processes` spawned workers, each owning a fixed share of the devices (dealt round-robin)."""

    def __init__(
        self,
        clients: list[SimClient],
        handler_factory: Callable[[], HandlerRegistry],
        processes: int,
        threads: int = 1,
    ) -> None:
        if processes < 1:
            raise ValueError(f"workers must be at least 1, got {processes}")
        context = multiprocessing.get_context("spawn")
        self._owner: dict[int, int] = {}
        self.cpu_seconds = 0.0  # CPU the workers spent on messages (budgets count it as training)
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        for index in range(min(processes, len(clients))):
            group = clients[index::processes]
            parent, child = context.Pipe()
            process = context.Process(
                target=_serve,
                args=(child, group, handler_factory, threads),
                name=f"tinyfleet-sim-worker-{index}",
                daemon=True,
            )
            process.start()
            child.close()
            self._workers.append((process, parent))
            self._owner.update({c.node_id: index for c in group})

    def handle(self, jobs: list[Job]) -> list[Done]:
        batches: dict[int, list[Job]] = defaultdict(list)
        for job in jobs:
            batches[self._owner[job[1]]].append(job)
        for index, batch in batches.items():
            self._send(index, ("handle", batch))
        finished: list[Done] = []
        for index in batches:
            done, cpu = self._receive(index)
            finished.extend(done)
            self.cpu_seconds += cpu
        return finished

    def state(self) -> tuple[dict[int, Any], dict[str, DataSource]]:
        contexts: dict[int, Any] = {}
        sources: dict[str, DataSource] = {}
        for index in range(len(self._workers)):
            self._send(index, ("state", None))
        for index in range(len(self._workers)):
            held, streams = self._receive(index)
            contexts.update(held)
            sources.update(streams)
        return contexts, sources

    def restore(self, contexts: dict[int, Any], sources: dict[str, DataSource]) -> None:
        for index in range(len(self._workers)):
            mine = {nid: ctx for nid, ctx in contexts.items() if self._owner[nid] == index}
            self._send(index, ("restore", (mine, sources)))
        for index in range(len(self._workers)):
            self._receive(index)

    def close(self) -> None:
        for index, (process, conn) in enumerate(self._workers):
            if process.is_alive():
                try:
                    self._send(index, ("stop", None))
                    self._receive(index)
                except WorkerError:
                    pass  # already gone: nothing to stop
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._workers = []

    def _send(self, index: int, item: tuple[str, Any]) -> None:
        try:
            self._workers[index][1].send(item)
        except (BrokenPipeError, ConnectionError, OSError) as exc:
            raise self._died(index) from exc

    def _receive(self, index: int) -> Any:
        try:
            status, payload = self._workers[index][1].recv()
        except (EOFError, ConnectionError, OSError) as exc:
            raise self._died(index) from exc
        if status != "ok":
            raise WorkerError(f"simulation worker {index} failed: {payload}")
        return payload

    def _died(self, index: int) -> WorkerError:
        process = self._workers[index][0]
        process.join(1.0)
        nodes = sorted(nid for nid, owner in self._owner.items() if owner == index)
        return WorkerError(
            f"simulation worker {index} (pid {process.pid}) died with exit code {process.exitcode}; "
            f"it ran nodes {nodes}"
        )
