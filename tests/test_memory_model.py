"""The memory model against what a training step keeps, and the planner under byte budgets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tinyfleet.common.memory_model import OptimizerName, candidate_plans, estimate, plan_for_budget
from tinyfleet.common.models import MODELS, build_model, get_model_spec
from tinyfleet.common.update_plan import PlanError, UpdatePlan, parameter_layers, standard_plan

BATCH = 8

# Runs in a fresh process: one planned step per (model, plan, optimizer), measured by
# tinyfleet.client.sparse_training.measure_step (saved-tensor hooks, grads, optimizer state).
MEASURE = """
import json, sys, torch
from tinyfleet.client.sparse_training import measure_step, task_loss
from tinyfleet.common.models import build_model, get_model_spec
from tinyfleet.common.update_plan import UpdatePlan
out = []
for name, plan_json, optimizer in json.loads(sys.stdin.read()):
    spec = get_model_spec(name)
    model = build_model(name, seed=0)
    model.train()
    x = torch.randn(BATCH, *spec.input_shape)
    with torch.no_grad():
        y_shape = model(x).shape
    y = torch.randint(0, y_shape[1], (x.shape[0],)) if spec.task == "classification" else torch.randn(y_shape)
    m = measure_step(model, UpdatePlan.from_json(plan_json), x, y, task_loss(spec.task), optimizer)
    out.append(m.total)
print(json.dumps(out))
""".replace("BATCH", str(BATCH))


def _zoo() -> list[str]:
    return [name for name in MODELS if list(build_model(name, seed=0).parameters())]


def _plans(name: str) -> list[UpdatePlan]:
    model = build_model(name, seed=0)
    layers = [n for n, m in parameter_layers(model) if getattr(m, "weight", None) is not None]
    mixed = UpdatePlan(name="mixed", bias_layers=3, weights={layers[-2]: 0.25, layers[-1]: 0.5})
    first = UpdatePlan(name="first", bias_layers=1, weights={layers[0]: 0.125})
    return [standard_plan(p, model) for p in ("full", "last-layer", "biases")] + [mixed, first]


def test_model_agrees_with_measurement_within_20_percent() -> None:
    optimizers: tuple[OptimizerName, ...] = ("sgd", "adam")
    cases = [(name, plan, opt) for name in _zoo() for plan in _plans(name) for opt in optimizers]
    request = json.dumps([(name, plan.to_json(), opt) for name, plan, opt in cases])
    done = subprocess.run([sys.executable, "-c", MEASURE], input=request, capture_output=True, text=True,
                          timeout=240, check=True)
    measured = json.loads(done.stdout)
    for (name, plan, opt), got in zip(cases, measured, strict=True):
        spec = get_model_spec(name)
        model = build_model(name, seed=0)
        modelled = estimate(model, plan, spec.input_shape, BATCH, optimizer=opt,
                            classification=spec.task == "classification").training
        assert abs(modelled - got) <= 0.2 * got, (
            f"{name} {plan.name} {opt}: modelled {modelled}, measured {got}"
        )


@pytest.mark.parametrize("name", ["sine-mlp", "occupancy-mlp", "omniglot-conv4"])
def test_planner_respects_every_budget_and_more_budget_never_trains_less(name: str) -> None:
    spec = get_model_spec(name)
    model = build_model(name, seed=0)
    smallest = estimate(model, candidate_plans(model)[0], spec.input_shape, BATCH).total
    full = estimate(model, standard_plan("full", model), spec.input_shape, BATCH).total
    budgets = sorted({int(smallest * (full * 1.5 / smallest) ** (i / 60)) for i in range(61)})
    trained = []
    for budget in budgets:
        plan, memory = plan_for_budget(model, budget, spec.input_shape, batch=BATCH)
        assert memory.total <= budget
        assert memory == estimate(model, plan, spec.input_shape, BATCH)
        trained.append(memory.trainable_weights)
    assert trained == sorted(trained)
    assert trained[-1] > trained[0]
    refusal = f"no update plan fits {smallest - 1} bytes: .* needs {smallest} bytes"
    with pytest.raises(PlanError, match=refusal):
        plan_for_budget(model, smallest - 1, spec.input_shape, batch=BATCH)


def test_breakdown_counts_what_each_plan_trains() -> None:
    model = build_model("omniglot-conv4", seed=0)
    shape = (1, 28, 28)
    last = estimate(model, standard_plan("last-layer", model), shape, BATCH, optimizer="adam")
    assert last.trainable_weights == (256 * 5 + 5) * 4 == last.gradients
    assert last.optimizer_state == 2 * last.trainable_weights + 2 * 4  # two moments, a step per tensor
    # the head's input, the log-probabilities, the targets
    assert last.activations == BATCH * 256 * 4 + BATCH * 5 * 4 + BATCH * 8
    all_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert last.frozen_weights == all_bytes - last.trainable_weights
    assert last.ram == last.training and last.flash == last.frozen_weights
    in_ram = estimate(model, standard_plan("last-layer", model), shape, BATCH, frozen_in_flash=False)
    assert in_ram.ram == in_ram.training + in_ram.frozen_weights
    half = estimate(model, UpdatePlan(weights={"features.12": 0.5}), shape, BATCH)
    assert half.trainable_weights == 32 * 64 * 9 * 4
    int8 = estimate(model, UpdatePlan(weights={"features.12": 0.5}), shape, BATCH, dtype="int8")
    assert int8.trainable_weights == 32 * 64 * 9 and int8.activations == half.activations // 4
