"""W3C WoT Discovery directory API (starlette routes) over the registry.

/things (list with limit/offset and Link rel="next"; POST anonymous TDs),
/things/{id} (GET, PUT 201/204, PATCH JSON merge patch, DELETE), /search/sparql
(read-only SPARQL), /.well-known/wot (the directory's own TD) and /events
(SSE). Writes need the admin token, or a request signed by the device's key for
the device's own description (see registry_access.Access). Registrations with a `ttl`
expire; `purge_loop` removes them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tinyfleet.common.device_description import (
    JSON_MEDIA_TYPES,
    MEDIA_TD_JSON,
    TURTLE_MEDIA_TYPES,
    DescriptionInvalid,
    iri_problem,
)
from tinyfleet.server.http.auth import problem
from tinyfleet.server.http.registry_access import Access
from tinyfleet.server.http.sparql import sparql_routes
from tinyfleet.server.registry.events import EVENT_TYPES, EventHub, sse_response
from tinyfleet.server.registry.query_workers import QueryWorkers
from tinyfleet.server.registry.thing_description import parse_json
from tinyfleet.server.registry.thing_graphs import Prepared, Registry

log = logging.getLogger(__name__)
MAX_PAGE = 1000


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def invalid(exc: DescriptionInvalid) -> JSONResponse:
    return problem(400, "Invalid Thing Description", str(exc), validationErrors=exc.as_list())


class BodyTooLarge(ValueError):
    """A request body past the registry's description size limit (read no further)."""


def bad_thing_id(thing_id: str) -> JSONResponse | None:
    """400 for a Thing id that is not an absolute IRI (nothing can be stored under it)."""
    reason = iri_problem(thing_id)
    return problem(400, "Invalid Thing id", f"the Thing id {reason}") if reason else None


def directory_td(base_url: str) -> dict[str, Any]:
    """The directory described as a Thing (WoT Discovery: ThingDirectory)."""
    return {
        "@context": ["https://www.w3.org/2022/wot/td/v1.1", "https://www.w3.org/2022/wot/discovery"],
        "@type": "ThingDirectory",
        "id": f"urn:tinyfleet:directory:{urllib.parse.urlsplit(base_url).netloc or 'local'}",
        "title": "tinyfleet Thing Description Directory",
        "base": base_url,
        "securityDefinitions": {
            "bearer_sc": {
                "scheme": "bearer",
                "description": "admin token; a device writes its own TD with a request signed by its key "
                               "(Authorization: TinyFleet-Ed25519 device=ID,ts=EPOCH_S,nonce=N,sig=SIG)",
            },
            "nosec_sc": {"scheme": "nosec"},
        },
        "security": "nosec_sc",
        "properties": {
            "things": {
                "description": "Registered Thing Descriptions, paged with limit and offset",
                "uriVariables": {"offset": {"type": "number"}, "limit": {"type": "number"}},
                "readOnly": True,
                "forms": [
                    {
                        "href": "things{?offset,limit}",
                        "op": "readproperty",
                        "contentType": "application/ld+json",
                    }
                ],
            }
        },
        "actions": {
            "createThing": {
                "forms": [
                    {
                        "href": "things/{id}",
                        "op": "invokeaction",
                        "htv:methodName": "PUT",
                        "contentType": MEDIA_TD_JSON,
                        "security": "bearer_sc",
                    }
                ]
            },
            "createAnonymousThing": {
                "forms": [
                    {
                        "href": "things",
                        "op": "invokeaction",
                        "htv:methodName": "POST",
                        "contentType": MEDIA_TD_JSON,
                        "security": "bearer_sc",
                    }
                ]
            },
            "retrieveThing": {
                "forms": [{"href": "things/{id}", "op": "invokeaction", "htv:methodName": "GET"}]
            },
            "updateThing": {
                "forms": [
                    {
                        "href": "things/{id}",
                        "op": "invokeaction",
                        "htv:methodName": "PATCH",
                        "contentType": "application/merge-patch+json",
                        "security": "bearer_sc",
                    }
                ]
            },
            "deleteThing": {
                "forms": [
                    {
                        "href": "things/{id}",
                        "op": "invokeaction",
                        "htv:methodName": "DELETE",
                        "security": "bearer_sc",
                    }
                ]
            },
            "searchSPARQL": {
                "forms": [
                    {"href": "search/sparql?query={query}", "op": "invokeaction", "htv:methodName": "GET"}
                ]
            },
        },
        "events": {
            name: {
                "forms": [
                    {
                        "href": f"events/{name}",
                        "op": "subscribeevent",
                        "subprotocol": "sse",
                        "contentType": "text/event-stream",
                    }
                ]
            }
            for name in EVENT_TYPES
        },
    }


