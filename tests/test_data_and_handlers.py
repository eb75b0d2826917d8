from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict

from tinyfleet.client.data_sources import DataSpecError, open_source, parse_spec
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.common.flower_adapter import (
    ERR_HANDLER_FAILED,
    ERR_UNKNOWN_MESSAGE_TYPE,
    make_context,
    new_instruction,
    reply_with_content,
)


def test_sine_stream_is_seeded_and_holdout_is_fixed() -> None:
    a, b = open_source("sine:seed=4"), open_source("sine:seed=4")
    assert torch.equal(a.next(8)[0], b.next(8)[0])
    assert torch.equal(a.holdout(5)[1], a.holdout(5)[1])
    assert not torch.equal(a.next(8)[0], a.next(8)[0])  # the stream moves on
    assert 0.1 <= a.task.amplitude <= 5.0 and 0 <= a.task.phase <= torch.pi
    x, y = a.next(100)
    assert x.min() >= -5 and x.max() <= 5 and torch.allclose(y, a.task(x))
    assert open_source("sine:seed=5").task != a.task


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
    assert reply.error.code == ERR_HANDLER_FAILED and "RuntimeError: boom" in reply.error.reason
    reply = registry.handle(new_instruction(RecordDict(), "evaluate", 7, run_id=1), ctx)
    assert reply.error.code == ERR_UNKNOWN_MESSAGE_TYPE and "'evaluate'" in reply.error.reason
    assert reply.metadata.dst_node_id == 1 and reply.metadata.src_node_id == 7
