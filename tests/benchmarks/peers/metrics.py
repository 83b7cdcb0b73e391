"""Quick metrics over every <method>.npy/.json pair of a results dir (numpy only).

    python3 tests/benchmarks/peers/metrics.py --task-dir .cache/eval/domain \
        --results .cache/eval/results/domain [--markdown]

A convenience for the peers' table; the eval harness's report.py is the reference.
domain  : precision@10 = share of each query's top-10 pool records with the query's domain
          (mean over queries), plus the chance level.
backdoor: per query, AUC of the pool's poisoned flag vs score; recall@k with k = #poisoned.
quality : AUC of `clean` vs the per-example value (column mean over queries).
Columns scored -1e30 (a subset run) are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def auc(pos: np.ndarray, s: np.ndarray) -> float:
    pos = pos.astype(bool)
    if pos.all() or (~pos).all():
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    # average ranks of ties
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = sums[inv] / cnt[inv]
    n1 = pos.sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(s) - n1)))


def read(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def metrics(task_dir: Path, S: np.ndarray) -> dict:
    pool, qs = read(task_dir / "pool.jsonl"), read(task_dir / "queries.jsonl")
    S = S[: len(qs)]
    keep = ~(S <= -1e29).all(axis=0)
    S = S[:, keep]
    pool = [r for r, k in zip(pool, keep) if k]
    out: dict = {"n_scored_pool": int(keep.sum()), "n_queries": int(S.shape[0])}
    if "domain" in pool[0]:
        pd = np.array([r["domain"] for r in pool])
        qd = np.array([q["domain"] for q in qs])[: S.shape[0]]
        top = np.argsort(-S, axis=1, kind="mergesort")[:, :10]
        out["p@10"] = float((pd[top] == qd[:, None]).mean())
        out["p@10_chance"] = float(np.mean([(pd == d).mean() for d in qd]))
    if "poisoned" in pool[0]:
        y = np.array([bool(r["poisoned"]) for r in pool])
        out["auc_poisoned"] = float(np.nanmean([auc(y, s) for s in S]))
        k = max(1, int(y.sum()))
        top = np.argsort(-S, axis=1, kind="mergesort")[:, :k]
        out[f"recall@{k}"] = float(y[top].mean())
    if "clean" in pool[0]:
        y = np.array([bool(r["clean"]) for r in pool])
        out["auc_clean_vs_value"] = auc(y, S.mean(axis=0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task-dir", required=True, type=Path)
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--methods", default="",
                    help="comma-separated method-name prefixes to include (default: all)")
    a = ap.parse_args()
    rows = []
    prefixes = [x for x in a.methods.split(",") if x]
    for j in sorted(a.results.glob("*.json")):
        if prefixes and not any(j.stem.startswith(x) for x in prefixes):
            continue
        m = json.loads(j.read_text())
        npy = j.with_suffix(".npy")
        r = {"method": j.stem, "status": m.get("status", "ok")}
        if r["status"] == "ok" and npy.exists():
            r.update(metrics(a.task_dir, np.load(npy)))
            for k in ("index_seconds", "forward_seconds_same_data", "query_seconds", "bytes_per_example"):
                r[k] = m.get(k)
        else:
            r["error"] = (m.get("error") or "")[:200]
        rows.append(r)
    if not a.markdown:
        for r in rows:
            print(json.dumps(r))
        return 0
    keys = sorted({k for r in rows for k in r} - {"method", "status", "error"})
    print("| method | status | " + " | ".join(keys) + " | error |")
    print("|" + "---|" * (len(keys) + 3))
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        print(f"| {r['method']} | {r['status']} | " + " | ".join(cells) + f" | {r.get('error', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
