"""Errors sent to gRPC clients name the problem, never an internal exception class or SQL
(issue 10, row 11); the details go to the coordinator's log."""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from server.harness import CoordinatorThread, FakeAgent

from tinyfleet.protos.tinyfleet.v1 import fleet_pb2
from tinyfleet.server.admin_client import AdminClient

TOKEN = "errors-test-admin"
INTERNALS = re.compile(
    r"<class |Traceback|\b[A-Z]\w*(Error|Exception)\b|\[SQL:|sqlite3|psycopg|\b(SELECT|INSERT|UPDATE)\b"
)


def _details(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__"):
            list(result)
    return info.value.code(), info.value.details() or ""


def test_refusals_name_the_problem_without_internals(coordinator: CoordinatorThread) -> None:
    agent = coordinator.agent("urn:dev:errors")
    agent.register()
    too_big = agent.register_request(enroll_token="")
    too_big.sequence = 2**64 - 1  # beyond the signed 64-bit column it is stored in
    too_big.signature = agent.key.sign_register(too_big.description, too_big.media_type, too_big.sequence)
    odd_time = (("x-device-id", "urn:dev:errors"), ("x-device-time", "yesterday"),
                ("x-device-nonce", "n"), ("x-device-signature", "AAAA"))
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:
        answers = {
            "job id past any SQL integer": _details(admin.job, "99999999999999999999999"),
            "watch of such a job": _details(lambda: list(admin.watch("99999999999999999999999"))),
            "negative job id": _details(admin.job, "-5"),
            "sequence past 63 bits": _details(agent.stub.Register, too_big),
            "malformed signed request": _details(
                agent.stub.GetArtifact, fleet_pb2.GetArtifactRequest(sha256="0" * 64), metadata=odd_time
            ),
            "enrollment with no uses": _details(admin.enroll, uses=0, ttl_s=60),
            "revocation of nobody": _details(admin.revoke_device, "urn:dev:nobody"),
        }
    codes = {name: code for name, (code, _) in answers.items()}
    assert codes["job id past any SQL integer"] == grpc.StatusCode.NOT_FOUND
    assert codes["sequence past 63 bits"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["malformed signed request"] == grpc.StatusCode.UNAUTHENTICATED
    for name, (code, details) in answers.items():
        assert details and not INTERNALS.search(details), f"{name}: {code.name}: {details}"
    assert agent.register(enroll_token="").node_id == agent.node_id  # the device is unharmed
    agent.channel.close()


def test_an_unforeseen_failure_is_internal_and_logged_not_sent(
    coordinator: CoordinatorThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> list[object]:
        raise RuntimeError("SELECT device_id FROM devices: disk I/O error")

    monkeypatch.setattr(coordinator.coordinator.repo, "list_devices", broken)
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin, caplog.at_level(logging.ERROR):
        code, details = _details(admin.devices)
    assert code == grpc.StatusCode.INTERNAL
    assert details == "internal error in ListDevices; the coordinator's log has the details"
    assert "disk I/O error" in caplog.text  # the operator sees what happened


def test_a_client_that_speaks_out_of_turn_is_told_what_is_wrong(coordinator: CoordinatorThread) -> None:
    agent = FakeAgent(coordinator.address, "urn:dev:rude")
    agent.connect(hello=lambda nonce: fleet_pb2.Hello(device_id="urn:dev:rude", signature=b"x" * 64),
                  wait=False)
    assert agent.ended.wait(10) and agent.error is not None
    assert agent.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not INTERNALS.search(agent.error.details() or "")
    agent.close()
