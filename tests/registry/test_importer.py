"""Published TinyML descriptions: quirk repairs on inline data, known answers on the real files."""

from __future__ import annotations

from pathlib import Path

import pyoxigraph as ox
import pytest
from starlette.testclient import TestClient

from tinyfleet.server.http.registry_routes import registry_app
from tinyfleet.server.registry.importer import ImportFailed, import_file, import_files
from tinyfleet.server.registry.sparql_updates import SKOLEM_PREFIX
from tinyfleet.server.registry.thing_graphs import Registry

QUIRKY_BOARD = """# baseURI: https://example.org/boards/quirky-1
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
@prefix s3n: <http://w3id.org/s3n/> .
@prefix schema: <https://schema.org/> .
@prefix ssn: <http://www.w3.org/ns/ssn/> .
@prefix ssn-system: <http://www.w3.org/ns/ssn/systems/> .
@prefix td: <https://www.w3.org/2019/wot/td#> .
@prefix om: <http://www.ontology-of-units-of-measure.org/resource/om-2/> .
@prefix s3n_extend: <https://w3id.org/tinyml-schema/neural-network-schema/s3n_extend/> .
@prefix sosa_extend: <https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/> .
<https://example.org/boards/quirky-1> a s3n:SmartSensor ;
  ssn:hasSubSystem [ a sosa_extend::Magnetometer ] , [ a sosa_extend:Accelerometer ] ;
  ssn:hasSubSystem [ a s3n:MicroController ; s3n:hasSystemCapability [
      ssn-system:hasSystemProperty [ a s3n_extend:Flash ; schema:unitCode om:kilobyte ; schema:value 700 ] ;
      ssn-system:hasSystemProperty [ a s3n_extend:RAM ; schema:unitCode om:kilobyte ; schema:value 200 ] ] ] ;
  td:title "quirky"@en .
"""

QUIRKY_MODELS = """@prefix nnet: <https://w3id.org/tinyml-schema/neural-network-schema#> .
@prefix ns1: <http://www.w3.org/ns/ssn/systems/> .
@prefix om: <http://www.ontology-of-units-of-measure.org/resource/om-2/> .
@prefix s3n: <http://w3id.org/s3n/> .
@prefix s3n_extend: <https://w3id.org/tinyml-schema/neural-network-schema/s3n_extend/> .
@prefix schema: <https://schema.org/> .
@prefix sosa_extend: <https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/> .
@prefix ssn: <http://www.w3.org/ns/ssn/> .
@prefix ssn_extend: <https://w3id.org/tinyml-schema/neural-network-schema/ssn_extend/> .
@prefix m: <https://example.org/nn/> .
m:fits a nnet:NeuralNetwork ; schema:name "fits" ; nnet:trainingDataset <None> ;
  s3n:hasProcedureFeature m:pf1, m:pf2 ; ssn:hasInput m:in1 .
m:pf1 a s3n:ProcedureFeature ; ns1:inCondition m:c1 .
m:pf2 a s3n:ProcedureFeature ; ns1:inCondition m:c2 .
m:c1 a s3n_extend:RAM, s3n:Memory ; schema:minValue 1.5e+02 ; schema:unitCode om:kilobyte .
m:c2 a s3n_extend:Flash, s3n:Memory ; schema:minValue 6.0e+02 ; schema:unitCode om:kilobyte .
m:s1 a sosa_extend:Magnetometer, schema:Sensor ; ssn_extend:provideInput m:in1 .
m:toobig a nnet:NeuralNetwork ; schema:name "toobig" ; s3n:hasProcedureFeature m:pf3, m:pf4 .
m:pf3 ns1:inCondition m:c3 . m:c3 a s3n_extend:RAM ; schema:minValue 201 ; schema:unitCode om:kilobyte .
m:pf4 ns1:inCondition m:c4 . m:c4 a s3n_extend:Flash ; schema:minValue 1 ; schema:unitCode om:kilobyte .
m:wrongsensor a nnet:NeuralNetwork ; schema:name "camera" ;
  s3n:hasProcedureFeature m:pf5, m:pf6 ; ssn:hasInput m:in2 .
m:pf5 ns1:inCondition m:c5 . m:c5 a s3n_extend:RAM ; schema:minValue 1 ; schema:unitCode om:kilobyte .
m:pf6 ns1:inCondition m:c6 . m:c6 a s3n_extend:Flash ; schema:minValue 1 ; schema:unitCode om:kilobyte .
m:s2 a sosa_extend:Camera ; ssn_extend:provideInput m:in2 .
"""


