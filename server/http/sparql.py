"""SPARQL 1.1 Protocol endpoint (starlette routes) over the registry's store.

GET ?query=, POST application/sparql-query, POST form query= (and update=, POST
application/sparql-update, only with the admin token); other POST bodies are 415,
and a request carrying both a query and an update is 400. default-graph-uri /
named-graph-uri name a query's dataset and override its FROM / FROM NAMED; with
neither, the default graph is the union of every named graph (query_dataset).
An update's graphs are named in its text: using-graph-uri is refused, not ignored.
A GET without parameters answers the Service Description (sparql_description).
SELECT/ASK results as SPARQL JSON, XML, CSV or TSV; CONSTRUCT/DESCRIBE as Turtle,
N-Triples or JSON-LD, by Accept; DESCRIBE follows skolem IRIs (concise_description).

Queries come from anyone, so they run sandboxed (query_workers): in worker
processes killed at the deadline (503), a fixed number at a time with a bounded
wait (503 + Retry-After when full), and `SERVICE` refused (400) unless its
endpoint is allow-listed (service_policy). More rows than the limit is a 422
telling the user to add LIMIT. Updates (admin only) write, so they run in this
process; they are checked for SERVICE and LOAD too.
"""

from __future__ import annotations

import io
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import pyoxigraph as ox
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tinyfleet.server.http.auth import problem
from tinyfleet.server.http.registry_access import Access, negotiate
from tinyfleet.server.http.sparql_description import service_description
from tinyfleet.server.registry.query_dataset import QueryDataset
from tinyfleet.server.registry.query_workers import (
    DEFAULT_WORKER_MEMORY_BYTES,
    QueryFailed,
    QueryRequest,
    QueryTimeout,
    QueryWorkers,
    WorkersBusy,
    WorkersClosed,
)
from tinyfleet.server.registry.service_policy import ServiceNotAllowed, ServicePolicy
from tinyfleet.server.registry.sparql_results import (
    GRAPH_FORMATS,
    RESULTS_FORMATS,
    Formats,
    NotAcceptable,
    RowLimitExceeded,
)
from tinyfleet.server.registry.store import RegistryStore, StoreError


@dataclass(frozen=True)
class SparqlOptions:
    """What the operator sets for the SPARQL endpoints (/sparql and /search/sparql share them)."""

    timeout_s: float = 30.0
    max_rows: int = 10_000
    workers: int = 2
    queue: int = 16
    service_allow: tuple[str, ...] = ()
    #: What one query's worker may allocate (None: no cap).
    memory_mb: int | None = DEFAULT_WORKER_MEMORY_BYTES >> 20

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"the SPARQL timeout must be positive, got {self.timeout_s:g} s")
        if self.max_rows < 1 or self.workers < 1 or self.queue < 0:
            raise ValueError(
                "SPARQL limits: at least 1 row and 1 worker, and a queue of 0 or more "
                f"(got max_rows={self.max_rows}, workers={self.workers}, queue={self.queue})"
            )
        if self.memory_mb is not None and self.memory_mb < MIN_WORKER_MEMORY_MB:
            raise ValueError(
                f"a SPARQL query needs at least {MIN_WORKER_MEMORY_MB} MB to open the store, "
                f"got --sparql-memory-mb {self.memory_mb}"
            )
        for url in self.service_allow:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"a SPARQL SERVICE endpoint must be an http(s) URL, got {url!r}")

    def query_workers(self, store: RegistryStore) -> QueryWorkers:
        return QueryWorkers.for_store(
            store, workers=self.workers, queue=self.queue,
            services=ServicePolicy.allowing(self.service_allow),
            memory_bytes=None if self.memory_mb is None else self.memory_mb << 20,
        )


#: Opening the store read-only and answering a small query fit in well under this.
MIN_WORKER_MEMORY_MB = 128


class UpdateRefused(ValueError):
    """A SPARQL Update that parses but that the store will not carry out; the message says why."""


