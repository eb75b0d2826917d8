"""Named, parameterised SPARQL queries (`queries/*.rq`) and safe parameter substitution.

A query file declares its parameters in a header and uses them as `$name`:

    #@ summary Devices not seen for longer than a duration.
    #@ param older_than duration = PT5M -- silence longer than this
    SELECT ?device WHERE { ... FILTER(?lastSeen < NOW() - $older_than) }

Values arrive as text (command line, job files, HTTP) and are parsed by their
declared type and written back as SPARQL terms (an IRI through pyoxigraph's IRI
check, strings escaped), so a value can never change the query's structure.
A clause between `{{#name}}` and `{{/name}}` is kept only when parameter `name`
has a value (not an empty string or list): an optional criterion then costs
nothing when unused, where a `FILTER(... || EXISTS {...})` is tested per row.
Textual substitution rather than engine-side pre-binding, because the same
query must also run on a remote SPARQL 1.1 server.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Final

from tinyfleet.ontology import PREFIXES, QUERIES_DIR, XSD, sparql_prologue

PARAM_TYPES: Final = ("iri", "iris", "string", "integer", "decimal", "boolean", "duration", "datetime")
_HEADER = re.compile(r"^#@\s*(summary|param)\s+(.*)$")
_PARAM = re.compile(
    r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s+(?P<type>[a-z]+)"
    r"(?:\s*=\s*(?P<default>[^-]*?))?\s*(?:--\s*(?P<doc>.*))?$"
)
_PLACEHOLDER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_SECTION = re.compile(r"\{\{#([A-Za-z_][A-Za-z0-9_]*)\}\}(.*?)\{\{/\1\}\}", re.DOTALL)
_EMPTY_TERMS: Final = frozenset({"", '""'})
_DURATION = re.compile(r"^-?P(?=\d|T\d)(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?$")
_QUERY_START = re.compile(r"^\s*(PREFIX|BASE|SELECT|ASK|CONSTRUCT|DESCRIBE)\b", re.IGNORECASE)


class QueryError(ValueError):
    """A named query or parameter that cannot be used; `param` names the parameter if any."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None
    doc: str

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class NamedQuery:
    name: str
    summary: str
    params: tuple[Param, ...]
    body: str

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        known = ", ".join(p.name for p in self.params) or "none"
        raise QueryError(f"query {self.name!r} has no parameter {name!r} (parameters: {known})", name)

    def render(self, values: Mapping[str, str] | None = None) -> str:
        """The full query text (prefixes included) with every parameter substituted."""
        values = dict(values or {})
        for name in values:
            self.param(name)
        terms: dict[str, str] = {}
        for param in self.params:
            raw = values.get(param.name, param.default)
            if raw is None:
                raise QueryError(
                    f"query {self.name!r} needs parameter {param.name!r} ({param.type}: {param.doc})",
                    param.name,
                )
            terms[param.name] = sparql_term(param, raw)
        body = _SECTION.sub(lambda m: "" if terms[m.group(1)] in _EMPTY_TERMS else m.group(2), self.body)
        body = _PLACEHOLDER.sub(lambda m: terms.get(m.group(1), m.group(0)), body)
        return sparql_prologue() + body


def sparql_term(param: Param, raw: str) -> str:
    """Parse `raw` as the parameter's type and write it as SPARQL text."""
    raw = raw.strip()
    try:
        if param.type == "iri":
            return _iri(raw)
        if param.type == "iris":
            return " ".join(_iri(part) for part in re.split(r"[\s,]+", raw) if part)
        if param.type == "string":
            return _string_literal(raw)
        if param.type == "integer":
            return str(int(raw))
        if param.type == "decimal":
            number = Decimal(raw)
            if not number.is_finite():
                raise ValueError("not a finite number")
            return format(number, "f")
        if param.type == "boolean":
            return _boolean(raw)
        if param.type == "duration":
            if not _DURATION.match(raw):
                raise ValueError("expected an xsd:dayTimeDuration such as PT30S, PT5M, PT2H or P1D")
            return f'"{raw}"^^<{XSD}dayTimeDuration>'
        if param.type == "datetime":
            stamp = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=dt.UTC)
            return f'"{stamp.isoformat()}"^^<{XSD}dateTime>'
    except (ValueError, InvalidOperation) as exc:
        message = f"parameter {param.name!r}: {raw!r} is not a valid {param.type}: {exc}"
        raise QueryError(message, param.name) from exc
    raise QueryError(f"parameter {param.name!r} has unknown type {param.type!r}", param.name)


