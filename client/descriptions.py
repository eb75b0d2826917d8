"""Device descriptions: loading the file an agent registers with, or making a minimal one.

A description is a W3C WoT Thing Description (TD 1.1, JSON-LD) or the same
facts in Turtle. The agent sends it to the coordinator as given (the registry
validates it against the fleet ontology); here we only make sure it parses and
names the device with an IRI, so a typo fails on the device with the file and
the problem named, not as a rejected registration.

Fleet terms use the namespace https://w3id.org/tinyfleet# with prefix "tf"
(tf:ramKB, tf:flashKB, tf:cpu, tf:cpuCores, tf:deviceClass).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

TD_CONTEXT: Final = "https://www.w3.org/2022/wot/td/v1.1"
TD_NS: Final = "https://www.w3.org/2019/wot/td#"
TF_NS: Final = "https://w3id.org/tinyfleet#"
MEDIA_TD_JSON: Final = "application/td+json"
MEDIA_TURTLE: Final = "text/turtle"
_JSON_SUFFIXES: Final = {".json", ".jsonld"}
_TURTLE_SUFFIXES: Final = {".ttl"}
#: tf:deviceClass values the fleet ontology allows.
DEVICE_CLASSES: Final = ("sbc", "mcu", "gateway")
_DEVICE_TYPE_NAMES: Final = {"thing", "device"}
_IRI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$")


class DescriptionError(ValueError):
    """A description file that cannot be registered; the message names the file and the problem."""


@dataclass(frozen=True)
class Description:
    data: bytes
    media_type: str
    device_id: str
    source: str

    @property
    def is_json(self) -> bool:
        return self.media_type == MEDIA_TD_JSON


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
    if media_type == MEDIA_TD_JSON:
        device_id = _json_device_id(data, source)
    elif media_type == MEDIA_TURTLE:
        device_id = _turtle_device_id(data, source)
    else:
        raise DescriptionError(
            f"{source}: unsupported media type {media_type!r}; use {MEDIA_TD_JSON} or {MEDIA_TURTLE}"
        )
    return Description(data=data, media_type=media_type, device_id=device_id, source=source)


def _json_device_id(data: bytes, source: str) -> str:
    try:
        td = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DescriptionError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DescriptionError(
            f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    if not isinstance(td, dict):
        raise DescriptionError(
            f"{source}: a Thing Description must be a JSON object, got {type(td).__name__}"
        )
    if "@context" not in td:
        raise DescriptionError(f"{source}: missing \"@context\" (a TD 1.1 uses {TD_CONTEXT!r})")
    device_id = td.get("id", td.get("@id"))
    if device_id is None:
        raise DescriptionError(f"{source}: missing \"id\"; the device needs an IRI such as urn:dev:pi-01")
    if not isinstance(device_id, str) or not _IRI.match(device_id):
        raise DescriptionError(
            f"{source}: \"id\" must be an absolute IRI (e.g. urn:dev:pi-01), got {device_id!r}"
        )
    return device_id


def _turtle_device_id(data: bytes, source: str) -> str:
    from rdflib import RDF, BNode, Graph, URIRef

    graph = Graph()
    try:
        graph.parse(data=data.decode("utf-8"), format="turtle")
    except UnicodeDecodeError as exc:
        raise DescriptionError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except Exception as exc:  # rdflib raises BadSyntax and assorted others for bad Turtle
        detail = " ".join(str(exc).split())
        raise DescriptionError(f"{source}: not valid Turtle: {detail}") from exc
    # As the coordinator decides (server/descriptions.py): the subject typed with a
    # Thing or Device class of any vocabulary (td:Thing, tf:Device, saref:Device, ...),
    # failing that the subject carrying td:title.
    typed = {s for s, cls in graph.subject_objects(RDF.type) if _local_name(str(cls)) in _DEVICE_TYPE_NAMES}
    titled = set(graph.subjects(URIRef(TD_NS + "title")))
    things = sorted(typed or titled, key=str)
    if not things:
        raise DescriptionError(
            f"{source}: no subject typed as a Thing or Device (td:Thing, tf:Device) and none "
            "with a td:title; which device is this?"
        )
    if len(things) > 1:
        raise DescriptionError(
            f"{source}: describes {len(things)} devices ({', '.join(map(str, things))}); "
            "register one description per device"
        )
    if isinstance(things[0], BNode):
        raise DescriptionError(
            f"{source}: the device is a blank node; give it an IRI such as <urn:dev:pi-01>"
        )
    return str(things[0])


def _local_name(iri: str) -> str:
    return iri.rsplit("#", 1)[-1].rsplit("/", 1)[-1].lower()


def device_iri(device_id: str) -> str:
    """'pi-01' -> 'urn:tinyfleet:device:pi-01'; an id that is already an IRI stays as it is."""
    return device_id if _IRI.match(device_id) else f"urn:tinyfleet:device:{device_id}"


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
    """A valid TD 1.1 for a device known only by id and resources (tests, demos, quick starts).

    Resources not given are measured on this host (`host_resources`), so a
    generated description never claims numbers nobody measured.
    """
    if not device_id.strip():
        raise DescriptionError("device id is empty")
    host = host_resources() if None in (ram_kb, flash_kb, cpu, cpu_cores) else {}
    ram_kb = host["ram_kb"] if ram_kb is None else ram_kb
    flash_kb = host["flash_kb"] if flash_kb is None else flash_kb
    cpu_cores = host["cpu_cores"] if cpu_cores is None else cpu_cores
    if device_class not in DEVICE_CLASSES:
        raise DescriptionError(f"device class {device_class!r} is not one of {', '.join(DEVICE_CLASSES)}")
    for name, value in (("ram_kb", ram_kb), ("flash_kb", flash_kb), ("cpu_cores", cpu_cores)):
        if value <= 0:
            raise DescriptionError(f"{name} must be positive, got {value}")
    iri = device_iri(device_id.strip())
    return {
        "@context": [TD_CONTEXT, {"tf": TF_NS}],
        "id": iri,
        "title": title or device_id,
        "securityDefinitions": {"nosec_sc": {"scheme": "nosec"}},
        "security": ["nosec_sc"],
        "tf:ramKB": int(ram_kb),
        "tf:flashKB": int(flash_kb),
        "tf:cpu": cpu if cpu is not None else host["cpu"],
        "tf:cpuCores": int(cpu_cores),
        "tf:deviceClass": device_class,
    }


def minimal_description(device_id: str, **resources: Any) -> Description:
    """`minimal_thing_description` as the bytes the agent registers with."""
    td = minimal_thing_description(device_id, **resources)
    data = json.dumps(td, indent=2).encode()
    return Description(data=data, media_type=MEDIA_TD_JSON, device_id=td["id"], source="<generated>")
