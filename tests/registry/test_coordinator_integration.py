"""The registry inside the coordinator: validated registration, projection with catch-up after a
crash, /sparql and /things on the daemon's HTTP address, eligibility re-evaluated per round."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from server.harness import CoordinatorThread, settings_for, signed_register

from tinyfleet.common.device_keys import DeviceKey
from tinyfleet.common.jobspec import JobSpecError, parse_job_spec
from tinyfleet.protos.tinyfleet.v1 import fleet_pb2_grpc
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry
from tinyfleet.server.repository import Repository

from .test_importer import QUIRKY_BOARD

TOKEN = "admin-token"
TD_JSON = "application/td+json"


def _start(data_dir: Path) -> tuple[CoordinatorThread, CoordinatorRegistry]:
    registry = CoordinatorRegistry.open(data_dir, admin_token=TOKEN)
    thread = CoordinatorThread(
        settings_for(data_dir, http="127.0.0.1:0", admin_token=TOKEN), registry.hooks()
    )
    return thread, registry


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[CoordinatorThread, CoordinatorRegistry]]:
    thread, registry = _start(tmp_path / "coord")
    try:
        yield thread, registry
    finally:
        thread.stop()
        registry.registry.store.close()


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_registration_is_validated_and_projected(
    running: tuple[CoordinatorThread, CoordinatorRegistry], make_td: Callable[..., bytes]
) -> None:
    thread, registry = running
    token, key = thread.enroll(), DeviceKey.generate()
    with grpc.insecure_channel(thread.address) as channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Register(signed_register(make_td(ram_kb=-1), key, 1, token))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailer = {entry.key: entry.value for entry in refused.value.trailing_metadata()}
        errors = json.loads(trailer["validation-errors"])
        assert [e["path"].split()[-1] for e in errors] == ["tf:ramKB"]
        stub.Register(signed_register(make_td(sensors=("Camera",)), key, 2, token))
    _wait_for(lambda: registry.registry.exists("urn:tinyfleet:device:pi-01"))
    base = f"http://{thread.coordinator.http_address}"
    answer = httpx.get(
        f"{base}/sparql", params={"query": "SELECT ?d WHERE { ?d a <https://w3id.org/tinyfleet#Device> }"}
    )
    assert [b["d"]["value"] for b in answer.json()["results"]["bindings"]] == ["urn:tinyfleet:device:pi-01"]
    assert httpx.get(f"{base}/things/urn:tinyfleet:device:pi-01").json()["title"] == "pi-01"


def test_the_registry_catches_up_after_a_crash_between_sql_commit_and_projection(
    tmp_path: Path, make_td: Callable[..., bytes]
) -> None:
    data_dir = tmp_path / "coord"
    thread, registry = _start(data_dir)
    thread.stop()
    registry.registry.store.close()
    # What a crash right after the SQL commit leaves: the row and its outbox entry, no RDF.
    repo = Repository(open_database(default_url(data_dir)))
    repo.create_device("urn:tinyfleet:device:late", 42, make_td("late"), TD_JSON)
    repo.engine.dispose()
    thread, registry = _start(data_dir)
    try:
        _wait_for(lambda: registry.registry.exists("urn:tinyfleet:device:late"))
        assert registry.registry.last_applied_seq() >= 1
    finally:
        thread.stop()
        registry.registry.store.close()


def test_eligibility_is_checked_at_submission_and_re_evaluated_each_call(
    tmp_path: Path, make_td: Callable[..., bytes]
) -> None:
    from tinyfleet.server.registry.projector import Projector
    from tinyfleet.server.registry.store import EmbeddedStore
    from tinyfleet.server.registry.thing_graphs import Registry

    repo = Repository(open_database(default_url(tmp_path)))
    hooks = CoordinatorRegistry(Registry(EmbeddedStore(None)))
    hooks.repo = repo
    repo.create_device("urn:tinyfleet:device:a", 101, make_td("a", sensors=("Camera",)), TD_JSON)
    repo.create_device("urn:tinyfleet:device:b", 102, make_td("b"), TD_JSON)
    projector = Projector(hooks.registry, repo)
    projector.catch_up()
    job = 'name = "j"\nstrategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 2\n[round]\neligible = "{}"\n'
    nodes = hooks.eligibility(parse_job_spec(job.format("eligible-devices sensors=sosa_extend:Camera")))
    assert nodes is not None and nodes() == {101}
    # b gains a camera mid-job: the next selection sees it.
    repo.replace_description("urn:tinyfleet:device:b", make_td("b", sensors=("Camera",)), TD_JSON)
    projector.catch_up()
    assert nodes() == {101, 102}
    for bad, message in (
        ("no-such-query", "no named query"),
        ("SELECT ?x WHERE { ?x ?p }", "not valid SPARQL"),
        ("SELECT ?x WHERE { ?x ?p ?o }", r"returning \?device"),
    ):
        with pytest.raises(JobSpecError, match=message):
            hooks.eligibility(parse_job_spec(job.format(bad)))


def test_directory_writes_on_the_daemon_go_through_sql(
    running: tuple[CoordinatorThread, CoordinatorRegistry], make_td: Callable[..., bytes]
) -> None:
    thread, registry = running
    base = f"http://{thread.coordinator.http_address}"
    admin = {"authorization": f"Bearer {TOKEN}", "content-type": TD_JSON}
    thing = "urn:tinyfleet:device:pi-01"
    _wait_for(lambda: registry.repo is not None and registry.projector is not None)
    repo = registry.repo
    assert repo is not None
    assert httpx.put(f"{base}/things/{thing}", content=make_td(), headers=admin).status_code == 201
    assert repo.get_device(thing) is not None  # SQL, the system of record, has it
    assert httpx.get(f"{base}/things/{thing}").json()["ramKB"] == 512  # and RDF is already current
    assert httpx.put(f"{base}/things/{thing}", content=make_td(ram_kb=64), headers=admin).status_code == 204
    assert (device := repo.get_device(thing)) is not None and device.description == make_td(ram_kb=64)
    assert httpx.delete(f"{base}/things/{thing}", headers=admin).status_code == 204
    assert repo.get_device(thing) is None
    assert httpx.get(f"{base}/things/{thing}").status_code == 404


def test_query_and_import_commands_against_the_running_daemon(
    tmp_path: Path,
    running: tuple[CoordinatorThread, CoordinatorRegistry],
    make_td: Callable[..., bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tinyfleet.cli import main

    thread, registry = running
    base = f"http://{thread.coordinator.http_address}"
    _wait_for(lambda: registry.repo is not None and registry.projector is not None)
    admin = {"authorization": f"Bearer {TOKEN}", "content-type": TD_JSON}
    httpx.put(
        f"{base}/things/urn:tinyfleet:device:pi-01", content=make_td(sensors=("Camera",)), headers=admin
    )
    args = ["query", "--server", base, "--format", "csv", "--named", "eligible-devices"]
    assert main([*args, "--param", "sensors=sosa_extend:Camera"]) == 0
    assert capsys.readouterr().out.split() == ["device", "urn:tinyfleet:device:pi-01"]
    assert main(["query", "--server", base, "SELECT ?x WHERE {"]) == 2
    assert "SPARQL syntax error" in capsys.readouterr().err
    board = tmp_path / "board.ttl"
    board.write_text(QUIRKY_BOARD)
    assert main(["registry", "import", str(board), "--server", base, "--admin-token", "wrong"]) == 2
    assert "401" in capsys.readouterr().err
    token_file = tmp_path / "admin-token"
    from_file = ["registry", "import", str(board), "--server", base, "--admin-token-file", str(token_file)]
    assert main(from_file) == 2
    assert f"--admin-token-file {token_file}: cannot read" in capsys.readouterr().err
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # a token file others can read is refused
    assert main(from_file) == 0
    assert registry.registry.exists("https://example.org/boards/quirky-1")
    assert "malformed class name" in capsys.readouterr().err  # the daemon's repair report
    assert registry.repo is not None
    kept = registry.repo.imported_document("board.ttl")  # SQL keeps it: a rebuild re-applies it
    assert kept is not None and kept.base_iri == "https://example.org/boards/quirky-1/"
    assert kept.content == QUIRKY_BOARD.encode()
