"""W3C WoT Thing Descriptions (JSON-LD) and Turtle descriptions <-> RDF triples.

JSON-LD goes through pyoxigraph's JSON-LD parser. Its remote contexts (the TD
1.1 context, tinyfleet's) are replaced by the copies shipped in
tinyfleet.ontology before parsing, so registration works offline and never
fetches a URL a device chose. A context URL tinyfleet does not ship is an
error naming it. Term definitions that carry a scoped context of their own
(the TD context's `properties`, `actions`, `forms`, ...) are left out when the
description never uses the term: JSON-LD expansion only reads a definition for
a key or value that names it, so the triples are the same, and processing those
scoped contexts was most of the cost of parsing a small device TD.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any, Final

import pyoxigraph as ox

from tinyfleet.ontology import TD_CONTEXT_URLS, TINYFLEET_CONTEXT_URL, known_contexts, local_context
from tinyfleet.server.descriptions import DEFAULT_MAX_JSON_DEPTH, iri_problem, json_depth_problem

JSON_MEDIA_TYPES: Final = frozenset({"application/td+json", "application/ld+json", "application/json"})
TURTLE_MEDIA_TYPES: Final = frozenset({"text/turtle", "application/x-turtle"})


class DescriptionSyntaxError(ValueError):
    """A description that does not parse; `path` says where (JSON pointer or line:column)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def media_kind(media_type: str) -> str:
    """'json' or 'turtle' for a Content-Type; anything else raises DescriptionSyntaxError."""
    base = (media_type or "").split(";", 1)[0].strip().lower()
    if base in JSON_MEDIA_TYPES:
        return "json"
    if base in TURTLE_MEDIA_TYPES:
        return "turtle"
    known = ", ".join(sorted(JSON_MEDIA_TYPES | TURTLE_MEDIA_TYPES))
    raise DescriptionSyntaxError("", f"unsupported media type {media_type!r}; use one of: {known}")


def parse_json(data: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """JSON text -> value; nesting deeper than `max_depth` is refused before json.loads
    (which recurses once per level) ever sees it."""
    too_deep = json_depth_problem(data, max_depth)
    if too_deep is not None:
        raise DescriptionSyntaxError("", too_deep)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DescriptionSyntaxError("", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DescriptionSyntaxError(f"line {exc.lineno}:{exc.colno}", f"not valid JSON: {exc.msg}") from exc


def load_json(data: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """A Thing Description's JSON object (see `parse_json`)."""
    document = parse_json(data, max_depth)
    if not isinstance(document, dict):
        raise DescriptionSyntaxError(
            "/", f"a Thing Description is a JSON object, not {type(document).__name__}"
        )
    return document


def with_local_contexts(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of the TD whose `@context` URLs are replaced by the shipped context objects."""
    result = dict(document)  # only "@context" is replaced; nothing else is touched
    contexts = result.get("@context")
    used = _names(document, set())
    items = contexts if isinstance(contexts, list) else [contexts]
    resolved: list[Any] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            inline = _shipped_context(item)
            if inline is None:
                where = "/@context" + (f"/{index}" if isinstance(contexts, list) else "")
                raise DescriptionSyntaxError(
                    where,
                    f"unknown JSON-LD context {item!r}: the registry resolves contexts offline and knows "
                    + ", ".join(known_contexts()),
                )
            resolved.append(
                {
                    term: definition
                    for term, definition in inline.items()
                    if term in used or not (isinstance(definition, dict) and "@context" in definition)
                }
            )
        else:
            resolved.append(item)
    result["@context"] = resolved
    return result


@cache
def _shipped_context(url: str) -> dict[str, Any] | None:
    """A shipped context parsed once: with_local_contexts copies the top level it keeps, and the
    copy is only serialized, so the definitions it shares are never changed."""
    return local_context(url)


def _names(value: Any, found: set[str]) -> set[str]:
    """Every key and string value in a JSON document, and the prefix of each compact IRI."""
    if isinstance(value, dict):
        for key, item in value.items():
            found.add(key)
            _names(item, found)
    elif isinstance(value, list):
        for item in value:
            _names(item, found)
    elif isinstance(value, str):
        found.add(value)
        found.add(value.split(":", 1)[0])
    return found


def td_triples(document: dict[str, Any]) -> list[ox.Triple]:
    """RDF of a TD (relative hrefs resolve against the TD's absolute `base`, else are left out)."""
    base = document.get("base")
    base_iri = base if isinstance(base, str) and iri_problem(base) is None else None
    expanded = with_local_contexts(document)
    try:
        quads = ox.parse(json.dumps(expanded).encode(), format=ox.RdfFormat.JSON_LD, base_iri=base_iri)
        return [quad.triple for quad in quads]
    except SyntaxError as exc:
        raise DescriptionSyntaxError("/", f"not valid JSON-LD: {exc}") from exc


def turtle_triples(data: bytes, base_iri: str | None = None) -> list[ox.Triple]:
    try:
        return [q.triple for q in ox.parse(data, format=ox.RdfFormat.TURTLE, base_iri=base_iri)]
    except SyntaxError as exc:
        position = _position(exc)
        raise DescriptionSyntaxError(position, f"not valid Turtle: {exc.msg or exc}") from exc


def _position(exc: SyntaxError) -> str:
    if exc.lineno:
        return f"line {exc.lineno}:{exc.offset or 0}"
    return ""


def device_thing_description(
    device_id: str,
    *,
    title: str,
    ram_kb: float,
    flash_kb: float,
    device_class: str = "sbc",
    cpu: str | None = None,
    cpu_cores: int | None = None,
    clock_mhz: float | None = None,
    accelerator: str | None = None,
    sensors: tuple[str, ...] = (),
    gateway: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """A TD 1.1 describing a tinyfleet device with the fleet ontology's terms.

    `sensors` are class names of the tinyfleet context ("Accelerometer",
    "Camera", ...) or IRIs; `gateway` is the gateway device's IRI.
    """
    td: dict[str, Any] = {
        "@context": [TD_CONTEXT_URLS[0], TINYFLEET_CONTEXT_URL],
        "id": device_id,
        "@type": ["Thing", "Device"],
        "title": title,
        "securityDefinitions": {"nosec_sc": {"scheme": "nosec"}},
        "security": ["nosec_sc"],
        "deviceClass": device_class,
        "ramKB": ram_kb,
        "flashKB": flash_kb,
    }
    optional = {
        "cpu": cpu,
        "cpuCores": cpu_cores,
        "clockMHz": clock_mhz,
        "accelerator": accelerator,
        "gateway": gateway,
        "site": site,
    }
    td.update({key: value for key, value in optional.items() if value is not None})
    if sensors:
        td["sensorTypes"] = list(sensors)
    return td
