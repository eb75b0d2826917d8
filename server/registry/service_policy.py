"""Which remote endpoints SPARQL may call (`SERVICE`, and an update's `LOAD`): none, unless the
operator allow-lists them.

Oxigraph evaluates `SERVICE <iri> {...}` by sending an HTTP request from the
process that runs the query, so an anonymous query could make the coordinator
call any address it can reach (SSRF, port scans); `LOAD <iri>` in an update
fetches the IRI the same way (admin only, but an update recorded in SQL is
replayed by every rebuild, so it must not depend on what a URL answers).
pyoxigraph has no option to turn federation or loading off, hence this check
before a query or update runs.

The text is parsed with rdflib's SPARQL grammar and the algebra walked with
prefixes and BASE resolved, so letter case, comments, prefixed names and
nesting (subqueries, EXISTS, OPTIONAL, UNION) cannot hide a SERVICE clause. An
endpoint given by a variable is refused: its value is known only while the
query runs. Only IRIs equal to an allow-listed one pass. Oxigraph accepts a few
extensions rdflib's grammar lacks (RDF-star syntax); such text is refused if it
contains the word "service", since then which endpoint it names cannot be
checked, and is otherwise left to the engine (which reports its own syntax
errors). Text without the letters of the keyword in any case or escape cannot
contain it and is not parsed at all.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_parse_lock = threading.Lock()  # rdflib's grammar (pyparsing) is not documented as thread-safe


class ServiceNotAllowed(ValueError):
    """A query or update calling an endpoint the operator did not allow (SERVICE or LOAD); the
    message names it."""


@dataclass(frozen=True)
class ServicePolicy:
    """The exact endpoint IRIs SERVICE and LOAD may call (`tinyfleet server start --sparql-service-allow`)."""

    allowed: frozenset[str] = frozenset()

    @classmethod
    def allowing(cls, endpoints: Iterable[str]) -> ServicePolicy:
        return cls(frozenset(endpoints))

    def check_query(self, text: str) -> None:
        self._check(text, update=False)

    def check_update(self, text: str) -> None:
        self._check(text, update=True)

    def _check(self, text: str, *, update: bool) -> None:
        endpoints, unreadable = _service_endpoints(text, update)
        allowed = ", ".join(sorted(self.allowed)) or "none"
        if unreadable is not None:
            raise ServiceNotAllowed(
                f"SERVICE and LOAD are not allowed unless their endpoint is allow-listed (allowed "
                f"endpoints: {allowed}), and this text could not be parsed to see which endpoint it "
                f"calls: {unreadable}"
            )
        for keyword, endpoint, is_variable in endpoints:
            if is_variable:
                raise ServiceNotAllowed(
                    f"{keyword} ?{endpoint} is not allowed: the endpoint must be a fixed IRI; "
                    f"allowed endpoints: {allowed}"
                )
            if endpoint not in self.allowed:
                raise ServiceNotAllowed(
                    f"{keyword} <{endpoint}> is not allowed; allowed endpoints: {allowed}"
                )


@lru_cache(maxsize=512)
def _service_endpoints(text: str, update: bool) -> tuple[tuple[tuple[str, str, bool], ...], str | None]:
    """((keyword, endpoint, is_variable) of every SERVICE clause and LOAD, None), or ((), why)
    when the text mentions either but cannot be parsed. Cached: dashboards and retries send the
    same text.

    The two parsers read \\u escapes differently: rdflib expands them before parsing, as the
    SPARQL grammar says, while Oxigraph decodes them only inside strings and IRIs (anywhere
    else they are a syntax error). So in `"\\u0022 ... SERVICE <x> ..."` rdflib closes the
    string early where Oxigraph keeps it open, and one parser runs what the other read as a
    comment. What Oxigraph will run is what counts: text with escapes is read with every escape
    made a plain character (an escape is never a quote, brace or keyword to Oxigraph), and
    refused if that reading does not parse; rdflib's own reading is checked as well, and an
    endpoint found by either reading counts."""
    if not _may_call_out(text, update):
        return (), None
    oxigraph_reading = _ESCAPE.sub("_", text)
    readings = [oxigraph_reading] if oxigraph_reading == text else [oxigraph_reading, text]
    found: list[tuple[str, str, bool]] = []
    for number, reading in enumerate(readings):
        if not _may_call_out(reading, update):
            continue
        unreadable = _collect_endpoints(reading, update, found)
        if unreadable is not None and number == 0:
            return (), unreadable
    return tuple(dict.fromkeys(found)), None


#: A SPARQL codepoint escape (\\uXXXX, \\UXXXXXXXX).
_ESCAPE = re.compile(r"\\u[0-9A-Fa-f]{4}|\\U[0-9A-Fa-f]{8}")


def _collect_endpoints(text: str, update: bool, found: list[tuple[str, str, bool]]) -> str | None:
    """Add the endpoints rdflib's reading of `text` calls to `found`; why it cannot be read, or None."""
    from rdflib.plugins.sparql.algebra import translateQuery, translateUpdate
    from rdflib.plugins.sparql.parser import parseQuery, parseUpdate

    try:
        with _parse_lock:
            tree = translateUpdate(parseUpdate(text)) if update else translateQuery(parseQuery(text))
    except Exception as exc:  # any parse or translation failure: which endpoint it names is unknown
        return str(exc).splitlines()[0][:200]
    root = tree.algebra if hasattr(tree, "algebra") else tree
    _collect(root, found, set())
    return None


def _may_call_out(text: str, update: bool) -> bool:
    """False when no keyword that calls out (SERVICE; LOAD in an update) occurs in any case, even
    after \\u escapes are expanded (rdflib expands them, Oxigraph does not in keywords): such
    text needs no parse, which spares most queries and bulk updates (and the import of rdflib's
    parser)."""
    folded = text.casefold()
    if "\\u" in text or "\\U" in text:
        from rdflib.plugins.sparql.parser import expandUnicodeEscapes

        folded = expandUnicodeEscapes(text).casefold()
    return "service" in folded or (update and "load" in folded)


def _collect(node: Any, found: list[tuple[str, str, bool]], seen: set[int]) -> None:
    """Every SERVICE pattern's and LOAD's endpoint in an rdflib algebra tree (CompValue dicts and lists)."""
    from pyparsing import ParseResults
    from rdflib.plugins.sparql.parserutils import CompValue
    from rdflib.term import Variable

    if id(node) in seen:
        return
    if isinstance(node, CompValue):
        seen.add(id(node))
        if node.name == "ServiceGraphPattern":
            term = dict.get(node, "term")
            found.append(("SERVICE", str(term), isinstance(term, Variable)))
        elif node.name == "Load":
            term = dict.get(node, "iri")
            found.append(("LOAD", str(term), isinstance(term, Variable)))
        for value in dict.values(node):
            _collect(value, found, seen)
    elif isinstance(node, dict):
        for value in node.values():
            _collect(value, found, seen)
    elif isinstance(node, list | tuple | set | frozenset | ParseResults):
        seen.add(id(node))
        for value in node:
            _collect(value, found, seen)
