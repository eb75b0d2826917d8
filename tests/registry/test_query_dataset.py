"""Which dataset a query reads, on both backends (the query's head read without a parser; FROM,
FROM NAMED and the protocol's dataset), and DESCRIBE through skolem IRIs within it."""

from __future__ import annotations

from collections.abc import Iterator

import pyoxigraph as ox
import pytest

from tinyfleet.server.registry.query_dataset import QueryDataset, QueryHead, read_head
from tinyfleet.server.registry.sparql_updates import insert_data_chunks, is_skolem
from tinyfleet.server.registry.store import EmbeddedStore, RegistryStore, RemoteStore

from .test_remote_store import oxigraph_server  # noqa: F401  (the remote store's server)


@pytest.mark.parametrize(
    ("text", "head"),
    [
        ("SELECT * WHERE { ?s ?p ?o }", QueryHead("SELECT", "", ())),
        ("select*from<urn:g>where{?s ?p ?o}", QueryHead("SELECT", "", ("FROM <urn:g>",))),
        (
            "BASE <http://a/> PREFIX ex: <http://e/>\ndescribe <x> FROM ex:g from named <h>",
            QueryHead(
                "DESCRIBE", "BASE <http://a/> PREFIX ex: <http://e/>\n", ("FROM ex:g", "FROM NAMED <h>")
            ),
        ),
        (
            "PREFIX from: <urn:f#> PREFIX ask: <urn:a#>\nCONSTRUCT { ?from from:x ask:y } WHERE {"
            " ?from ?p 'FROM <urn:a>', \"\"\"from\n<urn:b>\"\"\", \"a\\\"FROM <c>\"@from }  # FROM <urn:d>",
            QueryHead("CONSTRUCT", "PREFIX from: <urn:f#> PREFIX ask: <urn:a#>\n", ()),
        ),
        (
            "ASK FROM NAMED <urn:a> { GRAPH ?g { << ?s ?p ?o >> ?q ?r } }",
            QueryHead("ASK", "", ("FROM NAMED <urn:a>",)),
        ),
        ("CONSTRUCT WHERE { ?s ?p ?o FILTER(?a<?b&&?c>?d) }", QueryHead("CONSTRUCT", "", ())),
        ("not a query", QueryHead(None, "not a query", ())),
    ],
)
def test_the_head_is_read_from_the_tokens(text: str, head: QueryHead) -> None:
    assert read_head(text) == head


def _load(store: RegistryStore) -> None:
    """Two graphs; g1's description of <urn:a> nests two blank nodes deep."""
    quads = [
        ox.Quad(ox.NamedNode("urn:a"), ox.NamedNode("urn:p"), ox.BlankNode("x"), ox.NamedNode("urn:g1")),
        ox.Quad(ox.BlankNode("x"), ox.NamedNode("urn:q"), ox.BlankNode("y"), ox.NamedNode("urn:g1")),
        ox.Quad(ox.BlankNode("y"), ox.NamedNode("urn:r"), ox.Literal("deep"), ox.NamedNode("urn:g1")),
        ox.Quad(ox.NamedNode("urn:a"), ox.NamedNode("urn:p"), ox.Literal("1"), ox.NamedNode("urn:g1")),
        ox.Quad(ox.NamedNode("urn:b"), ox.NamedNode("urn:p"), ox.Literal("2"), ox.NamedNode("urn:g2")),
    ]
    for update in insert_data_chunks(quads):  # blank nodes skolemized, as every registry write
        store.update(update)


def _subjects(store: RegistryStore, text: str, dataset: QueryDataset | None = None) -> list[str]:
    result = store.query(text, dataset=dataset)
    assert isinstance(result, ox.QuerySolutions)
    return sorted(row["s"].value for row in result)


def _described(store: RegistryStore, text: str, dataset: QueryDataset | None = None) -> list[ox.Triple]:
    result = store.query(text, dataset=dataset)
    assert isinstance(result, ox.QueryTriples | list)
    return list(result)


@pytest.fixture(params=["embedded", "remote"])
def store(request: pytest.FixtureRequest) -> Iterator[RegistryStore]:
    """The remote one is `oxigraph serve --union-default-graph`, which reads the union whatever
    FROM says but applies default-graph-uri / named-graph-uri: FROM reaches it as those."""
    opened: RegistryStore = (
        EmbeddedStore(None)
        if request.param == "embedded"
        else RemoteStore(request.getfixturevalue("oxigraph_server"))
    )
    try:
        _load(opened)
        yield opened
    finally:
        opened.close()


def test_the_store_reads_the_dataset_asked_for(store: RegistryStore) -> None:
    select = "SELECT ?s WHERE { ?s <urn:p> ?o }"
    assert _subjects(store, select) == ["urn:a", "urn:a", "urn:b"]
    assert _subjects(store, "SELECT ?s FROM <urn:g2> WHERE { ?s <urn:p> ?o }") == ["urn:b"]
    prefixed = "BASE <urn:> PREFIX g: <urn:g>\nSELECT ?s FROM g:2 FROM NAMED <g1> WHERE { ?s <urn:p> ?o }"
    assert _subjects(store, prefixed) == ["urn:b"]
    named = "SELECT ?s FROM NAMED <urn:g2> WHERE { GRAPH ?g { ?s <urn:p> ?o } }"
    assert _subjects(store, named) == ["urn:b"]
    assert _subjects(store, select, QueryDataset(default_graphs=("urn:g2",))) == ["urn:b"]
    overridden = "SELECT ?s FROM <urn:g1> WHERE { ?s <urn:p> ?o }"
    assert _subjects(store, overridden, QueryDataset(default_graphs=("urn:g2",))) == ["urn:b"]
    in_graph = "SELECT ?s WHERE { GRAPH ?g { ?s <urn:p> ?o } }"
    assert _subjects(store, in_graph, QueryDataset(named_graphs=("urn:g2",))) == ["urn:b"]
    assert _subjects(store, select, QueryDataset(named_graphs=("urn:g2",))) == []


def test_describe_follows_skolem_iris_within_the_dataset(store: RegistryStore) -> None:
    """DESCRIBE's follow-up queries carry the original's dataset (on a remote store they go to
    the server too)."""
    described = _described(store, "DESCRIBE <urn:a>")
    assert "deep" in {t.object.value for t in described if isinstance(t.object, ox.Literal)}
    assert sum(is_skolem(t.subject) for t in described) == 2
    assert _described(store, "DESCRIBE <urn:a>", QueryDataset(default_graphs=("urn:g2",))) == []
    assert _described(store, "DESCRIBE <urn:a> FROM <urn:g2>") == []
