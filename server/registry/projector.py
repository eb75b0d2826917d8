"""SQL outbox -> registry: SQL stays the system of record, the RDF store follows it.

Every device change the coordinator commits appends an outbox row in the same
SQL transaction. The projector reads rows after the last sequence the store
recorded, and applies each batch with ONE SPARQL Update that also records the
batch's last sequence; so after a crash between the SQL commit and the
projection, the next `catch_up` applies exactly what is missing, and applying a
row twice is harmless (a description replaces its graph, liveness overwrites).
Imported documents (published Turtle) are kept in SQL too and projected the same
way, from the document row the outbox row names. `rebuild` regenerates a whole
store from the SQL tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyoxigraph as ox
import sqlalchemy as sa

from tinyfleet.server.registry.importer import Document, FileReport, Imported, ImportFailed, prepare_document
from tinyfleet.server.registry.registry import Prepared, Registry
from tinyfleet.server.registry.validation import DescriptionInvalid

log = logging.getLogger(__name__)


class DeviceRow(Protocol):
    device_id: str
    description: bytes
    media_type: str
    last_seen: float | None
    online: bool


class DocumentRow(Protocol):
    name: str
    base_iri: str
    content: bytes


def _document(row: DocumentRow) -> Document:
    return Document(name=row.name, base=row.base_iri, content=row.content)


class OutboxSource(Protocol):
    """What the projector needs from the coordinator's repository."""

    engine: sa.Engine

    def outbox_since(self, seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]: ...

    def list_devices(self) -> Sequence[DeviceRow]: ...

    def imported_document(self, name: str) -> DocumentRow | None: ...

    def list_imported_documents(self) -> Sequence[DocumentRow]: ...


@dataclass
class Applied:
    rows: int = 0
    descriptions: int = 0
    liveness: int = 0
    documents: int = 0
    skipped: int = 0


def _when(timestamp: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC) if timestamp is not None else None


