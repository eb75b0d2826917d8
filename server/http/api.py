"""The coordinator's HTTP JSON API (starlette), served by uvicorn on the daemon's loop.

GET /healthz, /api/jobs, /api/jobs/{id}, /api/devices. Other parts of the
coordinator (the registry's /sparql, /things) add theirs by passing extra
starlette routes or mounts to `build_app`.

/api/* follows the auth of its gRPC twins (Admin.ListJobs, GetJob, ListDevices):
the admin token as `Authorization: Bearer T` (auth.is_admin_token), failures counted
in the coordinator's one limiter, 401/429 as problem+json (http.auth) like the registry's.
/healthz stays open for probes; it reads only in-memory state (the registry's
outbox lag comes from a snapshot its projector keeps), so it answers at once
however busy the stores are.

Writes that plug-ins serve (the registry's /things, /registry/imports) report two
storage outcomes by raising, answered the same way for every route:
`InsufficientStorage` -> 507 problem+json (the disk is full and nothing was
stored), `StoredNotYetVisible` -> 202 (SQL, the system of record, kept the write;
the view that serves reads has not caught up yet and will by itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tinyfleet.server.auth import FailedAuthLimiter
from tinyfleet.server.connections import ConnectionHub
from tinyfleet.server.http.auth import problem, refuse_unless_admin
from tinyfleet.server.job_json import device_dict, job_dict
from tinyfleet.server.repository import Repository


class InsufficientStorage(Exception):
    """A write refused because the disk is full; nothing of it was stored (HTTP 507)."""


class StoredNotYetVisible(Exception):
    """A write SQL committed (durable) that reads will show only once a background step catches
    up, e.g. the registry projector while its store cannot write (HTTP 202)."""


async def _insufficient_storage(request: Request, exc: Exception) -> Response:
    return problem(507, "Insufficient Storage", str(exc))


async def _stored_not_yet_visible(request: Request, exc: Exception) -> Response:
    return JSONResponse({"status": 202, "title": "Accepted", "detail": str(exc)}, status_code=202)


def build_app(
    repo: Repository,
    hub: ConnectionHub,
    extra_routes: Sequence[BaseRoute] = (),
    *,
    admin_token: str | None = None,
    health: Callable[[], dict[str, Any]] | None = None,
    auth_failures: FailedAuthLimiter | None = None,
) -> Starlette:
    limiter = auth_failures or FailedAuthLimiter()

    def unauthorized(request: Request) -> JSONResponse | None:
        return refuse_unless_admin(request, admin_token, limiter, f"GET {request.url.path}")

    async def healthz(request: Request) -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "online_nodes": len(hub.online_nodes())}
        if health is not None:
            body.update(health())
        return JSONResponse(body)

    def jobs(request: Request) -> JSONResponse:
        if (refused := unauthorized(request)) is not None:
            return refused
        return JSONResponse([job_dict(j, []) for j in repo.list_jobs()])

    def job(request: Request) -> JSONResponse:
        if (refused := unauthorized(request)) is not None:
            return refused
        try:
            job_id = int(request.path_params["job_id"])
        except ValueError:
            return problem(400, "Bad job id", "job id must be a number")
        found = repo.get_job(job_id)
        if found is None:
            return problem(404, "Not found", f"no job {job_id}")
        return JSONResponse(job_dict(found, repo.get_rounds(job_id)))

    def devices(request: Request) -> JSONResponse:
        if (refused := unauthorized(request)) is not None:
            return refused
        online = hub.online_nodes()
        return JSONResponse([device_dict(d, d.node_id in online) for d in repo.list_devices()])

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job_id}", job),
        Route("/api/devices", devices),
        *extra_routes,
    ]
    return Starlette(routes=routes, exception_handlers={
        InsufficientStorage: _insufficient_storage,
        StoredNotYetVisible: _stored_not_yet_visible,
    })
