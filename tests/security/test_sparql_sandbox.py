"""The SPARQL endpoint of a real coordinator process is sandboxed (issue 10, rows 1, 4 and 5).

- SERVICE never makes the coordinator call out (a local listener sees no connection) unless
  the operator allow-listed that exact endpoint; the refusal is a 400 naming SERVICE.
- A runaway query is stopped at its deadline: the coordinator's CPU stops growing.
- 50 concurrent slow queries leave /healthz fast; the full queue answers 503 + Retry-After.
- SIGTERM with queries running exits promptly, and the store opens again at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pyoxigraph as ox
import pytest

from tinyfleet.server.registry.query_workers import QueryRequest, QueryTimeout, QueryWorkers
from tinyfleet.server.registry.service_policy import ServiceNotAllowed, ServicePolicy
from tinyfleet.server.registry.sparql_results import Formats
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.simulations.benchmarks.process_cpu import RUNAWAY, cpu_seconds, descendants, worker_pids
from tinyfleet.simulations.local_fleet import LocalFleet

from .sparql_probe import Listener, flood, rss_mb

TOKEN = "sandbox-admin-token"
TRIPLES = 300  # a 4-way cartesian product of 300 triples runs for hours
#: Materialises a 3-way cartesian product of the triples to sort it: GBs within seconds.
HOARDER = "SELECT ?a ?d ?g WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i } ORDER BY ?c ?f ?i"


def _start(root: Path, *server_args: str) -> LocalFleet:
    fleet = LocalFleet(root, admin_token=TOKEN, server_args=list(server_args))
    fleet.__enter__()
    try:
        fleet.start_server()
    except BaseException:
        fleet.close()
        raise
    return fleet


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[LocalFleet]:
    fleet = _start(tmp_path, "--sparql-timeout", "3")
    try:
        yield fleet
    finally:
        fleet.close()


def _base(fleet: LocalFleet) -> str:
    return f"http://{fleet.http_address}"


def _fill(base: str, count: int = TRIPLES) -> None:
    triples = " ".join(f"<urn:s{i}> <urn:p> {i} ." for i in range(count))
    response = httpx.post(
        f"{base}/sparql",
        content=f"INSERT DATA {{ GRAPH <urn:test:filler> {{ {triples} }} }}",
        headers={"content-type": "application/sparql-update", "authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 204, response.text


def _count(base: str, graph: str = "urn:test:filler") -> int:
    query = f"SELECT (COUNT(*) AS ?n) WHERE {{ GRAPH <{graph}> {{ ?s ?p ?o }} }}"
    response = httpx.get(f"{base}/sparql", params={"query": query})
    assert response.status_code == 200, response.text
    return int(response.json()["results"]["bindings"][0]["n"]["value"])


def _service_queries(url: str) -> list[str]:
    """SERVICE written every way a filter on the raw text could miss."""
    folder, name = url.rsplit("/", 1)
    return [
        f"SELECT * WHERE {{ SERVICE <{url}> {{ ?s ?p ?o }} }}",
        f"select * where {{ SeRvIcE <{url}> {{ ?s ?p ?o }} }}",
        f"SELECT * WHERE {{ SERVICE # a comment\n SILENT <{url}> {{ ?s ?p ?o }} }}",
        f"PREFIX x: <{folder}/> SELECT * WHERE {{ SERVICE x:{name} {{ ?s ?p ?o }} }}",
        f"SELECT * WHERE {{ ?s ?p ?o FILTER EXISTS {{ SERVICE <{url}> {{ ?s ?p ?o }} }} }}",
        f"SELECT * WHERE {{ {{ SELECT ?s WHERE {{ SERVICE <{url}> {{ ?s ?p ?o }} }} }} }}",
        f"SELECT * WHERE {{ VALUES ?e {{ <{url}> }} SERVICE ?e {{ ?s ?p ?o }} }}",
        f"ASK {{ SERVICE <{url}> {{ ?s ?p ?o }} }}",
        f"CONSTRUCT {{ ?s ?p ?o }} WHERE {{ SERVICE <{url}> {{ ?s ?p ?o }} }}",
    ]


def test_service_is_refused_and_the_coordinator_calls_nothing(coordinator: LocalFleet) -> None:
    base = _base(coordinator)
    with Listener() as listener:
        target = listener.url("/x")
        for path in ("/sparql", "/search/sparql"):
            for query in _service_queries(target):
                for response in (
                    httpx.get(f"{base}{path}", params={"query": query}),
                    httpx.post(f"{base}{path}", data={"query": query}),
                ):
                    assert response.status_code == 400, (path, query, response.text)
                    assert response.headers["content-type"] == "application/problem+json"
                    problem = response.json()
                    assert problem["title"] == "SERVICE not allowed"
                    assert "SERVICE" in problem["detail"] and "allowed endpoints: none" in problem["detail"]
        # The admin's updates and a job's eligibility query run in the coordinator itself.
        update = f"INSERT {{ GRAPH <urn:g> {{ ?s ?p ?o }} }} WHERE {{ SERVICE <{target}> {{ ?s ?p ?o }} }}"
        refused = httpx.post(
            f"{base}/sparql",
            content=update,
            headers={"content-type": "application/sparql-update", "authorization": f"Bearer {TOKEN}"},
        )
        assert refused.status_code == 400 and f"SERVICE <{target}>" in refused.json()["detail"]
        for update in (f"LOAD <{target}>", f"load silent <{target}> into graph <urn:g>"):
            refused = httpx.post(
                f"{base}/sparql",
                content=update,
                headers={"content-type": "application/sparql-update", "authorization": f"Bearer {TOKEN}"},
            )
            assert refused.status_code == 400, refused.text
            assert refused.json()["detail"] == f"LOAD <{target}> is not allowed; allowed endpoints: none"
        eligible = f"SELECT ?device WHERE {{ SERVICE <{target}> {{ ?device ?p ?o }} }}"
        job = (
            'name = "j"\nstrategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n'
            f"[round]\neligible = '''{eligible}'''\n"
        )
        with pytest.raises(grpc.RpcError) as submitted:
            coordinator.submit(job)
        assert submitted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"SERVICE <{target}> is not allowed" in str(submitted.value.details())
        time.sleep(0.5)  # a connection attempt in flight would land by now
        assert listener.requests == []


def test_an_allow_listed_endpoint_and_only_it_is_called(tmp_path: Path) -> None:
    rows: dict[str, Any] = {
        "head": {"vars": ["s"]}, "results": {"bindings": [{"s": {"type": "uri", "value": "urn:remote"}}]}
    }
    with Listener(reply=json.dumps(rows).encode()) as listener:
        allowed = listener.url("/sparql")
        fleet = _start(tmp_path, "--sparql-service-allow", allowed)
        try:
            base = _base(fleet)
            query = f"SELECT ?s WHERE {{ SERVICE <{allowed}> {{ ?s ?p ?o }} }}"
            answer = httpx.get(f"{base}/sparql", params={"query": query})
            assert answer.status_code == 200, answer.text
            assert answer.json()["results"]["bindings"] == rows["results"]["bindings"]
            assert len(listener.requests) == 1 and listener.requests[0].startswith(b"POST /sparql ")
            other = listener.url("/other")
            query = f"SELECT * WHERE {{ SERVICE <{other}> {{ ?s ?p ?o }} }}"
            refused = httpx.get(f"{base}/search/sparql", params={"query": query})
            assert refused.status_code == 400
            detail = refused.json()["detail"]
            assert detail == f"SERVICE <{other}> is not allowed; allowed endpoints: {allowed}"
            assert len(listener.requests) == 1
        finally:
            fleet.close()


def test_a_runaway_query_stops_using_cpu_after_its_deadline(coordinator: LocalFleet) -> None:
    base = _base(coordinator)
    pid = coordinator.server.pid  # type: ignore[union-attr]
    _fill(base)
    assert _count(base) == TRIPLES  # the worker that will run the query exists now
    # Counted: the coordinator, the processes it has now and the ones it reaps; not a worker
    # spawned later (its imports are new work, not the query's).
    present = set(descendants(pid))
    workers = worker_pids(pid)
    before = cpu_seconds(pid, present)
    response = httpx.get(f"{base}/sparql", params={"query": RUNAWAY}, timeout=60)
    assert response.status_code == 503 and response.json()["title"] == "Query timeout"
    assert cpu_seconds(pid, present) - before > 0.3, "the query should have been working until its deadline"
    # Left running, the query would add about a CPU-second per second; a stopped one adds nothing.
    quiet = _cpu_quiet_after(pid, present, window_s=2.0, limit_s=0.3, within_s=15.0)
    assert quiet is not None, "the coordinator's CPU kept growing 15 s after the query's deadline"
    assert workers and not any(Path(f"/proc/{w}").exists() for w in workers), "the worker was killed"
    # The server still answers, and a worker sees what was written after it opened the store.
    httpx.post(
        f"{base}/sparql",
        content="INSERT DATA { GRAPH <urn:test:later> { <urn:a> <urn:b> <urn:c> } }",
        headers={"content-type": "application/sparql-update", "authorization": f"Bearer {TOKEN}"},
    ).raise_for_status()
    assert _count(base, "urn:test:later") == 1
    assert _count(base) == TRIPLES


def _cpu_quiet_after(
    pid: int, among: set[int], *, window_s: float, limit_s: float, within_s: float
) -> float | None:
    """Seconds until the process tree (`cpu_seconds(pid, among)`) first gained less than
    `limit_s` of CPU over `window_s`, polling for up to `within_s`; None if it never did. Polling
    rather than one fixed wait keeps a loaded machine's slow moments out of the verdict."""
    started = time.monotonic()
    samples = [(started, cpu_seconds(pid, among))]
    while samples[-1][0] - started < within_s:
        time.sleep(0.1)
        now = time.monotonic()
        samples.append((now, cpu_seconds(pid, among)))
        earlier = [cpu for at, cpu in samples if now - at >= window_s]
        if earlier and samples[-1][1] - earlier[-1] < limit_s:
            return now - started
    return None


