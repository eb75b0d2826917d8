"""Concurrent Register calls over real gRPC into a coordinator with the registry (SHACL), on
SQLite and PostgreSQL: validated and committed in groups, yet every caller gets its own answer,
a bad description or a refused re-registration fails only its own call, and every accepted one
is in SQL (with its outbox row) and then in the store."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from server.conftest import PG_URL, _pg_schema
from server.harness import CoordinatorThread, settings_for, signed_register

from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry
from tinyfleet.server.schema import outbox

TD_JSON = "application/td+json"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    for schema in _pg_schema():
        separator = "&" if "?" in PG_URL else "?"
        yield f"{PG_URL}{separator}options=-csearch_path%3D{schema}"


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_concurrent_registrations_each_get_their_own_answer(
    tmp_path: Path, db_url: str | None, make_td: Callable[..., bytes]
) -> None:
    registry = CoordinatorRegistry.open(tmp_path / "coord")
    thread = CoordinatorThread(settings_for(tmp_path / "coord", db_url=db_url), registry.hooks())
    try:
        token, owner = thread.enroll(uses=100), DeviceKey.generate()
        with grpc.insecure_channel(thread.address) as channel:
            owned = fleet_pb2_grpc.FleetStub(channel).Register(
                signed_register(make_td("owned"), owner, 1, token)
            )

        def request(
            description: bytes, key: DeviceKey | None = None, sequence: int = 1
        ) -> fleet_pb2.RegisterRequest:
            return signed_register(description, key or DeviceKey.generate(), sequence, token)

        requests = [("created", request(make_td(f"ok-{i}"))) for i in range(18)]
        requests += [("invalid", request(make_td(f"bad-{i}", ram_kb=-1))) for i in range(4)]
        requests.append(("refused", request(make_td("owned", ram_kb=1))))  # another key
        requests.append(("replaced", request(make_td("owned", ram_kb=2), owner, sequence=2)))
        answers: dict[int, object] = {}
        start = threading.Barrier(len(requests))

        def call(number: int, message: fleet_pb2.RegisterRequest) -> None:
            with grpc.insecure_channel(thread.address) as channel:
                stub = fleet_pb2_grpc.FleetStub(channel)
                start.wait()
                try:
                    answers[number] = stub.Register(message, timeout=60)
                except grpc.RpcError as exc:
                    answers[number] = exc

        workers = [
            threading.Thread(target=call, args=(n, message)) for n, (_, message) in enumerate(requests)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(90)

        for number, (expected, _) in enumerate(requests):
            answer = answers[number]
            if expected == "created":
                assert isinstance(answer, fleet_pb2.RegisterResponse), answer
                assert answer.created and answer.node_id > 1
            elif expected == "replaced":
                assert isinstance(answer, fleet_pb2.RegisterResponse), answer
                assert not answer.created and answer.node_id == owned.node_id
            else:
                assert isinstance(answer, grpc.RpcError), answer
                if expected == "invalid":
                    assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
                    trailer = {entry.key: entry.value for entry in answer.trailing_metadata()}
                    errors = json.loads(trailer["validation-errors"])
                    assert [e["path"].split()[-1] for e in errors] == ["tf:ramKB"]
                else:
                    assert answer.code() == grpc.StatusCode.PERMISSION_DENIED
        node_ids = [a.node_id for a in answers.values() if isinstance(a, fleet_pb2.RegisterResponse)]
        assert len(set(node_ids)) == 18 + 1

        repo = thread.coordinator.repo
        devices = {d.device_id: d for d in repo.list_devices()}
        expected_ids = {f"urn:tinyfleet:device:ok-{i}" for i in range(18)} | {"urn:tinyfleet:device:owned"}
        assert set(devices) == expected_ids
        assert b'"ramKB": 2' in devices["urn:tinyfleet:device:owned"].description
        with repo.engine.connect() as conn:
            rows = conn.execute(sa.select(outbox.c.kind, outbox.c.created_at).order_by(outbox.c.seq)).all()
        described = [r for r in rows if r.kind in ("device.registered", "device.updated")]
        assert sorted(r.kind for r in described) == ["device.registered"] * 19 + ["device.updated"]
        # A group's rows are written in one transaction with one timestamp: fewer distinct
        # timestamps than rows means concurrent calls really were committed together.
        assert len({r.created_at for r in described[1:]}) < len(described) - 1

        _wait_for(lambda: all(registry.registry.exists(d) for d in expected_ids))
        assert not any(registry.registry.exists(f"urn:tinyfleet:device:bad-{i}") for i in range(4))
        owned_ram = registry.registry.select(
            "SELECT ?ram WHERE { <urn:tinyfleet:device:owned> <https://w3id.org/tinyfleet#ramKB> ?ram }"
        )
        assert [int(r["ram"].value) for r in owned_ram] == [2]
    finally:
        thread.stop()
        registry.registry.store.close()
