from __future__ import annotations

import pytest

from tinyfleet.common.jobspec import JobSpecError, parse_job_spec

GOOD = """
name = "sine"
strategy = "fedavg"
model = "sine-mlp"
rounds = 3
[round]
deadline_s = 5
min_nodes = 2
fraction = 0.5
[train]
lr = 0.02
local_steps = 10
"""


def test_parses_a_complete_job() -> None:
    spec = parse_job_spec(GOOD)
    assert spec.rounds == 3 and spec.round.deadline_s == 5.0 and spec.round.min_nodes == 2
    assert spec.train == {"lr": 0.02, "local_steps": 10}
    assert spec.strategy_path == "flwr.serverapp.strategy:FedAvg"
    assert parse_job_spec(spec.to_toml()) == spec


def test_import_path_of_a_stock_strategy() -> None:
    spec = parse_job_spec('strategy = "flwr.serverapp.strategy:FedMedian"\nmodel = "sine-mlp"\nrounds = 1')
    assert spec.strategy_path.endswith(":FedMedian")


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ('model = "sine-mlp"\nrounds = 1', "strategy", "missing"),
        ('strategy = "fedavg"\nmodel = "resnet"\nrounds = 1', "model", "unknown model"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 0', "rounds", "at least 1"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = "3"', "rounds", "integer"),
        ('strategy = "nope"\nmodel = "sine-mlp"\nrounds = 1', "strategy", "unknown strategy"),
        ('strategy = "os:path"\nmodel = "sine-mlp"\nrounds = 1', "strategy", "not a flwr"),
        ('strategy = "no.such.mod:X"\nmodel = "sine-mlp"\nrounds = 1', "strategy", "cannot import"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[round]\ndeadline_s = -1',
         "round.deadline_s", "greater than 0"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[round]\nfraction = 2.0',
         "round.fraction", "at most"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[round]\nquorum = 2',
         "round.quorum", "unknown field"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\ncolour = 2', "colour", "unknown field"),
        ('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[train]\nlr = [1, 2]', "train.lr", "number"),
        ("strategy = ", "<file>", "not valid TOML"),
    ],
)
def test_errors_name_the_field(text: str, field: str, words: str) -> None:
    with pytest.raises(JobSpecError) as info:
        parse_job_spec(text)
    assert info.value.field == field
    assert words in str(info.value) and f"'{field}'" in str(info.value)


def test_every_strategy_alias_names_a_strategy_that_exists() -> None:
    """A short name is a claim: it used to include fedproto before any FedProto existed."""
    from flwr.serverapp.strategy import Strategy

    from tinyfleet.common.jobspec import STRATEGY_ALIASES, resolve_strategy_class

    for alias, path in STRATEGY_ALIASES.items():
        cls = resolve_strategy_class(path)
        assert isinstance(cls, type) and issubclass(cls, Strategy), alias


def test_example_job_files_parse_and_their_options_are_valid() -> None:
    from pathlib import Path

    from tinyfleet.common.jobspec import load_job_spec
    from tinyfleet.server.job_strategy import build_strategy

    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        spec = load_job_spec(path)
        assert spec.rounds >= 1
        build_strategy(spec)


def test_a_stock_strategy_refuses_an_argument_its_constructor_lacks() -> None:
    from tinyfleet.server.job_strategy import build_strategy

    spec = parse_job_spec('strategy = "fedavg"\nmodel = "sine-mlp"\nrounds = 1\n[options]\nproximal_mu = 0.1')
    with pytest.raises(JobSpecError) as info:
        build_strategy(spec)
    assert info.value.field == "options.proximal_mu" and "FedAvg has no argument" in str(info.value)


def test_fedproto_refuses_the_weight_update_guard_by_name() -> None:
    """The guard measures weight updates; FedProto's replies hold prototype means, which it would
    drop every one of (the job then learned nothing, silently)."""
    from tinyfleet.server.job_strategy import build_strategy

    text = 'name = "p"\nstrategy = "fedproto"\nmodel = "identity"\nrounds = 2\n'
    text += "[round]\nmax_update_ratio = 10.0\n"
    with pytest.raises(JobSpecError, match=r"round\.max_update_ratio.*prototype means"):
        build_strategy(parse_job_spec(text))
    from tinyfleet.server.strategies import FedProto

    assert isinstance(build_strategy(parse_job_spec(text.replace("max_update_ratio = 10.0\n", ""))), FedProto)
