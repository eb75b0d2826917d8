"""Device descriptions: check that what an agent registers parses and names its device.

`describe_device(description, media_type) -> (device_id, normalized)` is the hook
the registry replaces with SHACL validation (pass another function with the same
signature to the coordinator). This baseline accepts a W3C WoT Thing Description
in JSON(-LD) with an "id", or Turtle whose device is the one subject typed as a
Thing/Device (any vocabulary) or, failing that, the one subject with a td:title.
Every rejection raises DescriptionError naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

JSON_MEDIA_TYPES = {"application/td+json", "application/ld+json", "application/json"}
TURTLE_MEDIA_TYPES = {"text/turtle", "application/x-turtle"}
TD_NS = "https://www.w3.org/2019/wot/td#"
_DEVICE_CLASS_NAMES = {"thing", "device"}

DescribeDevice = Callable[[bytes, str], tuple[str, bytes]]
#: Many descriptions at once (concurrent registrations): per item (device id, description to
#: store) or the DescriptionError refusing it, each judged as `DescribeDevice` would alone.
DescribeDevices = Callable[[Sequence[tuple[bytes, str]]], list["tuple[str, bytes] | DescriptionError"]]


class DescriptionError(ValueError):
    """A device description that cannot be registered; the message says why."""


def describe_device(description: bytes, media_type: str) -> tuple[str, bytes]:
    """Return (device id, description to store) or raise DescriptionError."""
    if not description.strip():
        raise DescriptionError("description is empty")
    kind = (media_type or "").split(";", 1)[0].strip().lower()
    if kind in JSON_MEDIA_TYPES:
        return _describe_json(description), description
    if kind in TURTLE_MEDIA_TYPES:
        return _describe_turtle(description), description
    known = ", ".join(sorted(JSON_MEDIA_TYPES | TURTLE_MEDIA_TYPES))
    raise DescriptionError(f"unsupported media type {media_type!r}; use one of: {known}")


def describe_each(describe: DescribeDevice) -> DescribeDevices:
    """A DescribeDevices that calls `describe` on each description."""

    def describe_all(items: Sequence[tuple[bytes, str]]) -> list[tuple[str, bytes] | DescriptionError]:
        results: list[tuple[str, bytes] | DescriptionError] = []
        for description, media_type in items:
            try:
                results.append(describe(description, media_type))
            except DescriptionError as exc:
                results.append(exc)
        return results

    return describe_all


def _describe_json(description: bytes) -> str:
    try:
        document = json.loads(description)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DescriptionError(f"Thing Description is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise DescriptionError("Thing Description must be a JSON object")
    device_id = document.get("id", document.get("@id"))
    if not isinstance(device_id, str) or not device_id.strip():
        raise DescriptionError("Thing Description has no \"id\" (the device's IRI, e.g. urn:dev:...)")
    return device_id.strip()


def _describe_turtle(description: bytes) -> str:
    from rdflib import RDF, Graph, URIRef

    graph = Graph()
    try:
        graph.parse(data=description.decode("utf-8"), format="turtle")
    except Exception as exc:  # rdflib raises parser-specific types
        raise DescriptionError(f"Turtle description does not parse: {exc}") from exc
    typed = {
        subject
        for subject, cls in graph.subject_objects(RDF.type)
        if isinstance(subject, URIRef) and _local_name(str(cls)).lower() in _DEVICE_CLASS_NAMES
    }
    titled = {s for s in graph.subjects(URIRef(TD_NS + "title")) if isinstance(s, URIRef)}
    candidates = typed or titled
    if not candidates:
        raise DescriptionError(
            "Turtle description names no device: expected one IRI subject typed td:Thing "
            "(or a *Device class) or carrying td:title"
        )
    if len(candidates) > 1:
        names = ", ".join(sorted(str(c) for c in candidates))
        raise DescriptionError(f"Turtle description names several devices ({names}); expected one")
    return str(next(iter(candidates)))


def _local_name(iri: str) -> str:
    return iri.rsplit("#", 1)[-1].rsplit("/", 1)[-1]
