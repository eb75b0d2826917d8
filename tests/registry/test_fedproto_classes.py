"""The classes a FedProto fleet knows, in the registry: each round's prototype artifact states its
classes (label, examples behind the prototype, devices those examples came from), within the fleet
shapes, and the named queries known-classes, devices-for-class and classes-of-device answer through
/sparql and `tinyfleet query` on a real coordinator whose agents stream made-up occupancy rows, also
after `tinyfleet registry rebuild`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyoxigraph as ox
import pytest

from tinyfleet.common.arrays import to_array_record
from tinyfleet.common.models import build_model
from tinyfleet.common.proto_protocol import join_global
from tinyfleet.common.prototypes import PrototypeSet
from tinyfleet.ontology import PROV, TF
from tinyfleet.ontology.catalog import render
from tinyfleet.server.registry.artifact_description import artifact_iri, describe_round_artifact
from tinyfleet.server.registry.validation import ShaclValidator
from tinyfleet.simulations.local_fleet import LocalFleet

from .coordinator_process import coordinator, select, wait_for

HEADER = '"date","Temperature","Humidity","Light","CO2","HumidityRatio","Occupancy"\n'
#: Three rooms of 30 rows each (rooms are contiguous thirds of the training file): room 0 is never
#: occupied, room 1 always, room 2 empty for 6 minutes, then occupied.
ROOM_LABELS = ([0] * 30, [1] * 30, [0] * 6 + [1] * 24)
DEVICES = [f"urn:tinyfleet:demo:agent-{room}" for room in range(3)]
JOB = """name = "{name}"
strategy = "fedproto"
model = "identity"
rounds = {rounds}
seed = 0

[options]
samples_per_round = 10
eval_samples = 20

