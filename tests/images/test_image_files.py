"""The image files agree with what they build from and for: the locks with pyproject.toml's
pins, the Containerfile with the chart's security context (fast; no build)."""

from __future__ import annotations

import re
import sys
import tomllib
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
    # the extras the variant carries, at pyproject's pins: rise[gpu] (nvidia-ml-py, the
    # workers' NVML series) in the CUDA image only
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert wheelhouse.VARIANT_EXTRAS[variant] == (["gpu"] if variant == "cuda" else [])
    for pin in extras["gpu"]:
        name, version = pin.split("==")
        got = locked.get(wheelhouse.normalize(name), (None,))[0]
        assert got == (version if variant == "cuda" else None), (variant, name, got)


def test_check_lock_refuses_a_lock_without_an_extras_pin(tmp_path):
    lock = wheelhouse.lock_path("cuda").read_text()
    without = re.sub(r"^nvidia-ml-py==.*\n.*\n", "", lock, flags=re.M)
    assert without != lock
    (tmp_path / "r.txt").write_text(without)
    with pytest.raises(SystemExit, match="nvidia-ml-py"):
        wheelhouse.check_lock("cuda", tmp_path / "r.txt")


def test_containerfile_names_the_images_make_tags():
    """The header's `make images`/`make image-cuda` lines name the tags the Makefile gives."""
    make = (ROOT / "Makefile").read_text()
    image = re.search(r"^IMAGE \?= (\S+)$", make, re.M)[1]
    tagged = {}
    for target in ("images", "image-cuda"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", make, re.M)[1]
        suffix = re.search(r"-t \$\(IMAGE\):\$\(IMAGE_VERSION\)(\S*)", recipe)[1]
        tagged[target] = f"{image}:<version>{suffix}"
    header = (IMAGES / "Containerfile").read_text().split("ARG ", 1)[0]
    named = dict(re.findall(r"make (images|image-cuda)\b.*?->\s*(\S+)", header, re.S))
    assert named == tagged


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
