"""Every meta-learning test starts with Flower's task identity set, no shared data streams
left over from another test (streams are shared per spec within a process), and one torch
thread: the numbers these tests compare are then the same on any machine, whatever its core
count (with more threads torch sums in an order that depends on how many)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tinyfleet.client.data_sources import close_shared_sources
from tinyfleet.common.flower_adapter import ensure_task_identity


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # for module fixtures too (an unstopped reference run)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_streams() -> Iterator[None]:
    ensure_task_identity()
    close_shared_sources()
    yield
    close_shared_sources()
