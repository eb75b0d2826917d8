"""Derive the fleet ontology's shortcut properties from the long S3N/TinyML forms.

Published TinyML descriptions spread a board's RAM over five nodes
(board -> subsystem -> capability -> property -> value) and a model's needs over
four. The fleet queries compare one triple per fact (tf:ramKB vs
tf:requiresRamKB), so a description that states only the long form gets the
shortcut added here, before validation; one that states both keeps its own.
Nothing is removed. A fleet device is typed tf:Device, which is what the device
shapes (the fleet's requirements) and the queries select on: a device that
registers to train, or a Thing whose description says it is one (a tinyfleet
device class, or its RAM or flash stated). Any other Thing stays as described.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Final, TypeGuard

import pyoxigraph as ox

from tinyfleet.common.device_description import FLEET_DEVICE_TYPES
from tinyfleet.ontology import (
    NNET,
    RDF,
    S3N,
    S3N_EXTEND,
    SCHEMA,
    SOSA_EXTEND,
    SSN,
    SSN_EXTEND,
    SSN_SYSTEM,
    TF,
)

_TYPE: Final = ox.NamedNode(RDF + "type")
_HAS_SUBSYSTEM: Final = ox.NamedNode(SSN + "hasSubSystem")
_HAS_CAPABILITY: Final = ox.NamedNode(S3N + "hasSystemCapability")
_HAS_PROPERTY: Final = ox.NamedNode(SSN_SYSTEM + "hasSystemProperty")
_PROCEDURE_FEATURE: Final = ox.NamedNode(S3N + "hasProcedureFeature")
_IN_CONDITION: Final = ox.NamedNode(SSN_SYSTEM + "inCondition")
_HAS_INPUT: Final = ox.NamedNode(SSN + "hasInput")
_PROVIDE_INPUT: Final = ox.NamedNode(SSN_EXTEND + "provideInput")
_VALUE: Final = ox.NamedNode(SCHEMA + "value")
_MIN_VALUE: Final = ox.NamedNode(SCHEMA + "minValue")
_RAM: Final = ox.NamedNode(S3N_EXTEND + "RAM")
_FLASH: Final = ox.NamedNode(S3N_EXTEND + "Flash")
DEVICE: Final = ox.NamedNode(TF + "Device")
MODEL_CLASSES: Final = (ox.NamedNode(NNET + "NeuralNetwork"), ox.NamedNode(TF + "ModelArtifact"))
#: Sensor classes outside the sosa_extend namespace that the ontology declares.
_TF_SENSORS: Final = frozenset(TF + name for name in ("Hygrometer", "LightSensor", "CO2Sensor"))


def is_sensor_class(term: object) -> TypeGuard[ox.NamedNode]:
    return isinstance(term, ox.NamedNode) and (
        term.value.startswith(SOSA_EXTEND) or term.value in _TF_SENSORS
    )


class _Index:
    def __init__(self, triples: Iterable[ox.Triple]) -> None:
        self.out: dict[object, dict[ox.NamedNode, list[object]]] = defaultdict(lambda: defaultdict(list))
        self.into: dict[tuple[ox.NamedNode, object], list[object]] = defaultdict(list)
        for t in triples:
            self.out[t.subject][t.predicate].append(t.object)
            self.into[(t.predicate, t.object)].append(t.subject)

    def objects(self, subject: object, predicate: ox.NamedNode) -> list[object]:
        node = self.out.get(subject)
        return node.get(predicate, []) if node else []

    def path(self, subject: object, *predicates: ox.NamedNode) -> list[object]:
        nodes = [subject]
        for predicate in predicates:
            nodes = [o for n in nodes for o in self.objects(n, predicate)]
        return nodes

    def typed(self, node: object, cls: ox.NamedNode) -> bool:
        return cls in self.objects(node, _TYPE)


def _numbers(values: list[object]) -> list[ox.Literal]:
    return [v for v in values if isinstance(v, ox.Literal)]


def _largest(values: list[ox.Literal]) -> ox.Literal | None:
    best: tuple[float, ox.Literal] | None = None
    for literal in values:
        try:
            number = float(literal.value)
        except ValueError:
            continue
        if best is None or number > best[0]:
            best = (number, literal)
    return best[1] if best else None


def normalize_device(triples: list[ox.Triple], device: str, *, fleet_device: bool = False) -> list[ox.Triple]:
    """The device's triples plus any derivable tf:ramKB/flashKB/sensorType, and `a tf:Device`
    when it is a fleet device (the module docstring; `fleet_device`: it registers to train)."""
    subject = ox.NamedNode(device)
    index = _Index(triples)
    added: list[ox.Triple] = []
    memory = index.path(subject, _HAS_SUBSYSTEM, _HAS_CAPABILITY, _HAS_PROPERTY)
    for shortcut, cls in ((TF + "ramKB", _RAM), (TF + "flashKB", _FLASH)):
        prop = ox.NamedNode(shortcut)
        if index.objects(subject, prop):
            continue
        value = _largest(
            _numbers([v for node in memory if index.typed(node, cls) for v in index.objects(node, _VALUE)])
        )
        if value is not None:
            added.append(ox.Triple(subject, prop, value))
    sensor_type = ox.NamedNode(TF + "sensorType")
    stated = set(index.objects(subject, sensor_type))
    for part in index.objects(subject, _HAS_SUBSYSTEM):
        for kind in index.objects(part, _TYPE):
            if is_sensor_class(kind) and kind not in stated:
                stated.add(kind)
                added.append(ox.Triple(subject, sensor_type, kind))
    memory_facts = {ox.NamedNode(TF + "ramKB"), ox.NamedNode(TF + "flashKB")}
    fleet_device = (
        fleet_device
        or any(index.typed(subject, ox.NamedNode(cls)) for cls in FLEET_DEVICE_TYPES)
        or any(index.objects(subject, fact) for fact in memory_facts)
        or any(t.predicate in memory_facts for t in added)
    )
    if fleet_device and not index.typed(subject, DEVICE):
        added.insert(0, ox.Triple(subject, _TYPE, DEVICE))
    return triples + added


def model_subjects(triples: list[ox.Triple]) -> list[ox.NamedNode]:
    """Subjects typed as a neural network or a tinyfleet model artifact, in order of appearance."""
    seen: dict[ox.NamedNode, None] = {}
    for t in triples:
        if t.predicate == _TYPE and t.object in MODEL_CLASSES and isinstance(t.subject, ox.NamedNode):
            seen.setdefault(t.subject)
    return list(seen)


def normalize_models(triples: list[ox.Triple]) -> list[ox.Triple]:
    """Every model in `triples` gets tf:requiresRamKB/FlashKB/SensorType derived when absent."""
    index = _Index(triples)
    added: list[ox.Triple] = []
    for model in model_subjects(triples):
        conditions = index.path(model, _PROCEDURE_FEATURE, _IN_CONDITION)
        for shortcut, cls in ((TF + "requiresRamKB", _RAM), (TF + "requiresFlashKB", _FLASH)):
            prop = ox.NamedNode(shortcut)
            if index.objects(model, prop):
                continue
            needs = [
                v for node in conditions if index.typed(node, cls) for v in index.objects(node, _MIN_VALUE)
            ]
            value = _largest(_numbers(needs))
            if value is not None:
                added.append(ox.Triple(model, prop, value))
        requires = ox.NamedNode(TF + "requiresSensorType")
        stated = set(index.objects(model, requires))
        for model_input in index.objects(model, _HAS_INPUT):
            for sensor in index.into.get((_PROVIDE_INPUT, model_input), []):
                for kind in index.objects(sensor, _TYPE):
                    if is_sensor_class(kind) and kind not in stated:
                        stated.add(kind)
                        added.append(ox.Triple(model, requires, kind))
    return triples + added
