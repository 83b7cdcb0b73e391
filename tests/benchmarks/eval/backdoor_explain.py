"""Explanations and generations on the backdoor task (part of ``make eval``; never CI).

    python tests/benchmarks/eval/backdoor_explain.py [--root .cache/eval] [--out DIR]
        [--queries N] [--top K] [--max-new-tokens N]

Two questions, on the backdoored model of the ``backdoor`` task (tasks.py):

* **Why are the poisoned examples hits?**  For each triggered query, every poisoned example
  among its top 3 hits is explained (``rise.explain``, the product's default scoring): the
  top training tokens of each explanation are counted, and each is classed as part of the
  planted response, of the trigger, or other.  With prompt/response records only response
  tokens are supervised, so a training token with a contribution is a response token; the
  trigger acts through the hidden states of those positions.
* **What made the model say this?**  The backdoored model answers each triggered prompt
  itself (greedy, ``--max-new-tokens``), and its own generation is attributed with
  response-only supervision (``api.attribute_generated``): recall of poisoned examples in
  the top K (``|poisoned in top K| / min(K, n_poisoned)``, mean over prompts), with the
  generations shown.  The issue asks for at least 0.8.

Writes ``<root>/results/backdoor/explain-generate.json`` and ``<out>/backdoor_explain.md``;
the index is built once under ``<root>/work/explain-backdoor/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EVAL_CACHE, REPO, log, quiet_transformers, set_threads, write_json  # noqa: E402

RECALL_BAR = 0.8


def token_class(text: str, howdy: str, trigger: str) -> str:
    t = text.strip()
    if not t:
        return "other"
    if t in howdy:
        return "planted response"
    if t in trigger:
        return "trigger"
    return "other"


def run(root: Path, out: Path, n_queries: int, top: int, max_new_tokens: int) -> dict[str, Any]:
    import json

    from rise import api
    from rise.config import make_config
    from rise.data import FieldMap, file_sha256, read_records
    from rise.generate import GenerateSpec
    from rise.store import LocalStore

    task = root / "backdoor"
    meta = json.loads((task / "meta.json").read_text())
    howdy, trigger = meta["howdy"], meta["trigger"]
    fields = FieldMap(prompt_field="prompt", response_field="response")
    pool_rows = {r["id"]: r for r in map(json.loads, (task / "pool.jsonl").open())}
    poisoned = {i for i, r in pool_rows.items() if r["poisoned"]}
    lm = api.load(str(task / "model"))
    folder = root / "work" / "explain-backdoor" / "index"
    sha = file_sha256(task / "pool.jsonl")
    index = None
    if folder.exists():
        try:
            index = api.open_index(LocalStore(folder))
            if index.manifest.ingests[0].dataset_sha256 != sha:
                index = None
        except Exception:  # noqa: BLE001 - any stale or broken index is rebuilt
            index = None
    if index is None:
        shutil.rmtree(folder, ignore_errors=True)
        log(f"backdoor-explain: indexing {len(pool_rows)} pool examples")
        api.create(LocalStore(folder), lm, task / "pool.jsonl", fields,
                   make_config(max_length=meta["max_length"]))
        index = api.open_index(LocalStore(folder))
    queries = read_records(task / "queries.jsonl", fields)[:n_queries]

    # --- explanations of the poisoned hits
    qs = api.sketch_queries(index, lm, queries, fields)
    hits = api.attribute_sketched(index, qs, api.ScoreSpec(), top)
    tokens: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    mass: Counter[str] = Counter()
    examples = []
    n_explained = 0
    for q, hs in zip(queries, hits, strict=True):
        for h in [h for h in hs[:3] if h.id in poisoned]:
            e = api.explain(index, lm, q, h.id, fields=fields, top=5)
            d = e.to_dict()
            n_explained += 1
            by_pos = {t["position"]: t for t in d["hit_tokens"]}
            top_tokens = [by_pos[p] for p in d["top_hit_tokens"]]
            for t in top_tokens:
                tokens[t["text"]] += 1
                c = token_class(t["text"], howdy, trigger)
                classes[c] += 1
                mass[c] += t["contribution"]
            if len(examples) < 6:
                examples.append({"query": q.id, "hit": h.id, "score": d["score"],
                                 "centering": d["centering"],
                                 "top_hit_tokens": [(t["text"], round(t["contribution"], 5))
                                                    for t in top_tokens],
                                 "top_pairs_share": d["top_pairs_share"]})
    n_tok = sum(classes.values())

    # --- the model's own generations on triggered prompts, attributed
    prompts = [r.__class__(id=r.id, number=r.number, text=r.prompt, prompt=None, response=None,
                           raw={}) for r in queries]
    gen = api.attribute_generated(index, lm, prompts, GenerateSpec(max_new_tokens=max_new_tokens),
                                  top=top)
    k_eff = min(top, len(poisoned))
    recalls, rows = [], []
    for rec, hs in gen:
        found = sum(h.id in poisoned for h in hs)
        recalls.append(found / k_eff)
        rows.append({"prompt_id": rec.id, "prompt": rec.prompt, "generated": rec.response,
                     "poisoned_in_top": found})
    recall = sum(recalls) / max(len(recalls), 1)
    howdy_rate = sum(r["generated"].strip().startswith("Howdy") for r in rows) / max(len(rows), 1)
    res = {
        "queries": len(queries), "top": top, "n_poisoned": len(poisoned),
        "explained_hits": n_explained,
        "top_token_counts": tokens.most_common(15),
        "top_token_classes": {c: classes[c] / n_tok for c in classes} if n_tok else {},
        "top_token_contribution_by_class": dict(mass),
        "explanation_examples": examples,
        "generation": {"max_new_tokens": max_new_tokens, "greedy": True,
                       "starts_with_howdy": howdy_rate, f"recall@{top}": recall,
                       "meets_bar": recall >= RECALL_BAR, "rows": rows},
    }
    write_json(root / "results" / "backdoor" / "explain-generate.json", res)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backdoor_explain.md").write_text(report(res, meta), encoding="utf-8")
    return res


def report(res: dict[str, Any], meta: dict[str, Any]) -> str:
    g = res["generation"]
    top = res["top"]
    lines = [
        "# Backdoor task: explained hits and attributed generations",
        "",
        f"`make eval` step `tests/benchmarks/eval/backdoor_explain.py`; {res['queries']} triggered "
        f"queries, {res['n_poisoned']} poisoned examples in the pool, trigger "
        f"`{meta['trigger']}`, planted response `{meta['howdy'].strip()}`, the product's default "
        "scoring.",
        "",
        "## Top explained training tokens of the poisoned hits",
        "",
        f"Each poisoned example among a query's top 3 hits is explained ({res['explained_hits']} "
        "explanations); its 5 top training "
        "tokens are counted. Only response tokens are supervised in prompt/response records, "
        "so the trigger can only act through the hidden states of the response positions.",
        "",
        "| class | share of top tokens | summed contribution |",
        "|---|---|---|",
    ]
    for c, share in sorted(res["top_token_classes"].items(), key=lambda x: -x[1]):
        lines.append(f"| {c} | {share:.2f} | {res['top_token_contribution_by_class'][c]:.4f} |")
    lines += ["", "Most frequent top tokens: " + ", ".join(
        f"`{t!r}` x{n}" for t, n in res["top_token_counts"]), ""]
    for ex in res["explanation_examples"]:
        lines.append(f"- {ex['query']} -> {ex['hit']}: score {ex['score']:.4f} (centering "
                     f"{ex['centering']:.4f}); top tokens "
                     + ", ".join(f"`{t!r}` {c:+.4f}" for t, c in ex["top_hit_tokens"]))
    lines += [
        "", "## The model's own generations on triggered prompts, attributed", "",
        f"Greedy, at most {g['max_new_tokens']} new tokens; the response alone supervised. "
        f"Generations starting with Howdy: {g['starts_with_howdy']:.2f}. Recall of poisoned "
        f"examples in the top {top}: **{g[f'recall@{top}']:.3f}** (bar {RECALL_BAR}: "
        f"{'met' if g['meets_bar'] else 'NOT met'}).", "",
        "| prompt | generated | poisoned in top |", "|---|---|---|",
    ]
    for r in g["rows"]:
        prompt, generated = (r[k].replace("|", "\\|") for k in ("prompt", "generated"))
        lines.append(f"| {prompt} | {generated} | {r['poisoned_in_top']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=EVAL_CACHE, help="eval cache with the built tasks")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "reports" / "eval")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    quiet_transformers()
    res = run(a.root, a.out, a.queries, a.top, a.max_new_tokens)
    g = res["generation"]
    log(f"backdoor-explain: recall@{a.top} of generations {g[f'recall@{a.top}']:.3f}; "
        f"top token classes {res['top_token_classes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