class ThingWriter(Protocol):
    """Where directory writes go: straight into the registry (standalone), or through the
    coordinator's SQL (system of record) and its projector."""

    def put(self, prepared: Prepared, data: bytes, media_type: str) -> bool: ...

    def delete(self, thing_id: str) -> bool: ...


@dataclass(frozen=True)
class RegistryWriter:
    registry: Registry

    def put(self, prepared: Prepared, data: bytes, media_type: str) -> bool:
        return self.registry.put(prepared)

    def delete(self, thing_id: str) -> bool:
        return self.registry.delete(thing_id)


def directory_routes(
    registry: Registry,
    hub: EventHub,
    *,
    writer: ThingWriter | None = None,
    access: Access | None = None,
    query_timeout_s: float = 30.0,
    max_rows: int = 10_000,
    queries: QueryWorkers | None = None,
) -> list[Route]:
    access = access or Access()
    writer = writer or RegistryWriter(registry)
    registry.subscribe(hub.publish)

    async def list_things(request: Request) -> Response:
        try:
            offset = int(request.query_params.get("offset", "0"))
            limit = int(request.query_params.get("limit", "100"))
            if offset < 0 or not 0 < limit <= MAX_PAGE:
                raise ValueError
        except ValueError:
            return problem(400, "Bad paging", f"offset must be >= 0 and limit between 1 and {MAX_PAGE}")
        ids, total = await anyio.to_thread.run_sync(lambda: registry.thing_ids(offset=offset, limit=limit))
        documents = [d for d in [await anyio.to_thread.run_sync(registry.document, i) for i in ids] if d]
        headers = {"x-total-count": str(total)}
        if offset + limit < total:
            headers["link"] = f'</things?offset={offset + limit}&limit={limit}>; rel="next"'
        return JSONResponse(documents, headers=headers, media_type="application/ld+json")

    async def read_body(request: Request) -> tuple[bytes, str]:
        """The body and its media type; BodyTooLarge as soon as it passes the registry's size
        limit, so an oversized description is neither buffered whole nor parsed."""
        media = request.headers.get("content-type", MEDIA_TD_JSON).split(";")[0].strip().lower()
        limit = registry.limits.max_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(registry.limits.size_problem(int(declared)))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(registry.limits.size_problem(size))
            chunks.append(chunk)
        return b"".join(chunks), media

    def too_large(exc: BodyTooLarge) -> JSONResponse:
        return problem(413, "Description too large", str(exc))

    async def store(data: bytes, media: str, thing_id: str) -> JSONResponse | bool:
        """Validate off the loop, then write; the refusal, or whether the Thing is new."""
        try:
            prepared = await anyio.to_thread.run_sync(
                lambda: registry.prepare(data, media, thing_id=thing_id)
            )
        except DescriptionInvalid as exc:
            return invalid(exc)
        return bool(await anyio.to_thread.run_sync(writer.put, prepared, data, media))

    async def create_anonymous(request: Request) -> Response:
        if (refused := access.refuse_admin(request, "creating an anonymous Thing")) is not None:
            return refused
        try:
            body, media = await read_body(request)
        except BodyTooLarge as exc:
            return too_large(exc)
        if media in JSON_MEDIA_TYPES:
            try:
                document = parse_json(body, registry.limits.max_json_depth)
            except DescriptionInvalid as exc:
                return invalid(exc)
            if isinstance(document, dict) and "id" in document:
                return problem(400, "Thing has an id", "a TD with an id is registered with PUT /things/{id}")
        elif media not in TURTLE_MEDIA_TYPES:
            return problem(415, "Unsupported media type", f"send {MEDIA_TD_JSON} or text/turtle")
        thing_id = f"urn:uuid:{uuid.uuid4()}"
        if isinstance(stored := await store(body, media, thing_id), JSONResponse):
            return stored
        return Response(status_code=201, headers={"location": f"/things/{thing_id}"})

    async def get_thing(request: Request) -> Response:
        thing_id = request.path_params["id"]
        document = await anyio.to_thread.run_sync(registry.document, thing_id)
        if document is None:
            return problem(404, "Not found", f"no Thing {thing_id!r} in the directory")
        return JSONResponse(document, media_type=MEDIA_TD_JSON)

    async def put_thing(request: Request) -> Response:
        thing_id = request.path_params["id"]
        if (refused := await access.refuse_write(request, thing_id, registry.limits.max_bytes)) is not None:
            return refused
        if (refused := bad_thing_id(thing_id)) is not None:
            return refused
        try:
            body, media = await read_body(request)
        except BodyTooLarge as exc:
            return too_large(exc)
        if isinstance(created := await store(body, media, thing_id), JSONResponse):
            return created
        return Response(status_code=201 if created else 204)

    async def patch_thing(request: Request) -> Response:
        thing_id = request.path_params["id"]
        if (refused := await access.refuse_write(request, thing_id, registry.limits.max_bytes)) is not None:
            return refused
        if (refused := bad_thing_id(thing_id)) is not None:
            return refused
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in {"application/merge-patch+json", "application/json"}:
            return problem(415, "Unsupported media type", "PATCH takes application/merge-patch+json")
        current = await anyio.to_thread.run_sync(registry.document, thing_id)
        if current is None:
            return problem(404, "Not found", f"no Thing {thing_id!r} in the directory")
        if "@graph" in current:
            return problem(409, "Not patchable", "this Thing was registered as Turtle; replace it with PUT")
        try:
            patch = parse_json((await read_body(request))[0], registry.limits.max_json_depth)
        except BodyTooLarge as exc:
            return too_large(exc)
        except DescriptionInvalid as exc:
            return problem(400, "Invalid patch", exc.summary)
        current.pop("registration", None)
        patched = merge_patch(current, patch)
        if not isinstance(patched, dict):
            return problem(400, "Invalid patch", "the patched Thing Description must stay a JSON object")
        stored = await store(json.dumps(patched).encode(), MEDIA_TD_JSON, thing_id)
        if isinstance(stored, JSONResponse):
            return stored
        return Response(status_code=204)

    async def delete_thing(request: Request) -> Response:
        thing_id = request.path_params["id"]
        if (refused := await access.refuse_write(request, thing_id, registry.limits.max_bytes)) is not None:
            return refused
        existed = await anyio.to_thread.run_sync(writer.delete, thing_id)
        if not existed:
            return problem(404, "Not found", f"no Thing {thing_id!r} in the directory")
        return Response(status_code=204)

    async def well_known(request: Request) -> Response:
        base = str(request.base_url)
        return JSONResponse(directory_td(base), media_type=MEDIA_TD_JSON)

    async def events(request: Request) -> Response:
        event_type = request.path_params.get("type")
        if event_type is not None and event_type not in EVENT_TYPES:
            return problem(404, "Unknown event", f"events are {', '.join(EVENT_TYPES)}")
        return sse_response(hub, request, event_type)

    return [
        Route("/things", list_things, methods=["GET"]),
        Route("/things", create_anonymous, methods=["POST"]),
        Route("/things/{id:path}", get_thing, methods=["GET"]),
        Route("/things/{id:path}", put_thing, methods=["PUT"]),
        Route("/things/{id:path}", patch_thing, methods=["PATCH"]),
        Route("/things/{id:path}", delete_thing, methods=["DELETE"]),
        Route("/.well-known/wot", well_known, methods=["GET"]),
        Route("/events", events, methods=["GET"]),
        Route("/events/{type}", events, methods=["GET"]),
        *sparql_routes(
            registry.store,
            path="/search/sparql",
            allow_update=False,
            timeout_s=query_timeout_s,
            max_rows=max_rows,
            queries=queries,
        ),
    ]


async def purge_loop(registry: Registry, writer: ThingWriter | None = None, interval_s: float = 30.0) -> None:
    """Remove expired registrations (through `writer`) every `interval_s` until cancelled."""
    writer = writer or RegistryWriter(registry)

    def purge() -> list[str]:
        gone = registry.expired()
        for thing_id in gone:
            writer.delete(thing_id)
        return gone

    while True:
        try:
            gone = await anyio.to_thread.run_sync(purge)
            if gone:
                log.info("purged %d expired Thing Description(s)", len(gone))
        except Exception:  # a failed purge must not end the loop; it is retried next interval
            log.exception("purging expired Thing Descriptions failed")
        await asyncio.sleep(interval_s)
