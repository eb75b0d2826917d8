"""FedProto on SimGrid with the real device handlers: the merged set is the mean of every example
streamed, a lost reply arrives later exactly once, none is merged twice (not even after a resume),
late and partial classes are kept, the backbone travels once per node and stays frozen."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from tinyfleet.client import occupancy, omniglot, proto_learners
from tinyfleet.client.data_sources import open_source
from tinyfleet.client.handlers import HandlerRegistry, default_handlers
from tinyfleet.common.arrays import from_numpy_dict, to_array_record
from tinyfleet.common.flower_adapter import (
    ERR_HANDLER_FAILED,
    make_context,
    message_from_bytes,
    reply_with_error,
)
from tinyfleet.common.jobspec import load_job_spec, parse_job_spec
from tinyfleet.common.models import build_model
from tinyfleet.common.proto_protocol import BACKBONE_KEY, split_global
from tinyfleet.common.prototypes import PrototypeSet
from tinyfleet.common.strategy_options import OptionsError
from tinyfleet.server.job_strategy import build_strategy
from tinyfleet.server.strategies import FedProto
from tinyfleet.simulations.rounds import RoundReport, run_rounds
from tinyfleet.simulations.sim_grid import SimClient, SimGrid

REPO = Path(__file__).resolve().parents[2]
HEADER = '"date","Temperature","Humidity","Light","CO2","HumidityRatio","Occupancy"\n'
IDENTITY = ConfigRecord({"model": "identity"})


def write_rows(path: Path, labels: list[int], seed: int = 0) -> None:
    """Occupancy rows, one a minute, whose readings scatter around a centre per class
    (far apart: nearest-mean classification is exact on them)."""
    rng = np.random.default_rng(seed)
    start = datetime(2015, 2, 4)
    lines = []
    for i, label in enumerate(labels):
        centre = np.array([20.0, 25.0, 10.0, 450.0, 0.004]) if label == 0 else np.array(
            [23.0, 30.0, 500.0, 1100.0, 0.005]
        )
        values = centre * (1 + 0.02 * rng.standard_normal(5))
        when = (start + timedelta(minutes=i)).isoformat(sep=" ")
        lines.append(f'"{i + 1}","{when}",{",".join(f"{v:.6f}" for v in values)},{label}\n')
    path.write_text(HEADER + "".join(lines), encoding="utf-8")


@pytest.fixture
def rooms(tmp_path: Path) -> Iterator[Path]:
    """Two rooms of 60 rows: room 0 is never occupied, room 1 is empty for 20 minutes, then occupied
    every other minute; the test files alternate."""
    folder = tmp_path / "occupancy"
    folder.mkdir()
    write_rows(folder / "datatraining.txt", [0] * 60 + [0] * 20 + [i % 2 for i in range(40)])
    write_rows(folder / "datatest.txt", [i % 2 for i in range(40)], seed=1)
    write_rows(folder / "datatest2.txt", [i % 2 for i in range(40)], seed=2)
    occupancy.load_table.cache_clear()
    yield tmp_path
    occupancy.load_table.cache_clear()


def _specs(root: Path) -> list[str]:
    return [f"occupancy:room={r},rooms=2,dir={root}" for r in range(2)]


def _run(
    strategy: FedProto, grid: SimGrid, rounds: int, arrays: ArrayRecord | None = None, first: int = 1
) -> tuple[ArrayRecord, list[RoundReport]]:
    reports: list[RoundReport] = []
    final = run_rounds(
        strategy,
        grid,
        arrays if arrays is not None else to_array_record(build_model("identity")),
        rounds,
        train_config=IDENTITY,
        first_round=first,
        on_round=lambda report, _: reports.append(report),
    )
    return final, reports


def _streamed(spec: str, draws: int, per_draw: int) -> tuple[np.ndarray, np.ndarray]:
    """What a device streamed in `draws` rounds: the same rows a fresh stream of its spec yields."""
    stream = open_source(spec)
    parts = [stream.next(per_draw) for _ in range(draws)]
    return torch.cat([x for x, _ in parts]).double().numpy(), torch.cat([y for _, y in parts]).numpy()


def _truth(samples: list[tuple[np.ndarray, np.ndarray]]) -> PrototypeSet:
    x = np.concatenate([s[0] for s in samples])
    y = np.concatenate([s[1] for s in samples])
    return PrototypeSet.from_embeddings(x, y)


def _merged(arrays: ArrayRecord) -> PrototypeSet:
    _, merged = split_global(arrays)
    assert merged is not None
    return merged


def _assert_equal_sets(merged: PrototypeSet, truth: PrototypeSet, tolerance: float) -> None:
    assert merged.counts == truth.counts
    for label in truth.labels:
        assert np.abs(merged.means[label] - truth.means[label]).max() <= tolerance, label


@pytest.mark.parametrize("encoding", ["fp32", "int8"])
def test_merged_set_is_the_mean_and_count_of_every_example_streamed(rooms: Path, encoding: str) -> None:
    specs = _specs(rooms)
    strategy = FedProto(samples_per_round=7, encoding=encoding)
    arrays, reports = _run(strategy, SimGrid.from_data_specs(specs), 5)
    truth = _truth([_streamed(spec, 5, 7) for spec in specs])
    largest = max(np.abs(m).max() for m in truth.means.values())
    # fp32: rounding of the values sent; int8: half a quantisation step of the largest value sent
    _assert_equal_sets(_merged(arrays), truth, largest * (1e-6 if encoding == "fp32" else 1 / 254))
    assert [r.metrics["examples"] for r in reports] == [14, 28, 42, 56, 70]
    per_class = 5 * 4 if encoding == "fp32" else 5 + 4
    assert all(r.metrics["bytes_per_class"] == per_class for r in reports)
    # each round sends both rooms the set merged so far (none in round 1); class 1 joins in round 4
    classes = [r.metrics["classes"] for r in reports]
    assert classes == [1, 1, 1, 2, 2]
    sent = [r.metrics["prototype_bytes_down"] for r in reports]
    assert sent == [0] + [2 * c * per_class for c in classes[:-1]]
    assert reports[4].metrics["prototype_bytes_up"] == per_class * 3  # room 0: class 0; room 1: 0, 1


def test_classes_seen_late_or_by_one_device_only_are_kept(rooms: Path) -> None:
    strategy = FedProto(samples_per_round=10)
    grid = SimGrid.from_data_specs(_specs(rooms))
    arrays, reports = _run(strategy, grid, 1)
    assert _merged(arrays).labels == ["0"]  # nobody has seen an occupied room yet
    arrays, reports = _run(strategy, grid, 2, arrays, first=2)
    assert _merged(arrays).labels == ["0", "1"]
    assert [r.metrics["new_classes"] for r in reports] == [0, 1]  # round 3: room 1's 21st minute on
    assert strategy.contributors == {"0": {1000, 1001}, "1": {1001}}


def _losing(node: int, rounds: set[int]) -> HandlerRegistry:
    """Handlers whose train replies from `node` in `rounds` are lost after the device ran (it
    folded its samples in and numbered its reply); the server gets an error instead."""
    registry = default_handlers()
    real = registry.resolve("train.fedproto")
    assert real is not None

    def train(message: Message, context: Context) -> Message:
        reply = real(message, context)
        server_round = message.content.config_records["config"]["server-round"]
        if context.node_id == node and server_round in rounds:
            return reply_with_error(message, ERR_HANDLER_FAILED, "lost on the way")
        return reply

    registry.register("train.fedproto")(train)
    return registry


def test_a_lost_reply_arrives_with_the_next_one_exactly_once(rooms: Path) -> None:
    specs = _specs(rooms)
    strategy = FedProto(samples_per_round=6)
    grid = SimGrid.from_data_specs(specs, handlers=_losing(1001, {2, 3}))
    arrays, reports = _run(strategy, grid, 5)
    assert [r.replied for r in reports] == [2, 1, 1, 2, 2]
    _assert_equal_sets(_merged(arrays), _truth([_streamed(spec, 5, 6) for spec in specs]), 1e-3)
    assert strategy.acked == {1000: 5, 1001: 5}


def test_a_reply_offered_twice_is_merged_once(rooms: Path) -> None:
    strategy = FedProto(samples_per_round=6)
    grid = SimGrid.from_data_specs(_specs(rooms))
    arrays, _ = _run(strategy, grid, 1)
    messages = list(strategy.configure_train(2, arrays, IDENTITY, grid))
    replies = list(grid.send_and_receive(messages))
    once, _ = strategy.aggregate_train(2, replies)
    twice, metrics = strategy.aggregate_train(2, replies + replies)
    assert once is not None and twice is None and metrics is None  # every reply skipped: merged already
    assert sum(_merged(once).counts.values()) == 24


def test_a_coordinator_resumed_from_an_older_round_gets_what_it_lost_exactly_once(rooms: Path) -> None:
    """Round 2 is merged in memory, then the coordinator dies before committing it: the strategy
    resumed from round 1's state and artifact asks again, and the devices, whose round-2 rows were
    never acknowledged, send them with round 2's new rows."""
    specs = _specs(rooms)
    grid = SimGrid.from_data_specs(specs)
    first = FedProto(samples_per_round=5)
    arrays, _ = _run(first, grid, 1)
    checkpoint = first.state_dict()
    _run(first, grid, 1, arrays, first=2)  # merged, never committed
    resumed = FedProto(samples_per_round=5)
    resumed.load_state_dict(checkpoint)
    final, _ = _run(resumed, grid, 2, arrays, first=2)
    _assert_equal_sets(_merged(final), _truth([_streamed(spec, 4, 5) for spec in specs]), 1e-3)


