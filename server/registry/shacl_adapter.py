"""Every place tinyfleet drives pyshacl below its public `validate`, pinned to pyshacl==0.40.1.

`pyshacl.validate` parses the shapes graph and harvests its shapes on every call,
and runs each property shape once per focus node: most of a registration's cost.
The registry parses and harvests the fleet shapes once (`PreparedShapes`) and
runs them itself with pyshacl's own shape, executor and report classes, none of
which pyshacl documents. Keep this module the only one that imports them; its
contract test (tests/registry/test_shacl_adapter.py) fails when an upgrade moves
any of it or changes a verdict against pyshacl's own full run.
"""

from __future__ import annotations

import threading
from typing import Any, Final

import rdflib
from pyshacl.constraints import ALL_CONSTRAINT_PARAMETERS
from pyshacl.graph_abstraction import DataGraph
from pyshacl.pytypes import SHACLExecutor
from pyshacl.shapes_graph import ShapesGraph
from pyshacl.validator import Validator

PYSHACL_VERSION: Final = "0.40.1"


class PreparedShapes:
    """A shapes graph parsed and harvested once, run over many small data graphs.

    Only shapes that declare targets run at the top level: every other shape
    (property shapes, shapes reached through sh:node) selects no focus node of its
    own and is evaluated from those, so the verdict is a full run's. A targeted
    node shape whose only constraint parameter is sh:property runs each of its
    property shapes once over all its focus nodes, where pyshacl runs each once per
    focus node and rebuilds its constraint components every time; the property
    shapes' results are the same. No inference is applied.
    """

    def __init__(self, shapes: rdflib.Graph) -> None:
        self._shapes = ShapesGraph(shapes)
        self._targeted = [s for s in self._shapes.shapes if any(any(True for _ in t) for t in s.target())]
        self._property_shapes: dict[Any, list[Any]] = {}
        for shape in self._targeted:
            declared = {p for p, _ in shapes.predicate_objects(shape.node)}
            constraints = declared.intersection(ALL_CONSTRAINT_PARAMETERS)
            if constraints == {rdflib.SH.property} and not shape.deactivated:
                self._property_shapes[shape] = [
                    shape.get_other_shape(node) for node in shapes.objects(shape.node, rdflib.SH.property)
                ]
        self._lock = threading.Lock()  # pyshacl keeps per-run caches on the shapes

    def run(self, data: rdflib.Graph) -> rdflib.Graph | None:
        """The SHACL validation report of `data` (pyshacl's, sh:ValidationReport), None if it conforms."""
        graph = DataGraph.from_rdflib(data)
        executor = SHACLExecutor()
        conforms, results = True, []
        with self._lock:
            for shape in self._targeted:
                properties = self._property_shapes.get(shape)
                if properties is None:
                    shape_conforms, shape_results = shape.validate(executor, graph)
                    conforms = conforms and shape_conforms
                    results += shape_results
                    continue
                focus = list(shape.focus_nodes(graph))
                for prop in properties if focus else ():
                    shape_conforms, shape_results = prop.validate(executor, graph, focus=focus)
                    conforms = conforms and shape_conforms
                    results += shape_results
            if conforms:
                return None
            report, _ = Validator.create_validation_report(self._shapes, False, results)
        return report
