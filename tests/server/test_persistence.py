"""SQL state: migrations from empty, repository operations, artifact store atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.server import database
from tinyfleet.server.artifacts import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ArtifactStore,
    sha256_hex,
)
from tinyfleet.server.auth import new_node_id
from tinyfleet.server.repository import (
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    ArtifactRecord,
    DeviceExistsError,
    NodeResult,
    Repository,
    RoundRecord,
)
from tinyfleet.server.schema import metadata


def test_migrations_upgrade_from_empty_to_exactly_the_schema(empty_engine: sa.Engine) -> None:
    assert database.current_revision(empty_engine) is None
    database.upgrade(empty_engine)
    assert database.current_revision(empty_engine) == database.head_revision()
    with empty_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == [], f"migrations and server/schema.py disagree: {diff}"
    database.upgrade(empty_engine)  # a second start finds nothing to do
    assert database.current_revision(empty_engine) == database.head_revision()


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    engine = database.open_database(database.default_url(tmp_path))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def _register(repo: Repository, device_id: str = "urn:dev:a") -> tuple[bytes, int]:
    public_key = DeviceKey.generate().public_key
    node_id = new_node_id()
    repo.create_device(device_id, node_id, b'{"id": "x"}', "application/td+json", public_key=public_key)
    return public_key, node_id


def test_devices_register_once_and_write_outbox_in_the_same_transaction(engine: sa.Engine) -> None:
    repo = Repository(engine)
    public_key, node_id = _register(repo)
    device = repo.get_device("urn:dev:a")
    assert device is not None and device.node_id == node_id and not device.online
    assert device.public_key == public_key and device.revoked_at is None

    with pytest.raises(DeviceExistsError):
        _register(repo)  # same id again: refused, the first row untouched
    assert repo.get_device("urn:dev:a").node_id == node_id  # type: ignore[union-attr]

    repo.replace_description("urn:dev:a", b"<urn:dev:a> a <T> .", "text/turtle")
    repo.set_online("urn:dev:a", True)
    repo.touch_last_seen({"urn:dev:a": 1234.5})
    device = repo.get_device("urn:dev:a")
    assert device is not None and device.online and device.last_seen == 1234.5
    assert device.media_type == "text/turtle" and device.description.startswith(b"<urn")
    assert repo.mark_all_offline() == 1
    assert not repo.list_devices()[0].online
    kinds = [row["kind"] for row in repo.outbox_since(0)]
    assert kinds == ["device.registered", "device.updated", "device.online", "device.offline"]
    assert [r["seq"] for r in repo.outbox_since(2)] == sorted(r["seq"] for r in repo.outbox_since(2))


def test_jobs_queue_fifo_commit_rounds_atomically_and_end(engine: sa.Engine) -> None:
    repo = Repository(engine)
    first = repo.create_job("a", "fedavg", "x = 1", rounds_total=2)
    second = repo.create_job("b", "fedavg", "x = 2", rounds_total=1)
    assert first.state == QUEUED and repo.next_job().id == first.id  # type: ignore[union-attr]

    initial = ArtifactRecord("0" * 64, 10, "flwr-arrayrecord", first.id, 0, None, 1.0)
    repo.start_job(first.id, initial)
    assert repo.get_job(first.id).state == RUNNING  # type: ignore[union-attr]
    assert repo.next_job().id == first.id  # type: ignore[union-attr]  # running resumes first

    artifact = ArtifactRecord("1" * 64, 10, "flwr-arrayrecord", first.id, 1, "0" * 64, 2.0)
    nodes = [
        NodeResult("train", 7, "replied", "", 100, 90, 0.5, {"train_loss": 1.0}),
        NodeResult("train", 8, "timeout", "no reply within 5 s", 100, 0, 0.0),
    ]
    record = RoundRecord(1, 1.0, 2.0, 2, 1, {"train_loss": 1.0}, None, 200, 90, 1.0, 0.8, 0.2,
                         "1" * 64, nodes)
    repo.commit_round(first.id, record, artifact, {"lr": 0.5})
    created = [r for r in repo.outbox_since(0) if r["kind"] == "artifact.created"]
    assert [r["subject"] for r in created] == ["0" * 64, "1" * 64]
    assert created[1]["payload"]["parent_sha"] == "0" * 64
    assert created[1]["payload"]["train_metrics"] == {"train_loss": 1.0}
    job = repo.get_job(first.id)
    assert job is not None and job.rounds_done == 1 and job.strategy_state == {"lr": 0.5}
    [stored] = repo.get_rounds(first.id)
    assert stored.nodes == nodes and stored.train_metrics == {"train_loss": 1.0}
    assert repo.round_artifact(first.id, 1).parent_sha == "0" * 64  # type: ignore[union-attr]
    assert repo.round_artifact(first.id, 2) is None

    # The same round again (a bug or a replay) fails as a whole: nothing half-written.
    with pytest.raises(sa.exc.IntegrityError):
        repo.commit_round(first.id, record, None, {"lr": 9.0})
    assert repo.get_job(first.id).strategy_state == {"lr": 0.5}  # type: ignore[union-attr]
    assert len(repo.get_rounds(first.id)[0].nodes) == 2

    repo.end_job(first.id, FINISHED)
    repo.end_job(second.id, FAILED, "quorum not reached")
    assert repo.next_job() is None
    assert [j.state for j in repo.list_jobs()] == [FINISHED, FAILED]
    assert repo.get_job(second.id).reason == "quorum not reached"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="terminal"):
        repo.end_job(first.id, RUNNING)


def test_artifact_store_is_content_addressed_atomic_and_verified(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = os.urandom(5000)
    sha = store.put(data)
    assert sha == sha256_hex(data)
    assert store.path(sha) == tmp_path / "artifacts" / sha[:2] / sha[2:]
    assert store.put(data) == sha  # idempotent
    assert store.get(sha) == data and store.size(sha) == 5000
    assert store.read_range(sha, 4990, 100) == data[4990:]
    assert not any(p.name.startswith(".tmp-") for p in store.path(sha).parent.iterdir())

    store.path(sha).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # bit rot
    with pytest.raises(ArtifactCorruptError, match=sha):
        store.get(sha)
    with pytest.raises(ArtifactNotFoundError):
        store.get("f" * 64)
    with pytest.raises(ArtifactNotFoundError, match="not a sha256"):
        store.get("../../etc/passwd")
    assert not store.exists("../x")


def test_artifact_store_leaves_no_partial_blob_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path)

    def fail_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.put(b"abc" * 1000)
    sha = sha256_hex(b"abc" * 1000)
    assert not store.exists(sha)
    assert list(store.path(sha).parent.iterdir()) == []


def test_a_rounds_follower_reads_each_round_once_and_matches_a_full_read(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tinyfleet.server.job_json import RoundsFollower, job_info

    repo = Repository(engine)
    job = repo.create_job("long", "fedreptile", "x = 1", rounds_total=3)
    repo.start_job(job.id, ArtifactRecord("0" * 64, 10, "flwr-arrayrecord", job.id, 0, None, 1.0))
    follower = RoundsFollower(job.id)
    reads: list[int] = []
    real_get_rounds = repo.get_rounds

    def counting(job_id: int, after_round: int = 0) -> list[RoundRecord]:
        rows = real_get_rounds(job_id, after_round)
        reads.extend(r.round for r in rows)
        return rows

    monkeypatch.setattr(repo, "get_rounds", counting)
    for n in (1, 2, 3):
        node = NodeResult("train", 7, "replied", "", 100, 90, 0.5, {"train_loss": 1.0 / n})
        record = RoundRecord(n, 1.0, 2.0, 1, 0, {"train_loss": 1.0 / n}, None, 100, 90, 1.0, 0.8, 0.2,
                             None, [node])
        repo.commit_round(job.id, record, None, None)
        followed = follower.job_info(repo)
        assert followed == job_info(repo.get_job(job.id), real_get_rounds(job.id))  # type: ignore[arg-type]
    assert reads == [1, 2, 3], "every round is read once, however often the job changes"
    assert RoundsFollower(job.id + 99).job_info(repo) is None


def test_0005_gives_old_rows_empty_errors_and_rounds_keep_why_they_kept_the_model(
    empty_engine: sa.Engine,
) -> None:
    database.upgrade(empty_engine, "0004")
    with empty_engine.begin() as conn:  # a job with one round and a device, as 0004 stored them
        conn.execute(sa.text(
            "INSERT INTO jobs (id, name, strategy, spec_toml, state, created_at, rounds_total) "
            "VALUES (1, 'old', 'fedavg', 'x = 1', 'running', 1.0, 2)"
        ))
        conn.execute(sa.text(
            "INSERT INTO rounds (job_id, round, started_at, finished_at, participants, dropped, "
            "bytes_down, bytes_up, duration_s, train_duration_s, eval_duration_s) "
            "VALUES (1, 1, 1.0, 2.0, 1, 0, 10, 10, 1.0, 0.5, 0.5)"
        ))
        conn.execute(sa.text(
            "INSERT INTO devices (device_id, node_id, description, media_type, registered_at, "
            "updated_at, online) VALUES ('urn:dev:old', 5, '{}', 'application/td+json', 1.0, 1.0, false)"
        ))
    database.upgrade(empty_engine)
    repo = Repository(empty_engine)
    [old] = repo.get_rounds(1)
    assert (old.train_error, old.eval_error) == ("", "")
    assert repo.get_device("urn:dev:old").agent_version == ""  # type: ignore[union-attr]

    record = RoundRecord(2, 2.0, 3.0, 1, 0, None, None, 10, 10, 1.0, 0.5, 0.5, None,
                         train_error="every valid reply (1) reports num-examples = 0",
                         eval_error="ValueError: broken metrics")
    repo.commit_round(1, record, None, None)
    [kept] = repo.get_rounds(1, after_round=1)
    assert kept == record

    repo.set_online("urn:dev:old", True, agent_version="1.2.3")
    repo.set_online("urn:dev:old", False)  # a disconnect says nothing about the version
    device = repo.get_device("urn:dev:old")
    assert device is not None and device.agent_version == "1.2.3" and not device.online
