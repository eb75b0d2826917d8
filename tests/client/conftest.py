"""Fixtures: a fake coordinator (see fake_fleet.py) and agents wired to it in threads."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_fleet import WAIT_S, FakeFleet

from tinyfleet.client.agent import Agent, AgentConfig
from tinyfleet.client.descriptions import minimal_description
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.client.state_dir import StateDir


@pytest.fixture
def fleet() -> Iterator[FakeFleet]:
    fake = FakeFleet()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@dataclass
class RunningAgent:
    agent: Agent
    thread: threading.Thread
    state_dir: StateDir
    exit_code: list[int]

    def stop(self, timeout: float = WAIT_S) -> int:
        self.agent.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"
        return self.exit_code[0]

    def join(self, timeout: float = WAIT_S) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent still running"
        return self.exit_code[0]


@pytest.fixture
def start_agent(fleet: FakeFleet, tmp_path: Path) -> Iterator[Callable[..., RunningAgent]]:
    """Start an Agent in a thread against the fake fleet (fast backoff); stopped at teardown."""
    running: list[RunningAgent] = []

    def start(
        device_id: str = "urn:dev:pi-01",
        handlers: HandlerRegistry | None = None,
        state_dir: Path | None = None,
        data_spec: str | None = "sine:seed=1",
        welcome_timeout_s: float = WAIT_S,
        enroll_token: str = "",
    ) -> RunningAgent:
        description = minimal_description(device_id, ram_kb=4096, flash_kb=65536, cpu="cortex-a53")
        config = AgentConfig(
            server=fleet.address,
            state_dir=StateDir(state_dir or tmp_path / "state"),
            description=description,
            data_spec=data_spec,
            backoff_base_s=0.05,
            backoff_cap_s=0.2,
            welcome_timeout_s=welcome_timeout_s,
            enroll_token=enroll_token,
        )
        agent = Agent(config, handlers=handlers, rng=random.Random(0))
        exit_code: list[int] = []
        thread = threading.Thread(target=lambda: exit_code.append(agent.run()), daemon=True)
        thread.start()
        handle = RunningAgent(agent, thread, config.state_dir, exit_code)
        running.append(handle)
        return handle

    try:
        yield start
    finally:
        for handle in running:
            handle.agent.stop()
            handle.thread.join(WAIT_S)

