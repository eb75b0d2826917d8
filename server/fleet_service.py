"""The Fleet gRPC service agents talk to: Register, Connect (long-lived stream), GetArtifact.

Runs on the coordinator's asyncio loop (grpc.aio); blocking SQL goes through
`asyncio.to_thread`. Concurrent Register calls are validated as a group (each
description judged on its own) and then group-committed (server/group_runner.py): they
share one SQL transaction, each with its device row and outbox row and its own answer.
Bad input is answered with a status naming the problem and never takes the
stream or the coordinator down: malformed descriptions
(INVALID_ARGUMENT, nothing stored), refused registrations (PERMISSION_DENIED:
no usable enrollment token, another device's key, revoked, replayed), a bad
signature or proof (UNAUTHENTICATED), unknown frame kinds (logged, ignored). A failure
while reading a stream (none is foreseen: a broken stream reads as its end) is logged at
WARNING with its traceback and ends that stream alone; a listener that fails on a reply
(ConnectionHub contains it) ends nothing. Every open stream gets a Ping each heartbeat
interval; the Pongs give its round trip (`server devices`). Replies (up to
max_message_bytes) are decoded and checked in worker threads, never on the loop, so a
large one does not hold up the other streams (simulations/benchmarks/decode_stall.py;
benchmarks/results/decode_stall.json).
Every failed authentication counts against its peer (FailedAuthLimiter): past
the limit the peer gets RESOURCE_EXHAUSTED until its window passes. Errors the
code did not foresee are logged and answered INTERNAL without their details.

Devices authenticate with their Ed25519 keys (tinyfleet.common.device_keys):
Register is signed over the request, Connect proves the key by signing a nonce
drawn for that stream (the Challenge frame comes first), GetArtifact carries a
signed request in its metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
import sqlalchemy as sa

from tinyfleet.common.device_keys import (
    SignedRequest,
    connect_message,
    new_nonce,
    register_message,
    verify,
)
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.server.artifacts import ArtifactNotFoundError, ArtifactStore
from tinyfleet.server.auth import (
    FailedAuthLimiter,
    ReplayGuard,
    admin_guesses,
    bearer_token,
    check_signed_request,
    hash_enrollment_token,
    is_admin_token,
    new_node_id,
    peer_host,
    too_many_failures,
)
from tinyfleet.server.connections import ConnectionHub, Session
from tinyfleet.server.descriptions import (
    DEFAULT_LIMITS,
    DescribeDevices,
    DescriptionError,
    DescriptionLimits,
    ValidationUnavailable,
    refusal_details,
    unprocessable,
)
from tinyfleet.server.group_runner import GroupRunner
from tinyfleet.server.repository import (
    DeviceRegistration,
    Registered,
    RegistrationConflict,
    RegistrationRefused,
    Repository,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 30.0
#: How long an enrollment token the admission pre-check passed is let through without asking again.
USABLE_TOKEN_MEMORY_S = 1.0
DEFAULT_CHUNK = 256 * 1024
#: A stream that sends nothing (no heartbeat) for this many heartbeat intervals is closed.
MISSED_HEARTBEATS = 3
#: Register sequence numbers are kept in a signed 64-bit SQL column.
MAX_SEQUENCE = 2**63 - 1
#: Bounds on what a Hello may declare (the version is kept in a 64-character SQL column).
MAX_AGENT_VERSION_CHARS = 64
MAX_HANDLERS = 256
MAX_HANDLER_CHARS = 128
#: Replies decoded and checked at once, off the loop (each may be max_message_bytes: this bounds
#: the memory they take together, and leaves threads for SQL).
REPLY_CHECK_THREADS = 2

Handler = TypeVar("Handler", bound=Callable[..., Any])


def no_internal_errors(method: Handler) -> Handler:
    """Answer an exception the handler did not foresee with INTERNAL and a neutral message, and
    log it here: grpc's default (UNKNOWN, "Unexpected <class ...>: ...") hands clients the
    exception's class and text, which may hold SQL or paths."""
    name = method.__name__

    async def fail(context: grpc.aio.ServicerContext) -> None:
        log.exception("%s failed", name)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error in {name}; the coordinator's log has the details"
        )

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception:
                await fail(context)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await fail(context)

    return unary  # type: ignore[return-value]


