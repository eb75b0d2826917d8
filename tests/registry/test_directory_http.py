"""WoT Discovery directory routes, and the registry app served by a real uvicorn on loopback."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from tinyfleet.common.device_description import DescriptionInvalid
from tinyfleet.common.device_keys import DeviceKey, verify
from tinyfleet.server.auth import MAX_FAILURES, FailedAuthLimiter
from tinyfleet.server.http.registry_access import Access
from tinyfleet.server.http.registry_routes import registry_app
from tinyfleet.server.registry.thing_graphs import Registry

TOKEN = "admin-secret"
ADMIN = {"authorization": f"Bearer {TOKEN}", "content-type": "application/td+json"}
PI = "urn:tinyfleet:device:pi-01"
PI_KEY = DeviceKey.generate()
#: Thing Descriptions from the TD 1.1 specification, as published (data/td-1.1/README.md).
TD11_EXAMPLES = sorted((Path(__file__).parent / "data" / "td-1.1").glob("*.td.json"))
TITLE = "https://www.w3.org/2019/wot/td#title"
EVERY_GRAPH = "SELECT ?device WHERE { GRAPH ?device { ?device ?p ?o } }"


def _verify(device: str, message: bytes, signature: bytes) -> bool:
    return device == PI and verify(PI_KEY.public_key, signature, message)


def _signed_by_pi(method: str, path: str, body: bytes = b"") -> dict[str, str]:
    authorization = PI_KEY.sign_request(PI, method, path, body).authorization()
    return {"authorization": authorization, "content-type": "application/td+json"}


@pytest.fixture
def client(registry: Registry) -> Iterator[TestClient]:
    app = registry_app(registry, access=Access(admin_token=TOKEN, verify_device=_verify))
    with TestClient(app) as c:
        yield c


def test_put_get_patch_delete_lifecycle(client: TestClient, make_td: Callable[..., bytes]) -> None:
    assert client.put(f"/things/{PI}", content=make_td(), headers=ADMIN).status_code == 201
    assert client.put(f"/things/{PI}", content=make_td(ram_kb=1024), headers=ADMIN).status_code == 204
    got = client.get(f"/things/{PI}")
    assert got.status_code == 200 and got.headers["content-type"].startswith("application/td+json")
    assert got.json()["ramKB"] == 1024 and set(got.json()["registration"]) == {"created", "modified"}
    patched = client.patch(
        f"/things/{PI}",
        content=json.dumps({"site": "lab-2", "ramKB": 2048}),
        headers={**ADMIN, "content-type": "application/merge-patch+json"},
    )
    assert patched.status_code == 204
    assert (client.get(f"/things/{PI}").json()["site"], client.get(f"/things/{PI}").json()["ramKB"]) == (
        "lab-2",
        2048,
    )
    assert client.delete(f"/things/{PI}", headers=ADMIN).status_code == 204
    assert client.get(f"/things/{PI}").status_code == 404
    assert client.delete(f"/things/{PI}", headers=ADMIN).status_code == 404


def test_invalid_descriptions_come_back_as_problem_json(
    client: TestClient, make_td: Callable[..., bytes]
) -> None:
    response = client.put(f"/things/{PI}", content=make_td(ram_kb=0, device_class="toaster"), headers=ADMIN)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    errors = response.json()["validationErrors"]
    assert {e["path"].split()[-1] for e in errors} == {"tf:ramKB", "tf:deviceClass"}
    assert all(e["message"] for e in errors)
    mismatch = client.put("/things/urn:tinyfleet:device:other", content=make_td(), headers=ADMIN)
    assert mismatch.status_code == 400 and mismatch.json()["validationErrors"][0]["path"] == "/id"
    client.put(f"/things/{PI}", content=make_td(), headers=ADMIN)
    bad_patch = client.patch(
        f"/things/{PI}",
        content=json.dumps({"ramKB": None}),
        headers={**ADMIN, "content-type": "application/merge-patch+json"},
    )
    assert bad_patch.status_code == 400
    assert client.get(f"/things/{PI}").json()["ramKB"] == 512  # the stored TD is untouched


@pytest.mark.parametrize("example", TD11_EXAMPLES, ids=lambda path: path.name)
def test_td_1_1_examples_are_stored_listed_and_found_yet_never_eligible(
    client: TestClient, registry: Registry, make_td: Callable[..., bytes], example: Path
) -> None:
    """WoT Discovery: a directory stores every valid TD 1.1; the fleet's requirements (RAM,
    flash) are for devices that register to train, so a Thing without them takes no job."""
    body = example.read_bytes()
    td = json.loads(body)
    if "id" in td:
        created = client.put(f"/things/{td['id']}", content=body, headers=ADMIN)
        thing = td["id"]
    else:
        created = client.post("/things", content=body, headers=ADMIN)
        thing = created.headers.get("location", "").removeprefix("/things/")
    assert created.status_code == 201, created.text
    assert client.put(f"/things/{PI}", content=make_td(), headers=ADMIN).status_code == 201
    assert sorted(listed["id"] for listed in client.get("/things").json()) == sorted([thing, PI])
    stored = client.get(f"/things/{thing}").json()
    assert {key: stored[key] for key in td if key != "id"} == {key: td[key] for key in td if key != "id"}
    query = f"SELECT ?thing WHERE {{ GRAPH ?thing {{ ?thing <{TITLE}> {json.dumps(td['title'])} }} }}"
    found = client.get("/search/sparql", params={"query": query}).json()["results"]["bindings"]
    assert [row["thing"]["value"] for row in found] == [thing]
    assert registry.eligible("eligible-devices") == registry.eligible(EVERY_GRAPH) == [PI]
    with pytest.raises(DescriptionInvalid) as refused:  # as gRPC Register judges it
        registry.prepare(body, "application/td+json", thing_id=thing, for_training=True)
    assert {p.path.split()[-1] for p in refused.value.errors} == {"tf:ramKB", "tf:flashKB"}


def test_a_device_described_again_without_the_fleets_facts_leaves_every_job(
    client: TestClient, registry: Registry, make_td: Callable[..., bytes]
) -> None:
    assert client.put(f"/things/{PI}", content=make_td(), headers=ADMIN).status_code == 201
    assert registry.eligible(EVERY_GRAPH) == [PI]
    plain = {**json.loads((TD11_EXAMPLES[0].parent / "example-1-lamp.td.json").read_bytes()), "id": PI}
    assert client.put(f"/things/{PI}", content=json.dumps(plain), headers=ADMIN).status_code == 204
    assert registry.eligible(EVERY_GRAPH) == registry.eligible("eligible-devices") == []
    assert client.put(f"/things/{PI}", content=make_td(), headers=ADMIN).status_code == 204
    assert registry.eligible(EVERY_GRAPH) == [PI]


def test_a_td_breaking_the_td_1_1_schema_is_refused_naming_each_json_path(client: TestClient) -> None:
    td = json.loads((TD11_EXAMPLES[0].parent / "example-1-lamp.td.json").read_bytes())
    td["properties"]["status"]["type"] = "text"
    td["securityDefinitions"]["basic_sc"]["in"] = "nowhere"
    del td["title"]
    response = client.put(f"/things/{td['id']}", content=json.dumps(td), headers=ADMIN)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    errors = {e["path"]: e["message"] for e in response.json()["validationErrors"]}
    assert errors == {
        "/properties/status/type": "'text' is not one of ['boolean', 'integer', 'number', 'string', "
        "'object', 'array', 'null'] (TD 1.1 JSON Schema)",
        "/securityDefinitions/basic_sc/in": "'nowhere' is not one of ['header', 'query', 'body', 'cookie', "
        "'auto'] (TD 1.1 JSON Schema)",
        "/title": "missing (required by the TD 1.1 JSON Schema)",
    }
    assert client.get("/things").json() == []


def test_writes_need_the_admin_token_or_the_devices_own_signature(
    client: TestClient, make_td: Callable[..., bytes]
) -> None:
    body = make_td()
    assert (
        client.put(f"/things/{PI}", content=body, headers={"content-type": "application/td+json"}).status_code
        == 401
    )
    own = _signed_by_pi("PUT", f"/things/{PI}", body)
    assert client.put(f"/things/{PI}", content=body, headers=own).status_code == 201
    other = "urn:tinyfleet:device:pi-02"
    by_pi = _signed_by_pi("PUT", f"/things/{other}", make_td("pi-02"))
    assert client.put(f"/things/{other}", content=make_td("pi-02"), headers=by_pi).status_code == 401
    assert client.delete(f"/things/{PI}", headers=_signed_by_pi("DELETE", f"/things/{PI}")).status_code == 204
    anonymous = json.loads(make_td())
    del anonymous["id"]
    posted = _signed_by_pi("POST", "/things", json.dumps(anonymous).encode())
    assert client.post("/things", content=json.dumps(anonymous), headers=posted).status_code == 401
    created = client.post("/things", content=json.dumps(anonymous), headers=ADMIN)
    assert created.status_code == 201 and created.headers["location"].startswith("/things/urn:uuid:")
    assert client.get(created.headers["location"]).json()["title"] == "pi-01"
    with_id = client.post("/things", content=make_td(), headers=ADMIN)
    assert with_id.status_code == 400


def test_guessing_the_admin_token_on_post_things_is_limited_per_peer(
    registry: Registry, make_td: Callable[..., bytes]
) -> None:
    """POST /things (admin only) counts wrong tokens in the limiter it is given, as PUT does."""
    limiter = FailedAuthLimiter()
    app = registry_app(registry, access=Access(admin_token=TOKEN, auth_failures=limiter))
    anonymous = json.loads(make_td())
    del anonymous["id"]
    body = json.dumps(anonymous)
    with TestClient(app) as client:
        for n in range(MAX_FAILURES):
            guess = client.post("/things", content=body, headers={**ADMIN, "authorization": f"Bearer g{n}"})
            assert guess.status_code == 401 and "wrong admin token" in guess.json()["detail"]
        blocked = client.post("/things", content=body, headers=ADMIN)
        assert blocked.status_code == 429 and 1 <= int(blocked.headers["retry-after"]) <= 60
        assert "too many failed authentication attempts" in blocked.json()["detail"]
        assert client.get("/things").json() == []


def test_listing_pages_with_link_next(client: TestClient, make_td: Callable[..., bytes]) -> None:
    for i in range(5):
        client.put(f"/things/urn:tinyfleet:device:d{i}", content=make_td(f"d{i}"), headers=ADMIN)
    first = client.get("/things", params={"limit": 2})
    assert [td["id"] for td in first.json()] == ["urn:tinyfleet:device:d0", "urn:tinyfleet:device:d1"]
    assert first.headers["link"] == '</things?offset=2&limit=2>; rel="next"'
    last = client.get("/things", params={"offset": 4, "limit": 2})
    assert [td["id"] for td in last.json()] == ["urn:tinyfleet:device:d4"] and "link" not in last.headers
    assert client.get("/things", params={"limit": 0}).status_code == 400


def test_ttl_expiry_search_and_well_known(
    client: TestClient, registry: Registry, make_td: Callable[..., bytes]
) -> None:
    td = json.loads(make_td())
    td["registration"] = {"ttl": 1}
    client.put(f"/things/{PI}", content=json.dumps(td), headers=ADMIN)
    assert client.get(f"/things/{PI}").json()["registration"]["ttl"] == 1
    found = client.get(
        "/search/sparql", params={"query": "SELECT ?d WHERE { ?d a <https://w3id.org/tinyfleet#Device> }"}
    )
    assert [b["d"]["value"] for b in found.json()["results"]["bindings"]] == [PI]
    assert registry.purge_expired() == []
    assert registry.purge_expired(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)) == [PI]
    assert client.get(f"/things/{PI}").status_code == 404
    directory = client.get("/.well-known/wot").json()
    assert directory["@type"] == "ThingDirectory" and "things" in directory["properties"]


@pytest.fixture
def served(registry: Registry) -> Iterator[str]:
    """The registry app on a real uvicorn bound to 127.0.0.1 (a free port), stopped after the test."""
    app = registry_app(registry, access=Access(admin_token=TOKEN))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_real_server_answers_sparql_and_streams_events(served: str, make_td: Callable[..., bytes]) -> None:
    events: list[tuple[str, str]] = []
    subscribed = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{served}/events", timeout=10) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            name = ""
            for line in response.iter_lines():
                if line.startswith(": connected"):
                    subscribed.set()
                elif line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])["id"]))
                    if len(events) == 3:
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert subscribed.wait(10)
    with httpx.Client(base_url=served, headers=ADMIN, timeout=10) as http:
        assert http.put(f"/things/{PI}", content=make_td()).status_code == 201
        assert http.put(f"/things/{PI}", content=make_td(ram_kb=64)).status_code == 204
        answer = http.get(
            "/sparql", params={"query": "SELECT ?r WHERE { ?d <https://w3id.org/tinyfleet#ramKB> ?r }"}
        )
        assert answer.json()["results"]["bindings"][0]["r"]["value"] == "64"
        assert http.delete(f"/things/{PI}").status_code == 204
    listener.join(timeout=10)
    assert events == [("thing_created", PI), ("thing_updated", PI), ("thing_deleted", PI)]
