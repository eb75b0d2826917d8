"""Every read and write of the coordinator's SQL state, one transaction per change.

Callers (gRPC handlers, the job runner) never build SQL; each method here is one
unit of work that is committed (durable) before it returns, or rolled back with
nothing half-written. Device changes append an `outbox` row in the same
transaction so the registry can project them into RDF later; so does every new
artifact (kind "artifact.created": job, round, parent, size, encoding, metrics) and every
imported document (kind "document.imported": published descriptions the registry re-derives
its graphs from, so a rebuild from SQL keeps them).

Who may register is decided here too, inside the transaction that creates the device: a
new device consumes one use of its enrollment token in the same commit, so a token can
never enroll more devices than it has uses, whatever runs concurrently.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from tinyfleet.common.failpoints import failpoint
from tinyfleet.server.schema import (
    artifacts,
    devices,
    enrollments,
    imported_documents,
    jobs,
    node_results,
    outbox,
    rounds,
)

QUEUED = "queued"
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
TERMINAL_STATES = frozenset({FINISHED, FAILED})
#: Outbox kind of an operator's SPARQL Update (applied by the registry's projector).
REGISTRY_UPDATED = "registry.updated"


class DeviceExistsError(Exception):
    """A device id (or, rarely, a random node id) that is already taken."""


class RegistrationRefused(Exception):
    """A registration its caller may not make: no usable enrollment token for a new device,
    another device's key, a revoked device, a replayed request. The message says which."""

    def __init__(self, device_id: str, reason: str) -> None:
        super().__init__(reason)
        self.device_id = device_id


class RegistrationConflict(Exception):
    """A registration that kept losing races with concurrent writers of the same device."""


@dataclass(frozen=True)
class Device:
    device_id: str
    node_id: int
    description: bytes
    media_type: str
    registered_at: float
    updated_at: float
    last_seen: float | None
    online: bool
    public_key: bytes | None = None
    register_seq: int = 0
    enrollment_id: str | None = None
    revoked_at: float | None = None
    revoked_reason: str = ""
    #: The agent version its last Hello named ("" if none did).
    agent_version: str = ""


@dataclass(frozen=True)
class Enrollment:
    """An enrollment token as stored (its hash stays in SQL; the token itself nowhere)."""

    id: str
    label: str
    uses_total: int
    uses_left: int
    created_at: float
    expires_at: float
    revoked_at: float | None

    def refusal(self, now: float, taken: int = 0) -> str | None:
        """Why this token cannot enroll one more device (with `taken` uses already spoken for)."""
        if self.revoked_at is not None:
            return f"enrollment token {self.id} was revoked"
        if self.expires_at <= now:
            when = dt.datetime.fromtimestamp(self.expires_at, dt.UTC).isoformat(timespec="seconds")
            return f"enrollment token {self.id} expired at {when}"
        if self.uses_left - taken <= 0:
            return f"enrollment token {self.id} has no uses left (all {self.uses_total} taken)"
        return None


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    strategy: str
    spec_toml: str
    state: str
    reason: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    rounds_total: int
    rounds_done: int
    strategy_state: dict[str, Any] | None


@dataclass(frozen=True)
class NodeResult:
    phase: str
    node_id: int
    status: str
    error: str
    bytes_down: int
    bytes_up: int
    compute_s: float
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class RoundRecord:
    round: int
    started_at: float
    finished_at: float
    participants: int
    dropped: int
    train_metrics: dict[str, Any] | None
    eval_metrics: dict[str, Any] | None
    bytes_down: int
    bytes_up: int
    duration_s: float
    train_duration_s: float
    eval_duration_s: float
    artifact_sha: str | None
    nodes: list[NodeResult] = field(default_factory=list)
    #: Why the round kept the model instead of aggregating one ("" when it aggregated one).
    train_error: str = ""
    #: Why the round has no evaluation metrics though it asked nodes to evaluate ("" otherwise).
    eval_error: str = ""


