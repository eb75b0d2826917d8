"""The text of every registry change: one SPARQL Update per change, so each applies atomically.

Blank nodes never reach a store: `skolemize` replaces them with IRIs derived from
the graph they belong to and their order of appearance, so the same description
always yields the same IRIs, a remote server cannot rename them, and a later
change can address them. Skolem IRIs share one prefix (SKOLEM_PREFIX), so readers
can still treat them as the blank nodes they were: a DESCRIBE follows them
(concise_description).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, TypeGuard

import pyoxigraph as ox

from tinyfleet.ontology import TF, XSD

META_GRAPH: Final = "urn:tinyfleet:graph:meta"
LIVENESS_GRAPH: Final = "urn:tinyfleet:graph:liveness"
ONTOLOGY_GRAPH: Final = "urn:tinyfleet:graph:ontology"
REGISTRY_IRI: Final = "urn:tinyfleet:registry"
_GENID_NS: Final = uuid.UUID("6f1c7a52-3d7e-4d0a-9a59-1f0c1c0f7e11")
#: Every skolem IRI starts so; nothing else the registry names does.
SKOLEM_PREFIX: Final = "urn:tinyfleet:genid:"


def skolemize(triples: Iterable[ox.Triple | ox.Quad], graph: str) -> list[ox.Triple]:
    """Triples with every blank node replaced by a skolem IRI stable for (graph, position)."""
    names: dict[str, ox.NamedNode] = {}

    def name(blank: ox.BlankNode) -> ox.NamedNode:
        named = names.get(blank.value)
        if named is None:
            key = f"{graph}#{len(names)}"
            named = names[blank.value] = ox.NamedNode(f"{SKOLEM_PREFIX}{uuid.uuid5(_GENID_NS, key)}")
        return named

    result = []
    for item in triples:
        triple = item.triple if isinstance(item, ox.Quad) else item
        subject, obj = triple.subject, triple.object
        result.append(
            ox.Triple(
                name(subject) if isinstance(subject, ox.BlankNode) else subject,
                triple.predicate,
                name(obj) if isinstance(obj, ox.BlankNode) else obj,
            )
        )
    return result


def is_skolem(term: object) -> TypeGuard[ox.NamedNode]:
    """A skolem IRI: a blank node of the description it came from."""
    return isinstance(term, ox.NamedNode) and term.value.startswith(SKOLEM_PREFIX)


def _body(triples: Iterable[ox.Triple]) -> str:
    return "\n".join(f"{t.subject} {t.predicate} {t.object} ." for t in triples)


def replace_graph(graph: str, triples: Iterable[ox.Triple]) -> str:
    """Drop the graph and write its new content: a reader sees the old or the new graph, never a mix."""
    name = ox.NamedNode(graph)
    return f"DROP SILENT GRAPH {name} ;\nINSERT DATA {{ GRAPH {name} {{\n{_body(triples)}\n}} }}"


def drop_graphs(graphs: Iterable[str]) -> str:
    return " ;\n".join(f"DROP SILENT GRAPH {ox.NamedNode(g)}" for g in graphs)


def set_last_seq(seq: int) -> str:
    """Records the last applied outbox sequence; appended to the change it belongs to."""
    meta, registry, prop = (
        ox.NamedNode(META_GRAPH),
        ox.NamedNode(REGISTRY_IRI),
        ox.NamedNode(TF + "lastAppliedSeq"),
    )
    return (
        f"DELETE WHERE {{ GRAPH {meta} {{ {registry} {prop} ?seq }} }} ;\n"
        f"INSERT DATA {{ GRAPH {meta} {{ {registry} {prop} {int(seq)} }} }}"
    )


def set_meta(prop: str, value: ox.Literal) -> str:
    """Replace one value of the registry's own metadata (e.g. a projection watermark)."""
    meta, registry, name = ox.NamedNode(META_GRAPH), ox.NamedNode(REGISTRY_IRI), ox.NamedNode(prop)
    return (
        f"DELETE WHERE {{ GRAPH {meta} {{ {registry} {name} ?value }} }} ;\n"
        f"INSERT DATA {{ GRAPH {meta} {{ {registry} {name} {value} }} }}"
    )


def combine(*updates: str) -> str:
    """Several operations as one update request (applied in one transaction)."""
    return " ;\n".join(u for u in updates if u)


def datetime_literal(when: dt.datetime) -> ox.Literal:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return ox.Literal(when.astimezone(dt.UTC).isoformat(), datatype=ox.NamedNode(XSD + "dateTime"))


def liveness(changes: Mapping[str, tuple[bool, dt.datetime | None]]) -> str:
    """Set tf:online / tf:lastSeen for many devices at once (the liveness graph only)."""
    if not changes:
        return ""
    graph = ox.NamedNode(LIVENESS_GRAPH)
    online, last_seen = ox.NamedNode(TF + "online"), ox.NamedNode(TF + "lastSeen")
    lines = []
    for device, (is_online, seen) in changes.items():
        subject = ox.NamedNode(device)
        lines.append(f"{subject} {online} {'true' if is_online else 'false'} .")
        if seen is not None:
            lines.append(f"{subject} {last_seen} {datetime_literal(seen)} .")
    insert = f"INSERT DATA {{ GRAPH {graph} {{\n" + "\n".join(lines) + "\n} }"
    return combine(forget_liveness(changes), insert)


def forget_liveness(devices: Iterable[str]) -> str:
    # One DELETE per device with the subject named: index lookups, not a scan of the graph.
    graph = ox.NamedNode(LIVENESS_GRAPH)
    return " ;\n".join(f"DELETE WHERE {{ GRAPH {graph} {{ {ox.NamedNode(d)} ?p ?o }} }}" for d in devices)


def insert_data_chunks(quads: Iterable[ox.Quad], max_triples: int = 5000) -> Iterator[str]:
    """INSERT DATA updates of at most `max_triples` each, grouped by graph, blank nodes skolemized."""
    by_graph: dict[str, list[ox.Quad]] = {}
    for quad in quads:
        graph = quad.graph_name
        key = graph.value if isinstance(graph, ox.NamedNode) else ""
        by_graph.setdefault(key, []).append(quad)
    for graph_iri, items in by_graph.items():
        triples = skolemize(items, graph_iri or "default")
        for start in range(0, len(triples), max_triples):
            body = _body(triples[start : start + max_triples])
            if graph_iri:
                yield f"INSERT DATA {{ GRAPH {ox.NamedNode(graph_iri)} {{\n{body}\n}} }}"
            else:
                yield f"INSERT DATA {{\n{body}\n}}"
