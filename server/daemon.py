"""The coordinator daemon: gRPC (Fleet + Admin), HTTP, the job runner, and their lifecycle.

One asyncio loop (main thread) serves gRPC (grpc.aio) and HTTP (uvicorn); the
job runner has its own thread. Start-up: migrate the database, mark every device
offline, bind ports (0 = ephemeral), then write DATA_DIR/server.json atomically
with the actual addresses so launchers wait for the file instead of sleeping.
Stop (SIGINT/SIGTERM): the round in progress is abandoned (its job stays
"running" and resumes on restart from its last checkpointed round), agents get a
Shutdown frame, servers close, server.json is removed, exit code 0.

One coordinator per data dir and per port. The data dir is held by an advisory
lock (`flock` on DATA_DIR/coordinator.lock, which holds the holder's pid; the
kernel drops it when the process dies, kill -9 included), and the gRPC port is
bound without SO_REUSEPORT (gRPC sets it by default on Linux, which let a second
coordinator share the port and split registrations between two databases). A
second coordinator exits non-zero naming the pid in its way. server.json
survives kill -9, so it names its pid and `read_ready_file` treats the file of a
dead process as absent; launchers read it through that one function.

Plaintext on a non-loopback address (gRPC or HTTP without TLS) needs
`insecure=True` (`--insecure`, as Flower's SuperLink has it): credentials and
models would otherwise cross the network readable by anyone on the path.

gRPC message size: the application limit is `max_message_bytes` (agents learn it
in Welcome); gRPC itself accepts up to that plus GRPC_HEADROOM_BYTES so an
oversized reply reaches the application check and is recorded as an error
naming its size and the limit while the stream stays up. A frame beyond the
headroom is refused by gRPC (RESOURCE_EXHAUSTED) and the agent reconnects.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
import sqlalchemy as sa
import uvicorn
from starlette.routing import BaseRoute

from tinyfleet.common.atomic_files import write_json_atomically
from tinyfleet.common.flower_adapter import ensure_task_identity
from tinyfleet.common.process_liveness import pid_alive
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2_grpc
from tinyfleet.server.admin_service import AdminService
from tinyfleet.server.artifacts import ArtifactStore
from tinyfleet.server.auth import FailedAuthLimiter
from tinyfleet.server.connections import ConnectionHub
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.descriptions import (
    DEFAULT_LIMITS,
    DescribeDevice,
    DescribeDevices,
    DescriptionLimits,
    describe_device,
    describe_each,
)
from tinyfleet.server.fleet_grid import FleetGrid
from tinyfleet.server.fleet_service import FleetService
from tinyfleet.server.http.api import build_app
from tinyfleet.server.job_events import JobEvents
from tinyfleet.server.job_runner import Eligibility, JobRunner
from tinyfleet.server.repository import Repository

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_HEADROOM_BYTES = 4 * 1024 * 1024
READY_FILE = "server.json"
LOCK_FILE = "coordinator.lock"


@dataclass
class ServerSettings:
    data_dir: Path
    listen: str = "127.0.0.1:7000"
    http: str | None = None
    db_url: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    admin_token: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    heartbeat_interval_s: float = 5.0
    #: Accept plaintext (no TLS) on a non-loopback address; a warning is logged.
    insecure: bool = False
    #: Lab only: new devices join without an enrollment token (the CLI prints a warning).
    open_enrollment: bool = False


@dataclass
class Hooks:
    """Where other parts of tinyfleet (the registry) plug into the coordinator."""

    describe_device: DescribeDevice = describe_device
    #: Validates concurrent registrations together (None: `describe_device` on each).
    describe_devices: DescribeDevices | None = None
    #: The bounds `describe_*` apply (the registry's): Register refuses an oversized description
    #: before any other work and sends large ones to their own lane by the same numbers.
    limits: DescriptionLimits = DEFAULT_LIMITS
    http_routes: Sequence[BaseRoute] = field(default_factory=list)
    eligibility: Eligibility | None = None
    #: Runs once SQL is open and before the coordinator says it is ready (in a worker thread):
    #: the registry catches up with what SQL committed before a crash.
    recover: Callable[[Repository], None] | None = None
    #: Runs for the daemon's lifetime once SQL is open (the registry's projector); cancelled at stop.
    background: Callable[[Repository], Coroutine[Any, Any, None]] | None = None
    #: Called first at stop, before the servers drain: ends work that would hold a request open
    #: (the registry kills its SPARQL query workers, so running queries answer at once).
    stopping: Callable[[], None] | None = None
    #: Extra /healthz fields, read on every request so it must not block (the registry's outbox lag).
    health: Callable[[], dict[str, Any]] | None = None
    #: Failed authentications per peer, one count for gRPC and HTTP alike (the registry's writes
    #: share it), so a peer cannot spread its guesses over several doors.
    auth_failures: FailedAuthLimiter = field(default_factory=FailedAuthLimiter)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, a name resolving there)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_transport(settings: ServerSettings) -> None:
    """Refuse plaintext on a non-loopback address unless `insecure`; warn when it is accepted."""
    if settings.tls_cert:
        return
    exposed = [a for a in (settings.listen, settings.http) if a and not is_loopback(split_address(a)[0])]
    if not exposed:
        return
    if not settings.insecure:
        raise ValueError(
            f"refusing to listen on {', '.join(exposed)} without TLS: device keys, tokens and models "
            "would cross the network in plaintext; pass --tls-cert and --tls-key, or --insecure "
            "to accept that (e.g. inside a private network)"
        )
    log.warning("listening on %s WITHOUT TLS (--insecure): anyone on the network path can read and "
                "alter the traffic", ", ".join(exposed))


class DataDirInUseError(OSError):
    """Another coordinator holds the data dir; the message names its pid."""


class DataDirLock:
    """This process's hold on a data dir: `flock` on DATA_DIR/coordinator.lock, holding our pid.

    flock locks belong to an open file, so a second open in the same process would
    conflict with the first: holds are counted per process instead (the CLI takes the
    lock before it opens the registry store, the Coordinator again at start)."""

    _held: ClassVar[dict[Path, DataDirLock]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._holds = 1

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Hold `data_dir` (created if missing); DataDirInUseError names the pid holding it."""
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        path = (Path(data_dir) / LOCK_FILE).resolve()
        with cls._guard:
            held = cls._held.get(path)
            if held is not None:
                held._holds += 1
                return held
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DataDirInUseError(
                    f"data dir {Path(data_dir).resolve()} is in use by another coordinator (pid "
                    f"{holder}, lock {path}); stop it, or give this one its own --data-dir",
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            lock = cls._held[path] = cls(path, fd)
            return lock

    def release(self) -> None:
        """Drop one hold; the last one unlocks (the file stays: unlinking it would race a new holder)."""
        with self._guard:
            self._holds -= 1
            if self._holds == 0:
                del self._held[self.path]
                os.close(self._fd)


def read_ready_file(data_dir: Path) -> dict[str, Any] | None:
    """DATA_DIR/server.json of a running coordinator, or None: missing, unreadable, or left behind
    by a process that is gone (kill -9 leaves it). Every launcher reads the file through this."""
    try:
        info = json.loads((Path(data_dir) / READY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int) or not pid_alive(info["pid"]):
        return None
    return info


def port_holders(port: int) -> list[int]:
    """Pids with a TCP socket listening on `port` (Linux procfs; [] where it cannot tell)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    holders: list[int] = []
    if not inodes:
        return holders
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                holders.append(int(proc.name))
        except OSError:
            continue  # gone, or not ours to look at
    return sorted(holders)


def port_in_use(address: str, port: int) -> OSError:
    """The error for a port another process listens on, naming it when procfs tells."""
    holders = port_holders(port)
    by = f" by pid {', '.join(map(str, holders))}" if holders else " by another process"
    return OSError(f"cannot listen on {address}: the port is in use{by}")


def _bind_http(address: str) -> socket.socket:
    """The HTTP listening socket (SO_REUSEADDR only: restarts reuse the port, others cannot share it)."""
    host, port = split_address(address)
    # IPPROTO_TCP named, so asyncio sets TCP_NODELAY on accepted connections (with proto 0 it
    # does not, and every keep-alive response waited ~40 ms for the client's delayed ACK).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise port_in_use(address, port) from None
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn on our loop: the daemon, not uvicorn, owns SIGINT/SIGTERM."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Coordinator:
    def __init__(self, settings: ServerSettings, hooks: Hooks | None = None) -> None:
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.data_dir = Path(settings.data_dir)
        self.ready_file = self.data_dir / READY_FILE
        self._stop = asyncio.Event()
        self._grpc: grpc.aio.Server | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self.runner: JobRunner | None = None
        self.fleet: FleetService | None = None
        self.hub = ConnectionHub()
        self.listen_address = ""
        self.http_address = ""
        self._lock: DataDirLock | None = None
        self._http_socket: socket.socket | None = None
        self.engine: sa.Engine | None = None

    async def start(self) -> None:
        """Start everything; if any step fails, what was started is stopped and the data dir and
        ports are free again before the error propagates."""
        try:
            await self._start()
        except BaseException:
            await self._abort_start()
            raise

    async def _start(self) -> None:
        settings = self.settings
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        check_transport(settings)
        self._lock = DataDirLock.acquire(self.data_dir)
        self.ready_file.unlink(missing_ok=True)  # we hold the dir: any server.json is a dead one's
        ensure_task_identity()
        loop = asyncio.get_running_loop()
        # Ports first: a coordinator that cannot have them must not touch its database.
        grpc_limit = settings.max_message_bytes + GRPC_HEADROOM_BYTES
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", grpc_limit),
            ("grpc.max_send_message_length", grpc_limit),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.so_reuseport", 0),  # exclusive: a second coordinator must fail, not share it
        ])
        self.listen_address = self._bind_grpc(settings)
        if settings.http:
            self._http_socket = _bind_http(settings.http)
            host = split_address(settings.http)[0]
            self.http_address = f"{host}:{self._http_socket.getsockname()[1]}"
        engine = await asyncio.to_thread(open_database, settings.db_url or default_url(self.data_dir))
        self.engine = engine
        self.repo = Repository(engine)
        await asyncio.to_thread(self.repo.mark_all_offline)
        if self.hooks.recover is not None:
            await asyncio.to_thread(self.hooks.recover, self.repo)
        self.store = ArtifactStore(self.data_dir / "artifacts")
        self.events = JobEvents(loop)
        self.grid = FleetGrid(self.hub, max_message_bytes=settings.max_message_bytes)
        self.runner = JobRunner(
            self.repo, self.store, self.grid,
            on_change=self.events.publish, eligibility=self.hooks.eligibility,
        )
        self.fleet = FleetService(
            self.repo, self.hub, self.store, self.hooks.describe_devices
            or describe_each(self.hooks.describe_device),
            admin_token=settings.admin_token,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            max_message_bytes=settings.max_message_bytes,
            open_enrollment=settings.open_enrollment,
            auth_failures=self.hooks.auth_failures,
            limits=self.hooks.limits,
        )
        fleet_pb2_grpc.add_FleetServicer_to_server(self.fleet, self._grpc)
        fleet_pb2_grpc.add_AdminServicer_to_server(AdminService(
            self.repo, self.hub, self.events, admin_token=settings.admin_token,
            on_submit=self.runner.wake, eligibility=self.hooks.eligibility,
            auth_failures=self.hooks.auth_failures,
        ), self._grpc)
        await self._grpc.start()
        if self._http_socket is not None:
            await self._start_http(self._http_socket)
        self._flusher = asyncio.create_task(self._flush_liveness())
        if self.hooks.background is not None:
            self._background = asyncio.create_task(self.hooks.background(self.repo))
        self.runner.start()
        write_json_atomically(self.ready_file, {
            "pid": os.getpid(),
            "listen": self.listen_address,
            "http": self.http_address,
            "tls": bool(settings.tls_cert),
        })
        log.info("coordinator ready: grpc %s, http %s", self.listen_address,
                 self.http_address or "off")

    def _bind_grpc(self, settings: ServerSettings) -> str:
        """Bind the gRPC address (exclusively); returns HOST:PORT with the port actually bound."""
        assert self._grpc is not None
        host, port = split_address(settings.listen)
        try:
            if settings.tls_cert and settings.tls_key:
                credentials = grpc.ssl_server_credentials(
                    [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())]
                )
                bound = self._grpc.add_secure_port(f"{host}:{port}", credentials)
            else:
                bound = self._grpc.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpc's "Failed to bind to address ..."
            bound = 0
        if bound == 0 and port:
            raise port_in_use(settings.listen, port)
        if bound == 0:
            raise OSError(f"cannot listen on {settings.listen}")
        return f"{host}:{bound}"

    async def _start_http(self, sock: socket.socket) -> None:
        address = self.http_address
        config = uvicorn.Config(
            build_app(self.repo, self.hub, self.hooks.http_routes,
                      admin_token=self.settings.admin_token, health=self.hooks.health,
                      auth_failures=self.hooks.auth_failures),
            log_level="warning",
            lifespan="off",
            ws="none",
            ssl_certfile=str(self.settings.tls_cert) if self.settings.tls_cert else None,
            ssl_keyfile=str(self.settings.tls_key) if self.settings.tls_key else None,
        )
        self._http = _EmbeddedUvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises uvicorn's start-up error
                raise OSError(f"HTTP server on {address} did not start")
            await asyncio.sleep(0.01)

    async def _flush_liveness(self) -> None:
        """Batch last_seen writes: one transaction per heartbeat interval, off the hot path."""
        try:
            while True:
                await asyncio.sleep(self.settings.heartbeat_interval_s)
                seen = self.hub.take_seen()
                if seen:
                    await asyncio.to_thread(self.repo.touch_last_seen, seen)
        except asyncio.CancelledError:
            seen = self.hub.take_seen()
            if seen:
                await asyncio.to_thread(self.repo.touch_last_seen, seen)
            raise

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        log.info("coordinator stopping")
        if self.hooks.stopping is not None:
            self.hooks.stopping()
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        self.events.publish(None)
        self.hub.close_all("coordinator shutting down")
        if self._grpc is not None:
            await self._grpc.stop(grace=2.0)
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.close)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
        if self.engine is not None:
            self.engine.dispose()
        self.ready_file.unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        log.info("coordinator stopped")

    async def _abort_start(self) -> None:
        """Undo a start that failed part-way: stop what runs, close what is bound, free the dir."""
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await asyncio.gather(self._http_task, return_exceptions=True)
        for task in (self._flusher, self._background):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(None)
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.close)
        if self._http_socket is not None:
            self._http_socket.close()
        if self.engine is not None:
            self.engine.dispose()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


async def serve(settings: ServerSettings, hooks: Hooks | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop gracefully."""
    coordinator = Coordinator(settings, hooks)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, coordinator.request_stop)
    await coordinator.start()
    try:
        await coordinator.wait_stopped()
    finally:
        await coordinator.stop()


def run(settings: ServerSettings, hooks: Hooks | None = None) -> int:
    asyncio.run(serve(settings, hooks))
    return 0
