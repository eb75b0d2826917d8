"""The coordinator daemon: gRPC (Fleet + Admin), HTTP, the job runner, and their lifecycle.

One asyncio loop (main thread) serves gRPC (grpc.aio) and HTTP (uvicorn); the
job runner has its own thread. Start-up: migrate the database, mark every device
offline, bind ports (0 = ephemeral), then write DATA_DIR/server.json atomically
with the actual addresses so launchers wait for the file instead of sleeping.
Stop (SIGINT/SIGTERM): the round in progress is abandoned (its job stays
"running" and resumes on restart from its last checkpointed round), agents get a
Shutdown frame, servers close, server.json is removed, exit code 0.

gRPC message size: the application limit is `max_message_bytes` (agents learn it
in Welcome); gRPC itself accepts up to that plus GRPC_HEADROOM_BYTES so an
oversized reply reaches the application check and is recorded as an error
naming its size and the limit while the stream stays up. A frame beyond the
headroom is refused by gRPC (RESOURCE_EXHAUSTED) and the agent reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import uvicorn
from starlette.routing import BaseRoute

from tinyfleet.common.atomic_files import write_json_atomically
from tinyfleet.common.flower_adapter import ensure_task_identity
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2_grpc
from tinyfleet.server.admin_service import AdminService
from tinyfleet.server.artifacts import ArtifactStore
from tinyfleet.server.connections import ConnectionHub
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.descriptions import (
    DescribeDevice,
    DescribeDevices,
    describe_device,
    describe_each,
)
from tinyfleet.server.fleet_grid import FleetGrid
from tinyfleet.server.fleet_service import FleetService
from tinyfleet.server.http_api import build_app
from tinyfleet.server.job_events import JobEvents
from tinyfleet.server.job_runner import Eligibility, JobRunner
from tinyfleet.server.repository import Repository

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_HEADROOM_BYTES = 4 * 1024 * 1024
READY_FILE = "server.json"


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


@dataclass
class Hooks:
    """Where other parts of tinyfleet (the registry) plug into the coordinator."""

    describe_device: DescribeDevice = describe_device
    #: Validates concurrent registrations together (None: `describe_device` on each).
    describe_devices: DescribeDevices | None = None
    http_routes: Sequence[BaseRoute] = field(default_factory=list)
    eligibility: Eligibility | None = None
    #: Runs once SQL is open and before the coordinator says it is ready (in a worker thread):
    #: the registry catches up with what SQL committed before a crash.
    recover: Callable[[Repository], None] | None = None
    #: Runs for the daemon's lifetime once SQL is open (the registry's projector); cancelled at stop.
    background: Callable[[Repository], Awaitable[None]] | None = None
    #: Called first at stop, before the servers drain: ends work that would hold a request open
    #: (the registry kills its SPARQL query workers, so running queries answer at once).
    stopping: Callable[[], None] | None = None


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)




class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn on our loop: the daemon, not uvicorn, owns SIGINT/SIGTERM."""

    @contextmanager
    def capture_signals(self):
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

    async def start(self) -> None:
        settings = self.settings
        if bool(settings.tls_cert) != bool(settings.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_task_identity()
        loop = asyncio.get_running_loop()
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
        grpc_limit = settings.max_message_bytes + GRPC_HEADROOM_BYTES
        self._grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", grpc_limit),
            ("grpc.max_send_message_length", grpc_limit),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ])
        self.fleet = FleetService(
            self.repo, self.hub, self.store, self.hooks.describe_devices
            or describe_each(self.hooks.describe_device),
            admin_token=settings.admin_token,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            max_message_bytes=settings.max_message_bytes,
        )
        fleet_pb2_grpc.add_FleetServicer_to_server(self.fleet, self._grpc)
        fleet_pb2_grpc.add_AdminServicer_to_server(AdminService(
            self.repo, self.hub, self.events, admin_token=settings.admin_token,
            on_submit=self.runner.wake, eligibility=self.hooks.eligibility,
        ), self._grpc)
        host, port = split_address(settings.listen)
        if settings.tls_cert and settings.tls_key:
            credentials = grpc.ssl_server_credentials(
                [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())]
            )
            bound = self._grpc.add_secure_port(f"{host}:{port}", credentials)
        else:
            bound = self._grpc.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot listen on {settings.listen}")
        self.listen_address = f"{host}:{bound}"
        await self._grpc.start()
        if settings.http:
            await self._start_http(settings.http)
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

    async def _start_http(self, address: str) -> None:
        host, port = split_address(address)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        self.http_address = f"{host}:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            build_app(self.repo, self.hub, self.hooks.http_routes),
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
        self.engine.dispose()
        self.ready_file.unlink(missing_ok=True)
        log.info("coordinator stopped")


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
