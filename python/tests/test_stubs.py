"""The checked-in stubs are what grpcio-tools makes of the proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "python" / "src" / "ballast" / "v1"
FILES = ["ballast_pb2.py", "ballast_pb2.pyi", "ballast_pb2_grpc.py"]


def test_checked_in_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "ballast/v1/ballast.proto",
        ],
        check=True,
    )
    for name in FILES:
        fresh = (tmp_path / "ballast" / "v1" / name).read_text()
        assert fresh == (GENERATED / name).read_text(), (
            f"python/src/ballast/v1/{name} is stale: run python/scripts/generate-stubs"
        )
