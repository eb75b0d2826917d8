"""Which dataset a query reads, on both backends: the query's head read without a parser, the
embedded store's datasets, a remote server's (or its refusal), and DESCRIBE through skolem IRIs."""

from __future__ import annotations

import pyoxigraph as ox
import pytest

from tinyfleet.server.registry.query_dataset import QueryDataset, QueryHead, read_head
from tinyfleet.server.registry.sparql_updates import insert_data_chunks, is_skolem
from tinyfleet.server.registry.store import EmbeddedStore, RegistryStore, RemoteStore

from .test_remote_store import oxigraph_server  # noqa: F401  (the fixture)


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


def test_the_embedded_store_reads_the_dataset_asked_for() -> None:
    store = EmbeddedStore(None)
    try:
        _load(store)
        select = "SELECT ?s WHERE { ?s <urn:p> ?o }"
        assert _subjects(store, select) == ["urn:a", "urn:a", "urn:b"]
        assert _subjects(store, "SELECT ?s FROM <urn:g2> WHERE { ?s <urn:p> ?o }") == ["urn:b"]
        assert _subjects(store, select, QueryDataset(default_graphs=("urn:g2",))) == ["urn:b"]
        overridden = "SELECT ?s FROM <urn:g1> WHERE { ?s <urn:p> ?o }"
        assert _subjects(store, overridden, QueryDataset(default_graphs=("urn:g2",))) == ["urn:b"]
        in_graph = "SELECT ?s WHERE { GRAPH ?g { ?s <urn:p> ?o } }"
        assert _subjects(store, in_graph, QueryDataset(named_graphs=("urn:g2",))) == ["urn:b"]
        assert _subjects(store, select, QueryDataset(named_graphs=("urn:g2",))) == []
        described = _described(store, "DESCRIBE <urn:a>")
        assert "deep" in {t.object.value for t in described if isinstance(t.object, ox.Literal)}
        assert sum(is_skolem(t.subject) for t in described) == 2
        assert _described(store, "DESCRIBE <urn:a>", QueryDataset(default_graphs=("urn:g2",))) == []
        assert _described(store, "DESCRIBE <urn:a> FROM <urn:g2>") == []
    finally:
        store.close()


def test_a_remote_store_passes_the_dataset_on_and_describe_follows_skolem_iris_there(
    oxigraph_server: str,  # noqa: F811
) -> None:
    """The protocol dataset goes to the server as request parameters, and so does FROM: `oxigraph
    serve --union-default-graph` reads the union whatever FROM says, but applies the parameters.
    DESCRIBE's follow-up queries go to the server as well."""
    store = RemoteStore(oxigraph_server)
    try:
        _load(store)
        select = "SELECT ?s WHERE { ?s <urn:p> ?o }"
        assert _subjects(store, select) == ["urn:a", "urn:a", "urn:b"]
        assert _subjects(store, "SELECT ?s FROM <urn:g2> WHERE { ?s <urn:p> ?o }") == ["urn:b"]
        prefixed = "BASE <urn:> PREFIX g: <urn:g>\nSELECT ?s FROM g:2 FROM NAMED <g1> WHERE { ?s <urn:p> ?o }"
        assert _subjects(store, prefixed) == ["urn:b"]
        named = "SELECT ?s FROM NAMED <urn:g2> WHERE { GRAPH ?g { ?s <urn:p> ?o } }"
        assert _subjects(store, named) == ["urn:b"]
        assert _subjects(store, select, QueryDataset(default_graphs=("urn:g2",))) == ["urn:b"]
        assert _subjects(store, select, QueryDataset(named_graphs=("urn:g2",))) == []
        described = _described(store, "DESCRIBE <urn:a>")
        assert "deep" in {t.object.value for t in described if isinstance(t.object, ox.Literal)}
        assert sum(is_skolem(t.subject) for t in described) == 2
        assert _described(store, "DESCRIBE <urn:a> FROM <urn:g2>") == []
    finally:
        store.close()
