"""The validator runs only the shapes with targets: its verdicts must be pyshacl's full run's."""

from __future__ import annotations

import random

import pyoxigraph as ox
import pyshacl
import pytest
import rdflib

from tinyfleet.ontology import SHAPES_PATH
from tinyfleet.server.registry.validation import ShaclValidator, _compact, _to_rdflib

PREFIXES = """@prefix tf: <https://w3id.org/tinyfleet#> . @prefix td: <https://www.w3.org/2019/wot/td#> .
@prefix nnet: <https://w3id.org/tinyml-schema/neural-network-schema#> .
@prefix schema: <https://schema.org/> .
@prefix xsd: <http://www.w3.org/2001/XMLSchema#> .
@prefix s3n_extend: <https://w3id.org/tinyml-schema/neural-network-schema/s3n_extend/> .
"""

CASES = {
    "good device": '<urn:d> a tf:Device ; td:title "d" ; tf:ramKB 256 ; tf:flashKB 1 ; tf:deviceClass "mcu".',
    "bad device": '<urn:d> a tf:Device ; tf:ramKB -1, 5 ; tf:deviceClass "phone" ; tf:cpu 3 .',
    "bad memory node": '<urn:m> a s3n_extend:RAM ; schema:value "lots" .',
    "model without needs": '<urn:n> a nnet:NeuralNetwork ; tf:requiresRamKB -3 .',
    "artifact": '<urn:a> a tf:ModelArtifact ; tf:hasEncodedSize [ tf:encoding "fp32" ] .',
}


def _triples(body: str) -> list[ox.Triple]:
    return [q.triple for q in ox.parse((PREFIXES + body).encode(), format=ox.RdfFormat.TURTLE)]


def _pyshacl_full(triples: list[ox.Triple]) -> set[tuple[str, str]]:
    data = rdflib.Graph()
    for t in triples:
        data.add((_to_rdflib(t.subject), _to_rdflib(t.predicate), _to_rdflib(t.object)))
    shapes = rdflib.Graph().parse(SHAPES_PATH, format="turtle")
    _, report, _ = pyshacl.validate(data, shacl_graph=shapes, inference="none")
    found = set()
    for result in report.objects(None, rdflib.SH.result):
        path = report.value(result, rdflib.SH.resultPath)
        found.add((_compact(report.value(result, rdflib.SH.focusNode)), _compact(path) if path else ""))
    return found


def test_verdicts_match_a_full_pyshacl_run() -> None:
    validator = ShaclValidator.shared()
    failing = 0
    for name, body in CASES.items():
        triples = _triples(body)
        ours = {
            tuple(p.path.split(" ", 1)) if " " in p.path else (p.path, "")
            for p in validator.validate(triples)
        }
        assert ours == _pyshacl_full(triples), name
        failing += bool(ours)
    assert failing == len(CASES) - 1  # every case but the good device finds problems


def test_verdicts_on_their_own_are_remembered_batch_verdicts_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    validator = ShaclValidator()
    bad, good = _triples(CASES["bad device"]), _triples(CASES["good device"])
    first = validator.validate(bad)
    assert first
    validator.validate_many([good, good[:-1]])  # a batch: its verdicts are not kept
    runs: list[int] = []
    real_run = validator._run

    def counted_run(graphs):
        runs.append(len(graphs))
        return real_run(graphs)

    monkeypatch.setattr(validator, "_run", counted_run)
    assert validator.validate(bad) == first and runs == []
    assert validator.validate_many([good, bad]) == [[], first] and runs == [1]


def test_a_group_gets_each_description_the_problems_a_full_pyshacl_run_finds_in_it_alone() -> None:
    """validate_each (shared runs, property shapes run over all focus nodes at once) against
    pyshacl's own full run of each description on its own: same paths, same messages."""
    from tinyfleet.server.registry.validation import _problems

    rng = random.Random(3)
    bodies = []
    for i in range(60):
        ram = rng.choice(["256", "-1", '"lots"', "64, 128"])
        klass = rng.choice(['"mcu"', '"phone"', '"sbc"'])
        title = rng.choice(['td:title "d" ;', ""])
        extra = rng.choice(["", "tf:cpu 3 ;", 'tf:site "a", "b" ;', "tf:sensorType \"Camera\" ;"])
        bodies.append(f"<urn:d{i}> a tf:Device ; {title} {extra} tf:ramKB {ram} ; tf:flashKB 1 ; "
                      f"tf:deviceClass {klass} .")
    bodies += [CASES["bad memory node"], CASES["model without needs"], CASES["artifact"]]
    bodies += ['<urn:shared> a tf:Device ; td:title "x" .', "<urn:shared> tf:ramKB 5 ; tf:flashKB 5 ."]
    descriptions = [_triples(body) for body in bodies]
    shapes = rdflib.Graph().parse(SHAPES_PATH, format="turtle")
    expected = []
    for triples in descriptions:
        data = rdflib.Graph()
        for t in triples:
            data.add((_to_rdflib(t.subject), _to_rdflib(t.predicate), _to_rdflib(t.object)))
        conforms, report, _ = pyshacl.validate(data, shacl_graph=shapes, inference="none")
        expected.append([] if conforms else [problem for problem, _ in _problems(report)])
    assert sum(1 for found in expected if found) > 30
    assert ShaclValidator().validate_each(descriptions) == expected
