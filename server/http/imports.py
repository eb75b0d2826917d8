"""`POST /registry/imports`: import a published Turtle file through a running daemon.

The daemon keeps the file in SQL (the system of record) and projects it, exactly
as `tinyfleet registry import --data-dir` does on a stopped one, so a later
`registry rebuild` keeps it. Admin token only. The answer is the repair report
as JSON; a file that fails validation is refused with RFC 7807
`validationErrors` and nothing is written.

    curl -X POST 'http://127.0.0.1:7080/registry/imports?name=boards.ttl&base=https://example.org/' \\
         -H 'authorization: Bearer TOKEN' -H 'content-type: text/turtle' --data-binary @boards.ttl
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinyfleet.server.http.auth import problem
from tinyfleet.server.http.registry_access import Access
from tinyfleet.server.registry.importer import (
    Document,
    FileReport,
    ImportFailed,
    Repair,
    received_document,
)

#: Validates, keeps in SQL and projects one document (raises ImportFailed, writes nothing).
DocumentImporter = Callable[[Document], FileReport]

TURTLE_TYPES = frozenset({"text/turtle", "application/x-turtle"})


def report_json(report: FileReport) -> dict[str, Any]:
    return {
        "name": report.path,
        "base": report.base,
        "devices": report.devices,
        "models": report.models,
        "otherGraph": report.other_graph,
        "triples": report.triples,
        "repairs": [asdict(r) for r in report.repairs],
        "skolemizedBlankNodes": report.skolemized,
    }


def report_from_json(data: dict[str, Any]) -> FileReport:
    """The inverse of `report_json` (what the CLI prints after an import through --server)."""
    return FileReport(
        path=data["name"],
        base=data["base"],
        devices=list(data["devices"]),
        models=list(data["models"]),
        other_graph=data.get("otherGraph"),
        triples=int(data["triples"]),
        repairs=[Repair(**r) for r in data["repairs"]],
        skolemized=int(data["skolemizedBlankNodes"]),
    )


def import_routes(
    importer: DocumentImporter, *, access: Access, path: str = "/registry/imports"
) -> list[Route]:
    async def post(request: Request) -> Response:
        if (refused := access.refuse_admin(request, "importing")) is not None:
            return refused
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in TURTLE_TYPES:
            return problem(415, "Unsupported Media Type", f"send the file as text/turtle, not {media!r}")
        content = await request.body()
        name = request.query_params.get("name", "")
        try:
            document = received_document(name, content, request.query_params.get("base"))
            report = await anyio.to_thread.run_sync(importer, document)
        except ImportFailed as exc:
            errors = [p.as_dict() for p in exc.problems]
            return problem(400, "Document not imported", str(exc), validationErrors=errors)
        return JSONResponse(report_json(report))

    return [Route(path, post, methods=["POST"])]
