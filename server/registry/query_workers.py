"""Read queries from HTTP clients, run where they can be stopped, a fixed number at a time.

Oxigraph cannot interrupt a query, and a query left running in a thread of the
coordinator keeps its CPU, its memory and the store busy long after the client
got its 503. So on an on-disk store each query runs in one of `workers` worker
processes that open the store read-only; at the deadline the worker is killed
(SIGKILL, so its CPU stops at once) and the next query spawns a fresh one. Only the answer's
bytes cross back over the pipe. Workers run at a lower CPU priority than the
coordinator, so gRPC, /healthz and /things stay responsive while they work.

A read-only open is a snapshot: it does not see what the primary writes after
it opened. A worker therefore reopens before a query when the store's
write-ahead log or manifest changed (their size and mtime; a write appends to
the log). Reopening costs 10-70 ms on a 200k-triple store (more as the log
grows between flushes); an unchanged store is not reopened, and a query then
costs a few ms. An open racing a compaction of the primary can miss a deleted
file; it is retried.

At most `workers` queries run and `queue` more wait; beyond that `run` raises
WorkersBusy with the seconds until a running query's deadline frees a worker
(the endpoint answers 503 with Retry-After). The deadline covers the wait.

The in-memory store (tests) and a remote store run the query in a thread of this
process instead, under the same admission: a remote store's HTTP timeout ends
its query; an in-memory query stops only at its next result row after the
deadline (Oxigraph evaluates in-process), which is acceptable for tests only.

`close()` kills the workers and fails waiting queries at once (the coordinator
calls it as it stops, before its HTTP server drains).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import math
import multiprocessing
import os
import resource
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import pyoxigraph as ox

from tinyfleet.server.registry.query_dataset import QueryDataset
from tinyfleet.server.registry.service_policy import ServiceNotAllowed, ServicePolicy
from tinyfleet.server.registry.sparql_results import (
    Answer,
    Formats,
    NotAcceptable,
    QueryTimedOut,
    RowLimitExceeded,
    answer,
)
from tinyfleet.server.registry.store import EmbeddedStore, RegistryStore, query_oxigraph
from tinyfleet.server.registry.worker_process import die_with_parent

log = logging.getLogger(__name__)

#: Workers yield the CPU to the coordinator (nice value added to theirs).
WORKER_NICENESS = 10
#: What one query may allocate (`--sparql-memory-mb`): a cartesian ORDER BY grew ~320 MB/s.
DEFAULT_WORKER_MEMORY_BYTES = 1 << 30
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_OPEN_ATTEMPTS = 3


class WorkersBusy(Exception):
    """Every worker is busy and the wait queue is full."""

    def __init__(self, retry_after_s: int, capacity: int) -> None:
        super().__init__(f"{capacity} queries are running or waiting")
        self.retry_after_s = retry_after_s
        self.capacity = capacity


class QueryTimeout(Exception):
    """The deadline passed (waiting for a worker or running); the query was stopped."""


class WorkersClosed(Exception):
    """The coordinator is stopping."""


class QueryFailed(Exception):
    """The engine failed on the query, or its worker died (e.g. out of memory); args[0] says which."""


#: What a worker may send back instead of an answer (all carry a message meant for the client).
CLIENT_ERRORS = (ServiceNotAllowed, SyntaxError, RowLimitExceeded, NotAcceptable, QueryFailed)


@dataclass(frozen=True)
class QueryRequest:
    text: str
    max_rows: int
    formats: Formats
    services: ServicePolicy
    #: The protocol request's dataset (default-graph-uri, named-graph-uri); empty: the query's own.
    dataset: QueryDataset = field(default_factory=QueryDataset)


class _Slot(Protocol):
    def call(self, request: QueryRequest, deadline: float, cancelled: threading.Event) -> Answer: ...

    def interrupt(self, cancelled: threading.Event) -> None: ...

    def close(self) -> None: ...

    def reap(self) -> None: ...


class QueryWorkers:
    """Admission (running + waiting), the deadline, and the slots queries run in."""

    def __init__(self, slots: list[_Slot], *, queue: int, services: ServicePolicy) -> None:
        if not slots:
            raise ValueError("at least one query worker is needed")
        if queue < 0:
            raise ValueError("the query wait queue cannot be negative")
        self.services = services
        self.capacity = len(slots) + queue
        self._slots = slots
        self._free = list(slots)
        self._waiters: collections.deque[asyncio.Future[_Slot]] = collections.deque()
        self._deadlines: dict[int, float] = {}
        self._admitted = 0
        self._closed = False
        # Own threads: a query holds one for its whole run, so it must not take a token of the
        # thread pool that serves /healthz, /things and the store writes.
        self._executor = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="sparql-query")

    @classmethod
    def for_store(
        cls,
        store: RegistryStore,
        *,
        workers: int = 2,
        queue: int = 16,
        services: ServicePolicy | None = None,
        memory_bytes: int | None = DEFAULT_WORKER_MEMORY_BYTES,
    ) -> QueryWorkers:
        """Worker processes for an on-disk embedded store, threads for an in-memory or remote one.
        A worker may allocate at most `memory_bytes` (None: no cap), and when no SERVICE
        endpoint is allowed it leaves the network (see `_leave_the_network`)."""
        services = services or ServicePolicy()
        path = store.path if isinstance(store, EmbeddedStore) else None
        confinement = _Confinement(memory_bytes=memory_bytes, offline=not services.allowed)
        slots: list[_Slot] = (
            [_ProcessSlot(path, confinement) for _ in range(workers)]
            if path is not None
            else [_ThreadSlot(store) for _ in range(workers)]
        )
        return cls(slots, queue=queue, services=services)

    async def run(self, request: QueryRequest, deadline: float) -> Answer:
        """The answer, or WorkersBusy / QueryTimeout / WorkersClosed / one of CLIENT_ERRORS."""
        if self._closed:
            raise WorkersClosed
        if self._admitted >= self.capacity:
            raise WorkersBusy(self._retry_after(), self.capacity)
        self._admitted += 1
        try:
            slot = await self._acquire(deadline)
            if time.monotonic() >= deadline:  # its turn came too late: not worth a worker's life
                self._release(slot)
                raise QueryTimeout
            self._deadlines[id(slot)] = deadline
            cancelled = threading.Event()
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, slot.call, request, deadline, cancelled
            )
            future.add_done_callback(lambda done: self._call_ended(slot, done))
            try:
                done, _ = await asyncio.wait({future}, timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.CancelledError:
                cancelled.set()
                slot.interrupt(cancelled)
                raise
            if not done:
                cancelled.set()
                slot.interrupt(cancelled)  # the slot returns to the pool when its call has ended
                raise QueryTimeout
            if future.cancelled():  # `close` dropped it before a thread took it
                raise WorkersClosed
            return future.result()
        finally:
            self._admitted -= 1

    def close(self) -> None:
        """Kill every worker and fail waiting queries (from the event loop's thread)."""
        if self._closed:
            return
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(WorkersClosed())
        for slot in self._slots:
            slot.close()
        # Killed workers are reaped off the loop: one that held GBs takes a while to go.
        threading.Thread(target=self._reap, name="sparql-reaper", daemon=True).start()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _reap(self) -> None:
        for slot in self._slots:
            slot.reap()

    async def _acquire(self, deadline: float) -> _Slot:
        if self._free:
            return self._free.pop()
        waiter: asyncio.Future[_Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        if not waiter.done():
            self._abandon(waiter)
            raise QueryTimeout
        return waiter.result()

    def _abandon(self, waiter: asyncio.Future[_Slot]) -> None:
        """A waiter gives up: out of the queue, and a slot handed to it meanwhile goes back."""
        if not waiter.done():
            waiter.cancel()
            self._waiters.remove(waiter)
        elif not waiter.cancelled() and waiter.exception() is None:
            self._release(waiter.result())

    def _call_ended(self, slot: _Slot, call: asyncio.Future[Answer]) -> None:
        if not call.cancelled():
            call.exception()  # retrieved, so an abandoned call's error is not logged as lost
        self._deadlines.pop(id(slot), None)
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    def _retry_after(self) -> int:
        """Whole seconds until the first running query's deadline frees a worker (at least 1)."""
        if not self._deadlines:
            return 1
        return max(1, math.ceil(min(self._deadlines.values()) - time.monotonic()))


class _ProcessSlot:
    """One worker process, spawned by the call that needs it: a coordinator never queried starts
    none, and a killed worker is replaced by the next query, not at once.

    The event loop only signals (`interrupt`, `close`: SIGKILL is one system call). The lock
    guards the slot's fields and is never held while spawning, joining or waiting, so the loop
    never waits behind one: spawning, and reaping a killed worker (which takes a while when it
    held GBs), happen in the executor thread running the call, or in the reaper `close` starts."""

    def __init__(self, path: Path, confinement: _Confinement) -> None:
        self._path = path
        self._confinement = confinement
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._serving: threading.Event | None = None  # the call using the worker, if any
        self._closed = False

    def call(self, request: QueryRequest, deadline: float, cancelled: threading.Event) -> Answer:
        """Send, wait until the deadline, kill and reap the worker if it is still working.
        Runs in the executor's threads, which live as long as the QueryWorkers: a worker's
        parent-death signal follows the thread that spawned it."""
        conn = self._serve(cancelled)
        try:
            return self._exchange(conn, request, deadline, cancelled)
        finally:
            with self._lock:
                self._serving = None
                closed = self._closed
            if closed:
                self._discard()

    def _serve(self, cancelled: threading.Event) -> Connection:
        """The live worker's pipe (spawned here, outside the lock, when there is none), with
        `cancelled` marking the call it serves."""
        with self._lock:
            if self._closed:
                raise WorkersClosed
            if self._process is not None and self._conn is not None and self._process.is_alive():
                self._serving = cancelled
                return self._conn
        self._discard()  # a worker that died while idle (e.g. the OOM killer's), or none
        process, conn = _spawn_worker(self._path, self._confinement)
        with self._lock:
            self._process, self._conn = process, conn
            closed = self._closed
            if not closed:
                self._serving = cancelled
        if closed:  # `close` ran while it was spawning and found nothing to kill
            self._discard()
            raise WorkersClosed
        return conn

    def _exchange(
        self, conn: Connection, request: QueryRequest, deadline: float, cancelled: threading.Event
    ) -> Answer:
        try:
            conn.send(request)
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self._discard()
                raise QueryTimeout
            reply: Answer | BaseException = conn.recv()
        except (EOFError, OSError):  # killed by `interrupt` or `close`, or it died
            self._discard()
            if self._closed:
                raise WorkersClosed from None
            if cancelled.is_set():
                raise QueryTimeout from None
            raise QueryFailed(self._confinement.why_it_died()) from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def interrupt(self, cancelled: threading.Event) -> None:
        """Kill the worker if it still serves that call (not a replacement serving the next);
        the call sees its pipe close and reaps it."""
        with self._lock:
            if self._serving is cancelled and self._process is not None:
                self._process.kill()

    def close(self) -> None:
        """Kill the worker (a signal only); a call using it reaps it, else `reap` does."""
        with self._lock:
            self._closed = True
            if self._process is not None:
                self._process.kill()

    def reap(self) -> None:
        """After `close`, from a thread that may wait: reap an idle worker."""
        with self._lock:
            idle = self._serving is None
        if idle:
            self._discard()

    def _discard(self) -> None:
        """Kill the worker and wait for it to end: whoever takes it out of the slot reaps it."""
        with self._lock:
            process, conn = self._process, self._conn
            self._process, self._conn = None, None
            if process is not None:
                process.kill()
        if process is not None:
            process.join()
            process.close()
        if conn is not None:
            conn.close()


@dataclass(frozen=True)
class _Confinement:
    """What a worker may use beyond the store: memory, and the network."""

    memory_bytes: int | None
    offline: bool

    def why_it_died(self) -> str:
        """A worker that died mid-query was almost always stopped by its memory cap (Oxigraph
        aborts when an allocation fails) or by the kernel's OOM killer."""
        if self.memory_bytes is None:
            return "the query's worker process stopped unexpectedly (out of memory?)"
        return (f"the query needed more memory than a query may use ({self.memory_bytes >> 20} MB, "
                "--sparql-memory-mb); narrow it, or add LIMIT")


def _spawn_worker(
    path: Path, confinement: _Confinement
) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(
        target=_worker_main,
        args=(theirs, str(path), os.getpid(), confinement),
        name="tinyfleet-sparql-worker",
        daemon=True,
    )
    process.start()
    theirs.close()
    return process, ours


class _ThreadSlot:
    """A query run in a thread of this process: in-memory and remote stores."""

    def __init__(self, store: RegistryStore) -> None:
        self._store = store

    def call(self, request: QueryRequest, deadline: float, cancelled: threading.Event) -> Answer:
        request.services.check_query(request.text)
        try:
            # No reference to the result outlives `answer`: pyoxigraph results must be dropped
            # in the thread that made them.
            return answer(
                self._store.query(
                    request.text,
                    timeout_s=max(0.001, deadline - time.monotonic()),
                    dataset=request.dataset,
                ),
                max_rows=request.max_rows,
                formats=request.formats,
                cancelled=cancelled,
            )
        except (TimeoutError, QueryTimedOut):
            raise QueryTimeout from None
        except (OSError, RuntimeError) as exc:  # the engine's or the remote server's failure
            raise QueryFailed(f"the query could not be evaluated: {exc}") from exc

    def interrupt(self, cancelled: threading.Event) -> None:
        """Nothing to kill: the call stops at its next row (`cancelled`) or its HTTP timeout."""

    def close(self) -> None:
        pass

    def reap(self) -> None:
        pass


# ---- inside a worker process --------------------------------------------------------------------


def _leave_the_network() -> bool:
    """Move this worker into a network namespace of its own, which has no interfaces: a SERVICE
    clause that got past the text check (service_policy) then has nowhere to connect. Root
    can make one directly; others through a user namespace of their own, where the kernel allows
    unprivileged ones. Where neither works the text check stands alone, and the log says so."""
    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (_CLONE_NEWNET, _CLONE_NEWUSER | _CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            return True
    log.warning("SPARQL query worker %d could not leave the network (unshare: %s); SERVICE is "
                "kept out by the query check alone", os.getpid(), os.strerror(ctypes.get_errno()))
    return False


def _worker_main(conn: Connection, path: str, parent_pid: int, confinement: _Confinement) -> None:
    """A worker's life: answer one request at a time until the pipe closes or it is killed."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the coordinator, which kills us
    os.nice(WORKER_NICENESS)
    if confinement.offline:
        _leave_the_network()
    if confinement.memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_DATA, (confinement.memory_bytes, confinement.memory_bytes))
    snapshot = _Snapshot(Path(path))
    while True:
        try:
            request: QueryRequest = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: Answer | BaseException = snapshot.answer(request)
        except CLIENT_ERRORS as exc:
            reply = exc
        except (OSError, RuntimeError) as exc:
            reply = QueryFailed(f"the query could not be evaluated: {exc}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


class _Snapshot:
    """The store opened read-only, reopened when the primary has written since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._store: ox.Store | None = None
        self._version: tuple[tuple[str, int, int], ...] = ()

    def answer(self, request: QueryRequest) -> Answer:
        request.services.check_query(request.text)
        try:
            return self._answer(request)
        except (OSError, RuntimeError) as exc:
            if "IO error" not in str(exc):
                raise
        self._store = None  # a file of the snapshot vanished under a compaction of the primary
        return self._answer(request)

    def _answer(self, request: QueryRequest) -> Answer:
        return answer(
            query_oxigraph(self._current(), request.text, request.dataset, limit=request.max_rows),
            max_rows=request.max_rows,
            formats=request.formats,
        )

    def _current(self) -> ox.Store:
        version = self._files_version()
        if self._store is None or version != self._version:
            self._store = _open_read_only(self.path)
            self._version = version
        return self._store

    def _files_version(self) -> tuple[tuple[str, int, int], ...]:
        """Size and mtime of the write-ahead logs, manifest and CURRENT: any write changes one.
        Read before opening, so a write racing the open at worst causes one more reopen."""
        entries = []
        with os.scandir(self.path) as listing:
            for entry in listing:
                name = entry.name
                if name.endswith(".sst") or name.startswith("LOG") or name == "LOCK":
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # removed while listing: a change either way
                    continue
                entries.append((name, stat.st_size, stat.st_mtime_ns))
        return tuple(sorted(entries))


def _open_read_only(path: Path) -> ox.Store:
    attempts_left = _OPEN_ATTEMPTS
    while True:
        try:
            return ox.Store.read_only(str(path))
        except (OSError, RuntimeError):
            attempts_left -= 1
            if attempts_left == 0:
                raise
            time.sleep(0.05)
