"""What the SPARQL sandbox tests observe a coordinator process with: a local listener that records
every connection made to it, the CPU time of a process tree read from /proc, and a flood of
concurrent queries sent from another process.

`deadline_to_cpu_stop` is also the registry benchmark's figure: seconds from a
runaway query's deadline to the moment the coordinator's CPU stops growing.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RUNAWAY = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }"


class Listener:
    """A plain TCP server on 127.0.0.1 recording each connection's request; with `reply`, it
    answers every request with that SPARQL JSON body (an allow-listed SERVICE endpoint)."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self.requests.append(_read_request(conn))
                if self.reply is not None:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/sparql-results+json\r\n"
                        + f"content-length: {len(self.reply)}\r\nconnection: close\r\n\r\n".encode()
                        + self.reply
                    )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lengths = [
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ]
        length = lengths[0] if lengths else 0
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    except TimeoutError:
        return data


def _stats() -> dict[int, list[str]]:
    """pid -> /proc/PID/stat fields from field 3 (state) on, for every process."""
    table: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            table[int(entry)] = raw[raw.rindex(")") + 2 :].split()
    return table


def descendants(pid: int, table: dict[int, list[str]] | None = None) -> list[int]:
    table = table if table is not None else _stats()
    children = [p for p, fields in table.items() if int(fields[1]) == pid]
    return children + [d for child in children for d in descendants(child, table)]


def cpu_seconds(pid: int, among: set[int] | None = None) -> float:
    """CPU time of `pid`, its live descendants (only those in `among` if given) and its reaped
    children (user + system): a killed worker's time moves into its parent's children's time,
    so the sum never drops."""
    table = _stats()
    fields = table[pid]
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for child in descendants(pid, table):
        if among is None or child in among:
            ticks += int(table[child][11]) + int(table[child][12])
    return ticks / _CLOCK_TICKS


def worker_pids(pid: int) -> list[int]:
    """The coordinator's SPARQL worker processes (spawned by multiprocessing)."""
    found = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


def deadline_to_cpu_stop(
    pid: int,
    send_runaway: Callable[[], object],
    timeout_s: float,
    *,
    busy: float = 0.5,
    period_s: float = 0.05,
) -> float:
    """Seconds from a runaway query's deadline until the coordinator `pid` and the processes it
    had when the query was sent last used more than `busy` of a core over one sampling period
    (a worker spawned to replace a killed one is new work, not the query's, and not counted).

    `send_runaway` sends the query and returns when it is answered (the coordinator's
    timeout must be `timeout_s`); sampling continues for 3 s after the deadline.
    """
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    before = set(descendants(pid))
    started = time.monotonic()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.monotonic(), cpu_seconds(pid, before)))
            time.sleep(period_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    send_runaway()
    deadline = started + timeout_s
    time.sleep(max(0.0, deadline + 3.0 - time.monotonic()))
    done.set()
    sampler.join()
    last_busy = started
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if (c1 - c0) / (t1 - t0) > busy:
            last_busy = t1
    return last_busy - deadline


def flood(url: str, query: str, clients: int) -> list[tuple[int, str, str | None]]:
    """Send `query` from `clients` threads at once; (status, problem title, Retry-After) each.
    Meant to run in a process of its own, so the load does not slow the test's own probes."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    with httpx.Client(timeout=120, limits=limits) as client:

        def one(_: int) -> tuple[int, str, str | None]:
            response = client.get(url, params={"query": query})
            title = response.json().get("title", "") if response.status_code >= 400 else ""
            return response.status_code, title, response.headers.get("retry-after")

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            return list(pool.map(one, range(clients)))
