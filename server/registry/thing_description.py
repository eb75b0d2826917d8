"""W3C WoT Thing Descriptions (JSON-LD) -> RDF triples (Turtle: common.device_description).

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
from typing import Any

import pyoxigraph as ox

from tinyfleet.common.device_description import iri_problem, refuse
from tinyfleet.ontology import known_contexts, local_context
from tinyfleet.server.descriptions import DEFAULT_MAX_JSON_DEPTH, json_depth_problem


def parse_json(data: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """JSON text -> value; nesting deeper than `max_depth` is refused before json.loads
    (which recurses once per level) ever sees it."""
    too_deep = json_depth_problem(data, max_depth)
    if too_deep is not None:
        raise refuse("", too_deep)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise refuse("", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise refuse(f"line {exc.lineno}:{exc.colno}", f"not valid JSON: {exc.msg}") from exc


def load_json(data: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """A Thing Description's JSON object (see `parse_json`)."""
    document = parse_json(data, max_depth)
    if not isinstance(document, dict):
        raise refuse(
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
                raise refuse(
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
        raise refuse("/", f"not valid JSON-LD: {exc}") from exc
