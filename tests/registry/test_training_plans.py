"""The registry decides who can train what: artifacts state their update plans' memory, and the
trainable-devices query gives each device whose RAM and flash fit the largest plan."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
from starlette.testclient import TestClient

from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.memory_model import estimate
from tinyfleet.common.models import build_model, get_model_spec
from tinyfleet.common.update_plan import UpdatePlan
from tinyfleet.ontology.catalog import render
from tinyfleet.server.http.registry_access import Access
from tinyfleet.server.http.registry_routes import registry_app
from tinyfleet.server.registry.artifact_description import artifact_iri, describe_round_artifact
from tinyfleet.server.registry.thing_graphs import Registry

MODEL = "omniglot-conv4"
SHA = "ab" * 32
PLANS = """PREFIX tf: <https://w3id.org/tinyfleet#> PREFIX schema: <https://schema.org/>
SELECT ?name ?json ?trained ?ram ?flash WHERE { GRAPH ?g { ?a tf:hasTrainingRequirement ?p .
?p tf:updatePlan ?name ; tf:planJson ?json ; tf:trainedParameterCount ?trained ;
   schema:minValue ?ram ; tf:trainingFlashKB ?flash } }"""
# (name, RAM kB, flash kB) of devices, against omniglot-conv4's plans (kB RAM, kB flash):
# last-layer 11.3/447.7, budget-64000 23.6/447.0, budget-128000 101.4/410.1,
# budget-256000 175.2/373.2, biases 676.9/450.8, full 1649.5/0.
DEVICES = [
    ("tiny", 8, 4096),  # below every plan's RAM
    ("small", 16, 4096),  # last layer only
    ("mid", 64, 4096),  # the planner's 64 kB plan
    ("big", 200, 4096),  # the planner's 256 kB plan (175 kB)
    ("huge", 2048, 4096),  # everything: full
    ("no-flash", 512, 100),  # RAM for a partial plan, but no flash for its frozen weights
]
EXPECTED = {
    "urn:tinyfleet:device:small": "last-layer",
    "urn:tinyfleet:device:mid": "budget-64000",
    "urn:tinyfleet:device:big": "budget-256000",
    "urn:tinyfleet:device:huge": "full",
}


@pytest.fixture
def described(registry: Registry, make_td: Callable[..., bytes]) -> Registry:
    for name, ram_kb, flash_kb in DEVICES:
        registry.put(registry.prepare(make_td(name, ram_kb=ram_kb, flash_kb=flash_kb), "application/td+json"))
    _describe(registry, SHA)
    return registry


def _describe(registry: Registry, sha: str) -> None:
    triples = describe_round_artifact(
        sha=sha, job_id=1, round_number=1, strategy="fedreptile", model_name=MODEL, parent_sha=None,
        finished_at=time.time(), contributors=[], metrics={},
        arrays=to_array_record(build_model(MODEL, seed=0)), devices={},
    )
    registry.put_graph(artifact_iri(sha), triples)  # SHACL-validated, as the projector writes it


@pytest.fixture
def client(described: Registry) -> Iterator[TestClient]:
    with TestClient(registry_app(described, access=Access(admin_token="t"))) as c:
        yield c


def test_artifact_states_each_plan_with_the_memory_models_figures(described: Registry) -> None:
    model, spec = build_model(MODEL, seed=0), get_model_spec(MODEL)
    rows = described.select(PLANS)
    assert {r["name"].value for r in rows} == {
        "full", "last-layer", "biases", "budget-64000", "budget-128000", "budget-256000"
    }
    for row in rows:
        plan = UpdatePlan.from_json(row["json"].value)
        assert plan.name == row["name"].value
        memory = estimate(model, plan, spec.input_shape, classification=True)
        assert Decimal(row["ram"].value) == Decimal(memory.ram) / 1000
        assert Decimal(row["flash"].value) == Decimal(memory.flash) / 1000
        assert int(row["trained"].value) * 4 == memory.trainable_weights
        if plan.name.startswith("budget-"):
            assert memory.ram <= int(plan.name.removeprefix("budget-"))


def test_trainable_devices_through_sparql_gives_each_fitting_device_its_largest_plan(
    client: TestClient,
) -> None:
    for artifact in (SHA, artifact_iri(SHA)):  # by sha or by IRI
        response = client.post(
            "/sparql", data={"query": render("trainable-devices", {"artifact": artifact})},
            headers={"accept": "application/sparql-results+json"},
        )
        assert response.status_code == 200, response.text
        rows = response.json()["results"]["bindings"]
        assert {r["device"]["value"]: r["planName"]["value"] for r in rows} == EXPECTED
        assert len(rows) == len(EXPECTED)  # one plan per device
        for row in rows:
            plan = UpdatePlan.from_json(row["planJson"]["value"])
            assert plan.name == row["planName"]["value"]
            assert Decimal(row["trainRamKB"]["value"]) <= Decimal(row["ramKB"]["value"])


def test_trainable_devices_is_usable_as_a_jobs_eligible_query(described: Registry) -> None:
    assert set(described.eligible(f"trainable-devices artifact={SHA}")) == set(EXPECTED)
    _describe(described, "cd" * 32)  # a second artifact of the same model: still one row per device
    by_model = described.named("trainable-devices", {"model": MODEL})
    assert {r["device"].value: r["planName"].value for r in by_model} == EXPECTED
    assert len(by_model) == len(EXPECTED)
    assert described.eligible("trainable-devices model=sine-mlp") == []  # no artifact of it
    assert described.eligible(f"trainable-devices artifact={'ef' * 32}") == []  # unknown artifact