def test_quirks_are_repaired_and_reported(registry: Registry, tmp_path: Path) -> None:
    board = tmp_path / "dev_quirky.ttl"
    board.write_text(QUIRKY_BOARD)
    models = tmp_path / "models.ttl"
    models.write_text(QUIRKY_MODELS)
    board_report, model_report = import_files(registry, [board, models], base=None)
    kinds = {r.kind: r for r in board_report.repairs}
    assert kinds["S3N namespace"].count == 3
    assert "sosa_extend/:Magnetometer> renamed" in kinds["malformed class name"].detail
    assert board_report.devices == ["https://example.org/boards/quirky-1"]
    relative = [r for r in model_report.repairs if r.kind == "relative IRI"]
    assert [r.detail for r in relative] == [f"<None> resolved to <{models.parent.as_uri()}/None>"]
    assert model_report.models == [
        "https://example.org/nn/fits",
        "https://example.org/nn/toobig",
        "https://example.org/nn/wrongsensor",
    ]
    fits = registry.named("compatible-models", {"device": "https://example.org/boards/quirky-1"})
    # RAM 150 <= 200, flash 600 <= 700, magnetometer present after the class-name repair;
    # "toobig" needs 201 kB RAM, "camera" needs a camera.
    assert [row["name"].value for row in fits] == ["fits"]
    assert registry.store.query("ASK { ?s a <https://w3id.org/s3n/SmartSensor> }")
    assert not registry.store.query("ASK { ?s ?p ?o FILTER(STRSTARTS(STR(?o), 'http://w3id.org/s3n/')) }")


def test_skolemized_blank_nodes_are_reported_and_describe_follows_them(
    registry: Registry, tmp_path: Path
) -> None:
    """The board's two sensors, its microcontroller, the capability and the RAM and flash
    properties are blank nodes: stored as skolem IRIs, counted in the report, and a DESCRIBE
    of the board reaches the RAM and flash values four nodes down."""
    board = tmp_path / "dev_quirky.ttl"
    board.write_text(QUIRKY_BOARD)
    models = tmp_path / "models.ttl"
    models.write_text(QUIRKY_MODELS)
    board_report, model_report = import_files(registry, [board, models])
    assert (board_report.skolemized, model_report.skolemized) == (6, 0)
    assert not registry.store.query("ASK { GRAPH ?g { ?s ?p ?o FILTER(isBlank(?s) || isBlank(?o)) } }")
    with TestClient(registry_app(registry)) as client:
        response = client.get(
            "/sparql", params={"query": "DESCRIBE <https://example.org/boards/quirky-1>"},
            headers={"accept": "application/n-triples"},
        )
    assert response.status_code == 200, response.text
    triples = list(ox.parse(response.content, format=ox.RdfFormat.N_TRIPLES))
    values = {t.object.value for t in triples if t.predicate.value == "https://schema.org/value"}
    assert values == {"700", "200"}
    assert sum(t.subject.value.startswith(SKOLEM_PREFIX) for t in triples) >= 6 + 3  # types, links, values
    assert len({t.subject for t in triples}) == 1 + 6


