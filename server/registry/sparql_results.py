"""A read query's result read up to the row limit and serialized in the media type the client accepts.

Runs wherever the query runs (a query worker process or a thread of the
coordinator), so only bytes cross back: SELECT/ASK as SPARQL JSON, XML, CSV or
TSV, CONSTRUCT/DESCRIBE as Turtle, N-Triples or JSON-LD. The client's Accept
header is negotiated before the query runs, once per kind, because which kind
a query is becomes known only when it is evaluated.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass
from typing import Any

import pyoxigraph as ox

from tinyfleet.ontology import XSD

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
    """More rows than the endpoint's limit."""


class QueryTimedOut(Exception):
    """The reader was told to stop (its deadline passed) between two rows."""


class NotAcceptable(Exception):
    """The client accepts no format for this kind of result; args[0] is the kind ("select", "graph")."""

    @property
    def kind(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Formats:
    """The negotiated media type for each kind of result; None: the client accepts none."""

    results: str | None = "application/sparql-results+json"
    graph: str | None = "text/turtle"


@dataclass(frozen=True)
class Answer:
    media_type: str
    body: bytes


def answer(
    result: Any, *, max_rows: int, formats: Formats, cancelled: threading.Event | None = None
) -> Answer:
    """Read at most `max_rows` rows of a pyoxigraph query result and serialize them.

    pyoxigraph result iterators must be dropped in the thread that made them, so
    rows are copied out as plain term lists and the iterator is released here
    even when reading stops with an exception. `cancelled` is checked between
    rows (the in-process path has no other way to stop).
    """
    try:
        if isinstance(result, ox.QueryBoolean):
            if formats.results is None:
                raise NotAcceptable("select")
            return Answer(formats.results, _results(formats.results, [], [], bool(result)))
        is_select = isinstance(result, ox.QuerySolutions)
        variables = [v.value for v in result.variables] if is_select else []
        rows: list[Any] = []
        for row in result:
            if cancelled is not None and cancelled.is_set():
                raise QueryTimedOut
            rows.append([row[name] for name in variables] if is_select else row)
            if len(rows) > max_rows:
                raise RowLimitExceeded
        if is_select:
            if formats.results is None:
                raise NotAcceptable("select")
            return Answer(formats.results, _results(formats.results, variables, rows, None))
        if formats.graph is None:
            raise NotAcceptable("graph")
        body = io.BytesIO()
        ox.serialize(rows, body, format=GRAPH_FORMATS[formats.graph])
        return Answer(formats.graph, body.getvalue())
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


def _results(media_type: str, variables: list[str], rows: list[Any], boolean: bool | None) -> bytes:
    if boolean is not None:
        data = json.dumps({"head": {}, "boolean": boolean}).encode()
    else:
        bindings = [
            {name: _term_json(term) for name, term in zip(variables, row, strict=True) if term is not None}
            for row in rows
        ]
        data = json.dumps({"head": {"vars": variables}, "results": {"bindings": bindings}}).encode()
    fmt = RESULTS_FORMATS[media_type]
    if fmt == ox.QueryResultsFormat.JSON:
        return data
    body = io.BytesIO()
    ox.parse_query_results(data, format=ox.QueryResultsFormat.JSON).serialize(body, format=fmt)
    return body.getvalue()
