"""The Fleet gRPC service agents talk to: Register, Connect (long-lived stream), GetArtifact.

Runs on the coordinator's asyncio loop (grpc.aio); blocking SQL goes through
`asyncio.to_thread`. Concurrent Register calls are validated as a group (each
description judged on its own) and then group-committed (server/grouping.py): they
share one SQL transaction, each with its device row and outbox row and its own answer.
Bad input is answered with a status naming the problem and never takes the
stream or the coordinator down: malformed descriptions
(INVALID_ARGUMENT, nothing stored), wrong credentials (PERMISSION_DENIED on
Register, UNAUTHENTICATED on Connect), unknown frame kinds (logged, ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import sqlalchemy as sa

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.server.artifacts import ArtifactNotFoundError, ArtifactStore
from tinyfleet.server.auth import (
    bearer_token,
    hash_credential,
    metadata_value,
    new_credential,
    new_node_id,
    token_matches,
    verify_credential,
)
from tinyfleet.server.connections import ConnectionHub, Session
from tinyfleet.server.descriptions import DescribeDevices, DescriptionError
from tinyfleet.server.grouping import GroupRunner
from tinyfleet.server.repository import (
    DeviceRegistration,
    Registered,
    RegistrationConflict,
    RegistrationRefused,
    Repository,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 30.0
DEFAULT_CHUNK = 256 * 1024
#: A stream that sends nothing (no heartbeat) for this many heartbeat intervals is closed.
MISSED_HEARTBEATS = 3


class FleetService(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self,
        repo: Repository,
        hub: ConnectionHub,
        store: ArtifactStore,
        describe: DescribeDevices,
        *,
        admin_token: str | None,
        heartbeat_interval_s: float,
        max_message_bytes: int,
    ) -> None:
        self.repo = repo
        self.hub = hub
        self.store = store
        self.admin_token = admin_token
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_message_bytes = max_message_bytes
        self._liveness_locks: dict[str, asyncio.Lock] = {}
        # Concurrent Register calls are validated together (each judged on its own), then
        # committed together: one SHACL run and one SQL transaction for a group.
        self._validations: GroupRunner[tuple[bytes, str], tuple[str, bytes]] = GroupRunner(
            describe, max_group=64, name="register-validate"
        )
        self._registrations: GroupRunner[DeviceRegistration, Registered] = GroupRunner(
            repo.register_devices, name="register-commit"
        )

    # -- Register ----------------------------------------------------------------
    async def Register(
        self, request: fleet_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RegisterResponse:
        try:
            # Off the event loop: SHACL validation takes milliseconds per description.
            device_id, normalized = await self._validations.submit(
                (bytes(request.description), request.media_type)
            )
        except DescriptionError as exc:
            # The registry's validator lists every problem as {path, message}: sent as JSON
            # in the trailing metadata entry "validation-errors".
            errors = getattr(exc, "errors", None)
            trailer = (("validation-errors", json.dumps(errors)),) if errors else ()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"invalid description: {exc}", trailing_metadata=trailer
            )
        is_admin = bool(self.admin_token) and token_matches(
            bearer_token(context.invocation_metadata()), self.admin_token
        )
        credential, fresh = request.credential, new_credential()
        try:
            outcome = await self._registrations.submit(DeviceRegistration(
                device_id=device_id, description=normalized, media_type=request.media_type,
                node_id=new_node_id(), credential_hash=hash_credential(fresh),
                may_replace=lambda device: is_admin or verify_credential(credential, device.credential_hash),
            ))
        except RegistrationRefused as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except RegistrationConflict as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except sa.exc.DataError as exc:  # e.g. a value longer than its column (PostgreSQL)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the database refused the registration of {device_id!r}: {exc.orig}",
            )
        except sa.exc.SQLAlchemyError as exc:
            log.error("registration of %s not stored: %s", device_id, exc)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"could not store the registration of {device_id!r}; try again"
            )
        if not outcome.created:
            return fleet_pb2.RegisterResponse(
                device_id=device_id, node_id=outcome.device.node_id, created=False
            )
        log.info("registered device %s as node %d", device_id, outcome.device.node_id)
        return fleet_pb2.RegisterResponse(
            device_id=device_id, node_id=outcome.device.node_id, credential=fresh, created=True
        )

    def close(self) -> None:
        """Let the registration groups in flight finish."""
        self._validations.close()
        self._registrations.close()

    # -- Connect -----------------------------------------------------------------
    async def Connect(
        self, request_iterator: AsyncIterator[fleet_pb2.AgentFrame], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello frame received")
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the first frame must be hello")
        hello = first.hello
        device = await asyncio.to_thread(self.repo.get_device, hello.device_id)
        if device is None or not verify_credential(hello.credential, device.credential_hash):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"unknown device {hello.device_id!r} or wrong credential",
            )
        loop = asyncio.get_running_loop()
        session = Session(device_id=device.device_id, node_id=device.node_id, loop=loop)
        replaced = self.hub.attach(session)
        if replaced is not None:
            replaced.close("replaced by a newer connection of the same device")
        await self._write_liveness(device.device_id, device.node_id)
        log.info("node %d (%s) connected", device.node_id, device.device_id)
        await context.write(fleet_pb2.CoordinatorFrame(welcome=fleet_pb2.Welcome(
            node_id=device.node_id,
            heartbeat_interval_s=self.heartbeat_interval_s,
            max_message_bytes=self.max_message_bytes,
        )))
        reader = asyncio.create_task(self._read_frames(session, context))
        try:
            while True:
                frame = await session.outgoing.get()
                if frame is None:
                    break
                await context.write(frame)
        finally:
            session.closed = True
            reader.cancel()
            if self.hub.detach(session):
                log.info("node %d (%s) disconnected", device.node_id, device.device_id)
                await self._write_liveness(device.device_id, device.node_id)
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _write_liveness(self, device_id: str, node_id: int) -> None:
        """Write the hub's current view of a device to SQL, one write per device at a time,
        so a reconnect racing its old stream's end cannot leave the row saying offline."""
        lock = self._liveness_locks.setdefault(device_id, asyncio.Lock())
        async with lock:
            online = node_id in self.hub.online_nodes()
            await asyncio.to_thread(self.repo.set_online, device_id, online)

    async def _read_frames(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        """Dispatch agent frames until the stream ends or goes silent; then end the session."""
        idle_timeout = MISSED_HEARTBEATS * self.heartbeat_interval_s
        reason = "stream ended"
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(context.read(), idle_timeout)
                except TimeoutError:
                    reason = f"no frame for {idle_timeout:g} s (missed heartbeats)"
                    break
                if frame is grpc.aio.EOF:
                    break
                self._dispatch(session, frame)
        except Exception as exc:  # gRPC errors, frames over the transport limit: end this stream only
            reason = f"stream error: {exc}"
        finally:
            log.debug("node %d: reader ends: %s", session.node_id, reason)
            session.put(None)

    def _dispatch(self, session: Session, frame: fleet_pb2.AgentFrame) -> None:
        kind = frame.WhichOneof("kind")
        self.hub.touch(session.device_id)
        if kind == "reply":
            self.hub.deliver_reply(session.node_id, frame.reply)
        elif kind in ("heartbeat", "pong"):
            return
        elif kind == "hello":
            log.warning("node %d sent a second hello; ignored", session.node_id)
        else:
            log.warning("node %d sent an unknown frame kind; ignored", session.node_id)

    # -- GetArtifact ---------------------------------------------------------------
    async def GetArtifact(
        self, request: fleet_pb2.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.ArtifactChunk]:
        metadata = context.invocation_metadata()
        if not await self._may_download(metadata):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "GetArtifact needs x-device-id and x-credential metadata (or the admin token)",
            )
        sha = request.sha256.lower()
        try:
            total = await asyncio.to_thread(self.store.size, sha)
        except ArtifactNotFoundError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no artifact with sha256 {sha!r}")
        if request.offset > total:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end ({total})"
            )
        chunk = min(request.chunk_size or DEFAULT_CHUNK, self.max_message_bytes)
        offset = request.offset
        while offset < total:
            data = await asyncio.to_thread(self.store.read_range, sha, offset, chunk)
            yield fleet_pb2.ArtifactChunk(offset=offset, data=data, total_size=total, sha256=sha)
            offset += len(data)

    async def _may_download(self, metadata: Any) -> bool:
        token = bearer_token(metadata)
        if self.admin_token and token and token_matches(token, self.admin_token):
            return True
        device_id = metadata_value(metadata, "x-device-id")
        credential = metadata_value(metadata, "x-credential")
        if not device_id or not credential:
            return False
        device = await asyncio.to_thread(self.repo.get_device, device_id)
        return device is not None and verify_credential(credential, device.credential_hash)