@dataclass(frozen=True)
class ArtifactRecord:
    sha256: str
    size: int
    encoding: str
    job_id: int | None
    round: int | None
    parent_sha: str | None
    created_at: float


@dataclass(frozen=True)
class ImportedDocument:
    id: int
    name: str
    base_iri: str
    media_type: str
    content: bytes
    sha256: str
    imported_at: float


@dataclass(frozen=True)
class DeviceRegistration:
    """One Register call for `Repository.register_devices`: the (validated) description, the
    node id a new device gets, the device key whose signature the caller checked, with its
    sequence number, and what entitles a new device to join: the sha256 of an enrollment
    token (or ""), the admin token (`admin`, which may also re-key a device), or a
    coordinator in open enrollment."""

    device_id: str
    description: bytes
    media_type: str
    node_id: int
    public_key: bytes
    sequence: int
    enrollment_hash: str = ""
    admin: bool = False
    open_enrollment: bool = False


@dataclass(frozen=True)
class Registered:
    device: Device
    created: bool
    #: The operator re-keyed a revoked device (admin token, new key): it may connect again.
    reinstated: bool = False


def _device(row: sa.RowMapping) -> Device:
    values = {k: row[k] for k in Device.__dataclass_fields__}
    if values["public_key"] is not None:
        values["public_key"] = bytes(values["public_key"])  # PostgreSQL drivers may give a memoryview
    return Device(**values)


def _enrollment(row: sa.RowMapping) -> Enrollment:
    return Enrollment(**{k: row[k] for k in Enrollment.__dataclass_fields__})


def _admission(
    item: DeviceRegistration,
    existing: Device | None,
    token: Enrollment | None,
    taken: int,
    now: float,
) -> str | None:
    """Why `item` may not be registered, or None. `token` is the enrollment its hash names
    (None if it names none) and `taken` the uses of it earlier items of the group took."""
    device_id = item.device_id
    if existing is not None:
        same_key = existing.public_key == item.public_key
        if existing.revoked_at is not None and (same_key or not item.admin):
            why = f": {existing.revoked_reason}" if existing.revoked_reason else ""
            return f"device {device_id!r} was revoked{why}; the coordinator refuses it"
        if existing.public_key is not None:
            if same_key:
                if item.sequence <= existing.register_seq:
                    return (
                        f"registration sequence {item.sequence} of {device_id!r} is not above "
                        f"{existing.register_seq}, the last one accepted: a replayed or stale request"
                    )
                return None
            if item.admin:
                return None  # the operator re-keys the device
            return (
                f"device {device_id!r} is registered with another key; "
                "only the admin token can give it a new one"
            )
    # A new device, or one that exists without a key (made by an admin's PUT /things).
    if item.admin or item.open_enrollment:
        return None
    if not item.enrollment_hash:
        return (
            f"registering new device {device_id!r} needs an enrollment token "
            "(tinyfleet server enroll; agent run --enroll-token)"
        )
    if token is None:
        return UNKNOWN_ENROLLMENT_TOKEN
    return token.refusal(now, taken)


UNKNOWN_ENROLLMENT_TOKEN = "the enrollment token is not one this coordinator issued"


def _described(values: Mapping[str, Any], node_id: int | None = None) -> dict[str, Any]:
    """The outbox payload of a device description (what the projector re-derives its graph from)."""
    payload: dict[str, Any] = {} if node_id is None else {"node_id": node_id}
    payload["media_type"] = values["media_type"]
    payload["description"] = values["description"].decode("utf-8", "replace")
    return payload


def _job(row: sa.RowMapping) -> Job:
    return Job(**{k: row[k] for k in Job.__dataclass_fields__})


