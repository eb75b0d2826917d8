"""The coordinator's HTTP JSON API (starlette), served by uvicorn on the daemon's loop.

GET /healthz, /api/jobs, /api/jobs/{id}, /api/devices. Other parts of the
coordinator (the registry's /sparql, /things) add theirs by passing extra
starlette routes or mounts to `build_app`.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from tinyfleet.server.connections import ConnectionHub
from tinyfleet.server.job_views import device_dict, job_dict
from tinyfleet.server.repository import Repository


def build_app(
    repo: Repository, hub: ConnectionHub, extra_routes: Sequence[BaseRoute] = ()
) -> Starlette:
    def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "online_nodes": len(hub.online_nodes())})

    def jobs(request: Request) -> JSONResponse:
        return JSONResponse([job_dict(j, []) for j in repo.list_jobs()])

    def job(request: Request) -> JSONResponse:
        try:
            job_id = int(request.path_params["job_id"])
        except ValueError:
            return JSONResponse({"error": "job id must be a number"}, status_code=400)
        found = repo.get_job(job_id)
        if found is None:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)
        return JSONResponse(job_dict(found, repo.get_rounds(job_id)))

    def devices(request: Request) -> JSONResponse:
        online = hub.online_nodes()
        return JSONResponse([device_dict(d, d.node_id in online) for d in repo.list_devices()])

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{job_id}", job),
        Route("/api/devices", devices),
        *extra_routes,
    ]
    return Starlette(routes=routes)
