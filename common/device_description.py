"""Device descriptions as the agent and the coordinator both read them: what a valid one is,
which subject is the device, and the Thing Description tinyfleet writes for a device.

The agent checks its description before it registers and the coordinator's registry checks
it again; both call this module, so a description the agent accepts is never refused by the
coordinator for naming its device differently (the registry then adds its scope rule, the
fleet's SHACL shapes and, for a device that registers to train, the fleet's requirements).

- A JSON description is a W3C WoT Thing Description: it must pass W3C's TD 1.1 JSON Schema
  (vendored in tinyfleet.ontology, read offline), every name in `security` must be defined in
  `securityDefinitions` (a TD 1.1 rule the schema cannot state), and the device is its `id`,
  an absolute IRI.
- A Turtle description's device is its one IRI subject typed with a device class (td:Thing,
  tf:Device or a tinyfleet device subclass, saref:Device in SAREF 3's or SAREF 1-2's
  namespace); when no subject has one of those, the one typed s3n:SmartSensor (published
  S3N boards carry only that). Classes are compared by IRI, without inference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Final

import pyoxigraph as ox

from tinyfleet.ontology import (
    NNET,
    RDF,
    S3N,
    S3N_HTTP,
    SAREF,
    SAREF_W3ID,
    TD,
    TD_CONTEXT_URLS,
    TD_SCHEMA_PATH,
    TF,
    TINYFLEET_CONTEXT_URL,
)

if TYPE_CHECKING:
    from jsonschema import Draft7Validator
    from jsonschema.exceptions import ValidationError

MEDIA_TD_JSON: Final = "application/td+json"
MEDIA_TURTLE: Final = "text/turtle"
JSON_MEDIA_TYPES: Final = frozenset({MEDIA_TD_JSON, "application/ld+json", "application/json"})
TURTLE_MEDIA_TYPES: Final = frozenset({MEDIA_TURTLE, "application/x-turtle"})
#: The TD context a generated description names first.
TD_CONTEXT: Final = TD_CONTEXT_URLS[0]
#: tf:deviceClass values (the fleet shapes' sh:in for tf:deviceClass).
DEVICE_CLASSES: Final = ("sbc", "mcu", "gateway")
#: tf:Device and its subclasses in the fleet ontology: a device of the fleet.
FLEET_DEVICE_TYPES: Final = frozenset(
    TF + name for name in ("Device", "MicrocontrollerBoard", "SingleBoardComputer", "Gateway")
)
#: Classes that make a Turtle subject the device (module docstring).
DEVICE_TYPES: Final = FLEET_DEVICE_TYPES | {TD + "Thing", SAREF + "Device", SAREF_W3ID + "Device"}
#: Consulted only when no subject has one of DEVICE_TYPES.
SENSOR_BOARD_TYPES: Final = frozenset({S3N + "SmartSensor", S3N_HTTP + "SmartSensor"})
_MODEL_TYPES: Final = frozenset({NNET + "NeuralNetwork", TF + "ModelArtifact"})
_RDF_TYPE: Final = RDF + "type"
#: The IRI a bare device name (the agent's --device-id) is given.
DEVICE_IRI_PREFIX: Final = "urn:tinyfleet:device:"
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")  # RFC 3986 scheme and its colon


@dataclass(frozen=True)
class Problem:
    """One reason a description is refused; `path` says where: a JSON pointer into a TD,
    "line L:C" in a document, "<focus node> <property path>" for a SHACL finding, or ""."""

    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class DescriptionInvalid(ValueError):
    """A description that cannot be registered; `errors` lists every problem found."""

    def __init__(self, errors: Sequence[Problem]) -> None:
        self.errors = list(errors)
        first = "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        #: The first problems in one line.
        self.summary = first + more
        super().__init__(f"invalid description: {self.summary}")

    def as_list(self) -> list[dict[str, str]]:
        return [p.as_dict() for p in self.errors]


def refuse(path: str, message: str) -> DescriptionInvalid:
    return DescriptionInvalid([Problem(path, message)])


def media_kind(media_type: str) -> str:
    """'json' or 'turtle' for a Content-Type (parameters ignored); any other is refused."""
    base = (media_type or "").split(";", 1)[0].strip().lower()
    if base in JSON_MEDIA_TYPES:
        return "json"
    if base in TURTLE_MEDIA_TYPES:
        return "turtle"
    known = ", ".join(sorted(JSON_MEDIA_TYPES | TURTLE_MEDIA_TYPES))
    raise refuse("", f"unsupported media type {media_type!r}; use one of: {known}")


def iri_problem(value: object) -> str | None:
    """Why `value` cannot name a device (not an absolute IRI, RFC 3987), or None when it can."""
    if not isinstance(value, str):
        return f"must be an absolute IRI string, got {type(value).__name__}"
    try:
        ox.NamedNode(value)
    except ValueError as exc:  # names the character or part at fault
        return f"{value!r} is not a valid absolute IRI: {exc}"
    return None


def device_iri(device_id: str) -> str:
    """'pi-01' -> 'urn:tinyfleet:device:pi-01'; an id with a scheme ('urn:dev:pi-01') stays as
    it is, to be judged as an IRI where it is registered."""
    return device_id if _SCHEME.match(device_id) else DEVICE_IRI_PREFIX + device_id


@cache
def _td_schema() -> Draft7Validator:
    from jsonschema import Draft7Validator

    return Draft7Validator(json.loads(TD_SCHEMA_PATH.read_text(encoding="utf-8")))


@cache
def _td_schema_check() -> Callable[[Any], Any]:
    """The same schema compiled to Python by fastjsonschema (formats unchecked, as jsonschema
    leaves them): about 0.15 ms a device TD where jsonschema takes about 2, so the registry
    pays jsonschema's price, for its precise findings, only on a TD that fails."""
    import fastjsonschema

    return fastjsonschema.compile(json.loads(TD_SCHEMA_PATH.read_text(encoding="utf-8")), use_formats=False)