[round]
deadline_s = 60.0
min_nodes = 3
wait_for_nodes_s = 60.0
"""


def _describe(devices: dict[int, str]) -> list[ox.Triple]:
    merged = PrototypeSet(
        dim=3,
        means={"cat": np.ones(3), "dog": np.zeros(3)},
        counts={"cat": 7, "dog": 2},
    )
    arrays = join_global(to_array_record(build_model("identity")), merged, {"cat": [11, 12], "dog": [12, 99]})
    return describe_round_artifact(
        sha="a" * 64, job_id=3, round_number=2, strategy="fedproto", model_name="identity",
        parent_sha="b" * 64, finished_at=time.time(), contributors=[], metrics={}, arrays=arrays,
        devices=devices,
    )


def test_a_prototype_artifact_states_its_classes_within_the_fleet_shapes() -> None:
    triples = _describe({11: "urn:tinyfleet:device:a", 12: "urn:tinyfleet:device:b"})
    store = ox.Store()
    store.extend([ox.Quad(t.subject, t.predicate, t.object) for t in triples])
    rows = store.query(
        f"SELECT ?label ?count ?device ?params WHERE {{ <{artifact_iri('a' * 64)}> <{TF}knowsClass> ?c ; "
        f"<{TF}parameterCount> ?params . ?c a <{TF}ClassPrototype> ; <{TF}classLabel> ?label ; "
        f"<{TF}exampleCount> ?count ; <{PROV}wasAttributedTo> ?device }}"
    )
    assert isinstance(rows, ox.QuerySolutions)
    names = ("label", "count", "device", "params")
    found = sorted(tuple(_value(row, name) for name in names) for row in rows)
    # Node 99 is no device of the fleet: not named. The weights are the 2 x 3 means (the identity
    # backbone has none); counts, labels and node ids are not parameters.
    assert found == [
        ("cat", "7", "urn:tinyfleet:device:a", "6"),
        ("cat", "7", "urn:tinyfleet:device:b", "6"),
        ("dog", "2", "urn:tinyfleet:device:b", "6"),
    ]
    shapes = ShaclValidator.shared()
    assert shapes.validate(triples) == []
    no_count = [t for t in triples if t.predicate != ox.NamedNode(TF + "exampleCount")]
    assert any("tf:exampleCount" in p.message for p in shapes.validate(no_count))


def _value(row: ox.QuerySolution, name: str) -> str:
    term = row[name]
    assert term is not None, name
    return str(term.value)


def _write_rows(path: Path, labels: list[int]) -> None:
    """Occupancy rows, one a minute, readings around one centre per class."""
    rng = np.random.default_rng(len(labels))
    centres = {0: np.array([20.0, 25.0, 10.0, 450.0, 0.004]), 1: np.array([23.0, 30.0, 500.0, 1100.0, 0.005])}
    lines = []
    for i, label in enumerate(labels):
        values = centres[label] * (1 + 0.02 * rng.standard_normal(5))
        when = (datetime(2015, 2, 4) + timedelta(minutes=i)).isoformat(sep=" ")
        lines.append(f'"{i + 1}","{when}",{",".join(f"{v:.6f}" for v in values)},{label}\n')
    path.write_text(HEADER + "".join(lines), encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "data" / "occupancy"
    folder.mkdir(parents=True)
    _write_rows(folder / "datatraining.txt", [label for room in ROOM_LABELS for label in room])
    for name in ("datatest.txt", "datatest2.txt"):
        _write_rows(folder / name, [i % 2 for i in range(40)])
    yield folder.parent


def _named(http: str, name: str, **params: str) -> list[dict[str, str]]:
    return select(http, render(name, params))


def _cli_named(http: str, name: str, **params: str) -> list[dict[str, str]]:
    args = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    done = subprocess.run(
        [sys.executable, "-m", "tinyfleet", "query", "--server", f"http://{http}", "--named", name,
         *args, "--format", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, str]] = json.loads(done.stdout)
    return rows


def _classes(http: str, job: str) -> list[tuple[str, str, str, str]]:
    return [(r["roundNumber"], r["label"], r["examples"], r["devices"])
            for r in _named(http, "known-classes", job=job)]


def _finish(fleet: LocalFleet, spec: str) -> str:
    job_id = fleet.submit(spec)
    final = fleet.wait(job_id)
    assert final.state == "finished", final.reason
    return f"urn:tinyfleet:job:{job_id}"


@pytest.mark.slow
def test_named_queries_tell_which_classes_the_fleet_knows_and_from_which_devices(
    tmp_path: Path, data_dir: Path
) -> None:
    with coordinator(tmp_path / "fleet") as fleet:
        fleet.start_agents([f"occupancy:room={room},rooms=3,dir={data_dir}" for room in range(3)])
        fleet.wait_online(3, timeout=120)
        first = _finish(fleet, JOB.format(name="rooms", rounds=2))
        http = fleet.http_address
        # Two rounds of 10 rows a room: room 0 read 20 empty rows, room 1 20 occupied, room 2
        # 6 empty and 14 occupied. Round 1's artifact (16 and 14) is not the answer: the latest is.
        wait_for(lambda: _classes(http, first) == [("2", "0", "26", "2"), ("2", "1", "34", "2")])

        # A second job: the rooms stream on (rows 20-29), room 2 now only occupied ones.
        second = _finish(fleet, JOB.format(name="rooms-again", rounds=1))
        wait_for(lambda: _classes(http, second) == [("1", "0", "10", "1"), ("1", "1", "20", "2")])
        every_job = _named(http, "known-classes")
        assert [(r["label"], r["examples"]) for r in every_job] == [
            ("0", "26"), ("1", "34"), ("0", "10"), ("1", "20")
        ]
        assert len({r["jobId"] for r in every_job}) == 2

        seen_empty = _named(http, "devices-for-class", label="0")
        assert [(r["device"], r["classExamples"]) for r in seen_empty] == [
            (DEVICES[0], "26"), (DEVICES[2], "26"), (DEVICES[0], "10")
        ]
        assert all(r.get("title") for r in seen_empty)  # the device's own description names it
        only_second = _named(http, "devices-for-class", label="0", job=second)
        assert [r["device"] for r in only_second] == [DEVICES[0]]
        assert _named(http, "devices-for-class", label="2") == []

        by_device = {
            device: [(r["label"], r["classExamples"], r["devices"])
                     for r in _named(http, "classes-of-device", device=device, job=first)]
            for device in DEVICES
        }
        assert by_device == {
            DEVICES[0]: [("0", "26", "2")],
            DEVICES[1]: [("1", "34", "2")],
            DEVICES[2]: [("0", "26", "2"), ("1", "34", "2")],
        }
        room_2 = _named(http, "classes-of-device", device=DEVICES[2])
        assert [(r["label"], r["devices"]) for r in room_2] == [("0", "2"), ("1", "2"), ("1", "2")]

        # The same answers from the command line.
        assert _cli_named(http, "devices-for-class", label="0", job=second) == only_second
        assert [r["label"] for r in _cli_named(http, "classes-of-device", device=DEVICES[1])] == ["1", "1"]

        # Rebuilt from SQL and the artifact store: the coordinator describes the rounds again.
        answers = {job: _classes(http, job) for job in (first, second)}
        fleet.kill_server(signal.SIGTERM)
        rebuilt = subprocess.run(
            [sys.executable, "-m", "tinyfleet", "registry", "rebuild", "--data-dir", str(fleet.data_dir)],
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert rebuilt.returncode == 0, rebuilt.stderr
        fleet.start_server()
        http = fleet.http_address
        wait_for(lambda: {job: _classes(http, job) for job in (first, second)} == answers, timeout=60)
        assert _named(http, "devices-for-class", label="0") == seen_empty
