"""Who is connected right now, and the one way to send them frames.

Streams live on the coordinator's asyncio loop; the job runner and FleetGrid live
on a worker thread. The hub is the thread-safe seam between them: `send` hands a
frame to a stream's queue from any thread, `wait_changed` lets the job thread
sleep until membership changes (no polling), and listeners (FleetGrid) hear
about replies and disconnects as they happen. A listener that raises is logged
with its traceback and skipped: it must not take the agent's stream down with it.

Each session also knows what its agent said in Hello (version, the message types
it has handlers for) and the round trips of the keepalive pings the coordinator
sends it, for operators (`server devices`) and for refusing tasks early.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tinyfleet.common.handler_lookup import handler_key
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

log = logging.getLogger(__name__)

#: Keepalive round trips each session keeps (the latest and the worst of these are shown).
RTT_SAMPLES = 64
#: Pings awaiting their pong beyond this many are forgotten, oldest first (a silent stream is
#: closed by the missed-heartbeat rule, not here).
MAX_UNANSWERED_PINGS = 8


@dataclass(frozen=True)
class RoundTrip:
    sent_at: float  # time.monotonic() when the Ping was due
    seconds: float


class HubListener(Protocol):
    """Hears replies (on a thread of their own: decoding them takes time) and disconnects."""

    def on_reply(self, node_id: int, reply: fleet_pb2.Reply) -> None: ...

    def on_disconnect(self, node_id: int) -> None: ...


@dataclass(eq=False)
class Session:
    """One open Connect stream; frames queued here are written by the stream's handler."""

    device_id: str
    node_id: int
    loop: asyncio.AbstractEventLoop
    outgoing: asyncio.Queue[fleet_pb2.CoordinatorFrame | None] = field(default_factory=asyncio.Queue)
    closed: bool = False
    agent_version: str = ""
    #: Message types the agent has handlers for; empty when it did not say (nothing is refused).
    handlers: frozenset[str] = frozenset()
    round_trips: deque[RoundTrip] = field(
        default_factory=lambda: deque(maxlen=RTT_SAMPLES), init=False, repr=False
    )
    _unanswered: dict[int, float] = field(default_factory=dict, init=False, repr=False)

    def put(self, frame: fleet_pb2.CoordinatorFrame | None) -> None:
        """Queue a frame (None ends the stream); safe from any thread, order kept."""
        try:
            self.loop.call_soon_threadsafe(self.outgoing.put_nowait, frame)
        except RuntimeError:  # the loop has closed: the stream is gone anyway
            self.closed = True

    def close(self, reason: str, reconnect_after_s: float = 0.0) -> None:
        """Send Shutdown and end the stream (idempotent)."""
        if self.closed:
            return
        self.closed = True
        shutdown = fleet_pb2.Shutdown(reason=reason, reconnect_after_s=reconnect_after_s)
        self.put(fleet_pb2.CoordinatorFrame(shutdown=shutdown))
        self.put(None)

    def handles(self, message_type: str) -> bool:
        """Whether the agent has a handler for `message_type` (True when it did not say)."""
        return not self.handlers or handler_key(self.handlers, message_type) is not None

    # -- keepalive (loop thread) ----------------------------------------------------
    def ping(self, due: float) -> None:
        """Queue a Ping that was due at `due` (time.monotonic()); its Pong's arrival gives a round
        trip counted from then (`pong`), so time the coordinator was too busy to send it counts."""
        nonce = secrets.randbits(64)
        self._unanswered[nonce] = due
        while len(self._unanswered) > MAX_UNANSWERED_PINGS:
            del self._unanswered[next(iter(self._unanswered))]
        self.put(fleet_pb2.CoordinatorFrame(ping=fleet_pb2.Ping(nonce=nonce)))

    def pong(self, nonce: int) -> RoundTrip | None:
        """Record the round trip of the Ping with `nonce`; None for a nonce not awaited."""
        sent_at = self._unanswered.pop(nonce, None)
        if sent_at is None:
            return None
        trip = RoundTrip(sent_at, time.monotonic() - sent_at)
        self.round_trips.append(trip)
        return trip


class ConnectionHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[int, Session] = {}
        self._listeners: list[HubListener] = []
        self._version = 0
        self._seen: dict[str, float] = {}
        self._revoked: dict[str, str] = {}

    def add_listener(self, listener: HubListener) -> None:
        self._listeners.append(listener)

    # -- membership (called on the loop thread by the Connect handler) -----------
    def attach(self, session: Session) -> Session | None:
        """Make `session` the node's stream; returns the one it replaces (caller closes it)."""
        with self._lock:
            old = self._sessions.get(session.node_id)
            self._sessions[session.node_id] = session
            self._seen[session.device_id] = time.time()
            self._bump()
        if old is not None:
            self._notify("on_disconnect", old.node_id, lambda listener: listener.on_disconnect(old.node_id))
        return old

    def detach(self, session: Session) -> bool:
        """Forget `session` if it is still the node's current stream; True if it was."""
        with self._lock:
            current = self._sessions.get(session.node_id) is session
            if current:
                del self._sessions[session.node_id]
                self._bump()
        if current:
            self._notify("on_disconnect", session.node_id,
                         lambda listener: listener.on_disconnect(session.node_id))
        return current

    def _notify(self, event: str, node_id: int, call: Callable[[HubListener], None]) -> None:
        """Tell every listener; one that raises is logged and the others still hear."""
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception:
                log.warning("%s of %s failed for node %d; the stream stays open", event,
                            type(listener).__name__, node_id, exc_info=True)

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()

    def wake(self) -> None:
        """Wake every `wait_changed` caller (e.g. the coordinator is stopping)."""
        with self._lock:
            self._bump()

    # -- queries and sending (any thread) ------------------------------------
    @property
    def version(self) -> int:
        with self._lock:
            return self._version

    def online_nodes(self) -> set[int]:
        with self._lock:
            return set(self._sessions)

    def session(self, node_id: int) -> Session | None:
        """The node's open stream, or None when it is not connected."""
        with self._lock:
            return self._sessions.get(node_id)

    def wait_changed(self, since: int, timeout: float) -> int:
        """Block until membership changes after version `since`, or timeout; returns the version."""
        with self._lock:
            self._changed.wait_for(lambda: self._version != since, timeout=max(timeout, 0.0))
            return self._version

    def send(self, node_id: int, frame: fleet_pb2.CoordinatorFrame) -> bool:
        """Queue a frame for a node's stream; False when the node is not connected."""
        with self._lock:
            session = self._sessions.get(node_id)
        if session is None or session.closed:
            return False
        session.put(frame)
        return True

    # -- revocation (loop thread) ---------------------------------------------------
    def revoke(self, device_id: str, reason: str) -> bool:
        """Close the device's stream (Shutdown "device revoked: <reason>") and keep refusing it in
        this process, so a handshake that read the device before the revocation committed cannot
        attach after; True if a stream was open."""
        with self._lock:
            self._revoked[device_id] = reason
            sessions = [s for s in self._sessions.values() if s.device_id == device_id]
        for session in sessions:
            session.close(f"device revoked: {reason}")
        return bool(sessions)

    def revoked(self, device_id: str) -> str | None:
        """The reason the device was revoked while this coordinator runs, or None."""
        with self._lock:
            return self._revoked.get(device_id)

    def reinstate(self, device_id: str) -> None:
        """The operator gave the device a new key: it may connect again."""
        with self._lock:
            self._revoked.pop(device_id, None)

    def close_all(self, reason: str, reconnect_after_s: float = 0.0) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close(reason, reconnect_after_s)

    # -- inbound events -------------------------------------------------------------
    def touch(self, device_id: str) -> None:
        with self._lock:
            self._seen[device_id] = time.time()

    def take_seen(self) -> dict[str, float]:
        """Liveness heard since the last call, for one batched SQL write."""
        with self._lock:
            seen, self._seen = self._seen, {}
        return seen

    def deliver_reply(self, node_id: int, reply: fleet_pb2.Reply) -> None:
        """Hand a reply to the listeners; called off the loop (decoding a reply takes time)."""
        self._notify("on_reply", node_id, lambda listener: listener.on_reply(node_id, reply))
