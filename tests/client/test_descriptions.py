from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyfleet.client.descriptions import (
    DescriptionError,
    load_description,
    minimal_description,
    minimal_thing_description,
)
from tinyfleet.common.device_description import MEDIA_TD_JSON, MEDIA_TURTLE, TD_CONTEXT
from tinyfleet.ontology import TINYFLEET_CONTEXT_URL

TURTLE = """@prefix td: <https://www.w3.org/2019/wot/td#> .
@prefix tf: <https://w3id.org/tinyfleet#> .
<urn:dev:pi-07> a td:Thing ;
    td:title "Pi 7" ;
    tf:ramKB 1048576 .
"""
SECURITY = '"securityDefinitions": {"n": {"scheme": "nosec"}}, "security": "n"'


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
    td = {"@context": TD_CONTEXT, "id": "urn:dev:x", "title": "x",
          "securityDefinitions": {"n": {"scheme": "nosec"}}, "security": "n"}
    (tmp_path / "td.txt").write_text(" \n" + json.dumps(td))
    assert load_description(tmp_path / "td.txt").media_type == MEDIA_TD_JSON


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("a.json", '{"@context": "x", "id": ', "line 1:25: not valid JSON"),
        ("a.json", '["urn:dev:x"]', "a Thing Description is a JSON object, not list"),
        ("a.json", '{"id": "urn:dev:x", "title": "t", ' + SECURITY + "}",
         "/@context: missing \\(required by the TD 1.1 JSON Schema\\)"),
        ("a.json", '{"@context": "https://www.w3.org/2022/wot/td/v1.1", "title": "t", ' + SECURITY + "}",
         '/id: missing'),
        ("a.json", '{"@context": "https://www.w3.org/2022/wot/td/v1.1", "id": "pi 01", "title": "t", '
         + SECURITY + "}", "/id: 'pi 01' is not a valid absolute IRI"),
        ("a.json", '{"@context": "https://www.w3.org/2022/wot/td/v1.1", "id": "urn:dev:x", "title": "t", '
         '"securityDefinitions": {"n": {"scheme": "nosec"}}, "security": "basic_sc"}',
         "/security: 'basic_sc' is not defined in securityDefinitions"),
        ("a.ttl", "<urn:dev:x> a <https://www.w3.org/2019/wot/td#Thing>", "line 1:.*not valid Turtle"),
        ("a.ttl", '<urn:dev:x> <urn:p> "v" .', "no subject is typed as a device"),
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


def test_turtle_device_is_the_subject_typed_with_a_device_class(tmp_path: Path) -> None:
    """By IRI, not by local name: saref:Device is one, ex:Device and a td:title alone are not."""
    accepted = {
        "saref.ttl": ("<urn:dev:s1> a <https://saref.etsi.org/core/Device> ; <urn:p> 1 .", "urn:dev:s1"),
        "board.ttl": ("<urn:dev:b1> a <https://w3id.org/tinyfleet#MicrocontrollerBoard> .", "urn:dev:b1"),
        "s3n.ttl": ("<urn:dev:m1> a <http://w3id.org/s3n/SmartSensor> . "
                    "<urn:dev:m1#imu> a <http://www.w3.org/ns/sosa/Sensor> .", "urn:dev:m1"),
    }
    for name, (text, device) in accepted.items():
        (tmp_path / name).write_text(text)
        assert load_description(tmp_path / name).device_id == device
    for text in ('<urn:dev:t1> <https://www.w3.org/2019/wot/td#title> "t" .',
                 "<urn:dev:e1> a <https://example.org/vocab#Device> ."):
        (tmp_path / "refused.ttl").write_text(text)
        with pytest.raises(DescriptionError, match="no subject is typed as a device"):
            load_description(tmp_path / "refused.ttl")


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(DescriptionError, match=r"nope\.json: cannot read"):
        load_description(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(DescriptionError, match="not UTF-8"):
        load_description(tmp_path / "bin.json")


def test_minimal_thing_description_is_the_fleets_td_1_1() -> None:
    td = minimal_thing_description("pi-02", ram_kb=512, flash_kb=2048, cpu="armv7l", cpu_cores=4)
    assert td["@context"] == [TD_CONTEXT, TINYFLEET_CONTEXT_URL]
    assert td["id"] == "urn:tinyfleet:device:pi-02" and td["title"] == "pi-02"
    assert td["@type"] == ["Thing", "Device"]
    assert td["securityDefinitions"] == {"nosec_sc": {"scheme": "nosec"}} and td["security"] == ["nosec_sc"]
    fleet_terms = (td["ramKB"], td["flashKB"], td["cpu"], td["cpuCores"], td["deviceClass"])
    assert fleet_terms == (512, 2048, "armv7l", 4, "sbc")
    assert minimal_thing_description("urn:dev:already-an-iri", 1, 1, "x")["id"] == "urn:dev:already-an-iri"


def test_minimal_description_measures_what_it_is_not_told() -> None:
    td = minimal_thing_description("pi-03")
    assert td["ramKB"] > 0 and td["flashKB"] > 0 and td["cpu"] and td["cpuCores"] >= 1
    description = minimal_description("pi-03", ram_kb=64, flash_kb=128, cpu="m4")
    assert description.device_id == "urn:tinyfleet:device:pi-03"
    assert json.loads(description.data)["ramKB"] == 64


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"device_id": " "}, "empty"),
        ({"device_id": "a", "ram_kb": 0}, "ram_kb must be positive"),
        ({"device_id": "a", "flash_kb": -1}, "flash_kb must be at least 0"),
        ({"device_id": "a", "device_class": "toaster"}, "'toaster' is not one of sbc, mcu, gateway"),
    ],
)
def test_minimal_description_refuses_nonsense(kwargs: dict, problem: str) -> None:
    with pytest.raises(DescriptionError, match=problem):
        minimal_thing_description(**{"ram_kb": 1, "flash_kb": 1, "cpu": "x", "cpu_cores": 1, **kwargs})