def test_the_event_loop_is_not_held_while_a_killed_worker_is_reaped(tmp_path: Path) -> None:
    """Killing a worker is a signal; reaping it (the kernel frees its GBs meanwhile) and spawning
    its replacement must not happen where the event loop waits. The loop used to wait for both
    whenever the query's thread saw the deadline first (0.5-0.9 s for a 2 GB worker): here the
    loop is busy for 30 ms at the deadline (as under load), so the thread does."""
    store = EmbeddedStore(tmp_path / "registry")
    graph = ox.NamedNode("urn:test:filler")
    predicate = ox.NamedNode("urn:p")
    store.oxigraph.extend(
        ox.Quad(ox.NamedNode(f"urn:s{i}"), predicate, ox.Literal(i), graph) for i in range(TRIPLES)
    )
    store.oxigraph.flush()
    block_s, timeout_s = 0.030, 5.0
    ticks: list[float] = []
    reaped_at: list[float] = []
    peak_mb = 0.0

    def watch(worker: int, stop: threading.Event) -> None:
        """The worker's peak memory, and when its /proc entry goes (it is reaped)."""
        nonlocal peak_mb
        while not stop.is_set():
            mb = rss_mb(worker)
            if mb == 0.0 and not Path(f"/proc/{worker}").exists():
                reaped_at.append(time.monotonic())
                return
            peak_mb = max(peak_mb, mb)
            time.sleep(0.002)

    async def scenario() -> None:
        workers = QueryWorkers.for_store(store, workers=1, queue=0, memory_bytes=None)  # GBs, on purpose
        stop = threading.Event()
        try:
            others = set(worker_pids(os.getpid()))  # earlier tests' workers may still be about
            warm = await workers.run(_request("ASK { ?s ?p ?o }"), time.monotonic() + 30)
            assert b"true" in warm.body
            (worker,) = set(worker_pids(os.getpid())) - others
            watcher = threading.Thread(target=watch, args=(worker, stop), daemon=True)
            watcher.start()
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + timeout_s
            loop.call_at(deadline - 0.005, time.sleep, block_s)  # asyncio's clock is time.monotonic

            async def tick() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.002)

            ticker = asyncio.create_task(tick())
            with pytest.raises(QueryTimeout):
                await workers.run(_request(HOARDER), deadline)
            await asyncio.sleep(1.5)
            ticker.cancel()
            watcher.join(5)
            assert reaped_at, "the killed worker was reaped within 1.5 s"
            assert peak_mb > 1000, f"the query should have held GBs when killed, it held {peak_mb:.0f} MB"
            # Every tick from a second before the deadline until the worker is gone: the loop ran
            # throughout (apart from the block it was given), not only once it was reaped.
            until = max(deadline + 1, reaped_at[0])
            gaps = [b - a for a, b in itertools.pairwise(ticks) if deadline - 1 <= a <= until]
            assert max(gaps) < block_s + 0.100, (
                f"the event loop stalled {max(gaps) * 1000:.0f} ms around the deadline; the killed "
                f"worker ({peak_mb:.0f} MB) was reaped {(reaped_at[0] - deadline) * 1000:.0f} ms after it"
            )
        finally:
            stop.set()
            workers.close()

    asyncio.run(scenario())


