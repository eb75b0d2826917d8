"""What the SPARQL sandbox tests observe a coordinator process with: a local listener that records
every connection made to it, a flood of concurrent queries sent from another process, and a
process's resident memory (the CPU time of its process tree comes from
tinyfleet.simulations.benchmarks.process_cpu)."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
from pathlib import Path

import httpx


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


def rss_mb(pid: int) -> float:
    """Resident memory of a live process in MB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
