from __future__ import annotations

import json
from pathlib import Path

import pytest
from rdflib import Graph

from tinyfleet.client.descriptions import (
    MEDIA_TD_JSON,
    MEDIA_TURTLE,
    TD_CONTEXT,
    DescriptionError,
    load_description,
    minimal_description,
    minimal_thing_description,
)

TURTLE = """@prefix td: <https://www.w3.org/2019/wot/td#> .
@prefix tf: <https://w3id.org/tinyfleet#> .
<urn:dev:pi-07> a td:Thing ;
    td:title "Pi 7" ;
    tf:ramKB 1048576 .
"""


def test_thing_description_json(tmp_path: Path) -> None:
    path = tmp_path / "pi.td.json"
    path.write_text(json.dumps(minimal_thing_description("urn:dev:pi-01", 4096, 65536, "cortex-a53")))
    description = load_description(path)
    assert (description.device_id, description.media_type) == ("urn:dev:pi-01", MEDIA_TD_JSON)
    assert description.data == path.read_bytes()  # sent exactly as written


def test_turtle_by_extension_and_by_content(tmp_path: Path) -> None:
    for name in ("pi.ttl", "pi.description"):
        path = tmp_path / name
        path.write_text(TURTLE)
        description = load_description(path)
        assert (description.device_id, description.media_type) == ("urn:dev:pi-07", MEDIA_TURTLE)
    (tmp_path / "td.txt").write_text(' \n' + json.dumps({"@context": TD_CONTEXT, "id": "urn:dev:x"}))
    assert load_description(tmp_path / "td.txt").media_type == MEDIA_TD_JSON


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("a.json", '{"@context": "x", "id": ', "not valid JSON: .*line 1, column"),
        ("a.json", '["urn:dev:x"]', "must be a JSON object, got list"),
        ("a.json", '{"id": "urn:dev:x"}', 'missing "@context"'),
        ("a.json", '{"@context": "x", "title": "t"}', 'missing "id"'),
        ("a.json", '{"@context": "x", "id": "pi 01"}', '"id" must be an absolute IRI'),
        ("a.json", '{"@context": "x", "id": 7}', '"id" must be an absolute IRI'),
        ("a.ttl", "<urn:dev:x> a <https://www.w3.org/2019/wot/td#Thing>", "not valid Turtle"),
        ("a.ttl", '<urn:dev:x> <urn:p> "v" .', "no subject typed as a Thing or Device"),
        ("a.ttl", "[] a <https://www.w3.org/2019/wot/td#Thing> .", "blank node"),
        (
            "a.ttl",
            "<urn:a> a <https://www.w3.org/2019/wot/td#Thing> . "
            "<urn:b> a <https://w3id.org/tinyfleet#Device> .",
            "describes 2 devices",
        ),
    ],
)
def test_malformed_descriptions_name_file_and_problem(
    tmp_path: Path, name: str, content: str, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DescriptionError, match=problem) as error:
        load_description(path)
    assert str(error.value).startswith(str(path))


def test_turtle_device_found_by_any_device_class_or_by_title(tmp_path: Path) -> None:
    saref = "<urn:dev:s1> a <https://saref.etsi.org/core/Device> ; <urn:p> 1 ."
    titled = '<urn:dev:t1> <https://www.w3.org/2019/wot/td#title> "t" . <urn:other> <urn:p> 1 .'
    for name, text, device in (("s.ttl", saref, "urn:dev:s1"), ("t.ttl", titled, "urn:dev:t1")):
        (tmp_path / name).write_text(text)
        assert load_description(tmp_path / name).device_id == device


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DescriptionError, match=r"nope\.json: cannot read"):
        load_description(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DescriptionError, match="not UTF-8"):
        load_description(tmp_path / "bin.json")


def test_minimal_thing_description_is_td_1_1_with_fleet_terms() -> None:
    td = minimal_thing_description("pi-02", ram_kb=512, flash_kb=2048, cpu="armv7l", cpu_cores=4)
    assert td["@context"][0] == "https://www.w3.org/2022/wot/td/v1.1"
    assert td["@context"][1] == {"tf": "https://w3id.org/tinyfleet#"}
    assert td["id"] == "urn:tinyfleet:device:pi-02" and td["title"] == "pi-02"
    assert td["securityDefinitions"] == {"nosec_sc": {"scheme": "nosec"}} and td["security"] == ["nosec_sc"]
    fleet_terms = (td["tf:ramKB"], td["tf:flashKB"], td["tf:cpu"], td["tf:cpuCores"], td["tf:deviceClass"])
    assert fleet_terms == (512, 2048, "armv7l", 4, "sbc")
    assert minimal_thing_description("urn:dev:already-an-iri", 1, 1, "x")["id"] == "urn:dev:already-an-iri"


def test_minimal_description_measures_what_it_is_not_told() -> None:
    td = minimal_thing_description("pi-03")
    assert td["tf:ramKB"] > 0 and td["tf:flashKB"] > 0 and td["tf:cpu"] and td["tf:cpuCores"] >= 1
    description = minimal_description("pi-03", ram_kb=64, flash_kb=128, cpu="m4")
    assert description.device_id == "urn:tinyfleet:device:pi-03"
    assert json.loads(description.data)["tf:ramKB"] == 64


def test_fleet_terms_expand_to_the_tinyfleet_namespace() -> None:
    """The prefix is declared inline, so the fleet terms are real IRIs once parsed as JSON-LD."""
    td = minimal_thing_description("pi-04", 256, 1024, "m7")
    td["@context"] = td["@context"][1:]  # the TD context is remote; this machine is offline
    graph = Graph().parse(data=json.dumps(td), format="json-ld")
    predicates = {str(p) for p in graph.predicates()}
    assert {"https://w3id.org/tinyfleet#ramKB", "https://w3id.org/tinyfleet#cpu"} <= predicates


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"device_id": " "}, "empty"),
        ({"device_id": "a", "ram_kb": 0}, "ram_kb"),
        ({"device_id": "a", "device_class": "toaster"}, "'toaster' is not one of sbc, mcu, gateway"),
    ],
)
def test_minimal_description_refuses_nonsense(kwargs: dict, problem: str) -> None:
    with pytest.raises(DescriptionError, match=problem):
        minimal_thing_description(**{"flash_kb": 1, "cpu": "x", **kwargs})


def test_minimal_thing_description_passes_the_registry_checks() -> None:
    """The contract with the coordinator's registry: a generated TD is accepted as it is."""
    from tinyfleet.server.registry.thing_description import td_triples
    from tinyfleet.server.registry.validation import ShaclValidator, check_td_json

    td = minimal_thing_description("pi-05")
    assert check_td_json(td) == []
    assert ShaclValidator.shared().validate(td_triples(td)) == []
