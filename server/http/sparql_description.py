"""The SPARQL 1.1 Service Description an endpoint answers to a GET without parameters.

It states what the protocol leaves to each service: a query that names no dataset
(no FROM / FROM NAMED, no default-graph-uri / named-graph-uri) reads the union of
every named graph as its default graph (sd:UnionDefaultGraph); which languages the
endpoint accepts (updates only on /sparql, with the admin token); which result
formats it sends; and federation only when the operator allow-listed endpoints.
https://www.w3.org/TR/sparql11-service-description/
"""

from __future__ import annotations

import pyoxigraph as ox

from tinyfleet.ontology import RDF, RDFS
from tinyfleet.server.registry.sparql_updates import SKOLEM_PREFIX

SD = "http://www.w3.org/ns/sparql-service-description#"
_FORMATS = "http://www.w3.org/ns/formats/"
#: The W3C format IRIs of what the endpoint sends (sparql_results.RESULTS_FORMATS, GRAPH_FORMATS).
RESULT_FORMATS = (
    "SPARQL_Results_JSON", "SPARQL_Results_XML", "SPARQL_Results_CSV", "SPARQL_Results_TSV",
    "Turtle", "N-Triples", "JSON-LD",
)
_COMMENT = (
    "A query that names no dataset reads the union of every named graph (one per device, model "
    "artifact and imported document) as its default graph; FROM / FROM NAMED and default-graph-uri / "
    f"named-graph-uri name others. Blank nodes are stored as skolem IRIs ({SKOLEM_PREFIX}...): "
    "DESCRIBE returns concise bounded descriptions through them."
)


def service_description(endpoint: str, *, update: bool, federated: bool) -> list[ox.Triple]:
    service = ox.BlankNode()

    def about(predicate: str, value: ox.NamedNode | ox.Literal) -> ox.Triple:
        return ox.Triple(service, ox.NamedNode(predicate), value)

    languages = ["SPARQL11Query", *(["SPARQL11Update"] if update else [])]
    features = ["UnionDefaultGraph", *(["BasicFederatedQuery"] if federated else [])]
    return [
        about(RDF + "type", ox.NamedNode(SD + "Service")),
        about(SD + "endpoint", ox.NamedNode(endpoint)),
        *(about(SD + "supportedLanguage", ox.NamedNode(SD + name)) for name in languages),
        *(about(SD + "feature", ox.NamedNode(SD + name)) for name in features),
        *(about(SD + "resultFormat", ox.NamedNode(_FORMATS + name)) for name in RESULT_FORMATS),
        about(RDFS + "comment", ox.Literal(_COMMENT)),
    ]
