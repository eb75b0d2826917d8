"""Fixtures for the coordinator tests: databases (SQLite always, PostgreSQL when reachable)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tinyfleet.server.database import default_url, make_engine, upgrade

PG_URL = os.environ.get("TINYFLEET_TEST_PG", "")


def _pg_schema() -> Iterator[str]:
    """A fresh schema in the TINYFLEET_TEST_PG database, dropped afterwards."""
    if not PG_URL:
        pytest.skip("PostgreSQL tests need TINYFLEET_TEST_PG "
                    "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)")
    schema = f"tf_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL at TINYFLEET_TEST_PG not reachable: {exc.orig}")
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _pg_engine_in_fresh_schema() -> Iterator[sa.Engine]:
    for schema in _pg_schema():
        engine = make_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose connections use a fresh, private schema (for the daemon's --db)."""
    for schema in _pg_schema():
        separator = "&" if "?" in PG_URL else "?"
        yield f"{PG_URL}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine on an empty database of each supported kind."""
    if request.param == "sqlite":
        engine = make_engine(default_url(tmp_path))
        yield engine
        engine.dispose()
    else:
        yield from _pg_engine_in_fresh_schema()


@pytest.fixture
def engine(empty_engine: sa.Engine) -> sa.Engine:
    """A migrated database of each supported kind."""
    upgrade(empty_engine)
    return empty_engine