def _inserted_key(result: sa.CursorResult[Any]) -> int:
    """The primary key a single-row INSERT gave its row (SQLAlchemy's is None when no row was made)."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the INSERT made no row, so it has no primary key")
    return int(key[0])


def _precheck_verdict(owners: Sequence[Any], token: Any, enrollment_hash: str, now: float) -> str | None:
    """One caller's admission pre-check from the rows found for its key and its token."""
    if any(owner.revoked_at is None for owner in owners):
        return None
    if token is not None:
        return _enrollment(token._mapping).refusal(now)
    if owners:
        owner = owners[0]
        why = f": {owner.revoked_reason}" if owner.revoked_reason else ""
        return f"device {owner.device_id!r} was revoked{why}; the coordinator refuses its key"
    if enrollment_hash:
        return UNKNOWN_ENROLLMENT_TOKEN
    return ("registering a new device needs an enrollment token "
            "(tinyfleet server enroll; agent run --enroll-token)")


class Repository:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._outbox_listeners: list[Callable[[], None]] = []

    # -- devices -------------------------------------------------------------
    def get_device(self, device_id: str) -> Device | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(devices).where(devices.c.device_id == device_id)).first()
        return _device(row._mapping) if row else None

    def list_devices(self) -> list[Device]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(devices).order_by(devices.c.registered_at)).all()
        return [_device(r._mapping) for r in rows]

    def create_device(
        self,
        device_id: str,
        node_id: int,
        description: bytes,
        media_type: str,
        public_key: bytes | None = None,
    ) -> Device:
        """A device row made without a Register call (an admin's PUT /things): without a key,
        its agent claims it later with an enrollment token or the admin token."""
        now = time.time()
        device = Device(
            device_id=device_id, node_id=node_id, description=description, media_type=media_type,
            registered_at=now, updated_at=now, last_seen=None, online=False, public_key=public_key,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(devices.insert().values(**device.__dict__))
                self._outbox(conn, "device.registered", device_id, _described(device.__dict__, node_id))
        except sa.exc.IntegrityError as exc:
            raise DeviceExistsError(device_id) from exc
        return device

    def delete_device(self, device_id: str) -> bool:
        """Forget a device (the registry directory's DELETE); False if it was not there."""
        with self.engine.begin() as conn:
            gone = conn.execute(devices.delete().where(devices.c.device_id == device_id)).rowcount
            if gone:
                self._outbox(conn, "device.deleted", device_id, {})
        return bool(gone)

    def replace_description(self, device_id: str, description: bytes, media_type: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                devices.update()
                .where(devices.c.device_id == device_id)
                .values(description=description, media_type=media_type, updated_at=time.time())
            )
            self._outbox(conn, "device.updated", device_id,
                         _described({"description": description, "media_type": media_type}))

    def admission_prechecks(self, callers: Sequence[tuple[bytes, str]]) -> list[tuple[str | None, int]]:
        """Why each caller (public key, enrollment token hash) without the admin token (and not in
        open enrollment) cannot register anything, or None: it needs a key some unrevoked device
        already has, or an enrollment token that is issued, unexpired, unrevoked and has uses
        left. Asked before descriptions are validated, so an unknown caller costs no SHACL run;
        `register_devices` still decides (a token's last use may go to a concurrent call). Two
        indexed lookups for all concurrent callers; with each verdict, the uses the caller's
        token had left (0 without one), so that many more may pass without asking."""
        keys = sorted({key for key, _ in callers if key})
        hashes = sorted({digest for _, digest in callers if digest})
        owners: dict[bytes, list[Any]] = {}
        tokens: dict[str, Any] = {}
        with self.engine.connect() as conn:
            if keys:
                for row in conn.execute(
                    sa.select(devices.c.public_key, devices.c.device_id, devices.c.revoked_at,
                              devices.c.revoked_reason).where(devices.c.public_key.in_(keys))
                ):
                    owners.setdefault(bytes(row.public_key), []).append(row)
            if hashes:
                for row in conn.execute(sa.select(enrollments).where(enrollments.c.token_hash.in_(hashes))):
                    tokens[row.token_hash] = row
        now = time.time()
        return [
            (
                _precheck_verdict(owners.get(key, []), tokens.get(digest), digest, now),
                int(tokens[digest].uses_left) if digest in tokens else 0,
            )
            for key, digest in callers
        ]

    def register_devices(
        self, batch: Sequence[DeviceRegistration], *, attempts: int = 5
    ) -> list[Registered | Exception]:
        """Create or re-describe many devices in ONE transaction (one commit, so concurrent
        registrations share one fsync), each with its outbox row, in the order given.

        One result per item: Registered, or RegistrationRefused (see `_admission`; nothing
        written for it). A new device takes one use of its enrollment token, in this
        transaction. If the group's transaction fails (a concurrent writer took a device or
        node id, a value the database refuses), none of it is kept and each item is retried
        in a transaction of its own, so only the item at fault gets an error.
        """
        try:
            results = self._register_group(batch)
        except sa.exc.SQLAlchemyError:
            results = [self._register_alone(item, attempts) for item in batch]
        failpoint("register.after-sql-commit")  # crash tests: committed, not yet projected
        for listener in list(self._outbox_listeners):
            listener()
        return results

    def on_outbox(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after registrations commit outbox rows (the projector wakes up)."""
        self._outbox_listeners.append(listener)

    def _register_alone(self, item: DeviceRegistration, attempts: int) -> Registered | Exception:
        from tinyfleet.server.auth import new_node_id

        for _ in range(attempts):
            try:
                return self._register_group([item])[0]
            except sa.exc.IntegrityError:
                # Lost a race for the device id (read it again) or, rarely, for the node id.
                item = dataclasses.replace(item, node_id=new_node_id())
            except sa.exc.SQLAlchemyError as exc:
                return exc
        return RegistrationConflict(f"could not register {item.device_id!r}; try again")

    def _register_group(self, batch: Sequence[DeviceRegistration]) -> list[Registered | Exception]:
        now = time.time()
        results: list[Registered | Exception] = []
        with self.engine.begin() as conn:
            wanted = sorted({item.device_id for item in batch})
            current = {
                row.device_id: _device(row._mapping)
                for row in conn.execute(sa.select(devices).where(devices.c.device_id.in_(wanted)))
            }
            hashes = sorted({item.enrollment_hash for item in batch if item.enrollment_hash})
            tokens = {
                row.token_hash: _enrollment(row._mapping)
                for row in conn.execute(
                    # Locked (PostgreSQL) so concurrent groups cannot both take a token's last use.
                    sa.select(enrollments).where(enrollments.c.token_hash.in_(hashes)).with_for_update()
                )
            } if hashes else {}
            taken: dict[str, int] = {}
            new: dict[str, Device] = {}
            changed: dict[str, Device] = {}
            events: list[dict[str, Any]] = []
            for item in batch:
                existing = current.get(item.device_id)
                token = tokens.get(item.enrollment_hash)
                refusal = _admission(item, existing, token, taken.get(token.id, 0) if token else 0, now)
                if refusal is not None:
                    results.append(RegistrationRefused(item.device_id, refusal))
                    continue
                # Enrolled now: a new device, or one claimed by its first key, with a token.
                enrolled = (existing is None or existing.public_key is None) and not (
                    item.admin or item.open_enrollment
                )
                enrollment_id = token.id if enrolled and token is not None else None
                if enrollment_id is not None:
                    taken[enrollment_id] = taken.get(enrollment_id, 0) + 1
                if existing is None:
                    device = Device(
                        device_id=item.device_id, node_id=item.node_id, description=item.description,
                        media_type=item.media_type, registered_at=now, updated_at=now,
                        last_seen=None, online=False, public_key=item.public_key,
                        register_seq=item.sequence, enrollment_id=enrollment_id,
                    )
                    new[item.device_id] = device
                    kind, payload = "device.registered", _described(device.__dict__, item.node_id)
                else:
                    device = dataclasses.replace(
                        existing, description=item.description, media_type=item.media_type,
                        updated_at=now, public_key=item.public_key, register_seq=item.sequence,
                        enrollment_id=enrollment_id or existing.enrollment_id,
                        revoked_at=None, revoked_reason="",
                    )
                    (new if item.device_id in new else changed)[item.device_id] = device
                    kind, payload = "device.updated", _described(device.__dict__)
                current[item.device_id] = device
                events.append(
                    {"kind": kind, "subject": item.device_id, "payload": payload, "created_at": now}
                )
                results.append(Registered(
                    device, created=existing is None,
                    reinstated=existing is not None and existing.revoked_at is not None,
                ))
            if new:
                conn.execute(devices.insert(), [d.__dict__ for d in new.values()])
            if changed:
                columns = ("description", "media_type", "updated_at", "public_key", "register_seq",
                           "enrollment_id", "revoked_at", "revoked_reason")
                conn.execute(
                    devices.update()
                    .where(devices.c.device_id == sa.bindparam("did"))
                    .values({c: sa.bindparam(f"new_{c}") for c in columns}),
                    [
                        {"did": d.device_id, **{f"new_{c}": getattr(d, c) for c in columns}}
                        for d in changed.values()
                    ],
                )
            for enrollment_id, uses in taken.items():
                conn.execute(
                    enrollments.update().where(enrollments.c.id == enrollment_id)
                    .values(uses_left=enrollments.c.uses_left - uses)
                )
            if events:  # executemany inserts in list order: sequence numbers follow the calls
                conn.execute(outbox.insert(), events)
        return results

    def revoke_device(self, device_id: str, reason: str) -> Device | None:
        """Refuse the device's key from now on (the caller closes its stream); None if unknown."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(devices).where(devices.c.device_id == device_id)).first()
            if row is None:
                return None
            device = dataclasses.replace(
                _device(row._mapping), revoked_at=time.time(), revoked_reason=reason
            )
            conn.execute(
                devices.update().where(devices.c.device_id == device_id)
                .values(revoked_at=device.revoked_at, revoked_reason=reason)
            )
        return device

    # -- enrollment tokens -------------------------------------------------------
    def create_enrollment(
        self, enrollment_id: str, token_hash: str, *, label: str, uses: int, ttl_s: float
    ) -> Enrollment:
        now = time.time()
        enrollment = Enrollment(
            id=enrollment_id, label=label, uses_total=uses, uses_left=uses, created_at=now,
            expires_at=now + ttl_s, revoked_at=None,
        )
        with self.engine.begin() as conn:
            conn.execute(enrollments.insert().values(token_hash=token_hash, **enrollment.__dict__))
        return enrollment

    def list_enrollments(self) -> list[Enrollment]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(enrollments).order_by(enrollments.c.created_at)).all()
        return [_enrollment(r._mapping) for r in rows]

    def revoke_enrollment(self, enrollment_id: str) -> Enrollment | None:
        """No further device can enroll with it (those it enrolled stay); None if unknown."""
        with self.engine.begin() as conn:
            conn.execute(
                enrollments.update()
                .where(enrollments.c.id == enrollment_id, enrollments.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            row = conn.execute(sa.select(enrollments).where(enrollments.c.id == enrollment_id)).first()
        return _enrollment(row._mapping) if row else None

    def set_online(self, device_id: str, online: bool, agent_version: str | None = None) -> None:
        """Liveness after a connect or disconnect; a connect also records its Hello's agent version."""
        now = time.time()
        values: dict[str, Any] = {"online": online, "last_seen": now}
        if agent_version is not None:
            values["agent_version"] = agent_version
        with self.engine.begin() as conn:
            conn.execute(devices.update().where(devices.c.device_id == device_id).values(values))
            self._outbox(conn, "device.online" if online else "device.offline", device_id,
                         {"at": now})

    def touch_last_seen(self, seen: Mapping[str, float]) -> None:
        """Batch write of liveness: one transaction for every device heard from since last time."""
        if not seen:
            return
        with self.engine.begin() as conn:
            conn.execute(
                devices.update()
                .where(devices.c.device_id == sa.bindparam("did"))
                .values(last_seen=sa.bindparam("ts")),
                [{"did": did, "ts": ts} for did, ts in seen.items()],
            )

    def mark_all_offline(self) -> int:
        """At daemon start nothing is connected yet, whatever the last run left behind."""
        with self.engine.begin() as conn:
            stale = conn.execute(
                sa.select(devices.c.device_id).where(devices.c.online.is_(True))
            ).scalars().all()
            if stale:
                conn.execute(devices.update().where(devices.c.online.is_(True)).values(online=False))
                for device_id in stale:
                    self._outbox(conn, "device.offline", device_id, {"at": time.time()})
        return len(stale)

    def outbox_since(self, seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(outbox).where(outbox.c.seq > seq).order_by(outbox.c.seq).limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    @staticmethod
    def _outbox(conn: sa.Connection, kind: str, subject: str, payload: dict[str, Any]) -> None:
        conn.execute(outbox.insert().values(
            kind=kind, subject=subject, payload=payload, created_at=time.time()
        ))

    # -- the operator's SPARQL Updates ------------------------------------------
    def record_registry_update(self, update: str) -> int:
        """Keep an admin's SPARQL Update as an outbox row (kind "registry.updated"), so the
        projector applies it in order with every other change and `registry rebuild` applies it
        again; returns its sequence number."""
        with self.engine.begin() as conn:
            seq = _inserted_key(conn.execute(outbox.insert().values(
                kind=REGISTRY_UPDATED, subject="sparql-update", payload={"update": update},
                created_at=time.time(),
            )))
        return seq

    def registry_updates(self) -> list[tuple[int, str]]:
        """Every recorded SPARQL Update as (sequence, text), oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(outbox.c.seq, outbox.c.payload)
                .where(outbox.c.kind == REGISTRY_UPDATED).order_by(outbox.c.seq)
            ).all()
        return [(int(seq), str((payload or {}).get("update", ""))) for seq, payload in rows]

    # -- imported documents ----------------------------------------------------
    def import_document(
        self, name: str, base_iri: str, media_type: str, content: bytes
    ) -> ImportedDocument:
        """Keep (or replace, by `name`) an imported document, with its outbox row."""
        values: dict[str, Any] = {
            "name": name,
            "base_iri": base_iri,
            "media_type": media_type,
            "content": content,
            "sha256": hashlib.sha256(content).hexdigest(),
            "imported_at": time.time(),
        }
        with self.engine.begin() as conn:
            found = conn.execute(
                sa.select(imported_documents.c.id).where(imported_documents.c.name == name)
            ).scalar()
            if found is None:
                found = _inserted_key(conn.execute(imported_documents.insert().values(**values)))
            else:
                conn.execute(
                    imported_documents.update().where(imported_documents.c.id == found).values(**values)
                )
            self._outbox(conn, "document.imported", name, {
                "id": int(found), "sha256": values["sha256"], "base_iri": base_iri,
            })
        return ImportedDocument(id=int(found), **values)

    def imported_document(self, name: str) -> ImportedDocument | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(imported_documents).where(imported_documents.c.name == name)
            ).first()
        return ImportedDocument(**row._mapping) if row else None

    def list_imported_documents(self) -> list[ImportedDocument]:
        """In the order they were first imported (a later file may refine an earlier one)."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(imported_documents).order_by(imported_documents.c.id)).all()
        return [ImportedDocument(**r._mapping) for r in rows]

    # -- jobs ------------------------------------------------------------------
    def create_job(self, name: str, strategy: str, spec_toml: str, rounds_total: int) -> Job:
        with self.engine.begin() as conn:
            job_id = _inserted_key(conn.execute(
                jobs.insert().values(
                    name=name, strategy=strategy, spec_toml=spec_toml, state=QUEUED, reason="",
                    created_at=time.time(), rounds_total=rounds_total, rounds_done=0,
                )
            ))
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: int) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return _job(row._mapping) if row else None

    def list_jobs(self) -> list[Job]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).order_by(jobs.c.id)).all()
        return [_job(r._mapping) for r in rows]

    def next_job(self) -> Job | None:
        """The job to run next: an interrupted running one first (resume), then FIFO queued."""
        with self.engine.connect() as conn:
            for state in (RUNNING, QUEUED):
                row = conn.execute(
                    sa.select(jobs).where(jobs.c.state == state).order_by(jobs.c.id).limit(1)
                ).first()
                if row:
                    return _job(row._mapping)
        return None

    def start_job(self, job_id: int, initial: ArtifactRecord) -> None:
        """Mark a queued job running and record its initial model as the round-0 artifact."""
        with self.engine.begin() as conn:
            self._insert_artifact(conn, initial, {})
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(state=RUNNING, started_at=time.time())
            )

    def commit_round(
        self,
        job_id: int,
        record: RoundRecord,
        artifact: ArtifactRecord | None,
        strategy_state: dict[str, Any] | None,
    ) -> None:
        """A finished round: its row, per-node results, artifact row and job progress, atomically."""
        with self.engine.begin() as conn:
            if artifact is not None:
                self._insert_artifact(conn, artifact, {
                    "train_metrics": record.train_metrics, "eval_metrics": record.eval_metrics,
                })
            values = {k: getattr(record, k) for k in RoundRecord.__dataclass_fields__ if k != "nodes"}
            conn.execute(rounds.insert().values(job_id=job_id, **values))
            if record.nodes:
                conn.execute(
                    node_results.insert(),
                    [{"job_id": job_id, "round": record.round, **n.__dict__} for n in record.nodes],
                )
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(rounds_done=record.round, strategy_state=strategy_state)
            )

    def end_job(self, job_id: int, state: str, reason: str = "") -> None:
        if state not in TERMINAL_STATES:
            raise ValueError(f"end_job needs a terminal state, got {state!r}")
        with self.engine.begin() as conn:
            conn.execute(
                jobs.update().where(jobs.c.id == job_id)
                .values(state=state, reason=reason, finished_at=time.time())
            )

    def get_rounds(self, job_id: int, after_round: int = 0) -> list[RoundRecord]:
        """Finished rounds of a job, oldest first; only those after `after_round` (rounds never change)."""
        with self.engine.connect() as conn:
            round_rows = conn.execute(
                sa.select(rounds).where(rounds.c.job_id == job_id, rounds.c.round > after_round)
                .order_by(rounds.c.round)
            ).all()
            node_rows = conn.execute(
                sa.select(node_results)
                .where(node_results.c.job_id == job_id, node_results.c.round > after_round)
                .order_by(node_results.c.round, node_results.c.id)
            ).all()
        by_round: dict[int, list[NodeResult]] = {}
        for n in node_rows:
            m = n._mapping
            by_round.setdefault(m["round"], []).append(
                NodeResult(**{k: m[k] for k in NodeResult.__dataclass_fields__})
            )
        result = []
        for r in round_rows:
            m = r._mapping
            fields = {k: m[k] for k in RoundRecord.__dataclass_fields__ if k != "nodes"}
            result.append(RoundRecord(**fields, nodes=by_round.get(m["round"], [])))
        return result

    # -- artifacts -------------------------------------------------------------
    def get_artifact(self, sha: str) -> ArtifactRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(artifacts).where(artifacts.c.sha256 == sha)).first()
        return ArtifactRecord(**row._mapping) if row else None

    def round_artifact(self, job_id: int, round_number: int) -> ArtifactRecord | None:
        """The global model a job had after `round_number` (None before round 1)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(artifacts)
                .join(rounds, rounds.c.artifact_sha == artifacts.c.sha256)
                .where(rounds.c.job_id == job_id, rounds.c.round == round_number)
                .limit(1)
            ).first()
        return ArtifactRecord(**row._mapping) if row else None

    @classmethod
    def _insert_artifact(
        cls, conn: sa.Connection, record: ArtifactRecord, metrics: dict[str, Any]
    ) -> None:
        """Artifact row plus an outbox row (provenance for the registry), if it is new."""
        exists = conn.execute(
            sa.select(artifacts.c.sha256).where(artifacts.c.sha256 == record.sha256)
        ).first()
        if not exists:  # content-addressed: the same bytes are the same artifact
            conn.execute(artifacts.insert().values(**record.__dict__))
            cls._outbox(conn, "artifact.created", record.sha256, {**record.__dict__, **metrics})

