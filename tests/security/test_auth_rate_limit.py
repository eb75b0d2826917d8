"""Failed authentication is limited per peer (issue 10, row 11): after MAX_FAILURES failures within
the window a peer's failures get RESOURCE_EXHAUSTED (gRPC) or 429 with Retry-After (HTTP) until the
window passes. Successful calls never count, and neither do calls that present no credential. A
device key or enrollment token that verifies is served even from a blocked peer (they cannot be
guessed); admin tokens can be weak, so a peer past its limit of wrong ones (counted apart) is
refused before its token is compared."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import httpx
import pytest
from server.harness import CoordinatorThread, FakeAgent, settings_for

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.server.admin_client import AdminClient
from tinyfleet.server.auth import MAX_FAILURES, FailedAuthLimiter, ReplayGuard, peer_host, peer_key
from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry

TOKEN = "rate-limit-test-admin"
TD = "application/td+json"


def _code(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def test_a_good_client_is_never_limited_and_a_failing_peer_is(coordinator: CoordinatorThread) -> None:
    good = coordinator.agent("urn:dev:good")
    good.register()
    for _ in range(3 * MAX_FAILURES):  # many more calls than failures allowed: all answered
        assert not good.register(enroll_token="").created

    tokenless = FakeAgent(coordinator.address, "urn:dev:tokenless")  # guesses nothing: never limited
    for _ in range(2 * MAX_FAILURES):
        assert _code(tokenless.register).code() == grpc.StatusCode.PERMISSION_DENIED
    rogue = FakeAgent(coordinator.address, "urn:dev:rogue", enroll_token="made-up")
    for _ in range(MAX_FAILURES):
        assert _code(rogue.register).code() == grpc.StatusCode.PERMISSION_DENIED
    blocked = _code(rogue.register)  # past the limit
    assert blocked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many failed authentication attempts from 127.0.0.1" in str(blocked.details())
    trailer = {entry.key: entry.value for entry in blocked.trailing_metadata()}
    assert 0 < int(trailer["retry-after"]) <= 60
    assert _code(rogue.register).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Keys cannot be guessed: a device whose proof verifies is served from the blocked address,
    # and so is its operator (wrong admin tokens count apart: none were sent).
    assert not good.register(enroll_token="").created
    good.connect()
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:
        assert "urn:dev:good" in {d.device_id for d in admin.devices()}
    for agent in (good, tokenless, rogue):
        agent.close()


def test_the_peer_is_let_in_again_once_the_window_passes(coordinator: CoordinatorThread) -> None:
    fleet = coordinator.coordinator.fleet
    assert fleet is not None
    fleet.auth_failures = FailedAuthLimiter(max_failures=3, window_s=1.0)
    agent = coordinator.agent("urn:dev:patient")
    agent.register()

    def impostor_connects() -> grpc.StatusCode:
        """A Connect proof that fails: a key the coordinator does not know for this device."""
        impostor = FakeAgent(coordinator.address, "urn:dev:patient")
        impostor.connect(wait=False)
        assert impostor.ended.wait(10) and impostor.error is not None
        impostor.close()
        return impostor.error.code()

    for _ in range(3):
        assert impostor_connects() == grpc.StatusCode.UNAUTHENTICATED
    assert impostor_connects() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not agent.register(enroll_token="").created  # the device's own key still verifies
    time.sleep(1.1)  # the window passes
    assert impostor_connects() == grpc.StatusCode.UNAUTHENTICATED
    agent.channel.close()


def test_wrong_admin_tokens_are_limited(coordinator: CoordinatorThread) -> None:
    with AdminClient(coordinator.address, admin_token="guess") as guesser:
        for _ in range(MAX_FAILURES):
            assert _code(guesser.jobs).code() == grpc.StatusCode.UNAUTHENTICATED
        assert _code(guesser.jobs).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with AdminClient(coordinator.address, admin_token=TOKEN) as admin:  # the same peer: refused too
        assert _code(admin.jobs).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_failed_http_device_writes_get_429_with_retry_after(tmp_path: Path) -> None:
    data_dir = tmp_path / "coord"
    registry = CoordinatorRegistry.open(data_dir)
    thread = CoordinatorThread(settings_for(data_dir, http="127.0.0.1:0"), registry.hooks())
    device = "urn:tinyfleet:device:writer"
    try:
        agent = thread.agent(device)
        td = device_thing_description(device, title="writer", ram_kb=512, flash_kb=4096, device_class="mcu")
        body = json.dumps(td).encode()
        agent.register(body)
        url = f"http://{thread.coordinator.http_address}/things/{device}"
        stranger = FakeAgent(thread.address, device)  # signs with a key that is not the device's

        def put(signer: FakeAgent) -> httpx.Response:
            signed = signer.key.sign_request(device, "PUT", f"/things/{device}", body).authorization()
            return httpx.put(url, content=body, headers={"authorization": signed, "content-type": TD})

        for _ in range(MAX_FAILURES):
            assert put(stranger).status_code == 401
        limited = put(stranger)
        assert limited.status_code == 429 and 0 < int(limited.headers["retry-after"]) <= 60
        assert "too many failed authentication attempts" in limited.json()["detail"]
        assert put(agent).status_code == 204  # the device's own signature is served all the same
        agent.channel.close()
        stranger.channel.close()
    finally:
        thread.stop()
        registry.registry.store.close()


def test_the_limiter_counts_failures_in_a_sliding_window() -> None:
    limiter = FailedAuthLimiter(max_failures=3, window_s=10.0)
    for t in (0.0, 1.0, 2.0):
        assert limiter.retry_after("10.0.0.7", now=t) == 0.0
        limiter.failed("10.0.0.7", now=t)
    assert limiter.retry_after("10.0.0.7", now=3.0) == pytest.approx(7.0)  # until t=0 leaves
    assert limiter.retry_after("10.0.0.8", now=3.0) == 0.0  # another peer is not affected
    assert limiter.retry_after("10.0.0.7", now=10.5) == 0.0  # two failures left in the window
    limiter.failed("10.0.0.7", now=10.5)
    assert limiter.retry_after("10.0.0.7", now=10.8) == pytest.approx(0.2)  # until t=1 leaves


def test_request_signatures_are_accepted_once_and_forgotten_only_when_their_time_is_out() -> None:
    guard = ReplayGuard(window_s=10.0, max_signatures=2)
    first, second, third = (bytes([n]) * 64 for n in range(3))
    assert guard.refusal(first, timestamp=100, now=100.0) is None
    assert "already used" in (guard.refusal(first, timestamp=100, now=105.0) or "")
    assert guard.refusal(second, timestamp=104, now=105.0) is None
    assert "too many" in (guard.refusal(third, timestamp=105, now=105.0) or "")  # full: refused
    assert guard.refusal(third, timestamp=111, now=111.0) is None  # the first one's time is out
    assert "already used" in (guard.refusal(second, timestamp=104, now=111.0) or "")


def test_every_admin_door_counts_wrong_tokens_in_the_one_limit(tmp_path: Path) -> None:
    """Wrong admin tokens on SPARQL Update, POST /things, imports, /api and Admin gRPC add up for
    one peer; past the limit every door answers 429 (RESOURCE_EXHAUSTED), even to the right token."""
    data_dir = tmp_path / "coord"
    registry = CoordinatorRegistry.open(data_dir, admin_token=TOKEN)
    settings = settings_for(data_dir, http="127.0.0.1:0", admin_token=TOKEN)
    thread = CoordinatorThread(settings, registry.hooks())
    base = f"http://{thread.coordinator.http_address}"

    def doors(token: str) -> list[httpx.Response]:
        bearer = {"authorization": f"Bearer {token}"}
        return [
            httpx.post(f"{base}/sparql", content="INSERT DATA { <urn:a> <urn:b> <urn:c> }",
                       headers={**bearer, "content-type": "application/sparql-update"}),
            httpx.post(f"{base}/things", content=json.dumps({"title": "t"}),
                       headers={**bearer, "content-type": TD}),
            httpx.post(f"{base}/registry/imports", params={"name": "x.ttl"}, content=b"",
                       headers={**bearer, "content-type": "text/turtle"}),
            httpx.get(f"{base}/api/devices", headers=bearer),
        ]

    try:
        guesses = doors("guess-1") + doors("guess-2")  # 8 failures over the four HTTP doors
        assert [r.status_code for r in guesses] == [401] * 8
        assert all(r.headers["content-type"] == "application/problem+json" for r in guesses)
        with AdminClient(thread.address, admin_token="guess-3") as guesser:
            for _ in range(MAX_FAILURES - len(guesses)):
                assert _code(guesser.jobs).code() == grpc.StatusCode.UNAUTHENTICATED
        blocked = doors(TOKEN)
        assert [r.status_code for r in blocked] == [429] * 4
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in blocked)
        assert all("too many failed authentication attempts from 127.0.0.1" in r.json()["detail"]
                   for r in blocked)
        with AdminClient(thread.address, admin_token=TOKEN) as admin:
            assert _code(admin.jobs).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        thread.stop()
        registry.registry.store.close()


def test_an_ipv6_client_is_one_peer_over_grpc_and_http(tmp_path: Path) -> None:
    """grpc names IPv6 peers percent-encoded ("ipv6:%5B::1%5D:PORT"): the limiter must key them as
    HTTP does ("::1"), so failures over both transports add up and messages name the address."""
    # gRPC on "localhost" (both loopbacks; the daemon cannot bind "[::1]:0" yet), reached over ::1
    settings = settings_for(tmp_path / "coord", listen="localhost:0", http="[::1]:0", admin_token=TOKEN)
    thread = CoordinatorThread(settings)
    try:
        http_port = (thread.coordinator.http_address or "").rpartition(":")[2]  # given as "::1:PORT"
        api = f"http://[::1]:{http_port}/api/jobs"
        grpc_v6 = "[::1]:" + thread.address.rpartition(":")[2]
        with AdminClient(grpc_v6, admin_token="guess") as guesser:
            for _ in range(MAX_FAILURES // 2):
                assert _code(guesser.jobs).code() == grpc.StatusCode.UNAUTHENTICATED
        for _ in range(MAX_FAILURES - MAX_FAILURES // 2):
            assert httpx.get(api, headers={"authorization": "Bearer guess"}).status_code == 401
        blocked = httpx.get(api, headers={"authorization": f"Bearer {TOKEN}"})
        assert blocked.status_code == 429
        assert "too many failed authentication attempts from ::1 (admin token);" in blocked.json()["detail"]
        with AdminClient(grpc_v6, admin_token=TOKEN) as admin:
            refused = _code(admin.jobs)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "from ::1 (admin token);" in str(refused.details())
    finally:
        thread.stop()


def test_peer_keys_are_the_same_for_both_transports() -> None:
    assert peer_host("ipv6:%5B::1%5D:50326") == peer_key("::1") == "::1"
    assert peer_host("ipv6:[::1]:7") == "::1"
    assert peer_host("ipv4:10.0.0.5:41000") == peer_key("10.0.0.5") == "10.0.0.5"
    assert peer_key("::ffff:10.0.0.5") == "10.0.0.5"  # a dual-stack socket's view of an IPv4 client
    assert peer_host("ipv6:%5B2001:DB8::1%5D:1") == peer_key("2001:db8::1") == "2001:db8::1"
