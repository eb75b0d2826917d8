"""One rule for which subject is the device and one TD builder: the agent's pre-check, the
coordinator's baseline and the registry (as gRPC Register calls it) give every description the
same verdict and the same device, and the agent refuses the resources the fleet shapes refuse."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tinyfleet.client.descriptions import DescriptionError, minimal_thing_description, parse_description
from tinyfleet.common.device_description import DescriptionInvalid
from tinyfleet.server.descriptions import DescriptionError as CoordinatorRefusal
from tinyfleet.server.descriptions import describe_device
from tinyfleet.server.registry.store import EmbeddedStore
from tinyfleet.server.registry.thing_graphs import Registry

TURTLE = "text/turtle"
TD_JSON = "application/td+json"
FACTS = '<https://www.w3.org/2019/wot/td#title> "t" ; <https://w3id.org/tinyfleet#ramKB> 64 ; ' \
        "<https://w3id.org/tinyfleet#flashKB> 128"

#: Turtle descriptions (each with the facts the fleet shapes require) and the device each names,
#: or None where every side must refuse it.
TURTLE_CASES: dict[str, tuple[str, str | None]] = {
    "saref:Device (SAREF 3)": (
        f"<urn:dev:s1> a <https://saref.etsi.org/core/Device> ; {FACTS} .", "urn:dev:s1"
    ),
    "saref:Device (SAREF 1-2)": (f"<urn:dev:s2> a <https://w3id.org/saref#Device> ; {FACTS} .", "urn:dev:s2"),
    "td:Thing": (f"<urn:dev:t1> a <https://www.w3.org/2019/wot/td#Thing> ; {FACTS} .", "urn:dev:t1"),
    "tf:MicrocontrollerBoard": (
        f"<urn:dev:m1> a <https://w3id.org/tinyfleet#MicrocontrollerBoard> ; {FACTS} .", "urn:dev:m1"
    ),
    "s3n:SmartSensor alone": (f"<urn:dev:b1> a <https://w3id.org/s3n/SmartSensor> ; {FACTS} .", "urn:dev:b1"),
    "a td:title, no device class": (f"<urn:dev:n1> {FACTS} .", None),
    "another vocabulary's Device": (f"<urn:dev:x1> a <https://example.org/vocab#Device> ; {FACTS} .", None),
    "two devices": (
        f"<urn:dev:a> a <https://saref.etsi.org/core/Device> ; {FACTS} . "
        f"<urn:dev:b> a <https://www.w3.org/2019/wot/td#Thing> ; {FACTS} .",
        None,
    ),
    "a blank node": (f"[] a <https://www.w3.org/2019/wot/td#Thing> ; {FACTS} .", None),
}


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    opened = Registry(EmbeddedStore(None))
    yield opened
    opened.large_descriptions.close()


def _agent(data: bytes, media_type: str) -> str | None:
    try:
        return parse_description(data, media_type).device_id
    except DescriptionError:
        return None


def _baseline(data: bytes, media_type: str) -> str | None:
    try:
        return describe_device(data, media_type)[0]
    except CoordinatorRefusal:
        return None


def _register(registry: Registry, data: bytes, media_type: str) -> str | None:
    """As CoordinatorRegistry.describe_device judges a gRPC Register."""
    try:
        return registry.prepare(data, media_type, for_training=True).thing_id
    except DescriptionInvalid:
        return None


@pytest.mark.parametrize("case", list(TURTLE_CASES))
def test_agent_baseline_and_registry_name_the_same_device(registry: Registry, case: str) -> None:
    text, device = TURTLE_CASES[case]
    data = text.encode()
    assert (_agent(data, TURTLE), _baseline(data, TURTLE), _register(registry, data, TURTLE)) == (device,) * 3


def test_a_td_the_agent_accepts_names_the_same_device_at_the_coordinator(registry: Registry) -> None:
    td = minimal_thing_description("pi-1", ram_kb=512, flash_kb=0, cpu="armv8", cpu_cores=4)
    data = json.dumps(td).encode()
    assert {_agent(data, TD_JSON), _baseline(data, TD_JSON), _register(registry, data, TD_JSON)} == {
        "urn:tinyfleet:device:pi-1"
    }
    no_id = json.dumps({k: v for k, v in td.items() if k != "id"}).encode()
    judged = (_agent(no_id, TD_JSON), _baseline(no_id, TD_JSON), _register(registry, no_id, TD_JSON))
    assert judged == (None, None, None)


def _fleet_shapes_accept(registry: Registry, td: dict[str, Any]) -> bool:
    return _register(registry, json.dumps(td).encode(), TD_JSON) is not None


BOUNDARIES: list[tuple[str, object]] = [
    ("ram_kb", 0), ("ram_kb", 0.5), ("ram_kb", -1), ("flash_kb", 0), ("flash_kb", -1),
    ("cpu_cores", 0), ("cpu_cores", 1), ("device_class", "toaster"), ("device_class", "gateway"),
]
_TERMS = {"ram_kb": "ramKB", "flash_kb": "flashKB", "cpu_cores": "cpuCores", "device_class": "deviceClass"}


@pytest.mark.parametrize(("argument", "value"), BOUNDARIES)
def test_the_agent_refuses_the_values_the_fleet_shapes_refuse(
    registry: Registry, argument: str, value: object
) -> None:
    """The agent checks its command-line resources early; the fleet shapes stay the rule."""
    base: dict[str, Any] = {"ram_kb": 64, "flash_kb": 64, "cpu": "x", "cpu_cores": 2, "device_class": "mcu"}
    td = minimal_thing_description("urn:dev:edge", **base)
    td[_TERMS[argument]] = value
    try:
        minimal_thing_description("urn:dev:edge", **{**base, argument: value})
        built = True
    except DescriptionError:
        built = False
    assert built == _fleet_shapes_accept(registry, td)


def _mutations(td: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Variants of a valid TD, each breaking (or not) one TD 1.1 rule."""
    edits = [
        lambda d: d.pop("title"),
        lambda d: d.update({"@context": "https://www.w3.org/2019/wot/td/v1"}),
        lambda d: d.update({"@context": ["https://example.org/other"]}),
        lambda d: d.update({"security": []}),
        lambda d: d.update({"securityDefinitions": {}}),
        lambda d: d["securityDefinitions"]["basic_sc"].update({"in": "nowhere"}),
        lambda d: d["securityDefinitions"].update({"x": {"scheme": "ex:custom"}}),
        lambda d: d["securityDefinitions"].update({"x": {"scheme": "custom"}}),
        lambda d: d["properties"]["status"].update({"type": "text"}),
        lambda d: d["properties"]["status"].update({"forms": []}),
        lambda d: d["properties"]["status"]["forms"][0].update({"op": "invokeaction"}),
        lambda d: d["actions"]["toggle"]["forms"][0].update({"op": ["invokeaction", "queryaction"]}),
        lambda d: d["events"]["overheating"].update({"data": {"type": "string", "minLength": "1"}}),
        lambda d: d.update({"version": {"model": "1"}}),
        lambda d: d.update({"links": [{"rel": "icon"}]}),
        lambda d: d.update({"@type": 7}),
        lambda d: d.update({"id": 7}),
    ]
    for edit in edits:
        variant = json.loads(json.dumps(td))
        edit(variant)
        yield variant


