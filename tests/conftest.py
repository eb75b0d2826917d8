"""Shared fixtures: process-wide Flower identity and the real-data folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("TINYFLEET_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _flower_identity() -> None:
    from tinyfleet.common.flower_adapter import ensure_task_identity

    ensure_task_identity()


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A test that sets torch's thread count (e.g. `sim run --threads 1`) must not change the
    numbers of the tests after it: more threads sum in another order."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """The real datasets; tests that need them skip with the path they looked for."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (set TINYFLEET_DATA)")
    return SHARED_DATA
