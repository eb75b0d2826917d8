"""Update plans: serialisation for job configs and refusal of plans a model cannot run."""

from __future__ import annotations

import pytest
from torch import nn

from tinyfleet.common.models import MODELS, build_model
from tinyfleet.common.update_plan import STANDARD_PLANS, PlanError, UpdatePlan, standard_plan


def test_plans_round_trip_as_json() -> None:
    plan = UpdatePlan(name="mine", bias_layers=3, weights={"head": 0.5, "features.12": 0.125})
    assert UpdatePlan.from_json(plan.to_json()) == plan
    model = build_model("omniglot-conv4", seed=0)
    for name in STANDARD_PLANS:
        standard = standard_plan(name, model)
        standard.check(model)
        assert UpdatePlan.from_json(standard.to_json()) == standard


def test_standard_plans_say_what_trains() -> None:
    model = build_model("omniglot-conv4", seed=0)
    last = UpdatePlan(name="last-layer", bias_layers=1, weights={"head": 1.0})
    assert standard_plan("last-layer", model) == last
    assert standard_plan("biases", model).weights == {}
    assert standard_plan("biases", model).bias_layers == 9  # 4 convs, 4 batch norms, the head
    full = standard_plan("full", model)
    assert len(full.weights) == 9 and set(full.trained_biases(model)) == set(full.weights)
    with pytest.raises(PlanError, match="unknown standard plan 'most'"):
        standard_plan("most", model)


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"weights": {"head": 0.3}}', "weights.head"),
        ('{"bias_layers": -1}', "bias_layers"),
        ('{"layers": 2}', "layers: Extra inputs are not permitted"),
        ("not json", "does not parse"),
    ],
)
def test_bad_plan_text_is_refused_by_name(text: str, problem: str) -> None:
    with pytest.raises(PlanError, match=problem):
        UpdatePlan.from_json(text)


def test_plans_a_model_cannot_run_are_refused() -> None:
    model = build_model("sine-mlp", seed=0)
    with pytest.raises(PlanError, match="names layer 'head', which the model lacks; its layers: 0, 2, 4"):
        UpdatePlan(weights={"head": 1.0}).check(model)
    with pytest.raises(PlanError, match="biases of 4 layers; the model has 3"):
        UpdatePlan(bias_layers=4).check(model)
    norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with pytest.raises(PlanError, match="layer '1' \\(LayerNorm\\) trains only whole"):
        UpdatePlan(weights={"1": 0.5}).check(norm)
    UpdatePlan(weights={"1": 1.0}).check(norm)


def test_every_zoo_model_with_parameters_has_the_standard_plans() -> None:
    for name in MODELS:
        model = build_model(name, seed=0)
        if not list(model.parameters()):
            continue
        for plan in STANDARD_PLANS:
            standard_plan(plan, model).check(model)
