"""Engine benchmark: indexing speed vs a bare forward pass, index bytes, sketch fidelity.

Run from the repository root::

    python tests/benchmarks/bench_engine.py [--quick] [--out tests/benchmarks/reports]

Everything is measured side by side in one process, with one model load and fixed torch
threads, on the real SmolLM2-135M-Instruct model and the Lee news corpus in ``.cache/``
(``make assets``).  Tables go to stdout as markdown; progress goes to stderr; the report is
written to ``OUT/engine.json`` and ``OUT/engine.md``.  See tests/benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rise import exact
from rise.config import SketchConfig
from rise.data import Encoded, FieldMap, Record, read_records
from rise.factors import TokenFactors
from rise.featurize import featurize, pad_batch
from rise.index import open_index
from rise.ingest import create_index, encode_all
from rise.model import LoadedModel, load_model
from rise.score import stored_unit
from rise.shard import unit_rows
from rise.sketch import Sketcher, make_sketcher, outer_accumulate
from rise.store import LocalStore

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / ".cache/models/smollm2-135m-instruct"
LEE = REPO / ".cache/corpus/lee.jsonl"
LEE_QUERIES = REPO / ".cache/corpus/lee-queries.jsonl"

SWEEP = [(16, 16, 16), (32, 16, 16), (64, 16, 16), (32, 32, 32), (64, 32, 32),
         (128, 32, 32), (64, 64, 64), (128, 64, 64), (256, 64, 64)]
DEFAULT = SketchConfig()
LAMBDA = 0.5
TOP = 10

# Part 1: speed.
SPEED_DOCS, SPEED_MAXLEN, SPEED_BATCH = 64, 128, 8
# Part 2: bytes.  Bytes per example do not depend on the token count, so the sweep's
# indexes read only a few tokens per document.
BYTES_MAXLEN = 2
# Part 3: fidelity.
POOL_DOCS, FID_MAXLEN, FID_TOPK, QUERY_EVERY = 200, 64, 128, 5
# --quick: a smoke run on less data; its numbers are not comparable to a full run's.
QUICK_SPEED_DOCS, QUICK_POOL_DOCS = 16, 100
SETTINGS = [  # (name, channel weights (rh, gh), centered)
    ("both", (LAMBDA, 1 - LAMBDA), False),
    ("rh", (1.0, 0.0), False),
    ("gh", (0.0, 1.0), False),
    ("both+center", (LAMBDA, 1 - LAMBDA), True),
    ("rh+center", (1.0, 0.0), True),
    ("gh+center", (0.0, 1.0), True),
]

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ stamp


def stamp(threads: int) -> dict:
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "loadavg_start": list(os.getloadavg()),
        "model": MODEL.name,
    }


# ------------------------------------------------------------------------ part 1: speed


def pad(encs: list[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: featurize's own."""
    ids, mask, _ = pad_batch(encs, pad_id)
    return ids, mask


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))


