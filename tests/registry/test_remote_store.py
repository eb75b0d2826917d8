"""The registry on a remote SPARQL 1.1 server: `oxigraph serve` started on loopback by the test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tinyfleet.server.registry.store import RemoteStore
from tinyfleet.server.registry.thing_graphs import Registry

OXIGRAPH = shutil.which("oxigraph") or str(Path(sys.executable).parent / "oxigraph")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def oxigraph_server(tmp_path: Path) -> Iterator[str]:
    if not Path(OXIGRAPH).exists():
        pytest.skip("the oxigraph server binary (PyPI package 'oxigraph') is not installed")
    port = _free_port()
    process = subprocess.Popen(
        [
            OXIGRAPH,
            "serve",
            "--location",
            str(tmp_path / "oxigraph"),
            "--bind",
            f"127.0.0.1:{port}",
            "--union-default-graph",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"{url}/query", params={"query": "ASK {}"}, timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else "exited"
                assert time.monotonic() < deadline, "oxigraph serve did not start"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_registry_on_a_remote_sparql_server(oxigraph_server: str, make_td: Callable[..., bytes]) -> None:
    store = RemoteStore(oxigraph_server)
    registry = Registry(store)
    registry.put(registry.prepare(make_td("a", sensors=("Camera",)), "application/td+json"), seq=3)
    registry.put(registry.prepare(make_td("b"), "application/td+json"))
    assert registry.eligible("eligible-devices sensors=sosa_extend:Camera") == ["urn:tinyfleet:device:a"]
    assert registry.last_applied_seq() == 3
    # The security definition was a blank node in JSON-LD; it left for the server as an IRI.
    raw = httpx.post(
        f"{oxigraph_server}/query",
        content="SELECT (COUNT(*) AS ?n) WHERE { GRAPH ?g { ?s ?p ?o FILTER(isBlank(?s) || isBlank(?o)) } }",
        headers={"content-type": "application/sparql-query", "accept": "application/sparql-results+json"},
    )
    assert raw.json()["results"]["bindings"][0]["n"]["value"] == "0"
    document = registry.document("urn:tinyfleet:device:a")
    assert document is not None and document["sensorTypes"] == ["Camera"]
    triples = registry.graph_triples("urn:tinyfleet:device:b")
    assert any(t.predicate.value.endswith("#ramKB") for t in triples)
    assert registry.delete("urn:tinyfleet:device:a") is True
    assert registry.thing_ids() == (["urn:tinyfleet:device:b"], 1)
    with pytest.raises(SyntaxError):
        store.query("SELECT nonsense")
    store.close()
