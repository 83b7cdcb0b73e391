"""The checked-in rise.v1 stubs are exactly what the protos generate (no stale stubs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_generated_stubs_are_current(tmp_path):
    protos = sorted((ROOT / "protos" / "rise" / "v1").glob("*.proto"))
    assert protos, "no protos found"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", *map(str, protos)], check=True)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "rise" / "v1").iterdir()}
    checked_in = {p.relative_to(ROOT / "services"): p.read_bytes()
                  for p in (ROOT / "services" / "rise" / "v1").iterdir()
                  if p.name != "__init__.py" and p.suffix in (".py", ".pyi")}
    assert sorted(map(str, fresh)) == sorted(map(str, checked_in)), "stub files differ"
    stale = [str(k) for k in fresh if fresh[k] != checked_in[k]]
    assert not stale, f"stale stubs (run make protos): {stale}"


def test_every_rpc_and_field_is_commented():
    import re

    for proto in (ROOT / "protos" / "rise" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*rpc\s+\w+", line):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} uncommented rpc"
        assert "package rise.v1;" in proto.read_text()