def bench_speed(lm: LoadedModel, rounds: int, tmp: Path, docs: int) -> dict:
    lines = LEE.read_text().splitlines()[:docs]
    data = tmp / "speed.jsonl"
    write_jsonl(data, lines)
    warm_data = tmp / "warm.jsonl"
    write_jsonl(warm_data, lines[:1])
    fields = FieldMap()
    cfg = SketchConfig(max_length=SPEED_MAXLEN)
    records = read_records(data, fields)
    enc = encode_all(records, lm, cfg, fields)
    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id or 0
    batches = [pad(enc[i : i + SPEED_BATCH], pad_id) for i in range(0, len(enc), SPEED_BATCH)]
    warm_batch = [pad(enc[:1], pad_id)]
    n_tokens = sum(len(e.input_ids) for e in enc)
    n_sup = sum(e.n_supervised for e in enc)
    store_n = [0]

    def forward_logits(bs):
        for ids, mask in bs:
            with torch.inference_mode():
                out = lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
            assert out.logits.shape[-1] == lm.head.vocab
            del out

    def backbone(bs):
        for ids, mask in bs:
            lm.hidden_states(ids, mask)

    def feat(encs):
        featurize(lm, encs, cfg, batch_size=SPEED_BATCH)

    def index(path):
        store_n[0] += 1
        root = tmp / f"speed-index-{store_n[0]}"
        create_index(LocalStore(root), lm, path, fields, cfg, batch_size=SPEED_BATCH)
        return root

    methods = {
        "a": ("bare forward, full logits (lm.model, B x T x V)",
              lambda: forward_logits(batches), lambda: forward_logits(warm_batch)),
        "b": ("bare backbone (lm.hidden_states, no head)",
              lambda: backbone(batches), lambda: backbone(warm_batch)),
        "c": ("rise.featurize.featurize, default sketch",
              lambda: feat(enc), lambda: feat(enc[:1])),
        "d": ("rise.index.create_index into a LocalStore",
              lambda: index(data), lambda: index(warm_data)),
    }
    log("speed: warm-up (one document per method)")
    for _, _, warm_up in methods.values():
        warm_up()
    times: dict[str, list[float]] = {k: [] for k in methods}
    keys = list(methods)
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate: no fixed position
        for k in order:
            gc.collect()
            t = time.perf_counter()
            methods[k][1]()
            times[k].append(time.perf_counter() - t)
            log(f"speed: round {r + 1}/{rounds} ({k}) {times[k][-1]:.2f}s")
    med = {k: statistics.median(v) for k, v in times.items()}
    last_index = tmp / f"speed-index-{store_n[0]}"
    return {
        "docs": docs, "max_length": SPEED_MAXLEN, "batch_size": SPEED_BATCH,
        "rounds": rounds, "input_tokens": n_tokens, "supervised_tokens": n_sup,
        "config": cfg.to_dict(),
        "methods": {k: {"what": methods[k][0], "seconds": times[k], "median_s": med[k],
                        "tokens_per_s": n_tokens / med[k]} for k in keys},
        "ratios": {"c/a": med["c"] / med["a"], "c/b": med["c"] / med["b"],
                   "d/a": med["d"] / med["a"], "d/c": med["d"] / med["c"]},
        "_index_root": str(last_index),
    }


# ------------------------------------------------------------------------ part 2: bytes

# Per-row tensors of a sketch shard besides the sketches: norms (2 x float32), token_count,
# ingest, record (int64 each) and one int64 id offset, plus the id's UTF-8 bytes.
ROW_SCALAR_BYTES = 2 * 4 + 3 * 8 + 8


def index_bytes(root: Path, dims: tuple[int, int, int]) -> dict:
    idx = open_index(LocalStore(root))
    m = idx.manifest
    n = sum(s.count for s in m.shards)
    files = sum((root / s.key).stat().st_size for s in m.shards)
    recorded = sum(s.bytes for s in m.shards)
    man_bytes = (root / f"manifest-{m['generation']:08d}.json").stat().st_size
    ids = [rid for sd in idx.shards() for rid in sd.ids]
    id_bytes = sum(len(i.encode()) for i in ids) / n
    kr, kh, kg = dims
    numbers = kr * kh + kg * kh
    per_row = numbers * 2 + ROW_SCALAR_BYTES + id_bytes
    fixed = files - n * per_row  # per shard: float64 rh_sum/gh_sum, header, offsets[0]
    return {
        "dims": list(dims), "examples": n, "shards": len(m.shards),
        "numbers_per_example": numbers,
        "shard_file_bytes": files, "manifest_recorded_shard_bytes": recorded,
        "manifest_json_bytes": man_bytes,
        "bytes_per_example_measured": files / n,
        "formula_bytes_per_example": per_row,
        "formula": f"({kr}*{kh} + {kg}*{kh})*2 + {ROW_SCALAR_BYTES} + id ({id_bytes:g})",
        "per_shard_fixed_bytes": fixed,
        "per_shard_sums_bytes": numbers * 8,
        "bytes_per_example_at_1024_per_shard": per_row + fixed / 1024,
    }


