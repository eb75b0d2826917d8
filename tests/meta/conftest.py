"""Every meta-learning test starts with Flower's task identity set and no shared data streams
left over from another test (streams are shared per spec within a process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tinyfleet.client.data_sources import close_shared_sources
from tinyfleet.common.flower_adapter import ensure_task_identity


@pytest.fixture(autouse=True)
def _fresh_streams() -> Iterator[None]:
    ensure_task_identity()
    close_shared_sources()
    yield
    close_shared_sources()
