"""SQL outbox -> registry: SQL stays the system of record, the RDF store follows it.

Every device change the coordinator commits appends an outbox row in the same
SQL transaction. The projector reads rows after the last sequence the store
recorded, and applies each batch with ONE SPARQL Update that also records the
batch's last sequence; so after a crash between the SQL commit and the
projection, the next `catch_up` applies exactly what is missing, and applying a
row twice is harmless (a description replaces its graph, liveness overwrites).
Imported documents (published Turtle) are kept in SQL too and projected the same
way, from the document row the outbox row names; so are the admin's SPARQL
Updates (outbox kind "registry.updated"), each applied on its own with its
sequence recorded in the same request. `rebuild` regenerates a whole store from
the SQL tables.

Disk full. SQLite fails the write and works again once space is freed; the
embedded store (RocksDB) refuses every write after one failed for lack of space
until it is reopened. So after a failed catch-up the projector reopens the store
in place before the next try (read-only meanwhile, so queries keep answering)
and the registry recovers without a restart. Write paths use
`refused_when_disk_full` around their SQL write (disk full: 507, nothing stored)
and `catch_up_after_commit` after it (the write is durable; if projecting fails
the answer says so and the projector catches up). `health()` is the outbox lag
/healthz shows: committed rows not yet in the store and the age of the oldest.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pyoxigraph as ox
import sqlalchemy as sa

from tinyfleet.server.http.api import InsufficientStorage, StoredNotYetVisible
from tinyfleet.server.registry.importer import Document, FileReport, Imported, ImportFailed, prepare_document
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Prepared, Registry
from tinyfleet.server.registry.validation import DescriptionInvalid
from tinyfleet.server.repository import REGISTRY_UPDATED

log = logging.getLogger(__name__)


class DeviceRow(Protocol):
    """Read-only, as the repository's frozen rows are."""

    @property
    def device_id(self) -> str: ...
    @property
    def node_id(self) -> int: ...
    @property
    def description(self) -> bytes: ...
    @property
    def media_type(self) -> str: ...
    @property
    def last_seen(self) -> float | None: ...
    @property
    def online(self) -> bool: ...


class DocumentRow(Protocol):
    """Read-only, as the repository's frozen rows are."""

    @property
    def name(self) -> str: ...
    @property
    def base_iri(self) -> str: ...
    @property
    def content(self) -> bytes: ...


def _document(row: DocumentRow) -> Document:
    return Document(name=row.name, base=row.base_iri, content=row.content)


class OutboxSource(Protocol):
    """What the projector needs from the coordinator's repository."""

    engine: sa.Engine

    def outbox_since(self, seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]: ...

    def list_devices(self) -> Sequence[DeviceRow]: ...

    def imported_document(self, name: str) -> DocumentRow | None: ...

    def list_imported_documents(self) -> Sequence[DocumentRow]: ...

    def registry_updates(self) -> list[tuple[int, str]]: ...


@dataclass
class Applied:
    rows: int = 0
    descriptions: int = 0
    liveness: int = 0
    documents: int = 0
    skipped: int = 0


def _when(timestamp: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC) if timestamp is not None else None


#: SQLSTATE of PostgreSQL's disk_full.
PG_DISK_FULL = "53100"
#: How RocksDB (pyoxigraph) words ENOSPC; its OSError carries no errno.
NO_SPACE_TEXT = "No space left on device"


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk (or quota) is full: SQLite's SQLITE_FULL, PostgreSQL's disk_full,
    ENOSPC/EDQUOT, or the embedded store's wording of ENOSPC."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        exc = exc.orig
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    if getattr(exc, "sqlstate", None) == PG_DISK_FULL:
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT) or NO_SPACE_TEXT in str(exc)
    return False


