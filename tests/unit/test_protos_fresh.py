"""The generated code committed under relay/pb/v1 is exactly what `make protos` produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path("relay", "pb", "v1")
COMMITTED = ROOT / PACKAGE
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generated_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the `make protos` command with its output in a temporary folder instead of `.`."""
    out = tmp_path_factory.mktemp("protos")
    sources = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "protos" / PACKAGE).glob("*.proto")
    )
    assert sources, "no .proto sources found under protos/relay/pb/v1"
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iprotos",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return out / PACKAGE


def test_committed_generated_code_matches_a_fresh_generation(fresh):
    """Every file protoc generates is committed and byte-identical: run `make protos` if not."""
    stale = sorted(
        name
        for name in _generated_names(fresh)
        if not (COMMITTED / name).is_file()
        or (COMMITTED / name).read_bytes() != (fresh / name).read_bytes()
    )
    assert not stale, f"missing or stale in {PACKAGE}, run `make protos`: {stale}"


def test_no_committed_generated_file_lacks_a_proto_source(fresh):
    """No generated-looking file under relay/pb/v1 survives its .proto source being removed."""
    orphans = sorted(_generated_names(COMMITTED) - _generated_names(fresh))
    assert not orphans, f"generated files without a .proto source, delete them: {orphans}"
