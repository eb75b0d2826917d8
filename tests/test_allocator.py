"""The allocator tuning really stops a training step's buffers from faulting in afresh."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    from tinyfleet.common.allocator import keep_freed_memory
    from tinyfleet.common.models import build_model

    torch.set_num_threads(1)
    if sys.argv[1] == "tuned":
        assert keep_freed_memory()
    model = build_model("omniglot-conv4", seed=0, ways=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(10, 1, 28, 28), torch.randint(0, 5, (10,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
    """
)


def faults_per_step(mode: str) -> float:
    # glibc raises its mmap threshold by itself after freeing a large mapped block, on some runs
    # and not others (a default process faulted 95 times a step in one CI run, ~2,000 in others);
    # the reference pins the threshold at glibc's starting value so it is the same every run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if mode == "default" else None
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_training_steps_reuse_freed_buffers_instead_of_faulting_them_in() -> None:
    default, tuned = faults_per_step("default"), faults_per_step("tuned")
    assert default > 200  # glibc hands the activations back and maps them in again every step
    assert tuned < default / 10
