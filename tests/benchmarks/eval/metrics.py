"""Task metrics, computed from a score matrix and the task labels only (so every method,
ours or a peer's, is measured by the same code).  numpy only; every metric is in [0, 1].

Ties: rankings sort by score descending with ties broken by pool position (stable), the
same for every method; AUC counts ties as 1/2.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def ranking(values: np.ndarray) -> np.ndarray:
    """Pool indices, best first (stable: ties keep pool order)."""
    return np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")


def average_precision(values: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision over the positives."""
    pos = np.asarray(positive, dtype=bool)
    if pos.sum() == 0:
        return float("nan")
    hits = pos[ranking(values)]
    cum = np.cumsum(hits)
    prec = cum / np.arange(1, len(hits) + 1)
    return float(prec[hits].sum() / pos.sum())


def auc(values: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U with average ranks for ties)."""
    v = np.asarray(values, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(v, kind="mergesort")
    ranks = np.empty(len(v), dtype=np.float64)
    sv = v[order]
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[pos].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def at_k(values: np.ndarray, positive: np.ndarray, k: int) -> tuple[float, float]:
    """(precision@k, recall@k)."""
    pos = np.asarray(positive, dtype=bool)
    top = ranking(values)[:k]
    h = float(pos[top].sum())
    return h / k, (h / pos.sum() if pos.sum() else float("nan"))


def backdoor_metrics(scores: np.ndarray, poisoned: np.ndarray) -> dict[str, float]:
    """Poisoned examples ranked by the mean score over the (triggered) queries."""
    v = scores.mean(axis=0)
    out = {}
    for k in (10, 20):
        p, r = at_k(v, poisoned, k)
        out[f"precision@{k}"] = p
        out[f"recall@{k}"] = r
    out["auprc"] = average_precision(v, poisoned)
    # per-query view: mean over queries of the AP of each query's own ranking
    out["per_query_auprc"] = float(np.mean([average_precision(s, poisoned) for s in scores]))
    return out


def domain_metrics(scores: np.ndarray, pool_dom: list[str], query_dom: list[str]
                   ) -> dict[str, float]:
    pd = np.asarray(pool_dom)
    p10, aucs = [], []
    for s, qd in zip(scores, query_dom, strict=True):
        same = pd == qd
        p10.append(at_k(s, same, 10)[0])
        aucs.append(auc(s, same))
    return {"precision@10": float(np.mean(p10)), "auc": float(np.mean(aucs))}


def quality_metrics(scores: np.ndarray, clean: np.ndarray, kinds: list[str],
                    fraction: float) -> dict[str, float]:
    """Value = mean score over targets (rows).  Selection = top ``fraction`` of the pool."""
    v = scores.mean(axis=0)
    clean = np.asarray(clean, dtype=bool)
    n = int(np.ceil(fraction * len(v)))
    sel = ranking(v)[:n]
    out = {f"clean_precision@{int(fraction * 100)}%": float(clean[sel].mean()),
           "auc_clean": auc(v, clean), "auprc_clean": average_precision(v, clean)}
    ks = np.asarray(kinds)
    for kind in sorted(set(kinds) - {"clean"}):
        m = (ks == kind) | clean
        out[f"auc_clean_vs_{kind}"] = auc(v[m], clean[m])
    return out


PRIMARY = {"backdoor": "auprc", "domain": "precision@10", "quality": "clean_precision@30%"}


def task_metrics(task_name: str, meta: dict[str, Any], pool: list[dict], queries: list[dict],
                 scores: np.ndarray) -> dict[str, float]:
    base = task_name.removeprefix("smoke-")
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isfinite(s), s, -1e30)
    if base == "backdoor":
        return backdoor_metrics(s, np.array([bool(r["poisoned"]) for r in pool]))
    if base == "domain":
        return domain_metrics(s, [r["domain"] for r in pool], [r["domain"] for r in queries])
    if base == "quality":
        return quality_metrics(s, np.array([bool(r["clean"]) for r in pool]),
                               [r["kind"] for r in pool], float(meta.get("select_fraction", 0.3)))
    raise ValueError(f"unknown task {task_name}")


def selection(values: np.ndarray, fraction: float) -> np.ndarray:
    n = int(np.ceil(fraction * len(values)))
    return ranking(values)[:n]
