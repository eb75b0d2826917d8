"""Fixtures for registry tests: an in-memory registry and device descriptions made on the spot."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry


@pytest.fixture
def registry() -> Iterator[Registry]:
    opened = Registry(EmbeddedStore(None))
    yield opened
    opened.large_descriptions.close()  # its worker process, if a test made it validate one


@pytest.fixture
def make_td() -> Callable[..., bytes]:
    def make(name: str = "pi-01", **overrides: Any) -> bytes:  # device_thing_description's keywords
        fields: dict[str, Any] = {"title": name, "ram_kb": 512, "flash_kb": 4096, "device_class": "mcu"}
        fields.update(overrides)
        return json.dumps(device_thing_description(f"urn:tinyfleet:device:{name}", **fields)).encode()

    return make
