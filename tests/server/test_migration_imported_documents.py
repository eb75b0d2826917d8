"""Migration 0002 (imported documents) upgrades a database that is already at 0001 with data in it."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tinyfleet.server import database
from tinyfleet.server.repository import Repository
from tinyfleet.server.schema import metadata


def test_upgrade_from_0001_keeps_devices_and_adds_imported_documents(empty_engine: sa.Engine) -> None:
    database.upgrade(empty_engine, "0001")
    assert database.current_revision(empty_engine) == "0001"
    repo = Repository(empty_engine)
    with empty_engine.begin() as conn:  # a device row as revision 0001 has it (with its outbox row)
        conn.execute(sa.text(
            "INSERT INTO devices (device_id, node_id, credential_hash, description, media_type, "
            "registered_at, updated_at, online) VALUES ('urn:tinyfleet:device:a', 7, 'sha256$x', "
            "'{}', 'application/td+json', 1.0, 1.0, false)"
        ))
        conn.execute(sa.text(
            "INSERT INTO outbox (kind, subject, payload, created_at) "
            "VALUES ('device.registered', 'urn:tinyfleet:device:a', '{}', 1.0)"
        ))
    with empty_engine.connect() as conn:
        assert not sa.inspect(conn).has_table("imported_documents")

    database.upgrade(empty_engine, "0002")
    assert database.current_revision(empty_engine) == "0002"
    database.upgrade(empty_engine)  # on to head, where Repository's columns exist
    with empty_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert [d.device_id for d in repo.list_devices()] == ["urn:tinyfleet:device:a"]
    first = repo.import_document("boards.ttl", "https://example.org/", "text/turtle", b"<a> <b> <c> .")
    again = repo.import_document("boards.ttl", "https://example.org/", "text/turtle", b"<a> <b> <d> .")
    assert again.id == first.id and again.sha256 != first.sha256
    assert [d.content for d in repo.list_imported_documents()] == [b"<a> <b> <d> ."]
    assert [r["kind"] for r in repo.outbox_since(0)] == [
        "device.registered", "document.imported", "document.imported"
    ]
