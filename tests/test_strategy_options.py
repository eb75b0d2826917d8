"""One typed options model per strategy: the same defaults and the same refusals from every entry point
(strategy constructor, job file, device handlers, `tinyfleet sim run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from tinyfleet.cli import main
from tinyfleet.client import meta_learners
from tinyfleet.client.handlers import default_handlers
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import ERR_HANDLER_FAILED, make_context, new_instruction
from tinyfleet.common.jobspec import JobSpecError, parse_job_spec
from tinyfleet.common.models import build_model
from tinyfleet.common.strategy_options import (
    FedReptileOptions,
    OptionsError,
    ReptileEvalOptions,
    ReptileTrainOptions,
)
from tinyfleet.server.job_strategy import build_strategy
from tinyfleet.server.strategies import FedReptile
from tinyfleet.simulations.experiment import RunSettings, fedreptile_options
from tinyfleet.simulations.scenarios import sine

JOB = 'strategy = "fedreptile"\nmodel = "sine-mlp"\nrounds = 7\n'


def _reptile_message(message_type: str, config: dict[str, object]) -> Message:
    content = RecordDict(
        {
            "arrays": to_array_record(build_model("sine-mlp", seed=0)),
            "config": ConfigRecord({"model": "sine-mlp", **config}),  # type: ignore[dict-item]
        }
    )
    return new_instruction(content, message_type, 7, run_id=1)


def test_every_entry_point_starts_from_the_same_defaults() -> None:
    defaults = FedReptileOptions()
    assert FedReptile().options == defaults
    job = build_strategy(parse_job_spec(JOB))
    assert isinstance(job, FedReptile) and job.options == defaults.replace(num_rounds=7)
    # what a device assumes when the config leaves an option out is what the strategy sends
    assert ReptileTrainOptions.from_config(ConfigRecord({"model": "sine-mlp"})) == defaults.train_options()
    assert ReptileEvalOptions.from_config(ConfigRecord({"model": "sine-mlp"})) == defaults.eval_options()
    # a scenario overrides the model's defaults and nothing else
    run = fedreptile_options(RunSettings(scenario="sine-reptile", rounds=10))
    assert run == FedReptileOptions(**sine.OPTIONS, num_rounds=10)
    assert run.inner_lr == defaults.inner_lr and run.keep_optimizer_state == defaults.keep_optimizer_state


def test_a_device_keeps_adams_moments_unless_the_config_says_otherwise() -> None:
    """The handler used to default keep_optimizer_state to False while the strategy sent True."""
    context = make_context(7, {"data": "sine:seed=1"})
    reply = default_handlers().handle(
        _reptile_message("train.fedreptile", {"inner_optimizer": "adam", "inner_steps": 2}), context
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert meta_learners.OPTIMIZER_STATE in context.state.array_records


def test_eval_lr_falls_back_to_inner_lr() -> None:
    assert FedReptileOptions(inner_lr=0.003).eval_options().adapt_lr == 0.003
    assert FedReptileOptions(inner_lr=0.003, eval_lr=0.1).eval_options().adapt_lr == 0.1


def test_device_options_travel_in_a_config_record_and_come_back_equal() -> None:
    options = FedReptileOptions(local_layers="4", top_p=0.1, quantize=True, inner_samples=20)
    config = ConfigRecord({**options.train_options().to_config(), "model": "sine-mlp", "server-round": 3})
    assert ReptileTrainOptions.from_config(config) == options.train_options()
    assert options.quantize == "int8" and options.local_layers == ("4",)


def test_linear_schedule_anneals_to_epsilon_final_over_num_rounds() -> None:
    options = FedReptileOptions(epsilon=0.5, epsilon_schedule="linear", num_rounds=4)
    assert [options.epsilon_for(r) for r in (1, 2, 3, 4, 9)] == [0.5, 0.375, 0.25, 0.125, 0.0]


@pytest.mark.parametrize(
    ("options", "name", "words"),
    [
        ({"colour": 1}, "colour", "unknown option"),
        ({"epsilon": 2}, "epsilon", "less than or equal to 1"),
        ({"epsilon_schedule": "linear"}, "num_rounds", "needs num_rounds"),
        ({"quantize": "int4"}, "quantize", "'none' or 'int8'"),
        ({"local_layers": 3}, "local_layers", "layer names"),
    ],
)
def test_strategy_and_job_file_refuse_an_option_by_name(
    options: dict[str, object], name: str, words: str
) -> None:
    with pytest.raises(OptionsError) as direct:
        FedReptile(**options)
    assert direct.value.option == name and words in str(direct.value)
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    spec = parse_job_spec(JOB.replace("rounds = 7\n", "rounds = 7\n[options]\n" + table + "\n"))
    if name == "num_rounds":  # a job fills num_rounds in: its linear schedule is fine
        build_strategy(spec)
        return
    with pytest.raises(JobSpecError) as job:
        build_strategy(spec)
    assert job.value.field == f"options.{name}" and words in str(job.value)


def test_a_device_refuses_a_bad_option_in_its_config_by_name() -> None:
    reply = default_handlers().handle(
        _reptile_message("train.fedreptile", {"inner_steps": 0}), make_context(7, {"data": "sine:seed=1"})
    )
    assert reply.has_error() and reply.error.code == ERR_HANDLER_FAILED
    assert "option 'inner_steps'" in str(reply.error.reason)


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--option", "colour=1"], "option 'colour': unknown option"),
        (["--epsilon", "2"], "option 'epsilon'"),
        (["--quantize", "int4"], "option 'quantize'"),
        (["--option", "visit_order"], "expected NAME=VALUE"),
        (["--top-p", "0.1", "--option", "top_p=0.2"], "'top_p' is set twice"),
    ],
)
def test_sim_run_refuses_a_bad_option_by_name_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], words: str
) -> None:
    out = tmp_path / "run"
    assert main(["sim", "run", "sine-reptile", "--out", str(out), *arguments]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()
