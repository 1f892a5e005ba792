"""The committed generated modules are what the proto generates (regenerate after editing it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PROTO = "proto/kunserve/v1/inference.proto"


def test_generated_modules_are_current(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            PROTO,
        ],
        cwd=ROOT,
        check=True,
    )
    for name in ("inference_pb2.py", "inference_pb2_grpc.py", "inference_pb2.pyi"):
        fresh = (tmp_path / "proto/kunserve/v1" / name).read_text()
        committed = (ROOT / "proto/kunserve/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate it (see proto/README.md)"