def _request(text: str) -> QueryRequest:
    return QueryRequest(text=text, max_rows=1000, formats=Formats(), services=ServicePolicy())


def test_healthz_stays_fast_under_50_slow_queries_and_a_full_queue_says_when_to_retry(tmp_path: Path) -> None:
    workers, queue, timeout_s = 2, 8, 8.0
    fleet = _start(
        tmp_path,
        *("--sparql-timeout", f"{timeout_s}", "--sparql-workers", f"{workers}", "--sparql-queue", f"{queue}"),
    )
    spawn = multiprocessing.get_context("spawn")
    try:
        base = _base(fleet)
        _fill(base)
        idle = _probe_healthz(base, seconds=2.0)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as load:
            answers = load.submit(flood, f"{base}/sparql", RUNAWAY, 50)
            # Through the deadline and the workers' restart; /things and gRPC answer meanwhile.
            latencies = _probe_healthz(base, seconds=timeout_s + 1.0, also=lambda: _things_and_grpc(fleet))
            responses = answers.result()
        p99 = _p99(latencies)
        assert p99 <= 0.100, (
            f"/healthz p99 {p99 * 1000:.0f} ms over {len(latencies)} requests under load "
            f"(without load: {_p99(idle) * 1000:.0f} ms)"
        )
        assert all(status == 503 for status, _, _ in responses), responses
        busy = [(title, retry) for _, title, retry in responses if retry is not None]
        assert len(busy) == 50 - (workers + queue)
        assert all(title == "Too many queries" and int(retry) >= 1 for title, retry in busy)
        assert [t for _, t, retry in responses if retry is None] == ["Query timeout"] * (workers + queue)
    finally:
        fleet.close()


