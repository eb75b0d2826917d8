"""Migration 0003 (device keys, enrollments) upgrades a database at 0002 with devices in it: the
devices stay, without a key, and the first registration with an enrollment token claims one."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.server import database
from tinyfleet.server.auth import hash_enrollment_token
from tinyfleet.server.repository import DeviceRegistration, Registered, RegistrationRefused, Repository
from tinyfleet.server.schema import metadata

DEVICE = "urn:tinyfleet:device:from-0002"


def test_upgrade_from_0002_keeps_devices_for_their_agents_to_claim(empty_engine: sa.Engine) -> None:
    database.upgrade(empty_engine, "0002")
    with empty_engine.begin() as conn:  # a device with a bearer credential, as 0002 stored it
        conn.execute(sa.text(
            "INSERT INTO devices (device_id, node_id, credential_hash, description, media_type, "
            "registered_at, updated_at, online) VALUES (:d, 77, 'sha256$abc', '{}', "
            "'application/td+json', 1.0, 1.0, false)"
        ), {"d": DEVICE})
    database.upgrade(empty_engine)
    assert database.current_revision(empty_engine) == database.head_revision()  # 0003 and after
    with empty_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []

    repo = Repository(empty_engine)
    device = repo.get_device(DEVICE)
    assert device is not None and device.node_id == 77 and device.public_key is None
    key = DeviceKey.generate().public_key

    def claim(token_hash: str, sequence: int) -> Registered | Exception:
        return repo.register_devices([DeviceRegistration(
            device_id=DEVICE, description=b'{"v": 2}', media_type="application/td+json", node_id=5,
            public_key=key, sequence=sequence, enrollment_hash=token_hash,
        )])[0]

    refused = claim("", 1)
    assert isinstance(refused, RegistrationRefused) and "needs an enrollment token" in str(refused)
    repo.create_enrollment("e1", hash_enrollment_token("tfe_x"), label="upgrade", uses=1, ttl_s=60)
    claimed = claim(hash_enrollment_token("tfe_x"), 2)
    assert isinstance(claimed, Registered) and not claimed.created
    device = repo.get_device(DEVICE)
    assert device is not None and device.public_key == key and device.node_id == 77
    assert device.enrollment_id == "e1" and repo.list_enrollments()[0].uses_left == 0
