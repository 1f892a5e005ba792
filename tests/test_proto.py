"""The committed generated modules are what the proto generates (regenerate after editing it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PROTOS = ("inference", "admin")


@pytest.mark.parametrize("name", PROTOS)
def test_generated_modules_are_current(tmp_path: Path, name: str) -> None:
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
            f"proto/kunserve/v1/{name}.proto",
        ],
        cwd=ROOT,
        check=True,
    )
    for module in (f"{name}_pb2.py", f"{name}_pb2_grpc.py", f"{name}_pb2.pyi"):
        fresh = (tmp_path / "proto/kunserve/v1" / module).read_text()
        committed = (ROOT / "proto/kunserve/v1" / module).read_text()
        assert fresh == committed, f"{module} is stale: regenerate it (see proto/README.md)"
