"""Import published TinyML descriptions (SeLoC-ML style Turtle), repairing known quirks with a report.

Real files in the wild have: relative IRIs such as `<None>` (resolved against a
base: --base, else the file's `# baseURI:` comment, else the file's own URI);
S3N written as http://w3id.org/s3n/ although S3N publishes https; class names
with a stray colon (`sosa_extend::Magnetometer` parses as a class named
`:Magnetometer`); and several procedure features per model (one for RAM, one
for flash), which normalization folds into tf:requiresRamKB/FlashKB.

Each board becomes its own named graph (a registered device), each model its
own graph (everything reachable from it, plus the sensors that feed its
input); whatever belongs to neither lands in one graph per file. Every graph is
SHACL-validated; the whole file is written in one update or not at all.

SQL is the system of record: `import_document` keeps the file itself in SQL
(with an outbox row, one transaction) and lets the projector write its graphs,
so `tinyfleet registry rebuild` re-applies it like any registered device.

A published document is the operator's, not a device's description: it may
describe many boards and models, and its nodes need not sit under any one IRI,
so the rule that a description speaks only for its device does not apply to it.
It still cannot change what a registered device says about itself: every fleet
query reads a device's facts from the device's own named graph, so triples about
a device in a model's graph or the document's leftover graph are never read as
that device's; and `import_document` refuses a document that describes, as one of
its boards, a device registered by its agent (SQL has its row), since the board's
graph would replace the device's. An operator who means to describe that device
from a document deletes the device first (DELETE /things/{id} with the admin
token; its agent's registration goes with it), or changes the device's own
description (PUT /things/{id} with the admin token).
"""

from __future__ import annotations

import re
import urllib.parse
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import pyoxigraph as ox

from tinyfleet.common.device_description import DEVICE_TYPES, SENSOR_BOARD_TYPES
from tinyfleet.ontology import NNET, RDF, S3N, S3N_HTTP, SSN_EXTEND, TF
from tinyfleet.server.registry import sparql_updates
from tinyfleet.server.registry.normalize import normalize_device, normalize_models
from tinyfleet.server.registry.thing_graphs import Prepared, Registry
from tinyfleet.server.registry.validation import Problem

if TYPE_CHECKING:
    from tinyfleet.server.repository import ImportedDocument

_SENTINEL: Final = "https://relative.invalid/tinyfleet-import/"
_BASE_COMMENT: Final = re.compile(rb"^#\s*baseURI:\s*(\S+)", re.MULTILINE)
#: Namespaces whose local names never start with ':' (a doubled colon in a prefixed name).
_STRAY_COLON_NAMESPACES: Final = (
    "https://w3id.org/tinyml-schema/neural-network-schema/",
    S3N,
    "http://www.w3.org/ns/",
)
_TYPE: Final = RDF + "type"
#: Each subject of one of these classes is a board (as a registration's device is recognised).
_DEVICE_TYPES: Final = DEVICE_TYPES | SENSOR_BOARD_TYPES
_MODEL_TYPES: Final = frozenset({NNET + "NeuralNetwork", TF + "ModelArtifact"})


@dataclass
class Repair:
    kind: str
    detail: str
    count: int


@dataclass
class FileReport:
    path: str
    base: str
    devices: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    other_graph: str | None = None
    triples: int = 0
    repairs: list[Repair] = field(default_factory=list)
    #: Blank nodes stored as skolem IRIs (sparql_updates; one per graph a node lands in):
    #: SPARQL sees IRIs there, and DESCRIBE follows them as it follows blank nodes.
    skolemized: int = 0


