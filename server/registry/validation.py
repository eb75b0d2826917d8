"""Is a description acceptable? Its scope, then SHACL against the fleet shapes (TD 1.1 and the
device's identity come first: common.device_description).

A description speaks only for its device (`scope_problems`): the subject of every
triple must be the device itself or a node minted inside its own description,
i.e. a blank node, or an IRI *under* the device's IRI: the device's IRI followed
at once by '#', '/' or ':' and anything after (for urn:tf:pi-01: urn:tf:pi-01#ram,
urn:tf:pi-01:ram, urn:tf:pi-01/ram; for https://ex.org/pi-01: https://ex.org/pi-01#ram,
https://ex.org/pi-01/ram). The separator must come right after the IRI, so
urn:tf:pi-01 never reaches urn:tf:pi-010, and https://ex.org/fleet/ reaches
https://ex.org/fleet/#x but not https://ex.org/fleet/pi-02. An IRI compares as
its exact characters, as RDF compares IRIs. A device whose IRI is a prefix of
another's in this sense (urn:site:a and urn:site:a:pi) can name that IRI as a
node of its own, but cannot change that device: every per-device fact is read
from the device's own named graph, which only its own registration writes.

Every problem is reported as {path, message}: `path` is "<subject> <predicate>" for
scope problems and "<focus node> <property path>" for SHACL ones.
The shapes are parsed once per process and the harvested shapes reused for
every validation; pyshacl runs without inference, in place, on a small graph of
just the description(s) being registered. Only the shapes that declare targets
are run at the top level: every other shape (property shapes, shapes reached
through sh:node) selects no focus node of its own and is evaluated from those,
so the verdict is pyshacl's full run's, at half the cost per description.
Verdicts of descriptions validated on their own are remembered (a bounded LRU
keyed by a digest of the exact triples): the coordinator validates a
registration before its SQL commit and the projector prepares the same bytes
again right after, and SHACL is a pure function of the triples.

`validate_each` gives every description its own verdict, exactly as if it were
validated alone, yet runs pyshacl once for many: descriptions go into one run
only when none of them mentions (as subject or object) a node another one
describes. With the fleet shapes (targets by class, forward paths only, no SPARQL)
a focus node and everything reachable from it then come from one description, so
the run cannot change any description's verdict; shapes that could look across
(sh:targetObjectsOf, sh:inversePath, SPARQL) make it validate one at a time.
A node shape made only of sh:property constraints (the device and model shapes)
runs each of its property shapes once over all its focus nodes; pyshacl runs each
once per focus node, rebuilding its constraint components every time. Together
that validates a group of 32 registrations in about a third of the CPU time per
description that one at a time takes (tested against pyshacl's own full run).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

import pyoxigraph as ox

# What a refusal is, shared with the agent's checks; importers of this module get it here too.
from tinyfleet.common.device_description import DescriptionInvalid as DescriptionInvalid
from tinyfleet.common.device_description import Problem as Problem
from tinyfleet.ontology import PREFIXES, SHAPES_PATH, XSD

_XSD_STRING: Final = XSD + "string"
VERDICT_CACHE_SIZE: Final = 4096
#: What may follow a device's IRI in the IRI of a node inside its description.
INSIDE_SEPARATORS: Final = ("#", "/", ":")
#: Triples about other subjects listed one by one; the rest are counted in one last problem.
MAX_SCOPE_PROBLEMS: Final = 10


def is_inside(iri: str, thing: str) -> bool:
    """True when `iri` is the thing's own IRI or under it (the module docstring defines it)."""
    return iri == thing or (iri.startswith(thing) and iri[len(thing) : len(thing) + 1] in INSIDE_SEPARATORS)


