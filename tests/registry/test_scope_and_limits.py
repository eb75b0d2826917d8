"""What the registry accepts from one description, in-process: subjects only the device's own
(the device, blank nodes, IRIs under it), limits checked before parsing, ids that are IRIs,
one bad description failing alone in a batch, large descriptions prepared in a worker process;
and what an imported document cannot do to a registered device."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyoxigraph as ox
import pytest

from tinyfleet.common.device_description import device_thing_description
from tinyfleet.server.descriptions import (
    DescriptionError,
    DescriptionLimits,
    ValidationUnavailable,
    describe_device,
    json_depth_problem,
)
from tinyfleet.server.registry.importer import ImportFailed, import_document, import_file, read_document
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Prepared, Registry
from tinyfleet.server.registry.validation import DescriptionInvalid, ShaclValidator

TD_JSON = "application/td+json"
TURTLE_HEAD = """@prefix tf: <https://w3id.org/tinyfleet#> . @prefix td: <https://www.w3.org/2019/wot/td#> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
"""


def _turtle(thing: str, node: str) -> bytes:
    body = f'<{thing}> a tf:Device ; td:title "t" ; tf:ramKB 64 ; tf:flashKB 64 ; rdfs:seeAlso <{node}> .\n'
    return (TURTLE_HEAD + body + f'<{node}> rdfs:label "a node" .\n').encode()


@pytest.mark.parametrize(
    ("thing", "inside", "outside"),
    [
        (
            "urn:tinyfleet:device:pi-1",
            ["#ram", ":board", "/sensor", ":board:adc#0"],
            ["urn:tinyfleet:device:pi-10", "urn:tinyfleet:device:pi-", "urn:tinyfleet:device:pi-2#ram"],
        ),
        (
            "https://fleet.example.org/devices/pi-1",
            ["#ram", "/sensors/accel", ":v2"],
            ["https://fleet.example.org/devices/pi-10", "https://fleet.example.org/devices/",
             "https://fleet.example.org/devices/pi-1?x=1"],
        ),
        (  # a trailing '/' owns only what continues it with another separator
            "https://fleet.example.org/site-a/",
            ["#gateway", "/x"],
            ["https://fleet.example.org/site-a/pi-2", "https://fleet.example.org/site-a"],
        ),
    ],
)
def test_nodes_under_the_device_are_its_own_and_any_other_subject_is_refused(
    registry: Registry, thing: str, inside: list[str], outside: list[str]
) -> None:
    for suffix in inside:
        prepared = registry.prepare(_turtle(thing, thing + suffix), "text/turtle", thing_id=thing)
        assert ox.NamedNode(thing + suffix) in {t.subject for t in prepared.triples}
    for other in outside:
        with pytest.raises(DescriptionInvalid) as refused:
            registry.prepare(_turtle(thing, other), "text/turtle", thing_id=thing)
        [problem] = refused.value.errors
        assert problem.path == f"<{other}> rdfs:label"
        assert f'<{other}> <http://www.w3.org/2000/01/rdf-schema#label> "a node"' in problem.message


def test_a_turtle_description_of_one_device_cannot_carry_triples_about_many(registry: Registry) -> None:
    others = "".join(f"<urn:tinyfleet:device:v{i}> tf:ramKB 999999 .\n" for i in range(30))
    data = TURTLE_HEAD + '<urn:tinyfleet:device:t> a tf:Device ; td:title "t" ; tf:ramKB 1 ; tf:flashKB 1 .\n'
    with pytest.raises(DescriptionInvalid) as refused:
        registry.prepare((data + others).encode(), "text/turtle")
    listed, summary = refused.value.errors[:-1], refused.value.errors[-1]
    assert [p.path for p in listed] == [f"<urn:tinyfleet:device:v{i}> tf:ramKB" for i in range(10)]
    assert "20 more triples" in summary.message and "30 such subjects" in summary.message


def _td(device_id: str, **extra: Any) -> bytes:
    td = device_thing_description(device_id, title="t", ram_kb=64, flash_kb=64)
    td.update(extra)
    return json.dumps(td).encode()


@pytest.mark.parametrize("char", ['>', '"', " ", "<", "{", "}", "|", "\\", "^", "`"])
def test_an_id_that_is_not_an_iri_is_refused_naming_it(registry: Registry, char: str) -> None:
    bad = f"urn:tinyfleet:device:a{char}b"
    with pytest.raises(DescriptionInvalid) as in_the_td:
        registry.prepare(_td(bad), TD_JSON)
    with pytest.raises(DescriptionInvalid) as in_the_request:
        registry.prepare(_td("urn:tinyfleet:device:ok"), TD_JSON, thing_id=bad)
    for refused in (in_the_td, in_the_request):
        [problem] = refused.value.errors
        assert problem.path == "/id" and repr(bad) in problem.message and f"'{char}'" in problem.message


def test_ids_without_a_scheme_and_the_registrys_own_are_refused(registry: Registry) -> None:
    for bad, expected in [("pi-07", "No scheme"), ("urn:tinyfleet:graph:liveness", "reserved"),
                          ("urn:tinyfleet", "reserved"), ("urn:tinyfleet:artifact:00ff", "reserved")]:
        with pytest.raises(DescriptionInvalid) as refused:
            registry.prepare(_td(bad), TD_JSON)
        assert expected in str(refused.value), bad


def test_size_and_depth_are_checked_before_parsing() -> None:
    registry = Registry(EmbeddedStore(None), limits=DescriptionLimits(max_bytes=10_000, max_json_depth=8))
    with pytest.raises(DescriptionInvalid, match="10001 bytes; the coordinator accepts at most 10000"):
        registry.prepare(b"\xff" * 10_001, TD_JSON)  # not even UTF-8: never parsed
    nested = _td("urn:tinyfleet:device:n")[:-1]
    for depth, accepted in [(7, True), (8, False)]:  # the TD object itself is one level
        data = nested + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
        if accepted:
            registry.prepare(data, TD_JSON)
        else:
            with pytest.raises(DescriptionInvalid, match="nested deeper than 8 levels"):
                registry.prepare(data, TD_JSON)


def test_ten_thousand_levels_of_json_are_refused_by_name(registry: Registry) -> None:
    deep = _td("urn:tinyfleet:device:deep")[:-1] + b', "x": ' + b"{\"a\": " * 10_000 + b"1" + b"}" * 10_001
    with pytest.raises(DescriptionInvalid, match="nested deeper than 64 levels"):
        registry.prepare(deep, TD_JSON)


def test_the_depth_scan_is_linear_in_an_unterminated_string_of_escaped_quotes(registry: Registry) -> None:
    """`{"a": "` and escaped quotes to the size limit, no closing quote: a scan that matched a
    whole string from each quote took minutes here (3.75 s at 32 KB, quadratic), holding the GIL
    before the description was parsed. Refused as the JSON it is not, well within a second (the
    bound is generous for a loaded machine: the scan takes a few tens of ms)."""
    limit = registry.limits.max_bytes
    head = b'{"id": "urn:tinyfleet:device:q", "a": "'
    data = head + b'\\"' * ((limit - len(head)) // 2)
    assert limit - 2 < len(data) <= limit
    for check in (
        lambda: registry.prepare(data, TD_JSON),
        lambda: describe_device(data, TD_JSON),  # the coordinator's baseline, in its own process
    ):
        started = time.perf_counter()
        with pytest.raises((DescriptionInvalid, DescriptionError), match="not valid JSON"):
            check()
        assert time.perf_counter() - started < 1.0
    started = time.perf_counter()
    assert json_depth_problem(data[:32 * 1024], 64) is None
    assert time.perf_counter() - started < 1.0


def test_brackets_in_strings_do_not_count_and_escapes_do_not_end_strings() -> None:
    text = b'{"a": "[[[[\\"{{{{", "b": "\\\\", "c": [[["]]]"]]]}'
    assert json_depth_problem(text, 4) is None
    assert json_depth_problem(text, 3) == "JSON nested deeper than 3 levels (at byte 38); not parsed"


def test_in_a_batch_each_bad_description_fails_alone(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong with one description (a refusal, an exception in SHACL) is its own."""
    run = ShaclValidator._run

    def explodes_on_marked(self: ShaclValidator, descriptions: Any) -> Any:
        if any(t.subject.value == "urn:tinyfleet:device:explodes" for d in descriptions for t in d):
            raise RuntimeError("a bug in validation")
        return run(self, descriptions)

    monkeypatch.setattr(ShaclValidator, "_run", explodes_on_marked)
    items = [
        _td("urn:tinyfleet:device:good-1"),
        _td("urn:tinyfleet:device:bad>id"),
        _td("urn:tinyfleet:device:deep")[:-1] + b', "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        _td("urn:tinyfleet:device:explodes"),
        b"@prefix : <urn:x:> . this is not turtle",
        _td("urn:tinyfleet:device:good-2"),
    ]
    media = [TD_JSON, TD_JSON, TD_JSON, TD_JSON, "text/turtle", TD_JSON]
    results = registry.prepare_many(
        [(d, m, None, None) for d, m in zip(items, media, strict=True)], raise_first=False
    )
    assert [type(r).__name__ for r in results] == [
        "Prepared", "DescriptionInvalid", "DescriptionInvalid", "DescriptionInvalid", "DescriptionInvalid",
        "Prepared",
    ]
    messages = [str(r) for r in results]
    assert "'>'" in messages[1] and "nested deeper" in messages[2] and "not valid Turtle" in messages[4]
    assert "could not be processed" in messages[3] and "RuntimeError" not in messages[3]


