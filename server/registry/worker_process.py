"""Work the coordinator cannot interrupt in-process, run in a worker process it can kill.

Neither Oxigraph (queries) nor pyshacl (validation) can be stopped once started, and a
thread running them keeps its CPU and the GIL. A worker process can be killed (SIGKILL:
its CPU stops at once) and replaced. `die_with_parent` arms the Linux parent-death signal so
a worker never outlives the coordinator, even one killed with SIGKILL; `KillableWorker` is one
such worker serving requests one at a time over a pipe, with a deadline per request.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Final

_PR_SET_PDEATHSIG: Final = 1
#: Seconds a new worker may take to start and load what it needs before its first request.
START_TIMEOUT_S: Final = 60.0


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when the thread that spawned it (the coordinator's) ends."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl: an idle worker still ends on EOF
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the signal was armed
        os._exit(0)


class WorkerTimeout(Exception):
    """The request ran past its deadline; the worker was killed (the next call spawns another)."""


class WorkerStopped(Exception):
    """The worker died while serving the request (e.g. out of memory), or could not start."""


class WorkerClosed(Exception):
    """`close` was called (the coordinator is stopping)."""


class KillableWorker:
    """One worker process running `handle(request)` for one request at a time.

    Spawned by the first call (so a coordinator that never needs it starts none) and ready
    once `setup()` has run in it, which the deadline does not count. A request past its
    deadline, or one whose worker dies, kills the worker; the next call spawns a new one.
    The parent-death signal follows the thread that spawns the worker: call from one thread
    that lives as long as this object. `close` may come from any thread and ends a call in
    flight at once (WorkerClosed)."""

    def __init__(
        self,
        handle: Callable[[Any], Any],
        *,
        setup: Callable[[], None] | None = None,
        name: str,
        niceness: int = 10,
    ) -> None:
        self._handle = handle
        self._setup = setup
        self._name = name
        self._niceness = niceness
        self._lock = threading.Lock()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._closed = False

    def call(self, request: Any, timeout_s: float) -> Any:
        """The worker's reply to `request`, or WorkerTimeout / WorkerStopped / WorkerClosed."""
        conn = self._ready()
        try:
            conn.send(request)
            if not conn.poll(timeout_s):
                self._kill()
                raise WorkerTimeout
            return conn.recv()
        except (EOFError, OSError):  # killed by `close`, or it died
            self._kill()
            if self._closed:
                raise WorkerClosed from None
            raise WorkerStopped from None

    def close(self) -> None:
        """Kill the worker (a call in flight sees its pipe close); later calls raise WorkerClosed."""
        with self._lock:
            self._closed = True
            process = self._process
        if process is not None:
            with contextlib.suppress(ValueError):  # already closed by the calling thread
                process.kill()

    def _ready(self) -> Connection:
        with self._lock:
            if self._closed:
                raise WorkerClosed
            if self._process is not None and self._process.is_alive() and self._conn is not None:
                return self._conn
        self._kill()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_serve,
            args=(theirs, os.getpid(), self._handle, self._setup, self._niceness),
            name=self._name,
            daemon=True,
        )
        with self._lock:
            if self._closed:
                raise WorkerClosed
            process.start()
            self._process, self._conn = process, ours
        theirs.close()
        try:
            if not ours.poll(START_TIMEOUT_S):
                raise WorkerStopped(f"the worker did not start within {START_TIMEOUT_S:g} s")
            ours.recv()  # "ready"
        except (EOFError, OSError):
            self._kill()
            if self._closed:
                raise WorkerClosed from None
            raise WorkerStopped("the worker stopped while starting") from None
        except WorkerStopped:
            self._kill()
            raise
        return ours

    def _kill(self) -> None:
        with self._lock:
            process, conn = self._process, self._conn
            self._process, self._conn = None, None
        if process is not None:
            process.kill()
            process.join()
            process.close()
        if conn is not None:
            conn.close()


def _serve(
    conn: Connection,
    parent_pid: int,
    handle: Callable[[Any], Any],
    setup: Callable[[], None] | None,
    niceness: int,
) -> None:
    """A worker's life: set up, say ready, answer one request at a time until the pipe closes."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the coordinator, which kills us
    with contextlib.suppress(OSError):
        os.nice(niceness)  # the coordinator's own work goes first
    if setup is not None:
        setup()
    try:
        conn.send("ready")
        while True:
            conn.send(handle(conn.recv()))
    except (EOFError, OSError):
        return
