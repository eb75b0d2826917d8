"""The registry: descriptions in, validated named graphs out, queries over the union.

`prepare` turns a description (TD JSON-LD or Turtle) into the triples of its
named graph or raises DescriptionInvalid with every problem found (a description
speaks only for its device: see validation.scope_problems; limits on size, JSON
depth and ids come first: `parse_description`); `put` writes
prepared descriptions with one SPARQL Update (so a re-registration replaces the
device's graph atomically, and a projector can record its outbox sequence in
the same update). Each thing's graph also holds its registration information
(WoT Discovery terms) and, for JSON descriptions, the TD exactly as registered.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final

import pyoxigraph as ox

from tinyfleet.common.device_description import (
    DescriptionInvalid,
    Problem,
    device_subject,
    iri_problem,
    media_kind,
    td_id,
    td_problems,
    turtle_triples,
)
from tinyfleet.ontology import DISCOVERY, ONTOLOGY_PATH, RDF, TF, XSD
from tinyfleet.ontology.catalog import render, resolve_query
from tinyfleet.server.descriptions import DescriptionLimits, ValidationUnavailable, unprocessable
from tinyfleet.server.registry import sparql_updates
from tinyfleet.server.registry.normalize import DEVICE, normalize_device, normalize_models
from tinyfleet.server.registry.store import RegistryStore
from tinyfleet.server.registry.thing_description import load_json, td_triples
from tinyfleet.server.registry.validation import ShaclValidator, is_inside, scope_problems
from tinyfleet.server.registry.worker_process import (
    KillableWorker,
    WorkerClosed,
    WorkerStopped,
    WorkerTimeout,
)

_SCHEMA_HTTP: Final = "http://schema.org/"  # the WoT Discovery context maps registration terms here
_REGISTRATION: Final = ox.NamedNode(DISCOVERY + "hasRegistrationInformation")
_CREATED: Final = ox.NamedNode(_SCHEMA_HTTP + "dateCreated")
_MODIFIED: Final = ox.NamedNode(_SCHEMA_HTTP + "dateModified")
_EXPIRES: Final = ox.NamedNode(_SCHEMA_HTTP + "expires")
_TTL: Final = ox.NamedNode(DISCOVERY + "ttl")
_TD_DOCUMENT: Final = ox.NamedNode(TF + "tdDocument")
_RDF_JSON: Final = ox.NamedNode(RDF + "JSON")
_REG_NS: Final = uuid.UUID("0b7d1f43-54a6-4d3c-8c3e-4fb0b1f5a2d9")
_TYPE: Final = ox.NamedNode(RDF + "type")
#: Devices of the fleet (typed tf:Device in their own graph): no job selects anything else.
_FLEET_DEVICES: Final = f"SELECT ?device WHERE {{ GRAPH ?device {{ ?device {_TYPE} {DEVICE} }} }}"
#: The registry's and the coordinator's own IRIs (graphs, artifacts, jobs and rounds): no device
#: may be named by one, or by an IRI they are under, since its graph would replace theirs.
RESERVED_IRIS: Final = (
    "urn:tinyfleet:graph",
    "urn:tinyfleet:registry",
    "urn:tinyfleet:artifact",
    "urn:tinyfleet:job",
    "urn:tinyfleet:directory",
)
#: Accepted descriptions remembered by their input: enough for those between a registration's
#: SQL commit and its projection, which follows within a second.
PREPARED_CACHE_SIZE: Final = 1024

Listener = Callable[[str, str], None]
log = logging.getLogger(__name__)


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
    def __init__(
        self,
        store: RegistryStore,
        *,
        validator: ShaclValidator | None = None,
        limits: DescriptionLimits | None = None,
    ) -> None:
        self.store = store
        #: Size and nesting bounds on descriptions; the coordinator sets them from its options.
        self.limits = limits or DescriptionLimits()
        self._validator = validator or ShaclValidator.shared()
        #: Where descriptions over `limits.large_bytes` are prepared; closed at the coordinator's stop.
        self.large_descriptions = LargeDescriptions()
        self._write_lock = threading.Lock()
        #: Writes made through this registry, counted: what was read at one count holds until the next.
        self._writes = 0
        self._fleet: tuple[int, frozenset[str]] = (-1, frozenset())
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
        for_training: bool = False,
    ) -> Prepared:
        """Parse, check, normalize and SHACL-validate one description (`for_training`: see
        `parse_description`)."""
        prepared = self.prepare_many([(data, media_type, thing_id, ttl_s)], for_training=for_training)[0]
        if isinstance(prepared, DescriptionInvalid):  # prepare_many raised it already (raise_first)
            raise prepared
        return prepared

    def prepare_many(
        self,
        items: Sequence[tuple[bytes, str, str | None, int | None]],
        *,
        raise_first: bool = True,
        for_training: bool = False,
    ) -> list[Prepared | DescriptionInvalid]:
        """Like `prepare` for many descriptions, each judged on its own, with few SHACL runs;
        failures are returned in place (or the first raised, when `raise_first`). Whatever
        goes wrong with one description (including an unexpected exception) fails it alone.
        Descriptions over `limits.large_bytes` are prepared, one at a time, in a worker
        process with the fleet shapes (LargeDescriptions), never in this process's run; once
        that is closed (the coordinator stopping), ValidationUnavailable is raised for the batch.

        Accepted descriptions are remembered by their exact input (bounded LRU): the
        coordinator prepares a registration before its SQL commit and the projector the
        same bytes right after, and preparing is a pure function of the input. One accepted
        `for_training` is a fleet device by its own facts, so it prepares the same without;
        one accepted without is reused `for_training` only if it is a fleet device."""
        keys = [_input_key(item) for item in items]
        parsed: list[Prepared | DescriptionInvalid] = []
        known: set[int] = set()
        with self._prepared_lock:
            remembered = {n: self._prepared.get(key) for n, key in enumerate(keys)}
        large: dict[int, Prepared | DescriptionInvalid] = {}
        for number, (data, media_type, thing_id, ttl_s) in enumerate(items):
            hit = remembered[number]
            if hit is not None and (not for_training or _is_fleet_device(hit)):
                parsed.append(hit)
                known.add(number)
                continue
            try:
                if self.limits.large_bytes < len(data) <= self.limits.max_bytes:
                    large[number] = self.large_descriptions.prepare(items[number], self.limits, for_training)
                    parsed.append(large[number])
                else:
                    limits = self.limits
                    parsed.append(parse_description(data, media_type, thing_id, ttl_s, limits, for_training))
            except DescriptionInvalid as exc:
                parsed.append(exc)
            except ValidationUnavailable:  # stopping: no verdict on anyone (the projector retries later)
                raise
            except Exception as exc:  # a parser's limit or a bug: this description fails, not the batch
                parsed.append(_unprocessable(exc))
        done = known | set(large)
        small = {n: p for n, p in enumerate(parsed) if isinstance(p, Prepared) and n not in done}
        found = self._validate_each(self._validator, list(small.values()))
        verdicts = dict(zip(small, found, strict=True))
        # Large ones come back validated (or refused, and then they are no candidates).
        fresh = {**small, **{n: p for n, p in large.items() if isinstance(p, Prepared)}}
        candidates = list(fresh)
        result: list[Prepared | DescriptionInvalid] = list(parsed)
        with self._prepared_lock:
            for number in candidates:
                verdict = verdicts.get(number)
                if verdict is not None:
                    result[number] = verdict
                else:
                    prepared = fresh[number]
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

    @staticmethod
    def _validate_each(
        validator: ShaclValidator, prepared: Sequence[Prepared]
    ) -> list[DescriptionInvalid | None]:
        """SHACL verdicts (None: conforms); a run that raises is split so the description at
        fault fails alone."""
        if not prepared:
            return []
        try:
            found = validator.validate_each([p.triples for p in prepared])
        except Exception as exc:
            if len(prepared) == 1:
                return [_unprocessable(exc)]
            return [Registry._validate_each(validator, [p])[0] for p in prepared]
        return [DescriptionInvalid(problems) if problems else None for problems in found]

    def prepare_unvalidated(
        self, data: bytes, media_type: str, thing_id: str | None = None, ttl_s: int | None = None
    ) -> Prepared:
        """`prepare` without the SHACL run: for bulk loads of descriptions generated or
        validated elsewhere (the benchmark's bulk part). See `parse_description`."""
        return parse_description(data, media_type, thing_id, ttl_s, self.limits)

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
                    sparql_updates.replace_graph(
                        prepared.thing_id, self._graph_triples(prepared, registration)
                    )
                )
            for graph, triples in (extra_graphs or {}).items():
                operations.append(sparql_updates.replace_graph(graph, triples))
            if liveness:
                operations.append(sparql_updates.liveness(liveness))
            if deletes:
                operations += [sparql_updates.drop_graphs(deletes), sparql_updates.forget_liveness(deletes)]
            if seq is not None:
                operations.append(sparql_updates.set_last_seq(seq))
            self._update(sparql_updates.combine(*operations))
        for prepared, is_new in zip(items, created, strict=True):
            self._emit("thing_created" if is_new else "thing_updated", prepared.thing_id)
        for thing_id in deletes:
            self._emit("thing_deleted", thing_id)
        return created

    def apply_update(self, update: str, *, seq: int | None = None) -> None:
        """Run an operator's SPARQL Update and record `seq` in the same request (one transaction).

        The sequence goes last, after the operator's text, so an update that drops everything
        cannot erase the record of having run. The text is joined with ";" unless it already
        ends with one (a second would not parse): SyntaxError means the text itself is bad.
        RuntimeError is the store refusing it (e.g. CREATE of a graph that exists)."""
        if seq is None:
            joins = [update]
        else:
            recorded = sparql_updates.set_last_seq(seq)
            joins = [f"{update}\n;\n{recorded}", f"{update}\n{recorded}"]
        with self._write_lock:
            for number, text in enumerate(joins):
                try:
                    self._update(text)
                    return
                except SyntaxError:
                    if number == len(joins) - 1:
                        raise

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
            self.store.load(_serialized(quads, ox.RdfFormat.N_QUADS), ox.RdfFormat.N_QUADS, bulk=True)
            self._writes += 1

    def _graph_triples(self, prepared: Prepared, registration: Registration) -> list[ox.Triple]:
        thing = ox.NamedNode(prepared.thing_id)
        node = ox.NamedNode(f"urn:uuid:{uuid.uuid5(_REG_NS, prepared.thing_id)}")
        extra = [
            ox.Triple(thing, _REGISTRATION, node),
            ox.Triple(node, _CREATED, sparql_updates.datetime_literal(registration.created)),
            ox.Triple(node, _MODIFIED, sparql_updates.datetime_literal(registration.modified)),
        ]
        if registration.expires is not None:
            extra.append(ox.Triple(node, _EXPIRES, sparql_updates.datetime_literal(registration.expires)))
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
        triples = sparql_updates.skolemize(list(triples), graph)
        problems = self._validator.validate(triples)
        if problems:
            raise DescriptionInvalid(problems)
        operations = [sparql_updates.replace_graph(graph, triples), also]
        if seq is not None:
            operations.append(sparql_updates.set_last_seq(seq))
        with self._write_lock:
            self._update(sparql_updates.combine(*operations))

    def delete(self, thing_id: str, *, seq: int | None = None) -> bool:
        """Remove a thing's graph and its liveness; False when there was nothing to remove."""
        with self._write_lock:
            existed = self.exists(thing_id)
            operations = [sparql_updates.drop_graphs([thing_id]), sparql_updates.forget_liveness([thing_id])]
            if seq is not None:
                operations.append(sparql_updates.set_last_seq(seq))
            self._update(sparql_updates.combine(*operations))
        if existed:
            self._emit("thing_deleted", thing_id)
        return existed

    def set_liveness(
        self, changes: Mapping[str, tuple[bool, dt.datetime | None]], *, seq: int | None = None
    ) -> None:
        """Mirror online/last-seen for many devices in one update (batched by the caller)."""
        operations = [sparql_updates.liveness(changes)]
        if seq is not None:
            operations.append(sparql_updates.set_last_seq(seq))
        if any(operations):
            with self._write_lock:
                self._update(sparql_updates.combine(*operations))

    def meta_value(self, prop: str) -> ox.Literal | None:
        meta, registry = sparql_updates.META_GRAPH, sparql_updates.REGISTRY_IRI
        query = f"SELECT ?v WHERE {{ GRAPH <{meta}> {{ <{registry}> <{prop}> ?v }} }}"
        rows = self.select(query)
        return rows[0]["v"] if rows else None

    def _select(self, query: str) -> ox.QuerySolutions:
        """The rows of one of the registry's own SELECTs (`store.query` types every result form)."""
        result = self.store.query(query)
        if not isinstance(result, ox.QuerySolutions):
            raise TypeError(f"the store answered a SELECT with {type(result).__name__}")
        return result

    def last_applied_seq(self) -> int:
        pattern = f"<{sparql_updates.REGISTRY_IRI}> <{TF}lastAppliedSeq> ?seq"
        query = f"SELECT ?seq WHERE {{ GRAPH <{sparql_updates.META_GRAPH}> {{ {pattern} }} }}"
        rows = list(self._select(query))
        return int(rows[0]["seq"].value) if rows else 0

    # ---- reading ----------------------------------------------------------------------------

    def exists(self, thing_id: str) -> bool:
        if iri_problem(thing_id) is not None:  # nothing can be stored under it (e.g. GET /things/a>b)
            return False
        return bool(self.store.query(f"ASK {{ GRAPH {ox.NamedNode(thing_id)} {{ ?s ?p ?o }} }}"))

    def _registrations(self, thing_ids: Sequence[str]) -> dict[str, Registration]:
        # One small query per thing with the graph named: Oxigraph does not push VALUES
        # into GRAPH ?g, and a join over every registration costs O(fleet).
        found = {}
        for thing_id in thing_ids:
            if iri_problem(thing_id) is not None:  # not an IRI: never registered
                continue
            name = ox.NamedNode(thing_id)
            query = f"""SELECT ?created ?modified ?expires ?ttl WHERE {{
              GRAPH {name} {{ {name} {_REGISTRATION} ?r . ?r {_CREATED} ?created ; {_MODIFIED} ?modified .
                OPTIONAL {{ ?r {_EXPIRES} ?expires }} OPTIONAL {{ ?r {_TTL} ?ttl }} }} }}"""
            for row in self._select(query):
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
        rows = list(self._select(f"SELECT ?doc WHERE {{ GRAPH {name} {{ {name} {_TD_DOCUMENT} ?doc }} }}"))
        if rows:
            document = json.loads(rows[0]["doc"].value)
        else:
            triples = self.graph_triples(thing_id)
            document = {
                "@context": "https://www.w3.org/2022/wot/td/v1.1",
                "id": thing_id,
                "@graph": json.loads(_serialized(triples, ox.RdfFormat.JSON_LD)),
            }
        document["registration"] = registration.as_json()
        return document

    def graph_triples(self, graph: str) -> list[ox.Triple]:
        if iri_problem(graph) is not None:
            return []
        name = ox.NamedNode(graph)
        result = self.store.query(f"CONSTRUCT {{ ?s ?p ?o }} WHERE {{ GRAPH {name} {{ ?s ?p ?o }} }}")
        if isinstance(result, ox.QuerySolutions | ox.QueryBoolean):
            raise TypeError(f"the store answered a CONSTRUCT with {type(result).__name__}")
        return list(result)

    def thing_ids(self, *, offset: int = 0, limit: int | None = None) -> tuple[list[str], int]:
        """Registered things (devices with a registration), by IRI, and how many there are in total."""
        count_query = f"SELECT (COUNT(DISTINCT ?g) AS ?n) WHERE {{ GRAPH ?g {{ ?g {_REGISTRATION} ?r }} }}"
        total = int(next(iter(self._select(count_query)))["n"].value)
        page = f" LIMIT {int(limit)}" if limit is not None else ""
        query = (
            f"SELECT DISTINCT ?g WHERE {{ GRAPH ?g {{ ?g {_REGISTRATION} ?r }} }} "
            f"ORDER BY ?g OFFSET {int(offset)}{page}"
        )
        return [row["g"].value for row in self._select(query)], total

    def expired(self, now: dt.datetime | None = None) -> list[str]:
        stamp = sparql_updates.datetime_literal(now or _now())
        query = f"""SELECT DISTINCT ?g WHERE {{ GRAPH ?g {{ ?g {_REGISTRATION} ?r . ?r {_EXPIRES} ?e }}
                    FILTER(?e <= {stamp}) }}"""
        return [row["g"].value for row in self._select(query)]

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
        """Device IRIs a job's `eligible` query (SPARQL or named query) selects, via ?device,
        among the fleet's devices (typed tf:Device in their own graph: described with the
        fleet's requirements), so no query makes any other Thing of the directory eligible.
        The named queries read each device's facts from its own graph; a job's own SPARQL reads
        what it names (the union of all graphs by default), so it should say GRAPH ?device too."""
        rows = self.select(resolve_query(spec))
        if rows and "device" not in rows[0]:
            raise ValueError("an eligibility query must SELECT ?device")
        selected = {row["device"].value for row in rows if row.get("device") is not None}
        return sorted(selected & self._fleet_devices()) if selected else []

    def _fleet_devices(self) -> frozenset[str]:
        """Devices typed tf:Device in their own graph, read again only after a write (a query
        over the whole fleet: at 10k devices half the cost of the eligible-devices query)."""
        writes, fleet = self._fleet
        if writes != self._writes:
            writes = self._writes  # a write during the query makes the next call read again
            fleet = frozenset(row["device"].value for row in self.select(_FLEET_DEVICES))
            self._fleet = (writes, fleet)
        return fleet

    def _update(self, text: str) -> None:
        """A SPARQL Update, counted once done (`_writes`); called with the write lock held."""
        self.store.update(text)
        self._writes += 1

    # ---- setup ------------------------------------------------------------------------------

    def _ensure_ontology(self) -> None:
        graph = ox.NamedNode(sparql_updates.ONTOLOGY_GRAPH)
        if not self.store.query(f"ASK {{ GRAPH {graph} {{ ?s ?p ?o }} }}"):
            triples = [q.triple for q in ox.parse(path=str(ONTOLOGY_PATH), format=ox.RdfFormat.TURTLE)]
            self.store.update(
                sparql_updates.replace_graph(
                    sparql_updates.ONTOLOGY_GRAPH, sparql_updates.skolemize(triples, "ontology")
                )
            )


