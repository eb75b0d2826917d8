"""The Admin gRPC service operators use: submit, inspect and watch jobs; list and revoke
devices; issue, list and revoke enrollment tokens.

Every call needs the admin token (`authorization: Bearer T`; auth.is_admin_token, the rule
every admin door shares) unless the coordinator runs without one (`--no-admin-token`).
A wrong or missing token counts against the caller's failed-auth limit. Job files are
validated here too (not only by the CLI): a bad one is refused with INVALID_ARGUMENT and
the JobSpecError text naming the field, and nothing is stored. WatchJob is a server stream
driven by JobEvents, no polling. Revocation lives here because only the daemon holds the device's stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from tinyfleet.common.jobspec import JobSpecError, parse_job_spec
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.server.auth import (
    FailedAuthLimiter,
    admin_guesses,
    bearer_token,
    hash_enrollment_token,
    is_admin_token,
    new_enrollment_id,
    new_enrollment_token,
    peer_host,
)
from tinyfleet.server.connections import ConnectionHub, Session
from tinyfleet.server.fleet_service import no_internal_errors, refuse_auth, refuse_if_blocked
from tinyfleet.server.job_events import JobEvents
from tinyfleet.server.job_json import RoundsFollower, job_info
from tinyfleet.server.job_runner import Eligibility
from tinyfleet.server.job_strategy import build_strategy
from tinyfleet.server.repository import TERMINAL_STATES, Device, Enrollment, Repository

log = logging.getLogger(__name__)

MAX_JOB_ID = 2**31 - 1
#: Bounds on what one enrollment token may do.
MAX_ENROLLMENT_USES = 1_000_000
MAX_ENROLLMENT_TTL_S = 366 * 24 * 3600.0
MAX_LABEL_CHARS = 200


def enrollment_info(enrollment: Enrollment) -> fleet_pb2.EnrollmentInfo:
    return fleet_pb2.EnrollmentInfo(
        enrollment_id=enrollment.id,
        label=enrollment.label,
        uses_total=enrollment.uses_total,
        uses_left=enrollment.uses_left,
        created_at=enrollment.created_at,
        expires_at=enrollment.expires_at,
        revoked=enrollment.revoked_at is not None,
    )


def admin_device_info(device: Device, session: Session | None) -> fleet_pb2.DeviceInfo:
    """The device as stored, with what its open stream (`session`, None when offline) tells."""
    trips = [trip.seconds for trip in session.round_trips] if session is not None else []
    return fleet_pb2.DeviceInfo(
        device_id=device.device_id,
        node_id=device.node_id,
        online=session is not None,
        last_seen=device.last_seen or 0.0,
        registered_at=device.registered_at,
        revoked=device.revoked_at is not None,
        revoked_reason=device.revoked_reason,
        agent_version=device.agent_version,
        rtt_ms=trips[-1] * 1000 if trips else 0.0,
        rtt_max_ms=max(trips) * 1000 if trips else 0.0,
        handlers=sorted(session.handlers) if session is not None else [],
    )


class AdminService(fleet_pb2_grpc.AdminServicer):
    def __init__(
        self,
        repo: Repository,
        hub: ConnectionHub,
        events: JobEvents,
        *,
        admin_token: str | None,
        on_submit: Callable[[], None],
        eligibility: Eligibility | None,
        auth_failures: FailedAuthLimiter | None = None,
    ) -> None:
        self.repo = repo
        self.hub = hub
        self.events = events
        self.admin_token = admin_token
        self.on_submit = on_submit
        self.eligibility = eligibility
        self.auth_failures = auth_failures or FailedAuthLimiter()

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        peer = admin_guesses(peer_host(context.peer()))
        token = bearer_token(context.invocation_metadata())
        if token:  # a guess: none past the limit
            await refuse_if_blocked(self.auth_failures, context, peer)
        if not is_admin_token(token, self.admin_token):
            await refuse_auth(
                self.auth_failures, context, peer, grpc.StatusCode.UNAUTHENTICATED,
                "admin token required (metadata `authorization: Bearer <token>`; the coordinator "
                "wrote a generated one to DATA_DIR/admin-token)" if not token else "wrong admin token",
                presented=bool(token),
            )

    async def _follower(self, context: grpc.aio.ServicerContext, job_id: str) -> RoundsFollower:
        try:
            number = int(job_id)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"job id must be a number: {job_id!r}")
            raise  # abort raises; this keeps type checkers informed
        if not 0 < number <= MAX_JOB_ID:  # job ids are SQL integers: a larger one names no job
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id}")
        return RoundsFollower(number)

    async def _job_info(
        self, context: grpc.aio.ServicerContext, follower: RoundsFollower
    ) -> fleet_pb2.JobInfo:
        info = await asyncio.to_thread(follower.job_info, self.repo)
        if info is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {follower.job_id}")
        return info

    @no_internal_errors
    async def SubmitJob(
        self, request: fleet_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.JobInfo:
        await self._authorize(context)
        try:
            spec = parse_job_spec(request.spec_toml)
            build_strategy(spec)
            if spec.round.eligible and self.eligibility is None:
                raise JobSpecError(
                    "round.eligible",
                    "this coordinator has no registry to evaluate eligibility queries; "
                    "remove the field or start the coordinator with a registry",
                )
            if spec.round.eligible and self.eligibility is not None:
                self.eligibility(spec)  # a bad query is refused now, not when the job starts
        except JobSpecError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        job = await asyncio.to_thread(
            self.repo.create_job, spec.name, spec.strategy, request.spec_toml, spec.rounds
        )
        log.info("job %d (%s) queued", job.id, spec.name)
        self.on_submit()
        return job_info(job, [])

    @no_internal_errors
    async def GetJob(
        self, request: fleet_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.JobInfo:
        await self._authorize(context)
        return await self._job_info(context, await self._follower(context, request.job_id))

    @no_internal_errors
    async def ListJobs(
        self, request: fleet_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListJobsResponse:
        await self._authorize(context)
        jobs = await asyncio.to_thread(self.repo.list_jobs)
        return fleet_pb2.ListJobsResponse(jobs=[job_info(j, []) for j in jobs])

    @no_internal_errors
    async def WatchJob(
        self, request: fleet_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb2.JobInfo]:
        await self._authorize(context)
        queue = self.events.subscribe()
        try:
            follower = await self._follower(context, request.job_id)
            info = await self._job_info(context, follower)
            yield info
            while info.state not in TERMINAL_STATES:
                while True:  # skip events of other jobs
                    changed = await queue.get()
                    if changed is None or str(changed) == info.job_id:
                        break
                if changed is None:  # coordinator stopping
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator is stopping")
                latest = await self._job_info(context, follower)
                if latest != info:
                    info = latest
                    yield info
        finally:
            self.events.unsubscribe(queue)

    @no_internal_errors
    async def ListDevices(
        self, request: fleet_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListDevicesResponse:
        await self._authorize(context)
        devices = await asyncio.to_thread(self.repo.list_devices)
        return fleet_pb2.ListDevicesResponse(
            devices=[admin_device_info(d, self.hub.session(d.node_id)) for d in devices]
        )

    @no_internal_errors
    async def RevokeDevice(
        self, request: fleet_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.DeviceInfo:
        await self._authorize(context)
        reason = request.reason.strip() or "revoked by the operator"
        device = await asyncio.to_thread(self.repo.revoke_device, request.device_id, reason)
        if device is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no device {request.device_id!r}")
        closed = self.hub.revoke(device.device_id, reason)
        log.warning("device %s revoked (%s)%s", device.device_id, reason,
                    "; its stream was closed" if closed else "")
        return admin_device_info(device, None)

    @no_internal_errors
    async def CreateEnrollment(
        self, request: fleet_pb2.CreateEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.CreateEnrollmentResponse:
        await self._authorize(context)
        if not 1 <= request.uses <= MAX_ENROLLMENT_USES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"uses must be between 1 and {MAX_ENROLLMENT_USES}, got {request.uses}")
        if not 0 < request.ttl_s <= MAX_ENROLLMENT_TTL_S:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"ttl must be positive and at most 366 days, got {request.ttl_s:g} s")
        if len(request.label) > MAX_LABEL_CHARS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"label is longer than {MAX_LABEL_CHARS} characters")
        token = new_enrollment_token()
        enrollment = await asyncio.to_thread(
            self.repo.create_enrollment, new_enrollment_id(), hash_enrollment_token(token),
            label=request.label, uses=request.uses, ttl_s=request.ttl_s,
        )
        log.info("enrollment %s (%r) issued: %d uses, %g s", enrollment.id, enrollment.label,
                 enrollment.uses_total, request.ttl_s)
        return fleet_pb2.CreateEnrollmentResponse(token=token, enrollment=enrollment_info(enrollment))

    @no_internal_errors
    async def ListEnrollments(
        self, request: fleet_pb2.ListEnrollmentsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListEnrollmentsResponse:
        await self._authorize(context)
        enrollments = await asyncio.to_thread(self.repo.list_enrollments)
        return fleet_pb2.ListEnrollmentsResponse(enrollments=[enrollment_info(e) for e in enrollments])

    @no_internal_errors
    async def RevokeEnrollment(
        self, request: fleet_pb2.RevokeEnrollmentRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.EnrollmentInfo:
        await self._authorize(context)
        enrollment = await asyncio.to_thread(self.repo.revoke_enrollment, request.enrollment_id)
        if enrollment is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no enrollment {request.enrollment_id!r}")
        log.info("enrollment %s revoked", enrollment.id)
        return enrollment_info(enrollment)
