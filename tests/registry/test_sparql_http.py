"""SPARQL 1.1 Protocol endpoint: request forms, result formats, update rights, limits and errors."""

from __future__ import annotations

import csv
import io
import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pyoxigraph as ox
import pytest
from httpx import Response
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tinyfleet.server.auth import MAX_FAILURES, FailedAuthLimiter, admin_guesses
from tinyfleet.server.http.registry_access import Access, negotiate
from tinyfleet.server.http.registry_routes import registry_app
from tinyfleet.server.http.sparql import SparqlOptions, sparql_routes
from tinyfleet.server.registry.sparql_updates import SKOLEM_PREFIX
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
    missing = client.get("/sparql", params={"default-graph-uri": "urn:tinyfleet:device:d0"})
    assert missing.status_code == 400 and "missing 'query'" in missing.json()["detail"]


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


TF_DEVICE = "PREFIX tf: <https://w3id.org/tinyfleet#>\n"
RESULTS = {"accept": "application/sparql-results+json"}


def _devices(response: Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [b["d"]["value"].rsplit(":", 1)[1] for b in response.json()["results"]["bindings"]]


def test_from_and_from_named_choose_the_graphs_a_query_reads(client: TestClient) -> None:
    """Without a dataset clause the default graph is the union of every device's graph; FROM
    makes it the graphs named; FROM NAMED alone leaves it empty and lets GRAPH see those only."""
    def ask(query: str) -> list[str]:
        return _devices(client.get("/sparql", params={"query": TF_DEVICE + query}, headers=RESULTS))

    assert ask("SELECT ?d WHERE { ?d a tf:Device } ORDER BY ?d") == ["d0", "d1", "d2"]
    assert ask("SELECT ?d FROM <urn:tinyfleet:device:d1> WHERE { ?d a tf:Device }") == ["d1"]
    two = (
        "SELECT ?d FROM <urn:tinyfleet:device:d0> FROM <urn:tinyfleet:device:d2> "
        "WHERE { ?d a tf:Device } ORDER BY ?d"
    )
    assert ask(two) == ["d0", "d2"]
    named = "SELECT ?d ?g FROM NAMED <urn:tinyfleet:device:d2> WHERE { GRAPH ?g { ?d a tf:Device } }"
    assert ask(named) == ["d2"]
    assert ask("SELECT ?d FROM NAMED <urn:tinyfleet:device:d2> WHERE { ?d a tf:Device }") == []
    every = "SELECT ?d WHERE { GRAPH ?g { ?d a tf:Device } } ORDER BY ?d"
    assert ask(every) == ["d0", "d1", "d2"]
    # "from" as a variable, in a prefixed name, a string and a comment names no dataset.
    decoy = (
        "PREFIX from: <urn:from#>\nSELECT ?d ?from WHERE { ?d a tf:Device OPTIONAL { ?d from:x ?from } "
        "FILTER(?d != 'FROM <urn:x>') } ORDER BY ?d # FROM <urn:tinyfleet:device:d0>"
    )
    assert ask(decoy) == ["d0", "d1", "d2"]


def test_default_and_named_graph_uri_override_the_query_over_get_and_post(client: TestClient) -> None:
    query = TF_DEVICE + "SELECT ?d FROM <urn:tinyfleet:device:d1> WHERE { ?d a tf:Device } ORDER BY ?d"
    graphs = [("default-graph-uri", f"urn:tinyfleet:device:{d}") for d in ("d0", "d2")]
    by_get = client.get("/sparql", params=[("query", query), *graphs], headers=RESULTS)
    by_post = client.post(
        "/sparql", params=graphs, content=query,
        headers={**RESULTS, "content-type": "application/sparql-query"},
    )
    by_form = client.post(
        "/sparql", content=urllib.parse.urlencode([("query", query), *graphs]),
        headers={**RESULTS, "content-type": "application/x-www-form-urlencoded"},
    )
    assert _devices(by_get) == _devices(by_post) == _devices(by_form) == ["d0", "d2"]
    in_graphs = TF_DEVICE + "SELECT ?d WHERE { GRAPH ?g { ?d a tf:Device } } ORDER BY ?d"
    named = client.get(
        "/sparql", params={"query": in_graphs, "named-graph-uri": "urn:tinyfleet:device:d1"}, headers=RESULTS
    )
    assert _devices(named) == ["d1"]
    # The protocol's dataset has no default graph when it names only named graphs.
    default_empty = client.get(
        "/sparql",
        params={
            "query": TF_DEVICE + "SELECT ?d WHERE { ?d a tf:Device }",
            "named-graph-uri": "urn:tinyfleet:device:d1",
        },
        headers=RESULTS,
    )
    assert _devices(default_empty) == []
    bad = client.get("/sparql", params={"query": query, "default-graph-uri": "not an IRI"})
    assert bad.status_code == 400 and "default-graph-uri must be an absolute IRI" in bad.json()["detail"]


def test_a_request_with_a_query_and_an_update_is_refused(client: TestClient) -> None:
    admin = {"authorization": f"Bearer {TOKEN}"}
    update = "INSERT DATA { GRAPH <urn:g> { <urn:a> <urn:b> <urn:c> } }"
    both = client.post("/sparql", data={"query": "ASK { ?s ?p ?o }", "update": update}, headers=admin)
    assert both.status_code == 400 and "both a query and an update" in both.json()["detail"]
    in_url = client.post(
        "/sparql", params={"query": "ASK { ?s ?p ?o }"}, content=update,
        headers={**admin, "content-type": "application/sparql-update"},
    )
    assert in_url.status_code == 400 and "both a query and an update" in in_url.json()["detail"]
    by_get = client.get("/sparql", params={"query": "ASK { ?s ?p ?o }", "update": update})
    assert by_get.status_code == 400 and "both a query and an update" in by_get.json()["detail"]
    written = client.get("/sparql", params={"query": "ASK { <urn:a> <urn:b> <urn:c> }"})
    assert written.json()["boolean"] is False
    # An update's graphs are named in its text; the protocol's parameters for them are refused.
    using = client.post(
        "/sparql", params={"using-graph-uri": "urn:g"}, content="DELETE { ?s ?p ?o } WHERE { ?s ?p ?o }",
        headers={**admin, "content-type": "application/sparql-update"},
    )
    assert using.status_code == 400 and "using-graph-uri" in using.json()["detail"]
    assert client.get("/sparql", params={"query": "ASK { ?s ?p ?o }"}).json()["boolean"] is True


@pytest.mark.parametrize("media", ["text/plain", "application/json", ""])
def test_unsupported_request_media_types_get_415(client: TestClient, media: str) -> None:
    headers = {"content-type": media} if media else {}
    refused = client.post("/sparql", content="ASK { ?s ?p ?o }", headers=headers)
    assert refused.status_code == 415 and refused.headers["content-type"] == "application/problem+json"
    assert "application/sparql-query" in refused.json()["detail"]


def test_the_service_description_states_the_union_default_graph(client: TestClient) -> None:
    sd = "http://www.w3.org/ns/sparql-service-description#"
    endpoints = {"/sparql": {"SPARQL11Query", "SPARQL11Update"}, "/search/sparql": {"SPARQL11Query"}}
    for path, languages in endpoints.items():
        response = client.get(path, headers={"accept": "text/turtle"})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/turtle")
        triples = list(ox.parse(response.content, format=ox.RdfFormat.TURTLE))
        values = {(t.predicate.value, t.object.value) for t in triples}
        assert (sd + "feature", sd + "UnionDefaultGraph") in values
        assert (sd + "endpoint", f"http://testserver{path}") in values
        assert {o.removeprefix(sd) for p, o in values if p == sd + "supportedLanguage"} == languages


LAMP = "urn:tinyfleet:device:lamp"


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_describe_returns_the_nested_description_through_skolem_iris(
    tmp_path: Path, make_td: Callable[..., bytes], where: str
) -> None:
    """A TD's properties, forms and security definitions are blank nodes in JSON-LD, stored as
    skolem IRIs: DESCRIBE follows them as far as they go (and only the device's own)."""
    store = EmbeddedStore(tmp_path / "registry" if where == "disk" else None)
    registry = Registry(store)
    td = json.loads(make_td("lamp"))
    td["properties"] = {
        "brightness": {
            "type": "integer",
            "forms": [{"href": "https://lamp.example/brightness", "contentType": "application/json"}],
        }
    }
    registry.put(registry.prepare(json.dumps(td).encode(), "application/td+json"))
    registry.put(registry.prepare(make_td("other"), "application/td+json"))
    app = registry_app(registry, access=Access(admin_token=TOKEN), sparql=SparqlOptions(max_rows=500))
    try:
        with TestClient(app) as client:
            described = client.get(
                "/sparql", params={"query": f"DESCRIBE <{LAMP}>"}, headers={"accept": "application/n-triples"}
            )
            limited = client.get(
                "/sparql", params={"query": f"DESCRIBE <{LAMP}> FROM <urn:tinyfleet:device:other>"},
                headers={"accept": "application/n-triples"},
            )
    finally:
        registry.large_descriptions.close()
        store.close()
    assert described.status_code == 200, described.text
    triples = list(ox.parse(described.content, format=ox.RdfFormat.N_TRIPLES))
    objects = {t.object.value for t in triples}
    assert "https://lamp.example/brightness" in objects  # device -> property -> form -> target
    assert "application/json" in objects
    assert "https://www.w3.org/2019/wot/security#NoSecurityScheme" in objects  # its security definition
    subjects = {t.subject.value for t in triples}
    assert all(s == LAMP or s.startswith(SKOLEM_PREFIX) for s in subjects)
    assert not any("other" in s for s in subjects)
    assert limited.status_code == 200 and limited.content.strip() == b""  # FROM holds for what it follows