def parse_description(
    data: bytes,
    media_type: str,
    thing_id: str | None,
    ttl_s: int | None,
    limits: DescriptionLimits,
    for_training: bool = False,
) -> Prepared:
    """A description's triples, checked, normalized and skolemized, not yet SHACL-validated.

    Refuses, before parsing, a description over `limits.max_bytes`, JSON nested deeper than
    `limits.max_json_depth` and a thing id that is not an absolute IRI or is one of the
    registry's own; then what common.device_description refuses (a JSON document that is not
    a TD 1.1; Turtle whose device the one rule cannot find, unless the caller names the
    thing); after parsing, any triple whose subject is not the thing or a node of its own
    (`scope_problems`). The thing is typed tf:Device, so the fleet shapes' requirements (RAM,
    flash, class) apply to it, when its facts make it a fleet device (normalize_device) or
    `for_training` says it registers to train (gRPC Register); any other Thing is stored
    as the directory's, and no job selects it (`Registry.eligible`)."""
    too_big = limits.size_problem(len(data))
    if too_big:
        raise DescriptionInvalid([Problem("", too_big)])
    if thing_id is not None:
        bad_id = iri_problem(thing_id)
        if bad_id:
            raise DescriptionInvalid([Problem("/id", f"the thing id {bad_id}")])
    if media_kind(media_type) == "json":
        document = load_json(data, max_depth=limits.max_json_depth)
        if thing_id is not None and document.get("id") is None:
            document["id"] = thing_id
        problems = td_problems(document)
        if problems:
            raise DescriptionInvalid(problems)
        thing = td_id(document)
        if thing_id is not None and thing != thing_id:
            raise DescriptionInvalid([Problem("/id", f"is {thing!r} but the request is for {thing_id!r}")])
        ttl_s = _registration_ttl(document, ttl_s)
        document.pop("registration", None)  # directory-managed; recomputed on every write
        triples = td_triples(document)
    else:
        document = None
        triples = turtle_triples(data, base_iri=thing_id)
        thing = thing_id or device_subject(triples)
    reserved = [r for r in RESERVED_IRIS if is_inside(thing, r) or is_inside(r, thing)]
    if reserved:
        raise DescriptionInvalid(
            [Problem("/id", f"{thing!r} is reserved for the registry's own graphs ({reserved[0]}...)")]
        )
    outside = scope_problems(triples, thing)
    if outside:
        raise DescriptionInvalid(outside)
    quoted = [t for t in triples if isinstance(t.subject, ox.Triple) or isinstance(t.object, ox.Triple)]
    if quoted:  # RDF 1.2: neither the shapes nor pyshacl's rdflib graph can hold one
        problem = f"holds a triple term (RDF 1.2), which a description may not: {quoted[0]}"
        raise DescriptionInvalid([Problem("", problem)])
    triples = normalize_models(normalize_device(triples, thing, fleet_device=for_training))
    return Prepared(
        thing_id=thing, triples=sparql_updates.skolemize(triples, thing), document=document, ttl_s=ttl_s
    )


