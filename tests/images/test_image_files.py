"""The image files agree with what they build from and for: the locks with pyproject.toml's
pins, the Containerfile with the chart's security context (fast; no build)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
sys.path.insert(0, str(IMAGES))
import wheelhouse  # noqa: E402


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_lock_has_every_pin_of_pyproject(variant):
    locked = wheelhouse.check_lock(variant)
    # the chart's test pod runs grpc_health from the image
    assert "grpcio-health-checking" in locked
    torch = locked["torch"][0]
    assert torch == ("2.13.0+cpu" if variant == "cpu" else "2.13.0")
    if variant == "cuda":
        assert any(n.startswith("nvidia-") for n in locked)
    else:
        assert not any(n.startswith(("nvidia-", "triton")) for n in locked)


def test_build_lock_pins_the_installer():
    assert set(wheelhouse.read_lock(wheelhouse.BUILD_LOCK)) == {"pip"}


def test_a_lock_line_without_a_hash_is_refused(tmp_path):
    bad = tmp_path / "r.txt"
    bad.write_text("torch==2.13.0\n")
    with pytest.raises(SystemExit, match="bad lock line"):
        wheelhouse.read_lock(bad)


def test_containerfile_matches_the_charts_security_context():
    text = (IMAGES / "Containerfile").read_text()
    values = yaml.safe_load((ROOT / "helm" / "rise" / "values.yaml").read_text())
    uid, gid = values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"]
    assert f"USER {uid}:{gid}" in text
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    # every cache and HOME under /tmp (a volume in every pod), no byte code written
    env = dict(re.findall(r"^\s+([A-Z_]+)=(\S+?)\s*\\?$", text, re.M))
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR",
                "TRITON_CACHE_DIR"):
        assert env[key].startswith("/tmp"), key
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text
    for label in ("version", "revision"):
        assert f"org.opencontainers.image.{label}=" in text
