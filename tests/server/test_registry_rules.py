"""The coordinator of these tests judges Register as `tinyfleet server start` does (the registry's
rules), and the agent's pre-check names the same device it does."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tinyfleet.client.descriptions import parse_description

from .harness import CoordinatorThread, settings_for, signed_register

LAMP = Path(__file__).parents[1] / "registry" / "data" / "td-1.1" / "example-1-lamp.td.json"
SAREF_DEVICE = b"""@prefix td: <https://www.w3.org/2019/wot/td#> . @prefix tf: <https://w3id.org/tinyfleet#> .
<urn:dev:saref-1> a <https://saref.etsi.org/core/Device> ; td:title "s" ; tf:ramKB 256 ; tf:flashKB 1024 ."""


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorThread]:
    """One for the module's tests (each registers a device of its own)."""
    running = CoordinatorThread(settings_for(tmp_path_factory.mktemp("coord")))
    yield running
    running.stop()


def test_a_thing_without_the_fleets_requirements_cannot_register_to_train(
    coordinator: CoordinatorThread,
) -> None:
    """A valid TD 1.1 (the specification's lamp) is no fleet device: Register names what is missing."""
    lamp = json.loads(LAMP.read_bytes())["id"]
    agent = coordinator.agent(lamp)
    with pytest.raises(grpc.RpcError) as refused:
        agent.register(LAMP.read_bytes())
    agent.channel.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailer = {entry.key: entry.value for entry in refused.value.trailing_metadata() or ()}
    errors = json.loads(trailer["validation-errors"])
    assert sorted(error["path"].split()[-1] for error in errors) == ["tf:flashKB", "tf:ramKB"]
    assert coordinator.coordinator.repo.get_device(lamp) is None


def test_a_saref_device_registers_as_the_device_its_agent_names(coordinator: CoordinatorThread) -> None:
    named = parse_description(SAREF_DEVICE, "text/turtle").device_id
    agent = coordinator.agent(named)
    request = signed_register(SAREF_DEVICE, agent.key, 1, agent.enroll_token, "text/turtle")
    response = agent.stub.Register(request, timeout=10)
    agent.channel.close()
    assert (response.device_id, named) == ("urn:dev:saref-1", "urn:dev:saref-1")