def scope_problems(triples: Sequence[ox.Triple], thing: str) -> list[Problem]:
    """One problem per triple (up to MAX_SCOPE_PROBLEMS) whose subject is neither the thing, nor
    a blank node, nor an IRI under the thing's: a description speaks only for its device."""
    outside = [
        t
        for t in triples
        if not isinstance(t.subject, ox.BlankNode)
        and not (isinstance(t.subject, ox.NamedNode) and is_inside(t.subject.value, thing))
    ]
    problems = [
        Problem(
            f"{_cut(_compact_term(t.subject))} {_cut(_compact_term(t.predicate))}",
            f"the triple {_cut(str(t))} is about {_cut(str(t.subject))}, not this device "
            f"<{_cut(thing)}>: a description may only state facts about its device and nodes inside "
            f"it (blank nodes, or IRIs that continue <{_cut(thing)}> with '#', '/' or ':')",
        )
        for t in outside[:MAX_SCOPE_PROBLEMS]
    ]
    if len(outside) > MAX_SCOPE_PROBLEMS:
        subjects = len({str(t.subject) for t in outside})
        problems.append(
            Problem(
                "",
                f"and {len(outside) - MAX_SCOPE_PROBLEMS} more triples about subjects other than "
                f"<{thing}> and its nodes ({subjects} such subjects in all)",
            )
        )
    return problems


