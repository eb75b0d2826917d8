"""One Connect stream between an agent and the coordinator.

The coordinator speaks first (a Challenge); the agent's first frame is the Hello
signed over it, sent through `send` like every other frame. Sync gRPC drains the
request iterator on its own thread, so outgoing frames go through a queue that any
thread may feed (the stream reader answering pings, the heartbeat timer, the task
worker). Closing the session half-closes the stream and cancels the call; frames
sent after that are dropped, because a reply belongs to the stream its task came on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)


class Session:
    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.SimpleQueue[fleet_pb2.AgentFrame | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self.call = fleet_pb2_grpc.FleetStub(channel).Connect(self._frames())

    def _frames(self) -> Iterator[fleet_pb2.AgentFrame]:
        while (frame := self._out.get()) is not None:
            yield frame

    def __iter__(self) -> Iterator[fleet_pb2.CoordinatorFrame]:
        return iter(self.call)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def send(self, frame: fleet_pb2.AgentFrame) -> bool:
        """Queue a frame; False if the session has closed (the frame is dropped)."""
        if self._closed.is_set():
            return False
        self._out.put(frame)
        return True

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._out.put(None)  # ends the request stream (half-close)
        self.call.cancel()

    def start_heartbeats(self, interval_s: float) -> threading.Thread | None:
        """Send a Heartbeat every `interval_s` until the session closes; 0 means none asked for."""
        if interval_s <= 0:
            return None

        def beat() -> None:
            while not self._closed.wait(interval_s):
                self.send(fleet_pb2.AgentFrame(heartbeat=fleet_pb2.Heartbeat()))

        thread = threading.Thread(target=beat, name="tinyfleet-heartbeat", daemon=True)
        thread.start()
        return thread
