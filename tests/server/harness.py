"""Test harness: a real coordinator on 127.0.0.1 in this process, and scriptable fake agents.

The coordinator runs on its own asyncio loop in a background thread (as in the
daemon), so tests drive FleetGrid from the test thread exactly as the job
runner does. The registry is plugged in as `tinyfleet server start` plugs it, so
registrations are judged by the registry's rules (TD 1.1, scope, SHACL, the
fleet's requirements); its store is in memory (opening and closing an on-disk one
took ~0.4 s a coordinator), and a restarted coordinator's registry catches up
from SQL, the system of record, as after any crash.

Fake agents speak the Fleet protocol with the generated gRPC stubs (a device key,
signed Register, Hello signed over the stream's challenge) and let a test decide
what each task gets back (a real answer, NaN, garbage, silence, a dropped stream).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from flwr.app import Message

from tinyfleet.client.handlers import default_handlers
from tinyfleet.common.device_description import device_thing_description
from tinyfleet.common.device_keys import DeviceKey, next_sequence
from tinyfleet.common.flower_adapter import (
    make_context,
    message_from_bytes,
    message_to_bytes,
    set_message_id,
)
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.server.artifacts import ArtifactStore
from tinyfleet.server.auth import hash_enrollment_token, new_enrollment_id, new_enrollment_token
from tinyfleet.server.daemon import Coordinator, Hooks, ServerSettings
from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry

TD = "application/td+json"


def thing(device_id: str) -> bytes:
    """The description of a fleet device (what an agent registers with)."""
    return json.dumps(device_thing_description(device_id, ram_kb=4096, flash_kb=65536)).encode()


def signed_register(
    description: bytes, key: DeviceKey, sequence: int = 1, enroll_token: str = "", media_type: str = TD
) -> fleet_pb2.RegisterRequest:
    """A Register as an agent sends it: `description` signed by `key` with its sequence number."""
    return fleet_pb2.RegisterRequest(
        description=description, media_type=media_type, public_key=key.public_key, sequence=sequence,
        signature=key.sign_register(description, media_type, sequence, enroll_token),
        enrollment_token=enroll_token,
    )


class CoordinatorThread:
    """`Coordinator` started on a private event loop thread; `stop()` is its graceful stop.
    Without `hooks`, the registry's; `Hooks()` is the bare coordinator."""

    def __init__(self, settings: ServerSettings, hooks: Hooks | None = None) -> None:
        if hooks is None:
            blobs = ArtifactStore(settings.data_dir / "artifacts")
            registry = Registry(EmbeddedStore(None))
            hooks = CoordinatorRegistry(registry, admin_token=settings.admin_token, blobs=blobs).hooks()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.coordinator = Coordinator(settings, hooks)
        try:
            self._call(self.coordinator.start())
        except BaseException:
            self._release()
            raise
        self._enroll_token = ""

    def _call(self, coro: object, timeout: float = 30.0) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        return self.coordinator.listen_address

    def enroll(self, uses: int = 1, ttl_s: float = 3600.0, label: str = "test") -> str:
        """A new enrollment token, stored as the Admin service stores it."""
        token = new_enrollment_token()
        self.coordinator.repo.create_enrollment(
            new_enrollment_id(), hash_enrollment_token(token), label=label, uses=uses, ttl_s=ttl_s
        )
        return token

    @property
    def enroll_token(self) -> str:
        """One token with plenty of uses, for tests that are not about enrollment."""
        if not self._enroll_token:
            self._enroll_token = self.enroll(uses=10_000)
        return self._enroll_token

    def agent(self, device_id: str, **kwargs: object) -> FakeAgent:
        """A FakeAgent on this coordinator that enrolls with `enroll_token`."""
        return FakeAgent(self.address, device_id, enroll_token=self.enroll_token, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        try:
            self._call(self.coordinator.stop())
            self._call(_cancel_leftover_tasks())
        finally:
            self._release()

    def _release(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _cancel_leftover_tasks() -> None:
    """What asyncio.run does for the real daemon: finish cancelled stream handlers."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


Behaviour = Callable[["FakeAgent", fleet_pb2.Task, Message], fleet_pb2.AgentFrame | None]


def answer(agent: FakeAgent, task: fleet_pb2.Task, message: Message) -> fleet_pb2.AgentFrame:
    """What a real agent does: run the built-in handlers on its data stream."""
    reply = agent.handlers.handle(message, agent.context)
    return reply_frame(task, message_to_bytes(reply))


def reply_frame(task: fleet_pb2.Task, data: bytes, compute_s: float = 0.01) -> fleet_pb2.AgentFrame:
    return fleet_pb2.AgentFrame(
        reply=fleet_pb2.Reply(message_id=task.message_id, flower_message=data,
                              compute_seconds=compute_s)
    )


HelloFor = Callable[[bytes], fleet_pb2.Hello]


class FakeAgent:
    """One device: registers, connects, answers tasks through `behaviour`."""

    def __init__(
        self,
        address: str,
        device_id: str,
        *,
        data: str = "sine:seed=1",
        behaviour: Behaviour = answer,
        channel_credentials: grpc.ChannelCredentials | None = None,
        enroll_token: str = "",
        key: DeviceKey | None = None,
        answers_pings: bool = False,
    ) -> None:
        self.device_id = device_id
        self.answers_pings = answers_pings
        self.behaviour = behaviour
        self.data = data
        self.enroll_token = enroll_token
        self.key = key or DeviceKey.generate()
        self.sequence = 0
        if channel_credentials is None:
            self.channel = grpc.insecure_channel(address)
        else:
            self.channel = grpc.secure_channel(address, channel_credentials)
        self.stub = fleet_pb2_grpc.FleetStub(self.channel)
        self.handlers = default_handlers()
        self.node_id = 0
        self.hello: fleet_pb2.Hello | None = None
        self.tasks: list[fleet_pb2.Task] = []
        self.frames: list[fleet_pb2.CoordinatorFrame] = []
        self.welcomed = threading.Event()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        self._outgoing: queue.Queue[fleet_pb2.AgentFrame | None] = queue.Queue()
        self._call: grpc.Future | None = None

    def register_request(
        self, description: bytes | None = None, *, enroll_token: str | None = None
    ) -> fleet_pb2.RegisterRequest:
        """The Register a real agent sends: signed by the key, with the next sequence number."""
        self.sequence = next_sequence(self.sequence, time.time())
        return signed_register(description or thing(self.device_id), self.key, self.sequence,
                               self.enroll_token if enroll_token is None else enroll_token)

    def register(
        self,
        description: bytes | None = None,
        *,
        enroll_token: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> fleet_pb2.RegisterResponse:
        request = self.register_request(description, enroll_token=enroll_token)
        response = self.stub.Register(request, metadata=metadata, timeout=10)
        self.node_id = response.node_id
        self.context = make_context(self.node_id, {"data": self.data})
        return response

    def signed_hello(self, nonce: bytes, device_id: str | None = None) -> fleet_pb2.Hello:
        device_id = device_id or self.device_id
        return fleet_pb2.Hello(device_id=device_id, signature=self.key.sign_connect(nonce, device_id))

    def connect(self, *, hello: HelloFor | None = None, wait: bool = True) -> FakeAgent:
        """Open the stream; `hello(nonce)` makes the Hello (default: signed by this agent's key)."""
        self._hello_for = hello or self.signed_hello
        self._call = self.stub.Connect(iter(self._outgoing.get, None))
        threading.Thread(target=self._read, daemon=True).start()
        if wait:
            assert self.welcomed.wait(10), f"no welcome for {self.device_id}: {self.error}"
        return self

    def _read(self) -> None:
        try:
            for frame in self._call:  # type: ignore[union-attr]
                self.frames.append(frame)
                kind = frame.WhichOneof("kind")
                if kind == "challenge":
                    self.hello = self._hello_for(frame.challenge.nonce)
                    self.send(fleet_pb2.AgentFrame(hello=self.hello))
                elif kind == "welcome":
                    self.welcomed.set()
                elif kind == "ping" and self.answers_pings:  # as a real agent does, at once
                    self.send(fleet_pb2.AgentFrame(pong=fleet_pb2.Pong(nonce=frame.ping.nonce)))
                elif kind == "task":
                    self.tasks.append(frame.task)
                    message = message_from_bytes(frame.task.flower_message)
                    set_message_id(message, frame.task.message_id)
                    out = self.behaviour(self, frame.task, message)
                    if out is not None:
                        self.send(out)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def send(self, frame: fleet_pb2.AgentFrame) -> None:
        self._outgoing.put(frame)

    def close(self) -> None:
        """Drop the stream (like a process dying): the coordinator sees it end."""
        self._outgoing.put(None)
        if self._call is not None:
            self._call.cancel()
        self.ended.wait(5)
        self.channel.close()


def settings_for(data_dir: Path, **overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "data_dir": data_dir, "listen": "127.0.0.1:0", "http": None, "heartbeat_interval_s": 2.0,
    }
    values.update(overrides)
    return ServerSettings(**values)  # type: ignore[arg-type]


def throwaway_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tinyfleet test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return paths
