"""The coordinator most security tests talk to: in this process (CoordinatorThread), with the
admin token the test module names as TOKEN and the settings in its COORDINATOR_OPTIONS, if any."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server.harness import CoordinatorThread, settings_for


@pytest.fixture
def coordinator(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[CoordinatorThread]:
    options = getattr(request.module, "COORDINATOR_OPTIONS", {})
    running = CoordinatorThread(
        settings_for(tmp_path / "coord", admin_token=getattr(request.module, "TOKEN", None), **options)
    )
    try:
        yield running
    finally:
        running.stop()
