"""Every door the admin token guards gives one verdict on one presented token (issue 11: "admin-token
checks: three, with different meanings"). One rule decides, auth.is_admin_token; this asks each door
itself: the Admin gRPC service, admin registration and artifact downloads on Fleet, /api/*, SPARQL
Update, directory writes (POST and PUT /things) and imports. A coordinator with the registry in this
process, gRPC and HTTP on 127.0.0.1; a fresh one per presented token, so failed guesses from earlier
cases never reach the failed-auth limit (past it a door answers 429 before comparing anything).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from server.harness import CoordinatorThread, settings_for, signed_register

from tinyfleet.client.descriptions import minimal_thing_description
from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc
from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry

TOKEN = "doors-admin-token"
ADMIN, REFUSED = "admin", "refused"
#: Answers that mean "not the admin": a missing or wrong credential, or (for a device's own
#: Register, which a request without a bearer token is) no enrollment token.
REFUSALS_HTTP = (401, 403)
REFUSALS_GRPC = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

#: Authorization values as presented, and what the one rule makes of them.
PRESENTED = {
    "the token": (f"Bearer {TOKEN}", ADMIN),
    "scheme in lower case": (f"bearer {TOKEN}", ADMIN),
    "token in upper case": (f"Bearer {TOKEN.upper()}", REFUSED),
    "token with a suffix": (f"Bearer {TOKEN}x", REFUSED),
    "a prefix of the token": (f"Bearer {TOKEN[:-1]}", REFUSED),
    "token without the scheme": (TOKEN, REFUSED),
    "the scheme alone": ("Bearer", REFUSED),
    "nothing": ("", REFUSED),
}


class Doors:
    """One request through each door with a given Authorization value; the verdict of each."""

    def __init__(self, running: CoordinatorThread, artifact: str) -> None:
        self.running = running
        self.base = f"http://{running.coordinator.http_address}"
        self.artifact = artifact
        self.channel = grpc.insecure_channel(running.address)
        self.admin_stub = fleet_pb2_grpc.AdminStub(self.channel)
        self.fleet_stub = fleet_pb2_grpc.FleetStub(self.channel)
        self.written = 0

    def verdicts(self, authorization: str) -> dict[str, str]:
        doors: dict[str, Callable[[dict[str, str]], str]] = {
            "Admin.ListDevices": self.list_devices,
            "Fleet.Register": self.register,
            "Fleet.GetArtifact": self.get_artifact,
            "GET /api/devices": lambda h: self._http("GET", "/api/devices", h),
            "SPARQL Update": self.sparql_update,
            "POST /things": self.post_thing,
            "PUT /things/{id}": self.put_thing,
            "POST /registry/imports": self.import_document,
        }
        headers = {"authorization": authorization} if authorization else {}
        return {door: ask(headers) for door, ask in doors.items()}

    def _grpc(self, call: Callable[[tuple[tuple[str, str], ...]], object], headers: dict[str, str]) -> str:
        try:
            call(tuple(headers.items()))
        except grpc.RpcError as exc:
            assert exc.code() in REFUSALS_GRPC, (exc.code(), exc.details())
            return REFUSED
        return ADMIN

    def _http(self, method: str, path: str, headers: dict[str, str], **kwargs: object) -> str:
        answer = httpx.request(method, self.base + path, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]
        if answer.status_code in REFUSALS_HTTP:
            return REFUSED
        assert answer.is_success, (method, path, answer.status_code, answer.text)
        return ADMIN

    def list_devices(self, headers: dict[str, str]) -> str:
        return self._grpc(
            lambda md: self.admin_stub.ListDevices(fleet_pb2.ListDevicesRequest(), metadata=md, timeout=30),
            headers,
        )

    def _new_thing(self, with_id: bool = True) -> dict[str, object]:
        self.written += 1
        td: dict[str, object] = minimal_thing_description(f"urn:tinyfleet:test:door-{self.written}")
        if not with_id:
            del td["id"]
        return td

    def register(self, headers: dict[str, str]) -> str:
        description = json.dumps(self._new_thing()).encode()
        request = signed_register(description, DeviceKey.generate())
        return self._grpc(lambda md: self.fleet_stub.Register(request, metadata=md, timeout=60), headers)

    def get_artifact(self, headers: dict[str, str]) -> str:
        request = fleet_pb2.GetArtifactRequest(sha256=self.artifact)
        return self._grpc(
            lambda md: list(self.fleet_stub.GetArtifact(request, metadata=md, timeout=30)), headers
        )

    def sparql_update(self, headers: dict[str, str]) -> str:
        update = f"INSERT DATA {{ <urn:door:s> <urn:door:p> {self.written} }}"
        self.written += 1
        return self._http(
            "POST", "/sparql", {**headers, "content-type": "application/sparql-update"}, content=update
        )

    def post_thing(self, headers: dict[str, str]) -> str:
        return self._http(
            "POST",
            "/things",
            {**headers, "content-type": "application/td+json"},
            content=json.dumps(self._new_thing(with_id=False)),
        )

    def put_thing(self, headers: dict[str, str]) -> str:
        td = self._new_thing()
        return self._http(
            "PUT",
            f"/things/{td['id']}",
            {**headers, "content-type": "application/td+json"},
            content=json.dumps(td),
        )

    def import_document(self, headers: dict[str, str]) -> str:
        self.written += 1
        board = f"@prefix ex: <https://example.org/> . ex:b{self.written} ex:p ex:o .\n"
        return self._http(
            "POST",
            "/registry/imports",
            {**headers, "content-type": "text/turtle"},
            params={"name": f"b{self.written}.ttl", "base": "https://example.org/"},
            content=board,
        )


@pytest.fixture
def doors(tmp_path: Path) -> Iterator[Doors]:
    registry = CoordinatorRegistry.open(tmp_path, admin_token=TOKEN)
    running = CoordinatorThread(
        settings_for(tmp_path, http="127.0.0.1:0", admin_token=TOKEN), registry.hooks()
    )
    try:
        artifact = running.coordinator.store.put(b"a global model")
        opened = Doors(running, artifact)
        yield opened
        opened.channel.close()
    finally:
        running.stop()
        registry.registry.store.close()


@pytest.mark.parametrize("case", list(PRESENTED))
def test_every_admin_door_gives_the_same_verdict_on_a_presented_token(case: str, doors: Doors) -> None:
    authorization, expected = PRESENTED[case]
    verdicts = doors.verdicts(authorization)
    assert verdicts == dict.fromkeys(verdicts, expected), case