def bench_bytes(lm: LoadedModel, tmp: Path, docs: int, speed_index: str | None) -> dict:
    data = tmp / "bytes.jsonl"
    write_jsonl(data, LEE.read_text().splitlines()[:docs])
    rows = []
    for dims in SWEEP:
        root = tmp / f"bytes-{'x'.join(map(str, dims))}"
        cfg = SketchConfig(dims=dims, max_length=BYTES_MAXLEN)
        create_index(LocalStore(root), lm, data, FieldMap(), cfg, batch_size=SPEED_BATCH)
        rows.append(index_bytes(root, dims))
        log(f"bytes: {dims} {rows[-1]['bytes_per_example_measured']:.1f} B/example")
    out = {"max_length": BYTES_MAXLEN, "docs": docs, "sweep": rows}
    if speed_index:
        d = index_bytes(Path(speed_index), DEFAULT.dims)
        d["max_length"] = SPEED_MAXLEN
        out["default_from_speed_index"] = d
    return out


# --------------------------------------------------------------------- part 3: fidelity


def first_sentence(text: str) -> str:
    i = text.find(". ")
    return text if i < 0 else text[: i + 1]


def fidelity_records(pool_docs: int) -> tuple[list[Record], list[Record]]:
    lee = read_records(LEE, FieldMap())
    pool = lee[:pool_docs]
    queries = []
    for rec in pool[::QUERY_EVERY]:
        text = first_sentence(rec.text or "")
        queries.append(Record(f"s1:{rec.id}", len(queries), text, None, None, {"text": text}))
    for rec in read_records(LEE_QUERIES, FieldMap()):
        queries.append(Record(rec.id, len(queries), rec.text, None, None, rec.raw))
    return pool, queries


def _groups(fs: list[TokenFactors], size: int) -> list[dict]:
    """Consecutive groups of examples with their tokens concatenated (like featurize's
    batches)."""
    out = []
    for s in range(0, len(fs), size):
        g = fs[s : s + size]
        counts = torch.tensor([f.h.shape[0] for f in g])
        out.append({
            "start": s, "n": len(g),
            "h": torch.cat([f.h for f in g]), "g": torch.cat([f.g for f in g]),
            "r": torch.cat([f.r for f in g]), "idx": torch.cat([f.idx for f in g]),
            "w": torch.cat([f.w for f in g]).double(),
            "ex": torch.repeat_interleave(torch.arange(len(g)), counts),
        })
    return out