def _serialized(terms: Iterable[ox.Triple] | Iterable[ox.Quad], format: ox.RdfFormat) -> bytes:
    """`ox.serialize` into memory (typed bytes | None: it returns None when it writes to a file)."""
    buffer = io.BytesIO()
    ox.serialize(terms, buffer, format=format)
    return buffer.getvalue()


def _is_fleet_device(prepared: Prepared) -> bool:
    return ox.Triple(ox.NamedNode(prepared.thing_id), _TYPE, DEVICE) in prepared.triples


class LargeDescriptions:
    """Large descriptions prepared (parsed, checked and SHACL-validated) in a worker process.

    One near the size limit keeps pyshacl busy for a second or more. In a thread of the
    coordinator that second competes for the GIL (and adds garbage-collector pauses) with
    everything else, gRPC's event loop and the small registrations' validation included; in a
    process of its own, at a lower CPU priority, it costs the coordinator a pipe round trip and
    reading back the triples (N-Triples, parsed by Oxigraph).

    One worker (KillableWorker), spawned at first use, one description at a time, each with
    `limits.validation_timeout_s`: past it the worker is killed, the description is refused
    naming the deadline, and the next one gets a new worker; so does the next after one that
    kills it. Calls are made from one thread of this object's own (the worker's parent-death
    signal follows the thread that spawned it). `close` (the coordinator's stop) kills the
    worker at once, so a stop never waits for a validation."""

    def __init__(self) -> None:
        self._worker = KillableWorker(
            _prepare_in_worker, setup=_start_worker, name="tinyfleet-large-descriptions"
        )
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[_LargeRequest | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def prepare(
        self, item: tuple[bytes, str, str | None, int | None], limits: DescriptionLimits, for_training: bool
    ) -> Prepared | DescriptionInvalid:
        """The prepared description or its refusal; ValidationUnavailable once closed."""
        request = _LargeRequest(item, limits, for_training, Future())
        with self._lock:
            if self._closed:
                raise ValidationUnavailable("the coordinator is stopping; try again")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="large-descriptions", daemon=True)
                self._thread.start()
            self._requests.put(request)
        return request.result.result()

    def close(self) -> None:
        """Kill the worker; descriptions in flight or waiting fail with ValidationUnavailable."""
        with self._lock:
            self._closed = True
            self._requests.put(None)
        self._worker.close()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            try:
                request.result.set_result(self._prepare(request))
            except BaseException as exc:  # delivered to the caller, who decides
                request.result.set_exception(exc)
        while not self._requests.empty():  # arrived before close: nothing will serve them
            if (left := self._requests.get()) is not None:
                left.result.set_exception(ValidationUnavailable("the coordinator is stopping; try again"))

    def _prepare(self, request: _LargeRequest) -> Prepared | DescriptionInvalid:
        limits = request.limits
        try:
            outcome = self._worker.call(
                (request.item, limits, request.for_training), limits.validation_timeout_s
            )
        except WorkerClosed:
            raise ValidationUnavailable("the coordinator is stopping; try again") from None
        except WorkerTimeout:
            log.warning("a large description took longer than %g s to validate; its worker was killed",
                        limits.validation_timeout_s)
            return DescriptionInvalid([Problem("", (
                f"validation took longer than {limits.validation_timeout_s:g} s "
                f"(a description over {limits.large_bytes} bytes gets that long); it was stopped"
            ))])
        except WorkerStopped:
            log.warning("the process validating a large description died; the next one gets a new one")
            return DescriptionInvalid(
                [Problem("", "the description could not be processed (it stopped the process validating it)")]
            )
        if isinstance(outcome, list):
            return DescriptionInvalid(outcome)
        thing_id, ntriples, document, ttl_s = outcome
        triples = [quad.triple for quad in ox.parse(ntriples, format=ox.RdfFormat.N_TRIPLES)]
        return Prepared(thing_id=thing_id, triples=triples, document=document, ttl_s=ttl_s)


