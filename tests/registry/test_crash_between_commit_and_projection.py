"""Kill -9 of the coordinator after a registration's SQL commit and before its projection:
SQL (the system of record) has the device, the RDF store does not; after a restart the
projector catches up and the device answers through /sparql."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import httpx
import pytest
from server.harness import signed_register

from tinyfleet.client.descriptions import minimal_thing_description
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.common.failpoints import ENV
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2_grpc
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.registry.store import open_store
from tinyfleet.server.registry.thing_graphs import Registry
from tinyfleet.server.repository import Repository
from tinyfleet.simulations.local_fleet import LocalFleet

DEVICE = "urn:tinyfleet:test:crash-1"
ASK = f"ASK {{ GRAPH ?g {{ <{DEVICE}> ?p ?o }} }}"


def _in_store(data_dir: Path) -> bool:
    store = open_store(data_dir)
    try:
        return bool(Registry(store).store.query(ASK))
    finally:
        store.close()


@pytest.mark.slow
def test_registry_catches_up_after_kill_between_commit_and_projection(tmp_path: Path) -> None:
    with LocalFleet(tmp_path, admin_token="t") as fleet:
        fleet.start_server(env={ENV: "register.after-sql-commit"})
        description = json.dumps(minimal_thing_description(DEVICE, ram_kb=512, flash_kb=4096)).encode()
        request = signed_register(description, DeviceKey.generate(), 1, fleet.enroll())
        with grpc.insecure_channel(fleet.address) as channel, pytest.raises(grpc.RpcError) as refused:
            fleet_pb2_grpc.FleetStub(channel).Register(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert fleet.server is not None
        assert fleet.server.wait(30) == -signal.SIGKILL

        engine = open_database(default_url(fleet.data_dir))
        try:
            device = Repository(engine).get_device(DEVICE)
        finally:
            engine.dispose()
        assert device is not None, "the registration was committed to SQL before the kill"
        assert not _in_store(fleet.data_dir), "the kill came before the projection"

        fleet.start_server()  # no failpoint: the projector catches up at start
        url = f"http://{fleet.http_address}/sparql"
        answer = httpx.get(url, params={"query": ASK}, headers={"Accept": "application/sparql-results+json"})
        assert answer.status_code == 200 and answer.json()["boolean"] is True
