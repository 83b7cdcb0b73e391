#!/usr/bin/env python3
"""The hash-checked wheelhouse the container images install from (stdlib only).

    wheelhouse.py lock  --variant cpu|cuda     # pyproject.toml pins -> requirements-<variant>.txt
    wheelhouse.py fetch --variant cpu|cuda --out DIR    # the locked wheels + rise's own, checked

``lock`` resolves the exact pins of pyproject.toml (plus the variant's torch build) for the
image's platform (CPython 3.11, manylinux x86_64, wheels only), downloads every wheel and
writes ``deploy/images/requirements-<variant>.txt``: one ``name==version --hash=sha256:``
line per wheel, the whole dependency tree.  ``fetch`` downloads exactly those files again
(``pip download --require-hashes``: a file whose hash differs is refused, wherever it comes
from), builds the ``rise`` wheel from this checkout and writes the build context of the
image: ``DIR/wheelhouse/`` and ``DIR/requirements.txt`` (the lock), ``DIR/rise/`` (rise's
wheel and its own hashed line).  The image then installs with ``pip install --no-index
--require-hashes``: nothing is fetched at image build time, which is how air-gapped
clusters build.

Where the wheels come from:
- cpu: pip's own configuration (``pip config list``: an index, a mirror, find-links) plus
  PyTorch's CPU index (``--torch-index``, empty to leave it out); torch is ``2.13.0+cpu``.
- cuda: an isolated pip (``PIP_CONFIG_FILE=/dev/null`` and ``--isolated``: no pip.conf, no
  ``PIP_*`` variable, no constraints file, no local find-links) on ``--index-url`` (PyPI by
  default), whose Linux torch wheel is the CUDA build with its ``nvidia-*`` wheels.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON_VERSION = "3.11"
# Debian bookworm has glibc 2.36; manylinux wheels up to that run on it.
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(36, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
TORCH = {"cpu": "torch==2.13.0+cpu", "cuda": "torch==2.13.0"}
# pip evaluates environment markers with the interpreter that runs it, not --python-version:
# dependencies behind a marker that holds on some CPython 3.11 are added here, so that the
# lock fits every 3.11 (redis needs async-timeout below 3.11.3; Debian bookworm has 3.11.2).
MARKER_EXTRAS = ["async-timeout==5.0.1"]
# pyproject.toml's optional extras each variant carries: the CUDA image has `rise[gpu]`
# (nvidia-ml-py: the workers' NVML utilisation and memory series).
VARIANT_EXTRAS = {"cpu": [], "cuda": ["gpu"]}
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
# The installer the image build runs (from its wheel, never installed into the image).
PIP = "pip==26.3"
BUILD_LOCK = HERE / "requirements-build.txt"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(extras: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The exact pins of pyproject.toml's runtime dependencies and of the given extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in extras:
        deps += project["optional-dependencies"][extra]
    bad = [d for d in deps if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", d)]
    if bad:
        raise SystemExit(f"wheelhouse: not an exact pin in pyproject.toml: {bad}")
    return deps


def top_level(variant: str) -> list[str]:
    out = [TORCH[variant] if normalize(d.split("==")[0]) == "torch" else d
           for d in pins(VARIANT_EXTRAS[variant])]
    return out + MARKER_EXTRAS


def lock_path(variant: str) -> Path:
    return HERE / f"requirements-{variant}.txt"


def pip_command(variant: str, index_url: str, torch_index: str) -> tuple[list[str], dict[str, str]]:
    """pip download for the image's platform, and its environment."""
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pip"]
    if variant == "cuda":
        # The local configuration prefers CPU torch wheels and caps torch by constraints:
        # none of it may reach the CUDA resolution.
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
        cmd += ["--isolated", "download", "--index-url", index_url or PYPI]
    else:
        cmd += ["download"]
        if index_url:
            cmd += ["--index-url", index_url]
        if torch_index and reachable(torch_index):
            cmd += ["--extra-index-url", torch_index]
        elif torch_index:
            # pip would retry an unreachable index for every package (minutes): leave it
            # out; the hashes still decide which file is accepted.
            print(f"wheelhouse: {torch_index} unreachable; torch from pip's configuration",
                  flush=True)
    cmd += ["--disable-pip-version-check", "--no-cache-dir", "--only-binary=:all:",
            "--python-version", PYTHON_VERSION, "--implementation", "cp",
            "--abi", "cp" + PYTHON_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return cmd, env


def reachable(url: str, timeout: float = 10.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def wheel_key(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def lock(args: argparse.Namespace) -> None:
    out = Path(args.out or lock_path(args.variant))
    with tempfile.TemporaryDirectory(prefix="rise-lock-", dir=args.tmp) as tmp:
        cmd, env = pip_command(args.variant, args.index_url, args.torch_index)
        run([*cmd, "-d", tmp, *top_level(args.variant)], env)
        wheels = sorted(Path(tmp).glob("*.whl"), key=lambda p: wheel_key(p))
        others = [p.name for p in Path(tmp).iterdir() if p.suffix != ".whl"]
        if others:
            raise SystemExit(f"wheelhouse: not wheels: {others}")
        lines = [
            f"# The {args.variant} image's Python dependencies: pyproject.toml's pins and their whole",
            "# tree, one wheel each, for CPython 3.11 on manylinux x86_64.  Written by",
            f"# `make image-lock` (deploy/images/wheelhouse.py lock --variant {args.variant});",
            "# installed with pip install --no-index --require-hashes.",
        ]
        seen: set[str] = set()
        for w in wheels:
            name, version = wheel_key(w)
            if name in seen:
                raise SystemExit(f"wheelhouse: two wheels of {name}")
            seen.add(name)
            lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha256(w)}")
        if args.keep:  # the wheels stay for `fetch`, which checks them against the lock
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for w in wheels:
                os.replace(w, Path(args.keep) / w.name)
    out.write_text("\n".join(lines) + "\n")
    print(f"wheelhouse: {out} ({len(seen)} wheels)")
    with tempfile.TemporaryDirectory(prefix="rise-lock-", dir=args.tmp) as tmp:
        cmd, env = pip_command(args.variant, args.index_url, "")
        run([*cmd, "--no-deps", "-d", tmp, PIP], env)
        (whl,) = Path(tmp).glob("pip-*.whl")
        BUILD_LOCK.write_text(
            "# The installer of the image build, run from its wheel (not installed in the\n"
            "# image).  Written by `make image-lock`.\n"
            f"{PIP} \\\n    --hash=sha256:{sha256(whl)}\n")


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (version, sha256) of a lock file."""
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if not m:
            raise SystemExit(f"wheelhouse: bad lock line in {path}: {line!r}")
        out[normalize(m[1])] = (m[2], m[3])
    return out


def check_lock(variant: str, path: Path | None = None) -> dict[str, tuple[str, str]]:
    """The lock agrees with pyproject.toml: every pin present at its version."""
    locked = read_lock(path or lock_path(variant))
    for req in top_level(variant):
        name, version = req.split("==")
        got = locked.get(normalize(name), ("missing", ""))[0]
        if got != version:
            raise SystemExit(f"wheelhouse: {lock_path(variant).name} has {name} {got}, "
                             f"pyproject.toml pins {version}: run make image-lock")
    return locked


def build_rise_wheel(dest: Path, tmp_root: str | None) -> Path:
    """rise's wheel from a copy of the sources (no build/ or egg-info in the checkout)."""
    with tempfile.TemporaryDirectory(prefix="rise-src-", dir=tmp_root) as tmp:
        src = Path(tmp) / "src"
        (src / "services").mkdir(parents=True)
        shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")
        shutil.copytree(ROOT / "services" / "rise", src / "services" / "rise",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "-w", str(dest), str(src)],
            {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "315532800")})
    wheels = list(dest.glob("rise-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"wheelhouse: expected one rise wheel, found {wheels}")
    return wheels[0]


def fetch(args: argparse.Namespace) -> None:
    locked = check_lock(args.variant)
    out = Path(args.out)
    house = out / "wheelhouse"
    house.mkdir(parents=True, exist_ok=True)
    for old in house.glob("rise-*.whl"):
        old.unlink()
    cmd, env = pip_command(args.variant, args.index_url, args.torch_index)
    # Files already there are checked against the lock, not fetched again.
    run([*cmd, "--no-deps", "--require-hashes", "-d", str(house), "-r",
         str(lock_path(args.variant))], env)
    run([*cmd, "--no-deps", "--require-hashes", "-d", str(house), "-r", str(BUILD_LOCK)], env)
    locked = {**locked, **read_lock(BUILD_LOCK)}
    keep = set()
    for w in house.glob("*.whl"):
        name, version = wheel_key(w)
        want = locked.get(name)
        if want and want[0] == version and sha256(w) == want[1]:
            keep.add(name)
        else:
            w.unlink()  # left over from another lock
    if keep != set(locked):
        raise SystemExit(f"wheelhouse: missing after download: {sorted(set(locked) - keep)}")
    keep.discard("pip")
    (out / "requirements.txt").write_text(lock_path(args.variant).read_text())
    # rise's own wheel apart (its own layer: a change of the sources leaves the
    # dependencies' layer cached), with fixed timestamps: the same sources, the same hash.
    app = out / "rise"
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir()
    rise = build_rise_wheel(app, args.tmp)
    (app / "requirements.txt").write_text(
        f"rise=={wheel_key(rise)[1]} \\\n    --hash=sha256:{sha256(rise)}\n")
    size = sum(p.stat().st_size for p in house.glob("*.whl"))
    print(f"wheelhouse: {house}: {len(keep)} wheels, {size / 2**20:.0f} MiB; {rise.name}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("lock", "fetch", "check"):
        p = sub.add_parser(name)
        p.add_argument("--variant", choices=sorted(TORCH), required=True)
        p.add_argument("--index-url", default="",
                       help="cpu: replaces pip's configured index; cuda: the only index (PyPI)")
        p.add_argument("--torch-index", default=CPU_TORCH_INDEX,
                       help="cpu only: an extra index with torch's CPU build ('' to omit)")
        p.add_argument("--tmp", default=None, help="folder for temporary files")
        if name == "lock":
            p.add_argument("--out", default="", help="lock file (default: deploy/images/)")
            p.add_argument("--keep", default="", help="move the downloaded wheels here")
        if name == "fetch":
            p.add_argument("--out", required=True, help="the image's build context")
    args = ap.parse_args(argv)
    if args.cmd == "lock":
        lock(args)
    elif args.cmd == "fetch":
        fetch(args)
    else:
        n = len(check_lock(args.variant))
        print(f"wheelhouse: {lock_path(args.variant).name} agrees with pyproject.toml ({n} wheels)")


if __name__ == "__main__":
    main()
