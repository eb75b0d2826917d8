"""`tinyfleet registry ...` and `tinyfleet query ...`, run in-process on a data directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tinyfleet.cli import main
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.repository import Repository

from .test_importer import QUIRKY_BOARD, QUIRKY_MODELS


def test_import_query_export_and_named_queries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "board.ttl").write_text(QUIRKY_BOARD)
    (tmp_path / "models.ttl").write_text(QUIRKY_MODELS)
    fleet = tmp_path / "fleet"
    assert (
        main(
            [
                "registry",
                "import",
                str(tmp_path / "board.ttl"),
                str(tmp_path / "models.ttl"),
                "--data-dir",
                str(fleet),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "malformed class name" in err and "1 device(s)" in err
    assert (
        main(
            [
                "query",
                "--data-dir",
                str(fleet),
                "--named",
                "compatible-models",
                "--param",
                "device=https://example.org/boards/quirky-1",
                "--format",
                "json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["fits"]
    assert (
        main(["query", "--data-dir", str(fleet), "--format", "csv", "SELECT ?d WHERE { ?d a tf:Device }"])
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["d", "https://example.org/boards/quirky-1"]
    assert main(["registry", "export", "--data-dir", str(fleet), "-o", str(tmp_path / "out.nq")]) == 0
    assert "<https://example.org/nn/fits>" in (tmp_path / "out.nq").read_text()
    assert main(["registry", "queries"]) == 0
    assert "compatible-models" in capsys.readouterr().out


def test_errors_are_named_and_exit_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = tmp_path / "fleet"
    assert main(["query", "--data-dir", str(fleet), "SELECT ?x"]) == 2
    assert "no registry at" in capsys.readouterr().err
    (tmp_path / "board.ttl").write_text(QUIRKY_BOARD)
    main(["registry", "import", str(tmp_path / "board.ttl"), "--data-dir", str(fleet)])
    capsys.readouterr()
    assert main(["query", "--data-dir", str(fleet), "SELECT ?x WHERE {"]) == 2
    assert "SPARQL syntax error" in capsys.readouterr().err
    assert main(["query", "--data-dir", str(fleet), "--named", "compatible-models"]) == 2
    assert "needs parameter 'device'" in capsys.readouterr().err


def test_validate_reports_each_problem(
    tmp_path: Path, make_td: Callable[..., bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "pi.td.json"
    good.write_bytes(make_td())
    assert main(["registry", "validate", str(good)]) == 0
    assert "valid description of urn:tinyfleet:device:pi-01" in capsys.readouterr().out
    bad = tmp_path / "bad.td.json"
    bad.write_bytes(make_td(ram_kb=-5))
    assert main(["registry", "validate", str(bad)]) == 1
    assert "tf:ramKB" in capsys.readouterr().out


def test_rebuild_from_sql_replaces_the_store(
    tmp_path: Path, make_td: Callable[..., bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet"
    assert main(["registry", "rebuild", "--data-dir", str(fleet)]) == 2
    assert "no coordinator database" in capsys.readouterr().err
    fleet.mkdir()
    repo = Repository(open_database(default_url(fleet)))
    repo.create_device("urn:tinyfleet:device:a", 5, make_td("a"), "application/td+json")
    repo.engine.dispose()
    assert main(["registry", "rebuild", "--data-dir", str(fleet)]) == 0
    assert "1 device description(s)" in capsys.readouterr().out
    assert main(["registry", "rebuild", "--data-dir", str(fleet)]) == 0  # over an existing store
    capsys.readouterr()
    assert main(["query", "--data-dir", str(fleet), "--format", "csv", "--named", "devices"]) == 0
    assert "urn:tinyfleet:device:a" in capsys.readouterr().out
    assert sorted(p.name for p in fleet.iterdir() if p.name.startswith("registry")) == ["registry"]
