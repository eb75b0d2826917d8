"""The committed stubs must be exactly what grpcio-tools generates from the .proto."""

from __future__ import annotations

from pathlib import Path

from tinyfleet.protos.generate import generate

COMMITTED = Path(__file__).resolve().parent.parent / "protos" / "tinyfleet" / "v1"


def test_committed_stubs_match_regenerated(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert [p.name for p in generated] == ["fleet_pb2.py", "fleet_pb2.pyi", "fleet_pb2_grpc.py"]
    for path in generated:
        committed = COMMITTED / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python -m tinyfleet.protos.generate`"
        )


def test_grpc_stub_imports_from_the_package() -> None:
    from tinyfleet.protos.tinyfleet.v1 import fleet_pb2, fleet_pb2_grpc

    assert fleet_pb2.DESCRIPTOR.package == "tinyfleet.v1"
    assert hasattr(fleet_pb2_grpc, "FleetStub") and hasattr(fleet_pb2_grpc, "AdminStub")


def test_a_heartbeat_carries_nothing_since_its_send_time_was_never_read() -> None:
    from tinyfleet.protos.tinyfleet.v1 import fleet_pb2

    assert list(fleet_pb2.Heartbeat.DESCRIPTOR.fields) == []  # field 1 (sent_at) is reserved
