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

Memory model (one sample, fp32): running needs the weights plus the largest
input+output pair of any layer; flash holds the fp32 weights; training every
parameter ("full" plan) needs weights, gradients and every layer's saved output.
"""

from __future__ import annotations

import datetime as dt
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

SPARSE_TOP_P = 0.1


def artifact_iri(sha: str) -> str:
    return f"urn:tinyfleet:artifact:{sha}"


def job_iri(job_id: int) -> str:
    return f"urn:tinyfleet:job:{job_id}"


def round_iri(job_id: int, round_number: int) -> str:
    return f"urn:tinyfleet:job:{job_id}:round:{round_number}"


@dataclass(frozen=True)
class MemoryNeeds:
    run_kb: float
    flash_kb: float
    train_full_kb: float


def memory_needs(model_name: str, parameters: int) -> MemoryNeeds:
    """Measured on the zoo model with forward hooks on one sample (see module docstring)."""
    import torch

    from tinyfleet.common.models import build_model, get_model_spec

    spec = get_model_spec(model_name)
    model = build_model(model_name, seed=0)
    pairs: list[int] = []
    outputs: list[int] = []

    def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and not list(module.children()):
            size_in = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
            pairs.append(size_in + output.numel())
            outputs.append(output.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *spec.input_shape)))
    finally:
        for handle in handles:
            handle.remove()
    weights = 4 * parameters
    return MemoryNeeds(
        run_kb=(weights + 4 * max(pairs, default=0)) / 1000,
        flash_kb=weights / 1000,
        train_full_kb=(2 * weights + 4 * sum(outputs)) / 1000,
    )


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
    requirement = node("train")
    triples += [
        ox.Triple(art, p(TF + "hasTrainingRequirement"), requirement),
        ox.Triple(requirement, p(RDF + "type"), p(TF + "TrainingRequirement")),
        ox.Triple(requirement, p(TF + "updatePlan"), lit("full")),
        ox.Triple(requirement, p(SCHEMA + "minValue"), lit(round(needs.train_full_kb, 3), "decimal")),
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
