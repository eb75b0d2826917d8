"""Device descriptions: check that what an agent registers parses and names its device.

`describe_device(description, media_type) -> (device_id, normalized)` is the hook
the registry replaces with SHACL validation (pass another function with the same
signature to the coordinator). This baseline accepts a W3C WoT Thing Description
in JSON(-LD) with an "id", or Turtle whose device is the one subject typed as a
Thing/Device (any vocabulary) or, failing that, the one subject with a td:title.
Every rejection raises DescriptionError naming what is wrong.

What any description may be is checked before it is parsed (DescriptionLimits):
its size, the nesting depth of JSON (counted without recursion, so 10k-deep
JSON is refused by name instead of raising RecursionError in the parser), and
that the device id is an absolute IRI that can name an RDF node. The registry
applies the same limits.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

JSON_MEDIA_TYPES = {"application/td+json", "application/ld+json", "application/json"}
TURTLE_MEDIA_TYPES = {"text/turtle", "application/x-turtle"}
TD_NS = "https://www.w3.org/2019/wot/td#"
_DEVICE_CLASS_NAMES = {"thing", "device"}
#: Default for `tinyfleet server start --max-description-bytes`.
DEFAULT_MAX_DESCRIPTION_BYTES: Final = 256 * 1024
#: Deepest JSON nesting accepted. A TD nests a data schema a few levels inside an affordance;
#: JSON-LD expansion costs grow with the square of the depth (3,000 levels take seconds).
DEFAULT_MAX_JSON_DEPTH: Final = 64
#: Descriptions longer than this are validated in a lane of their own (FleetService, Registry):
#: SHACL over a description of this size takes ~0.1 s; over one of the default limit's size, ~1 s.
LARGE_DESCRIPTION_BYTES: Final = 32 * 1024
#: Seconds a large description may take to validate in its worker process before it is killed and
#: the description refused: one at the default size limit takes ~1 s (a few on a loaded machine),
#: and one that takes this long holds up every large one behind it.
LARGE_VALIDATION_TIMEOUT_S: Final = 20.0
#: A refusal goes back in gRPC trailers (the status message and "validation-errors"), which
#: clients accept up to 8 KiB in all by default: each is cut to fit well inside.
MAX_REFUSAL_MESSAGE_CHARS: Final = 1000
MAX_ERRORS_TRAILER_BYTES: Final = 4096
# One token of the nesting scan: an escape (two bytes), a quote or a bracket. Matched one at a
# time with an in-string flag, never a whole string per match: a pattern that matches a string
# from its opening quote restarts at every quote of an unterminated one (`{"a": "` and 100k `\"`)
# and takes minutes, holding the GIL, before the description is even parsed.
_JSON_TOKENS: Final = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)

log = logging.getLogger(__name__)

DescribeDevice = Callable[[bytes, str], tuple[str, bytes]]
#: Many descriptions at once (concurrent registrations): per item (device id, description to
#: store) or the DescriptionError refusing it, each judged as `DescribeDevice` would alone.
DescribeDevices = Callable[[Sequence[tuple[bytes, str]]], list["tuple[str, bytes] | DescriptionError"]]


class DescriptionError(ValueError):
    """A device description that cannot be registered; the message says why."""


class ValidationUnavailable(Exception):
    """Descriptions cannot be validated now (the coordinator is stopping): no verdict on the
    description itself, so the caller may send it again."""


@dataclass(frozen=True)
class DescriptionLimits:
    """Bounds on one description, checked before it is parsed."""

    max_bytes: int = DEFAULT_MAX_DESCRIPTION_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    large_bytes: int = LARGE_DESCRIPTION_BYTES
    #: Deadline for validating one description over `large_bytes` (its worker is killed then).
    validation_timeout_s: float = LARGE_VALIDATION_TIMEOUT_S

    def size_problem(self, size: int) -> str | None:
        if size <= self.max_bytes:
            return None
        return (
            f"the description is {size} bytes; the coordinator accepts at most {self.max_bytes} "
            "(tinyfleet server start --max-description-bytes)"
        )


def json_depth_problem(data: bytes, max_depth: int) -> str | None:
    """Why JSON text nests too deeply to be parsed (where it passes `max_depth`), or None.

    A scan, not a parse (json.loads and JSON-LD processors recurse once per level), in one
    pass over the text: brackets inside strings do not count, escapes never end a string."""
    depth = 0
    in_string = False
    for match in _JSON_TOKENS.finditer(data):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or len(token) == 2:  # inside a string, or an escape (only valid in one)
            continue
        elif token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return f"JSON nested deeper than {max_depth} levels (at byte {match.start()}); not parsed"
        else:
            depth -= 1
    return None


def iri_problem(value: object) -> str | None:
    """Why `value` cannot be a device id (not an absolute IRI, RFC 3987), or None when it can."""
    import pyoxigraph as ox

    if not isinstance(value, str):
        return f"must be an absolute IRI string, got {type(value).__name__}"
    try:
        ox.NamedNode(value)
    except ValueError as exc:  # names the character or part at fault
        return f"{value!r} is not a valid absolute IRI: {exc}"
    return None


#: What this baseline applies (the registry applies the limits the coordinator is started with).
DEFAULT_LIMITS: Final = DescriptionLimits()


def describe_device(description: bytes, media_type: str) -> tuple[str, bytes]:
    """Return (device id, description to store) or raise DescriptionError."""
    too_big = DEFAULT_LIMITS.size_problem(len(description))
    if too_big:
        raise DescriptionError(too_big)
    if not description.strip():
        raise DescriptionError("description is empty")
    kind = (media_type or "").split(";", 1)[0].strip().lower()
    if kind in JSON_MEDIA_TYPES:
        too_deep = json_depth_problem(description, DEFAULT_LIMITS.max_json_depth)
        if too_deep:
            raise DescriptionError(too_deep)
        return _checked_id(_describe_json(description)), description
    if kind in TURTLE_MEDIA_TYPES:
        return _checked_id(_describe_turtle(description)), description
    known = ", ".join(sorted(JSON_MEDIA_TYPES | TURTLE_MEDIA_TYPES))
    raise DescriptionError(f"unsupported media type {media_type!r}; use one of: {known}")


def describe_each(describe: DescribeDevice) -> DescribeDevices:
    """A DescribeDevices that calls `describe` on each description; whatever one raises fails
    that one alone."""

    def describe_all(items: Sequence[tuple[bytes, str]]) -> list[tuple[str, bytes] | DescriptionError]:
        results: list[tuple[str, bytes] | DescriptionError] = []
        for description, media_type in items:
            try:
                results.append(describe(description, media_type))
            except DescriptionError as exc:
                results.append(exc)
            except Exception as exc:  # a bug or a parser's limit: this description fails, not the group
                log.exception("a description could not be processed")
                results.append(unprocessable(exc))
        return results

    return describe_all


def unprocessable(exc: Exception) -> DescriptionError:
    """The refusal of a description whose processing raised something unexpected; the message
    says what a client can act on, without internal exception names."""
    if isinstance(exc, RecursionError):
        return DescriptionError("the description is nested too deeply to be processed")
    if isinstance(exc, ValueError | SyntaxError | UnicodeError):
        return DescriptionError(f"the description could not be processed: {exc}")
    return DescriptionError("the description could not be processed (the coordinator's log has details)")


def refusal_details(refusal: DescriptionError) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(status message, trailing metadata) for a refused description, each cut to fit gRPC's
    metadata limits: the {path, message} list (`errors`, when the registry refused it) goes as
    JSON in "validation-errors", as many entries as fit, then one entry counting the rest."""
    message = _cut(f"invalid description: {refusal}", MAX_REFUSAL_MESSAGE_CHARS)
    errors = getattr(refusal, "errors", None)
    if not errors:
        return message, ()
    kept: list[dict[str, str]] = []
    size = 2
    for number, error in enumerate(errors):
        entry = {key: _cut(str(value), 500) for key, value in error.items()}
        size += len(json.dumps(entry)) + 2
        if size > MAX_ERRORS_TRAILER_BYTES - 100:
            kept.append({"path": "", "message": f"and {len(errors) - number} more problems"})
            break
        kept.append(entry)
    return message, (("validation-errors", json.dumps(kept)),)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _checked_id(device_id: str) -> str:
    problem = iri_problem(device_id)
    if problem:
        raise DescriptionError(f"device id {problem}")
    return device_id


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