def _cut(text: str, limit: int = 200) -> str:
    """Long IRIs and literals shortened: a problem is read by a person and travels in a trailer."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _compact_term(term: Any) -> str:
    if isinstance(term, ox.NamedNode):
        for prefix, iri in PREFIXES.items():
            if term.value.startswith(iri) and len(term.value) > len(iri):
                return f"{prefix}:{term.value[len(iri) :]}"
    return str(term)


class ShaclValidator:
    """The fleet shapes, parsed and harvested once, applied to descriptions one or many at a time."""

    _instance: ShaclValidator | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        import rdflib

        from tinyfleet.server.registry.shacl_adapter import PreparedShapes

        graph = rdflib.Graph()
        graph.parse(SHAPES_PATH, format="turtle")
        self._shapes = PreparedShapes(graph)
        looks_across = {rdflib.SH.targetObjectsOf, rdflib.SH.inversePath, rdflib.SH.sparql, rdflib.SH.target}
        self._groups_are_exact = not any(p in looks_across for p in set(graph.predicates()))
        self._verdicts: OrderedDict[bytes, tuple[Problem, ...]] = OrderedDict()
        self._verdicts_lock = threading.Lock()

    @classmethod
    def shared(cls) -> ShaclValidator:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = ShaclValidator()
            return cls._instance

    def validate(self, triples: Sequence[ox.Triple]) -> list[Problem]:
        return self.validate_many([triples])[0]

    def _remembered(self, keys: Sequence[bytes]) -> dict[int, tuple[Problem, ...]]:
        """Verdicts already known, by position in `keys` (the most recently used kept longest)."""
        found: dict[int, tuple[Problem, ...]] = {}
        with self._verdicts_lock:
            for number, key in enumerate(keys):
                if key in self._verdicts:
                    self._verdicts.move_to_end(key)
                    found[number] = self._verdicts[key]
        return found

    def validate_many(self, descriptions: Sequence[Sequence[ox.Triple]]) -> list[list[Problem]]:
        """Problems per description; one pyshacl run over all those not validated before."""
        keys = [_digest(triples) for triples in descriptions]
        found = self._remembered(keys)
        missing = [number for number in range(len(descriptions)) if number not in found]
        if missing:
            fresh = self._run([descriptions[number] for number in missing])
            found.update((number, tuple(problems)) for number, problems in zip(missing, fresh, strict=True))
            if len(missing) == 1:  # a verdict on its own, not one shared with a batch's other graphs
                with self._verdicts_lock:
                    self._verdicts[keys[missing[0]]] = found[missing[0]]
                    if len(self._verdicts) > VERDICT_CACHE_SIZE:
                        self._verdicts.popitem(last=False)
        return [list(found[number]) for number in range(len(descriptions))]

    def validate_each(self, descriptions: Sequence[Sequence[ox.Triple]]) -> list[list[Problem]]:
        """Problems per description, each as if validated alone (remembered); descriptions
        that share no described node are validated together (see the module docstring)."""
        keys = [_digest(triples) for triples in descriptions]
        found = self._remembered(keys)
        missing = [number for number in range(len(descriptions)) if number not in found]
        runs = (
            _independent_runs(missing, descriptions) if self._groups_are_exact else [[n] for n in missing]
        )
        for run in runs:
            fresh = self._run([descriptions[number] for number in run])
            found.update((number, tuple(problems)) for number, problems in zip(run, fresh, strict=True))
        with self._verdicts_lock:
            for number in missing:
                self._verdicts[keys[number]] = found[number]
            while len(self._verdicts) > VERDICT_CACHE_SIZE:
                self._verdicts.popitem(last=False)
        return [list(found[number]) for number in range(len(descriptions))]

    def _run(self, descriptions: Sequence[Sequence[ox.Triple]]) -> list[list[Problem]]:
        """One pyshacl run over all the descriptions, problems attributed by focus node."""
        import rdflib

        graph = rdflib.Graph(bind_namespaces="none")
        owner: dict[str, list[int]] = {}
        for number, triples in enumerate(descriptions):
            for t in triples:
                subject = _to_rdflib(t.subject)
                graph.add((subject, _to_rdflib(t.predicate), _to_rdflib(t.object)))
                node = str(subject)  # an IRI or a blank node's id, as a focus node is reported
                owner.setdefault(node, [])
                if not owner[node] or owner[node][-1] != number:
                    owner[node].append(number)
        report = self._shapes.run(graph)
        problems: list[list[Problem]] = [[] for _ in descriptions]
        if report is None:
            return problems
        for problem, focus in _problems(report):
            for number in owner.get(focus, range(len(descriptions))):
                problems[number].append(problem)
        return problems


def _independent_runs(numbers: Sequence[int], descriptions: Sequence[Sequence[ox.Triple]]) -> list[list[int]]:
    """Split `numbers` into runs where no description mentions a node another one describes."""
    runs: list[tuple[list[int], set[str], set[str]]] = []  # members, nodes described, nodes mentioned
    for number in numbers:
        described = {t.subject.value for t in descriptions[number] if not isinstance(t.subject, ox.Triple)}
        mentioned = described | {
            t.object.value for t in descriptions[number] if isinstance(t.object, ox.NamedNode | ox.BlankNode)
        }
        for members, run_described, run_mentioned in runs:
            if described.isdisjoint(run_mentioned) and mentioned.isdisjoint(run_described):
                members.append(number)
                run_described |= described
                run_mentioned |= mentioned
                break
        else:
            runs.append(([number], described, mentioned))
    return [members for members, _, _ in runs]


def _digest(triples: Sequence[ox.Triple]) -> bytes:
    return hashlib.blake2b("\n".join(map(str, triples)).encode(), digest_size=16).digest()


def _to_rdflib(term: ox.NamedNode | ox.BlankNode | ox.Literal | ox.Triple) -> Any:
    import rdflib

    if isinstance(term, ox.Triple):  # parse_description refuses descriptions that hold one
        raise ValueError(f"a triple term (RDF 1.2) cannot be validated: {term}")
    if isinstance(term, ox.NamedNode):
        return rdflib.URIRef(term.value)
    if isinstance(term, ox.BlankNode):
        return rdflib.BNode(term.value)
    if term.language:
        return rdflib.Literal(term.value, lang=term.language)
    if term.datatype.value == _XSD_STRING:  # rdflib keeps plain and xsd:string literals apart
        return rdflib.Literal(term.value)
    return rdflib.Literal(term.value, datatype=rdflib.URIRef(term.datatype.value))


def _problems(report: Any) -> list[tuple[Problem, str]]:
    import rdflib
    from rdflib.namespace import SH

    found = []
    for result in report.objects(None, SH.result):
        focus = report.value(result, SH.focusNode)
        path = report.value(result, SH.resultPath)
        message = report.value(result, SH.resultMessage)
        value = report.value(result, SH.value)
        text = str(message) if message is not None else "does not conform to the fleet shapes"
        if value is not None and str(value) not in text:
            text += f" (got {_compact(value)})"
        where = _compact(focus) + (f" {_compact(path)}" if path is not None else "")
        found.append((Problem(where, text), str(focus) if isinstance(focus, rdflib.term.Node) else ""))
    found.sort(key=lambda item: (item[0].path, item[0].message))
    return found


def _compact(term: Any) -> str:
    import rdflib

    if isinstance(term, rdflib.URIRef):
        text = str(term)
        for prefix, iri in PREFIXES.items():
            if text.startswith(iri) and len(text) > len(iri):
                return f"{prefix}:{text[len(iri) :]}"
        return f"<{text}>"
    if isinstance(term, rdflib.Literal):
        return repr(str(term))
    return str(term)