async def refuse_if_blocked(
    limiter: FailedAuthLimiter, context: grpc.aio.ServicerContext, peer: str
) -> None:
    """RESOURCE_EXHAUSTED for a peer past its failed-auth limit. Called before an admin token is
    compared (the operator may have chosen a weak one: no guessing past the limit); device keys
    and enrollment tokens cannot be guessed, so those are checked even for a blocked peer."""
    wait_s = limiter.retry_after(peer)
    if wait_s > 0:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, too_many_failures(peer, wait_s),
            trailing_metadata=(("retry-after", f"{max(wait_s, 1):.0f}"),),
        )


async def refuse_auth(
    limiter: FailedAuthLimiter,
    context: grpc.aio.ServicerContext,
    peer: str,
    code: grpc.StatusCode,
    message: str,
    *,
    presented: bool = True,
) -> NoReturn:
    """Abort a failed authentication with `message`. One that presented a credential counts
    against `peer`, and once the peer is past its limit its failures are answered
    RESOURCE_EXHAUSTED instead; a call that presented none guessed nothing and is not counted."""
    if presented:
        blocked = limiter.retry_after(peer) > 0
        limiter.failed(peer)
        if blocked:
            await refuse_if_blocked(limiter, context, peer)
    log.warning("authentication refused for %s: %s", peer, message)
    await context.abort(code, message)