def factor_sketches(groups: list[dict], n: int, sk: Sketcher) -> tuple[torch.Tensor, torch.Tensor]:
    """phi_RH, phi_GH (n, .) float64 from stored factors, as readout.sketch_batch does."""
    kr, kh, kg = sk.dims
    dt_ = groups[0]["h"].dtype
    sh, sg = sk.ch.matrix(dt_), sk.cg.matrix(dt_)
    rh = torch.zeros(n, kr * kh, dtype=torch.float64)
    gh = torch.zeros(n, kg * kh, dtype=torch.float64)
    for g in groups:
        cr = sk.cr.apply_sparse(g["idx"], g["r"])
        chh = (g["h"] @ sh).double()
        cgg = (g["g"] @ sg).double()
        sl = slice(g["start"], g["start"] + g["n"])
        rh[sl] = outer_accumulate(cr.double(), chh, g["w"], g["ex"], g["n"])
        gh[sl] = outer_accumulate(cgg, chh, g["w"], g["ex"], g["n"])
    return rh, gh


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim (ties: ordinal; scores here are continuous)."""
    r = torch.empty_like(x)
    order = x.argsort(dim=-1)
    r.scatter_(-1, order, torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x).contiguous())
    return r


def spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = ranks(a), ranks(b)
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int = TOP) -> torch.Tensor:
    ta = a.topk(k, dim=-1).indices
    tb = b.topk(k, dim=-1).indices
    return torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb,
                                                                                    strict=True)])


def centered(u: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    c = u - mu
    return c / c.norm(dim=1, keepdim=True).clamp_min(1e-30)


def stored(x: torch.Tensor) -> torch.Tensor:
    """Unit rows rounded to float16, as an index stores them (float64 values)."""
    u, _ = unit_rows(x)
    return u.to(torch.float16).double()


def bench_fidelity(lm: LoadedModel, seeds: list[int], pool_docs: int) -> dict:
    vocab, hidden = lm.head.vocab, lm.head.hidden
    pool_recs, q_recs = fidelity_records(pool_docs)
    fields = FieldMap()
    cfg_ns = SketchConfig(mode="nosketch", topk=FID_TOPK, max_length=FID_MAXLEN)
    enc = encode_all(pool_recs + q_recs, lm, cfg_ns, fields)
    n_pool = len(pool_recs)
    t = time.perf_counter()
    feats = featurize(lm, enc, cfg_ns, batch_size=SPEED_BATCH)
    t_forward = time.perf_counter() - t
    fs = feats.factors or []
    pool_fs, q_fs = fs[:n_pool], fs[n_pool:]
    log(f"fidelity: one nosketch forward of {len(enc)} examples, "
        f"{int(feats.token_counts.sum())} tokens: {t_forward:.1f}s")

    # Check: sketches from factors == featurize in sketch mode (same first batch of 8).
    check_dims = DEFAULT.dims
    cfg_sk = SketchConfig(topk=FID_TOPK, max_length=FID_MAXLEN, dims=check_dims,
                          seed=seeds[0])
    ref = featurize(lm, enc[:SPEED_BATCH], cfg_sk, batch_size=SPEED_BATCH)
    groups_check = _groups(fs[:SPEED_BATCH], SPEED_BATCH)
    sk = make_sketcher(seeds[0], vocab, hidden, check_dims)
    mine_rh, mine_gh = factor_sketches(groups_check, SPEED_BATCH, sk)
    rel = {}
    for c, mine, theirs in (("rh", mine_rh, ref.rh), ("gh", mine_gh, ref.gh)):
        d = (mine[:3] - theirs[:3]).norm(dim=1) / theirs[:3].norm(dim=1)
        rel[c] = float(d.max())
    sketch_check = {"examples": 3, "dims": list(check_dims), "seed": seeds[0],
                    "max_rel_err": rel, "ok": max(rel.values()) < 1e-6}
    log(f"fidelity: factor sketches vs featurize max rel err {rel}")

    # No-sketch reference: the library's exact.score_matrix and exact.norms.
    t = time.perf_counter()
    nrm_pool = exact.norms(pool_fs, vocab)
    nrm_q = exact.norms(q_fs, vocab)
    t_norms = time.perf_counter() - t
    t = time.perf_counter()
    raw = {c: exact.score_matrix(q_fs, pool_fs, c, vocab) for c in ("rh", "gh")}
    t_scores = time.perf_counter() - t
    nosketch_info = {"queries": len(q_fs), "pool": n_pool, "norms_s": t_norms,
                     "score_matrix_s": t_scores}
    log(f"fidelity: no-sketch reference (exact.score_matrix) {t_scores:.1f}s, "
        f"norms {t_norms:.1f}s")
    ref_cos = {
        "rh": raw["rh"] / (nrm_q[:, 0:1] * nrm_pool[:, 0][None, :]).clamp_min(1e-300),
        "gh": raw["gh"] / (nrm_q[:, 1:2] * nrm_pool[:, 1][None, :]).clamp_min(1e-300),
    }

    def combine(cos: dict[str, torch.Tensor], w: tuple[float, float]) -> torch.Tensor:
        return w[0] * cos["rh"] + w[1] * cos["gh"]

    refs = {name: combine(ref_cos, w) for name, w, _ in SETTINGS}
    # Context: how different are the two no-sketch channels from each other, how spread
    # are the reference scores, and is each query's source document ranked first?
    channel_overlap = float(topk_overlap(ref_cos["rh"], ref_cos["gh"]).mean())
    pos = {r.id: i for i, r in enumerate(pool_recs)}
    src = torch.tensor([pos.get(r.id[3:] if r.id.startswith("s1:") else
                                r.raw.get("source_id", ""), -1) for r in q_recs])
    has_src = src >= 0

    def self_at_1(s: torch.Tensor) -> float:
        return float((s.argmax(1)[has_src] == src[has_src]).double().mean())

    ref_stats = {}
    for c, s in ref_cos.items():
        srt = s.sort(dim=1, descending=True).values
        ref_stats[c] = {"per_query_std": float(s.std(1).mean()), "top1": float(srt[:, 0].mean()),
                        "top2": float(srt[:, 1].mean()), "top10": float(srt[:, TOP - 1].mean()),
                        "median": float(srt[:, s.shape[1] // 2].mean())}
    ref_stats["self_at_1"] = {name: self_at_1(refs[name]) for name, _, _ in SETTINGS[:3]}

    groups = _groups(fs, SPEED_BATCH)
    per: dict[str, dict[str, dict[str, list[float]]]] = {}
    for dims in SWEEP:
        key = "x".join(map(str, dims))
        per[key] = {name: {"top10": [], "spearman": [], "self_at_1": []}
                    for name, _, _ in SETTINGS}
        cos_err: dict[str, list[float]] = {"rh": [], "gh": []}
        for seed in seeds:
            sk = make_sketcher(seed, vocab, hidden, dims)
            rh, gh = factor_sketches(groups, len(fs), sk)
            cos, cos_c = {}, {}
            for c, x in (("rh", rh), ("gh", gh)):
                u = stored(x)
                mu = u[:n_pool].mean(0)  # mean stored unit sketch of the pool
                su = stored_unit(u)
                cos[c] = su[n_pool:] @ su[:n_pool].T
                cu = centered(su, mu)
                cos_c[c] = cu[n_pool:] @ cu[:n_pool].T
                cos_err[c].append(float((cos[c] - ref_cos[c]).std()))
            for name, w, is_c in SETTINGS:
                s = combine(cos_c if is_c else cos, w)
                per[key][name]["top10"].append(float(topk_overlap(s, refs[name]).mean()))
                per[key][name]["spearman"].append(float(spearman_rows(s, refs[name]).mean()))
                per[key][name]["self_at_1"].append(self_at_1(s))
        per[key]["cos_err_std"] = {c: statistics.mean(v) for c, v in cos_err.items()}
        b = per[key]["both"]["top10"]
        log(f"fidelity: {dims} combined top-10 {statistics.mean(b):.3f}")
    summary = {}
    for key, d in per.items():
        summary[key] = {"cos_err_std": d.pop("cos_err_std")}
        for name, m in d.items():
            summary[key][name] = {
                k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "per_seed": v} for k, v in m.items()}
    return {
        "pool_docs": n_pool, "queries": len(q_fs), "max_length": FID_MAXLEN, "topk": FID_TOPK,
        "seeds": seeds, "lambda": LAMBDA, "forward_s": t_forward,
        "tokens": int(feats.token_counts.sum()), "sketch_check": sketch_check,
        "nosketch": nosketch_info, "nosketch_rh_vs_gh_top10": channel_overlap,
        "reference_stats": ref_stats,
        "lee_queries": sum(not r.id.startswith("s1:") for r in q_recs),
        "queries_with_source_in_pool": int(has_src.sum()),
        "results": summary,
    }


# ---------------------------------------------------------------------------- report


def pm(d: dict) -> str:
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def recommend(report: dict) -> dict:
    res = report["fidelity"]["results"]
    by = {tuple(r["dims"]): r for r in report["bytes"]["sweep"]}
    best = max(v["both"]["top10"]["mean"] for v in res.values())
    cands = []
    for key, v in res.items():
        dims = tuple(int(x) for x in key.split("x"))
        if v["both"]["top10"]["mean"] >= best - 0.03:
            cands.append((by[dims]["formula_bytes_per_example"], dims, v["both"]["top10"]))
    cands.sort()
    b, dims, top = cands[0]
    return {"dims": list(dims), "bytes_per_example": b, "combined_top10": top["mean"],
            "best_combined_top10": best, "tolerance": 0.03}


def render(report: dict) -> str:
    st = report["stamp"]
    out = [
        "# RISE engine benchmark",
        "",
        f"commit `{st['commit']}` · {st['date']} · torch {st['torch']} · transformers "
        f"{st['transformers']} · Python {st['python']} · CPU {st['cpu']} "
        f"({st['cpu_count']} cores) · torch threads {st['torch_threads']} · load average "
        f"{st['loadavg_start'][0]:.2f} at start, {st['loadavg_end'][0]:.2f} at end · this "
        f"process got {st['cpu_share']:.2f} of a core on average · "
        f"model {st['model']} (float32) · total {st['total_s']:.0f}s"
        + (" · **--quick: smoke run on less data, not comparable**" if report["quick"]
           else ""),
        "",
    ]
    sp = report.get("speed")
    if sp:
        out += [
            "## 1. Indexing throughput vs a bare forward pass",
            "",
            f"First {sp['docs']} lee docs, max_length {sp['max_length']}, batch "
            f"{sp['batch_size']}: {sp['input_tokens']} input tokens "
            f"({sp['supervised_tokens']} supervised). Methods interleaved (order rotated each "
            f"round), {sp['rounds']} round(s) after a one-document warm-up of each; median "
            "seconds. "
            "tokens/s counts input tokens. (a) computes the full logits B x T x V "
            "(`use_cache=False`); (a)-(c) get pre-tokenized batches, (d) includes reading the "
            "file, tokenization, shard writing with fsync and sha256.",
            "",
            "| method | median s | tokens/s | all rounds (s) |",
            "|---|---:|---:|---|",
        ]
        for k, m in sp["methods"].items():
            out.append(f"| ({k}) {m['what']} | {m['median_s']:.2f} | {m['tokens_per_s']:.0f} | "
                       + ", ".join(f"{s:.2f}" for s in m["seconds"]) + " |")
        r = sp["ratios"]
        out += ["", "| time ratio | value |", "|---|---:|"]
        out += [f"| {k} | {v:.2f} |" for k, v in r.items()]
        out.append("")
    by = report["bytes"]
    same = all(r["shard_file_bytes"] == r["manifest_recorded_shard_bytes"] for r in by["sweep"])
    out += [
        "## 2. Index bytes per example",
        "",
        f"Real indexes of the first {by['docs']} lee docs (one shard each; the sweep's indexes "
        f"read max_length {by['max_length']} tokens since bytes do not depend on length). "
        "measured = shard file bytes / examples (equal to the manifest's recorded shard "
        f"bytes: {'yes' if same else 'NO'}); "
        f"formula = (kr*kh + kg*kh)*2 + {ROW_SCALAR_BYTES} scalar bytes (2 float32 norms, "
        "token count, ingest, record, id offset) + id bytes; fixed = per-shard bytes "
        "(float64 rh_sum/gh_sum, safetensors header), which the default shard size 1024 "
        "amortises.",
        "",
        f"| dims (kr,kh,kg) | numbers | formula B/ex | measured B/ex ({by['docs']}/shard) "
        "| per-shard fixed B | of which sums B | B/ex at 1024/shard | manifest JSON B |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    for rw in by["sweep"]:
        out.append(
            f"| {tuple(rw['dims'])} | {rw['numbers_per_example']} | "
            f"{rw['formula_bytes_per_example']:.0f} | {rw['bytes_per_example_measured']:.1f} | "
            f"{rw['per_shard_fixed_bytes']:.0f} | {rw['per_shard_sums_bytes']} | "
            f"{rw['bytes_per_example_at_1024_per_shard']:.1f} | {rw['manifest_json_bytes']} |")
    if "default_from_speed_index" in by:
        d = by["default_from_speed_index"]
        out += ["", f"Default dims {tuple(d['dims'])} from the part-1 index (max_length "
                f"{d['max_length']}): {d['bytes_per_example_measured']:.1f} B/example "
                f"({d['shard_file_bytes']} shard bytes, manifest says "
                f"{d['manifest_recorded_shard_bytes']})."]
    out.append("")
    fi = report["fidelity"]
    ck, ns = fi["sketch_check"], fi["nosketch"]
    out += [
        "## 3. Top-10 agreement, sketched vs no-sketch",
        "",
        f"Pool: first {fi['pool_docs']} lee docs at max_length {fi['max_length']}; "
        f"{fi['queries']} queries (first sentence, up to and including the first '. ', of "
        f"every {QUERY_EVERY}th pool doc, plus the {fi['lee_queries']} lee-queries). One "
        "nosketch forward "
        f"(topk {fi['topk']}, {fi['tokens']} supervised tokens, {fi['forward_s']:.0f}s); "
        "sketches computed from the same factors with the library's maps. Reference = "
        "no-sketch cosine per channel (exact.norms), combined with lambda "
        f"{fi['lambda']}. Sketches are unit-normalised and rounded to float16 as stored. "
        f"Mean over queries of |top10 ∩ top10_ref| / 10 and of per-query Spearman over the "
        f"{fi['pool_docs']} pool scores; mean ± std over seeds {fi['seeds']}. '+center': pool-"
        "mean centering of the sketches (both sides), compared with the *uncentered* "
        "no-sketch ranking (centering is not defined for the reference). Random ranking "
        f"would give top-10 ≈ {TOP / fi['pool_docs']:.2f}; the two no-sketch channels agree "
        f"with each other at top-10 {fi['nosketch_rh_vs_gh_top10']:.3f}.",
        "",
        f"Checks: factor sketches vs `featurize` (sketch mode, dims {tuple(ck['dims'])}, seed "
        f"{ck['seed']}) on {ck['examples']} examples: max rel err RH "
        f"{ck['max_rel_err']['rh']:.1e}, GH {ck['max_rel_err']['gh']:.1e} "
        f"({'ok' if ck['ok'] else 'ABOVE 1e-6'}). Reference scores: `exact.score_matrix` "
        f"{ns['score_matrix_s']:.0f}s, `exact.norms` {ns['norms_s']:.0f}s.",
        "",
        "Reference cosine spread (mean over queries): "
        + "; ".join(f"{c.upper()} top-1 {rs['top1']:.3f}, top-2 {rs['top2']:.3f}, top-10 "
                    f"{rs['top10']:.3f}, median {rs['median']:.3f}, per-query std "
                    f"{rs['per_query_std']:.3f}"
                    for c, rs in ((c, fi["reference_stats"][c]) for c in ("rh", "gh")))
        + f". The query's source document is ranked first by the reference for "
        f"{fi['reference_stats']['self_at_1']['both']:.0%} of the "
        f"{fi['queries_with_source_in_pool']} queries whose source is in the pool (combined).",
        "",
    ]
    bmap = {tuple(r["dims"]): r["formula_bytes_per_example"] for r in by["sweep"]}
    names = [n for n, _, _ in SETTINGS]
    for metric, title in (("top10", "Top-10 overlap"), ("spearman", "Spearman (per query)")):
        extra = metric == "top10"
        out += [f"**{title}**", "",
                "| dims | B/ex | " + " | ".join(names)
                + (" | self@1 (both) | cos err std RH / GH |" if extra else " |"),
                "|---|---:|" + "---:|" * (len(names) + (2 if extra else 0))]
        for key, v in fi["results"].items():
            dims = tuple(int(x) for x in key.split("x"))
            row = f"| {dims} | {bmap[dims]:.0f} | " + " | ".join(pm(v[n][metric]) for n in names)
            if extra:
                row += (f" | {v['both']['self_at_1']['mean']:.3f} | "
                        f"{v['cos_err_std']['rh']:.3f} / {v['cos_err_std']['gh']:.3f}")
            out.append(row + " |")
        out.append("")
    out += ["self@1: fraction of queries whose source document is the sketched top-1 "
            "(combined score). cos err std: std of sketched minus no-sketch cosine over all "
            "query x pool pairs, uncentered, mean over seeds. GH sketches do not depend on kr "
            "(same seed, same h and g maps), so rows that differ only in kr share their GH "
            "columns.", ""]
    rec = report["recommendation"]
    out += [
        "## Recommendation",
        "",
        f"Smallest dims whose combined top-10 overlap is within {rec['tolerance']} of the best "
        f"({rec['best_combined_top10']:.3f}): **{tuple(rec['dims'])}** at "
        f"{rec['combined_top10']:.3f}, {rec['bytes_per_example']:.0f} bytes/example "
        f"(current default {DEFAULT.dims}).",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: 1 speed round on {QUICK_SPEED_DOCS} docs, a "
                         f"{QUICK_POOL_DOCS}-doc pool, 1 seed (not comparable to a full run)")
    ap.add_argument("--out", default=str(REPO / "tests/benchmarks/reports"),
                    help="folder for engine.json and engine.md")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on 2 shared cores, 2 threads "
                         "measured 3-4x slower)")
    ap.add_argument("--rounds", type=int, default=None, help="speed rounds (default 3; 1 quick)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="sketch seeds for part 3 (default 3; 1 with --quick)")
    ap.add_argument("--speed-docs", type=int, default=None,
                    help=f"part 1 documents (default {SPEED_DOCS}; {QUICK_SPEED_DOCS} quick)")
    ap.add_argument("--pool-docs", type=int, default=None,
                    help=f"part 3 pool documents (default {POOL_DOCS}; {QUICK_POOL_DOCS} quick)")
    ap.add_argument("--skip-speed", action="store_true", help="skip part 1")
    args = ap.parse_args(argv)
    for p in (MODEL, LEE, LEE_QUERIES):
        if not p.exists():
            print(f"missing {p}: run `make assets`", file=sys.stderr)
            return 2
    rounds = args.rounds or (1 if args.quick else 3)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    speed_docs = args.speed_docs or (QUICK_SPEED_DOCS if args.quick else SPEED_DOCS)
    pool_docs = args.pool_docs or (QUICK_POOL_DOCS if args.quick else POOL_DOCS)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report: dict = {"quick": args.quick, "stamp": stamp(args.threads)}
    lm = load_model(MODEL)
    log(f"model loaded (vocab {lm.head.vocab}, hidden {lm.head.hidden})")
    with tempfile.TemporaryDirectory(prefix="rise-bench-") as tmp_:
        tmp = Path(tmp_)
        speed_index = None
        if not args.skip_speed:
            t = time.perf_counter()
            report["speed"] = bench_speed(lm, rounds, tmp, speed_docs)
            speed_index = report["speed"].pop("_index_root")
            report["speed"]["section_s"] = time.perf_counter() - t
        t = time.perf_counter()
        report["bytes"] = bench_bytes(lm, tmp, speed_docs, speed_index)
        report["bytes"]["section_s"] = time.perf_counter() - t
        t = time.perf_counter()
        report["fidelity"] = bench_fidelity(lm, seeds, pool_docs)
        report["fidelity"]["section_s"] = time.perf_counter() - t
    report["recommendation"] = recommend(report)
    report["stamp"]["loadavg_end"] = list(os.getloadavg())
    report["stamp"]["total_s"] = time.perf_counter() - T0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    report["stamp"]["cpu_share"] = (ru.ru_utime + ru.ru_stime) / report["stamp"]["total_s"]
    md = render(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "engine.md").write_text(md + "\n")
    print(md)
    log(f"wrote {out / 'engine.json'} and {out / 'engine.md'}")
    return 0 if report["fidelity"]["sketch_check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