class Projector:
    def __init__(self, registry: Registry, source: OutboxSource, *, batch: int = 500) -> None:
        self.registry = registry
        self.source = source
        self.batch = batch
        self._lock = threading.Lock()  # the daemon's loop and directory writes both catch up
        self._wake: Callable[[], object] | None = None

    def apply(self, rows: Sequence[dict[str, Any]]) -> Applied:
        """Apply outbox rows (in sequence order) as one update recording the last sequence."""
        applied = Applied(rows=len(rows))
        if not rows:
            return applied
        # The descriptions in the batch (the last one per device: earlier ones are replaced within
        # the batch anyway, and two of one device would clash in one data graph) are prepared with
        # ONE SHACL run for those not validated before; the rows are then replayed in order.
        last = {r["subject"]: r for r in rows if r["kind"] in {"device.registered", "device.updated"}}
        described = list(last.values())
        items = [
            (
                str((r["payload"] or {}).get("description", "")).encode("utf-8"),
                str((r["payload"] or {}).get("media_type", "")),
                r["subject"],
                None,
            )
            for r in described
        ]
        results = self.registry.prepare_many(items, raise_first=False) if items else []
        verdicts = dict(zip((r["seq"] for r in described), results, strict=True))
        puts: dict[str, Prepared] = {}
        graphs: dict[str, list[ox.Triple]] = {}
        liveness: dict[str, tuple[bool, dt.datetime | None]] = {}
        deletes: dict[str, None] = {}
        for row in rows:
            kind, subject, payload = row["kind"], row["subject"], row["payload"] or {}
            if kind == "device.deleted":
                puts.pop(subject, None)
                liveness.pop(subject, None)
                deletes[subject] = None
            elif kind in {"device.registered", "device.updated"}:
                deletes.pop(subject, None)
                verdict = verdicts.get(row["seq"])
                if verdict is None:  # described again later in this batch
                    continue
                if isinstance(verdict, DescriptionInvalid):
                    # SQL accepted it (an older or laxer validator); the registry cannot describe it.
                    log.warning("outbox %s: %s not projected: %s", row["seq"], subject, verdict)
                    applied.skipped += 1
                else:
                    puts[subject] = verdict
            elif kind == "document.imported":
                imported = self._imported(row)
                if imported is None:
                    applied.skipped += 1
                    continue
                for device in imported.devices:
                    deletes.pop(device.thing_id, None)
                    puts[device.thing_id] = device
                graphs.update(imported.graphs)
                applied.documents += 1
            elif kind in {"device.online", "device.offline"}:
                liveness[subject] = (kind == "device.online", _when(payload.get("at")))
            elif kind != "artifact.created":  # artifacts are described by ArtifactProjector
                log.warning("outbox %s: unknown change kind %r skipped", row["seq"], kind)
                applied.skipped += 1
        present = [d for d in deletes if self.registry.exists(d)]
        self.registry.put_many(
            list(puts.values()),
            extra_graphs=graphs,
            liveness=liveness,
            deletes=present,
            seq=int(rows[-1]["seq"]),
        )
        applied.descriptions, applied.liveness = len(puts), len(liveness)
        return applied

    def _imported(self, row: dict[str, Any]) -> Imported | None:
        found = self.source.imported_document(row["subject"])
        if found is None:
            log.warning("outbox %s: imported document %r is not in SQL; skipped", row["seq"], row["subject"])
            return None
        try:
            return prepare_document(self.registry, _document(found))
        except ImportFailed as exc:
            log.warning("outbox %s: imported document not projected: %s", row["seq"], exc)
            return None

    def catch_up(self) -> Applied:
        """Apply everything after the store's last recorded sequence; returns the totals."""
        with self._lock:
            return self._catch_up()

    def _catch_up(self) -> Applied:
        total = Applied()
        while True:
            rows = self.source.outbox_since(self.registry.last_applied_seq(), limit=self.batch)
            if not rows:
                return total
            done = self.apply(rows)
            total.rows += done.rows
            total.descriptions += done.descriptions
            total.liveness += done.liveness
            total.documents += done.documents
            total.skipped += done.skipped

    async def run(self, interval_s: float = 0.5) -> None:
        """Catch up whenever `wake` is called (SQL committed outbox rows) and at least every
        `interval_s`, until cancelled. Rows committed while a catch-up runs wake the next one."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(woken.set)
        try:
            while True:
                woken.clear()
                try:
                    await asyncio.to_thread(self.catch_up)
                except Exception:  # the store may be briefly unreachable (remote); retry next tick
                    log.exception("registry projection failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), interval_s)
        finally:
            self._wake = None

    def wake(self) -> None:
        """Catch up now rather than at the next tick (from any thread; no-op unless running)."""
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has just closed
                wake()


def last_outbox_seq(source: OutboxSource) -> int:
    from tinyfleet.server.schema import outbox

    with source.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.max(outbox.c.seq))).scalar() or 0)


def rebuild(
    registry: Registry,
    source: OutboxSource,
    *,
    progress: Callable[[int, int], None] | None = None,
    reports: list[FileReport] | None = None,
) -> Applied:
    """Fill an EMPTY registry from SQL: every imported document (in import order), every
    device's description and liveness, then the outbox sequence they reflect (rows after
    it are applied by the projector as usual). Each document's repair report is appended
    to `reports`. A device registered in SQL wins over a document describing the same IRI."""
    seq = last_outbox_seq(source)
    applied = Applied()
    for found in source.list_imported_documents():
        try:
            imported = prepare_document(registry, _document(found))
        except ImportFailed as exc:
            log.warning("imported document %s not rebuilt: %s", found.name, exc)
            applied.skipped += 1
            continue
        registry.put_many(imported.devices, extra_graphs=imported.graphs)
        applied.documents += 1
        if reports is not None:
            reports.append(imported.report)
    devices = list(source.list_devices())
    for start in range(0, len(devices), 500):
        chunk = devices[start : start + 500]
        items = [(d.description, d.media_type, d.device_id, None) for d in chunk]
        results = registry.prepare_many(items, raise_first=False)
        prepared = [r for r in results if isinstance(r, Prepared)]
        for device, result in zip(chunk, results, strict=True):
            if isinstance(result, DescriptionInvalid):
                log.warning("device %s not rebuilt: %s", device.device_id, result)
        liveness = {d.device_id: (d.online, _when(d.last_seen)) for d in chunk}
        registry.put_many(prepared, liveness=liveness)
        applied.descriptions += len(prepared)
        applied.liveness += len(liveness)
        applied.skipped += len(chunk) - len(prepared)
        if progress is not None:
            progress(start + len(chunk), len(devices))
    registry.put_many([], seq=seq)
    applied.rows = seq
    return applied


WATERMARK = "https://w3id.org/tinyfleet#artifactsDescribedUntil"
XSD_DOUBLE = "http://www.w3.org/2001/XMLSchema#double"


class ArtifactProjector:
    """Describes each round's artifact (provenance, contributors, memory needs) once its round
    is committed in SQL; the rounds' finished_at watermark lives in the store, written in the
    same update as the description, so a crash neither loses nor duplicates one."""

    def __init__(self, registry: Registry, source: OutboxSource, blobs: Any, *, batch: int = 20) -> None:
        self.registry = registry
        self.source = source
        self.blobs = blobs
        self.batch = batch

    def watermark(self) -> float:
        value = self.registry.meta_value(WATERMARK)
        return float(value.value) if value is not None else 0.0

    def catch_up(self) -> int:
        from tinyfleet.common.flower_adapter import array_record_from_bytes
        from tinyfleet.common.jobspec import parse_job_spec
        from tinyfleet.server.registry import updates
        from tinyfleet.server.registry.artifact_description import artifact_iri, describe_round_artifact
        from tinyfleet.server.schema import artifacts, jobs, node_results, rounds

        described = 0
        while True:
            with self.source.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(rounds, artifacts.c.parent_sha, jobs.c.spec_toml)
                    .join(artifacts, artifacts.c.sha256 == rounds.c.artifact_sha)
                    .join(jobs, jobs.c.id == rounds.c.job_id)
                    .where(rounds.c.finished_at > self.watermark())
                    .order_by(rounds.c.finished_at)
                    .limit(self.batch)
                ).all()
                contributors: dict[tuple[int, int], list[int]] = defaultdict(list)
                for job_id, round_number in {(r.job_id, r.round) for r in rows}:
                    for (node_id,) in conn.execute(
                        sa.select(node_results.c.node_id).where(
                            node_results.c.job_id == job_id,
                            node_results.c.round == round_number,
                            node_results.c.phase == "train",
                            node_results.c.status == "replied",
                        )
                    ):
                        contributors[(job_id, round_number)].append(node_id)
            if not rows:
                return described
            devices = {d.node_id: d.device_id for d in self.source.list_devices()}  # type: ignore[attr-defined]
            for row in rows:
                spec = parse_job_spec(row.spec_toml)
                metrics = {f"train.{k}": v for k, v in (row.train_metrics or {}).items()}
                metrics.update({f"evaluate.{k}": v for k, v in (row.eval_metrics or {}).items()})
                triples = describe_round_artifact(
                    sha=row.artifact_sha,
                    job_id=row.job_id,
                    round_number=row.round,
                    strategy=spec.strategy,
                    model_name=spec.model,
                    parent_sha=row.parent_sha,
                    finished_at=row.finished_at,
                    contributors=[devices[n] for n in contributors[(row.job_id, row.round)] if n in devices],
                    metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
                    arrays=array_record_from_bytes(self.blobs.get(row.artifact_sha)),
                )
                stamp = ox.Literal(repr(float(row.finished_at)), datatype=ox.NamedNode(XSD_DOUBLE))
                self.registry.put_graph(
                    artifact_iri(row.artifact_sha), triples, also=updates.set_meta(WATERMARK, stamp)
                )
                described += 1


class LivenessMirror:
    """Copies last-seen times from SQL into the liveness graph, batched.

    Online/offline transitions arrive through the outbox at once; last-seen moves
    with every heartbeat and is written to SQL in batches by the daemon, so it is
    mirrored here every few tens of seconds: one update for every device whose
    state changed since the previous pass.
    """

    def __init__(self, registry: Registry, source: OutboxSource) -> None:
        self.registry = registry
        self.source = source
        self._mirrored: dict[str, tuple[bool, float | None]] = {}

    def sync(self) -> int:
        current = {d.device_id: (d.online, d.last_seen) for d in self.source.list_devices()}
        changes = {
            device: (online, _when(seen))
            for device, (online, seen) in current.items()
            if self._mirrored.get(device) != (online, seen) and self.registry.exists(device)
        }
        if changes:
            self.registry.set_liveness(changes)
        for device in changes:
            self._mirrored[device] = current[device]
        for gone in set(self._mirrored) - set(current):
            del self._mirrored[gone]
        return len(changes)