def test_a_file_that_fails_the_shapes_writes_nothing(registry: Registry, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ttl"
    broken.write_text(
        QUIRKY_BOARD.replace("om:kilobyte ; schema:value 200", "om:megabyte ; schema:value 200")
    )
    with pytest.raises(ImportFailed, match="om:kilobyte") as caught:
        import_file(registry, broken)
    assert caught.value.problems
    assert registry.thing_ids() == ([], 0)
    bad_syntax = tmp_path / "bad.ttl"
    bad_syntax.write_text("<a> <b> .")
    with pytest.raises(ImportFailed, match="not valid Turtle"):
        import_file(registry, bad_syntax)


PREFIXES = """
PREFIX nnet: <https://w3id.org/tinyml-schema/neural-network-schema#>
PREFIX s3n: <https://w3id.org/s3n/>
PREFIX s3n_extend: <https://w3id.org/tinyml-schema/neural-network-schema/s3n_extend/>
PREFIX sosa_extend: <https://w3id.org/tinyml-schema/neural-network-schema/sosa_extend/>
PREFIX ssn_extend: <https://w3id.org/tinyml-schema/neural-network-schema/ssn_extend/>
PREFIX ssn: <http://www.w3.org/ns/ssn/>
PREFIX ssn-system: <http://www.w3.org/ns/ssn/systems/>
PREFIX schema: <https://schema.org/>
PREFIX td: <https://www.w3.org/2019/wot/td#>
"""

BOARDS = (
    PREFIXES
    + """
SELECT ?board ?ram ?flash WHERE {
  ?board a s3n:SmartSensor ;
         ssn:hasSubSystem/a sosa_extend:Accelerometer ;
         ssn:hasSubSystem/a sosa_extend:Gyroscope ;
         ssn:hasSubSystem ?mcu .
  ?mcu s3n:hasSystemCapability/ssn-system:hasSystemProperty ?r, ?f .
  ?r a s3n_extend:RAM ; schema:value ?ram .
  ?f a s3n_extend:Flash ; schema:value ?flash .
  FILTER(?ram >= 121 && ?flash >= 610)
} ORDER BY ?ram
"""
)

CAMERA_MODELS = (
    PREFIXES
    + """
SELECT ?name ?ram ?flash WHERE {
  ?model a nnet:NeuralNetwork ; schema:name ?name ; ssn:hasInput ?input ;
         s3n:hasProcedureFeature/ssn-system:inCondition ?r, ?f .
  ?sensor ssn_extend:provideInput ?input ; a sosa_extend:Camera .
  ?r a s3n_extend:RAM ; schema:minValue ?ram .
  ?f a s3n_extend:Flash ; schema:minValue ?flash .
  FILTER(?ram <= 144 && ?flash <= 621)
} ORDER BY ?name
"""
)

YES_NO_MODELS = (
    PREFIXES
    + """
SELECT ?name ?accuracy WHERE {
  ?model a nnet:NeuralNetwork ; schema:name ?name ; schema:description ?description ;
         nnet:trainingDataset ?dataset ; ssn:hasInput ?input ; nnet:hasMetric ?metric .
  ?sensor ssn_extend:provideInput ?input ; a sosa_extend:Microphone .
  ?metric a nnet:Top_1_accuracy ; nnet:hasMetricValue ?accuracy .
  FILTER(CONTAINS(LCASE(?description), "yes/no") && CONTAINS(STR(?dataset), "speech_commands"))
} ORDER BY ?accuracy
"""
)


def _sparql(client: TestClient, query: str) -> list[dict[str, str]]:
    response = client.get(
        "/sparql", params={"query": query}, headers={"accept": "application/sparql-results+json"}
    )
    assert response.status_code == 200, response.text
    return [{k: v["value"] for k, v in b.items()} for b in response.json()["results"]["bindings"]]


def test_published_seloc_data_gives_the_known_answers(registry: Registry, shared_data: Path) -> None:
    folder = shared_data / "seloc_ml"
    reports = import_files(registry, sorted(folder.glob("*.ttl")))
    assert sum(len(r.devices) for r in reports) == 9 and sum(len(r.models) for r in reports) == 23
    repaired = {r.kind for report in reports for r in report.repairs}
    assert {"relative IRI", "S3N namespace", "malformed class name"} <= repaired
    with TestClient(registry_app(registry)) as client:
        boards = _sparql(client, BOARDS)
        assert [(b["ram"], b["flash"]) for b in boards] == [("172", "628"), ("187", "785")]
        assert all("arduino_nano_ble_33" in b["board"] for b in boards)
        cameras = _sparql(client, CAMERA_MODELS)
        assert [(float(m["ram"]), float(m["flash"])) for m in cameras] == [
            (94.128, 236.072),
            (116.48, 531.624),
        ]
        assert [m["name"] for m in cameras] == ["Person_Detection", "Visual_Alarm_Clock"]
        yes_no = _sparql(client, YES_NO_MODELS)
        assert [(m["name"], float(m["accuracy"])) for m in yes_no] == [
            ("Micro_Speech_Yes_No_2", 82.3),
            ("Micro_Speech_Yes_No_4", 83.0),
            ("Micro_Speech_Yes_No_1", 92.1),
            ("Micro_Speech_Yes_No_3", 93.2),
        ]
    kit = "https://w3id.org/tinyml-schema/neural-network-schema/tinyml-demo/arduino_nano_ble_33_tinyml_kit-322-000-000-003"
    names = {row["name"].value for row in registry.named("compatible-models", {"device": kit})}
    assert {"Person_Detection", "Visual_Alarm_Clock", "Micro_Speech_Yes_No_1"} <= names
    assert "ARM_MicroNet_VWW_3" not in names  # needs 206.976 kB RAM, the kit has 187
