"""The registry plugged into the coordinator daemon (`tinyfleet.server.daemon.Hooks`).

- describe_device(s): registrations are validated by the registry (TD checks + SHACL),
  concurrent ones as a group; a refusal carries the {path, message} list (`errors`),
  which the Fleet service returns with INVALID_ARGUMENT.
- http_routes: /sparql, /things..., /search/sparql, /.well-known/wot, /events, and
  /registry/imports (published Turtle kept in SQL, then projected).
- eligibility: a job's `eligible` query (SPARQL or named query) becomes the node
  filter FleetGrid applies each time it selects nodes, i.e. every round, so a
  description that changes mid-job changes who takes part from the next round.
- background: the outbox projector (SQL -> store, woken by registrations, catching up after a crash),
  round-artifact descriptions, last-seen mirroring (batched every 30 s) and the
  purge of expired directory registrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyoxigraph as ox
from starlette.routing import BaseRoute

from tinyfleet.common.jobspec import JobSpecError
from tinyfleet.ontology.catalog import QueryError, resolve_query
from tinyfleet.server.auth import FailedAuthLimiter
from tinyfleet.server.descriptions import DescriptionError
from tinyfleet.server.http.directory import purge_loop
from tinyfleet.server.http.imports import import_routes
from tinyfleet.server.http.registry_access import Access
from tinyfleet.server.http.registry_routes import registry_routes
from tinyfleet.server.http.sparql import SparqlOptions, UpdateRefused
from tinyfleet.server.registry.events import EventHub
from tinyfleet.server.registry.importer import Document, FileReport, import_document
from tinyfleet.server.registry.projector import (
    ArtifactProjector,
    LivenessMirror,
    Projector,
    refused_when_disk_full,
)
from tinyfleet.server.registry.service_policy import ServiceNotAllowed
from tinyfleet.server.registry.store import open_store
from tinyfleet.server.registry.thing_graphs import Prepared, Registry
from tinyfleet.server.registry.validation import DescriptionInvalid

if TYPE_CHECKING:
    from tinyfleet.common.jobspec import JobSpec
    from tinyfleet.server.daemon import Hooks
    from tinyfleet.server.repository import Repository

log = logging.getLogger(__name__)


class RegistryDescriptionError(DescriptionError):
    """A description the registry refused; `errors` is the [{path, message}] list."""

    def __init__(self, invalid: DescriptionInvalid) -> None:
        super().__init__(invalid.summary)
        self.errors = invalid.as_list()


class EligibilityError(JobSpecError):
    """A job's `eligible` setting that is not a usable query (refused at submission)."""

    def __init__(self, message: str) -> None:
        super().__init__("round.eligible", message)