def test_a_new_session_starts_the_devices_afresh(rooms: Path) -> None:
    grid = SimGrid.from_data_specs(_specs(rooms), handlers=_losing(1001, {1}))
    _run(FedProto(samples_per_round=4), grid, 1)  # room 1 keeps 4 rows nobody merged
    arrays, _ = _run(FedProto(samples_per_round=4), grid, 1, first=2)  # another job
    assert sum(_merged(arrays).counts.values()) == 8  # this job's rows: 4 a room


def test_evaluation_classifies_held_back_rows_by_the_nearest_merged_prototype(rooms: Path) -> None:
    for metric in ("euclidean", "cosine"):
        strategy = FedProto(samples_per_round=40, eval_samples=40, metric=metric)
        grid = SimGrid.from_data_specs(_specs(rooms))
        untrained = to_array_record(build_model("identity"))
        assert list(strategy.configure_evaluate(1, untrained, IDENTITY, grid)) == []  # no set yet
        arrays, _ = _run(strategy, grid, 2)
        messages = list(strategy.configure_evaluate(2, arrays, IDENTITY, grid))
        result = strategy.aggregate_evaluate(2, list(grid.send_and_receive(messages)))
        assert result is not None
        assert result["accuracy"] == 1.0 and result["known_fraction"] == 1.0, metric