def sparql_routes(
    store: RegistryStore,
    *,
    path: str = "/sparql",
    access: Access | None = None,
    allow_update: bool = True,
    timeout_s: float = 30.0,
    max_rows: int = 10_000,
    apply_update: Callable[[str], None] | None = None,
    queries: QueryWorkers | None = None,
) -> list[Route]:
    """Routes for one SPARQL endpoint; `allow_update=False` makes it read-only for everyone.

    `apply_update` carries out an admin's SPARQL Update (blocking; run in a thread): by default
    straight into the store; the coordinator records it in SQL first and lets its projector
    apply it, so a rebuild keeps it. It raises SyntaxError for text that does not parse and
    UpdateRefused for an update the store will not carry out.

    `queries` runs the queries (share one between endpoints so the concurrency
    bound is the server's, and close it at stop); by default the endpoint gets
    its own, allowing no SERVICE, whose workers live as long as this process.
    """
    access = access or Access()
    runner = queries or QueryWorkers.for_store(store)

    def into_store(text: str) -> None:
        try:
            store.update(text)
        except StoreError:  # unreachable or failing: not the update's fault
            raise
        except RuntimeError as exc:  # Oxigraph's evaluation errors, e.g. CREATE of a graph that exists
            raise UpdateRefused(str(exc)) from exc

    apply = apply_update or into_store

    async def endpoint(request: Request) -> Response:
        if request.method == "GET" and not request.query_params:
            return _describe_service(request)
        try:
            operation = await _operation(request)
        except UnsupportedMediaType as exc:
            return problem(415, "Unsupported Media Type", str(exc))
        except ValueError as exc:
            return problem(400, "Bad SPARQL request", str(exc))
        if operation.kind == "update":
            return await _update(request, operation.text)
        return await _answer(request, operation.text, operation.dataset)

    def _describe_service(request: Request) -> Response:
        media = negotiate(request.headers.get("accept"), list(GRAPH_FORMATS), "text/turtle")
        if media is None:
            return problem(406, "Not acceptable", f"the service description can be sent as: "
                           f"{', '.join(GRAPH_FORMATS)}")
        triples = service_description(
            str(request.url.replace(query="")), update=allow_update, federated=bool(runner.services.allowed)
        )
        body = io.BytesIO()
        ox.serialize(triples, body, format=GRAPH_FORMATS[media])
        return Response(body.getvalue(), media_type=media)

    async def _update(request: Request, text: str) -> Response:
        if not allow_update:
            return problem(403, "Read-only endpoint", "this endpoint answers queries only")
        if (refused := access.refuse_admin(request, "SPARQL Update")) is not None:
            return refused
        try:
            await anyio.to_thread.run_sync(runner.services.check_update, text)
            await anyio.to_thread.run_sync(apply, text)
        except ServiceNotAllowed as exc:
            return problem(400, "Remote call not allowed", str(exc))
        except SyntaxError as exc:
            return problem(400, "SPARQL syntax error", str(exc))
        except UpdateRefused as exc:
            return problem(400, "Update refused", str(exc))
        return Response(status_code=204)

    async def _answer(request: Request, text: str, dataset: QueryDataset) -> Response:
        started = time.monotonic()
        accept = request.headers.get("accept")
        formats = Formats(
            results=negotiate(accept, list(RESULTS_FORMATS), "application/sparql-results+json"),
            graph=negotiate(accept, list(GRAPH_FORMATS), "text/turtle"),
        )
        if formats.results is None and formats.graph is None:  # no answer could be sent: don't run it
            return problem(
                406, "Not acceptable",
                f"query results can be sent as: {', '.join([*RESULTS_FORMATS, *GRAPH_FORMATS])}",
            )
        query = QueryRequest(text, max_rows, formats, runner.services, dataset)
        try:
            result = await runner.run(query, deadline=started + timeout_s)
        except WorkersBusy as busy:
            response = problem(
                503,
                "Too many queries",
                f"{busy.capacity} queries are running or waiting, the endpoint's limit; "
                f"retry in {busy.retry_after_s} s",
            )
            response.headers["retry-after"] = str(busy.retry_after_s)
            return response
        except QueryTimeout:
            return problem(
                503,
                "Query timeout",
                f"the query ran longer than the endpoint's limit of {timeout_s:g} s; narrow it",
            )
        except WorkersClosed:
            return problem(503, "Shutting down", "the server is stopping; retry when it is back")
        except RowLimitExceeded:
            return problem(
                422,
                "Too many results",
                f"the result has more than {max_rows} rows, the endpoint's limit; "
                "add LIMIT/OFFSET to page through it",
            )
        except ServiceNotAllowed as exc:
            return problem(400, "SERVICE not allowed", str(exc))
        except SyntaxError as exc:
            return problem(400, "SPARQL syntax error", str(exc))
        except NotAcceptable as exc:
            offered = GRAPH_FORMATS if exc.kind == "graph" else RESULTS_FORMATS
            return problem(406, "Not acceptable", f"this result can be sent as: {', '.join(offered)}")
        except QueryFailed as exc:
            return problem(500, "Query failed", str(exc))
        headers = {"x-query-time-ms": f"{(time.monotonic() - started) * 1000:.1f}"}
        return Response(result.body, media_type=result.media_type, headers=headers)

    return [Route(path, endpoint, methods=["GET", "POST"])]


