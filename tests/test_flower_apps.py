"""make_client_app / make_server_app in-process: Flower's ClientApp routing and the ServerApp's job run.

The ClientApp is called the way a SuperNode's ClientApp process calls it,
`app(message, context)`; the ServerApp runs on SimGrid, which serializes every
message with Flower's serde, so these stay fast while the real deployment is
covered by tests/test_flower_deployment.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from tinyfleet.client.flower_clientapp import make_client_app
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.client.learners import query
from tinyfleet.common.arrays import load_array_record, to_array_record
from tinyfleet.common.flower_adapter import (
    ERR_HANDLER_FAILED,
    array_record_from_bytes,
    make_context,
    new_instruction,
    stamp,
)
from tinyfleet.common.jobspec import JobSpec, JobSpecError, load_job_spec
from tinyfleet.common.models import build_model
from tinyfleet.server.flower_serverapp import (
    MODEL_FILE,
    RESULT_FILE,
    FederationTooSmallError,
    job_from_run_config,
    make_server_app,
    wait_for_nodes,
)
from tinyfleet.simulations.sim_grid import SimClient, SimGrid

REPO = Path(__file__).resolve().parent.parent
FLOWER_APP = REPO / "examples" / "flower-app"
SMALL_JOB = JobSpec(
    name="flower-fedavg-test",
    strategy="fedavg",
    model="sine-mlp",
    rounds=2,
    train={"local_steps": 5, "batch_size": 8, "lr": 0.02},
    evaluate={"eval_samples": 20},
)


def _message(message_type: str, config: dict[str, int | float | str], *, arrays: bool = True) -> Message:
    content = RecordDict({"config": ConfigRecord({"model": "sine-mlp", **config})})
    if arrays:
        content["arrays"] = to_array_record(build_model("sine-mlp", seed=0))
    message = new_instruction(content, message_type, 7, run_id=1)
    stamp(message, run_id=1)
    return message


def _context(data: str | None = "sine:seed=4") -> Context:
    return make_context(7, {"data": data} if data is not None else {})


# -- ClientApp ---------------------------------------------------------------------------


@pytest.mark.parametrize("message_type", ["train", "train.fedavg"])
def test_train_messages_reach_the_fedavg_trainer(message_type: str) -> None:
    message = _message(message_type, {"local_steps": 2, "batch_size": 4})
    reply = make_client_app()(message, _context())
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.metadata.reply_to_message_id == message.metadata.message_id != ""
    assert reply.content.metric_records["metrics"]["num-examples"] == 8
    trained = reply.content.array_records["arrays"]["0.weight"].numpy()
    assert not np.allclose(trained, build_model("sine-mlp", seed=0).state_dict()["0.weight"].numpy())


def test_fedavg_trainer_takes_reptiles_adam_or_names_a_bad_optimizer() -> None:
    app = make_client_app()
    start = build_model("sine-mlp", seed=0).state_dict()["0.weight"].numpy()

    def first_step(optimizer: str) -> np.ndarray:
        reply = app(_message("train", {"local_steps": 1, "lr": 0.01, "optimizer": optimizer}), _context())
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        return reply.content.array_records["arrays"]["0.weight"].numpy() - start

    # Adam's first step (bias-corrected, beta1 = 0) is lr * g / (|g| + eps): never more than lr,
    # and lr itself wherever the gradient is not vanishingly small; SGD's steps follow |g|.
    moved = np.abs(first_step("adam"))
    assert moved.max() <= 0.01 * (1 + 1e-5) and np.median(moved) == pytest.approx(0.01, rel=1e-3)
    assert np.median(np.abs(first_step("sgd"))) != pytest.approx(0.01, rel=1e-1)
    reply = app(_message("train", {"local_steps": 1, "optimizer": "lion"}), _context())
    assert reply.has_error()
    assert "option 'optimizer': Input should be 'sgd' or 'adam', got 'lion'" in str(reply.error.reason)


def test_evaluate_and_query_use_the_supernode_node_config() -> None:
    app = make_client_app()
    evaluated = app(_message("evaluate", {"eval_samples": 10}), _context())
    assert evaluated.content.metric_records["metrics"]["num-examples"] == 10
    loss = evaluated.content.metric_records["metrics"]["eval_loss"]
    assert isinstance(loss, float) and loss > 0
    info = app(_message("query", {}, arrays=False), _context("sine:seed=9"))
    assert info.content.config_records["info"]["data"] == "sine:seed=9"
    assert info.content.config_records["info"]["node_id"] == "7"


def test_fedreptile_actions_are_routed_to_the_meta_learners() -> None:
    app = make_client_app()
    trained = app(_message("train.fedreptile", {"inner_steps": 2, "inner_batch": 4}), _context())
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    assert "update" in trained.content.array_records  # the Reptile delta, not plain weights
    assert "arrays" not in trained.content.array_records
    evaluated = app(_message("evaluate.fedreptile", {"eval_shots": 5, "eval_queries": 5, "eval_steps": 2}),
                    _context())
    assert set(evaluated.content.metric_records["metrics"]) >= {"loss_before", "loss_after", "num-examples"}


def test_a_failing_handler_answers_with_tinyfleets_error_reply() -> None:
    reply = make_client_app()(_message("train", {"local_steps": 1}), _context(data=None))
    assert reply.has_error() and reply.error.code == ERR_HANDLER_FAILED
    assert "no data source" in str(reply.error.reason)


def test_only_the_registry_types_are_registered_with_flower() -> None:
    registry = HandlerRegistry()
    registry.register("query.ping")(query)
    app = make_client_app(registry)
    assert app(_message("query.ping", {}, arrays=False), _context()).content.config_records["info"]
    with pytest.raises(ValueError, match="No query function registered with name 'default'"):
        app(_message("query", {}, arrays=False), _context())
    with pytest.raises(ValueError, match="No train function registered"):
        app(_message("train", {}), _context())


def test_handlers_flower_cannot_route_are_refused_with_their_name() -> None:
    registry = HandlerRegistry()
    registry.register("fit")(query)
    with pytest.raises(ValueError, match="'fit' cannot run in a Flower ClientApp"):
        make_client_app(registry)
    registry = HandlerRegistry()
    registry.register("train.not-an-identifier")(query)
    with pytest.raises(ValueError, match="not-an-identifier"):
        make_client_app(registry)


# -- ServerApp ---------------------------------------------------------------------------


def _sim_grid(n: int) -> SimGrid:
    return SimGrid([SimClient(i + 1, {"data": f"sine:seed={i}"}) for i in range(n)])


def _server_context(run_config: dict[str, str]) -> Context:
    return Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))


def test_server_app_runs_the_job_and_saves_model_and_metrics(tmp_path: Path) -> None:
    spec = dataclasses.replace(SMALL_JOB, round=dataclasses.replace(SMALL_JOB.round, min_nodes=2))
    make_server_app(spec)(_sim_grid(2), _server_context({"result-dir": str(tmp_path / "out")}))

    summary = json.loads((tmp_path / "out" / RESULT_FILE).read_text())
    assert summary["run_id"] == 5 and summary["nodes"] == [1, 2] and summary["rounds"] == 2
    assert summary["job"]["name"] == spec.name
    assert set(summary["train_metrics"]) == {"1", "2"} and set(summary["evaluate_metrics"]) == {"1", "2"}
    assert all(np.isfinite(m["train_loss"]) for m in summary["train_metrics"].values())
    blob = (tmp_path / "out" / MODEL_FILE).read_bytes()
    assert summary["model"]["sha256"] == hashlib.sha256(blob).hexdigest()
    assert summary["model"]["bytes"] == len(blob)
    assert summary["model"]["arrays"]["2.weight"] == [64, 64]
    model = build_model("sine-mlp")
    load_array_record(model, array_record_from_bytes(blob))
    initial = build_model("sine-mlp", seed=spec.seed).state_dict()["0.weight"]
    assert not np.allclose(model.state_dict()["0.weight"].numpy(), initial.numpy())
    # no temp files left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MODEL_FILE, RESULT_FILE]


def test_server_app_without_result_dir_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_server_app(dataclasses.replace(SMALL_JOB, rounds=1))(_sim_grid(1), _server_context({}))
    assert list(tmp_path.iterdir()) == []


def test_too_small_a_federation_fails_after_the_jobs_wait() -> None:
    expected = r"1 SuperNode\(s\) connected after 0 s; the job needs round.min_nodes = 2"
    with pytest.raises(FederationTooSmallError, match=expected):
        wait_for_nodes(_sim_grid(1), 2, 0.0)
    assert wait_for_nodes(_sim_grid(3), 2, 0.0) == [1, 2, 3]


def test_job_from_run_config_resolves_relative_paths_against_the_app(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(SMALL_JOB.to_toml())
    assert job_from_run_config({"job": "job.toml"}, tmp_path) == SMALL_JOB
    assert job_from_run_config({"job": str(tmp_path / "job.toml")}, REPO) == SMALL_JOB
    with pytest.raises(JobSpecError, match="run-config job"):
        job_from_run_config({"job": ""}, tmp_path)
    with pytest.raises(JobSpecError, match="cannot read"):
        job_from_run_config({"job": "missing.toml"}, tmp_path)


# -- the example Flower App ----------------------------------------------------------------


def test_example_flower_app_components_are_the_factories_apps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `flwr run examples/flower-app` loads, run in-process on SimGrid with its default job."""
    project = tomllib.loads((FLOWER_APP / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    assert flwr_app["publisher"]
    monkeypatch.syspath_prepend(str(FLOWER_APP))
    loaded = {}
    for role in ("serverapp", "clientapp"):
        module_name, _, attr = flwr_app["components"][role].partition(":")
        loaded[role] = getattr(importlib.import_module(module_name), attr)
    assert isinstance(loaded["clientapp"], ClientApp) and isinstance(loaded["serverapp"], ServerApp)

    default_job = load_job_spec(FLOWER_APP / flwr_app["config"]["job"])
    assert default_job.strategy == "fedavg" and default_job.round.min_nodes == 2
    run_config = {**flwr_app["config"], "result-dir": str(tmp_path)}
    loaded["serverapp"](_sim_grid(2), _server_context(run_config))
    summary = json.loads((tmp_path / RESULT_FILE).read_text())
    assert summary["job"]["name"] == default_job.name
    assert set(summary["train_metrics"]) == {str(r) for r in range(1, default_job.rounds + 1)}
