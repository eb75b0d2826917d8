"""The pyshacl internals behind server/registry/shacl_adapter.py: an upgrade that moves them fails here.

`PreparedShapes` drives pyshacl's shape, executor and report classes directly. What we
rely on is that it reports exactly what `pyshacl.validate` reports for every kind of
shape the fleet uses or might: targets of each kind, node shapes made only of
sh:property (run in one batch per property shape), node shapes with other constraint
parameters (sh:closed, sh:in: never batched), sh:node into a shape without
targets, deactivated shapes, several focus nodes at once.
"""

from __future__ import annotations

import pyshacl
import pytest
import rdflib
from rdflib.namespace import SH

from tinyfleet.server.registry.shacl_adapter import PYSHACL_VERSION, PreparedShapes

SHAPES = """
@prefix sh: <http://www.w3.org/ns/shacl#> . @prefix xsd: <http://www.w3.org/2001/XMLSchema#> .
@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> . @prefix ex: <urn:ex:> .

ex:DeviceShape a sh:NodeShape ; sh:targetClass ex:Device ;
    sh:property ex:ramProp, ex:classProp, ex:memoryProp .
ex:ramProp sh:path ex:ramKB ; sh:datatype xsd:integer ; sh:minInclusive 1 ; sh:minCount 1 ; sh:maxCount 1 .
ex:classProp sh:path ex:deviceClass ; sh:in ("mcu" "sbc") .
ex:memoryProp sh:path ex:memory ; sh:node ex:MemoryShape .
ex:MemoryShape a sh:NodeShape ; sh:property ex:sizeProp .
ex:sizeProp sh:path ex:size ; sh:datatype xsd:integer ; sh:minCount 1 .

ex:ClosedShape a sh:NodeShape ; sh:targetSubjectsOf ex:sealed ; sh:closed true ;
    sh:ignoredProperties (ex:sealed) ; sh:property ex:labelProp .
ex:labelProp sh:path ex:label ; sh:maxCount 1 .

ex:Model a rdfs:Class, sh:NodeShape ; sh:in (ex:n ex:n2) ; sh:property ex:needsProp .
ex:needsProp sh:path ex:needsKB ; sh:minInclusive 0 ; sh:severity sh:Warning .

ex:NodeTarget a sh:NodeShape ; sh:targetNode ex:special ; sh:nodeKind sh:IRI ;
    sh:property ex:ownerProp .
ex:ownerProp sh:path ex:owner ; sh:minCount 1 ; sh:message "special needs an owner" .

ex:ObjectsShape a sh:NodeShape ; sh:targetObjectsOf ex:memory ; sh:property ex:unitProp .
ex:unitProp sh:path ex:unit ; sh:maxCount 1 .

ex:Off a sh:NodeShape ; sh:targetClass ex:Device ; sh:deactivated true ;
    sh:property ex:neverProp .
ex:neverProp sh:path ex:never ; sh:minCount 1 .
"""

PREFIX = "@prefix ex: <urn:ex:> . @prefix xsd: <http://www.w3.org/2001/XMLSchema#> .\n"
CASES = {
    "conforms": """ex:d1 a ex:Device ; ex:ramKB 64 ; ex:deviceClass "mcu" ; ex:memory ex:m1 .
        ex:m1 ex:size 4 ; ex:unit "KB" . ex:special ex:owner ex:d1 .""",
    "many devices": """ex:d1 a ex:Device ; ex:ramKB -1, 3 ; ex:deviceClass "phone" .
        ex:d2 a ex:Device ; ex:ramKB "lots" ; ex:memory ex:m2 .
        ex:d3 a ex:Device . ex:m2 ex:size "big" ; ex:unit "KB", "MB" .""",
    "closed shape": """ex:c ex:sealed true ; ex:label "a", "b" ; ex:extra 1 . ex:special ex:owner ex:c .""",
    "implicit class target": """ex:n a ex:Model ; ex:needsKB -5 . ex:other a ex:Model .
        ex:special ex:owner ex:n .""",
    "node and objects targets": """ex:special ex:name "s" . ex:x ex:memory ex:y . ex:y ex:unit "a", "b" .""",
    "no target reached": """ex:m ex:size "not validated: MemoryShape has no target" .
        ex:special ex:owner ex:m .""",
}


def _graph(body: str) -> rdflib.Graph:
    return rdflib.Graph().parse(data=PREFIX + body, format="turtle")


def _results(report: rdflib.Graph | None) -> set[tuple[str, ...]]:
    if report is None:
        return set()
    fields = (
        SH.focusNode,
        SH.resultPath,
        SH.value,
        SH.sourceShape,
        SH.sourceConstraintComponent,
        SH.resultSeverity,
        SH.resultMessage,
    )
    return {
        tuple(str(report.value(result, field)) for field in fields)
        for result in report.objects(None, SH.result)
    }


def test_pinned_pyshacl_version_is_installed() -> None:
    assert pyshacl.__version__ == PYSHACL_VERSION


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepared_shapes_report_what_a_full_pyshacl_run_reports(case: str) -> None:
    shapes = rdflib.Graph().parse(data=SHAPES, format="turtle")
    data = _graph(CASES[case])
    conforms, full, _ = pyshacl.validate(data, shacl_graph=shapes, inference="none")
    report = PreparedShapes(shapes).run(data)
    assert (report is None) == conforms
    assert isinstance(full, rdflib.Graph)
    assert _results(report) == _results(full)
    if report is not None:
        assert set(report.objects(None, SH.conforms)) == {rdflib.Literal(False)}


def test_results_are_the_cases_own() -> None:
    """The comparison above is not vacuous: each failing case finds what its shapes forbid."""
    shapes = PreparedShapes(rdflib.Graph().parse(data=SHAPES, format="turtle"))
    components = {
        case: {r[4].rsplit("#", 1)[1] for r in _results(shapes.run(_graph(body)))}
        for case, body in CASES.items()
    }
    assert components["conforms"] == set() and components["no target reached"] == set()
    assert {
        "MinInclusiveConstraintComponent",
        "MaxCountConstraintComponent",
        "InConstraintComponent",
        "DatatypeConstraintComponent",
        "MinCountConstraintComponent",
        "NodeConstraintComponent",
    } <= components["many devices"]
    assert components["closed shape"] == {"ClosedConstraintComponent", "MaxCountConstraintComponent"}
    assert components["implicit class target"] == {"MinInclusiveConstraintComponent", "InConstraintComponent"}
    assert components["node and objects targets"] == {
        "MinCountConstraintComponent",
        "MaxCountConstraintComponent",
    }


def test_one_prepared_shapes_serves_many_runs_with_independent_reports() -> None:
    shapes = PreparedShapes(rdflib.Graph().parse(data=SHAPES, format="turtle"))
    first = _results(shapes.run(_graph(CASES["implicit class target"])))
    assert shapes.run(_graph(CASES["conforms"])) is None
    assert _results(shapes.run(_graph(CASES["implicit class target"]))) == first
