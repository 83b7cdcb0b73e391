#!/usr/bin/env bash
# Run the peer libraries on the eval tasks, one at a time, each in its own venv, each
# (task, method) a cached target: a target whose <method>.json says "status": "ok" next to
# its .npy is skipped; so is one recorded as failed, unless --retry-failed.
#
#   tests/benchmarks/peers/run_all.sh [--tasks domain,backdoor,quality]
#       [--peers kronfluence,bergson,traker,dattri,logix,captum] [--retry-failed] [--dry-run]
#
# Env: PEERS_TIMEOUT (seconds per target, default 2400), PEERS_THREADS (torch threads, 1),
#      PEERS_EVAL (eval cache, default .cache/eval).
# Logs: .cache/peers/logs/<task>-<method>.log. Never part of CI.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cd "$root"
EVAL=${PEERS_EVAL:-.cache/eval}
TIMEOUT=${PEERS_TIMEOUT:-2400}
export PEERS_THREADS=${PEERS_THREADS:-1}
export OMP_NUM_THREADS=$PEERS_THREADS MKL_NUM_THREADS=$PEERS_THREADS
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
tasks=domain,backdoor,quality
peers=kronfluence,bergson,traker,dattri,logix,captum
retry=0; dry=0
while (($#)); do
  case $1 in
    --tasks) tasks=$2; shift 2 ;;
    --peers) peers=$2; shift 2 ;;
    --retry-failed) retry=1; shift ;;
    --dry-run) dry=1; shift ;;
    *) echo "unknown arg $1" >&2; exit 2 ;;
  esac
done
mkdir -p .cache/peers/logs

# peer -> "method|extra args" lines (one target each)
targets() {
  case $1 in
    kronfluence) echo "kronfluence-ekfac|" ;;
    bergson)     echo "bergson|" ;;
    traker)      echo "trak-p256|--proj-dim 256"; echo "trak-p256-ridge0.1|--proj-dim 256 --lambda-rel 0.1" ;;
    dattri)      echo "dattri-tracin|--variant tracin --train-batch 32" ;;
    logix)       echo "logix-logra|" ;;
    captum)      echo "captum-tracincp|" ;;
  esac
}

status_of() {  # prints ok / failed / missing
  python3 - "$1" "$2" <<'EOF'
import json, os, sys
j, n = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(j)).get("status", "ok")
except Exception:
    print("missing"); sys.exit()
print("ok" if s == "ok" and os.path.exists(n) else ("failed" if s == "failed" else "missing"))
EOF
}

record_failure() {  # out method task peer message log
  python3 - "$@" <<'EOF'
import json, sys, datetime
out, method, task, peer, msg, log = sys.argv[1:7]
try:
    tail = open(log, errors="replace").read()[-4000:]
except OSError:
    tail = ""
d = {"method": method, "task": task, "status": "failed", "error": msg,
     "notes": f"{peer} adapter did not finish: {msg}; see log {log}", "log_tail": tail,
     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
json.dump(d, open(f"{out}/{method}.json", "w"), indent=1)
EOF
}

IFS=, read -ra TASKS <<<"$tasks"
IFS=, read -ra PEERS <<<"$peers"
for task in "${TASKS[@]}"; do
  tdir=$EVAL/$task
  if [[ ! -f $tdir/meta.json ]]; then echo "[peers] $task: no $tdir/meta.json yet; skipped"; continue; fi
  out=$EVAL/results/$task
  mkdir -p "$out"
  for peer in "${PEERS[@]}"; do
    while IFS='|' read -r method extra; do
      [[ -z $method ]] && continue
      st=$(status_of "$out/$method.json" "$out/$method.npy")
      if [[ $st == ok || ( $st == failed && $retry == 0 ) ]]; then
        echo "[peers] $task/$method: $st, skipped"; continue
      fi
      echo "[peers] $task/$method: running ($peer)"
      ((dry)) && continue
      if ! "$here/setup.sh" "$peer" >".cache/peers/logs/setup-$peer.log" 2>&1; then
        record_failure "$out" "$method" "$task" "$peer" "setup.sh $peer failed" ".cache/peers/logs/setup-$peer.log"
        echo "[peers] $task/$method: setup failed"; continue
      fi
      log=.cache/peers/logs/$task-$method.log
      # shellcheck disable=SC2086
      timeout --kill-after=30 "$TIMEOUT" nice -n 10 ".cache/peers/$peer/venv/bin/python" \
        "$here/run_$peer.py" --task-dir "$tdir" --out-dir "$out" --method "$method" $extra >"$log" 2>&1
      rc=$?
      st=$(status_of "$out/$method.json" "$out/$method.npy")
      if [[ $st != ok ]]; then
        if ((rc == 124 || rc == 137)); then
          record_failure "$out" "$method" "$task" "$peer" "timed out after ${TIMEOUT}s (exit $rc)" "$log"
        elif [[ $st == missing ]]; then
          record_failure "$out" "$method" "$task" "$peer" "exit status $rc without a result" "$log"
        fi
      fi
      echo "[peers] $task/$method: rc=$rc $(status_of "$out/$method.json" "$out/$method.npy")"
    done < <(targets "$peer")
  done
done
