"""The registry: descriptions in, validated named graphs out, queries over the union.

`prepare` turns a description (TD JSON-LD or Turtle) into the triples of its
named graph or raises DescriptionInvalid with every problem found; `put` writes
prepared descriptions with one SPARQL Update (so a re-registration replaces the
device's graph atomically, and a projector can record its outbox sequence in
the same update). Each thing's graph also holds its registration information
(WoT Discovery terms) and, for JSON descriptions, the TD exactly as registered.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pyoxigraph as ox

from tinyfleet.ontology import DISCOVERY, ONTOLOGY_PATH, RDF, TF, XSD
from tinyfleet.ontology.catalog import render, resolve_query
from tinyfleet.server.registry import updates
from tinyfleet.server.registry.normalize import model_subjects, normalize_device, normalize_models
from tinyfleet.server.registry.store import RegistryStore
from tinyfleet.server.registry.thing_description import (
    DescriptionSyntaxError,
    load_json,
    media_kind,
    td_triples,
    turtle_triples,
)
from tinyfleet.server.registry.validation import DescriptionInvalid, Problem, ShaclValidator, check_td_json

_SCHEMA_HTTP: Final = "http://schema.org/"  # the WoT Discovery context maps registration terms here
_REGISTRATION: Final = ox.NamedNode(DISCOVERY + "hasRegistrationInformation")
_CREATED: Final = ox.NamedNode(_SCHEMA_HTTP + "dateCreated")
_MODIFIED: Final = ox.NamedNode(_SCHEMA_HTTP + "dateModified")
_EXPIRES: Final = ox.NamedNode(_SCHEMA_HTTP + "expires")
_TTL: Final = ox.NamedNode(DISCOVERY + "ttl")
_TD_DOCUMENT: Final = ox.NamedNode(TF + "tdDocument")
_RDF_JSON: Final = ox.NamedNode(RDF + "JSON")
_REG_NS: Final = uuid.UUID("0b7d1f43-54a6-4d3c-8c3e-4fb0b1f5a2d9")
_THING_TYPES: Final = (TF + "Device", "https://www.w3.org/2019/wot/td#Thing")
#: Accepted descriptions remembered by their input: enough for those between a registration's
#: SQL commit and its projection, which follows within a second.
PREPARED_CACHE_SIZE: Final = 1024

Listener = Callable[[str, str], None]


@dataclass(frozen=True)
class Prepared:
    """A validated description, ready to be written as the named graph `thing_id`."""

    thing_id: str
    triples: list[ox.Triple]
    document: dict[str, Any] | None
    ttl_s: int | None = None


@dataclass(frozen=True)
class Registration:
    created: dt.datetime
    modified: dt.datetime
    expires: dt.datetime | None
    ttl_s: int | None

    def as_json(self) -> dict[str, Any]:
        info: dict[str, Any] = {"created": _iso(self.created), "modified": _iso(self.modified)}
        if self.expires is not None:
            info["expires"] = _iso(self.expires)
        if self.ttl_s is not None:
            info["ttl"] = self.ttl_s
        return info


def _iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Registry:
    def __init__(self, store: RegistryStore, *, validator: ShaclValidator | None = None) -> None:
        self.store = store
        self._validator = validator or ShaclValidator.shared()
        self._write_lock = threading.Lock()
        self._prepared: OrderedDict[bytes, Prepared] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._ensure_ontology()

    # ---- listeners (directory events) -------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """`listener(event, thing_id)` after each committed change: thing_created/updated/deleted."""
        self._listeners.append(listener)

    def _emit(self, event: str, thing_id: str) -> None:
        for listener in list(self._listeners):
            listener(event, thing_id)

    # ---- descriptions -----------------------------------------------------------------------

    def prepare(
        self,
        data: bytes,
        media_type: str,
        *,
        thing_id: str | None = None,
        ttl_s: int | None = None,
    ) -> Prepared:
        """Parse, check, normalize and SHACL-validate one device description."""
        return self.prepare_many([(data, media_type, thing_id, ttl_s)])[0]

    def prepare_many(
        self, items: Sequence[tuple[bytes, str, str | None, int | None]], *, raise_first: bool = True
    ) -> list[Prepared | DescriptionInvalid]:
        """Like `prepare` for many descriptions, each judged on its own, with few SHACL runs;
        failures are returned in place (or the first raised, when `raise_first`).

        Accepted descriptions are remembered by their exact input (bounded LRU): the
        coordinator prepares a registration before its SQL commit and the projector the
        same bytes right after, and preparing is a pure function of the input."""
        keys = [_input_key(item) for item in items]
        parsed: list[Prepared | DescriptionInvalid] = []
        known: set[int] = set()
        with self._prepared_lock:
            remembered = {n: self._prepared.get(key) for n, key in enumerate(keys)}
        for number, (data, media_type, thing_id, ttl_s) in enumerate(items):
            hit = remembered[number]
            if hit is not None:
                parsed.append(hit)
                known.add(number)
                continue
            try:
                parsed.append(self.prepare_unvalidated(data, media_type, thing_id, ttl_s))
            except DescriptionInvalid as exc:
                parsed.append(exc)
        candidates = [n for n, p in enumerate(parsed) if isinstance(p, Prepared) and n not in known]
        problems = self._validator.validate_each([parsed[n].triples for n in candidates])  # type: ignore[union-attr]
        result: list[Prepared | DescriptionInvalid] = list(parsed)
        with self._prepared_lock:
            for number, found in zip(candidates, problems, strict=True):
                if found:
                    result[number] = DescriptionInvalid(found)
                else:
                    prepared = parsed[number]
                    assert isinstance(prepared, Prepared)
                    self._prepared[keys[number]] = prepared
                    data, media_type, thing_id, ttl_s = items[number]
                    if thing_id is None and prepared.document is not None:
                        # A JSON TD naming its own id prepares the same when the caller names the
                        # thing too, as the projector does with the device id SQL has.
                        self._prepared[_input_key((data, media_type, prepared.thing_id, ttl_s))] = prepared
            for number in known:
                self._prepared.move_to_end(keys[number])
            while len(self._prepared) > PREPARED_CACHE_SIZE:
                self._prepared.popitem(last=False)
        if raise_first:
            for item in result:
                if isinstance(item, DescriptionInvalid):
                    raise item
        return result

    def prepare_unvalidated(
        self, data: bytes, media_type: str, thing_id: str | None = None, ttl_s: int | None = None
    ) -> Prepared:
        """`prepare` without the SHACL run: for bulk loads of descriptions generated or
        validated elsewhere (the benchmark's bulk part)."""
        try:
            kind = media_kind(media_type)
            if kind == "json":
                document = load_json(data)
                if thing_id is not None and document.get("id") is None:
                    document["id"] = thing_id
                problems = check_td_json(document)
                if problems:
                    raise DescriptionInvalid(problems)
                if thing_id is not None and document["id"] != thing_id:
                    raise DescriptionInvalid(
                        [Problem("/id", f"is {document['id']!r} but the request is for {thing_id!r}")]
                    )
                ttl_s = _registration_ttl(document, ttl_s)
                document.pop("registration", None)  # directory-managed; recomputed on every write
                triples = td_triples(document)
                thing = document["id"]
            else:
                document = None
                triples = turtle_triples(data, base_iri=thing_id)
                thing = thing_id or _single_thing(triples)
        except DescriptionSyntaxError as exc:
            raise DescriptionInvalid([Problem(exc.path, exc.message)]) from exc
        triples = normalize_models(normalize_device(triples, thing))
        return Prepared(
            thing_id=thing, triples=updates.skolemize(triples, thing), document=document, ttl_s=ttl_s
        )

    def put(self, prepared: Prepared, *, seq: int | None = None) -> bool:
        """Write (create or replace) one thing; True when it did not exist before."""
        return self.put_many([prepared], seq=seq)[0]

    def validate_many(self, graphs: Sequence[Sequence[ox.Triple]]) -> list[list[Problem]]:
        return self._validator.validate_many(graphs)

    def put_many(
        self,
        items: Sequence[Prepared],
        *,
        extra_graphs: Mapping[str, list[ox.Triple]] | None = None,
        liveness: Mapping[str, tuple[bool, dt.datetime | None]] | None = None,
        deletes: Sequence[str] = (),
        seq: int | None = None,
    ) -> list[bool]:
        """Write many things (and already validated `extra_graphs`, e.g. imported models, and
        liveness changes) in ONE update: all or nothing. True per newly created thing."""
        if not items and not extra_graphs and not liveness and not deletes and seq is None:
            return []
        with self._write_lock:
            existing = self._registrations([p.thing_id for p in items])
            now = _now()
            operations = []
            created = []
            for prepared in items:
                previous = existing.get(prepared.thing_id)
                created.append(previous is None)
                registration = Registration(
                    created=previous.created if previous else now,
                    modified=now,
                    expires=now + dt.timedelta(seconds=prepared.ttl_s) if prepared.ttl_s else None,
                    ttl_s=prepared.ttl_s,
                )
                operations.append(
                    updates.replace_graph(prepared.thing_id, self._graph_triples(prepared, registration))
                )
            for graph, triples in (extra_graphs or {}).items():
                operations.append(updates.replace_graph(graph, triples))
            if liveness:
                operations.append(updates.liveness(liveness))
            if deletes:
                operations += [updates.drop_graphs(deletes), updates.forget_liveness(deletes)]
            if seq is not None:
                operations.append(updates.set_last_seq(seq))
            self.store.update(updates.combine(*operations))
        for prepared, is_new in zip(items, created, strict=True):
            self._emit("thing_created" if is_new else "thing_updated", prepared.thing_id)
        for thing_id in deletes:
            self._emit("thing_deleted", thing_id)
        return created

    def bulk_load(
        self, items: Sequence[Prepared], extra_graphs: Mapping[str, list[ox.Triple]] | None = None
    ) -> None:
        """Load many NEW things fast through the store's bulk loader (not one transaction:
        for initial loads and rebuilds, not for changes others may be reading)."""
        now = _now()
        quads: list[ox.Quad] = []
        for prepared in items:
            expires = now + dt.timedelta(seconds=prepared.ttl_s) if prepared.ttl_s else None
            registration = Registration(created=now, modified=now, expires=expires, ttl_s=prepared.ttl_s)
            graph = ox.NamedNode(prepared.thing_id)
            quads += [
                ox.Quad(t.subject, t.predicate, t.object, graph)
                for t in self._graph_triples(prepared, registration)
            ]
        for name, triples in (extra_graphs or {}).items():
            graph = ox.NamedNode(name)
            quads += [ox.Quad(t.subject, t.predicate, t.object, graph) for t in triples]
        with self._write_lock:
            self.store.load(ox.serialize(quads, format=ox.RdfFormat.N_QUADS), ox.RdfFormat.N_QUADS, bulk=True)

    def _graph_triples(self, prepared: Prepared, registration: Registration) -> list[ox.Triple]:
        thing = ox.NamedNode(prepared.thing_id)
        node = ox.NamedNode(f"urn:uuid:{uuid.uuid5(_REG_NS, prepared.thing_id)}")
        extra = [
            ox.Triple(thing, _REGISTRATION, node),
            ox.Triple(node, _CREATED, updates.datetime_literal(registration.created)),
            ox.Triple(node, _MODIFIED, updates.datetime_literal(registration.modified)),
        ]
        if registration.expires is not None:
            extra.append(ox.Triple(node, _EXPIRES, updates.datetime_literal(registration.expires)))
        if registration.ttl_s is not None:
            extra.append(
                ox.Triple(
                    node,
                    _TTL,
                    ox.Literal(str(registration.ttl_s), datatype=ox.NamedNode(XSD + "unsignedInt")),
                )
            )
        if prepared.document is not None:
            text = json.dumps(prepared.document, separators=(",", ":"), ensure_ascii=False)
            extra.append(ox.Triple(thing, _TD_DOCUMENT, ox.Literal(text, datatype=_RDF_JSON)))
        return prepared.triples + extra

    def put_graph(
        self, graph: str, triples: Iterable[ox.Triple], *, seq: int | None = None, also: str = ""
    ) -> None:
        """Replace a graph the coordinator itself describes (artifacts, rounds, deployments),
        SHACL-validated, in one update with `also` (e.g. a projection watermark)."""
        triples = updates.skolemize(list(triples), graph)
        problems = self._validator.validate(triples)
        if problems:
            raise DescriptionInvalid(problems)
        operations = [updates.replace_graph(graph, triples), also]
        if seq is not None:
            operations.append(updates.set_last_seq(seq))
        with self._write_lock:
            self.store.update(updates.combine(*operations))

    def delete(self, thing_id: str, *, seq: int | None = None) -> bool:
        """Remove a thing's graph and its liveness; False when there was nothing to remove."""
        with self._write_lock:
            existed = self.exists(thing_id)
            operations = [updates.drop_graphs([thing_id]), updates.forget_liveness([thing_id])]
            if seq is not None:
                operations.append(updates.set_last_seq(seq))
            self.store.update(updates.combine(*operations))
        if existed:
            self._emit("thing_deleted", thing_id)
        return existed

    def set_liveness(
        self, changes: Mapping[str, tuple[bool, dt.datetime | None]], *, seq: int | None = None
    ) -> None:
        """Mirror online/last-seen for many devices in one update (batched by the caller)."""
        operations = [updates.liveness(changes)]
        if seq is not None:
            operations.append(updates.set_last_seq(seq))
        if any(operations):
            with self._write_lock:
                self.store.update(updates.combine(*operations))

    def meta_value(self, prop: str) -> ox.Literal | None:
        query = (
            f"SELECT ?v WHERE {{ GRAPH <{updates.META_GRAPH}> {{ <{updates.REGISTRY_IRI}> <{prop}> ?v }} }}"
        )
        rows = self.select(query)
        return rows[0]["v"] if rows else None

    def last_applied_seq(self) -> int:
        pattern = f"<{updates.REGISTRY_IRI}> <{TF}lastAppliedSeq> ?seq"
        query = f"SELECT ?seq WHERE {{ GRAPH <{updates.META_GRAPH}> {{ {pattern} }} }}"
        rows = list(self.store.query(query))  # type: ignore[arg-type]
        return int(rows[0]["seq"].value) if rows else 0

    # ---- reading ----------------------------------------------------------------------------

    def exists(self, thing_id: str) -> bool:
        return bool(self.store.query(f"ASK {{ GRAPH {ox.NamedNode(thing_id)} {{ ?s ?p ?o }} }}"))

    def _registrations(self, thing_ids: Sequence[str]) -> dict[str, Registration]:
        # One small query per thing with the graph named: Oxigraph does not push VALUES
        # into GRAPH ?g, and a join over every registration costs O(fleet).
        found = {}
        for thing_id in thing_ids:
            name = ox.NamedNode(thing_id)
            query = f"""SELECT ?created ?modified ?expires ?ttl WHERE {{
              GRAPH {name} {{ {name} {_REGISTRATION} ?r . ?r {_CREATED} ?created ; {_MODIFIED} ?modified .
                OPTIONAL {{ ?r {_EXPIRES} ?expires }} OPTIONAL {{ ?r {_TTL} ?ttl }} }} }}"""
            for row in self.store.query(query):  # type: ignore[union-attr]
                expires, ttl = row["expires"], row["ttl"]
                found[thing_id] = Registration(
                    created=dt.datetime.fromisoformat(row["created"].value),
                    modified=dt.datetime.fromisoformat(row["modified"].value),
                    expires=dt.datetime.fromisoformat(expires.value) if expires is not None else None,
                    ttl_s=int(ttl.value) if ttl is not None else None,
                )
        return found

    def registration(self, thing_id: str) -> Registration | None:
        return self._registrations([thing_id]).get(thing_id)

    def document(self, thing_id: str) -> dict[str, Any] | None:
        """The thing as JSON: the TD as registered (or JSON-LD of a Turtle description),
        with the directory's `registration` information."""
        registration = self.registration(thing_id)
        if registration is None:
            return None
        name = ox.NamedNode(thing_id)
        rows = list(
            self.store.query(  # type: ignore[arg-type]
                f"SELECT ?doc WHERE {{ GRAPH {name} {{ {name} {_TD_DOCUMENT} ?doc }} }}"
            )
        )
        if rows:
            document = json.loads(rows[0]["doc"].value)
        else:
            triples = self.graph_triples(thing_id)
            document = {
                "@context": "https://www.w3.org/2022/wot/td/v1.1",
                "id": thing_id,
                "@graph": json.loads(ox.serialize(triples, format=ox.RdfFormat.JSON_LD)),
            }
        document["registration"] = registration.as_json()
        return document

    def graph_triples(self, graph: str) -> list[ox.Triple]:
        name = ox.NamedNode(graph)
        result = self.store.query(f"CONSTRUCT {{ ?s ?p ?o }} WHERE {{ GRAPH {name} {{ ?s ?p ?o }} }}")
        return list(result)  # type: ignore[arg-type]

    def thing_ids(self, *, offset: int = 0, limit: int | None = None) -> tuple[list[str], int]:
        """Registered things (devices with a registration), by IRI, and how many there are in total."""
        count_query = f"SELECT (COUNT(DISTINCT ?g) AS ?n) WHERE {{ GRAPH ?g {{ ?g {_REGISTRATION} ?r }} }}"
        total = int(next(iter(self.store.query(count_query)))["n"].value)  # type: ignore[arg-type]
        page = f" LIMIT {int(limit)}" if limit is not None else ""
        query = (
            f"SELECT DISTINCT ?g WHERE {{ GRAPH ?g {{ ?g {_REGISTRATION} ?r }} }} "
            f"ORDER BY ?g OFFSET {int(offset)}{page}"
        )
        return [row["g"].value for row in self.store.query(query)], total  # type: ignore[union-attr]

    def expired(self, now: dt.datetime | None = None) -> list[str]:
        stamp = updates.datetime_literal(now or _now())
        query = f"""SELECT DISTINCT ?g WHERE {{ GRAPH ?g {{ ?g {_REGISTRATION} ?r . ?r {_EXPIRES} ?e }}
                    FILTER(?e <= {stamp}) }}"""
        return [row["g"].value for row in self.store.query(query)]  # type: ignore[union-attr]

    def purge_expired(self, now: dt.datetime | None = None) -> list[str]:
        gone = self.expired(now)
        for thing in gone:
            self.delete(thing)
        return gone

    def select(self, sparql: str) -> list[dict[str, Any]]:
        """Rows of a SELECT as {variable: pyoxigraph term or None}."""
        result = self.store.query(sparql)
        try:
            if not isinstance(result, ox.QuerySolutions):
                raise ValueError("expected a SELECT query")
            names = [v.value for v in result.variables]
            return [{name: row[name] for name in names} for row in result]
        finally:
            del result  # pyoxigraph iterators must die in the thread that made them

    def named(self, name: str, params: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        return self.select(render(name, params))

    def eligible(self, spec: str) -> list[str]:
        """Device IRIs a job's `eligible` query (SPARQL or named query) selects, via ?device."""
        rows = self.select(resolve_query(spec))
        if rows and "device" not in rows[0]:
            raise ValueError("an eligibility query must SELECT ?device")
        return sorted({row["device"].value for row in rows if row.get("device") is not None})

    # ---- setup ------------------------------------------------------------------------------

    def _ensure_ontology(self) -> None:
        graph = ox.NamedNode(updates.ONTOLOGY_GRAPH)
        if not self.store.query(f"ASK {{ GRAPH {graph} {{ ?s ?p ?o }} }}"):
            triples = [q.triple for q in ox.parse(path=str(ONTOLOGY_PATH), format=ox.RdfFormat.TURTLE)]
            self.store.update(
                updates.replace_graph(updates.ONTOLOGY_GRAPH, updates.skolemize(triples, "ontology"))
            )


def _input_key(item: tuple[bytes, str, str | None, int | None]) -> bytes:
    data, media_type, thing_id, ttl_s = item
    digest = hashlib.blake2b(data, digest_size=16)
    digest.update(repr((media_type, thing_id, ttl_s)).encode())
    return digest.digest()


def _registration_ttl(document: dict[str, Any], ttl_s: int | None) -> int | None:
    if ttl_s is not None:
        return ttl_s
    registration = document.get("registration")
    if isinstance(registration, dict) and "ttl" in registration:
        ttl = registration["ttl"]
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0:
            raise DescriptionInvalid(
                [Problem("/registration/ttl", f"must be a positive integer of seconds, got {ttl!r}")]
            )
        return ttl
    return None


def _single_thing(triples: list[ox.Triple]) -> str:
    """The one subject a Turtle description is about: typed td:Thing or tf:Device, else a model."""
    typed = {
        t.subject.value
        for t in triples
        if t.predicate.value == RDF + "type"
        and t.object.value in _THING_TYPES
        and isinstance(t.subject, ox.NamedNode)
    }
    if not typed:
        smart = {
            t.subject.value
            for t in triples
            if t.predicate.value == RDF + "type"
            and t.object.value.endswith("/SmartSensor")
            and isinstance(t.subject, ox.NamedNode)
        }
        typed = smart
    if not typed and model_subjects(triples):
        raise DescriptionInvalid(
            [Problem("", "this describes models, not a device; import it with `tinyfleet registry import`")]
        )
    if len(typed) != 1:
        what = (
            "no subject typed td:Thing, tf:Device or s3n:SmartSensor"
            if not typed
            else f"{len(typed)} things ({', '.join(sorted(typed))})"
        )
        raise DescriptionInvalid(
            [Problem("", f"a Turtle device description must describe one device; found {what}")]
        )
    return typed.pop()
