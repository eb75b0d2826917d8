"""An admin's SPARQL Update goes through SQL like every other change (issue 10, row 11): it is
applied in order by the projector, kept by `registry rebuild`, and one the store refuses
neither stops the changes after it nor reports success."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tinyfleet.cli import main
from tinyfleet.server.database import default_url
from tinyfleet.simulations.local_fleet import LocalFleet

TOKEN = "updates-admin-token"
NOTE = "<urn:ops:pi-7> <urn:ops:note> \"fan replaced\""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path, admin_token=TOKEN) as running:
        running.start_server()
        yield running


def _update(fleet: LocalFleet, text: str) -> httpx.Response:
    return httpx.post(
        f"http://{fleet.http_address}/sparql", content=text,
        headers={"content-type": "application/sparql-update", "authorization": f"Bearer {TOKEN}"},
    )


def _notes(fleet: LocalFleet) -> list[str]:
    query = "SELECT ?note WHERE { GRAPH <urn:ops> { <urn:ops:pi-7> <urn:ops:note> ?note } } ORDER BY ?note"
    answer = httpx.get(f"http://{fleet.http_address}/sparql", params={"query": query})
    answer.raise_for_status()
    return [row["note"]["value"] for row in answer.json()["results"]["bindings"]]


def _recorded(data_dir: Path) -> int:
    engine = sa.create_engine(default_url(data_dir))
    try:
        with engine.connect() as conn:
            return int(conn.execute(
                sa.text("SELECT count(*) FROM outbox WHERE kind = 'registry.updated'")
            ).scalar() or 0)
    finally:
        engine.dispose()


def test_an_admin_update_is_kept_by_a_rebuild(fleet: LocalFleet) -> None:
    assert _update(fleet, f"INSERT DATA {{ GRAPH <urn:ops> {{ {NOTE} }} }}").status_code == 204
    # one ending with ';', one with a comment: each still joined to the sequence it is recorded with
    second = _update(fleet, "PREFIX o: <urn:ops:> INSERT DATA {GRAPH <urn:ops> {o:pi-7 o:note 'checked'}};")
    assert second.status_code == 204, second.text
    assert _update(fleet, "INSERT DATA { GRAPH <urn:ops> { <urn:a> <urn:b> 1 } } # done").status_code == 204
    assert _notes(fleet) == ["checked", "fan replaced"]
    assert _recorded(fleet.data_dir) == 3

    fleet.kill_server(signal.SIGTERM)
    assert main(["registry", "rebuild", "--data-dir", str(fleet.data_dir)]) == 0
    fleet.start_server()
    assert _notes(fleet) == ["checked", "fan replaced"]


def test_a_refused_update_says_so_and_does_not_hold_up_later_changes(fleet: LocalFleet) -> None:
    assert _update(fleet, "CREATE GRAPH <urn:made>").status_code == 204
    refused = _update(fleet, "CREATE GRAPH <urn:made>")
    assert refused.status_code == 400
    assert refused.json()["title"] == "Update refused"
    assert "already exists" in refused.json()["detail"]
    assert _update(fleet, f"INSERT DATA {{ GRAPH <urn:ops> {{ {NOTE} }} }}").status_code == 204
    assert _notes(fleet) == ["fan replaced"]


def test_bad_text_is_refused_before_anything_is_stored(fleet: LocalFleet) -> None:
    bad = _update(fleet, "INSERT DATA { GRAPH <urn:ops> { <urn:a> <urn:b> } }")
    assert bad.status_code == 400 and bad.json()["title"] == "SPARQL syntax error"
    assert _recorded(fleet.data_dir) == 0


def test_an_update_that_drops_everything_is_applied_once(fleet: LocalFleet) -> None:
    assert _update(fleet, f"INSERT DATA {{ GRAPH <urn:ops> {{ {NOTE} }} }}").status_code == 204
    assert _update(fleet, "DROP ALL").status_code == 204
    # the projector recorded the DROP's sequence after it ran: later writes are not wiped again
    assert _update(fleet, f"INSERT DATA {{ GRAPH <urn:ops> {{ {NOTE} }} }}").status_code == 204
    health = httpx.get(f"http://{fleet.http_address}/healthz").json()
    assert health["outbox"]["lag"] == 0
    assert _notes(fleet) == ["fan replaced"]