def test_the_compiled_schema_accepts_what_jsonschema_accepts() -> None:
    """td_problems asks fastjsonschema first and jsonschema, the reference, only on a failure:
    both must accept the same TDs, or a TD jsonschema refuses would pass."""
    from fastjsonschema import JsonSchemaException

    from tinyfleet.common.device_description import _td_schema, _td_schema_check

    examples = sorted((Path(__file__).parent / "registry" / "data" / "td-1.1").glob("*.td.json"))
    documents = [json.loads(path.read_bytes()) for path in examples]
    documents += list(_mutations(documents[[p.name for p in examples].index("example-1-lamp.td.json")]))
    documents.append(minimal_thing_description("pi", ram_kb=1, flash_kb=0, cpu="x", cpu_cores=1))
    verdicts = []
    for document in documents:
        try:
            _td_schema_check()(document)
            compiled = True
        except JsonSchemaException:
            compiled = False
        assert compiled == _td_schema().is_valid(document), document
        verdicts.append(compiled)
    assert verdicts.count(False) >= 12 and verdicts.count(True) >= len(examples) + 1


def test_the_device_classes_are_the_fleet_shapes() -> None:
    """The agent's --device-class choices are the values tfsh:Device allows for tf:deviceClass."""
    import rdflib
    from rdflib.collection import Collection

    from tinyfleet.common.device_description import DEVICE_CLASSES
    from tinyfleet.ontology import SHAPES_PATH, TF

    shapes = rdflib.Graph().parse(SHAPES_PATH, format="turtle")
    (shape,) = shapes.subjects(rdflib.SH.path, rdflib.URIRef(TF + "deviceClass"))
    allowed = shapes.value(shape, rdflib.SH["in"])
    assert allowed is not None
    assert sorted(str(value) for value in Collection(shapes, allowed)) == sorted(DEVICE_CLASSES)
