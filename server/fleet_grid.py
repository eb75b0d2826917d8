"""FleetGrid: Flower's Grid interface over the agents connected to this coordinator.

Strategies call it synchronously from the job thread; frames travel on the
asyncio loop through the ConnectionHub. Everything is event-driven: a reply or a
disconnect resolves its message and wakes `wait_for_replies` through a
condition, so a round ends the moment the last reply lands, a node that drops
mid-exchange is undeliverable at once, and only silence waits for the deadline.

Replies are checked before any strategy sees them: oversized, undecodable,
NaN/Inf arrays, arrays under "arrays" whose keys overlap the global model
but do not match its keys and shapes, and (when the job sets max_update_ratio)
train replies that do not carry exactly the record the strategy aggregates, or
whose update is too large for the global model (`update_guard`). Such a reply
becomes an error reply (Flower's strategies skip those) and its Delivery records
why; so does a reply whose checks fail in a way nobody foresaw (logged with the
traceback). A task of a type the node's agent said (in its Hello) it has no handler
for is not sent: it gets the error reply the agent would have sent.

Each phase of a round (train, evaluate) runs against one deadline set by
`begin_phase`: the strategy's configure step (which may wait for nodes) and the
wait for replies share it, so a phase never outlasts its deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, MessageType

from tinyfleet.common.arrays import InvalidUpdateError, check_compatible, check_finite
from tinyfleet.common.flower_adapter import (
    ERR_INVALID_UPDATE,
    ERR_MESSAGE_TOO_LARGE,
    ERR_UNKNOWN_MESSAGE_TYPE,
    SAMPLE_NODES_POLL_S,
    MessageDecodeError,
    message_from_bytes,
    message_to_bytes,
    reply_with_error,
    stamp,
)
from tinyfleet.common.grids import (
    ERROR,
    REPLIED,
    TIMEOUT,
    UNDELIVERABLE,
    Delivery,
    TrackingGrid,
)
from tinyfleet.common.message_keys import ARRAYS_KEY
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.connections import ConnectionHub
from tinyfleet.server.update_guard import UpdateGuard

log = logging.getLogger(__name__)
#: Calls of get_node_ids this far apart past the wait window are Flower's `sample_nodes` polling
#: for nodes (every SAMPLE_NODES_POLL_S), not one configure step asking twice.
POLL_GAP_S = SAMPLE_NODES_POLL_S / 2
#: Handlers named in the reason a task is refused (an agent may declare 256).
SHOWN_HANDLERS = 10


class GridClosedError(RuntimeError):
    """The coordinator is stopping; the exchange in progress is abandoned."""


class NodeWaitTimeoutError(RuntimeError):
    """A strategy kept asking for nodes beyond the round's wait window (Flower's
    `sample_nodes` loops forever when fewer nodes are online than it wants)."""


@dataclass
class _Pending:
    node_id: int
    instruction: Message


class FleetGrid(TrackingGrid):
    def __init__(
        self,
        hub: ConnectionHub,
        *,
        max_message_bytes: int,
        eligible_nodes: Callable[[], set[int]] | None = None,
    ) -> None:
        super().__init__()
        self.hub = hub
        self.max_message_bytes = max_message_bytes
        #: Registry hook: the node ids a job may use (None: every connected node).
        self.eligible_nodes = eligible_nodes
        #: The global model; replies under "arrays" that overlap its keys must match it.
        self.reference_arrays: ArrayRecord | None = None
        #: Seconds an agent is told it has for each task (`begin_phase` sets the phase's deadline).
        self.task_deadline_s = 0.0
        #: Bounds train updates relative to the global model (the job's max_update_ratio), or None.
        self.update_guard: UpdateGuard | None = None
        self._cond = threading.Condition(self._lock)
        self._pending: dict[str, _Pending] = {}
        self._replies: dict[str, Message] = {}
        self._closed = False
        self._phase_started = self._last_call = time.monotonic()
        self._phase_wait_s = float("inf")
        self._phase_deadline: float | None = None
        self._phase_deadline_s = 0.0
        hub.add_listener(self)

    # -- nodes -------------------------------------------------------------------
    def available_nodes(self) -> set[int]:
        online = self.hub.online_nodes()
        if self.eligible_nodes is not None:
            online &= set(self.eligible_nodes())
        return online

    def begin_phase(self, wait_s: float, deadline_s: float | None = None) -> None:
        """Start a phase: polling for nodes past `wait_s` (or past the phase's deadline, whichever
        comes first) raises instead of looping, and `send_and_receive` waits only for what is left
        of `deadline_s` (None: only its own timeout bounds it)."""
        self._phase_started = self._last_call = time.monotonic()
        if deadline_s is None:
            self._phase_wait_s, self._phase_deadline = wait_s, None
            return
        self._phase_wait_s = min(wait_s, deadline_s)
        self._phase_deadline = self._phase_started + deadline_s
        self._phase_deadline_s = self.task_deadline_s = deadline_s

    def phase_time_left(self) -> float | None:
        """Seconds left before the phase's deadline (never negative), or None without one."""
        if self._phase_deadline is None:
            return None
        return max(0.0, self._phase_deadline - time.monotonic())

    def get_node_ids(self) -> Iterable[int]:
        if self._closed:
            raise GridClosedError("coordinator is stopping")
        now = time.monotonic()
        gap, self._last_call = now - self._last_call, now
        nodes = sorted(self.available_nodes())
        waited = now - self._phase_started
        if waited > self._phase_wait_s and gap >= POLL_GAP_S:
            raise NodeWaitTimeoutError(
                f"the strategy waited {waited:.0f} s for more nodes than the {len(nodes)} "
                "eligible online"
            )
        return nodes

    def wait_for_nodes(self, count: int, timeout: float) -> int:
        """Block until `count` eligible nodes are online or timeout; returns how many are."""
        deadline = time.monotonic() + timeout
        while True:
            version = self.hub.version
            available = len(self.available_nodes())
            remaining = deadline - time.monotonic()
            if available >= count or remaining <= 0 or self._closed:
                return available
            self.hub.wait_changed(version, remaining)

    # -- sending -----------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        if self._closed:
            raise GridClosedError("coordinator is stopping")
        ids: list[str] = []
        for message in messages:
            mid = stamp(message, run_id=self._run.run_id)
            node_id = message.metadata.dst_node_id
            ids.append(mid)
            session = self.hub.session(node_id)
            if session is not None and not session.handles(message.metadata.message_type):
                self._refuse_unhandled(message, sorted(session.handlers))
                continue
            wire = message_to_bytes(message)
            delivery = Delivery(
                message_id=mid,
                node_id=node_id,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
                bytes_down=len(wire),
            )
            if len(wire) > self.max_message_bytes:
                delivery.status = ERROR
                delivery.error = (
                    f"instruction of {len(wire)} bytes exceeds max_message_bytes "
                    f"({self.max_message_bytes})"
                )
                self._track(delivery)
                continue
            with self._lock:
                self._deliveries[mid] = delivery
                self._pending[mid] = _Pending(node_id, message)
            task = fleet_pb2.Task(message_id=mid, flower_message=wire, deadline_s=self.task_deadline_s)
            if not self.hub.send(node_id, fleet_pb2.CoordinatorFrame(task=task)):
                self._resolve_undeliverable(mid, "node is not connected")
        return ids

    def _refuse_unhandled(self, message: Message, handlers: list[str]) -> None:
        """Answer, without sending it, a task of a type the node's agent said it has no handler
        for: the error reply its agent would send, minus the download."""
        metadata = message.metadata
        shown = ", ".join(handlers[:SHOWN_HANDLERS]) + (
            f" and {len(handlers) - SHOWN_HANDLERS} more" if len(handlers) > SHOWN_HANDLERS else ""
        )
        reason = (f"node {metadata.dst_node_id}'s agent has no handler for {metadata.message_type!r} "
                  f"(it handles {shown}); not sent")
        delivery = Delivery(message_id=metadata.message_id, node_id=metadata.dst_node_id,
                            message_type=metadata.message_type, group_id=metadata.group_id,
                            status=ERROR, error=reason)
        with self._lock:
            self._deliveries[delivery.message_id] = delivery
            self._replies[delivery.message_id] = reply_with_error(message, ERR_UNKNOWN_MESSAGE_TYPE, reason)
        log.warning("%s", reason)

    def wait_for_replies(self, message_ids: list[str], timeout: float | None) -> None:
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or not any(m in self._pending for m in message_ids),
                timeout=timeout,
            )
            if self._closed:
                raise GridClosedError("coordinator is stopping")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and wait for replies until `timeout`, and never past the phase's deadline."""
        left = self.phase_time_left()
        deadline_s = timeout
        if left is not None and (timeout is None or left <= timeout):
            timeout, deadline_s = left, self._phase_deadline_s
        message_ids: list[str] = []
        try:
            replies = list(super().send_and_receive(_recording(messages, message_ids), timeout=timeout))
        finally:
            with self._lock:  # replies arriving after the deadline are ignored, not kept
                for mid in message_ids:
                    self._pending.pop(mid, None)
                    delivery = self._deliveries.get(mid)
                    if delivery is not None and delivery.status == TIMEOUT and not delivery.error:
                        delivery.error = f"no reply within the {deadline_s} s deadline"
        return replies

    def close(self) -> None:
        """Stop: every exchange in progress ends now, undelivered."""
        with self._cond:
            self._closed = True
            for mid in list(self._pending):
                self._resolve_locked(mid, UNDELIVERABLE, "coordinator is stopping")
            self._cond.notify_all()
        self.hub.wake()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- inbound (from the hub: replies on a reply-check thread, disconnects on the loop) --
    def on_reply(self, node_id: int, reply: fleet_pb2.Reply) -> None:
        mid = reply.message_id
        with self._lock:
            pending = self._pending.get(mid)
        if pending is None or pending.node_id != node_id:
            log.info("ignoring reply %s from node %d: not an open task of that node", mid, node_id)
            return
        try:
            message, error, code = self._check_reply(node_id, pending, reply.flower_message)
        except Exception as exc:  # unforeseen: the reply still resolves, with the reason, not at the deadline
            log.warning("checking the reply from node %d for %s failed", node_id, mid, exc_info=True)
            error = f"reply could not be checked: {type(exc).__name__}: {exc}"
            message, code = None, ERR_INVALID_UPDATE
        if error or message is None:
            message = reply_with_error(pending.instruction, code, error)
        elif message.has_error():
            error = f"node reported error {message.error.code}: {message.error.reason}"
        with self._cond:
            if self._pending.pop(mid, None) is None:
                return
            self._replies[mid] = message
            delivery = self._deliveries.get(mid)
            if delivery is not None:
                delivery.status = ERROR if error else REPLIED
                delivery.error = error
                delivery.bytes_up = len(reply.flower_message)
                delivery.compute_s = reply.compute_seconds
                delivery.replied_at = time.time()
            self._cond.notify_all()
        if error:
            log.warning("reply from node %d for %s recorded as error: %s", node_id, mid, error)

    def _check_reply(
        self, node_id: int, pending: _Pending, data: bytes
    ) -> tuple[Message | None, str, int]:
        """(message, error, error code); error is '' for a reply that may be aggregated."""
        if len(data) > self.max_message_bytes:
            return None, (
                f"reply of {len(data)} bytes exceeds max_message_bytes ({self.max_message_bytes})"
            ), ERR_MESSAGE_TOO_LARGE
        try:
            message = message_from_bytes(data)
        except MessageDecodeError as exc:
            return None, f"reply does not decode: {exc}", ERR_INVALID_UPDATE
        if message.metadata.src_node_id != node_id:
            return None, (
                f"reply claims to come from node {message.metadata.src_node_id}"
            ), ERR_INVALID_UPDATE
        if message.has_error():
            return message, "", 0
        try:
            for key, record in message.content.array_records.items():
                try:
                    check_finite(record)
                except InvalidUpdateError as exc:
                    raise InvalidUpdateError(f"update contains NaN/Inf in {key!r}: {exc}") from exc
            arrays = message.content.array_records.get(ARRAYS_KEY)
            reference = self.reference_arrays
            if arrays is not None and reference is not None and set(arrays) & set(reference):
                check_compatible(arrays, reference)
            guard = self.update_guard
            if guard is not None and reference is not None and _is_train(pending.instruction):
                dropped = guard.check(message.content, reference)
                if dropped:
                    raise InvalidUpdateError(dropped)
        except InvalidUpdateError as exc:
            return None, str(exc), ERR_INVALID_UPDATE
        return message, "", 0

    def on_disconnect(self, node_id: int) -> None:
        with self._cond:
            lost = [m for m, p in self._pending.items() if p.node_id == node_id]
            for mid in lost:
                self._resolve_locked(mid, UNDELIVERABLE, "node disconnected before replying")
            if lost:
                self._cond.notify_all()

    def _resolve_undeliverable(self, mid: str, reason: str) -> None:
        with self._cond:
            self._resolve_locked(mid, UNDELIVERABLE, reason)
            self._cond.notify_all()

    def _resolve_locked(self, mid: str, status: str, reason: str) -> None:
        self._pending.pop(mid, None)
        delivery = self._deliveries.get(mid)
        if delivery is not None and delivery.status == "pending":
            delivery.status = status
            delivery.error = reason


def _is_train(instruction: Message) -> bool:
    """Flower's "train" and its qualified forms ("train.fedreptile")."""
    return instruction.metadata.message_type.partition(".")[0] == MessageType.TRAIN


def _recording(messages: Iterable[Message], ids: list[str]) -> Iterable[Message]:
    """Pass messages through, remembering the ids `push_messages` stamps on them."""
    for message in messages:
        yield message
        ids.append(message.metadata.message_id)
