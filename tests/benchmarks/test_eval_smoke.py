"""The evaluation harness cannot rot: its smoke run (tiny tasks, a tiny random model, RISE
in two configurations, BM25, hidden-state cosine, the metrics, the closed loop and the
report) runs in a subprocess and writes a sane report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "tests" / "benchmarks" / "eval" / "run.py"
TASKS = ("backdoor", "domain", "quality")


def test_eval_smoke(tmp_path):
    out, cache = tmp_path / "report", tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out), "--cache", str(cache)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    md = (out / "eval.md").read_text()
    assert "Main table" in md and "rise-k128-d64x32x32-both" in md
    fig = json.loads((out / "figures.json").read_text())
    assert fig["smoke"] is True and fig["stamp"]["date"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        for png in ("quality_vs_bytes.png", "quality_vs_cost.png", "per_task_bars.png",
                    "quality_loop.png"):
            assert (out / png).stat().st_size > 1000, png
    expected = {"bm25", "hidden-cos", "rise-k128-d64x32x32-both", "rise-k16-d16x16x16-gh-c"}
    for task in TASKS:
        pool = [json.loads(x) for x in (cache / task / "pool.jsonl").read_text().splitlines()]
        queries = (cache / task / "queries.jsonl").read_text().splitlines()
        found = set()
        for jp in (cache / "results" / task).glob("*.json"):
            rec = json.loads(jp.read_text())
            found.add(rec["method"])
            scores = np.load(jp.with_suffix(".npy"))
            assert scores.dtype == np.float32
            assert scores.shape == (len(queries), len(pool))
            for key in ("index_seconds", "forward_seconds_same_data", "bytes_per_example",
                        "query_seconds"):
                assert rec[key] >= 0, (task, rec["method"], key)
            for name, value in rec["metrics"].items():
                assert not math.isnan(value), (task, rec["method"], name)
                assert 0.0 <= value <= 1.0, (task, rec["method"], name, value)
        assert expected <= found, (task, found)
    loop = cache / "results" / "quality" / "loop"
    assert {"full.json", "random-s0.json", "_base.json"} <= {p.name for p in loop.glob("*.json")}
    # a second run finds every target cached
    again = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--out", str(out), "--cache", str(cache),
         "--no-report"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 ran" in again.stderr
