#!/bin/sh
# What every built RISE image must be: uid 10001, tini as the entrypoint, OCI version and
# revision labels, the variant's torch build (CUDA: torch.version.cuda set, and rise[gpu]'s
# pynvml), the chart test pod's grpc_health module, and no installer, compiler or
# wheelhouse left in it.
#   check-image.sh IMAGE cpu|cuda
set -eu
image=${1:?image}
variant=${2:?cpu or cuda}
fail() { echo "check-image: $image: $*" >&2; exit 1; }

buildah inspect --type image "$image" | python3 -c '
import json, sys
c = json.load(sys.stdin)["OCIv1"]["config"]
labels = c.get("Labels") or {}
for key in ("org.opencontainers.image.version", "org.opencontainers.image.revision"):
    assert labels.get(key), f"label {key} missing"
entry, user = c.get("Entrypoint"), c.get("User")
assert entry == ["/usr/bin/tini", "--"], f"entrypoint {entry}, not tini"
assert user == "10001:10001", f"user {user}, not 10001:10001"
' || fail "image configuration"

ctr=$(buildah from --pull-never "$image")
trap 'buildah rm "$ctr" >/dev/null' EXIT
buildah run --isolation chroot "$ctr" -- python - "$variant" <<'PY'
import os, shutil, sys
import grpc_health.v1.health_pb2  # noqa: F401  (the chart's test pod)
import rise.cli, rise.gateway, rise.scorer, rise.controller, rise.worker  # noqa: F401
import torch
variant = sys.argv[1]
assert os.getuid() == 10001 and os.getgid() == 10001, (os.getuid(), os.getgid())
cuda = torch.version.cuda
if variant == "cuda":
    assert cuda, f"torch {torch.__version__} is not a CUDA build"
    import pynvml  # noqa: F401  (rise[gpu]: the workers' NVML series)
else:
    assert cuda is None and torch.__version__.endswith("+cpu"), (torch.__version__, cuda)
for tool in ("pip", "pip3", "gcc", "cc", "make"):
    assert shutil.which(tool) is None, f"{tool} is in the image: {shutil.which(tool)}"
try:
    import pip  # noqa: F401
    raise AssertionError("pip is importable")
except ImportError:
    pass
assert not os.path.exists("/wheelhouse") and not os.path.exists("/root/.cache/pip")
print(f"check-image: uid 10001, torch {torch.__version__} (cuda {cuda}), no installer")
PY
size=$(buildah images --format '{{.Size}}' "$image" | head -1)
echo "check-image: $image ($variant) ok, $size"
