"""A real coordinator process on 127.0.0.1 (`tinyfleet server start` through LocalFleet) for tests
that are about what it accepts, and the calls they make: Register over gRPC with the admin token
and a device key, SPARQL and /things over HTTP."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import httpx

from tinyfleet.common.device_keys import DeviceKey, next_sequence
from tinyfleet.ontology.catalog import render
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.simulations.local_fleet import LocalFleet

ADMIN_TOKEN = "registry-tests-admin-token"
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
TD_JSON = "application/td+json"
TURTLE = "text/turtle"


@contextmanager
def coordinator(root: Path, server_args: Sequence[str] = ()) -> Iterator[LocalFleet]:
    """A started coordinator process with the admin token; stopped by PID on the way out."""
    with LocalFleet(root, admin_token=ADMIN_TOKEN, server_args=server_args) as fleet:
        fleet.start_server()
        yield fleet


def register(
    address: str, description: bytes, media_type: str = TD_JSON, timeout: float = 60.0
) -> fleet_pb2.RegisterResponse | grpc.RpcError:
    """One Register call as an operator makes it (admin token, a fresh device key); the answer,
    or the error the coordinator sent."""
    key = DeviceKey.generate()
    sequence = next_sequence(0, time.time())
    request = fleet_pb2.RegisterRequest(
        description=description, media_type=media_type, public_key=key.public_key, sequence=sequence,
        signature=key.sign_register(description, media_type, sequence),
    )
    with grpc.insecure_channel(address) as channel:
        try:
            return fleet_pb2_grpc.FleetStub(channel).Register(
                request, metadata=tuple(ADMIN.items()), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc


def validation_errors(error: grpc.RpcError) -> list[dict[str, str]]:
    """The {path, message} list a refused registration carries in its trailer."""
    trailer = {entry.key: entry.value for entry in error.trailing_metadata() or ()}
    return json.loads(trailer.get("validation-errors", "[]"))


def select(http: str, query: str) -> list[dict[str, str]]:
    """Rows of a SELECT on the coordinator's /sparql, as {variable: lexical value}."""
    response = httpx.get(
        f"http://{http}/sparql", params={"query": query},
        headers={"accept": "application/sparql-results+json"}, timeout=60,
    )
    response.raise_for_status()
    return [{k: v["value"] for k, v in row.items()} for row in response.json()["results"]["bindings"]]


def eligible(http: str, **params: str) -> list[str]:
    """Devices the eligible-devices named query selects (as a job's `eligible` runs it)."""
    return sorted(row["device"] for row in select(http, render("eligible-devices", params)))


def ram_stated_anywhere(http: str, device: str) -> list[str]:
    """Every tf:ramKB value about `device` in any graph of the store."""
    query = (
        f"SELECT ?ram WHERE {{ GRAPH ?g {{ <{device}> <https://w3id.org/tinyfleet#ramKB> ?ram }} }}"
    )
    return sorted(row["ram"] for row in select(http, query))


def things_url(http: str, thing_id: str) -> str:
    """The /things URL of a thing id, percent-encoded as a client sends it."""
    return f"http://{http}/things/{urllib.parse.quote(thing_id, safe=':')}"


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Until `check()` is true (the projector writes the store a moment after the commit)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