class ImportFailed(ValueError):
    """A file that cannot be imported; nothing of it was written."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        listed = "; ".join(f"{p.path}: {p.message}" for p in problems[:5])
        super().__init__(f"{path}: {listed}")


def _base_for(path: Path, data: bytes, base: str | None) -> str:
    if base:
        return base
    match = _BASE_COMMENT.search(data[:2000])
    if match:
        declared = match.group(1).decode("utf-8", "replace")
        return declared if declared.endswith(("/", "#")) else declared + "/"
    return path.resolve().as_uri()


def _repair_iri(value: str, base: str, counts: Counter[tuple[str, str]]) -> str:
    if value.startswith(_SENTINEL):
        relative = value[len(_SENTINEL) :]
        resolved = urllib.parse.urljoin(base, relative)
        counts[("relative IRI", f"<{relative}> resolved to <{resolved}>")] += 1
        value = resolved
    if value.startswith(S3N_HTTP):
        counts[("S3N namespace", f"{S3N_HTTP} rewritten to {S3N}")] += 1
        value = S3N + value[len(S3N_HTTP) :]
    for namespace in _STRAY_COLON_NAMESPACES:
        if value.startswith(namespace):
            head, sep, local = value.rpartition("/")
            if sep and local.startswith(":") and len(local) > 1:
                fixed = f"{head}/{local.lstrip(':')}"
                counts[("malformed class name", f"<{value}> renamed <{fixed}>")] += 1
                value = fixed
            break
    return value


@dataclass(frozen=True)
class Document:
    """A published file as imported: what SQL keeps so the registry can re-derive its graphs.

    `name` (the file name) names the graph of triples that belong to no device or
    model, and identifies the document: importing the same name again replaces it.
    `base` is fixed at import time, so a rebuild resolves relative IRIs the same way
    wherever it runs.
    """

    name: str
    base: str
    content: bytes


def read_document(path: str | Path, base: str | None = None) -> Document:
    """A file as a Document; its base is --base, else its '# baseURI:' comment, else its own URI."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportFailed(str(path), [Problem("", f"cannot read: {exc.strerror}")]) from exc
    return Document(name=path.name, base=_base_for(path, data, base), content=data)


def received_document(name: str, content: bytes, base: str | None = None) -> Document:
    """A document sent over HTTP: there is no file URI to fall back on, so the base is
    `base`, else the '# baseURI:' comment, else the request is refused."""
    if not name or "/" in name:
        raise ImportFailed(name, [Problem("name", "required: the file name, without directories")])
    if base is None and not _BASE_COMMENT.search(content[:2000]):
        raise ImportFailed(
            name, [Problem("base", "required: the file has no '# baseURI:' comment to resolve relative IRIs")]
        )
    return Document(name=name, base=_base_for(Path(name), content, base), content=content)


def repaired_triples(document: Document) -> tuple[list[ox.Triple], FileReport]:
    """The document's triples with every quirk repaired, and a report saying what was repaired."""
    report = FileReport(path=document.name, base=document.base)
    try:
        quads = list(ox.parse(document.content, format=ox.RdfFormat.TURTLE, base_iri=_SENTINEL))
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else ""
        raise ImportFailed(document.name, [Problem(where, f"not valid Turtle: {exc.msg or exc}")]) from exc
    counts: Counter[tuple[str, str]] = Counter()
    memo: dict[str, tuple[ox.NamedNode, list[tuple[str, str]]]] = {}

    def fix(term: ox.NamedNode | ox.BlankNode | ox.Literal) -> ox.NamedNode | ox.BlankNode | ox.Literal:
        if not isinstance(term, ox.NamedNode):
            return term
        if term.value not in memo:
            found: Counter[tuple[str, str]] = Counter()
            repaired = _repair_iri(term.value, report.base, found)
            memo[term.value] = (ox.NamedNode(repaired), list(found))
        repaired_node, repairs = memo[term.value]
        counts.update(repairs)
        return repaired_node

    triples = [ox.Triple(fix(q.subject), fix(q.predicate), fix(q.object)) for q in quads]  # type: ignore[arg-type]
    report.repairs = [Repair(kind, detail, count) for (kind, detail), count in sorted(counts.items())]
    report.triples = len(triples)
    return triples, report


def split_graphs(
    triples: list[ox.Triple],
) -> tuple[dict[str, list[ox.Triple]], dict[str, list[ox.Triple]], list[ox.Triple]]:
    """(device graphs, model graphs, leftover triples) by reachability from each root."""
    by_subject: dict[object, list[ox.Triple]] = defaultdict(list)
    types: dict[object, set[str]] = defaultdict(set)
    feeds: dict[object, list[object]] = defaultdict(list)  # input node -> sensors providing it
    for t in triples:
        by_subject[t.subject].append(t)
        if t.predicate.value == _TYPE and isinstance(t.object, ox.NamedNode):
            types[t.subject].add(t.object.value)
        if t.predicate.value == SSN_EXTEND + "provideInput":
            feeds[t.object].append(t.subject)
    devices = [s for s, ts in types.items() if ts & _DEVICE_TYPES and isinstance(s, ox.NamedNode)]
    models = [s for s, ts in types.items() if ts & _MODEL_TYPES and isinstance(s, ox.NamedNode)]
    roots = set(devices) | set(models)
    owned: set[object] = set()

    def closure(root: object) -> list[ox.Triple]:
        seen = {root}
        stack = [root]
        result: list[ox.Triple] = []
        while stack:
            node = stack.pop()
            result.extend(by_subject.get(node, []))
            neighbours = [t.object for t in by_subject.get(node, [])] + feeds.get(node, [])
            for nxt in neighbours:
                if nxt not in seen and nxt not in roots and (nxt in by_subject or nxt in feeds):
                    seen.add(nxt)
                    stack.append(nxt)
        owned.update(seen)
        return result

    device_graphs = {d.value: closure(d) for d in devices}
    model_graphs = {m.value: closure(m) for m in models}
    leftover = [t for t in triples if t.subject not in owned]
    return device_graphs, model_graphs, leftover


