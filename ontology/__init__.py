"""tinyfleet.ontology: the fleet ontology, SHACL shapes, JSON-LD contexts and named queries.

The files are package data; this module names them and the namespaces they use,
so the registry, the importer and the queries spell every IRI the same way.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Final

HERE: Final = Path(__file__).resolve().parent
ONTOLOGY_PATH: Final = HERE / "tinyfleet.ttl"
SHAPES_PATH: Final = HERE / "shapes.ttl"
QUERIES_DIR: Final = HERE / "queries"
CONTEXTS_DIR: Final = HERE / "contexts"
#: W3C's JSON Schema for TD 1.1 instances, vendored as published (schemas/README.md).
TD_SCHEMA_PATH: Final = HERE / "schemas" / "td-json-schema-validation.json"

TF: Final = "https://w3id.org/tinyfleet#"
TD: Final = "https://www.w3.org/2019/wot/td#"
SOSA: Final = "http://www.w3.org/ns/sosa/"
SSN: Final = "http://www.w3.org/ns/ssn/"
SSN_SYSTEM: Final = "http://www.w3.org/ns/ssn/systems/"
S3N: Final = "https://w3id.org/s3n/"
S3N_HTTP: Final = "http://w3id.org/s3n/"  # how published data spells it; the S3N docs use https
NNET: Final = "https://w3id.org/tinyml-schema/neural-network-schema#"
S3N_EXTEND: Final = "https://w3id.org/tinyml-schema/neural-network-schema/s3n_extend/"
SOSA_EXTEND: Final = "https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/"
SSN_EXTEND: Final = "https://w3id.org/tinyml-schema/neural-network-schema/ssn_extend/"
PROV: Final = "http://www.w3.org/ns/prov#"
SCHEMA: Final = "https://schema.org/"
OM: Final = "http://www.ontology-of-units-of-measure.org/resource/om-2/"
DCT: Final = "http://purl.org/dc/terms/"
SAREF: Final = "https://saref.etsi.org/core/"  # SAREF 3; SAREF 1 and 2 (and the TD spec's examples):
SAREF_W3ID: Final = "https://w3id.org/saref#"
DISCOVERY: Final = "https://www.w3.org/2022/wot/discovery#"
RDF: Final = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
RDFS: Final = "http://www.w3.org/2000/01/rdf-schema#"
XSD: Final = "http://www.w3.org/2001/XMLSchema#"
OWL: Final = "http://www.w3.org/2002/07/owl#"
SH: Final = "http://www.w3.org/ns/shacl#"

#: Prefixes every named query and the SPARQL endpoint understand without declaring them.
PREFIXES: Final[dict[str, str]] = {
    "tf": TF,
    "td": TD,
    "sosa": SOSA,
    "ssn": SSN,
    "ssn-system": SSN_SYSTEM,
    "s3n": S3N,
    "nnet": NNET,
    "s3n_extend": S3N_EXTEND,
    "sosa_extend": SOSA_EXTEND,
    "ssn_extend": SSN_EXTEND,
    "prov": PROV,
    "schema": SCHEMA,
    "om": OM,
    "dct": DCT,
    "discovery": DISCOVERY,
    "rdf": RDF,
    "rdfs": RDFS,
    "xsd": XSD,
    "owl": OWL,
}

#: The JSON-LD contexts tinyfleet resolves offline (the machine may have no internet),
#: by the URL a document names them with.
TD_CONTEXT_URLS: Final = (
    "https://www.w3.org/2022/wot/td/v1.1",
    "https://www.w3.org/2019/wot/td/v1",
)
TINYFLEET_CONTEXT_URL: Final = "https://w3id.org/tinyfleet/context/v1"
_CONTEXT_FILES: Final = {
    **{url: "td-1.1.jsonld" for url in TD_CONTEXT_URLS},
    TINYFLEET_CONTEXT_URL: "tinyfleet-v1.jsonld",
}


def known_contexts() -> tuple[str, ...]:
    return tuple(_CONTEXT_FILES)


@cache
def _context_json(url: str) -> str:
    return (CONTEXTS_DIR / _CONTEXT_FILES[url]).read_text(encoding="utf-8")


def local_context(url: str) -> dict[str, Any] | None:
    """The inline `@context` object for a context URL tinyfleet ships, or None if unknown."""
    if url not in _CONTEXT_FILES:
        return None
    # A fresh copy each call: JSON-LD processing must never see a context another caller mutated.
    return json.loads(_context_json(url))["@context"]


def sparql_prologue() -> str:
    """PREFIX declarations for every prefix in PREFIXES."""
    return "".join(f"PREFIX {name}: <{iri}>\n" for name, iri in PREFIXES.items())
