"""What every tinyfleet grid shares: run bookkeeping, message creation, the
deadline-bounded send-and-receive, and a per-message delivery report.

Flower's Grid interface returns only the replies that arrived; a fleet operator
also needs to know who was asked, who answered, who timed out and how many bytes
moved. Each grid records a `Delivery` per message; the job runner drains them
after every exchange with `take_deliveries()`.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from tinyfleet.common.flower_adapter import Run, empty_run, ensure_task_identity, new_instruction

REPLIED = "replied"
ERROR = "error"
TIMEOUT = "timeout"
UNDELIVERABLE = "undeliverable"


@dataclass
class Delivery:
    message_id: str
    node_id: int
    message_type: str
    group_id: str
    sent_at: float = field(default_factory=time.time)
    bytes_down: int = 0
    bytes_up: int = 0
    status: str = "pending"
    error: str = ""
    compute_s: float = 0.0
    replied_at: float | None = None


class TrackingGrid(Grid):
    """Base class of FleetGrid and SimGrid."""

    def __init__(self, run_id: int = 0) -> None:
        # Stock strategies build messages with Flower's process-wide identity.
        ensure_task_identity()
        self._run = empty_run(run_id)
        self._lock = threading.Lock()
        self._deliveries: dict[str, Delivery] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return new_instruction(
            content, message_type, dst_node_id, run_id=self._run.run_id, group_id=group_id, ttl=ttl
        )

    @abstractmethod
    def wait_for_replies(self, message_ids: list[str], timeout: float | None) -> None:
        """Block until every message has a reply, or the timeout passes (no polling)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        message_ids = list(self.push_messages(messages))
        if message_ids:
            self.wait_for_replies(message_ids, timeout)
        replies = list(self.pull_messages(message_ids))
        with self._lock:
            for mid in message_ids:
                delivery = self._deliveries.get(mid)
                if delivery is not None and delivery.status == "pending":
                    delivery.status = TIMEOUT
        return replies

    # -- delivery report ---------------------------------------------------
    def _track(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries[delivery.message_id] = delivery

    def _update(self, message_id: str, **changes: object) -> None:
        with self._lock:
            delivery = self._deliveries.get(message_id)
            if delivery is not None:
                for key, value in changes.items():
                    setattr(delivery, key, value)

    def take_deliveries(self) -> list[Delivery]:
        """Deliveries recorded since the last call, oldest first."""
        with self._lock:
            taken = sorted(self._deliveries.values(), key=lambda d: d.sent_at)
            self._deliveries = {}
        return taken
