"""The evaluation report: markdown tables, PNG figures and a JSON of every figure.

    python tests/benchmarks/eval/report.py [--cache .cache/eval] [--out tests/benchmarks/reports/eval]

Reads every ``<cache>/results/<task>/<method>.json + .npy`` (ours and the peers', see
FORMAT.md), recomputes every metric from the scores and the task labels with metrics.py,
and writes ``OUT/eval.md``, ``OUT/figures.json`` (the data of every figure and table,
stamped with git commit, package versions, CPU and date) and ``OUT/*.png`` (matplotlib,
when installed).  Hand-written findings in tests/benchmarks/eval/findings.md (if present)
are appended to the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import (  # noqa: E402
    DESIGN_SETTINGS,
    EVAL_CACHE,
    HERE,
    REPO,
    load_task,
    product_default,
    repo_relative,
    stamp,
    write_json,
)
from metrics import PRIMARY, task_metrics  # noqa: E402

TASKS = ("backdoor", "domain", "quality")
# the peer targets of tests/benchmarks/peers/run_all.sh
PEER_METHODS = ["bergson", "kronfluence-ekfac", "trak-p256", "trak-p256-ridge0.1", "dattri-tracin",
                "logix-logra", "captum-tracincp"]
SECONDARY = {"backdoor": "recall@10", "domain": "auc", "quality": "auc_clean"}
DEFAULT = product_default()


def mark(name: str) -> str:
    """The name with its role in the product, for tables."""
    if name == DEFAULT:
        return f"{name} **(default)**"
    if name == DESIGN_SETTINGS:
        return f"{name} (design settings)"
    return name


KEY_RISE = [
    # the default and what each of its changes does alone
    DEFAULT, DESIGN_SETTINGS, "rise-k128-d128x64x64-both-c", "rise-k128-d128x64x64-both-t2",
    # channels at the default settings
    "rise-k128-d128x64x64-rh-c-t2", "rise-k128-d128x64x64-gh-c-t2",
    # sizes at the default settings
    "rise-k128-d64x32x32-both-c-t2", "rise-k128-d32x16x16-both-c-t2",
    "rise-k128-d16x16x16-both-c-t2",
    # K and tau around the default
    "rise-k16-d128x64x64-both-c-t2", "rise-k16-d128x64x64-both-c",
    "rise-k128-d128x64x64-both-c-t4",
]


def _load(cache: Path, tasks: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for t in tasks:
        d = cache / "results" / t
        tdir = cache / t
        if not d.exists() or not (tdir / "meta.json").exists():
            continue
        task = load_task(tdir)
        out[t] = {}
        for jp in sorted(d.glob("*.json")):
            npy = jp.with_suffix(".npy")
            try:
                j = json.loads(jp.read_text())
            except (ValueError, OSError):
                continue
            if not isinstance(j, dict):
                continue
            name = j.get("method", jp.stem)
            j["_peer"] = j.get("owner") != "rise-eval-harness"
            if not npy.exists():
                j["_error"] = (f"{j.get('status', 'no scores')}: "
                               f"{j.get('error') or j.get('notes') or 'no .npy'}")[:200]
                out[t][name] = j
                continue
            try:
                s = np.load(npy)
            except (ValueError, OSError) as e:
                j["_error"] = f"unreadable scores: {e}"
                out[t][name] = j
                continue
            ok_shape = s.ndim == 2 and s.shape[1] == len(task.pool) and (
                s.shape[0] in (len(task.queries), 1))
            if not ok_shape:
                j["_error"] = f"scores shape {s.shape} does not match the task"
                out[t][name] = j
                continue
            if s.shape[0] == 1 and task.kind != "valuation":
                j["_error"] = "valuation-only scores on an attribution task"
                out[t][name] = j
                continue
            j["_metrics"] = task_metrics(t, task.meta, task.pool, task.queries, s)
            fwd = j.get("forward_seconds_same_data") or float("nan")
            j["_index_x_forward"] = (j.get("index_seconds", float("nan")) / fwd
                                     if fwd and fwd > 0 else float("nan"))
            out[t][name] = j
    return out


def _loop(cache: Path) -> dict[str, dict]:
    d = cache / "results" / "quality" / "loop"
    res = {}
    if d.exists():
        for p in sorted(d.glob("*.json")):
            try:
                res[p.stem] = json.loads(p.read_text())
            except ValueError:
                pass
    return res


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.{nd}f}"
    return str(x)


def _bytes(b: float | None) -> str:
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return "–"
    for unit, f in (("MB", 1e6), ("KB", 1e3)):
        if b >= f:
            return f"{b / f:.1f} {unit}"
    return f"{b:.0f} B"


def cross_task(res: dict[str, dict[str, dict]], tasks: list[str]) -> list[dict]:
    """Per method present on every task: primary metric per task, mean, worst task's gap
    to the best method on that task."""
    names = set.intersection(*(set(k for k, v in res[t].items() if "_metrics" in v)
                               for t in tasks)) if tasks else set()
    best = {t: max(v["_metrics"][PRIMARY[t]] for v in res[t].values() if "_metrics" in v)
            for t in tasks}
    rows = []
    for n in names:
        prim = {t: res[t][n]["_metrics"][PRIMARY[t]] for t in tasks}
        rows.append({"method": n, **{t: prim[t] for t in tasks},
                     "mean": float(np.mean(list(prim.values()))),
                     "worst_gap": float(max(best[t] - prim[t] for t in tasks)),
                     "family": res[tasks[0]][n].get("family", "peer")})
    rows.sort(key=lambda r: (-r["mean"], r["worst_gap"], r["method"]))
    return rows


def _plots(res, loop, out: Path, tasks: list[str], figs: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []

    def style(name: str, fam: str):
        if name == DEFAULT:
            return dict(marker="*", s=160, c="red", zorder=5)
        if fam == "rise":
            c = "tab:blue" if name.endswith("-c") or "-c-" in name else "tab:cyan"
            return dict(marker="o", s=28, c=c, alpha=0.7)
        if fam in ("rise-exact", "rise-nosketch"):
            return dict(marker="D", s=50, c="tab:purple")
        if fam == "grad":
            return dict(marker="s", s=60, c="black")
        if fam in ("text", "hidden"):
            return dict(marker="^", s=60, c="tab:green")
        return dict(marker="P", s=70, c="tab:orange")  # peers

    for key, xlabel, fname, xget in (
        ("quality_vs_bytes", "index bytes per example (log)", "quality_vs_bytes.png",
         lambda j: j.get("bytes_per_example")),
        ("quality_vs_cost", "index time / bare forward pass over the same pool (log)",
         "quality_vs_cost.png", lambda j: j.get("_index_x_forward")),
    ):
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
        figs[key] = {}
        for ax, t in zip(axes[0], tasks, strict=True):
            pts = []
            for n, j in res.get(t, {}).items():
                if "_metrics" not in j:
                    continue
                x = xget(j)
                if x is None or not (isinstance(x, float | int)) or not x > 0:
                    continue
                y = j["_metrics"][PRIMARY[t]]
                pts.append({"method": n, "x": float(x), "y": float(y),
                            "family": j.get("family", "peer")})
                ax.scatter([x], [y], **style(n, j.get("family", "peer")))
            for p in pts:
                if p["family"] != "rise" or p["method"] == DEFAULT:
                    ax.annotate(p["method"].replace("rise-", ""), (p["x"], p["y"]),
                                fontsize=6, alpha=0.8)
            figs[key][t] = pts
            ax.set_xscale("log")
            ax.set_title(f"{t}: {PRIMARY[t]}")
            ax.set_xlabel(xlabel)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        fig.suptitle("red star: product default; blue: RISE centered, cyan: RISE uncentered; "
                     "purple: exact/no-sketch; black: full-model gradient; green: simple "
                     "baselines; orange: peers", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        made.append(fname)

    # per-task bars of the key methods
    keys = _key_methods(res, tasks)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(11, 3.2 * len(tasks)), squeeze=False)
    figs["per_task_bars"] = {}
    for ax, t in zip(axes[:, 0], tasks, strict=True):
        names = [n for n in keys if n in res.get(t, {}) and "_metrics" in res[t][n]]
        vals = [res[t][n]["_metrics"][PRIMARY[t]] for n in names]
        cols = [style(n, res[t][n].get("family", "peer"))["c"] for n in names]
        ax.bar(range(len(names)), vals, color=cols)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("rise-", "") for n in names], rotation=60, ha="right",
                           fontsize=7)
        ax.set_ylabel(PRIMARY[t])
        ax.set_title(t)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        figs["per_task_bars"][t] = dict(zip(names, vals, strict=True))
    fig.tight_layout()
    fig.savefig(out / "per_task_bars.png", dpi=120)
    plt.close(fig)
    made.append("per_task_bars.png")
    if loop:
        names = sorted((n for n in loop if n != "_base"),
                       key=lambda n: loop[n]["heldout"]["token_nll"])
        vals = [loop[n]["heldout"]["token_nll"] for n in names]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        ax.bar(range(len(names)), vals, color="tab:blue")
        if "_base" in loop:
            ax.axhline(loop["_base"]["heldout"]["token_nll"], color="gray", ls="--",
                       label="no training")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        lo = min(vals + [loop.get("_base", {}).get("heldout", {}).get("token_nll", min(vals))])
        ax.set_ylim(lo - 0.05, max(vals) + 0.05)
        ax.set_ylabel("held-out token NLL (lower is better)")
        ax.set_title("quality: continued training on each selection")
        fig.tight_layout()
        fig.savefig(out / "quality_loop.png", dpi=120)
        plt.close(fig)
        made.append("quality_loop.png")
        figs["quality_loop"] = {n: loop[n]["heldout"]["token_nll"] for n in loop}
    return made


def _key_methods(res, tasks) -> list[str]:
    present = set().union(*(set(res.get(t, {})) for t in tasks)) if tasks else set()
    fam = {}
    for t in tasks:
        for n, j in res.get(t, {}).items():
            fam.setdefault(n, j.get("family", "peer"))
    non_sketch = sorted(n for n in present if fam.get(n) != "rise")
    rise = [n for n in KEY_RISE if n in present]
    return non_sketch + rise


def write_report(cache: Path, out: Path, tasks: list[str] | None = None, smoke: bool = False
                 ) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in (tasks or TASKS)]
    res = _load(cache, tasks)
    tasks = [t for t in tasks if t in res]
    loop = _loop(cache) if "quality" in tasks else {}
    st = stamp()
    figs: dict[str, Any] = {}
    pngs = _plots(res, loop, out, tasks, figs)
    metas = {t: json.loads((cache / t / "meta.json").read_text()) for t in tasks}
    lines: list[str] = []
    w = lines.append
    w("# RISE evaluation: does it find the right training data, how big, how long\n")
    w(f"Generated by `tests/benchmarks/eval/report.py` on {st['date']} from commit "
      f"`{st['commit'][:12]}`; CPU: {st['cpu']} ({st['cpu_count']} cores, torch threads "
      f"{st['torch_threads']}); versions: "
      + ", ".join(f"{k} {v}" for k, v in st["versions"].items()) + ".")
    if smoke:
        w("\n**Smoke run**: generated text and a tiny random model; the numbers mean nothing.\n")
    w("\n## Tasks\n")
    for t in tasks:
        m = metas[t]
        w(f"* **{t}** ({m['kind']}): {m.get('n_pool')} pool x {m.get('n_queries')} queries, "
          f"max_length {m['max_length']}, model `{m['model']}`. {m.get('description', '')}.")
        if t == "backdoor" and "backdoor_check" in m:
            c = m["backdoor_check"]
            ft = m.get("finetune", {})
            w(f"  Fine-tune: last {ft.get('n_blocks')} blocks + final norm "
              f"({ft.get('trainable_params', 0) / 1e6:.1f}M trainable of 135M; embeddings and "
              f"tied head frozen), {ft.get('steps')} steps x batch {ft.get('batch')}, lr "
              f"{ft.get('lr')}, AdamW, {ft.get('seconds', 0):.0f}s. Backdoor check on held-out "
              f"prompts: greedy continuation starts with 'Howdy' for "
              f"{c['greedy']['triggered']['starts_with_howdy']:.0%} of triggered prompts and "
              f"{c['greedy']['clean']['starts_with_howdy']:.0%} of clean ones; mean per-token "
              f"P(Howdy response) {c['p_howdy_token_triggered']:.3f} triggered vs "
              f"{c['p_howdy_token_clean']:.3f} clean.")
            if (out / "backdoor_explain.md").exists():
                w("  Explained hits and attributed generations: [backdoor_explain.md](backdoor_explain.md).")
        if t == "quality" and "loop" in m:
            lc = m["loop"]
            w(f"  Closed loop: top {m.get('select_fraction', 0.3):.0%} by value (mean score over "
              f"the targets) -> continue training the last {lc['n_blocks']} blocks + final "
              f"norm, {lc['steps']} steps x batch {lc['batch']}, lr {lc['lr']}, seed "
              f"{lc['seed']}; held-out = {m.get('n_heldout')} clean paragraphs of other "
              "articles.")
    w("\nMetrics: backdoor — the pool ranked by the mean score over the triggered queries: "
      "precision/recall@10/20 and AUPRC (average precision) of the poisoned examples; domain — "
      "per query precision@10 of same-domain examples and AUC same vs other domain, averaged; "
      "quality — value = mean score over the targets, precision of clean examples in the top "
      "30 %, AUC clean vs degraded. Cost: index time as a multiple of a bare forward pass "
      "(full model with logits, batch 8, inference mode) over the same pool measured in the "
      "same run; index bytes per example on disk; query time = featurising the queries and "
      "scoring the whole pool.\n")

    # ---- main table
    keys = _key_methods(res, tasks)
    w("## Main table\n")
    hdr = ["method"]
    for t in tasks:
        hdr += [f"{t} {PRIMARY[t]}", f"{t} {SECONDARY[t]}"]
    if loop:
        hdr.append("loop held-out NLL")
    hdr += ["bytes/example"] + [f"index x fwd ({t[0]})" for t in tasks] + \
        [f"query s ({t[0]})" for t in tasks]
    w("| " + " | ".join(hdr) + " |")
    w("|" + "---|" * len(hdr))
    table = []
    for n in keys:
        row = [mark(n)]
        rec = {"method": n}
        for t in tasks:
            j = res[t].get(n, {})
            mm = j.get("_metrics", {})
            row += [_fmt(mm.get(PRIMARY[t])), _fmt(mm.get(SECONDARY[t]))]
            rec[t] = mm
        if loop:
            row.append(_fmt(loop[n]["heldout"]["token_nll"], 4) if n in loop else "–")
        by = [res[t][n].get("bytes_per_example") for t in tasks if n in res[t]]
        row.append(" / ".join(sorted({_bytes(b) for b in by if b is not None})) or "–")
        for t in tasks:
            row.append(_fmt(res[t].get(n, {}).get("_index_x_forward"), 2))
        for t in tasks:
            row.append(_fmt(res[t].get(n, {}).get("query_seconds"), 2))
        w("| " + " | ".join(row) + " |")
        rec.update({"bytes_per_example": {t: res[t][n].get("bytes_per_example")
                                          for t in tasks if n in res[t]},
                    "index_x_forward": {t: res[t][n].get("_index_x_forward")
                                        for t in tasks if n in res[t]},
                    "query_seconds": {t: res[t][n].get("query_seconds")
                                      for t in tasks if n in res[t]}})
        table.append(rec)
    figs["main_table"] = table
    w("\nBytes/example differ per task only for exact/no-sketch (per-token storage) and the "
      "text indexes. Index x fwd for RISE = (bare forward over the pool + create_index with "
      "the backbone memoised) / bare forward: the forward stands in for the backbone pass "
      "(an upper bound: it also computes the logits).\n")
    fwd_line = []
    for t in tasks:
        hs = json.loads((cache / "work" / t / "hidden.json").read_text()) if (
            cache / "work" / t / "hidden.json").exists() else None
        if hs:
            fwd_line.append(f"{t}: {hs['seconds']['pool']:.0f}s for {hs['tokens']['pool']} "
                            f"tokens")
    if fwd_line:
        w("Bare forward over the pool: " + "; ".join(fwd_line) + ".\n")

    # ---- cross-task
    if len(tasks) > 1:
        ct = cross_task(res, tasks)
        figs["cross_task"] = ct
        w("## Across all tasks (primary metric per task; methods run on every task)\n")
        w("| rank | method | " + " | ".join(tasks) + " | mean | worst gap to best |")
        w("|---|---|" + "---|" * (len(tasks) + 2))
        for i, r in enumerate(ct[:40]):
            w(f"| {i + 1} | {mark(r['method'])} | "
              + " | ".join(_fmt(r[t]) for t in tasks)
              + f" | {_fmt(r['mean'])} | {_fmt(r['worst_gap'])} |")
        w("")

    # ---- sketch-seed robustness
    seeded = sorted({n.rsplit("-s", 1)[0] for t in tasks for n in res[t]
                     if n.rsplit("-s", 1)[-1] in ("1", "2") and n.startswith("rise-")})
    if seeded:
        w("## Sketch-seed robustness (seeds 0, 1, 2 of the CountSketch hashes)\n")
        w("| config | " + " | ".join(f"{t} {PRIMARY[t]} mean ± sd (min)" for t in tasks) + " |")
        w("|---|" + "---|" * len(tasks))
        seed_rows = {}
        for base in seeded:
            cells, rec = [], {}
            for t in tasks:
                vals = [res[t][n]["_metrics"][PRIMARY[t]] for n in (base, base + "-s1",
                                                                    base + "-s2")
                        if n in res[t] and "_metrics" in res[t][n]]
                rec[t] = vals
                cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f} ({min(vals):.3f}), "
                             f"n={len(vals)}" if vals else "–")
            seed_rows[base] = rec
            w(f"| {mark(base)} | " + " | ".join(cells)
              + " |")
        figs["seed_robustness"] = seed_rows
        w("")

    # ---- loop
    if loop:
        w("## Quality closed loop\n")
        w("Each selection continues training the same last blocks from the same weights with "
          "the same recipe; lower held-out NLL is better. `full` = the whole pool, "
          "`random-s*` = random selections of the same size, `oracle-clean` = as many clean "
          "examples at random (what a perfect valuation selects), `_base` = no training.\n")
        w("| selection | n | clean fraction | held-out token NLL | held-out example NLL | "
          "train seconds |")
        w("|---|---|---|---|---|---|")
        for n in sorted(loop, key=lambda n: loop[n]["heldout"]["token_nll"]):
            r = loop[n]
            w(f"| {mark(n)} | {r.get('n_selected', '–')} | {_fmt(r.get('clean_fraction'))} | "
              f"{r['heldout']['token_nll']:.4f} | {r['heldout']['example_nll']:.4f} | "
              f"{_fmt(r.get('train', {}).get('seconds'))} |")
        w("")

    # ---- per-task full tables
    w("## Every method, per task\n")
    for t in tasks:
        w(f"### {t}\n")
        mnames = sorted({k for j in res[t].values() for k in j.get("_metrics", {})})
        w("| method | " + " | ".join(mnames) + " | bytes/ex | index x fwd | query s |")
        w("|---|" + "---|" * (len(mnames) + 3))
        for n in sorted(res[t], key=lambda n: -res[t][n].get("_metrics", {}).get(PRIMARY[t], -1)):
            j = res[t][n]
            if "_error" in j:
                w(f"| {n} | {j['_error']} |")
                continue
            mm = j["_metrics"]
            w(f"| {n} | " + " | ".join(_fmt(mm.get(k)) for k in mnames)
              + f" | {_bytes(j.get('bytes_per_example'))} | {_fmt(j.get('_index_x_forward'), 2)}"
              f" | {_fmt(j.get('query_seconds'), 2)} |")
        w("")
        figs.setdefault("per_task_all", {})[t] = {
            n: {"metrics": j.get("_metrics"), "bytes_per_example": j.get("bytes_per_example"),
                "index_x_forward": j.get("_index_x_forward"),
                "query_seconds": j.get("query_seconds"), "family": j.get("family"),
                "config": j.get("config")} for n, j in res[t].items()}
    peers = sorted({n for t in tasks for n, j in res[t].items() if j.get("_peer")})
    # ---- coverage: the expensive references and the peers, per task
    expected = ["rise-exact-both", "grad-kron16x16", *PEER_METHODS]
    w("## Coverage: references and peers per task\n")
    w("| method | " + " | ".join(tasks) + " |")
    w("|---|" + "---|" * len(tasks))
    cov = {}
    for n in expected + sorted(set(peers) - set(expected)):
        cells = []
        for t in tasks:
            j = res[t].get(n)
            cells.append("ran" if j and "_metrics" in j else
                         f"failed: {str(j['_error'])[:80]}" if j and "_error" in j else "not run")
        cov[n] = dict(zip(tasks, cells, strict=True))
        w(f"| {n} | " + " | ".join(cells) + " |")
    figs["coverage"] = cov
    w("\n(Why a cell is 'not run' is said under Findings.)\n")
    w("## Peers\n")
    w(("Peer results found: " + ", ".join(peers) + ".") if peers else
      "No peer results were found in the results folders at report time (see FORMAT.md).")
    for t in tasks:
        for n, j in sorted(res[t].items()):
            if j.get("_peer") and "_error" in j:
                w(f"* {t} / {n}: did not produce scores ({j['_error']})")
            elif j.get("_peer") and j.get("notes"):
                w(f"* {t} / {n}: {str(j['notes'])[:300]}")
    w("")
    if pngs:
        w("## Figures\n")
        for p in pngs:
            w(f"![{p}]({p})")
        w("")
    else:
        w("(matplotlib not installed: no figures drawn; their data are in figures.json)\n")
    findings = HERE / "findings.md"
    if findings.exists() and not smoke:
        w(findings.read_text())
    md = out / "eval.md"
    md.write_text("\n".join(lines) + "\n")
    write_json(out / "figures.json", repo_relative({"stamp": st, "tasks": tasks, "figures": figs,
                                                   "pngs": pngs, "smoke": smoke}))
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=EVAL_CACHE)
    ap.add_argument("--out", type=Path, default=REPO / "tests/benchmarks/reports/eval")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    print(write_report(a.cache, a.out, a.tasks.split(","), a.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