def _probe_healthz(base: str, *, seconds: float, also: Callable[[], None] | None = None) -> list[float]:
    """/healthz latencies, one request every 20 ms, each on a new connection (as curl or a kubelet
    probe opens); `also` runs once, after the first 100. One client: making one costs ~20 ms."""
    latencies: list[float] = []
    ends = time.monotonic() + seconds
    with httpx.Client(base_url=base, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while time.monotonic() < ends:
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
            if len(latencies) == 100 and also is not None:
                also()
    return latencies


def _p99(latencies: list[float]) -> float:
    return sorted(latencies)[int(len(latencies) * 0.99)]


def _things_and_grpc(fleet: LocalFleet) -> None:
    assert httpx.get(f"{_base(fleet)}/things").status_code == 200
    assert isinstance(fleet.admin().devices(), list)


def test_sigterm_with_queries_running_exits_promptly_and_the_store_reopens(tmp_path: Path) -> None:
    fleet = _start(tmp_path, "--sparql-timeout", "120")
    try:
        base = _base(fleet)
        server = fleet.server
        assert server is not None
        _fill(base)
        results: list[int | str] = []

        def query() -> None:
            try:
                results.append(httpx.get(f"{base}/sparql", params={"query": RUNAWAY}, timeout=60).status_code)
            except httpx.HTTPError as exc:
                results.append(type(exc).__name__)

        clients = [threading.Thread(target=query) for _ in range(4)]
        for client in clients:
            client.start()
        before = cpu_seconds(server.pid)
        time.sleep(1.5)
        assert cpu_seconds(server.pid) - before > 0.3, "the queries should be running"
        workers = worker_pids(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
        for client in clients:
            client.join(10)
        assert len(results) == 4 and all(r == 503 for r in results), results
        assert workers, "the queries ran in worker processes"
        for worker in workers:
            assert not Path(f"/proc/{worker}").exists(), f"query worker {worker} outlived the coordinator"
        fleet.start_server()  # same data dir: the store is not left locked
        assert _count(_base(fleet)) == TRIPLES
    finally:
        fleet.close()


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("SELECT * WHERE { SERVICE <http://10.0.0.1/x> { ?s ?p ?o } }", "SERVICE <http://10.0.0.1/x>"),
        ("SELECT * WHERE { \\u0053ERVICE <http://10.0.0.1/x> { ?s ?p ?o } }", "SERVICE <http://10.0.0.1/x>"),
        ("BASE <http://10.0.0.1/> SELECT * WHERE { SERVICE <x> { ?s ?p ?o } }", "SERVICE <http://10.0.0.1/x>"),
        ("SELECT * WHERE { OPTIONAL { SERVICE ?e { ?s ?p ?o } } }", "SERVICE ?e"),
        ("SELECT * WHERE { { ?s ?p ?o } UNION { SERVICE <http://a/> {} } }", "SERVICE <http://a/>"),
        ("SELECT * WHERE { << ?s ?p ?o >> ?q ?r SERVICE <http://a/> {} }", "could not be parsed"),
        ("SELECT * WHERE { SERVICE <http://ok/sparql> { ?s ?p ?o } }", None),
        ("SELECT ?service WHERE { ?service <urn:p> 'SERVICE' } # SERVICE <http://a/>", None),
        ("SELECT * WHERE { << ?s ?p ?o >> ?q ?r }", None),
    ],
)
def test_service_detection_reads_the_query_not_its_spelling(text: str, refused: str | None) -> None:
    policy = ServicePolicy.allowing(["http://ok/sparql"])
    if refused is None:
        policy.check_query(text)
    else:
        with pytest.raises(ServiceNotAllowed, match="not allowed") as caught:
            policy.check_query(text)
        assert refused in str(caught.value)


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("LOAD <http://10.0.0.1/x.ttl>", "LOAD <http://10.0.0.1/x.ttl>"),
        ("PREFIX e: <http://10.0.0.1/> lOaD SILENT e:x INTO GRAPH <urn:g>", "LOAD <http://10.0.0.1/x>"),
        ("INSERT DATA { <urn:a> <urn:p> 1 } ; \\u004cOAD <http://a/>", "LOAD <http://a/>"),
        ("INSERT { ?s <urn:p> ?o } WHERE { SERVICE <http://a/> { ?s ?p ?o } }", "SERVICE <http://a/>"),
        ("LOAD <http://ok/sparql> INTO GRAPH <urn:g>", None),
        ("INSERT DATA { <urn:payload> <urn:download> 'LOAD <http://a/>' }", None),
    ],
)
def test_an_update_may_load_only_from_an_allow_listed_endpoint(text: str, refused: str | None) -> None:
    policy = ServicePolicy.allowing(["http://ok/sparql"])
    if refused is None:
        policy.check_update(text)
    else:
        with pytest.raises(ServiceNotAllowed, match="not allowed") as caught:
            policy.check_update(text)
        assert refused in str(caught.value)