def _large_td(device_id: str, properties: int, **extra: Any) -> bytes:
    forms = [{"href": "coap://10.0.0.7/r", "op": ["readproperty"]}]
    affordances = {f"p{n}": {"type": "number", "forms": forms} for n in range(properties)}
    return _td(device_id, properties=affordances, **extra)


def test_large_descriptions_are_validated_in_a_worker_process(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above limits.large_bytes the description is parsed and validated in a worker process with
    the fleet shapes: the same triples, the same refusals, and no SHACL run in this process."""
    large = _large_td("urn:tinyfleet:device:large", 400)
    assert len(large) > registry.limits.large_bytes
    expected = registry.prepare_unvalidated(large, TD_JSON)

    def no_shacl_here(self: ShaclValidator, descriptions: Any) -> Any:
        raise AssertionError("a large description was validated in the coordinator's process")

    monkeypatch.setattr(ShaclValidator, "_run", no_shacl_here)
    prepared = registry.prepare(large, TD_JSON)
    assert isinstance(prepared, Prepared) and prepared.thing_id == "urn:tinyfleet:device:large"
    assert set(map(str, prepared.triples)) == set(map(str, expected.triples))
    assert prepared.document == expected.document
    with pytest.raises(DescriptionInvalid, match="tf:deviceClass must be one of"):
        registry.prepare(_large_td("urn:tinyfleet:device:large-bad", 400, deviceClass="toaster"), TD_JSON)


def test_a_large_description_past_its_deadline_fails_alone_and_the_next_is_validated() -> None:
    """The large lane's worker is killed at `validation_timeout_s` (before, a slow description
    had no deadline and held up every large one behind it): that description is refused naming
    the deadline, and the next one, in the same batch, gets a new worker and is validated."""
    limits = DescriptionLimits(max_bytes=2_000_000, large_bytes=1_000, validation_timeout_s=1.0)
    registry = Registry(EmbeddedStore(None), limits=limits)
    try:
        slow = _large_td("urn:tinyfleet:device:slow", 12_000)  # ~1.1 MB: several seconds of SHACL
        quick = _large_td("urn:tinyfleet:device:quick", 10)  # over large_bytes: the same lane
        assert len(quick) > limits.large_bytes
        slow_result, quick_result = registry.prepare_many(
            [(slow, TD_JSON, None, None), (quick, TD_JSON, None, None)], raise_first=False
        )
        assert isinstance(slow_result, DescriptionInvalid)
        assert "validation took longer than 1 s" in str(slow_result)
        assert isinstance(quick_result, Prepared) and quick_result.thing_id == "urn:tinyfleet:device:quick"
    finally:
        registry.large_descriptions.close()
    with pytest.raises(ValidationUnavailable, match="stopping"):  # closed: no verdict, try again
        registry.prepare(_large_td("urn:tinyfleet:device:late", 10), TD_JSON)


BOARD = "https://example.org/boards/imported-1"
DOCUMENT = f"""# baseURI: https://example.org/boards/
@prefix tf: <https://w3id.org/tinyfleet#> . @prefix td: <https://www.w3.org/2019/wot/td#> .
<{BOARD}> a tf:Device ; td:title "imported" ; tf:ramKB 200 ; tf:flashKB 700 .
"""


class _Keeper:
    """The repository as import_document sees it: which devices agents registered."""

    def __init__(self, registered: set[str]) -> None:
        self.registered = registered
        self.kept: list[str] = []

    def import_document(self, name: str, base_iri: str, media_type: str, content: bytes) -> Any:
        self.kept.append(name)

    def get_device(self, device_id: str) -> object | None:
        return object() if device_id in self.registered else None


class _Projector:
    def catch_up(self) -> None:
        return None


def test_an_import_cannot_replace_a_device_registered_by_its_agent(
    registry: Registry, tmp_path: Path
) -> None:
    path = tmp_path / "boards.ttl"
    path.write_text(DOCUMENT)
    keeper = _Keeper({BOARD})
    with pytest.raises(ImportFailed) as refused:
        import_document(registry, keeper, _Projector(), read_document(path))
    [problem] = refused.value.problems
    assert problem.path == BOARD and "registered by its agent" in problem.message
    assert keeper.kept == []  # nothing kept in SQL, nothing projected
    free = _Keeper(set())
    import_document(registry, free, _Projector(), read_document(path))
    assert free.kept == ["boards.ttl"]


def test_stray_triples_in_an_imported_document_do_not_change_a_device(
    registry: Registry, tmp_path: Path, make_td: Callable[..., bytes]
) -> None:
    registry.put(registry.prepare(make_td("victim", ram_kb=128), TD_JSON))
    victim = "urn:tinyfleet:device:victim"
    path = tmp_path / "notes.ttl"
    path.write_text(DOCUMENT + f"<{victim}> tf:ramKB 999999 ; tf:flashKB 999999 .\n")
    report = import_file(registry, path)
    assert report.other_graph is not None  # the stray triples are stored, in the document's graph
    assert victim not in registry.eligible("eligible-devices min_ram_kb=500000")
    assert victim in registry.eligible("eligible-devices min_ram_kb=100")
    [row] = [r for r in registry.named("devices") if r["device"].value == victim]
    assert row["ramKB"].value == "128"
