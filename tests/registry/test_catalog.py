from __future__ import annotations

import pyoxigraph as ox
import pytest

from tinyfleet.ontology import catalog
from tinyfleet.ontology.catalog import QueryError, named_query, render, resolve_query


def test_every_named_query_parses_and_runs_on_an_empty_store() -> None:
    store = ox.Store()
    names = set(catalog.catalog())
    assert {
        "devices",
        "compatible-models",
        "devices-for-model",
        "per-gateway-counts",
        "stale-devices",
        "artifact-lineage",
        "eligible-devices",
    } <= names
    for name, query in catalog.catalog().items():
        values = {p.name: "urn:tinyfleet:x" for p in query.params if p.required}
        assert query.summary, name
        result = store.query(query.render(values), use_default_graph_as_union=True)
        assert isinstance(result, ox.QuerySolutions) and list(result) == []


def test_values_are_typed_and_cannot_change_the_query() -> None:
    text = render("eligible-devices", {"device_class": 'mcu") } DROP ALL #', "min_ram_kb": "64"})
    assert '"mcu\\") } DROP ALL #"' in text
    assert "?ramKB >= 64" in text
    ox.Store().query(text)  # still one well-formed query
    with pytest.raises(QueryError) as bad_iri:
        render("compatible-models", {"device": "urn:x> } DROP ALL { <urn:y"})
    assert bad_iri.value.param == "device"
    with pytest.raises(QueryError, match="not a valid decimal"):
        render("eligible-devices", {"min_ram_kb": "lots"})
    with pytest.raises(QueryError, match="dayTimeDuration"):
        render("stale-devices", {"older_than": "5 minutes"})


def test_prefixed_names_lists_and_required_parameters() -> None:
    text = render("eligible-devices", {"sensors": "sosa_extend:Camera, <urn:tinyfleet:sensor:x>"})
    assert (
        "<https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/Camera> <urn:tinyfleet:sensor:x>"
        in text
    )
    with pytest.raises(QueryError, match="needs parameter 'device'"):
        render("compatible-models")
    with pytest.raises(QueryError, match="has no parameter 'colour'"):
        render("devices", {"colour": "red"})
    with pytest.raises(QueryError, match="no named query 'nope'"):
        named_query("nope")


def test_resolve_query_accepts_sparql_or_a_named_query_with_arguments() -> None:
    sparql = "SELECT ?device WHERE { ?device a tf:Device }"
    assert resolve_query(sparql).endswith(
        sparql
    ) and "PREFIX tf: <https://w3id.org/tinyfleet#>" in resolve_query(sparql)
    text = resolve_query(
        'eligible-devices min_ram_kb=100 sensors="sosa_extend:Microphone sosa_extend:Camera"'
    )
    assert "?ramKB >= 100" in text and "sosa_extend/Microphone>" in text
    with pytest.raises(QueryError, match="NAME=VALUE"):
        resolve_query("eligible-devices min_ram_kb")


def test_a_clause_is_kept_only_when_its_parameter_has_a_value() -> None:
    query = catalog.parse_query_file("q", """\
#@ summary test
#@ param who iris = -- anyone
#@ param kind string = -- any kind
SELECT ?d WHERE { ?d a tf:Device .
  {{#who}}VALUES ?d { $who }{{/who}}
  {{#kind}}?d tf:deviceClass $kind .{{/kind}} }
""")
    assert "VALUES" not in query.render() and "deviceClass" not in query.render({"kind": "  "})
    text = query.render({"who": "urn:a urn:b", "kind": "mcu"})
    assert "VALUES ?d { <urn:a> <urn:b> }" in text and '?d tf:deviceClass "mcu" .' in text
    ox.Store().query(text)
    with pytest.raises(QueryError, match="names no declared parameter"):
        catalog.parse_query_file("bad", "#@ summary x\nSELECT * WHERE { {{#nope}}?s ?p ?o{{/nope}} }")
    with pytest.raises(QueryError, match="not closed"):
        catalog.parse_query_file("bad", "#@ param a iris = -- a\nSELECT * WHERE { {{#a}}?s ?p ?o }")
