"""The Admin gRPC service operators use: submit, inspect and watch jobs; list devices.

Every call needs the admin token when one is configured (`authorization: Bearer T`).
Job files are validated here too (not only by the CLI): a bad one is refused
with INVALID_ARGUMENT and the JobSpecError text naming the field, and nothing
is stored. WatchJob is a server stream driven by JobEvents, no polling.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from tinyfleet.common.jobspec import JobSpecError, parse_job_spec
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.server.auth import bearer_token, token_matches
from tinyfleet.server.connections import ConnectionHub
from tinyfleet.server.job_events import JobEvents
from tinyfleet.server.job_runner import Eligibility
from tinyfleet.server.job_strategy import build_strategy
from tinyfleet.server.job_views import RoundsFollower, device_info, job_info
from tinyfleet.server.repository import TERMINAL_STATES, Repository

log = logging.getLogger(__name__)


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
    ) -> None:
        self.repo = repo
        self.hub = hub
        self.events = events
        self.admin_token = admin_token
        self.on_submit = on_submit
        self.eligibility = eligibility

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not token_matches(bearer_token(context.invocation_metadata()), self.admin_token):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "admin token required (metadata `authorization: Bearer <token>`)",
            )

    async def _follower(self, context: grpc.aio.ServicerContext, job_id: str) -> RoundsFollower:
        try:
            return RoundsFollower(int(job_id))
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"job id must be a number: {job_id!r}")
            raise  # abort raises; this keeps type checkers informed

    async def _job_info(
        self, context: grpc.aio.ServicerContext, follower: RoundsFollower
    ) -> fleet_pb2.JobInfo:
        info = await asyncio.to_thread(follower.job_info, self.repo)
        if info is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {follower.job_id}")
        return info

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

    async def GetJob(
        self, request: fleet_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.JobInfo:
        await self._authorize(context)
        return await self._job_info(context, await self._follower(context, request.job_id))

    async def ListJobs(
        self, request: fleet_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListJobsResponse:
        await self._authorize(context)
        jobs = await asyncio.to_thread(self.repo.list_jobs)
        return fleet_pb2.ListJobsResponse(jobs=[job_info(j, []) for j in jobs])

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

    async def ListDevices(
        self, request: fleet_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb2.ListDevicesResponse:
        await self._authorize(context)
        devices = await asyncio.to_thread(self.repo.list_devices)
        online = self.hub.online_nodes()
        return fleet_pb2.ListDevicesResponse(
            devices=[device_info(d, d.node_id in online) for d in devices]
        )
