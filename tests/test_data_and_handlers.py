from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from tinyfleet.client.data_sources import DataSpecError, SineStream, open_source, parse_spec
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.common.flower_adapter import (
    ERR_HANDLER_FAILED,
    ERR_UNKNOWN_MESSAGE_TYPE,
    make_context,
    new_instruction,
    reply_with_content,
)


def _sine(spec: str) -> SineStream:
    stream = open_source(spec)
    assert isinstance(stream, SineStream)
    return stream


def test_sine_stream_is_seeded_and_holdout_is_fixed() -> None:
    a, b = _sine("sine:seed=4"), _sine("sine:seed=4")
    assert torch.equal(a.next(8)[0], b.next(8)[0])
    assert torch.equal(a.holdout(5)[1], a.holdout(5)[1])
    assert not torch.equal(a.next(8)[0], a.next(8)[0])  # the stream moves on
    assert 0.1 <= a.task.amplitude <= 5.0 and 0 <= a.task.phase <= torch.pi
    x, y = a.next(100)
    assert x.min() >= -5 and x.max() <= 5 and torch.allclose(y, a.task(x))
    assert _sine("sine:seed=5").task != a.task


@pytest.mark.parametrize(
    ("spec", "words"),
    [("nope:seed=1", "unknown data kind 'nope'"), ("sine:seed", "not key=value"),
     ("sine:seed=x", "seed must be an integer"), (":a=1", "has no kind"), ("sine:colour=3", "colour")],
)
def test_bad_data_specs_are_named(spec: str, words: str) -> None:
    with pytest.raises(DataSpecError, match=words):
        open_source(spec)


def test_parse_spec() -> None:
    assert parse_spec("sine: seed=3 , amplitude=2") == ("sine", {"seed": "3", "amplitude": "2"})


def test_registry_resolves_exact_then_category_and_wraps_failures() -> None:
    registry = HandlerRegistry()
    calls: list[str] = []

    @registry.register("train")
    def generic(msg, ctx):
        calls.append("generic")
        return reply_with_content(msg, RecordDict())

    @registry.register("train.special")
    def special(msg, ctx):
        raise RuntimeError("boom")

    ctx = make_context(7, {})
    for mtype in ("train", "train.other"):
        reply = registry.handle(new_instruction(RecordDict(), mtype, 7, run_id=1), ctx)
        assert reply.has_content()
    assert calls == ["generic", "generic"]
    reply = registry.handle(new_instruction(RecordDict(), "train.special", 7, run_id=1), ctx)
    assert reply.error.code == ERR_HANDLER_FAILED and "RuntimeError: boom" in str(reply.error.reason)
    reply = registry.handle(new_instruction(RecordDict(), "evaluate", 7, run_id=1), ctx)
    assert reply.error.code == ERR_UNKNOWN_MESSAGE_TYPE and "'evaluate'" in str(reply.error.reason)
    assert reply.metadata.dst_node_id == 1 and reply.metadata.src_node_id == 7


def _fedprox_distance(mu: float) -> float:
    """How far one round of Flower's FedProx (stock strategy, tinyfleet's default handlers) moves
    the model: L2 distance between the aggregated weights and the global weights sent."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedProx

    from tinyfleet.client.data_sources import close_shared_sources
    from tinyfleet.common.arrays import to_array_record, to_numpy_dict
    from tinyfleet.common.models import build_model
    from tinyfleet.simulations.rounds import run_rounds
    from tinyfleet.simulations.sim_grid import SimGrid

    close_shared_sources()  # both runs see the same batches
    grid = SimGrid.from_data_specs(["sine:seed=1", "sine:seed=2"])
    strategy = FedProx(
        proximal_mu=mu, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2
    )
    start = to_array_record(build_model("sine-mlp", seed=0))
    config = ConfigRecord({"model": "sine-mlp", "local_steps": 40, "lr": 0.02})
    try:
        end = run_rounds(strategy, grid, start, 1, train_config=config)
    finally:
        grid.close()
        close_shared_sources()
    before, after = to_numpy_dict(start), to_numpy_dict(end)
    return float(np.sqrt(sum(np.square(after[k] - before[k]).sum() for k in before)))


def test_fedprox_proximal_term_keeps_local_training_near_the_global_model() -> None:
    """Flower's FedProx sends "proximal-mu"; the default trainer must add mu/2 ||w - w_g||^2
    (it used to ignore the key, which made FedProx FedAvg)."""
    free, held = _fedprox_distance(0.0), _fedprox_distance(10.0)
    assert free > 0
    assert held < 0.5 * free, (held, free)


def test_default_trainer_refuses_a_bad_option_by_name() -> None:
    from flwr.app import ConfigRecord

    from tinyfleet.client.handlers import default_handlers
    from tinyfleet.common.arrays import to_array_record
    from tinyfleet.common.models import build_model

    content = RecordDict(
        {
            "arrays": to_array_record(build_model("sine-mlp", seed=0)),
            "config": ConfigRecord({"model": "sine-mlp", "proximal-mu": -1.0}),
        }
    )
    reply = default_handlers().handle(
        new_instruction(content, "train", 7, run_id=1), make_context(7, {"data": "sine:seed=1"})
    )
    assert reply.has_error() and reply.error.code == ERR_HANDLER_FAILED
    assert "'proximal-mu'" in str(reply.error.reason)
