"""SPARQL 1.1 Protocol endpoint (starlette routes) over the registry's store.

GET ?query=, POST application/sparql-query, POST form query= (and update=, POST
application/sparql-update, only with the admin token). SELECT/ASK results as
SPARQL JSON, XML, CSV or TSV; CONSTRUCT/DESCRIBE as Turtle, N-Triples or
JSON-LD, by Accept. The engine cannot be interrupted, so a query runs in a
worker thread that stops at its next result row once the deadline has passed;
the client gets 503 at the deadline either way. More rows than the limit is a
422 telling the user to add LIMIT.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pyoxigraph as ox
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tinyfleet.ontology import XSD
from tinyfleet.server.registry.http_common import Access, negotiate, problem
from tinyfleet.server.registry.store import RegistryStore

RESULTS_FORMATS = {
    "application/sparql-results+json": ox.QueryResultsFormat.JSON,
    "application/sparql-results+xml": ox.QueryResultsFormat.XML,
    "text/csv": ox.QueryResultsFormat.CSV,
    "text/tab-separated-values": ox.QueryResultsFormat.TSV,
    "application/json": ox.QueryResultsFormat.JSON,
}
GRAPH_FORMATS = {
    "text/turtle": ox.RdfFormat.TURTLE,
    "application/n-triples": ox.RdfFormat.N_TRIPLES,
    "application/ld+json": ox.RdfFormat.JSON_LD,
}


class RowLimitExceeded(Exception):
    pass


class QueryTimedOut(Exception):
    pass


@dataclass
class Materialized:
    """A query result read to the end (or to the limit): SELECT, ASK or a graph."""

    kind: str  # "select" | "ask" | "graph"
    variables: list[str]
    rows: list[Any]
    boolean: bool = False


def run_query(
    store: RegistryStore, sparql: str, *, max_rows: int, cancelled: threading.Event
) -> Materialized:
    """Evaluate and read at most `max_rows` rows, checking `cancelled` between rows.

    Runs in a worker thread; pyoxigraph result iterators must be dropped in the
    thread that made them, so rows are copied out as plain term lists and the
    iterator is deleted here even when the read stops with an exception.
    """
    result = store.query(sparql)
    try:
        if isinstance(result, ox.QueryBoolean):
            return Materialized("ask", [], [], bool(result))
        variables = [v.value for v in result.variables] if isinstance(result, ox.QuerySolutions) else []
        rows: list[Any] = []
        for row in result:  # type: ignore[union-attr]
            if cancelled.is_set():
                raise QueryTimedOut
            rows.append([row[name] for name in variables] if variables else row)
            if len(rows) > max_rows:
                raise RowLimitExceeded
        return (
            Materialized("select", variables, rows)
            if isinstance(result, ox.QuerySolutions)
            else Materialized("graph", [], rows)
        )
    finally:
        del result


def _term_json(term: Any) -> dict[str, str]:
    if isinstance(term, ox.NamedNode):
        return {"type": "uri", "value": term.value}
    if isinstance(term, ox.BlankNode):
        return {"type": "bnode", "value": term.value}
    item = {"type": "literal", "value": term.value}
    if term.language:
        item["xml:lang"] = term.language
    elif term.datatype.value != XSD + "string":
        item["datatype"] = term.datatype.value
    return item


def results_json(result: Materialized) -> bytes:
    if result.kind == "ask":
        return json.dumps({"head": {}, "boolean": result.boolean}).encode()
    bindings = [
        {name: _term_json(term) for name, term in zip(result.variables, row, strict=True) if term is not None}
        for row in result.rows
    ]
    return json.dumps({"head": {"vars": result.variables}, "results": {"bindings": bindings}}).encode()


def serialize(result: Materialized, media_type: str) -> bytes:
    if result.kind == "graph":
        return ox.serialize(result.rows, format=GRAPH_FORMATS[media_type])
    data = results_json(result)
    fmt = RESULTS_FORMATS[media_type]
    if fmt == ox.QueryResultsFormat.JSON:
        return data
    return ox.parse_query_results(data, format=ox.QueryResultsFormat.JSON).serialize(format=fmt)


def sparql_routes(
    store: RegistryStore,
    *,
    path: str = "/sparql",
    access: Access | None = None,
    allow_update: bool = True,
    timeout_s: float = 30.0,
    max_rows: int = 10_000,
    after_update: Callable[[], None] | None = None,
) -> list[Route]:
    """Routes for one SPARQL endpoint; `allow_update=False` makes it read-only for everyone."""
    access = access or Access()

    async def endpoint(request: Request) -> Response:
        try:
            operation, text = await _operation(request)
        except ValueError as exc:
            return problem(400, "Bad SPARQL request", str(exc))
        if operation == "update":
            if not allow_update:
                return problem(403, "Read-only endpoint", "this endpoint answers queries only")
            if not access.is_admin(request):
                return problem(
                    403, "Forbidden", "SPARQL Update needs the admin token (Authorization: Bearer TOKEN)"
                )
            try:
                await anyio.to_thread.run_sync(store.update, text)
            except SyntaxError as exc:
                return problem(400, "SPARQL syntax error", str(exc))
            if after_update is not None:
                after_update()
            return Response(status_code=204)
        return await _answer(request, text)

    async def _answer(request: Request, text: str) -> Response:
        cancelled = threading.Event()
        started = time.monotonic()
        try:
            with anyio.fail_after(timeout_s):
                result = await anyio.to_thread.run_sync(
                    lambda: run_query(store, text, max_rows=max_rows, cancelled=cancelled),
                    abandon_on_cancel=True,
                )
        except TimeoutError:
            cancelled.set()
            return problem(
                503,
                "Query timeout",
                f"the query ran longer than the endpoint's limit of {timeout_s:g} s; narrow it",
            )
        except QueryTimedOut:
            return problem(503, "Query timeout", f"the query ran longer than {timeout_s:g} s")
        except RowLimitExceeded:
            return problem(
                422,
                "Too many results",
                f"the result has more than {max_rows} rows, the endpoint's limit; "
                "add LIMIT/OFFSET to page through it",
            )
        except SyntaxError as exc:
            return problem(400, "SPARQL syntax error", str(exc))
        offered = list(GRAPH_FORMATS) if result.kind == "graph" else list(RESULTS_FORMATS)
        default = "text/turtle" if result.kind == "graph" else "application/sparql-results+json"
        chosen = negotiate(request.headers.get("accept"), offered, default)
        if chosen is None:
            return problem(406, "Not acceptable", f"this result can be sent as: {', '.join(offered)}")
        body = serialize(result, chosen)
        headers = {"x-query-time-ms": f"{(time.monotonic() - started) * 1000:.1f}"}
        return Response(body, media_type=chosen, headers=headers)

    return [Route(path, endpoint, methods=["GET", "POST"])]


async def _operation(request: Request) -> tuple[str, str]:
    """('query'|'update', text) from any of the protocol's request forms."""
    if request.method == "GET":
        if "update" in request.query_params:
            raise ValueError("SPARQL Update must be sent with POST")
        query = request.query_params.get("query")
        if not query:
            raise ValueError("missing 'query' parameter")
        return "query", query
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/sparql-query":
        return "query", (await request.body()).decode("utf-8")
    if content_type == "application/sparql-update":
        return "update", (await request.body()).decode("utf-8")
    if content_type == "application/x-www-form-urlencoded":
        # The protocol's form is plain urlencoding; no multipart parser needed.
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8"))
        if "query" in form:
            return "query", form["query"][0]
        if "update" in form:
            return "update", form["update"][0]
        raise ValueError("form needs a 'query' or 'update' field")
    raise ValueError(
        f"unsupported content type {content_type!r}; use application/sparql-query, "
        "application/sparql-update or application/x-www-form-urlencoded"
    )