def td_problems(td: dict[str, Any]) -> list[Problem]:
    """Why a JSON document is not a TD 1.1: the TD JSON Schema's findings, each at the JSON
    pointer of the member at fault; an `id` that is not an absolute IRI; security names
    that `securityDefinitions` does not define."""
    from fastjsonschema import JsonSchemaException

    problems: set[Problem] = set()
    try:
        _td_schema_check()(td)
    except JsonSchemaException:  # jsonschema, the reference, says what and where
        problems = {problem for error in _td_schema().iter_errors(td) for problem in _schema_problems(error)}
    if "id" in td and (bad_id := iri_problem(td["id"])) is not None:
        problems.add(Problem("/id", bad_id))
    definitions, security = td.get("securityDefinitions"), td.get("security")
    names = [security] if isinstance(security, str) else security
    if isinstance(definitions, dict) and isinstance(names, list):
        problems.update(
            Problem("/security", f"{name!r} is not defined in securityDefinitions")
            for name in names
            if isinstance(name, str) and name not in definitions
        )
    return sorted(problems, key=lambda p: (p.path, p.message))


def _schema_problems(error: ValidationError) -> list[Problem]:
    """The schema's finding at the member it concerns (`_closest`); a missing member is named
    by its own pointer (jsonschema points at the object that lacks it)."""
    closest = _closest(error)
    path = "".join(f"/{_escape(str(part))}" for part in closest.absolute_path)
    if closest.validator == "required" and isinstance(closest.instance, dict):
        required = closest.validator_value if isinstance(closest.validator_value, list) else []
        return [
            Problem(f"{path}/{_escape(name)}", "missing (required by the TD 1.1 JSON Schema)")
            for name in required
            if name not in closest.instance
        ]
    return [Problem(path or "/", f"{closest.message} (TD 1.1 JSON Schema)")]