@dataclass(frozen=True)
class _Operation:
    kind: str  # "query" or "update"
    text: str
    dataset: QueryDataset


class UnsupportedMediaType(ValueError):
    """A POST body in a media type the protocol does not define (415)."""


#: The protocol's ways to name a dataset: for a query, and (not supported here) for an update.
_QUERY_DATASET = ("default-graph-uri", "named-graph-uri")
_UPDATE_DATASET = ("using-graph-uri", "using-named-graph-uri")


async def _operation(request: Request) -> _Operation:
    """The operation of any of the protocol's request forms: GET ?query=, POST
    application/sparql-query or application/sparql-update (parameters in the URL), POST
    application/x-www-form-urlencoded (parameters in the body, or the URL)."""
    fields = list(request.query_params.multi_items())
    if request.method == "POST":
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/x-www-form-urlencoded":
            # The protocol's form is plain urlencoding; no multipart parser needed.
            body = (await request.body()).decode("utf-8")
            fields += urllib.parse.parse_qsl(body, keep_blank_values=True)
        elif content_type in ("application/sparql-query", "application/sparql-update"):
            kind = "query" if content_type == "application/sparql-query" else "update"
            fields.append((kind, (await request.body()).decode("utf-8")))
        else:
            raise UnsupportedMediaType(
                f"unsupported content type {content_type or 'none'!r}; use application/sparql-query, "
                "application/sparql-update or application/x-www-form-urlencoded"
            )
    texts = {kind: [value for name, value in fields if name == kind] for kind in ("query", "update")}
    if texts["query"] and texts["update"]:
        raise ValueError("the request carries both a query and an update; send one operation per request")
    kind = "update" if texts["update"] else "query"
    if len(texts[kind]) > 1:
        raise ValueError(f"the request carries {len(texts[kind])} {kind} texts; send one per request")
    if kind == "update" and request.method == "GET":
        raise ValueError("SPARQL Update must be sent with POST")
    if not texts[kind] or not texts[kind][0]:
        raise ValueError(f"missing {kind!r} parameter")
    names = {name for name, _ in fields}
    if kind == "update":
        if names & {*_QUERY_DATASET, *_UPDATE_DATASET}:
            raise ValueError(
                f"{', '.join(sorted(names & {*_QUERY_DATASET, *_UPDATE_DATASET}))}: an update's graphs "
                "are named in its text here (USING, USING NAMED, WITH, GRAPH), not by request parameters"
            )
        return _Operation("update", texts["update"][0], QueryDataset())
    if names & set(_UPDATE_DATASET):
        raise ValueError(f"{', '.join(sorted(names & set(_UPDATE_DATASET)))} applies to updates; "
                         "a query's dataset is named by default-graph-uri and named-graph-uri")
    dataset = QueryDataset(
        default_graphs=tuple(value for name, value in fields if name == "default-graph-uri"),
        named_graphs=tuple(value for name, value in fields if name == "named-graph-uri"),
    )
    return _Operation("query", texts["query"][0], dataset)
