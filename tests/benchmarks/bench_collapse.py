"""How similar are the sketches of near-duplicates, and of distinct documents: the
measurement behind the default collapse threshold (``rise.constants.DEFAULT_COLLAPSE``).

Run from the repository root::

    python tests/benchmarks/bench_collapse.py [--pool 300] [--planted 60] [--max-length 128]
        [--out tests/benchmarks/reports]

A planted pool: the first ``--pool`` articles of the Lee news corpus (300, ``.cache/``,
``make assets-lee``) plus two lightly edited copies of each of ``--planted`` of them
(never byte-equal: a few words swapped for other corpus words, commas dropped and
sentences lower-cased, the second sentence dropped, a wire-service prefix, typos in a few
words), indexed with the default configuration by the real SmolLM2-135M-Instruct. The
similarity that collapses hits is ``rise.score.row_similarity``: the combined cosine of
two indexed examples' sketches under the default scoring (both channels, lambda 0.5,
centered by the pool mean). The report gives its distribution over near-duplicate pairs
(per edit kind) and over every pair of distinct articles (the Lee corpus has several
articles on one story: hard negatives), recall and false merges per threshold, and the
top-10 of the corpus's queries with and without collapse. Written to ``OUT/collapse.json``
and ``OUT/collapse.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rise import api, constants
from rise.config import make_config
from rise.data import FieldMap, read_records
from rise.ingest import create_index
from rise.model import load_model
from rise.score import ScoreSpec, row_similarity
from rise.store import LocalStore

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache" / "models" / "smollm2-135m-instruct"
CORPUS = ROOT / ".cache" / "corpus" / "lee.jsonl"
QUERIES = ROOT / ".cache" / "corpus" / "lee-queries.jsonl"
THRESHOLDS = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99]


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text.strip())


def edit(text: str, kind: str, rng: random.Random, vocab: list[str]) -> str:
    """A light edit of ``text`` within its first 40 words (kept by any max_length >= 64)."""
    words = text.split(" ")
    head = min(len(words), 40)
    if kind == "swap":
        for i in rng.sample(range(head), k=min(3, head)):
            words[i] = rng.choice(vocab)
        return " ".join(words)
    if kind == "punct":
        out = text.replace(",", "")
        return " ".join(s[:1].lower() + s[1:] for s in _sentences(out))
    if kind == "drop":
        s = _sentences(text)
        return " ".join(s[:1] + s[2:]) if len(s) > 2 else text + " More follows."
    if kind == "prefix":
        return "SYDNEY (AAP) - " + text
    if kind == "typo":
        for i in rng.sample(range(head), k=min(5, head)):
            w = words[i]
            if len(w) > 3:
                j = rng.randrange(len(w) - 1)
                words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        return " ".join(words)
    raise ValueError(kind)


KINDS = ["swap", "punct", "drop", "prefix", "typo"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=300, help="Lee articles in the pool")
    ap.add_argument("--planted", type=int, default=60, help="articles given two edited copies")
    ap.add_argument("--max-length", type=int, default=128, help="tokens kept per article")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "tests" / "benchmarks" / "reports"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    rng = random.Random(a.seed)
    base = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    base = base[:a.pool]
    vocab = sorted({w for r in base for w in r["text"].split() if w.isalpha() and len(w) > 3})
    planted = rng.sample(range(len(base)), a.planted)
    rows = [{"id": r["id"], "text": r["text"]} for r in base]
    kind_of: dict[str, str] = {}
    # The corpus holds a few duplicates of its own (articles with the same first 250
    # characters, more than max_length keeps): one source each, reported as such.
    first: dict[str, str] = {}
    source: dict[str, str] = {}
    for r in base:
        source[r["id"]] = first.setdefault(r["text"][:250], r["id"])
    corpus_dups = sorted([rid for rid in source if source[rid] == s] for s in set(source.values())
                         if sum(1 for v in source.values() if v == s) > 1)
    for i in planted:
        for j, kind in enumerate(rng.sample(KINDS, 2)):
            rid = f"{base[i]['id']}~{j}"
            text = edit(base[i]["text"], kind, rng, vocab)
            assert text != base[i]["text"]
            rows.append({"id": rid, "text": text})
            kind_of[rid] = kind
            source[rid] = base[i]["id"]
    t0 = time.perf_counter()
    lm = load_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pool.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        store = LocalStore(Path(tmp) / "idx")
        create_index(store, lm, data, FieldMap(), make_config(max_length=a.max_length),
                     shard_size=128)
        index = api.open_index(store)
        index_s = time.perf_counter() - t0
        spec = ScoreSpec()
        mean = api.index_mean(index, spec)
        located: api.Located = {}
        for entry in index.manifest.shards:
            sd = index.shard(entry)
            for n, rid in enumerate(sd.ids):
                located[rid] = (entry, n)
        ids = [r["id"] for r in rows]
        pool = api.candidate_rows(index, ids, located)
        vocab_n = index.manifest.model.vocab
        sim = row_similarity(pool, pool, spec, vocab_n, mean)
        plain = row_similarity(pool, pool, spec, vocab_n, None)
        queries = read_records(QUERIES, FieldMap())
        qs = api.sketch_queries(index, lm, queries, FieldMap())
        tops = {}
        for name, collapse in (("plain", None), ("collapsed", constants.DEFAULT_COLLAPSE)):
            hits = api.attribute_sketched(index, qs, spec, 10, collapse=collapse)
            tops[name] = [[(h.id, round(h.score, 4), [d.id for d in h.duplicates]) for h in hs]
                          for hs in hits]
    n = len(ids)
    iu = torch.triu_indices(n, n, 1)
    same = torch.tensor([[source[ids[i]] == source[ids[j]] for j in range(n)] for i in range(n)])
    dup_mask = same[iu[0], iu[1]]
    s_all, p_all = sim[iu[0], iu[1]], plain[iu[0], iu[1]]
    dup, other = s_all[dup_mask], s_all[~dup_mask]
    per_kind: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(n):
        rid = ids[i]
        if rid in kind_of:
            per_kind[kind_of[rid]].append(float(sim[i, ids.index(source[rid])]))

    def q(t: torch.Tensor, p: float) -> float:
        return round(float(torch.quantile(t, p)), 4)

    table = []
    for t in THRESHOLDS:
        table.append({"threshold": t, "dup_recall": round(float((dup >= t).double().mean()), 4),
                      "false_merges": int((other >= t).sum()),
                      "plain_dup_recall": round(float((p_all[dup_mask] >= t).double().mean()), 4),
                      "plain_false_merges": int((p_all[~dup_mask] >= t).sum())})
    report = {
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "pool": n, "planted": a.planted, "dup_pairs": int(dup_mask.sum()),
        "corpus_duplicates": corpus_dups,
        "other_pairs": int((~dup_mask).sum()), "index_seconds": round(index_s, 1),
        "dup": {"min": q(dup, 0.0), "p05": q(dup, 0.05), "median": q(dup, 0.5)},
        "other": {"max": q(other, 1.0), "p999": q(other, 0.999), "p99": q(other, 0.99),
                  "median": q(other, 0.5)},
        "per_kind_min": {k: round(min(v), 4) for k, v in per_kind.items() if v},
        "per_kind_median": {k: round(sorted(v)[len(v) // 2], 4) for k, v in per_kind.items()
                            if v},
        "thresholds": table, "default": constants.DEFAULT_COLLAPSE,
        "queries": {"ids": [r.id for r in queries], **tops},
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collapse.json").write_text(json.dumps(report, indent=1) + "\n")
    md = [
        "# Collapse of near-duplicates: the default threshold",
        "",
        f"Generated by `tests/benchmarks/bench_collapse.py` on {report['generated']} from "
        f"commit `{report['commit']}`. Pool: the {len(base)} Lee articles plus two lightly "
        f"edited copies of each of {a.planted} ({n} examples), indexed with the default "
        f"configuration (max_length {a.max_length}) by SmolLM2-135M-Instruct in "
        f"{report['index_seconds']} s. Similarity: the combined cosine of two examples' "
        "sketches under the default scoring (both channels, lambda 0.5, centered by the pool "
        "mean), `rise.score.row_similarity`.",
        "",
        f"- near-duplicate pairs ({report['dup_pairs']}: copies of one article among "
        "themselves included, and the corpus's own duplicates, articles sharing their first "
        f"250 characters: {', '.join('/'.join(g) for g in corpus_dups) or 'none'}): "
        f"min {report['dup']['min']}, 5th percentile "
        f"{report['dup']['p05']}, median {report['dup']['median']}",
        f"- pairs of distinct articles ({report['other_pairs']}): max {report['other']['max']}, "
        f"99.9th percentile {report['other']['p999']}, 99th {report['other']['p99']}, median "
        f"{report['other']['median']}",
        "- a copy against its original, by edit: " + ", ".join(
            f"{k} min {report['per_kind_min'][k]} (median {report['per_kind_median'][k]})"
            for k in report["per_kind_min"]),
        "",
        "| threshold | near-duplicate pairs collapsed | distinct pairs merged "
        "| uncentered: collapsed | uncentered: merged |",
        "|---|---|---|---|---|",
        *[f"| {r['threshold']} | {r['dup_recall']:.3f} | {r['false_merges']} | "
          f"{r['plain_dup_recall']:.3f} | {r['plain_false_merges']} |" for r in table],
        "",
        f"Default: {constants.DEFAULT_COLLAPSE}. Top-10 of the corpus's {len(queries)} queries "
        "(distinct sources shown, plain / collapsed): " + ", ".join(
            f"{qid} {len({source[h[0]] for h in p})}/{len({source[h[0]] for h in c})}"
            for qid, p, c in zip(report["queries"]["ids"], tops["plain"], tops["collapsed"],
                                 strict=True)),
        "",
    ]
    (out / "collapse.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