class CoordinatorRegistry:
    def __init__(
        self,
        registry: Registry,
        *,
        admin_token: str | None = None,
        blobs: Any = None,
        sparql: SparqlOptions | None = None,
    ) -> None:
        self.registry = registry
        self.sparql = sparql or SparqlOptions()
        # /sparql and /search/sparql queries: worker processes, killed at the deadline and at stop.
        self.queries = self.sparql.query_workers(registry.store)
        self.blobs = blobs  # the coordinator's ArtifactStore: round artifacts are described from it
        self.hub = EventHub()
        self.admin_token = admin_token
        #: The coordinator's one failed-auth count (its gRPC services and /api share it).
        self.auth_failures = FailedAuthLimiter()
        self.repo: Repository | None = None
        self.projector: Projector | None = None

    @classmethod
    def open(
        cls,
        data_dir: Path,
        registry_url: str | None = None,
        admin_token: str | None = None,
        sparql: SparqlOptions | None = None,
    ) -> CoordinatorRegistry:
        from tinyfleet.server.artifacts import ArtifactStore

        store = open_store(data_dir, registry_url)
        return cls(
            Registry(store),
            admin_token=admin_token,
            blobs=ArtifactStore(Path(data_dir) / "artifacts"),
            sparql=sparql,
        )

    def describe_device(self, description: bytes, media_type: str) -> tuple[str, bytes]:
        """SQL keeps the description as the device sent it; the projector re-derives its graph.
        A device that registers trains: the fleet's requirements apply to it (`for_training`)."""
        try:
            prepared = self.registry.prepare(description, media_type, for_training=True)
        except DescriptionInvalid as exc:
            raise RegistryDescriptionError(exc) from exc
        return prepared.thing_id, description

    def describe_devices(
        self, items: Sequence[tuple[bytes, str]]
    ) -> list[tuple[str, bytes] | DescriptionError]:
        """`describe_device` for concurrent registrations: each judged on its own, few SHACL runs."""
        results = self.registry.prepare_many(
            [(d, m, None, None) for d, m in items], raise_first=False, for_training=True
        )
        return [
            RegistryDescriptionError(r) if isinstance(r, DescriptionInvalid) else (r.thing_id, d)
            for r, (d, _) in zip(results, items, strict=True)
        ]

    def verify_device(self, device_id: str, message: bytes, signature: bytes) -> bool:
        """True when the device exists, is not revoked, and its key signed `message` (HTTP writes)."""
        from tinyfleet.common.device_keys import verify

        device = self.repo.get_device(device_id) if self.repo is not None else None
        return (
            device is not None and device.public_key is not None and device.revoked_at is None
            and verify(device.public_key, signature, message)
        )

    def routes(self) -> list[BaseRoute]:
        access = Access(
            admin_token=self.admin_token, verify_device=self.verify_device, auth_failures=self.auth_failures
        )
        writer = SqlWriter(self)
        return [
            *registry_routes(
                self.registry, self.hub, writer=writer, access=access,
                sparql=self.sparql, queries=self.queries, apply_update=writer.update,
            ),
            *import_routes(writer.import_document, access=access),
        ]

    def eligibility(self, spec: JobSpec) -> Callable[[], set[int]] | None:
        if not spec.round.eligible:
            return None
        try:
            query = resolve_query(spec.round.eligible)
            # Runs in this process, unsandboxed: an admin's SPARQL must not call out either.
            self.queries.services.check_query(query)
            result = ox.Store().query(query)  # parses it; an empty store answers at once
        except (QueryError, ServiceNotAllowed) as exc:
            raise EligibilityError(str(exc)) from exc
        except SyntaxError as exc:
            raise EligibilityError(f"not valid SPARQL: {exc}") from exc
        names = [v.value for v in result.variables] if isinstance(result, ox.QuerySolutions) else []
        del result
        if "device" not in names:
            raise EligibilityError("must be a SELECT query returning ?device")

        def eligible_nodes() -> set[int]:
            devices = set(self.registry.eligible(query))
            if self.repo is None or not devices:
                return set()
            return {d.node_id for d in self.repo.list_devices() if d.device_id in devices}

        return eligible_nodes

    def recover(self, repo: Repository) -> None:
        """Apply what SQL committed but the store never saw (a crash between the two)."""
        self.repo = repo
        self.projector = Projector(self.registry, repo)
        repo.on_outbox(self.projector.wake)
        applied = self.projector.catch_up()
        if applied.rows:
            log.info("registry caught up with %d outbox row(s)", applied.rows)

    async def background(self, repo: Repository) -> None:
        """Projector and expiry purge, until cancelled (the daemon's lifetime)."""
        if self.projector is None:
            await asyncio.to_thread(self.recover, repo)
        assert self.projector is not None
        projector = self.projector
        tasks = [
            asyncio.create_task(projector.run()),
            asyncio.create_task(purge_loop(self.registry, SqlWriter(self))),
        ]
        failed = projector.note_failure
        tasks.append(asyncio.create_task(
            _every(LivenessMirror(self.registry, repo).sync, interval_s=30.0, on_error=failed)
        ))
        if self.blobs is not None:
            tasks.append(asyncio.create_task(
                _every(ArtifactProjector(self.registry, repo, self.blobs).catch_up, on_error=failed)
            ))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    def stopping(self) -> None:
        """First thing at the coordinator's stop: kill the SPARQL query workers and the
        large-description worker, so neither a running query nor a validation holds it up."""
        self.queries.close()
        self.registry.large_descriptions.close()

    def hooks(self) -> Hooks:
        from tinyfleet.server.daemon import Hooks

        return Hooks(
            describe_device=self.describe_device,
            describe_devices=self.describe_devices,
            limits=self.registry.limits,
            http_routes=self.routes(),
            eligibility=self.eligibility,
            recover=self.recover,
            background=self.background,
            health=lambda: self.projector.health() if self.projector is not None else {},
            stopping=self.stopping,
            auth_failures=self.auth_failures,
        )


