#!/usr/bin/env bash
# Create the virtual environment of one peer library under .cache/peers/<peer>/venv and
# install pinned versions into it. Idempotent: a venv whose stamp matches the current
# spec is left alone (delete the stamp or the venv to force a rebuild).
#
#   tests/benchmarks/peers/setup.sh <peer>      # bergson|kronfluence|traker|dattri|logix|captum
#
# Never touches the product's .venv, never runs in CI. Every venv gets the CPU build of
# torch==2.13.0 (the one on this machine's disk) first; the peer itself is installed with
# --no-deps wherever its metadata would pull another torch, torchvision, torchaudio or
# bitsandbytes, and its remaining dependencies are listed explicitly. torchvision is
# forbidden by a constraint (it breaks transformers beside the CPU torch).
set -euo pipefail

peer=${1:?usage: setup.sh <peer>}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
base=$root/.cache/peers/$peer
venv=$base/venv
PY=${PEERS_PYTHON:-python3}

# Shared by all venvs: same torch / transformers stack as the product.
COMMON=(torch==2.13.0 numpy==2.4.6 transformers==5.23.0 tokenizers==0.23.3
        huggingface_hub==2.4.0 safetensors==0.8.0 tqdm pyyaml)

NODEPS=()          # installed with --no-deps
EXTRA=()           # installed with deps (after torch is in place, constrained)
PIPFLAGS=()
case "$peer" in
  kronfluence)
    NODEPS=(kronfluence==1.0.1)
    EXTRA=(accelerate==1.15.0 einops==0.8.1 einconv==0.1.0 opt-einsum==3.4.0) ;;
  bergson)
    # bergson's metadata requires torchvision, torchaudio and bitsandbytes (and would pull a
    # CUDA torch); none of them is needed for gradient collection on CPU.
    NODEPS=(bergson==2.5.1)
    EXTRA=(accelerate==1.15.0 datasets jinja2 "jaxtyping>=0.3.3" ml_dtypes natsort scipy
           "peft>=0.17.0" petname pyarrow simple-parsing torchopt) ;;
  traker)
    NODEPS=(traker==0.3.2)
    EXTRA=() ;;
  dattri)
    NODEPS=(dattri==0.3.0)
    EXTRA=(scipy) ;;
  logix)
    # logix-ai 0.1.1 declares Requires-Python <3.11; it runs on 3.11.
    NODEPS=(logix-ai==0.1.1)
    EXTRA=(einops==0.8.1)
    PIPFLAGS=(--ignore-requires-python) ;;
  captum)
    NODEPS=(captum==0.9.0)
    EXTRA=(matplotlib packaging) ;;
  *) echo "unknown peer: $peer" >&2; exit 2 ;;
esac

spec="py=$($PY -c 'import sys;print(sys.version.split()[0])') common=${COMMON[*]} nodeps=${NODEPS[*]} extra=${EXTRA[*]} flags=${PIPFLAGS[*]:-}"
stamp=$venv/.peers-setup-stamp
if [[ -f $stamp && "$(cat "$stamp")" == "$spec" ]]; then
  echo "[setup] $peer: up to date ($venv)"; exit 0
fi

mkdir -p "$base"
rm -rf "$venv"
$PY -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
# pip warns about every name missing from this machine's local indexes: hide that noise.
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
cons=$base/constraints.txt
printf 'torch==2.13.0\ntorchvision===never-install\ntorchaudio===never-install\nbitsandbytes===never-install\n' >"$cons"

"${pip[@]}" -c "$cons" "${COMMON[@]}"
if ((${#EXTRA[@]})); then "${pip[@]}" -c "$cons" "${PIPFLAGS[@]}" "${EXTRA[@]}"; fi
"${pip[@]}" --no-deps "${PIPFLAGS[@]}" "${NODEPS[@]}"

# Sanity: still the CPU torch, no torchvision.
"$venv/bin/python" - <<'EOF'
import importlib.util, torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert importlib.util.find_spec("torchvision") is None, "torchvision got in"
print("[setup] torch", torch.__version__)
EOF
"$venv/bin/python" -m pip freeze --disable-pip-version-check >"$base/freeze.txt"
echo "$spec" >"$stamp"
echo "[setup] $peer: ready ($venv)"
