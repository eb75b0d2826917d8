"""Which RDF dataset a query reads: the protocol request's, else the query's own, else the union.

SPARQL 1.1 Protocol: `default-graph-uri` / `named-graph-uri` name the dataset and
override the query's FROM / FROM NAMED. A query that names neither reads the
registry's default dataset, whose default graph is the union of every named graph
(one graph per device, artifact and imported document; the store's own default
graph holds nothing). Oxigraph applies FROM itself, but asking it for the union
replaces FROM, so the union is asked for only when the query has no dataset clause.

pyoxigraph exposes neither whether a query names a dataset (Oxigraph's
`QueryDataset::is_default_dataset` is Rust-only) nor its form, and rdflib's
grammar lacks Oxigraph's extensions (RDF-star, SPARQL 1.2). Both are top-level
keywords, so `read_head` tokenizes instead of parsing: strings, IRIs and comments are
skipped whole, and a keyword counts only as a whole word (`?from`, `ex:from`,
`"from"` are not FROM). The grammar allows FROM nowhere but in dataset clauses, so
every FROM word starts one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyoxigraph as ox

_FORMS = frozenset({"SELECT", "CONSTRUCT", "DESCRIBE", "ASK"})
_TOKEN = re.compile(
    r"(?P<skip>#[^\n\r]*"  # a comment
    r'|"""(?:[^"\\]|\\.|"(?!""))*"""'
    r"|'''(?:[^'\\]|\\.|'(?!''))*'''"
    r'|"(?:[^"\\\n\r]|\\.)*"'
    r"|'(?:[^'\\\n\r]|\\.)*')"
    r"|(?P<iri><[^<>\"{}|^`\\\x00-\x20]*>)"
    # What variables, prefixed names, blank node labels, language tags and numbers are made of:
    # a keyword must be all of such a run.
    r"|(?P<word>[\w:?$@.\-%\\]+)"
    r"|(?P<other>\S)",
    re.DOTALL,
)


@dataclass(frozen=True)
class QueryHead:
    """What precedes a query's WHERE clause, as written."""

    #: SELECT, CONSTRUCT, DESCRIBE or ASK; None when the text has no form (it will not parse).
    form: str | None
    #: The BASE and PREFIX declarations before the form.
    prologue: str
    #: Each dataset clause, e.g. "FROM <urn:g>", "FROM NAMED ex:g".
    dataset_clauses: tuple[str, ...]


def read_head(text: str) -> QueryHead:
    form: str | None = None
    prologue = text
    clauses: list[str] = []
    tokens = [m for m in _TOKEN.finditer(text) if m.lastgroup != "skip"]
    for index, token in enumerate(tokens):
        word = token.group().upper() if token.lastgroup == "word" else ""
        if form is None and word in _FORMS:
            form, prologue = word, text[: token.start()]
        elif word == "FROM":
            following = [t.group() for t in tokens[index + 1 : index + 3]]
            named = bool(following) and following[0].upper() == "NAMED"
            source = following[1:2] if named else following[:1]
            clauses.append(" ".join(["FROM", *(["NAMED"] if named else []), *source]))
    return QueryHead(form=form, prologue=prologue, dataset_clauses=tuple(clauses))


@dataclass(frozen=True)
class QueryDataset:
    """A protocol request's dataset (`default-graph-uri`, `named-graph-uri`, each repeatable)."""

    default_graphs: tuple[str, ...] = ()
    named_graphs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for parameter, graphs in (("default-graph-uri", self.default_graphs),
                                  ("named-graph-uri", self.named_graphs)):
            for graph in graphs:
                try:
                    ox.NamedNode(graph)
                except ValueError as exc:
                    raise ValueError(f"{parameter} must be an absolute IRI, got {graph!r}: {exc}") from None

    @property
    def given(self) -> bool:
        return bool(self.default_graphs or self.named_graphs)


def declared_dataset(head: QueryHead) -> QueryDataset:
    """A query's own dataset clauses as a protocol dataset, for a server that applies the
    protocol's parameters but not FROM. Each source is resolved against the query's prologue
    (PREFIX, BASE) by Oxigraph's parser, on an empty store; a clause that does not parse raises
    SyntaxError."""
    resolver = ox.Store()
    default: list[str] = []
    named: list[str] = []
    for clause in head.dataset_clauses:
        source = clause.rsplit(" ", 1)[-1]
        rows = resolver.query(f"{head.prologue}SELECT ?graph WHERE {{ BIND({source} AS ?graph) }}")
        assert isinstance(rows, ox.QuerySolutions)  # a SELECT
        graph = next(rows)["graph"]
        if not isinstance(graph, ox.NamedNode):
            raise SyntaxError(f"a dataset clause names a graph by its IRI, not {source}")
        (named if clause.startswith("FROM NAMED ") else default).append(graph.value)
    return QueryDataset(default_graphs=tuple(default), named_graphs=tuple(named))


def oxigraph_options(head: QueryHead, dataset: QueryDataset | None) -> dict[str, Any]:
    """`Store.query` keywords for the dataset the query reads. A protocol dataset names both
    parts: a part it leaves out is empty (the protocol's reading, as for FROM without FROM NAMED)."""
    if dataset is not None and dataset.given:
        return {
            "default_graph": [ox.NamedNode(g) for g in dataset.default_graphs],
            "named_graphs": [ox.NamedNode(g) for g in dataset.named_graphs],
        }
    if head.dataset_clauses:
        return {}
    return {"use_default_graph_as_union": True}