@dataclass(frozen=True)
class Imported:
    """A document's validated graphs, ready for `Registry.put_many` (devices, other graphs)."""

    devices: list[Prepared]
    graphs: dict[str, list[ox.Triple]]
    report: FileReport


def prepare_document(registry: Registry, document: Document) -> Imported:
    """Repair, split, normalize and SHACL-validate a document; ImportFailed lists every problem."""
    triples, report = repaired_triples(document)
    device_graphs, model_graphs, leftover = split_graphs(triples)
    devices = {d: normalize_device(ts, d) for d, ts in device_graphs.items()}
    normalized_models = {m: normalize_models(ts) for m, ts in model_graphs.items()}
    prepared = [
        Prepared(thing_id=d, triples=sparql_updates.skolemize(ts, d), document=None)
        for d, ts in devices.items()
    ]
    models = {m: sparql_updates.skolemize(ts, m) for m, ts in normalized_models.items()}
    graphs = [p.triples for p in prepared] + list(models.values())
    problems = [p for found in registry.validate_many(graphs) for p in found]
    if problems:
        raise ImportFailed(document.name, problems)
    if leftover:
        report.other_graph = f"urn:tinyfleet:graph:import:{urllib.parse.quote(document.name)}"
        models[report.other_graph] = sparql_updates.skolemize(leftover, report.other_graph)
    report.skolemized = sum(
        _blank_nodes(ts) for ts in [*devices.values(), *normalized_models.values(), leftover]
    )
    report.devices = sorted(device_graphs)
    report.models = sorted(model_graphs)
    return Imported(devices=prepared, graphs=models, report=report)


def _blank_nodes(triples: list[ox.Triple]) -> int:
    return len({term for t in triples for term in (t.subject, t.object) if isinstance(term, ox.BlankNode)})


def import_file(
    registry: Registry, path: str | Path, *, base: str | None = None, seq: int | None = None
) -> FileReport:
    """Write one file straight into the registry (one update; all or nothing). This bypasses
    SQL, so a rebuild does not keep it: the coordinator imports through
    `Repository.import_document` and the projector instead."""
    imported = prepare_document(registry, read_document(path, base))
    registry.put_many(imported.devices, extra_graphs=imported.graphs, seq=seq)
    return imported.report


class DocumentKeeper(Protocol):
    def import_document(
        self, name: str, base_iri: str, media_type: str, content: bytes
    ) -> ImportedDocument: ...

    def get_device(self, device_id: str) -> object | None: ...


class CatchingUp(Protocol):
    def catch_up(self) -> object: ...


def import_document(
    registry: Registry, keeper: DocumentKeeper, projector: CatchingUp, document: Document
) -> FileReport:
    """Validate, keep in SQL with its outbox row (`keeper` is the Repository), then project.
    A document that fails validation writes nothing; the same name again replaces it. A board
    that is a device registered by its agent is refused by name (see the module docstring)."""
    imported = prepare_document(registry, document)
    registered = [d.thing_id for d in imported.devices if keeper.get_device(d.thing_id) is not None]
    if registered:
        raise ImportFailed(
            document.name,
            [
                Problem(
                    device,
                    "is a device registered by its agent; a document cannot replace its description "
                    "(delete the device first, or change its own description with PUT /things/{id})",
                )
                for device in registered
            ],
        )
    keeper.import_document(document.name, document.base, "text/turtle", document.content)
    projector.catch_up()
    return imported.report


def import_files(registry: Registry, paths: list[str | Path], *, base: str | None = None) -> list[FileReport]:
    """Each file on its own (a bad file fails alone, after the good ones before it were written)."""
    return [import_file(registry, path, base=base) for path in paths]
