"""An in-process fake coordinator: the Fleet service on 127.0.0.1, driven by tests.

The fake implements just enough of the protocol to drive an agent through every
path: registration signed by the device key (first key wins), Challenge/Hello
checked against that key, Welcome, and per-connection queues so a test can push
Ping/Task/Shutdown frames and wait for what the agent sends back. It can stop and
restart on the same port to test reconnection.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from tinyfleet.common.device_keys import connect_message, new_nonce, register_message, verify
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

WAIT_S = 10.0


class Connection:
    """One accepted Connect stream, seen from the coordinator's side."""

    def __init__(self, hello: fleet_pb2.Hello, node_id: int) -> None:
        self.hello = hello
        self.node_id = node_id
        self.outbox: queue.SimpleQueue[fleet_pb2.CoordinatorFrame | None] = queue.SimpleQueue()
        self.frames: list[fleet_pb2.AgentFrame] = []
        self.ended = threading.Event()
        self._changed = threading.Condition()

    def send(self, **kind: Any) -> None:  # one CoordinatorFrame field, by name
        self.outbox.put(fleet_pb2.CoordinatorFrame(**kind))

    def end(self) -> None:
        """End the stream from the coordinator's side (OK status, no Shutdown frame)."""
        self.outbox.put(None)

    def received(self, frame: fleet_pb2.AgentFrame) -> None:
        with self._changed:
            self.frames.append(frame)
            self._changed.notify_all()

    def wait_for(
        self,
        kind: str,
        where: Callable[[fleet_pb2.AgentFrame], bool] = lambda f: True,
        count: int = 1,
        timeout: float = WAIT_S,
    ) -> list[fleet_pb2.AgentFrame]:
        def matching() -> list[fleet_pb2.AgentFrame]:
            return [f for f in self.frames if f.WhichOneof("kind") == kind and where(f)]

        with self._changed:
            if not self._changed.wait_for(lambda: len(matching()) >= count, timeout):
                kinds = [f.WhichOneof("kind") for f in self.frames]
                raise AssertionError(f"no {count} {kind!r} frame(s) within {timeout}s; got {kinds}")
            return matching()

    def reply_to(self, message_id: str, timeout: float = WAIT_S) -> fleet_pb2.Reply:
        return self.wait_for("reply", lambda f: f.reply.message_id == message_id, timeout=timeout)[0].reply


@dataclass
class FakeFleet(fleet_pb2_grpc.FleetServicer):
    heartbeat_interval_s: float = 0.2
    max_message_bytes: int = 16 * 1024 * 1024
    keys: dict[str, bytes] = field(default_factory=dict)
    node_ids: dict[str, int] = field(default_factory=dict)
    registrations: list[fleet_pb2.RegisterRequest] = field(default_factory=list)
    register_error: tuple[grpc.StatusCode, str] | None = None
    accept_connect: bool = True
    send_welcome: bool = True
    silent: list[fleet_pb2.Hello] = field(default_factory=list)
    tls: grpc.ServerCredentials | None = None
    connections: list[Connection] = field(default_factory=list)
    refused: list[fleet_pb2.Hello] = field(default_factory=list)
    port: int = 0
    _server: grpc.Server | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    # -- the Fleet service -----------------------------------------------------
    def Register(self, request, context):
        from tinyfleet.client.descriptions import parse_description

        with self._changed:
            self.registrations.append(request)
            self._changed.notify_all()
        if self.register_error is not None:
            context.abort(*self.register_error)
        device_id = parse_description(request.description, request.media_type).device_id
        signed = register_message(request.public_key, request.description, request.media_type,
                                  request.sequence, request.enrollment_token)
        if not verify(request.public_key, request.signature, signed):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "the registration signature does not verify")
        if device_id in self.keys:
            if request.public_key != self.keys[device_id]:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{device_id} has another key")
            return fleet_pb2.RegisterResponse(device_id=device_id, node_id=self.node_ids[device_id])
        self.keys[device_id] = request.public_key
        self.node_ids.setdefault(device_id, 1000 + len(self.node_ids))
        return fleet_pb2.RegisterResponse(device_id=device_id, node_id=self.node_ids[device_id], created=True)

    def Connect(self, request_iterator, context) -> Iterator[fleet_pb2.CoordinatorFrame]:
        nonce = new_nonce()
        yield fleet_pb2.CoordinatorFrame(challenge=fleet_pb2.Challenge(nonce=nonce))
        first = next(request_iterator)
        hello = first.hello
        key = self.keys.get(hello.device_id)
        known = key is not None and verify(key, hello.signature, connect_message(nonce, hello.device_id))
        if first.WhichOneof("kind") != "hello" or not known or not self.accept_connect:
            with self._changed:
                self.refused.append(hello)
                self._changed.notify_all()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown device or not signed by its key")
        if not self.send_welcome:  # a coordinator that hangs before answering
            with self._changed:
                self.silent.append(hello)
                self._changed.notify_all()
            while context.is_active():
                time.sleep(0.02)
            return
        conn = Connection(hello, self.node_ids[hello.device_id])

        def read() -> None:
            try:
                for frame in request_iterator:
                    conn.received(frame)
            except grpc.RpcError:
                pass
            finally:
                conn.ended.set()

        threading.Thread(target=read, daemon=True).start()
        yield fleet_pb2.CoordinatorFrame(
            welcome=fleet_pb2.Welcome(
                node_id=conn.node_id,
                heartbeat_interval_s=self.heartbeat_interval_s,
                max_message_bytes=self.max_message_bytes,
            )
        )
        with self._changed:
            self.connections.append(conn)
            self._changed.notify_all()
        while context.is_active():
            try:
                frame = conn.outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if frame is None:
                return
            yield frame
            if frame.WhichOneof("kind") == "shutdown":
                return

    # -- test controls ---------------------------------------------------------
    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        fleet_pb2_grpc.add_FleetServicer_to_server(self, server)
        address = f"127.0.0.1:{self.port}"
        self.port = (
            server.add_secure_port(address, self.tls) if self.tls else server.add_insecure_port(address)
        )
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_connections(self, count: int, timeout: float = WAIT_S) -> Connection:
        """The `count`-th accepted stream (1-based), once it exists."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.connections) >= count, timeout):
                raise AssertionError(f"{len(self.connections)} connection(s), wanted {count}, in {timeout}s")
            return self.connections[count - 1]

    def wait_until(self, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
        with self._changed:
            assert self._changed.wait_for(condition, timeout), "condition not reached in time"
