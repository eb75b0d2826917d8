"""The registry benchmark runs end to end at a small size: every query form on both engines gives
the same answers (the benchmark stops otherwise), and a real coordinator takes signed gRPC
registrations and Connect handshakes, and stops a runaway query's CPU at its deadline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyfleet.simulations.benchmarks import registry as benchmark


@pytest.mark.slow
def test_benchmark_runs_small_and_writes_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "registry.json"
    code = benchmark.main(
        ["--devices", "200", "--register", "20", "--repeats", "2", "--clients", "2",
         "--grpc-registrations", "6", "--json", str(out)]
    )
    assert code == 0
    size = json.loads(out.read_text())["sizes"][0]
    assert size["devices"] == 200 and size["register_one_by_one_per_s"] > 0
    for name, forms in size["query_forms_tried"].items():
        assert set(size["queries_ms_by_form"][name]) == set(forms)  # every form ran on Oxigraph
        assert size["query_form"][name] in forms and size["queries_ms"][name] > 0
        assert name in size["rdflib"]["queries_ms"]
    assert size["rows"]["selective filter: mcu, >=256 kB RAM, accel+gyro"] > 0
    grpc = size["register_grpc"]["clients_2"]
    assert grpc["acked_per_s"] > 0 and grpc["projected_per_s"] > 0
    assert size["register_grpc"]["connect_clients_2"]["handshakes_per_s"] > 0
    stop = size["register_grpc"]["query_deadline_to_cpu_stop_s"]
    # sampling runs 3 s past the deadline: a query left running would read as ~3 s
    assert len(stop["runs"]) == benchmark.RUNAWAY_REPEATS and stop["max"] < 2.5, stop
