"""Unused scoped contexts are left out of a TD's @context: the triples must not change."""

from __future__ import annotations

import json
from typing import Any

import pyoxigraph as ox
import rdflib
from rdflib.compare import isomorphic

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.ontology import TD_CONTEXT_URLS, local_context
from tinyfleet.server.registry.thing_description import td_triples

RICH_TD: dict[str, Any] = {
    "@context": [TD_CONTEXT_URLS[0], {"ex": "https://example.org/ns#"}],
    "id": "urn:tinyfleet:device:rich",
    "@type": ["Thing", "ex:Sensor"],
    "title": "rich",
    "version": {"instance": "1.2.0"},
    "securityDefinitions": {"basic_sc": {"scheme": "basic", "in": "header"}},
    "security": "basic_sc",
    "properties": {
        "temp": {
            "type": "number",
            "unit": "ex:celsius",
            "readOnly": True,
            "forms": [{"href": "https://example.org/t", "op": ["readproperty"], "contentType": "text/csv"}],
        }
    },
    "actions": {"reset": {"forms": [{"href": "https://example.org/reset"}], "idempotent": True}},
    "events": {"alarm": {"data": {"type": "string"}, "forms": [{"href": "https://example.org/alarm"}]}},
    "links": [{"href": "https://example.org/manual", "rel": "service-doc"}],
}


def _graph(triples: list[ox.Triple]) -> rdflib.Graph:
    data = ox.serialize(triples, format=ox.RdfFormat.N_TRIPLES)
    return rdflib.Graph().parse(data=data, format="nt")


def _unpruned(document: dict[str, Any]) -> list[ox.Triple]:
    contexts = [local_context(c) or c if isinstance(c, str) else c for c in document["@context"]]
    text = json.dumps({**document, "@context": contexts}).encode()
    return [q.triple for q in ox.parse(text, format=ox.RdfFormat.JSON_LD)]


def test_pruned_contexts_give_the_same_triples() -> None:
    small = device_thing_description("urn:tinyfleet:device:s", title="s", ram_kb=64, flash_kb=256,
                                     sensors=("Accelerometer",), gateway="urn:tinyfleet:device:gw")
    for document in (RICH_TD, small):
        pruned, full = td_triples(document), _unpruned(document)
        assert len(pruned) == len(full) > 5
        assert isomorphic(_graph(pruned), _graph(full))
    assert any(t.predicate.value.endswith("#hasPropertyAffordance") for t in td_triples(RICH_TD))
