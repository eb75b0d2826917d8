"""Imported documents live in SQL: a rebuild keeps them, a re-import replaces them, HTTP imports too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tinyfleet.cli import main
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.registry.daemon_plugin import CoordinatorRegistry
from tinyfleet.server.registry.projector import rebuild
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry
from tinyfleet.server.repository import Repository
from tinyfleet.server.schema import imported_documents, outbox

from .test_importer import QUIRKY_BOARD, QUIRKY_MODELS

BOARD = "https://example.org/boards/quirky-1"
TOKEN = "admin-token"


def _compatible(fleet: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    args = ["query", "--data-dir", str(fleet), "--named", "compatible-models", "--param", f"device={BOARD}"]
    assert main([*args, "--format", "json"]) == 0
    return [row["name"] for row in json.loads(capsys.readouterr().out)]


def _quads(fleet: Path) -> int:
    store = EmbeddedStore(fleet / "registry")
    try:
        return len(store.oxigraph)
    finally:
        store.close()


def test_imports_survive_a_rebuild_and_re_importing_replaces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "board.ttl").write_text(QUIRKY_BOARD)
    (tmp_path / "models.ttl").write_text(QUIRKY_MODELS)
    fleet = tmp_path / "fleet"
    files = [str(tmp_path / "board.ttl"), str(tmp_path / "models.ttl")]
    assert main(["registry", "import", *files, "--data-dir", str(fleet)]) == 0
    assert "skolemized 6 blank node(s)" in capsys.readouterr().err  # the board's; the models have none
    assert _compatible(fleet, capsys) == ["fits"]
    before = _quads(fleet)

    assert main(["registry", "import", files[0], "--data-dir", str(fleet)]) == 0  # the same file again
    capsys.readouterr()
    assert _quads(fleet) == before  # its graphs replaced, nothing added
    engine = open_database(default_url(fleet))
    with engine.connect() as conn:
        names = conn.execute(sa.select(imported_documents.c.name).order_by(imported_documents.c.id)).all()
        kinds = conn.execute(sa.select(outbox.c.kind, outbox.c.subject).order_by(outbox.c.seq)).all()
    engine.dispose()
    assert [n for (n,) in names] == ["board.ttl", "models.ttl"]
    assert kinds == [
        ("document.imported", "board.ttl"),
        ("document.imported", "models.ttl"),
        ("document.imported", "board.ttl"),
    ]

    assert main(["registry", "rebuild", "--data-dir", str(fleet)]) == 0
    out, err = capsys.readouterr()
    assert "2 imported document(s)" in out and "outbox sequence 3" in out
    assert "repaired malformed class name" in err and "repaired relative IRI" in err
    assert _compatible(fleet, capsys) == ["fits"]
    assert _quads(fleet) == before


def test_a_document_that_fails_validation_is_not_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.ttl"
    broken.write_text(QUIRKY_BOARD.replace("kilobyte ; schema:value 200", "megabyte ; schema:value 200"))
    fleet = tmp_path / "fleet"
    assert main(["registry", "import", str(broken), "--data-dir", str(fleet)]) == 1
    assert "om:kilobyte" in capsys.readouterr().err
    repo = Repository(open_database(default_url(fleet)))
    assert repo.list_imported_documents() == [] and repo.outbox_since(0) == []
    repo.engine.dispose()


def test_imports_through_the_daemon_api_are_kept_in_sql(tmp_path: Path) -> None:
    repo = Repository(open_database(default_url(tmp_path)))
    owner = CoordinatorRegistry(Registry(EmbeddedStore(None)), admin_token=TOKEN)
    owner.recover(repo)
    admin = {"authorization": f"Bearer {TOKEN}", "content-type": "text/turtle"}
    url = "/registry/imports"
    with TestClient(Starlette(routes=owner.routes())) as client:
        refused = client.post(url, params={"name": "board.ttl"}, content=QUIRKY_BOARD)
        assert refused.status_code == 401 and "importing needs the admin token" in refused.json()["detail"]
        wrong_type = client.post(url, params={"name": "board.ttl"}, content=QUIRKY_BOARD, headers={
            **admin, "content-type": "application/json"})
        assert wrong_type.status_code == 415
        no_base = client.post(url, params={"name": "models.ttl"}, content=QUIRKY_MODELS, headers=admin)
        assert no_base.status_code == 400
        assert [e["path"] for e in no_base.json()["validationErrors"]] == ["base"]
        answer = client.post(url, params={"name": "board.ttl"}, content=QUIRKY_BOARD, headers=admin)
        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["devices"] == [BOARD] and report["base"] == BOARD + "/"
        assert {r["kind"] for r in report["repairs"]} == {"S3N namespace", "malformed class name"}
        assert report["skolemizedBlankNodes"] == 6
        models = client.post(
            url, params={"name": "models.ttl", "base": "https://example.org/nn/"}, content=QUIRKY_MODELS,
            headers=admin,
        )
        assert models.status_code == 200, models.text
    assert [d.name for d in repo.list_imported_documents()] == ["board.ttl", "models.ttl"]
    assert owner.registry.exists(BOARD)

    fresh = Registry(EmbeddedStore(None))  # what `registry rebuild` does, from SQL alone
    applied = rebuild(fresh, repo)
    assert applied.documents == 2
    fits = fresh.named("compatible-models", {"device": BOARD})
    assert [row["name"].value for row in fits] == ["fits"]
    assert fresh.last_applied_seq() == owner.registry.last_applied_seq()
    repo.engine.dispose()