def _closest(error: ValidationError) -> ValidationError:
    """For a value that matches none of a oneOf/anyOf's branches, the finding of the branch
    meant for it: the one branch that does not fail on a member where some branch allows a
    single value (TD 1.1 tells security schemes apart by `scheme`, so a "basic" scheme is
    judged by the basic branch); failing that, jsonschema's best match."""
    from jsonschema.exceptions import best_match

    while error.context:
        branches: dict[object, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        telling = {tuple(sub.absolute_path) for sub in _nested(error.context) if _single_value(sub)}
        meant = [
            found
            for found in branches.values()
            if not any(tuple(sub.absolute_path) in telling for sub in _nested(found))
        ]
        if len(meant) != 1:
            return best_match([error]) or error
        error = best_match(meant[0]) or meant[0][0]
    return error


def _nested(errors: Iterable[ValidationError]) -> Iterator[ValidationError]:
    for error in errors:
        yield error
        yield from _nested(error.context)


def _single_value(error: ValidationError) -> bool:
    allowed = error.validator_value
    return error.validator == "const" or (
        error.validator == "enum" and isinstance(allowed, list) and len(allowed) == 1
    )


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def td_id(td: dict[str, Any]) -> str:
    """The device a TD describes: its `id`, which must be an absolute IRI."""
    if "id" not in td:
        raise refuse("/id", "missing; the device needs an IRI such as urn:tinyfleet:device:pi-01")
    problem = iri_problem(td["id"])
    if problem is not None:
        raise refuse("/id", problem)
    return str(td["id"])


def turtle_triples(data: bytes, base_iri: str | None = None) -> list[ox.Triple]:
    try:
        return [quad.triple for quad in ox.parse(data, format=ox.RdfFormat.TURTLE, base_iri=base_iri)]
    except SyntaxError as exc:
        where = f"line {exc.lineno}:{exc.offset or 0}" if exc.lineno else ""
        raise refuse(where, f"not valid Turtle: {exc.msg or exc}") from exc


def device_subject(triples: Sequence[ox.Triple]) -> str:
    """The IRI of the one device a Turtle description is about (module docstring: the rule)."""
    devices: set[object] = set()
    boards: set[object] = set()
    models = False
    for t in triples:
        if t.predicate.value != _RDF_TYPE or not isinstance(t.object, ox.NamedNode):
            continue
        if t.object.value in DEVICE_TYPES:
            devices.add(t.subject)
        elif t.object.value in SENSOR_BOARD_TYPES:
            boards.add(t.subject)
        elif t.object.value in _MODEL_TYPES:
            models = True
    found = devices or boards
    if not found:
        if models:
            raise refuse("", "this describes models, not a device; use `tinyfleet registry import`")
        raise refuse(
            "",
            "no subject is typed as a device: type the device td:Thing, tf:Device or saref:Device "
            "(or s3n:SmartSensor)",
        )
    if len(found) > 1:
        names = ", ".join(sorted(str(node) for node in found))
        raise refuse("", f"describes {len(found)} devices ({names}); register one description per device")
    (device,) = found
    if not isinstance(device, ox.NamedNode):
        raise refuse("", "the device is a blank node; give it an IRI such as <urn:tinyfleet:device:pi-01>")
    return device.value


def read_device_id(data: bytes, media_type: str) -> str:
    """The device a description registers, judged as the coordinator judges it before its
    SHACL run (parse, TD 1.1 schema for JSON, the device subject); DescriptionInvalid if not."""
    if media_kind(media_type) == "turtle":
        return device_subject(turtle_triples(data))
    try:
        td = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise refuse("", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise refuse(f"line {exc.lineno}:{exc.colno}", f"not valid JSON: {exc.msg}") from exc
    if not isinstance(td, dict):
        raise refuse("/", f"a Thing Description is a JSON object, not {type(td).__name__}")
    problems = td_problems(td)
    if problems:
        raise DescriptionInvalid(problems)
    return td_id(td)


def device_thing_description(
    device_id: str,
    *,
    ram_kb: float,
    flash_kb: float,
    title: str | None = None,
    device_class: str = "sbc",
    cpu: str | None = None,
    cpu_cores: int | None = None,
    clock_mhz: float | None = None,
    accelerator: str | None = None,
    sensors: tuple[str, ...] = (),
    gateway: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """A TD 1.1 describing a fleet device with the fleet ontology's terms (tinyfleet context).

    `device_id` is the device's IRI (the title by default); `sensors` are class names of
    the tinyfleet context ("Accelerometer", "Camera", ...) or IRIs; `gateway` is the
    gateway device's IRI. Values are written as given: the fleet shapes judge them where
    the description is registered.
    """
    td: dict[str, Any] = {
        "@context": [TD_CONTEXT, TINYFLEET_CONTEXT_URL],
        "id": device_id,
        "@type": ["Thing", "Device"],
        "title": title or device_id,
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
