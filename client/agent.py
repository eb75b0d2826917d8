"""The edge agent: register, hold the Connect stream open, answer tasks, come back after failures.

Lifecycle: make the device key on the first start (STATE_DIR/device.key), register
the description once per start, signed by that key (idempotent for the same key,
which also refreshes the description; the enrollment token, if configured, lets a
new device in), then keep one Connect stream open: Challenge -> Hello signed over
its nonce -> Welcome, heartbeats, Ping -> Pong, Task -> Reply. When the stream
breaks (coordinator restart, network loss, Shutdown) the agent reconnects with
jittered exponential backoff; when the coordinator stops accepting the key it
registers again once; what retrying cannot fix (a refused registration, a revoked
device) ends the agent with exit code 2 and a message naming the cause. Tasks run on
one worker thread, in arrival order, off the stream reader, so pings and heartbeats
keep flowing during long training, and with one Flower Context for the agent's whole
life so handlers keep state across rounds.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass

import grpc
from flwr.app import Context

import tinyfleet
from tinyfleet.client.backoff import BASE_S, CAP_S, Backoff
from tinyfleet.client.connection import (
    FATAL_REGISTER_CODES,
    open_channel,
    register,
    register_request,
    rpc_code,
    rpc_detail,
)
from tinyfleet.client.descriptions import Description
from tinyfleet.client.handlers import HandlerRegistry, default_handlers
from tinyfleet.client.session import Session
from tinyfleet.client.state_dir import Identity, StateDir, StateDirError
from tinyfleet.client.task_frames import answer_task
from tinyfleet.common.device_keys import REQUEST_WINDOW_S, DeviceKey
from tinyfleet.common.flower_adapter import make_context
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 2
#: A coordinator that accepts the stream but says nothing is as good as down.
WELCOME_TIMEOUT_S = 30.0
#: Connect refusals that retrying cannot fix (UNAUTHENTICATED gets one re-registration first).
FATAL_CONNECT_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT})


class FatalError(RuntimeError):
    """Something only a person can fix (refused description, foreign state dir)."""


@dataclass
class AgentConfig:
    server: str
    state_dir: StateDir
    description: Description
    data_spec: str | None = None
    root_certificates: bytes | None = None
    #: Presented at registration; the coordinator takes a use only when the device is new to it.
    enroll_token: str = ""
    backoff_base_s: float = BASE_S
    backoff_cap_s: float = CAP_S
    welcome_timeout_s: float = WELCOME_TIMEOUT_S


@dataclass
class SessionEnd:
    reason: str
    welcomed: bool = False
    unauthenticated: bool = False
    reconnect_after_s: float = 0.0


@dataclass
class _Work:
    session: Session
    task: fleet_pb2.Task
    received_at: float


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        handlers: HandlerRegistry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.handlers = handlers or default_handlers()
        self._rng = rng or random.Random()
        self.backoff = Backoff(config.backoff_base_s, config.backoff_cap_s, self._rng)
        self.context: Context | None = None
        self.max_message_bytes = 0
        self._stop = threading.Event()
        self._session: Session | None = None
        self._session_lock = threading.Lock()
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()

    # -- public --------------------------------------------------------------
    def run(self) -> int:
        """Run until `stop()`; returns the process exit code (0 stopped, 2 fatal)."""
        worker = threading.Thread(target=self._work_loop, name="tinyfleet-worker", daemon=True)
        worker.start()
        try:
            self._loop()
        except (FatalError, StateDirError) as exc:
            log.error("agent stopped: %s", exc)
            return EXIT_FATAL
        except OSError as exc:  # the state dir became unwritable (disk full, permissions)
            log.error("agent stopped: state dir %s: %s", self.config.state_dir.path, exc)
            return EXIT_FATAL
        finally:
            self._work.put(None)
            self.config.state_dir.clear_status()
        return EXIT_OK

    def stop(self) -> None:
        """Close the stream and make `run()` return; safe from any thread (not a signal handler)."""
        self._stop.set()
        with self._session_lock:
            session = self._session
        if session is not None:
            session.close()

    # -- connection loop -----------------------------------------------------
    def _loop(self) -> None:
        cfg = self.config
        identity = self._stored_identity()
        key = cfg.state_dir.device_key()  # before the first registration: it proves every later one
        registered = False
        reregistered = False  # UNAUTHENTICATED gets one re-registration per Welcome
        while not self._stop.is_set():
            channel = open_channel(cfg.server, cfg.root_certificates)
            try:
                if not registered:
                    identity = self._register(channel, identity, key)
                    registered = True
                assert identity is not None
                end = self._connect(channel, identity, key)
            except grpc.RpcError as exc:  # Register failed in a way worth retrying
                end = SessionEnd(f"register: {rpc_code(exc).name}: {rpc_detail(exc)}")
            finally:
                channel.close()
            if self._stop.is_set():
                return
            if end.welcomed:
                reregistered = False
            if end.unauthenticated:
                if reregistered:
                    raise FatalError(
                        f"the coordinator at {cfg.server} refuses this device's key even after "
                        f"registering again ({end.reason})"
                    )
                log.error(
                    "the coordinator no longer accepts this device's key (%s); registering again",
                    end.reason,
                )
                registered, reregistered = False, True
                continue
            delay = (
                end.reconnect_after_s + self._rng.uniform(0.0, self.backoff.base_s)
                if end.reconnect_after_s > 0
                else self.backoff.next_delay()
            )
            what = "disconnected" if end.welcomed else "could not connect"
            log.warning("%s (%s); trying again in %.1f s", what, end.reason, delay)
            self._stop.wait(delay)

    def _stored_identity(self) -> Identity | None:
        identity = self.config.state_dir.load_identity()
        described = self.config.description.device_id
        if identity is not None and identity.device_id != described:
            raise FatalError(
                f"state dir {self.config.state_dir.path} belongs to device {identity.device_id!r} "
                f"but {self.config.description.source} describes {described!r}; "
                "use another --state-dir for another device"
            )
        return identity

    def _register(self, channel: grpc.Channel, identity: Identity | None, key: DeviceKey) -> Identity:
        cfg = self.config
        sequence = cfg.state_dir.next_register_sequence(time.time())
        request = register_request(cfg.description, key, sequence, cfg.enroll_token)
        try:
            response = register(channel, request)
        except grpc.RpcError as exc:
            code = rpc_code(exc)
            if code in FATAL_REGISTER_CODES:
                raise FatalError(
                    f"the coordinator at {cfg.server} refused to register "
                    f"{cfg.description.source}: {code.name}: {rpc_detail(exc)}"
                ) from exc
            raise
        updated = Identity(
            device_id=response.device_id,
            node_id=response.node_id,
            server=cfg.server,
            registered_at=identity.registered_at if identity and not response.created else time.time(),
        )
        if updated != identity:
            cfg.state_dir.save_identity(updated)
        log.info(
            "%s device %s (node %d, key %s)",
            "registered new" if response.created else "re-registered",
            updated.device_id,
            updated.node_id,
            key.fingerprint,
        )
        return updated

    def _hello(self, identity: Identity, key: DeviceKey, nonce: bytes) -> fleet_pb2.AgentFrame:
        return fleet_pb2.AgentFrame(hello=fleet_pb2.Hello(
            device_id=identity.device_id,
            agent_version=tinyfleet.__version__,
            handlers=self.handlers.message_types,
            signature=key.sign_connect(nonce, identity.device_id),
        ))

    def _connect(self, channel: grpc.Channel, identity: Identity, key: DeviceKey) -> SessionEnd:
        session = Session(channel)
        with self._session_lock:
            self._session = session
        if self._stop.is_set():  # stop() ran before the session was visible to it
            session.close()
        welcomed = challenged = False
        no_welcome = threading.Timer(self.config.welcome_timeout_s, session.close)
        no_welcome.daemon = True
        no_welcome.start()
        try:
            for frame in session:
                kind = frame.WhichOneof("kind")
                if not challenged:
                    if kind != "challenge":
                        return SessionEnd(f"protocol error: first frame was {kind!r}, not challenge")
                    session.send(self._hello(identity, key, frame.challenge.nonce))
                    challenged = True
                elif not welcomed:
                    no_welcome.cancel()
                    if kind != "welcome":
                        return SessionEnd(f"protocol error: frame {kind!r} came before welcome")
                    self._welcomed(session, identity, frame.welcome)
                    welcomed = True
                elif kind == "ping":
                    session.send(fleet_pb2.AgentFrame(pong=fleet_pb2.Pong(nonce=frame.ping.nonce)))
                elif kind == "task":
                    self._work.put(_Work(session, frame.task, time.monotonic()))
                elif kind == "shutdown":
                    return SessionEnd(
                        f"coordinator shut down: {frame.shutdown.reason or 'no reason given'}",
                        welcomed=True,
                        reconnect_after_s=max(frame.shutdown.reconnect_after_s, 0.0),
                    )
                else:
                    log.warning("ignoring unexpected %r frame", kind)
            return SessionEnd("the coordinator ended the stream", welcomed=welcomed)
        except grpc.RpcError as exc:
            code = rpc_code(exc)
            reason = f"{code.name}: {rpc_detail(exc)}"
            if not welcomed and session.closed and not self._stop.is_set():
                reason = f"no Welcome within {self.config.welcome_timeout_s:.0f} s"
            if code in FATAL_CONNECT_CODES and not self._stop.is_set():
                raise FatalError(
                    f"the coordinator at {self.config.server} refused the connection: {reason}"
                ) from exc
            return SessionEnd(
                reason, welcomed=welcomed, unauthenticated=code == grpc.StatusCode.UNAUTHENTICATED
            )
        finally:
            no_welcome.cancel()
            session.close()
            with self._session_lock:
                self._session = None
            if welcomed and not self._stop.is_set():
                self.config.state_dir.write_status(
                    device_id=identity.device_id,
                    node_id=self.context.node_id if self.context else identity.node_id,
                    server=self.config.server,
                    connected=False,
                )

    def _welcomed(self, session: Session, identity: Identity, welcome: fleet_pb2.Welcome) -> None:
        self.backoff.reset()
        self.max_message_bytes = welcome.max_message_bytes
        skew_s = welcome.server_time - time.time() if welcome.server_time else 0.0
        if abs(skew_s) > REQUEST_WINDOW_S / 2:
            log.warning("this device's clock is %.0f s off the coordinator's; signed requests "
                        "must use the coordinator's time", skew_s)
        if self.context is None:
            node_config = {"data": self.config.data_spec} if self.config.data_spec else {}
            self.context = make_context(welcome.node_id, node_config)
        else:
            self.context.node_id = welcome.node_id
        self.config.state_dir.write_status(
            device_id=identity.device_id,
            node_id=welcome.node_id,
            server=self.config.server,
            connected=True,
        )
        session.start_heartbeats(welcome.heartbeat_interval_s)
        log.info(
            "connected to %s as node %d (heartbeat %.1f s, max message %d bytes)",
            self.config.server,
            welcome.node_id,
            welcome.heartbeat_interval_s,
            welcome.max_message_bytes,
        )

    # -- task worker ---------------------------------------------------------
    def _work_loop(self) -> None:
        while (work := self._work.get()) is not None:
            task = work.task
            if work.session.closed:
                log.warning("dropping task %s: its stream has closed", task.message_id)
                continue
            waited = time.monotonic() - work.received_at
            if task.deadline_s > 0 and waited > task.deadline_s:
                log.warning("dropping task %s: waited %.1f s, past its %.1f s deadline",
                            task.message_id, waited, task.deadline_s)
                continue
            assert self.context is not None  # tasks only arrive after Welcome
            frame = answer_task(task, self.handlers, self.context, self.max_message_bytes)
            if not work.session.send(frame):
                log.warning("reply to task %s not sent: its stream closed meanwhile", task.message_id)