@contextlib.contextmanager
def refused_when_disk_full() -> Iterator[None]:
    """Around a write path's SQL write: a disk-full failure (the transaction rolled back) becomes
    InsufficientStorage, which the HTTP API answers with 507."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc):
            raise InsufficientStorage(
                "the coordinator's disk is full: nothing was stored; retry once space is freed"
            ) from exc
        raise


def _failure(exc: BaseException) -> str:
    """What /healthz says about a failed projection (no paths, no SQL)."""
    if is_disk_full(exc):
        return "the registry cannot write: the disk is full"
    if isinstance(exc, OSError):
        return "the registry store cannot write"
    return "projection failed"


@dataclass(frozen=True)
class OutboxLag:
    """Outbox rows SQL committed that the store had not applied when last measured."""

    rows: int = 0
    oldest_at: float | None = None  # created_at of the oldest of them


class Projector:
    def __init__(self, registry: Registry, source: OutboxSource, *, batch: int = 500) -> None:
        self.registry = registry
        self.source = source
        self.batch = batch
        self._lock = threading.Lock()  # the daemon's loop and directory writes both catch up
        self._wake: Callable[[], object] | None = None
        self._applied: int | None = None  # the store's last applied sequence, once known
        self._store_failed = False  # a write to the store failed: reopen it before the next try
        self._error: str | None = None  # why the last catch-up failed (for /healthz)
        self._lag = OutboxLag()
        #: Operator updates the store refused (sequence -> why), for the request that sent them.
        self.refused_updates: dict[int, str] = {}

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
        """Apply everything after the store's last recorded sequence; returns the totals. After a
        failed write the embedded store is reopened first (see the module docstring)."""
        with self._lock:
            try:
                if self._store_failed and isinstance(self.registry.store, EmbeddedStore):
                    self.registry.store.reopen()
                    log.info("registry store reopened after a failed write")
                self._store_failed = False
                applied = self._catch_up()
            except Exception as exc:
                self.note_failure(exc)
                raise
            self._error = None
            return applied

    def catch_up_after_commit(self) -> Applied:
        """`catch_up` for a write path whose SQL write just committed: the write is durable, so a
        failure to project it now is StoredNotYetVisible (HTTP 202), not an error; the projector
        applies it once the store can write again."""
        try:
            return self.catch_up()
        except Exception as exc:
            log.warning("stored in SQL, projection pending: %s", _failure(exc))
            raise StoredNotYetVisible(
                "stored; the registry will show it once it can write again "
                f"({_failure(exc)}); the projector catches up by itself"
            ) from exc

    def note_failure(self, exc: BaseException) -> None:
        """A write to the store failed (here or in another registry writer): an OSError is the
        embedded store's I/O error, after which RocksDB needs a reopen."""
        self._error = _failure(exc)
        if isinstance(exc, OSError):
            self._store_failed = True

    def _catch_up(self) -> Applied:
        total = Applied()
        while True:
            self._applied = self.registry.last_applied_seq()
            rows = self.source.outbox_since(self._applied, limit=self.batch)
            if not rows:
                return total
            if rows[0]["kind"] == REGISTRY_UPDATED:
                self._apply_update(rows[0])
                total.rows += 1
                continue
            # an operator's update is a batch of its own: what comes before it goes first
            rows = next((rows[:n] for n, r in enumerate(rows) if r["kind"] == REGISTRY_UPDATED), rows)
            done = self.apply(rows)
            total.rows += done.rows
            total.descriptions += done.descriptions
            total.liveness += done.liveness
            total.documents += done.documents
            total.skipped += done.skipped

    def _apply_update(self, row: dict[str, Any]) -> None:
        """An operator's SPARQL Update, with its sequence in the same transaction. One the store
        refuses (a graph CREATEd twice, text that no longer parses) is skipped and remembered,
        so it cannot hold up the rows after it; I/O errors propagate (the store is retried)."""
        seq = int(row["seq"])
        try:
            self.registry.apply_update(str((row["payload"] or {}).get("update", "")), seq=seq)
        except (SyntaxError, RuntimeError) as exc:
            log.warning("outbox %s: SPARQL update not applied: %s", seq, exc)
            self.refused_updates[seq] = str(exc)
            self.registry.put_many([], seq=seq)

    async def run(self, interval_s: float = 0.5) -> None:
        """Catch up whenever `wake` is called (SQL committed outbox rows) and at least every
        `interval_s`, until cancelled. Rows committed while a catch-up runs wake the next one.
        A failure (remote store unreachable, disk full) is logged when it starts and when it
        ends, and retried every tick; the outbox lag is measured after every attempt."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        self._wake = lambda: loop.call_soon_threadsafe(woken.set)
        failing = False
        try:
            while True:
                woken.clear()
                try:
                    await asyncio.to_thread(self.catch_up)
                except Exception:
                    if not failing:
                        log.exception("registry projection failed (%s); retrying every %g s",
                                      self._error, interval_s)
                    failing = True
                else:
                    if failing:
                        log.info("registry projection recovered")
                    failing = False
                try:
                    await asyncio.to_thread(self._measure_lag)
                except sa.exc.SQLAlchemyError as exc:
                    log.debug("outbox lag not measured: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), interval_s)
        finally:
            self._wake = None

    def _measure_lag(self) -> None:
        from tinyfleet.server.schema import outbox

        applied = self._applied if self._applied is not None else 0
        with self.source.engine.connect() as conn:
            rows, oldest = conn.execute(
                sa.select(sa.func.count(), sa.func.min(outbox.c.created_at)).where(outbox.c.seq > applied)
            ).one()
        self._lag = OutboxLag(int(rows), None if oldest is None else float(oldest))

    def health(self) -> dict[str, Any]:
        """The outbox lag for /healthz, from the last measurement (no I/O: probes must not wait)."""
        lag = self._lag
        age = None if lag.oldest_at is None else round(max(0.0, time.time() - lag.oldest_at), 3)
        return {"outbox": {"lag": lag.rows, "oldest_age_s": age, "error": self._error}}

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
    device's description and liveness, the operator's SPARQL Updates (in the order they were
    made, over the current descriptions), then the outbox sequence they reflect (rows after
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
    for number, update in source.registry_updates():
        if number > seq:
            break
        try:
            registry.apply_update(update)
        except (SyntaxError, RuntimeError) as exc:  # refused when first applied too
            log.warning("SPARQL update %s not rebuilt: %s", number, exc)
            applied.skipped += 1
    registry.put_many([], seq=seq)
    applied.rows = seq
    return applied


WATERMARK = "https://w3id.org/tinyfleet#artifactsDescribedUntil"
XSD_DOUBLE = "http://www.w3.org/2001/XMLSchema#double"


class ArtifactProjector:
    """Describes each round's artifact (provenance, contributors, memory needs, the classes a
    prototype artifact knows and the devices behind each) once its round
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
        from tinyfleet.server.registry import sparql_updates
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
            devices = {d.node_id: d.device_id for d in self.source.list_devices()}
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
                    devices=devices,
                )
                stamp = ox.Literal(repr(float(row.finished_at)), datatype=ox.NamedNode(XSD_DOUBLE))
                self.registry.put_graph(
                    artifact_iri(row.artifact_sha), triples, also=sparql_updates.set_meta(WATERMARK, stamp)
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
