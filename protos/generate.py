"""Regenerate the Python stubs for the fleet protocol.

grpcio-tools writes absolute imports that follow the proto package
(`from tinyfleet.v1 import fleet_pb2`); the stubs live in `tinyfleet.protos`, so
the import is rewritten. Run: `python -m tinyfleet.protos.generate [OUT_DIR]`.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

PROTO = "tinyfleet/v1/fleet.proto"
_WRONG_IMPORT = "from tinyfleet.v1 import fleet_pb2"
_RIGHT_IMPORT = "from tinyfleet.protos.tinyfleet.v1 import fleet_pb2"


def generate(out_dir: Path) -> list[Path]:
    """Write fleet_pb2.py, fleet_pb2.pyi and fleet_pb2_grpc.py under out_dir/tinyfleet/v1."""
    from grpc_tools import protoc

    proto_root = Path(str(resources.files("tinyfleet.protos")))
    include = Path(str(resources.files("grpc_tools"))) / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto_root / PROTO),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {proto_root / PROTO}")
    stub = out_dir / "tinyfleet" / "v1" / "fleet_pb2_grpc.py"
    stub.write_text(stub.read_text().replace(_WRONG_IMPORT, _RIGHT_IMPORT))
    return sorted((out_dir / "tinyfleet" / "v1").glob("fleet_pb2*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(str(resources.files("tinyfleet.protos")))
    for path in generate(target):
        print(path)
