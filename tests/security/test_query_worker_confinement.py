"""A SPARQL query worker is confined beyond the text checks: with no SERVICE endpoint allowed it
runs without a network (a SERVICE that slipped past service_policy has nowhere to connect), and
it may allocate only so much (one query grew ~320 MB/s and reached 2.6-3.8 GB before its
deadline, found by probing): past the cap the query fails with a message saying so, and the
next query gets a fresh worker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pyoxigraph as ox
import pytest

from tinyfleet.server.registry.query_workers import QueryFailed, QueryRequest, QueryWorkers
from tinyfleet.server.registry.service_policy import ServicePolicy
from tinyfleet.server.registry.sparql_results import Formats
from tinyfleet.server.registry.store import EmbeddedStore

from .sparql_probe import Listener

HOG = "SELECT ?a ?b ?c ?d ?e WHERE { ?a ?p1 ?b . ?c ?p2 ?d . ?e ?p3 ?f } ORDER BY ?a ?c ?e"


def _store(path: Path, triples: int = 300) -> EmbeddedStore:
    store = EmbeddedStore(path)
    graph, predicate = ox.NamedNode("urn:test:filler"), ox.NamedNode("urn:p")
    store.oxigraph.extend(
        ox.Quad(ox.NamedNode(f"urn:s{i}"), predicate, ox.Literal(i), graph) for i in range(triples)
    )
    store.oxigraph.flush()
    return store


def _run(workers: QueryWorkers, request: QueryRequest, timeout_s: float = 60.0) -> bytes:
    async def ask() -> bytes:
        try:
            return (await workers.run(request, time.monotonic() + timeout_s)).body
        finally:
            workers.close()

    return asyncio.run(ask())


def test_a_service_past_the_text_check_finds_no_network(tmp_path: Path) -> None:
    store = _store(tmp_path / "registry", triples=3)
    with Listener() as listener:
        endpoint = listener.url("/sparql")
        # the coordinator's workers allow no endpoint; this request's own policy lets the text
        # through, standing in for a spelling the check does not catch
        workers = QueryWorkers.for_store(store, workers=1, queue=0)
        leaky = QueryRequest(
            f"SELECT * WHERE {{ SERVICE <{endpoint}> {{ ?s ?p ?o }} }}", 10, Formats(),
            ServicePolicy.allowing([endpoint]),
        )
        with pytest.raises(QueryFailed) as failed:
            _run(workers, leaky)
        time.sleep(0.3)  # a connection in flight would have landed
        assert listener.requests == [], "the worker reached the network"
        assert "unreachable" in str(failed.value).lower() or "error" in str(failed.value).lower()
        # the same worker setup with the endpoint allowed does reach it: the isolation made the
        # difference, not the listener
        policy = ServicePolicy.allowing([endpoint])
        allowed = QueryWorkers.for_store(store, workers=1, queue=0, services=policy)
        with pytest.raises(QueryFailed):  # the listener answers nothing SPARQL can read
            _run(allowed, leaky)
        assert len(listener.requests) == 1
    store.close()


def test_a_query_past_its_memory_cap_fails_saying_so_and_the_next_runs(tmp_path: Path) -> None:
    store = _store(tmp_path / "registry")
    workers = QueryWorkers.for_store(store, workers=1, queue=0, memory_bytes=256 << 20)

    async def scenario() -> tuple[QueryFailed, bytes, float]:
        started = time.monotonic()
        try:
            with pytest.raises(QueryFailed) as failed:
                await workers.run(QueryRequest(HOG, 10, Formats(), ServicePolicy()), started + 60)
            took = time.monotonic() - started
            after = await workers.run(
                QueryRequest("ASK { ?s ?p ?o }", 10, Formats(), ServicePolicy()), time.monotonic() + 60
            )
            return failed.value, after.body, took
        finally:
            workers.close()

    failed, after, took = asyncio.run(scenario())
    assert "more memory than a query may use (256 MB, --sparql-memory-mb)" in str(failed)
    assert took < 30, f"the cap stopped the query only after {took:.1f} s"  # it grows ~320 MB/s
    assert b"true" in after
    store.close()
