"""SimGrid: stock Flower strategies run unchanged; deliveries are honest about bytes and drops."""

from __future__ import annotations

import os
import random
from typing import cast

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian

from tinyfleet.client.data_sources import close_shared_sources
from tinyfleet.client.handlers import HandlerRegistry
from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.flower_adapter import message_from_bytes
from tinyfleet.common.grids import REPLIED, TIMEOUT
from tinyfleet.common.models import build_model
from tinyfleet.simulations.sim_grid import SimClient, SimGrid
from tinyfleet.simulations.sim_workers import WorkerError

TRAIN = ConfigRecord({"model": "sine-mlp", "local_steps": 30, "lr": 0.01, "batch_size": 16})
EVAL = ConfigRecord({"model": "sine-mlp", "eval_samples": 50})


def _grid(n: int, **kwargs: object) -> SimGrid:
    return SimGrid.from_data_specs([f"sine:seed={i}" for i in range(n)], **kwargs)


def test_stock_fedavg_runs_unchanged_and_learns() -> None:
    grid = _grid(4)
    initial = to_array_record(build_model("sine-mlp", seed=0))
    result = FedAvg(min_available_nodes=4, min_train_nodes=4).start(
        grid, initial, num_rounds=3, train_config=TRAIN, evaluate_config=EVAL
    )
    losses = [cast(float, result.evaluate_metrics_clientapp[r]["eval_loss"]) for r in (1, 2, 3)]
    assert losses[-1] < losses[0], losses
    trained = result.arrays["0.weight"].numpy()
    assert not np.allclose(trained, initial["0.weight"].numpy())


def test_stock_fedmedian_runs_unchanged() -> None:
    grid = _grid(3)
    initial = to_array_record(build_model("sine-mlp", seed=1))
    result = FedMedian(min_available_nodes=3, min_train_nodes=3).start(
        grid, initial, num_rounds=1, train_config=TRAIN, evaluate_config=EVAL
    )
    assert set(result.arrays.keys()) == set(initial.keys())


def test_deliveries_record_bytes_and_dropouts() -> None:
    clients = [SimClient(1, {"data": "sine:seed=1"}), SimClient(2, {"data": "sine:seed=2"}, dropout=1.0)]
    grid = SimGrid(clients, seed=3)
    record = RecordDict({"arrays": to_array_record(build_model("sine-mlp", seed=0)), "config": TRAIN})
    replies = list(grid.send_and_receive(
        [grid.create_message(record, "train", nid, "1") for nid in (1, 2)], timeout=1.0
    ))
    assert [r.metadata.src_node_id for r in replies] == [1]
    deliveries = {d.node_id: d for d in grid.take_deliveries()}
    assert deliveries[1].status == REPLIED and deliveries[1].bytes_up > 16_000
    assert deliveries[2].status == TIMEOUT and deliveries[2].bytes_up == 0
    assert deliveries[1].bytes_down == len(grid.sent[0]) > 16_000
    assert grid.take_deliveries() == []
    # What was sent is a real Flower message that decodes to the same content.
    assert message_from_bytes(grid.sent[0]).content["config"]["lr"] == 0.01


def test_unknown_message_type_is_an_error_reply_not_a_crash() -> None:
    grid = _grid(1)
    msg = grid.create_message(
        RecordDict(), "query.nonexistent", 1000, "g"
    )
    # "query.nonexistent" falls back to the "query" category handler: still answered.
    (reply,) = grid.send_and_receive([msg], timeout=1)
    assert reply.has_content()
    msg = grid.create_message(
        RecordDict(), "train", 1000, "g"
    )
    (reply,) = grid.send_and_receive([msg], timeout=1)
    assert reply.has_error() and "ArrayRecord" in str(reply.error.reason)


def _dies(message: Message, context: Context) -> Message:
    os._exit(3)  # a device process killed mid-round (e.g. by the OOM killer)


def dying_handlers() -> HandlerRegistry:
    handlers = HandlerRegistry()
    handlers.register("train")(_dies)
    return handlers


def test_devices_in_worker_processes_compute_what_in_process_devices_compute() -> None:
    initial = to_array_record(build_model("sine-mlp", seed=0))
    outcomes = []
    for workers in (0, 2):
        random.seed(5)  # stock FedAvg samples with the global generator
        close_shared_sources()  # the in-process devices start their streams afresh, as workers do
        with _grid(6, workers=workers, seed=1) as grid:
            result = FedAvg(fraction_train=0.5, min_available_nodes=6, min_train_nodes=3).start(
                grid, initial, num_rounds=3, train_config=TRAIN, evaluate_config=EVAL
            )
            deliveries = [(d.node_id, d.status, d.bytes_down, d.bytes_up) for d in grid.take_deliveries()]
            state = grid.state()
            assert (grid.worker_cpu_seconds > 0) == (workers > 0)  # budgets count the workers' CPU
        weights = {k: v.numpy() for k, v in result.arrays.items()}
        outcomes.append((weights, result.evaluate_metrics_clientapp, deliveries, state))
    (plain, plain_eval, plain_sent, plain_state), (spread, spread_eval, spread_sent, spread_state) = outcomes
    assert plain.keys() == spread.keys() and all(np.array_equal(plain[k], spread[k]) for k in plain)
    assert plain_eval == spread_eval and plain_sent == spread_sent
    assert set(spread_state.contexts) == set(plain_state.contexts)
    assert set(spread_state.sources) == set(plain_state.sources) == {f"sine:seed={i}" for i in range(6)}


def test_a_worker_grid_restores_contexts_and_streams_into_its_workers() -> None:
    with _grid(4, workers=2) as grid:
        saved = grid.state()
        for source in saved.sources.values():
            source.next(3)  # moved on in this process only: the workers still stand where they were
        saved.contexts[1001].state["marker"] = ConfigRecord({"round": 7})
        grid.restore(saved)
        again = grid.state()
    assert again.contexts[1001].state["marker"]["round"] == 7
    for spec, source in again.sources.items():
        expected = saved.sources[spec].next(2)[0]
        assert torch.equal(source.next(2)[0], expected)


def test_a_dead_worker_is_named_with_its_nodes() -> None:
    grid = _grid(2, workers=2, handler_factory=dying_handlers)
    record = RecordDict({"arrays": to_array_record(build_model("sine-mlp", seed=0)), "config": TRAIN})
    try:
        died = r"worker 0 \(pid \d+\) died with exit code 3; it ran nodes \[1000\]"
        with pytest.raises(WorkerError, match=died):
            list(grid.send_and_receive([grid.create_message(record, "train", 1000, "1")], timeout=5.0))
    finally:
        grid.close()


def test_workers_need_a_handler_factory_not_a_registry() -> None:
    with pytest.raises(ValueError, match="handler_factory"):
        _grid(2, workers=2, handlers=dying_handlers())