def hello_problem(hello: fleet_pb2.Hello) -> str:
    """What is wrong with a (verified) Hello's declarations, or ''."""
    if len(hello.agent_version) > MAX_AGENT_VERSION_CHARS:
        return (f"hello agent_version is {len(hello.agent_version)} characters; "
                f"at most {MAX_AGENT_VERSION_CHARS}")
    if len(hello.handlers) > MAX_HANDLERS:
        return f"hello names {len(hello.handlers)} handlers; at most {MAX_HANDLERS}"
    for message_type in hello.handlers:
        if not 0 < len(message_type) <= MAX_HANDLER_CHARS:
            return (f"hello handler {message_type[:MAX_HANDLER_CHARS]!r} must have 1 to "
                    f"{MAX_HANDLER_CHARS} characters")
    return ""


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
        open_enrollment: bool = False,
        auth_failures: FailedAuthLimiter | None = None,
        limits: DescriptionLimits = DEFAULT_LIMITS,
    ) -> None:
        if not heartbeat_interval_s > 0:  # 0 would close every stream at once and ping without pause
            raise ValueError(f"the heartbeat interval must be positive, got {heartbeat_interval_s:g} s")
        self.repo = repo
        self.hub = hub
        self.store = store
        self.admin_token = admin_token
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_message_bytes = max_message_bytes
        #: Lab setting: new devices join without an enrollment token.
        self.open_enrollment = open_enrollment
        self.auth_failures = auth_failures or FailedAuthLimiter()
        #: The description bounds `describe` applies (one object: the coordinator's registry's).
        self.limits = limits
        self._replays = ReplayGuard()
        self._liveness_locks: dict[str, asyncio.Lock] = {}
        # Concurrent Register calls are validated together (each judged on its own), then
        # committed together: one SHACL run and one SQL transaction for a group.
        # What one description raises fails it alone (isolate_failures). Large descriptions (SHACL
        # takes up to about a second) are validated one at a time in a lane of their own, so they
        # never hold up a group of small ones.
        self._validations: GroupRunner[tuple[bytes, str], tuple[str, bytes]] = GroupRunner(
            describe, max_group=64, name="register-validate", isolate_failures=True
        )
        self._large_validations: GroupRunner[tuple[bytes, str], tuple[str, bytes]] = GroupRunner(
            describe, max_group=1, name="register-validate-large", isolate_failures=True
        )
        self._registrations: GroupRunner[DeviceRegistration, Registered] = GroupRunner(
            repo.register_devices, name="register-commit"
        )
        # Who may join at all, asked for concurrent callers together (two lookups a group).
        self._prechecks: GroupRunner[tuple[bytes, str], tuple[str | None, int]] = GroupRunner(
            repo.admission_prechecks, name="register-precheck"
        )
        #: Enrollment token hash -> (until when, uses) it passes the pre-check without asking again.
        self._usable_tokens: dict[str, tuple[float, int]] = {}
        # Decoding a reply and checking its arrays takes up to a few hundred ms for 64 MiB: on the
        # loop, every other stream (pings, heartbeats, Register) would wait that long.
        self._reply_checks = ThreadPoolExecutor(REPLY_CHECK_THREADS, thread_name_prefix="reply-check")

    async def _admin(self, context: grpc.aio.ServicerContext, peer: str) -> bool:
        """True when the caller claims an admin registration by sending a bearer token and
        auth.is_admin_token accepts it (any token without an admin token configured: the admin
        API is open then); a wrong one is a failed authentication. Sending no token is a
        device's own registration, which needs an enrollment token (or --open-enrollment)."""
        token = bearer_token(context.invocation_metadata())
        if not token:
            return False
        guesses = admin_guesses(peer)
        await refuse_if_blocked(self.auth_failures, context, guesses)
        if not is_admin_token(token, self.admin_token):
            await refuse_auth(self.auth_failures, context, guesses, grpc.StatusCode.UNAUTHENTICATED,
                              "wrong admin token")
        return True

    def _token_passes(self, enrollment_hash: str) -> bool:
        """Whether the pre-check passed this token within USABLE_TOKEN_MEMORY_S with uses to
        spare: a burst of agents enrolling with one multi-use token then costs one lookup, not one
        each (64 clients: 210-265 -> 434-477 registrations acked per second). Each pass takes one
        of the uses it last saw, so a token is never let through more often than it had uses;
        revoked or used up by others meanwhile, it lets through at most that moment's worth of
        registrations to validation, which the SQL admission then refuses."""
        if not enrollment_hash:
            return False
        now = time.monotonic()
        until, spare = self._usable_tokens.get(enrollment_hash, (0.0, 0))
        if until <= now or spare <= 0:
            self._usable_tokens.pop(enrollment_hash, None)
            if len(self._usable_tokens) > 1024:
                self._usable_tokens = {h: v for h, v in self._usable_tokens.items() if v[0] > now}
            return False
        self._usable_tokens[enrollment_hash] = (until, spare - 1)
        return True

    # -- Register ----------------------------------------------------------------
    @no_internal_errors
    async def Register(
        self, request: fleet_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.RegisterResponse:
        # Cheapest checks first: the size, the caller's signature, then whether it may join at all
        # (a SQL lookup), so neither an oversized body nor an unknown caller reaches validation.
        peer = peer_host(context.peer())
        description = bytes(request.description)
        too_big = self.limits.size_problem(len(description))
        if too_big:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid description: {too_big}")
        large = len(description) > self.limits.large_bytes
        admin = await self._admin(context, peer)
        public_key, signature = bytes(request.public_key), bytes(request.signature)
        signed_parts = (public_key, description, request.media_type, request.sequence,
                        request.enrollment_token)
        signed = (  # hashing a large description would hold up every other call on the loop
            await asyncio.to_thread(register_message, *signed_parts)
            if large else register_message(*signed_parts)
        )
        if request.sequence > MAX_SEQUENCE:  # stored in a signed 64-bit column
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"sequence must be at most {MAX_SEQUENCE}, got {request.sequence}")
        if not verify(public_key, signature, signed):
            await refuse_auth(
                self.auth_failures, context, peer, grpc.StatusCode.UNAUTHENTICATED,
                "Register needs the device's Ed25519 public key and its signature of the request "
                "(tinyfleet.common.device_keys.register_message); this one has none or it does not verify",
                presented=bool(signature),
            )
        token = request.enrollment_token
        enrollment_hash = hash_enrollment_token(token) if token else ""
        if not (admin or self.open_enrollment or self._token_passes(enrollment_hash)):
            # Not the authority (register_devices decides, in the transaction that enrolls), only a
            # gate: a caller with neither a known key nor a usable token gets no validation.
            refusal, uses_left = await self._prechecks.submit((public_key, enrollment_hash))
            if refusal is not None:  # a token that is no good counts; joining without one guesses nothing
                await refuse_auth(
                    self.auth_failures, context, peer, grpc.StatusCode.PERMISSION_DENIED, refusal,
                    presented=bool(token),
                )
            if uses_left > 1:  # this caller takes one; the rest may pass for a moment unasked
                until = time.monotonic() + USABLE_TOKEN_MEMORY_S
                self._usable_tokens[enrollment_hash] = (until, uses_left - 1)
        lane = self._large_validations if large else self._validations
        try:
            # Off the event loop: SHACL validation takes milliseconds per description.
            device_id, normalized = await lane.submit((description, request.media_type))
        except ValidationUnavailable as exc:  # stopping: no verdict on the description
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Exception as exc:  # this description's own failure (the lanes isolate items)
            # The registry's validator lists every problem as {path, message}: sent as JSON
            # in the trailing metadata entry "validation-errors".
            refused = exc if isinstance(exc, DescriptionError) else unprocessable(exc)
            message, trailer = refusal_details(refused)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message, trailing_metadata=trailer)
        try:
            outcome = await self._registrations.submit(DeviceRegistration(
                device_id=device_id, description=normalized, media_type=request.media_type,
                node_id=new_node_id(), public_key=public_key, sequence=request.sequence,
                enrollment_hash=enrollment_hash, admin=admin,
                open_enrollment=self.open_enrollment,
            ))
        except RegistrationRefused as exc:
            await refuse_auth(self.auth_failures, context, peer, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except RegistrationConflict as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except sa.exc.DataError:  # e.g. a value longer than its column (PostgreSQL)
            log.exception("the database refused the registration of %s", device_id)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the registration of {device_id!r} has a value the database cannot store "
                "(e.g. a media type longer than 64 characters)",
            )
        except sa.exc.SQLAlchemyError:
            log.exception("registration of %s not stored", device_id)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"could not store the registration of {device_id!r}; try again"
            )
        if outcome.reinstated:
            self.hub.reinstate(device_id)  # the operator re-keyed a revoked device: it may connect again
        if outcome.created:
            log.info("registered device %s as node %d", device_id, outcome.device.node_id)
        return fleet_pb2.RegisterResponse(
            device_id=device_id, node_id=outcome.device.node_id, created=outcome.created
        )

    def close(self) -> None:
        """Let the registration groups and reply checks in flight finish."""
        self._validations.close()
        self._large_validations.close()
        self._registrations.close()
        self._prechecks.close()
        self._reply_checks.shutdown()

    # -- Connect -----------------------------------------------------------------
    @no_internal_errors
    async def Connect(
        self, request_iterator: AsyncIterator[fleet_pb2.AgentFrame], context: grpc.aio.ServicerContext
    ) -> None:
        peer = peer_host(context.peer())
        nonce = new_nonce()
        await context.write(fleet_pb2.CoordinatorFrame(challenge=fleet_pb2.Challenge(nonce=nonce)))
        try:
            first = await asyncio.wait_for(context.read(), HELLO_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello frame received")
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            await refuse_auth(self.auth_failures, context, peer, grpc.StatusCode.UNAUTHENTICATED,
                              "the first frame must be hello, signed over the challenge", presented=False)
        hello = first.hello
        device = await asyncio.to_thread(self.repo.get_device, hello.device_id)
        if (
            device is None or device.public_key is None
            or not verify(device.public_key, hello.signature, connect_message(nonce, hello.device_id))
        ):
            await refuse_auth(
                self.auth_failures, context, peer, grpc.StatusCode.UNAUTHENTICATED,
                f"device {hello.device_id!r} is unknown, has no key, or its hello is not signed by "
                "that key over this stream's challenge",
            )
        # No await from here to attach: a revocation either came first (refused here) or
        # comes after and finds the session to close.
        revoked = self.hub.revoked(device.device_id)
        if revoked is None and device.revoked_at is not None:
            revoked = device.revoked_reason
        if revoked is not None:
            await refuse_auth(
                self.auth_failures, context, peer, grpc.StatusCode.PERMISSION_DENIED,
                f"device {device.device_id!r} was revoked" + (f": {revoked}" if revoked else ""),
            )
        problem = hello_problem(hello)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        loop = asyncio.get_running_loop()
        session = Session(device_id=device.device_id, node_id=device.node_id, loop=loop,
                          agent_version=hello.agent_version, handlers=frozenset(hello.handlers))
        replaced = self.hub.attach(session)
        if replaced is not None:
            replaced.close("replaced by a newer connection of the same device")
        await self._write_liveness(device.device_id, device.node_id, hello.agent_version)
        log.info("node %d (%s) connected, agent %s", device.node_id, device.device_id,
                 hello.agent_version or "of unnamed version")
        await context.write(fleet_pb2.CoordinatorFrame(welcome=fleet_pb2.Welcome(
            node_id=device.node_id,
            heartbeat_interval_s=self.heartbeat_interval_s,
            max_message_bytes=self.max_message_bytes,
            server_time=time.time(),
        )))
        reader = asyncio.create_task(self._read_frames(session, context))
        keepalive = asyncio.create_task(self._keepalive(session))
        try:
            while True:
                frame = await session.outgoing.get()
                if frame is None:
                    break
                await context.write(frame)
        finally:
            session.closed = True
            reader.cancel()
            keepalive.cancel()
            if self.hub.detach(session):
                log.info("node %d (%s) disconnected", device.node_id, device.device_id)
                await self._write_liveness(device.device_id, device.node_id)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, keepalive)

    async def _write_liveness(self, device_id: str, node_id: int, agent_version: str | None = None) -> None:
        """Write the hub's current view of a device to SQL, one write per device at a time,
        so a reconnect racing its old stream's end cannot leave the row saying offline."""
        lock = self._liveness_locks.setdefault(device_id, asyncio.Lock())
        async with lock:
            online = node_id in self.hub.online_nodes()
            await asyncio.to_thread(self.repo.set_online, device_id, online, agent_version)

    async def _keepalive(self, session: Session) -> None:
        """Ping the agent every heartbeat interval; each Pong gives the stream's round trip,
        counted from when the ping was due (a loop held up elsewhere sends it late: that counts)."""
        interval = self.heartbeat_interval_s
        due = time.monotonic() + interval
        while not session.closed:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            session.ping(due)
            due += interval
            now = time.monotonic()
            if due <= now:  # held up for over an interval: no burst of pings to catch up
                due = now + interval

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
                await self._dispatch(session, frame)
        except Exception as exc:  # nothing foreseen raises here (a stream that breaks reads EOF)
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("node %d (%s): reading its stream failed; the stream ends", session.node_id,
                        session.device_id, exc_info=True)
        finally:
            log.debug("node %d: reader ends: %s", session.node_id, reason)
            session.put(None)

    async def _dispatch(self, session: Session, frame: fleet_pb2.AgentFrame) -> None:
        kind = frame.WhichOneof("kind")
        self.hub.touch(session.device_id)
        if kind == "reply":  # awaited: this stream's next frame (its end, say) comes after its reply
            await asyncio.get_running_loop().run_in_executor(
                self._reply_checks, self.hub.deliver_reply, session.node_id, frame.reply
            )
        elif kind == "pong":
            session.pong(frame.pong.nonce)
        elif kind == "heartbeat":
            return
        elif kind == "hello":
            log.warning("node %d sent a second hello; ignored", session.node_id)
        else:
            log.warning("node %d sent an unknown frame kind; ignored", session.node_id)

    # -- GetArtifact ---------------------------------------------------------------
    @no_internal_errors
    async def GetArtifact(
        self, request: fleet_pb2.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.ArtifactChunk]:
        peer = peer_host(context.peer())
        metadata = context.invocation_metadata()
        presented = bool(bearer_token(metadata)) or SignedRequest.from_metadata(metadata) is not None
        if bearer_token(metadata):  # an admin token is a guess, counted apart
            peer = admin_guesses(peer)
            await refuse_if_blocked(self.auth_failures, context, peer)
        refusal = await self._download_refusal(metadata, request)
        if refusal is not None:
            await refuse_auth(self.auth_failures, context, peer, grpc.StatusCode.UNAUTHENTICATED, refusal,
                              presented=presented)
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

    async def _download_refusal(self, metadata: Any, request: fleet_pb2.GetArtifactRequest) -> str | None:
        """Why this download is refused, or None: the admin token, or a request the device signed
        (method "GetArtifact", target the sha256 as requested, no body)."""
        token = bearer_token(metadata)
        if token:
            return None if is_admin_token(token, self.admin_token) else "wrong admin token"
        signed = SignedRequest.from_metadata(metadata)
        if signed is None:
            return ("GetArtifact needs the admin token or a device-signed request "
                    "(metadata x-device-id, x-device-time, x-device-nonce, x-device-signature)")
        device = await asyncio.to_thread(self.repo.get_device, signed.device_id)

        def by_its_key(device_id: str, message: bytes, signature: bytes) -> bool:
            return (
                device is not None and device.public_key is not None and device.revoked_at is None
                and self.hub.revoked(device_id) is None and verify(device.public_key, signature, message)
            )

        return check_signed_request(signed, "GetArtifact", request.sha256, b"", by_its_key, self._replays)
