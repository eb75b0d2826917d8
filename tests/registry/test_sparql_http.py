"""SPARQL 1.1 Protocol endpoint: request forms, result formats, update rights, limits and errors."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pyoxigraph as ox
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tinyfleet.server.auth import MAX_FAILURES, FailedAuthLimiter, admin_guesses
from tinyfleet.server.http.registry_access import Access, negotiate
from tinyfleet.server.http.registry_routes import registry_app
from tinyfleet.server.http.sparql import SparqlOptions, sparql_routes
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry

TOKEN = "admin-secret"
DEVICES = (
    "PREFIX tf: <https://w3id.org/tinyfleet#> SELECT ?d ?ram WHERE { ?d a tf:Device ; tf:ramKB ?ram } "
    "ORDER BY ?d"
)


@pytest.fixture(params=["memory", "disk"])
def client(
    request: pytest.FixtureRequest, tmp_path: Path, make_td: Callable[..., bytes]
) -> Iterator[TestClient]:
    """In memory, queries run in a thread; on disk, in worker processes (bytes over a pipe)."""
    store = EmbeddedStore(tmp_path / "registry" if request.param == "disk" else None)
    registry = Registry(store)
    for i in range(3):
        registry.put(registry.prepare(make_td(f"d{i}", ram_kb=100 + i), "application/td+json"))
    app = registry_app(registry, access=Access(admin_token=TOKEN), sparql=SparqlOptions(max_rows=50))
    try:
        with TestClient(app) as c:
            yield c
    finally:
        store.close()


def test_get_post_and_form_requests_agree(client: TestClient) -> None:
    accept = {"accept": "application/sparql-results+json"}
    by_get = client.get("/sparql", params={"query": DEVICES}, headers=accept)
    by_post = client.post(
        "/sparql", content=DEVICES, headers={**accept, "content-type": "application/sparql-query"}
    )
    by_form = client.post("/sparql", data={"query": DEVICES}, headers=accept)
    assert by_get.status_code == by_post.status_code == by_form.status_code == 200
    assert by_get.json() == by_post.json() == by_form.json()
    rams = [b["ram"]["value"] for b in by_get.json()["results"]["bindings"]]
    assert rams == ["100", "101", "102"]
    assert by_get.headers["content-type"].startswith("application/sparql-results+json")


def test_results_in_xml_csv_tsv_and_graphs_in_three_syntaxes(client: TestClient) -> None:
    xml = client.get(
        "/sparql", params={"query": DEVICES}, headers={"accept": "application/sparql-results+xml"}
    )
    assert xml.headers["content-type"].startswith("application/sparql-results+xml")
    assert xml.text.count("<result>") == 3
    table = client.get("/sparql", params={"query": DEVICES}, headers={"accept": "text/csv"})
    rows = list(csv.reader(io.StringIO(table.text)))
    assert rows[0] == ["d", "ram"] and rows[1] == ["urn:tinyfleet:device:d0", "100"]
    tsv = client.get("/sparql", params={"query": DEVICES}, headers={"accept": "text/tab-separated-values"})
    assert tsv.text.splitlines()[0] == "?d\t?ram"
    ask = client.get("/sparql", params={"query": "ASK { ?s ?p ?o }"})
    assert ask.json() == {"head": {}, "boolean": True}
    construct = "CONSTRUCT { ?d <urn:p> ?ram } WHERE { ?d <https://w3id.org/tinyfleet#ramKB> ?ram }"
    for media, fmt in (
        ("text/turtle", ox.RdfFormat.TURTLE),
        ("application/n-triples", ox.RdfFormat.N_TRIPLES),
        ("application/ld+json", ox.RdfFormat.JSON_LD),
    ):
        response = client.get("/sparql", params={"query": construct}, headers={"accept": media})
        assert response.headers["content-type"].startswith(media)
        assert len(list(ox.parse(response.content, format=fmt))) == 3
    refused = client.get("/sparql", params={"query": construct}, headers={"accept": "image/png"})
    assert refused.status_code == 406


def test_updates_need_the_admin_token(client: TestClient) -> None:
    update = "INSERT DATA { GRAPH <urn:g> { <urn:a> <urn:b> <urn:c> } }"
    headers = {"content-type": "application/sparql-update"}
    missing = client.post("/sparql", content=update, headers=headers)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert "SPARQL Update needs the admin token" in missing.json()["detail"]
    wrong = client.post("/sparql", content=update, headers={**headers, "authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "wrong admin token" in wrong.json()["detail"]
    assert (
        client.post(
            "/sparql", content=update, headers={**headers, "authorization": f"Bearer {TOKEN}"}
        ).status_code
        == 204
    )
    assert (
        client.get("/sparql", params={"query": "ASK { <urn:a> <urn:b> <urn:c> }"}).json()["boolean"] is True
    )
    # The directory's search endpoint never writes, even for the admin.
    read_only = client.post(
        "/search/sparql", data={"update": update}, headers={"authorization": f"Bearer {TOKEN}"}
    )
    assert read_only.status_code == 403


def test_guessing_the_admin_token_on_sparql_update_is_limited_per_peer(registry: Registry) -> None:
    """The limiter is the one the caller passes (the coordinator's, shared with gRPC and /api)."""
    limiter = FailedAuthLimiter()
    access = Access(admin_token=TOKEN, auth_failures=limiter)
    app = Starlette(routes=sparql_routes(registry.store, access=access))
    update = "INSERT DATA { <urn:a> <urn:b> <urn:c> }"
    headers = {"content-type": "application/sparql-update"}
    with TestClient(app) as client:
        for n in range(MAX_FAILURES):
            guessed = {**headers, "authorization": f"Bearer g{n}"}
            guess = client.post("/sparql", content=update, headers=guessed)
            assert guess.status_code == 401
        right = {**headers, "authorization": f"Bearer {TOKEN}"}
        blocked = client.post("/sparql", content=update, headers=right)
    assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 60
    assert blocked.headers["content-type"] == "application/problem+json"
    assert "too many failed authentication attempts" in blocked.json()["detail"]
    assert limiter.retry_after(admin_guesses("testclient")) > 0  # the key the limiter shares
    assert not registry.store.query("ASK { <urn:a> <urn:b> <urn:c> }")


@pytest.mark.parametrize("admin_token", [None, "unset"])
def test_without_an_admin_token_updates_are_open_and_without_access_they_are_closed(
    registry: Registry, admin_token: str | None
) -> None:
    """`--no-admin-token` (Access(admin_token=None)) opens SPARQL Update as it opens the admin API;
    routes given no Access at all have an admin nobody can be."""
    access = Access(admin_token=None) if admin_token is None else None
    app = Starlette(routes=sparql_routes(registry.store, access=access))
    update = "INSERT DATA { <urn:a> <urn:b> <urn:c> }"
    with TestClient(app) as client:
        answer = client.post("/sparql", content=update, headers={"content-type": "application/sparql-update"})
    assert answer.status_code == (204 if admin_token is None else 401)
    assert bool(registry.store.query("ASK { <urn:a> <urn:b> <urn:c> }")) is (admin_token is None)


def test_an_unacceptable_accept_is_refused_before_the_query_runs(
    tmp_path: Path, make_td: Callable[..., bytes]
) -> None:
    """Neither a results nor a graph format acceptable: 406 at once. The query would time out
    (503) if it ran, so a 406 shows it did not. On disk, so the timed-out worker is killed."""
    store = EmbeddedStore(tmp_path / "registry")
    registry = Registry(store)
    registry.put(registry.prepare(make_td("d0"), "application/td+json"))
    queries = SparqlOptions().query_workers(store)
    app = Starlette(routes=sparql_routes(store, timeout_s=0.5, max_rows=10**9, queries=queries))
    slow = "SELECT * WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }"
    try:
        with TestClient(app) as client:
            refused = client.get("/sparql", params={"query": slow}, headers={"accept": "image/png"})
            ran = client.get("/sparql", params={"query": slow}, headers={"accept": "text/turtle"})
    finally:
        queries.close()
        store.close()
    assert refused.status_code == 406
    assert "application/sparql-results+json" in refused.json()["detail"]
    assert "text/turtle" in refused.json()["detail"]
    assert ran.status_code == 503  # a graph format is acceptable: it ran (and here timed out)


def test_syntax_errors_row_limit_and_bad_requests_are_clear(client: TestClient) -> None:
    broken = client.get("/sparql", params={"query": "SELECT ?x WHERE { ?x"})
    assert broken.status_code == 400
    assert broken.headers["content-type"] == "application/problem+json"
    assert broken.json()["title"] == "SPARQL syntax error" and broken.json()["detail"]
    too_many = client.get("/sparql", params={"query": "SELECT * WHERE { ?s ?p ?o }"})
    assert too_many.status_code == 422 and "more than 50 rows" in too_many.json()["detail"]
    assert client.get("/sparql").status_code == 400
    assert client.post("/sparql", content="x", headers={"content-type": "text/plain"}).status_code == 400


def test_a_slow_query_times_out_with_503(registry: Registry) -> None:
    app = Starlette(routes=sparql_routes(registry.store, timeout_s=0.2, max_rows=10**9))
    slow = "SELECT * WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }"
    with TestClient(app) as client:
        response = client.get("/sparql", params={"query": slow})
    assert response.status_code == 503
    assert "0.2 s" in response.json()["detail"]


def test_accept_negotiation_honours_quality_and_wildcards() -> None:
    offered = ["application/sparql-results+json", "text/csv"]
    assert negotiate("text/csv;q=0.5, application/sparql-results+json", offered, offered[0]) == offered[0]
    assert negotiate("text/*", offered, offered[0]) == "text/csv"
    assert negotiate("*/*", offered, offered[0]) == offered[0]
    assert negotiate("application/xml", offered, offered[0]) is None
    assert negotiate(None, offered, "text/csv") == "text/csv"
    assert json.loads(json.dumps(offered))  # offered list untouched