# -- the backbone ----------------------------------------------------------------------------------


@pytest.fixture
def glyphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A made-up Omniglot background set: two alphabets of 3 characters, 20 drawers each."""
    monkeypatch.setattr(omniglot, "BACKGROUND_ALPHABETS", (("A", 3), ("B", 3)))
    omniglot.load_split.cache_clear()
    (tmp_path / "omniglot").mkdir()
    ink = np.random.default_rng(0).random((6, 20, 105, 105)) > 0.1
    np.savez(tmp_path / "omniglot" / "images_background.npz", images=ink, labels=np.zeros((6, 20)))
    yield tmp_path
    omniglot.load_split.cache_clear()


PROTONET = ConfigRecord({"model": "omniglot-protonet"})


def _glyph_specs(root: Path) -> list[str]:
    return [f"omniglot:device={d},devices=2,ways=2,seed=3,dir={root}" for d in range(2)]


def test_devices_embed_with_the_frozen_backbone_and_name_classes_globally(glyphs: Path) -> None:
    backbone = build_model("omniglot-protonet", seed=1)
    for module in backbone.modules():  # running statistics far from a fresh batch's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.load_state_dict({**module.state_dict(), "running_mean": torch.full((64,), 0.3),
                                    "running_var": torch.full((64,), 2.0)})
    initial = to_array_record(backbone)
    specs = _glyph_specs(glyphs)
    strategy = FedProto(samples_per_round=6)
    arrays = run_rounds(strategy, SimGrid.from_data_specs(specs), initial, 2, train_config=PROTONET)
    kept, merged = split_global(arrays)
    assert kept.keys() == initial.keys()
    assert all(np.array_equal(kept[k].numpy(), initial[k].numpy()) for k in initial)
    backbone.eval()
    expected = []
    for spec in specs:  # what each device streamed: a new task each round, classes named by global id
        stream = open_source(spec)
        assert isinstance(stream, omniglot.OmniglotDeviceStream)
        for _ in range(2):
            stream.new_task()
            x, y = stream.next(6)
            with torch.no_grad():
                expected.append((backbone(x).double().numpy(), np.array(stream.label_names(y))))
    assert merged is not None and merged.dim == 64
    _assert_equal_sets(merged, _truth(expected), 1e-5)


def _sent_backbones(grid: SimGrid) -> list[bool]:
    return [BACKBONE_KEY in message_from_bytes(wire).content.array_records for wire in grid.sent]


def test_the_backbone_travels_once_per_node_and_is_checked_by_sha256(glyphs: Path) -> None:
    initial = to_array_record(build_model("omniglot-protonet", seed=0))
    clients = [SimClient(node_id=7 + i, node_config={"data": s}) for i, s in enumerate(_glyph_specs(glyphs))]
    grid = SimGrid(clients)
    strategy = FedProto(samples_per_round=4)
    arrays, reports = initial, []
    for server_round in (1, 2):
        arrays = run_rounds(strategy, grid, arrays, 1, train_config=PROTONET, first_round=server_round,
                            on_round=lambda report, _: reports.append(report))
    assert _sent_backbones(grid) == [True, True, False, False]
    assert reports[1].bytes_down * 20 < reports[0].bytes_down  # the sha256 instead of 113k weights
    # a device that lost its Context fails once, then gets the backbone again
    clients[0].context = make_context(7, clients[0].node_config)
    grid.sent.clear()
    arrays = run_rounds(strategy, grid, arrays, 2, train_config=PROTONET, first_round=3)
    assert _sent_backbones(grid) == [False, False, True, False]
    assert strategy.acked == {7: 3, 8: 4}  # node 7's numbers go on from the server's acknowledgement
    # weights that do not match the sha256 the message names are refused
    weights = {k: v.numpy() for k, v in initial.items()}
    weights["features.0.weight"] = weights["features.0.weight"] + 1.0
    message = next(iter(FedProto().configure_train(1, initial, PROTONET, grid)))
    message.content[BACKBONE_KEY] = from_numpy_dict(weights)
    context = make_context(9, {"data": _glyph_specs(glyphs)[0]})
    with pytest.raises(ValueError, match="sha256"):
        proto_learners.train(message, context)


def test_a_backbone_file_replaces_the_jobs_initial_weights(glyphs: Path, tmp_path: Path) -> None:
    from tinyfleet.common.flower_adapter import array_record_to_bytes

    trained = to_array_record(build_model("omniglot-protonet", seed=5))
    path = tmp_path / "central.arrays"
    path.write_bytes(array_record_to_bytes(trained))
    strategy = FedProto(backbone=str(path), samples_per_round=2)
    arrays = run_rounds(strategy, SimGrid.from_data_specs(_glyph_specs(glyphs)),
                        to_array_record(build_model("omniglot-protonet", seed=0)), 1, train_config=PROTONET)
    kept, _ = split_global(arrays)
    assert all(np.array_equal(kept[k].numpy(), trained[k].numpy()) for k in trained)
    with pytest.raises(ValueError, match=r"missing\.arrays"):
        FedProto(backbone=str(tmp_path / "missing.arrays"))
    with pytest.raises(ValueError, match="does not match"):
        list(FedProto(backbone=str(path)).configure_train(1, to_array_record(build_model("sine-mlp")),
                                                          PROTONET, SimGrid([])))


# -- options, job files, labels --------------------------------------------------------------------


def test_options_are_checked_by_name_and_a_job_file_names_the_strategy() -> None:
    with pytest.raises(OptionsError, match="'encoding'"):
        FedProto(encoding="fp16")
    with pytest.raises(OptionsError, match=r"'epsilon'.*unknown option"):
        FedProto(epsilon=0.5)
    spec = load_job_spec(REPO / "examples" / "occupancy-fedproto.toml")
    strategy = build_strategy(spec)
    assert isinstance(strategy, FedProto) and spec.model == "identity"
    text = 'strategy = "fedproto"\nmodel = "identity"\nrounds = 2\n[options]\nsamples = 3\n'
    with pytest.raises(ValueError, match=r"options\.samples"):
        build_strategy(parse_job_spec(text))


def test_state_dict_round_trips() -> None:
    strategy = FedProto()
    strategy.acked, strategy.contributors, strategy.rounds_done = {3: 2, 4: 1}, {"a": {3, 4}}, 2
    resumed = FedProto()
    resumed.load_state_dict(strategy.state_dict())
    assert (resumed.session, resumed.acked, resumed.contributors, resumed.rounds_done) == (
        strategy.session, {3: 2, 4: 1}, {"a": {3, 4}}, 2
    )
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({"version": 99})


def test_a_source_without_classes_is_refused_by_name() -> None:
    source = open_source("sine:seed=0")
    with pytest.raises(ValueError, match="'sine' has no class labels"):
        proto_learners.label_names(source, source.next(3)[1])


def test_a_reply_without_its_example_count_is_skipped_alone(rooms: Path) -> None:
    """Averaging the round's metrics reads every merged reply's num-examples: one reply without it
    (or with a second MetricRecord) must be skipped, not fail the round for the honest ones."""
    from flwr.app import MetricRecord, RecordDict

    strategy = FedProto(samples_per_round=6)
    grid = SimGrid.from_data_specs(_specs(rooms))
    arrays, _ = _run(strategy, grid, 1)
    replies = list(grid.send_and_receive(list(strategy.configure_train(2, arrays, IDENTITY, grid))))
    bad, good = replies
    bad.content = RecordDict({k: v for k, v in bad.content.items() if not isinstance(v, MetricRecord)})
    merged, metrics = strategy.aggregate_train(2, [bad, good])
    assert merged is not None and metrics is not None
    assert metrics["nodes"] == 1 and metrics["skipped"] == 1
    assert strategy.acked[bad.metadata.src_node_id] == 1  # its delta stays pending on the device
    assert sum(_merged(merged).counts.values()) == 2 * 6 + 6  # round 1 from both, round 2 from one
