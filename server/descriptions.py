"""Device descriptions at the coordinator: the bounds on one, the hook that judges them, refusals.

`describe_device(description, media_type) -> (device_id, stored)` is the hook the
registry replaces with its own (TD 1.1 schema, scope, SHACL, the fleet's
requirements: server/registry/daemon_plugin.py). This baseline judges what the
agent's own pre-check judges (common.device_description: a TD 1.1, or Turtle
whose device is the one subject typed as a device) within the limits below, so
a coordinator started without the registry names the same device. Every
rejection raises DescriptionError naming what is wrong.

What any description may be is checked before it is parsed (DescriptionLimits):
its size and the nesting depth of JSON (counted without recursion, so 10k-deep
JSON is refused by name instead of raising RecursionError in the parser). The
registry applies the same limits.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from tinyfleet.common.device_description import DescriptionInvalid, media_kind, read_device_id

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


#: What this baseline applies (the registry applies the limits the coordinator is started with).
DEFAULT_LIMITS: Final = DescriptionLimits()


def describe_device(description: bytes, media_type: str) -> tuple[str, bytes]:
    """Return (device id, description to store) or raise DescriptionError."""
    too_big = DEFAULT_LIMITS.size_problem(len(description))
    if too_big:
        raise DescriptionError(too_big)
    if not description.strip():
        raise DescriptionError("description is empty")
    try:
        if media_kind(media_type) == "json":
            too_deep = json_depth_problem(description, DEFAULT_LIMITS.max_json_depth)
            if too_deep:
                raise DescriptionError(too_deep)
        return read_device_id(description, media_type), description
    except DescriptionInvalid as exc:
        raise DescriptionError(exc.summary) from exc


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
