"""The agent's device description: the file it registers with, or one made for its host.

A description is a W3C WoT Thing Description (TD 1.1, JSON-LD) or the same facts
in Turtle. The agent sends it to the coordinator as given; here it is judged by the
rules the coordinator applies first (common.device_description: the TD 1.1 schema,
which subject is the device), so a typo fails on the device with the file and the
problem named, not as a rejected registration. The fleet's requirements (RAM,
flash, class: the SHACL shapes) are checked by the coordinator alone.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tinyfleet.common.device_description import (
    DEVICE_CLASSES,
    MEDIA_TD_JSON,
    MEDIA_TURTLE,
    DescriptionInvalid,
    device_iri,
    device_thing_description,
    read_device_id,
)

_JSON_SUFFIXES: Final = {".json", ".jsonld"}
_TURTLE_SUFFIXES: Final = {".ttl"}


class DescriptionError(ValueError):
    """A description that cannot be registered; the message names the file and the problem."""


@dataclass(frozen=True)
class Description:
    data: bytes
    media_type: str
    device_id: str
    source: str


def media_type_for(path: Path, data: bytes) -> str:
    """By extension first (.json/.jsonld, .ttl); otherwise JSON if it starts with '{'."""
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        return MEDIA_TD_JSON
    if suffix in _TURTLE_SUFFIXES:
        return MEDIA_TURTLE
    return MEDIA_TD_JSON if data.lstrip()[:1] == b"{" else MEDIA_TURTLE


def load_description(path: str | Path) -> Description:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DescriptionError(f"{path}: cannot read device description: {exc.strerror}") from exc
    return parse_description(data, media_type_for(path, data), source=str(path))


def parse_description(data: bytes, media_type: str, *, source: str = "<description>") -> Description:
    try:
        device_id = read_device_id(data, media_type)
    except DescriptionInvalid as exc:
        raise DescriptionError(f"{source}: {exc.summary}") from exc
    return Description(data=data, media_type=media_type, device_id=device_id, source=source)


def host_resources(path: str | Path = "/") -> dict[str, Any]:
    """RAM, storage and CPU of the machine the agent runs on, in the units the fleet uses."""
    ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "ram_kb": ram_bytes // 1024,
        "flash_kb": shutil.disk_usage(path).total // 1024,
        "cpu": platform.machine() or "unknown",
        "cpu_cores": os.cpu_count() or 1,
    }


def minimal_thing_description(
    device_id: str,
    ram_kb: int | None = None,
    flash_kb: int | None = None,
    cpu: str | None = None,
    device_class: str = "sbc",
    cpu_cores: int | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """The fleet's TD (`device_thing_description`) for a device known by id and resources.

    Resources not given are measured on this host (`host_resources`), so a
    generated description never claims numbers nobody measured. Values the fleet
    shapes would refuse are refused here (tests/test_device_description.py holds the
    two to the same bounds), so a bad command-line value fails before registering.
    """
    if not device_id.strip():
        raise DescriptionError("device id is empty")
    host = host_resources() if None in (ram_kb, flash_kb, cpu, cpu_cores) else {}
    ram_kb = host["ram_kb"] if ram_kb is None else ram_kb
    flash_kb = host["flash_kb"] if flash_kb is None else flash_kb
    cpu_cores = host["cpu_cores"] if cpu_cores is None else cpu_cores
    if device_class not in DEVICE_CLASSES:
        raise DescriptionError(f"device class {device_class!r} is not one of {', '.join(DEVICE_CLASSES)}")
    if not ram_kb > 0:
        raise DescriptionError(f"ram_kb must be positive, got {ram_kb}")
    if not flash_kb >= 0:
        raise DescriptionError(f"flash_kb must be at least 0, got {flash_kb}")
    if not cpu_cores >= 1:
        raise DescriptionError(f"cpu_cores must be at least 1, got {cpu_cores}")
    return device_thing_description(
        device_iri(device_id.strip()), title=title or device_id.strip(), ram_kb=ram_kb, flash_kb=flash_kb,
        cpu=host["cpu"] if cpu is None else cpu, cpu_cores=cpu_cores, device_class=device_class,
    )


def minimal_description(device_id: str, **resources: Any) -> Description:
    """`minimal_thing_description` as the bytes the agent registers with."""
    td = minimal_thing_description(device_id, **resources)
    data = json.dumps(td, indent=2).encode()
    return Description(data=data, media_type=MEDIA_TD_JSON, device_id=td["id"], source="<generated>")
