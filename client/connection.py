"""The agent's gRPC plumbing: channels to the coordinator and the Register call.

Each connection attempt gets a fresh channel so the agent's own backoff decides
when to retry (a reused channel in TRANSIENT_FAILURE would add gRPC's internal
reconnect backoff on top). Transport limits are generous on purpose: the
coordinator's `max_message_bytes` (sent in Welcome) is the limit that applies,
with a readable error, rather than gRPC's RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import grpc

from tinyfleet.client.descriptions import Description
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

TRANSPORT_LIMIT_BYTES: Final = 128 * 1024 * 1024
KEEPALIVE_MS: Final = 20_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000
REGISTER_TIMEOUT_S: Final = 30.0
CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", TRANSPORT_LIMIT_BYTES),
    ("grpc.max_receive_message_length", TRANSPORT_LIMIT_BYTES),
    # Detect a coordinator that vanished without closing the TCP connection
    # (power loss, NAT timeout) while the stream is otherwise idle.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]

#: Register failures that retrying cannot fix: the agent stops with exit code 2.
FATAL_REGISTER_CODES: Final = frozenset({
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
})


class ConfigError(ValueError):
    """Agent settings that cannot work (bad server address, unreadable CA file)."""


def check_address(server: str) -> str:
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--server {server!r}: expected HOST:PORT, e.g. 127.0.0.1:7000")
    return server


def read_ca(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"--ca {path}: cannot read: {exc.strerror}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"--ca {path}: not a PEM certificate (no BEGIN CERTIFICATE block)")
    return data


def open_channel(server: str, root_certificates: bytes | None = None) -> grpc.Channel:
    """Plain-text channel, or TLS verified against `root_certificates` (the --ca file)."""
    if root_certificates is None:
        return grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(server, credentials, options=CHANNEL_OPTIONS)


def register_request(
    description: Description, key: DeviceKey, sequence: int, enrollment_token: str = ""
) -> fleet_pb2.RegisterRequest:
    """A Register signed by the device key (see tinyfleet.common.device_keys for the message)."""
    return fleet_pb2.RegisterRequest(
        description=description.data,
        media_type=description.media_type,
        public_key=key.public_key,
        sequence=sequence,
        signature=key.sign_register(description.data, description.media_type, sequence, enrollment_token),
        enrollment_token=enrollment_token,
    )


def register(channel: grpc.Channel, request: fleet_pb2.RegisterRequest) -> fleet_pb2.RegisterResponse:
    """Register (or re-register: the same key needs no token) this device; raises grpc.RpcError."""
    stub = fleet_pb2_grpc.FleetStub(channel)
    return stub.Register(request, timeout=REGISTER_TIMEOUT_S, wait_for_ready=False)


def rpc_code(exc: grpc.RpcError) -> grpc.StatusCode:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    return code or grpc.StatusCode.UNKNOWN


def rpc_detail(exc: grpc.RpcError) -> str:
    details = exc.details() if isinstance(exc, grpc.Call) else None
    return details or "no details given"
