"""Round artifacts described from SQL: provenance, contributors, sizes, memory needs, lineage."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import array_record_to_bytes
from tinyfleet.common.models import build_model, parameter_count
from tinyfleet.server.artifacts import ArtifactStore
from tinyfleet.server.database import default_url, open_database
from tinyfleet.server.registry.artifact_description import artifact_iri
from tinyfleet.server.registry.projector import ArtifactProjector, Projector
from tinyfleet.server.registry.thing_graphs import Registry
from tinyfleet.server.repository import ArtifactRecord, NodeResult, Repository, RoundRecord

JOB = 'name = "sine"\nstrategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 2\n'


def _round(number: int, sha: str, nodes: list[NodeResult]) -> RoundRecord:
    now = time.time()
    return RoundRecord(
        round=number,
        started_at=now - 1,
        finished_at=now,
        participants=len(nodes),
        dropped=0,
        train_metrics={"loss": 0.5 / number},
        eval_metrics=None,
        bytes_down=10,
        bytes_up=10,
        duration_s=1.0,
        train_duration_s=0.5,
        eval_duration_s=0.1,
        artifact_sha=sha,
        nodes=nodes,
    )


def test_round_artifacts_are_described_with_provenance(
    tmp_path: Path, registry: Registry, make_td: Callable[..., bytes]
) -> None:
    repo = Repository(open_database(default_url(tmp_path)))
    blobs = ArtifactStore(tmp_path / "artifacts")
    repo.create_device(
        "urn:tinyfleet:device:big", 7, make_td("big", ram_kb=512), "application/td+json"
    )
    repo.create_device(
        "urn:tinyfleet:device:tiny", 8, make_td("tiny", ram_kb=8), "application/td+json"
    )
    Projector(registry, repo).catch_up()
    job = repo.create_job("sine", "fedavg", JOB, 2)
    shas = []
    for seed in range(3):
        blob = array_record_to_bytes(to_array_record(build_model("sine-mlp", seed=seed)))
        shas.append(blobs.put(blob))
    repo.start_job(job.id, ArtifactRecord(shas[0], 1, "arrayrecord", job.id, 0, None, time.time()))
    replied = [
        NodeResult("train", 7, "replied", "", 1, 1, 0.1),
        NodeResult("train", 8, "timeout", "", 1, 0, 0.0),
    ]
    for number in (1, 2):
        artifact = ArtifactRecord(
            shas[number], 1, "arrayrecord", job.id, number, shas[number - 1], time.time()
        )
        repo.commit_round(job.id, _round(number, shas[number], replied), artifact, None)
    projector = ArtifactProjector(registry, repo, blobs)
    assert projector.catch_up() == 2
    assert projector.catch_up() == 0  # the watermark moved with the descriptions
    lineage = registry.named("artifact-lineage", {"artifact": artifact_iri(shas[2])})
    assert [(r["roundNumber"].value, r["contributors"].value) for r in lineage[:2]] == [
        ("2", "1"),
        ("1", "1"),
    ]
    assert [r["ancestor"].value for r in lineage] == [artifact_iri(s) for s in reversed(shas)]
    [facts] = registry.select(
        "PREFIX tf: <https://w3id.org/tinyfleet#> SELECT ?params ?ram ?fp32 ?int8 WHERE { "
        f"<{artifact_iri(shas[2])}> tf:parameterCount ?params ; tf:requiresRamKB ?ram ; "
        "tf:hasEncodedSize [ tf:encoding 'fp32' ; tf:sizeBytes ?fp32 ] , "
        "[ tf:encoding 'int8' ; tf:sizeBytes ?int8 ] }"
    )
    params = parameter_count(build_model("sine-mlp"))
    assert int(facts["params"].value) == params and int(facts["fp32"].value) == 4 * params
    assert int(facts["int8"].value) < int(facts["fp32"].value)
    # Its fp32 weights alone exceed 8 kB: the 512 kB device can run it, the 8 kB one cannot.
    runnable_on = {
        r["device"].value for r in registry.named("devices-for-model", {"model": artifact_iri(shas[2])})
    }
    assert runnable_on == {"urn:tinyfleet:device:big"}
    fits_big = {
        r["model"].value for r in registry.named("compatible-models", {"device": "urn:tinyfleet:device:big"})
    }
    fits_tiny = {
        r["model"].value for r in registry.named("compatible-models", {"device": "urn:tinyfleet:device:tiny"})
    }
    assert artifact_iri(shas[2]) in fits_big and not fits_tiny
    contributors = registry.select(
        "PREFIX tf: <https://w3id.org/tinyfleet#> SELECT ?d WHERE { ?round tf:contributor ?d }"
    )
    assert {r["d"].value for r in contributors} == {"urn:tinyfleet:device:big"}