@dataclass(frozen=True)
class _LargeRequest:
    item: tuple[bytes, str, str | None, int | None]
    limits: DescriptionLimits
    for_training: bool
    result: Future[Prepared | DescriptionInvalid]


def _start_worker() -> None:
    ShaclValidator.shared()  # the shapes, parsed before the first description arrives


def _prepare_in_worker(
    request: tuple[tuple[bytes, str, str | None, int | None], DescriptionLimits, bool],
) -> tuple[str, bytes, dict[str, Any] | None, int | None] | list[Problem]:
    """In the worker: (thing id, N-Triples, document, ttl) of an accepted description, or its
    problems (exceptions do not cross the pipe: DescriptionInvalid's constructor takes a list)."""
    (data, media_type, thing_id, ttl_s), limits, for_training = request
    try:
        prepared = parse_description(data, media_type, thing_id, ttl_s, limits, for_training)
        problems = ShaclValidator.shared().validate(prepared.triples)
    except DescriptionInvalid as exc:
        return exc.errors
    except Exception as exc:  # whatever one description raises is its own refusal
        return _unprocessable(exc).errors
    if problems:
        return problems
    ntriples = _serialized(prepared.triples, ox.RdfFormat.N_TRIPLES)
    return prepared.thing_id, ntriples, prepared.document, prepared.ttl_s


def _unprocessable(exc: Exception) -> DescriptionInvalid:
    log.warning("a description could not be processed", exc_info=exc)
    return DescriptionInvalid([Problem("", str(unprocessable(exc)))])


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
