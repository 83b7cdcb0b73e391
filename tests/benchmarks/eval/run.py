"""Run the attribution / valuation evaluation: tasks x methods, cached, then the report.

    python tests/benchmarks/eval/run.py [--tasks backdoor,domain,quality] [--methods PATTERNS]
        [--smoke] [--out tests/benchmarks/reports/eval] [--cache .cache/eval] [--threads 1]
        [--loop NAMES] [--no-report] [--list]

Each (task, method) is a target cached as ``<cache>/results/<task>/<method>.json + .npy``
(FORMAT.md), keyed by a hash of the method config + the task data (files and model) + the
code version (the harness files and rise sources the method uses): a rerun skips finished
targets, an interrupted run resumes at the first unfinished one.  Results of other tools
(the peers) in the same folders are read by the report, never touched.

``--smoke`` builds miniature tasks from generated text with a tiny random GPT-NeoX and
runs RISE (2 configs), BM25, hidden-state cosine, the closed loop and the report in well
under a minute (CI).  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    DESIGN_SETTINGS,
    EVAL_CACHE,
    REPO,
    log,
    product_default,
    quiet_transformers,
    set_threads,
    sha256_bytes,
    sha256_json,
    utc_now,
    versions,
    write_json,
)

TASKS = ("backdoor", "domain", "quality")
DEFAULT_LOOP = (product_default(), DESIGN_SETTINGS, "rise-k128-d128x64x64-both-c",
                "rise-k128-d64x32x32-both-c-t2", "rise-exact-both", "grad-kron16x16",
                "tfidf", "bm25", "hidden-cos", "hidden-cos-c")


def result_paths(cache: Path, task: str, method: str) -> tuple[Path, Path]:
    d = cache / "results" / task
    return d / f"{method}.json", d / f"{method}.npy"


def cache_key(method, task_hash: str) -> str:
    return sha256_json({"method": method.name, "config": method.config, "data": task_hash,
                        "code": method.code_version()})[:16]


def is_done(cache: Path, task: str, method, key: str) -> bool:
    import json

    jp, npy = result_paths(cache, task, method.name)
    if not (jp.exists() and npy.exists()):
        return False
    try:
        j = json.loads(jp.read_text())
    except ValueError:
        return False
    return j.get("cache_key") == key


def run_target(ctx, method, cache: Path, force: bool = False) -> str:
    import torch

    task = ctx.task.dir.name
    key = cache_key(method, ctx.task.data_hash())
    if not force and is_done(cache, task, method, key):
        return "cached"
    log(f"{task}: {method.name}: running")
    t = time.perf_counter()
    scores, cost, extra = method.run(ctx)
    wall = time.perf_counter() - t
    scores = np.ascontiguousarray(np.asarray(scores, dtype=np.float32))
    nq = len(ctx.task.queries)
    if scores.shape not in ((nq, len(ctx.task.pool)), (1, len(ctx.task.pool))):
        raise RuntimeError(f"{method.name}: scores shape {scores.shape}")
    scores = np.where(np.isfinite(scores), scores, np.float32(-1e30)).astype(np.float32)
    cost = dict(cost)
    cost.setdefault("forward_seconds_same_data", ctx.forward_seconds)
    from metrics import task_metrics

    jp, npy = result_paths(cache, task, method.name)
    jp.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, scores)
    record = {
        "method": method.name, "task": task, "family": method.family, "config": method.config,
        "index_seconds": float(cost["index_seconds"]),
        "forward_seconds_same_data": float(cost["forward_seconds_same_data"]),
        "bytes_per_example": float(cost["bytes_per_example"]),
        "query_seconds": float(cost["query_seconds"]),
        "notes": method.notes, "extra": extra, "versions": versions(),
        "threads": torch.get_num_threads(), "date": utc_now(), "wall_seconds": wall,
        "cache_key": key, "scores_sha256": sha256_bytes(scores.tobytes()),
        "metrics": task_metrics(task, ctx.task.meta, ctx.task.pool, ctx.task.queries, scores),
        "owner": "rise-eval-harness",
    }
    write_json(jp, record)
    m = record["metrics"]
    log(f"{task}: {method.name}: done in {wall:.1f}s: "
        + ", ".join(f"{k}={v:.3f}" for k, v in list(m.items())[:4]))
    return "ran"


def run_quality_loop(ctx, cache: Path, names: list[str]) -> None:
    import json

    from loop import run_loop
    from metrics import selection

    frac = float(ctx.task.meta.get("select_fraction", 0.3))
    n = len(ctx.task.pool)
    k = int(np.ceil(frac * n))
    sels: dict[str, np.ndarray] = {"full": np.arange(n)}
    for seed in (0, 1):
        sels[f"random-s{seed}"] = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    # the reference a perfect valuation reaches: k of the clean examples, chosen at random
    clean = np.flatnonzero([bool(r["clean"]) for r in ctx.task.pool])
    sels["oracle-clean"] = np.sort(np.random.default_rng(0).permutation(clean)[:k])
    for name in names:
        jp, npy = result_paths(cache, ctx.task.dir.name, name)
        if not (jp.exists() and npy.exists()):
            log(f"loop: no result for {name}; skipped")
            continue
        v = np.load(npy).astype(np.float64).mean(0)
        sels[name] = np.sort(selection(v, frac))
        json.loads(jp.read_text())
    run_loop(ctx, sels, cache / "results" / ctx.task.dir.name / "loop")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=None,
                    help="comma-separated names or glob patterns (default: all)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loop", default=None,
                    help="methods whose top-30%% selection the quality loop trains on "
                         "(comma list; 'none' to skip)")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--force", action="store_true", help="rerun even cached targets")
    ap.add_argument("--list", action="store_true", help="list methods and exit")
    ap.add_argument("--keep-going", action="store_true",
                    help="log a failing target and continue with the next")
    a = ap.parse_args(argv)
    set_threads(a.threads)
    quiet_transformers()
    from methods import registry, select

    methods = select(registry(a.smoke), a.methods)
    if a.list:
        for m in methods:
            print(m.name, m.family, m.config)
        return 0
    cache = a.cache or (EVAL_CACHE if not a.smoke else EVAL_CACHE.parent / "eval-smoke")
    out = a.out or (REPO / "tests/benchmarks/reports/eval" if not a.smoke
                    else cache / "report")
    tasks = [t for t in a.tasks.split(",") if t]
    from ctx import Ctx
    from tasks import build

    t0 = time.perf_counter()
    dirs = build(tasks, cache, a.smoke)
    status: dict[str, dict[str, str]] = {}
    failed = 0
    for t in tasks:
        ctx = Ctx.open(dirs[t], cache / "work", a.threads)
        status[t] = {}
        for m in methods:
            if not m.applies(t):
                continue
            try:
                status[t][m.name] = run_target(ctx, m, cache, a.force)
            except Exception as e:  # noqa: BLE001
                if not a.keep_going:
                    raise
                failed += 1
                status[t][m.name] = f"failed: {e}"
                log(f"{t}: {m.name}: FAILED: {e}\n{traceback.format_exc()}")
        if t == "quality" and (a.loop or "").lower() != "none":
            names = (list(DEFAULT_LOOP) if a.loop is None else
                     [x for x in a.loop.split(",") if x])
            if a.smoke:
                names = [m.name for m in methods]
            try:
                run_quality_loop(ctx, cache, names)
            except Exception as e:  # noqa: BLE001
                if not a.keep_going:
                    raise
                failed += 1
                log(f"quality loop FAILED: {e}\n{traceback.format_exc()}")
        ctx.release()
    ran = sum(v == "ran" for s in status.values() for v in s.values())
    cached = sum(v == "cached" for s in status.values() for v in s.values())
    log(f"targets: {ran} ran, {cached} cached, {failed} failed "
        f"({time.perf_counter() - t0:.0f}s)")
    write_json(cache / "results" / "last_run.json", {"status": status, "date": utc_now()})
    if not a.no_report:
        from report import write_report

        write_report(cache, out, tasks, smoke=a.smoke)
        log(f"report written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
