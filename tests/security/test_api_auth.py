"""/api/* follows the auth of its gRPC twins (issue 10, row 11): with an admin token configured,
/api/devices, /api/jobs and /api/jobs/{id} answer 401 without it, as Admin.ListDevices, ListJobs
and GetJob answer UNAUTHENTICATED; /healthz stays open for probes. A coordinator in this process,
HTTP and gRPC on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
import pytest
from server.harness import CoordinatorThread, settings_for

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.server.admin_client import AdminClient
from tinyfleet.server.auth import MAX_FAILURES

TOKEN = "api-auth-admin-token"
API = ("/api/devices", "/api/jobs", "/api/jobs/1")
COORDINATOR_OPTIONS = {"http": "127.0.0.1:0"}


def test_api_needs_the_admin_token_like_its_grpc_twins(coordinator: CoordinatorThread) -> None:
    agent = coordinator.agent("urn:dev:listed")
    agent.register()
    base = f"http://{coordinator.coordinator.http_address}"
    admin = {"authorization": f"Bearer {TOKEN}"}
    [device] = httpx.get(f"{base}/api/devices", headers=admin).json()
    assert device["device_id"] == "urn:dev:listed"
    assert httpx.get(f"{base}/api/jobs", headers=admin).json() == []
    assert httpx.get(f"{base}/api/jobs/1", headers=admin).status_code == 404

    for path in API:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            refused = httpx.get(base + path, headers=headers)
            assert refused.status_code == 401, (path, headers)
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["status"] == 401 and "admin token" in refused.json()["detail"]
    with AdminClient(coordinator.address) as anonymous, pytest.raises(grpc.RpcError) as twin:
        anonymous.devices()
    assert twin.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # No token guesses nothing and is not counted; wrong ones over HTTP and gRPC add up, and past
    # the limit the peer's admin tokens are not even compared until the window passes
    with AdminClient(coordinator.address, admin_token="guess") as guesser:
        for _ in range(MAX_FAILURES - len(API)):
            with pytest.raises(grpc.RpcError):
                guesser.devices()
    blocked = httpx.get(f"{base}/api/devices", headers=admin)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) >= 1
    assert blocked.headers["content-type"] == "application/problem+json"
    assert "too many failed authentication attempts" in blocked.json()["detail"]
    health = httpx.get(f"{base}/healthz")  # probes need no token and are never blocked
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_without_an_admin_token_the_api_is_as_open_as_grpc(tmp_path: Path) -> None:
    """A lab coordinator without a token (`--no-admin-token`) opens both alike; with one, both close."""
    for token, status in ((None, 200), (TOKEN, 401)):
        settings = settings_for(tmp_path / str(status), http="127.0.0.1:0", admin_token=token)
        running = CoordinatorThread(settings)
        try:
            http = httpx.get(f"http://{running.coordinator.http_address}/api/devices").status_code
            with AdminClient(running.address) as anonymous:
                try:
                    anonymous.devices()
                    grpc_status = 200
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    grpc_status = 401
            assert http == grpc_status == status
        finally:
            running.stop()


def test_without_an_admin_token_every_admin_door_is_open_alike(tmp_path: Path) -> None:
    """`--no-admin-token` (no token configured) opens everything the admin token guards, by the
    one rule (auth.is_admin_token): /api, Admin gRPC, SPARQL Update, POST /things and imports; a
    coordinator with a token refuses all five without it."""
    from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry

    board = "@prefix ex: <https://example.org/> . ex:b ex:p ex:o .\n"
    anonymous = device_thing_description("urn:tinyfleet:device:anonymous", title="a", ram_kb=64, flash_kb=64)
    del anonymous["id"]
    for token in (None, TOKEN):
        data_dir = tmp_path / ("open" if token is None else "closed")
        registry = CoordinatorRegistry.open(data_dir, admin_token=token)
        settings = settings_for(data_dir, http="127.0.0.1:0", admin_token=token)
        running = CoordinatorThread(settings, registry.hooks())
        base = f"http://{running.coordinator.http_address}"
        try:
            answers = [
                httpx.get(f"{base}/api/devices").status_code,
                httpx.post(f"{base}/sparql", content="INSERT DATA { <urn:a> <urn:b> <urn:c> }",
                           headers={"content-type": "application/sparql-update"}).status_code,
                httpx.post(f"{base}/things", content=json.dumps(anonymous),
                           headers={"content-type": "application/td+json"}).status_code,
                httpx.post(f"{base}/registry/imports", params={"name": "b.ttl", "base": "https://example.org/"},
                           content=board, headers={"content-type": "text/turtle"}).status_code,
            ]
            with AdminClient(running.address) as anyone:
                try:
                    anyone.devices()
                    answers.append(200)
                except grpc.RpcError as exc:
                    answers.append(401 if exc.code() == grpc.StatusCode.UNAUTHENTICATED else 500)
            if token is None:
                assert answers[0] == answers[4] == 200 and answers[1] == 204 and answers[2] == 201, answers
                assert answers[3] == 200, answers
            else:
                assert answers == [401] * 5
        finally:
            running.stop()
            registry.registry.store.close()


def test_requests_without_a_token_never_lock_the_operator_out(coordinator: CoordinatorThread) -> None:
    """A stranger at the operator's address (NAT, proxy) sending token-less requests guesses
    nothing: however many, the operator's token is still served."""
    base = f"http://{coordinator.coordinator.http_address}"
    for _ in range(3 * MAX_FAILURES):
        assert httpx.get(f"{base}/api/devices").status_code == 401
    assert httpx.get(f"{base}/api/devices", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:
        assert admin.devices() == []