def expand_iri(text: str) -> str:
    """`sosa_extend:Camera` -> full IRI for known prefixes; `<...>` unwrapped; others as given."""
    if text.startswith("<") and text.endswith(">"):
        return text[1:-1]
    prefix, sep, local = text.partition(":")
    if sep and prefix in PREFIXES and not local.startswith("//"):
        return PREFIXES[prefix] + local
    return text


def _iri(text: str) -> str:
    from pyoxigraph import NamedNode

    return str(NamedNode(expand_iri(text)))


def _string_literal(text: str) -> str:
    from pyoxigraph import Literal

    return str(Literal(text))


def _boolean(text: str) -> str:
    lowered = text.lower()
    if lowered in {"true", "1", "yes"}:
        return "true"
    if lowered in {"false", "0", "no"}:
        return "false"
    raise ValueError("expected true or false")


def parse_query_file(name: str, text: str) -> NamedQuery:
    summary = ""
    params: list[Param] = []
    body_lines: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _HEADER.match(line)
        if not match:
            body_lines.append(line)
            continue
        kind, rest = match.groups()
        if kind == "summary":
            summary = rest.strip()
            continue
        param = _PARAM.match(rest.strip())
        if not param or param["type"] not in PARAM_TYPES:
            raise QueryError(
                f"{name}.rq line {number}: bad parameter declaration {rest.strip()!r}; "
                f"expected 'NAME TYPE [= DEFAULT] [-- description]' with TYPE in {', '.join(PARAM_TYPES)}"
            )
        default = param["default"]
        params.append(
            Param(
                name=param["name"],
                type=param["type"],
                default=None if default is None else default.strip(),
                doc=(param["doc"] or "").strip(),
            )
        )
    body = "\n".join(body_lines).strip() + "\n"
    declared = {p.name for p in params}
    for section in _SECTION.finditer(body):
        if section.group(1) not in declared:
            raise QueryError(f"{name}.rq: clause {{{{#{section.group(1)}}}}} names no declared parameter")
    if "{{" in _SECTION.sub("", body):
        raise QueryError(f"{name}.rq: a clause {{{{#name}}}} ... {{{{/name}}}} is not closed")
    return NamedQuery(name=name, summary=summary, params=tuple(params), body=body)


@cache
def catalog() -> dict[str, NamedQuery]:
    """Every named query shipped in `queries/`, by file stem."""
    return {
        path.stem: parse_query_file(path.stem, path.read_text(encoding="utf-8"))
        for path in sorted(QUERIES_DIR.glob("*.rq"))
    }


def named_query(name: str) -> NamedQuery:
    queries = catalog()
    if name not in queries:
        raise QueryError(f"no named query {name!r}; known: {', '.join(sorted(queries))}")
    return queries[name]


def render(name: str, params: Mapping[str, str] | None = None) -> str:
    return named_query(name).render(params)


def parse_assignments(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """['k=v', ...] (command line --param, job files) -> {k: v}; a missing '=' is an error."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QueryError(f"parameter {item!r} must be written NAME=VALUE")
        values[key.strip()] = value
    return values


def resolve_query(spec: str) -> str:
    """A job's `eligible` setting -> SPARQL text.

    Either SPARQL itself (starts with PREFIX/SELECT/...; the fleet prefixes are
    predeclared, a query's own PREFIX lines override them) or a named query with
    parameters in shell syntax: `eligible-devices min_ram_kb=64 sensors="sosa_extend:Camera"`.
    """
    if _QUERY_START.match(spec):
        return sparql_prologue() + spec
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise QueryError(f"cannot read named query {spec!r}: {exc}") from exc
    if not words:
        raise QueryError("empty query")
    return render(words[0], parse_assignments(words[1:]))