@dataclass(frozen=True)
class SqlWriter:
    """Directory writes on the daemon: SQL first (system of record, outbox row in the same
    transaction), then the projector, so the RDF is current when the response goes out."""

    owner: CoordinatorRegistry

    def _started(self) -> tuple[Repository, Projector]:
        if self.owner.repo is None or self.owner.projector is None:
            raise RuntimeError("the coordinator is still starting; retry")
        return self.owner.repo, self.owner.projector

    def put(self, prepared: Prepared, data: bytes, media_type: str) -> bool:
        from tinyfleet.server.auth import new_node_id
        from tinyfleet.server.repository import DeviceExistsError

        repo, projector = self._started()
        created = False
        if repo.get_device(prepared.thing_id) is None:
            try:
                # No key yet: its agent claims it with an enrollment token (or the admin token).
                with refused_when_disk_full():
                    repo.create_device(prepared.thing_id, new_node_id(), data, media_type)
                created = True
            except DeviceExistsError:
                pass
        with refused_when_disk_full():
            if not created:
                repo.replace_description(prepared.thing_id, data, media_type)
        projector.catch_up_after_commit()
        return created

    def import_document(self, document: Document) -> FileReport:
        repo, projector = self._started()
        after_commit = _AfterCommit(projector)
        with refused_when_disk_full():
            return import_document(self.owner.registry, repo, after_commit, document)

    def delete(self, thing_id: str) -> bool:
        repo, projector = self._started()
        with refused_when_disk_full():
            gone = repo.delete_device(thing_id)
        projector.catch_up_after_commit()
        return gone

    def update(self, text: str) -> None:
        """An admin's SPARQL Update: recorded in SQL (so a rebuild applies it again), then applied
        by the projector in order with every other change. Text that does not parse is refused
        before anything is stored (tried on an empty in-memory store: SERVICE and LOAD were
        refused before, so it calls nothing)."""
        with contextlib.suppress(RuntimeError):  # evaluation errors there say nothing of the real store
            ox.Store().update(text)
        repo, projector = self._started()
        with refused_when_disk_full():
            seq = repo.record_registry_update(text)
        projector.catch_up_after_commit()
        refused = projector.refused_updates.pop(seq, None)
        if refused is not None:
            raise UpdateRefused(f"the store refused it: {refused}; it changed nothing")


@dataclass(frozen=True)
class _AfterCommit:
    """The projector as `import_document` calls it, right after its SQL commit."""

    projector: Projector

    def catch_up(self) -> object:
        return self.projector.catch_up_after_commit()


async def _every(
    step: Callable[[], object],
    interval_s: float = 1.0,
    on_error: Callable[[BaseException], None] | None = None,
) -> None:
    """Run a blocking step in a worker thread every `interval_s` until cancelled; failures are
    retried (a remote store can be briefly unreachable, a disk full), logged when they start and
    when they end, and passed to `on_error` (the projector reopens a store that failed a write)."""
    failing = False
    while True:
        try:
            await asyncio.to_thread(step)
        except Exception as exc:
            if on_error is not None:
                on_error(exc)
            if not failing:
                log.exception("registry background step failed; retrying every %g s", interval_s)
            failing = True
        else:
            if failing:
                log.info("registry background step recovered")
            failing = False
        await asyncio.sleep(interval_s)
