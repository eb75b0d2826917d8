"""RDF for the models rounds produce: what the artifact is, what it needs, where it came from.

Each global model a round commits becomes a tf:ModelArtifact in its own graph
(urn:tinyfleet:artifact:<sha256>): zoo architecture, task, input shape,
parameter count, exact wire size per encoding (dense fp32, int8, top-10% sparse,
measured by encoding it with tinyfleet's codec), the memory it needs, the round
that generated it (with its job and contributing devices, PROV-O) and the
artifact it was derived from. Because it states tf:requiresRamKB/FlashKB like
any published model, the compatible-models query tells which devices can run it.

A prototype artifact (FedProto's: a backbone and a merged prototype set, see
`tinyfleet.common.proto_protocol`) also states each class it knows
(tf:knowsClass -> tf:ClassPrototype: tf:classLabel, tf:exampleCount, and
prov:wasAttributedTo the devices whose examples its prototype holds, found from
the artifact's node ids). Its weights are the backbone's and the prototypes'
means; the counts, labels and node ids beside them are bookkeeping, counted
neither as parameters nor in the encoded sizes.

Memory (one sample, fp32, from `tinyfleet.common.memory_model`): running needs
the weights plus the largest input+output pair of any layer (its trace); flash
holds the fp32 weights. Training is described under each standard update plan
("full", "last-layer", "biases") and the planner's plan at 64, 128 and 256 kB,
each a tf:TrainingRequirement with the plan's JSON (what a device is sent), the
parameters it trains, the RAM of a step (schema:minValue) and the flash its
frozen weights stay in: the memory model's defaults, which `plan_for_budget`
also uses, so a device whose tf:ramKB holds a plan is given that plan or a larger
one. The trainable-devices query picks, per device, the described plan that fits.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyoxigraph as ox

from tinyfleet.common.proto_protocol import MEANS_KEY, global_contributors, split_global
from tinyfleet.ontology import NNET, OM, PROV, RDF, SCHEMA, TF, XSD
from tinyfleet.server.registry.sparql_updates import datetime_literal

if TYPE_CHECKING:
    from flwr.app import ArrayRecord
    from torch import nn

    from tinyfleet.common.update_plan import UpdatePlan

SPARSE_TOP_P = 0.1
PLANNER_BUDGETS_KB = (64, 128, 256)


def artifact_iri(sha: str) -> str:
    return f"urn:tinyfleet:artifact:{sha}"


def job_iri(job_id: int) -> str:
    return f"urn:tinyfleet:job:{job_id}"


def round_iri(job_id: int, round_number: int) -> str:
    return f"urn:tinyfleet:job:{job_id}:round:{round_number}"


@dataclass(frozen=True)
class PlanNeeds:
    """One update plan and what a training step under it needs."""

    plan: UpdatePlan
    trained_parameters: int
    ram_kb: float
    flash_kb: float


@dataclass(frozen=True)
class MemoryNeeds:
    run_kb: float
    flash_kb: float
    plans: tuple[PlanNeeds, ...]


def memory_needs(model_name: str, parameters: int) -> MemoryNeeds:
    """`parameters` counts what the artifact stores (a prototype set's means included)."""
    weights = 4 * parameters
    largest_pair, plans = _model_needs(model_name)
    return MemoryNeeds(run_kb=(weights + largest_pair) / 1000, flash_kb=weights / 1000, plans=plans)


@functools.cache
def _model_needs(model_name: str) -> tuple[int, tuple[PlanNeeds, ...]]:
    """Bytes of the largest layer input+output pair, and the plans (depend on the architecture only)."""
    from tinyfleet.common.memory_model import FP32, estimate, trace
    from tinyfleet.common.models import build_model, get_model_spec
    from tinyfleet.common.update_plan import STANDARD_PLANS, PlanError, standard_plan

    spec = get_model_spec(model_name)
    model = build_model(model_name, seed=0)
    classification = spec.task == "classification"
    traced = trace(model, spec.input_shape, 1, classification)
    largest_pair = max((c.input_bytes + c.output_bytes for c in traced.calls), default=0)
    plans: list[UpdatePlan] = []
    for make in [*(functools.partial(standard_plan, name, model) for name in STANDARD_PLANS),
                 *(functools.partial(_planned, model, kb, spec.input_shape, classification)
                   for kb in PLANNER_BUDGETS_KB)]:
        try:
            plan = make()
        except PlanError:
            continue  # a model without parameters has no plan; a budget may be too small for any
        if all((plan.bias_layers, plan.weights) != (p.bias_layers, p.weights) for p in plans):
            plans.append(plan)
    needs = []
    for plan in plans:
        memory = estimate(model, plan, spec.input_shape, classification=classification, traced=traced)
        trained = memory.trainable_weights // FP32
        if trained:  # a model without parameters ("identity") trains nothing under any plan
            needs.append(PlanNeeds(plan, trained, memory.ram / 1000, memory.flash / 1000))
    return largest_pair, tuple(needs)


def _planned(
    model: nn.Module, budget_kb: int, sample_shape: tuple[int, ...], classification: bool
) -> UpdatePlan:
    from tinyfleet.common.memory_model import plan_for_budget

    return plan_for_budget(model, budget_kb * 1000, sample_shape, classification=classification)[0]


def encoded_sizes(arrays: Mapping[str, Any]) -> dict[str, int]:
    """Bytes on the wire of the weights in each encoding, by encoding them."""
    from tinyfleet.common.codec import encode
    from tinyfleet.common.flower_adapter import array_values  # packed payloads are raw bytes, not .npy

    tensors = {name: array.numpy() for name, array in arrays.items()}
    dense = sum(t.astype("float32").nbytes for t in tensors.values())

    def packed(**options: Any) -> int:
        record = encode(tensors, **options)
        return int(sum(array_values(a).nbytes for a in record.values()))

    return {"fp32": dense, "int8": packed(quantize="int8"), "sparse": packed(top_p=SPARSE_TOP_P)}


def describe_round_artifact(
    *,
    sha: str,
    job_id: int,
    round_number: int,
    strategy: str,
    model_name: str,
    parent_sha: str | None,
    finished_at: float,
    contributors: Sequence[str],
    metrics: Mapping[str, float],
    arrays: ArrayRecord,
    devices: Mapping[int, str],
) -> list[ox.Triple]:
    """The triples of the artifact's graph (artifact, its round and its job). `devices` maps node
    ids to device IRIs (a prototype artifact names its classes' contributors by node id)."""
    from tinyfleet.common.models import get_model_spec

    spec = get_model_spec(model_name)
    backbone, known = split_global(arrays)
    weights = dict(arrays.items() if known is None else [*backbone.items(), (MEANS_KEY, arrays[MEANS_KEY])])
    parameters = int(sum(array.numpy().size for array in weights.values()))
    needs = memory_needs(model_name, parameters)
    art, rnd, job = (
        ox.NamedNode(artifact_iri(sha)),
        ox.NamedNode(round_iri(job_id, round_number)),
        ox.NamedNode(job_iri(job_id)),
    )
    kb = ox.NamedNode(OM + "kilobyte")

    def p(name: str) -> ox.NamedNode:
        return ox.NamedNode(name)

    def lit(value: Any, datatype: str | None = None) -> ox.Literal:
        if isinstance(value, bool):
            raise TypeError("no booleans here")
        if isinstance(value, int):
            return ox.Literal(str(value), datatype=ox.NamedNode(XSD + "integer"))
        if isinstance(value, float):
            return ox.Literal(repr(value), datatype=ox.NamedNode(XSD + (datatype or "double")))
        return ox.Literal(str(value))

    node_counter = iter(range(1_000_000))

    def node(kind: str) -> ox.NamedNode:
        return ox.NamedNode(f"{artifact_iri(sha)}#{kind}-{next(node_counter)}")

    triples = [
        ox.Triple(art, p(RDF + "type"), p(TF + "ModelArtifact")),
        ox.Triple(art, p(RDF + "type"), p(NNET + "NeuralNetwork")),
        ox.Triple(art, p(SCHEMA + "name"), lit(f"{model_name} job {job_id} round {round_number}")),
        ox.Triple(art, p(TF + "sha256"), lit(sha)),
        ox.Triple(art, p(TF + "architecture"), lit(model_name)),
        ox.Triple(art, p(TF + "task"), lit(spec.task)),
        ox.Triple(art, p(TF + "inputShape"), lit(json.dumps(list(spec.input_shape)))),
        ox.Triple(art, p(TF + "parameterCount"), lit(parameters)),
        ox.Triple(art, p(TF + "framework"), lit("pytorch")),
        ox.Triple(art, p(TF + "quantization"), lit("fp32")),
        ox.Triple(art, p(TF + "requiresRamKB"), lit(round(needs.run_kb, 3), "decimal")),
        ox.Triple(art, p(TF + "requiresFlashKB"), lit(round(needs.flash_kb, 3), "decimal")),
        ox.Triple(art, p(PROV + "wasGeneratedBy"), rnd),
    ]
    for encoding, size in encoded_sizes(weights).items():
        size_node = node("size")
        triples += [
            ox.Triple(art, p(TF + "hasEncodedSize"), size_node),
            ox.Triple(size_node, p(RDF + "type"), p(TF + "EncodedSize")),
            ox.Triple(size_node, p(TF + "encoding"), lit(encoding)),
            ox.Triple(size_node, p(TF + "sizeBytes"), lit(size)),
        ]
    for planned in needs.plans:
        requirement = node("train")
        triples += [
            ox.Triple(art, p(TF + "hasTrainingRequirement"), requirement),
            ox.Triple(requirement, p(RDF + "type"), p(TF + "TrainingRequirement")),
            ox.Triple(requirement, p(TF + "updatePlan"), lit(planned.plan.name)),
            ox.Triple(requirement, p(TF + "planJson"), lit(planned.plan.to_json())),
            ox.Triple(requirement, p(TF + "trainedParameterCount"), lit(planned.trained_parameters)),
            ox.Triple(requirement, p(SCHEMA + "minValue"), lit(planned.ram_kb, "decimal")),
            ox.Triple(requirement, p(TF + "trainingFlashKB"), lit(planned.flash_kb, "decimal")),
            ox.Triple(requirement, p(SCHEMA + "unitCode"), kb),
        ]
    for name, value in sorted(metrics.items()):
        metric = node("metric")
        triples += [
            ox.Triple(art, p(NNET + "hasMetric"), metric),
            ox.Triple(metric, p(RDF + "type"), p(NNET + "Metric")),
            ox.Triple(metric, p(TF + "metricName"), lit(name)),
            ox.Triple(metric, p(NNET + "hasMetricValue"), lit(float(value))),
        ]
    if parent_sha:
        parent = ox.NamedNode(artifact_iri(parent_sha))
        triples += [
            ox.Triple(art, p(PROV + "wasDerivedFrom"), parent),
            ox.Triple(rnd, p(PROV + "used"), parent),
        ]
    ended = dt.datetime.fromtimestamp(finished_at, dt.UTC)
    triples += [
        ox.Triple(rnd, p(RDF + "type"), p(TF + "Round")),
        ox.Triple(rnd, p(TF + "roundNumber"), lit(round_number)),
        ox.Triple(rnd, p(TF + "ofJob"), job),
        ox.Triple(rnd, p(PROV + "endedAtTime"), datetime_literal(ended)),
        ox.Triple(job, p(RDF + "type"), p(TF + "Job")),
        ox.Triple(job, p(TF + "jobId"), lit(job_id)),
        ox.Triple(job, p(TF + "strategy"), lit(strategy)),
    ]
    triples += [
        ox.Triple(rnd, p(TF + "contributor"), ox.NamedNode(device)) for device in sorted(contributors)
    ]
    if known is not None:
        nodes = global_contributors(arrays)
        for label in known.labels:
            known_class = node("class")
            triples += [
                ox.Triple(art, p(TF + "knowsClass"), known_class),
                ox.Triple(known_class, p(RDF + "type"), p(TF + "ClassPrototype")),
                ox.Triple(known_class, p(TF + "classLabel"), lit(label)),
                ox.Triple(known_class, p(TF + "exampleCount"), lit(known.counts[label])),
            ]
            triples += [
                ox.Triple(known_class, p(PROV + "wasAttributedTo"), ox.NamedNode(device))
                for device in sorted({devices[n] for n in nodes.get(label, ()) if n in devices})
            ]
    return triples
