"""How cost grows with the pool (make bench-scale; not CI).

    .venv/bin/python tests/benchmarks/bench_scale.py [--sizes 10000 100000] [--s3-size 100000]
        [--ann-size 100000] [--repeats 3] [--out tests/benchmarks/reports]

For each size, a synthetic index of real shards (``scale_data.py``: random hidden states,
residuals and projected errors of a topic mixture through the real CountSketch maps at the
default dims and ``rise.shard.build_shard``; 24.6 KB a row) in ``.cache/scale/n<size>``
(kept: a rerun reuses it), then:

* storage: bytes on disk, per example;
* the machine's read bandwidth over the same bytes (numpy sum of the memory-mapped sketches
  viewed as int64, warm in the page cache), one thread;
* the scorer (``rise.scorer.server.Scorer.ScoreShards``, in a process of its own, one
  scoring thread, ``torch.set_num_threads(1)``) for 1, 16 and 256 queries, top 10, the
  default scoring (both channels, cosine, centered): with a cache budget
  (``RISE_SCORER_CACHE_BYTES``) above the index (memory-resident: scan rate against the
  read bandwidth) and below it (a quarter of the index: every pass fetches, verifies and
  maps shards again); each process reports its peak RSS (VmHWM), its anonymous and
  file-backed resident memory, and the bytes it read from the store and the disk;
* two scorer processes, each with half the shards (replica 0 and 1 of 2), at once: the
  wall time of the slower and the merged top 10 (equal to the one scorer's);
* at ``--s3-size``: the index copied into a local SeaweedFS (``rise.stack.servers``), the
  scorer reading it through S3 (first pass: download into the node-local cache);
* at ``--ann-size``: ``rise.ann`` IVF-Flat and IVF-PQ built over the index, recall@10
  against the exact scan and the speed-up per query for several ``nprobe``.

Reports: ``scale.json`` and ``scale.md`` in ``--out``.  10^6 examples (24 GiB on disk) is
``--sizes 1000000 --s3-size 0 --ann-size 0`` (hours of generation on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rise import ann  # noqa: E402
from rise.api import approximate_candidates, index_mean, score_candidates  # noqa: E402
from rise.index import open_index  # noqa: E402
from rise.score import (  # noqa: E402
    ScoreSpec,
    merge_topk,
    queryset_from_bytes,
    queryset_to_bytes,
)
from rise.settings import Settings  # noqa: E402
from rise.shard import map_shard  # noqa: E402
from rise.store import LocalStore  # noqa: E402
from scale_data import Generator, build_index  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / ".cache" / "scale"
REPORTS = Path(__file__).resolve().parent / "reports"
QUERIES = (1, 16, 256)
TOP = 10


# ------------------------------------------------------------------ the scorer process


class _Ctx:
    def invocation_metadata(self) -> tuple:
        return ()

    def is_active(self) -> bool:
        return True

    def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")

    def set_code(self, code: Any) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = int(v)
    return out


def _store_bytes(scorer: Any) -> float:
    """rise_storage_bytes_read_total of the scorer: bytes it fetched from the store."""
    v = scorer.metrics.registry.get_sample_value("rise_storage_bytes_read_total",
                                                 {"service": "scorer"})
    return float(v or 0.0)


def child(a: argparse.Namespace) -> None:
    """One scorer: times ScoreShards passes, prints JSON."""
    # The scorer's modules, imported only in the child process (its RSS is what is measured).
    from rise.s3store import S3Store
    from rise.scorer.server import Scorer
    from rise.v1 import scorer_pb2 as pb

    torch.set_num_threads(1)
    settings = Settings(internal_auth="off", scorer_cache_bytes=a.budget,
                        scorer_cache_dir=a.cache_dir, scorer_threads=1)
    if a.s3:
        s3 = json.loads(a.s3)

        def factory(prefix: str):
            return S3Store.from_url(s3["endpoint"], s3["access"], s3["secret"], s3["bucket"],
                                    prefix=prefix)
    else:
        def factory(prefix: str):
            return LocalStore(Path(a.root) / prefix)

    scorer = Scorer(settings, store_factory=factory, threads=1)
    qs_all = queryset_from_bytes(Path(a.queries).read_bytes())
    sel = pb.ShardSelector(prefix=a.prefix, generation=1, replica=a.replica,
                           replicas=a.replicas)
    result: dict[str, Any] = {"passes": {}, "idle": _status()}
    hits: dict[int, list] = {}
    peak = dict(result["idle"])
    for q in [int(x) for x in a.counts.split(",")]:
        sub = queryset_from_bytes(queryset_to_bytes(qs_all))
        sub.ids, sub.norms = sub.ids[:q], sub.norms[:q]
        assert sub.rh is not None and sub.gh is not None
        sub.rh, sub.gh = sub.rh[:q], sub.gh[:q]
        req = pb.ScoreShardsRequest(shards=sel, queries=queryset_to_bytes(sub), top=TOP)
        times, io = [], []
        for r in range(a.repeats + 1):
            io0, sb0 = _io(), _store_bytes(scorer)
            t0 = time.perf_counter()
            resp = scorer.ScoreShards(req, _Ctx())
            dt = time.perf_counter() - t0
            io1, sb1 = _io(), _store_bytes(scorer)
            st = _status()
            for k in ("RssAnon", "RssFile", "VmRSS"):
                peak[k] = max(peak.get(k, 0), st[k])
            if r == 0:
                result["passes"].setdefault("first", {})[q] = dt
                continue
            times.append(dt)
            io.append({"store": sb1 - sb0, "rchar": io1["rchar"] - io0["rchar"],
                       "read_bytes": io1["read_bytes"] - io0["read_bytes"]})
        result["passes"][q] = {"median_s": statistics.median(times), "times": times,
                               "store_bytes": statistics.median(d["store"] for d in io),
                               "rchar": statistics.median(d["rchar"] for d in io),
                               "disk_read_bytes": statistics.median(d["read_bytes"] for d in io)}
        if q == max(int(x) for x in a.counts.split(",")) or q == 1:
            hits[q] = [[(c.id, c.score) for c in qc.candidates] for qc in resp.queries]
    result["peak"] = {**peak, "VmHWM": _status()["VmHWM"],
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    result["hits"] = hits
    scorer.close()
    print(json.dumps(result))


def run_scorers(root: Path, prefix: str, queries: Path, budget: int, replicas: int,
                repeats: int, counts: str, s3: dict | None = None) -> list[dict]:
    """``replicas`` scorer processes at once (replicas 0..n-1 of n; 1: every shard)."""
    procs, dirs = [], []
    t0 = time.perf_counter()
    for r in range(replicas):
        d = tempfile.mkdtemp(prefix="scorer-cache-", dir=DATA)
        dirs.append(d)
        cmd = [sys.executable, __file__, "--child", "--root", str(root), "--prefix", prefix,
               "--queries", str(queries), "--budget", str(budget), "--cache-dir", d,
               "--replica", str(r if replicas > 1 else 0),
               "--replicas", str(replicas if replicas > 1 else 0), "--repeats", str(repeats),
               "--counts", counts]
        if s3:
            cmd += ["--s3", json.dumps(s3)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "services"), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True))
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"scorer process failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    for o in out:
        o["process_wall_s"] = wall
    return out


# --------------------------------------------------------------------------- helpers


def index_bytes(store_root: Path) -> tuple[int, int]:
    """(bytes of every file, bytes of the sketches)."""
    total = sketch = 0
    for p in (store_root / "shards").rglob("*.safetensors"):
        total += p.stat().st_size
        sd = map_shard(p)
        assert sd.rh is not None and sd.gh is not None
        sketch += sd.rh.nbytes + sd.gh.nbytes
    total += sum(p.stat().st_size for p in store_root.glob("manifest-*"))
    return total, sketch


def read_bandwidth(store_root: Path, repeats: int) -> float:
    """Bytes/s of a plain streaming read of the sketches (warm, one thread)."""
    views = []
    for p in sorted((store_root / "shards").rglob("*.safetensors")):
        sd = map_shard(p)
        assert sd.rh is not None and sd.gh is not None
        views += [sd.rh.numpy().view(np.int64), sd.gh.numpy().view(np.int64)]
    nbytes = sum(v.nbytes for v in views)
    for v in views:  # warm
        v.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for v in views:
            v.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def merged(parts: list[dict], q: int) -> list[list[tuple[str, float]]]:
    out = []
    n = len(parts[0]["hits"][str(q)])
    for i in range(n):
        cands = [tuple(c) for p in parts for c in p["hits"][str(q)][i]]
        out.append(sorted(cands, key=lambda c: (-c[1], c[0]))[:TOP])
    return out


def scorer_summary(parts: list[dict], sketch_bytes: int, bandwidth: float) -> dict:
    """One configuration: per query count the slowest replica's median, its scan rate."""
    res: dict[str, Any] = {"per_queries": {}}
    for q in QUERIES:
        key = str(q)
        if key not in parts[0]["passes"]:
            continue
        t = max(p["passes"][key]["median_s"] for p in parts)
        res["per_queries"][key] = {
            "latency_s": t, "first_pass_s": max(p["passes"]["first"][key] for p in parts),
            "scan_gbps": sketch_bytes / t / 1e9, "vs_read_bandwidth": sketch_bytes / t / bandwidth,
            "store_bytes_read": sum(p["passes"][key]["store_bytes"] for p in parts),
            "disk_bytes_read": sum(p["passes"][key]["disk_read_bytes"] for p in parts)}
    res["peak_rss"] = max(p["peak"]["VmHWM"] for p in parts)
    res["peak_rss_anon"] = max(p["peak"]["RssAnon"] for p in parts)
    res["peak_rss_file"] = max(p["peak"]["RssFile"] for p in parts)
    res["idle_rss"] = max(p["idle"]["VmRSS"] for p in parts)
    return res


# ------------------------------------------------------------------------------- main


def bench_size(n: int, repeats: int, report: dict, s3: dict | None) -> None:
    root = DATA / f"n{n}"
    t0 = time.perf_counter()
    build_index(LocalStore(root), n)
    built_s = time.perf_counter() - t0
    total, sketch = index_bytes(root)
    bw = read_bandwidth(root, repeats)
    gen = Generator()
    qfile = DATA / f"queries-{max(QUERIES)}.bin"
    if not qfile.exists():
        qfile.write_bytes(queryset_to_bytes(gen.queries(max(QUERIES), seed=1)))
    counts = ",".join(map(str, QUERIES))
    entry: dict[str, Any] = {"examples": n, "bytes": total, "sketch_bytes": sketch,
                             "bytes_per_example": total / n, "read_bandwidth_gbps": bw / 1e9,
                             "generate_s": built_s}
    print(f"n={n}: {total / 2**30:.2f} GiB, read {bw / 1e9:.2f} GB/s", flush=True)
    resident = run_scorers(DATA, root.name, qfile, 2 * total, 1, repeats, counts)
    entry["resident"] = scorer_summary(resident, sketch, bw)
    print(" resident", json.dumps(entry["resident"]["per_queries"]), flush=True)
    over = run_scorers(DATA, root.name, qfile, total // 4, 1, max(1, repeats - 1), "1,16")
    entry["over_budget"] = scorer_summary(over, sketch, bw)
    entry["over_budget"]["budget"] = total // 4
    print(" over budget", json.dumps(entry["over_budget"]["per_queries"]), flush=True)
    split = run_scorers(DATA, root.name, qfile, 2 * total, 2, repeats, counts)
    entry["two_replicas"] = scorer_summary(split, sketch, bw)
    entry["two_replicas"]["merged_equals_one"] = all(
        merged(split, q) == merged(resident, q) for q in (1, max(QUERIES)))
    print(" two replicas", json.dumps(entry["two_replicas"]["per_queries"]), flush=True)
    if s3 is not None:
        entry["s3"] = bench_s3(root, qfile, total, sketch, bw, repeats, resident)
    report["sizes"][str(n)] = entry


def bench_s3(root: Path, qfile: Path, total: int, sketch: int, bw: float, repeats: int,
             resident: list[dict]) -> dict:
    # The stack's S3 server, imported only where this part runs.
    from rise.s3store import S3Store
    from rise.stack.procs import stop_all
    from rise.stack.servers import start_s3

    work = Path(tempfile.mkdtemp(prefix="s3-", dir=DATA))
    proc = start_s3(work)
    try:
        env = proc.env
        s3 = {"endpoint": env["RISE_S3_ENDPOINT"], "access": env["RISE_S3_ACCESS_KEY"],
              "secret": env["RISE_S3_SECRET_KEY"], "bucket": env["RISE_S3_BUCKET"]}
        dst = S3Store.from_url(s3["endpoint"], s3["access"], s3["secret"], s3["bucket"],
                               prefix=root.name)
        src = LocalStore(root)
        t0 = time.perf_counter()
        for key in src.list(""):
            dst.put(key, src.get(key))
        upload = time.perf_counter() - t0
        res = {}
        for name, budget in (("resident", 2 * total), ("over_budget", total // 4)):
            parts = run_scorers(DATA, root.name, qfile, budget, 1, max(1, repeats - 1),
                                "1,16", s3=s3)
            res[name] = scorer_summary(parts, sketch, bw)
            res[name]["same_hits_as_folder"] = merged(parts, 1) == merged(resident, 1)
            print(" s3", name, json.dumps(res[name]["per_queries"]), flush=True)
        res["upload_s"] = upload
        return res
    finally:
        stop_all([proc])
        shutil.rmtree(work, ignore_errors=True)


def bench_ann(n: int, report: dict, nq: int, kinds: Sequence[str] = ("ivf-flat", "ivf-pq"),
              reuse: bool = False) -> None:
    # start-up: faiss is the optional extra rise[ann], needed only here
    import faiss

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    root = DATA / f"n{n}"
    store = LocalStore(root)
    index = open_index(store)
    shards: dict[str, Any] = {}

    def load(e: Any) -> Any:  # memory-mapped, as the scorer's cache serves them
        if e.key not in shards:
            shards[e.key] = map_shard(root / e.key)
        return shards[e.key]

    qs = Generator().queries(nq, seed=2)
    spec = ScoreSpec()
    mean = index_mean(index, spec, load)
    one = [_take(qs, i) for i in range(nq)]
    for e in index.manifest.shards:  # warm: the page cache holds the index
        load(e)
    read_bandwidth(root, 1)
    t0 = time.perf_counter()
    exact = [merge_topk([c], TOP) for c in
             score_candidates(index, qs, spec, TOP, load=load, mean=mean)]
    batch_s = (time.perf_counter() - t0) / nq
    single = []
    for i in range(min(5, nq)):
        t0 = time.perf_counter()
        score_candidates(index, one[i], spec, TOP, load=load, mean=mean)
        single.append(time.perf_counter() - t0)
    exact_s = statistics.median(single)
    res: dict[str, Any] = {"examples": n, "queries": nq, "exact_per_query_s": exact_s,
                           "exact_batched_per_query_s": batch_s}
    print(f" exact: {exact_s:.2f} s one query, {batch_s:.3f} s a query in a batch of {nq}",
          flush=True)
    for kind in kinds:
        t0 = time.perf_counter()
        meta = ann.find(store, index, kind) if reuse else None
        if meta is None:
            meta = ann.build(store, index, kind=kind, threads=1, load=load)
        build_s = time.perf_counter() - t0 if not reuse else None
        handle = ann.load_ann(store, index, kind)
        t0 = time.perf_counter()  # the per-mean row terms: one pass, once per pool mean
        approximate_candidates(index, one[0], spec, TOP, mean=mean, nprobe=1, load=load,
                               handle=handle)
        first_s = time.perf_counter() - t0
        runs = []
        for nprobe in (1, 4, 16, 64):  # all lists: the scan's answer (tests/rise/test_ann.py)
            if nprobe > meta.lists:
                continue
            got, times = [], []
            for q in one:
                t0 = time.perf_counter()
                c = approximate_candidates(index, q, spec, TOP, mean=mean, nprobe=nprobe,
                                           load=load, handle=handle)
                times.append(time.perf_counter() - t0)
                got.append(merge_topk(c, TOP))
            per_q = statistics.median(times)
            recall = sum(len({i for i, _ in g} & {i for i, _ in e})
                         for g, e in zip(got, exact, strict=True)) / (TOP * nq)
            same = sum([i for i, _ in g] == [i for i, _ in e]
                       for g, e in zip(got, exact, strict=True)) / nq
            runs.append({"nprobe": nprobe, "per_query_s": per_q, "recall_at_10": recall,
                         "identical_top10": same, "speedup": exact_s / per_q})
            print(f" ann {kind} nprobe={nprobe}: recall {recall:.3f} {per_q:.4f} s/query "
                  f"speed-up {exact_s / per_q:.1f}x", flush=True)
        res[kind] = {"lists": meta.lists, "pq_m": meta.pq_m, "bytes": meta.faiss_bytes,
                     "build_s": build_s, "row_terms_first_query_s": first_s, "runs": runs}
        del handle
    report["ann"] = res


def _take(qs: Any, i: int) -> Any:
    return qs.__class__(ids=qs.ids[i:i + 1], norms=qs.norms[i:i + 1], rh=qs.rh[i:i + 1],
                        gh=qs.gh[i:i + 1])


def write_md(report: dict, out: Path) -> None:
    gib = 2 ** 30
    lines = ["# Scale: how cost grows with the pool", "",
             f"`make bench-scale` (`tests/benchmarks/bench_scale.py`), {report['when']}, "
             f"{report['machine']}.  Synthetic indexes of real shards at the default dims "
             "(random hidden states and residuals of a topic mixture through the real "
             "sketcher and shard writer).  One scoring thread per scorer process, "
             "`torch.set_num_threads(1)`; medians of the repeats; the machine was shared "
             f"(load average at the start {report['load_start']}, at the end "
             f"{report.get('load_end', '?')}).", ""]
    lines += ["## Storage and memory", "",
              "| examples | on disk | per example | scorer budget (over) | peak RSS resident | "
              "of it file-backed | peak RSS over budget | of it anonymous |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, e in report["sizes"].items():
        r, o = e["resident"], e["over_budget"]
        lines.append(f"| {int(n):,} | {e['bytes'] / gib:.2f} GiB | "
                     f"{e['bytes_per_example'] / 1e3:.1f} KB | {o['budget'] / gib:.2f} GiB | "
                     f"{r['peak_rss'] / gib:.2f} GiB | {r['peak_rss_file'] / gib:.2f} GiB | "
                     f"{o['peak_rss'] / gib:.2f} GiB | {o['peak_rss_anon'] / gib:.2f} GiB |")
    lines += ["", "## Query latency (top 10, default scoring)", "",
              "| examples | setting | queries | latency | first pass | scan GB/s | "
              "vs read bandwidth | read from store |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, e in report["sizes"].items():
        settings = [("one scorer, resident", e["resident"]),
                    ("one scorer, budget 1/4 of index", e["over_budget"]),
                    ("two replicas at once", e["two_replicas"])]
        if "s3" in e:
            settings += [("S3, resident", e["s3"]["resident"]),
                         ("S3, budget 1/4 of index", e["s3"]["over_budget"])]
        for name, s in settings:
            for q, v in s["per_queries"].items():
                lines.append(f"| {int(n):,} | {name} | {q} | {v['latency_s']:.3f} s | "
                             f"{v['first_pass_s']:.3f} s | {v['scan_gbps']:.2f} | "
                             f"{v['vs_read_bandwidth']:.2f} | "
                             f"{v['store_bytes_read'] / gib:.2f} GiB |")
        lines.append(f"| {int(n):,} | read bandwidth (plain read) | | | | "
                     f"{e['read_bandwidth_gbps']:.2f} | 1.00 | |")
    for n, e in report["sizes"].items():
        lines.append("")
        lines.append(f"- {int(n):,}: two replicas' merged top 10 equal one scorer's: "
                     f"{e['two_replicas']['merged_equals_one']}" +
                     (f"; S3 hits equal the folder's: "
                      f"{e['s3']['resident']['same_hits_as_folder']}, upload "
                      f"{e['s3']['upload_s']:.0f} s" if "s3" in e else ""))
    if "ann" in report:
        a = report["ann"]
        lines += ["", f"## Approximate search at {a['examples']:,} examples", "",
                  f"Exact scan (`rise.api.score_candidates` over the memory-mapped "
                  f"shards, warm, one thread, default scoring: centered): "
                  f"{a['exact_per_query_s']:.3f} s for one query "
                  f"({a['exact_batched_per_query_s']:.3f} s a query when {a['queries']} "
                  "share one pass).  `rise.ann` per query (median over "
                  f"{a['queries']} queries, one at a time), hits reranked exactly; the "
                  "speed-up is against the one-query scan:", "",
                  "| kind | lists | index size | build | nprobe | per query | speed-up | "
                  "recall@10 | identical top 10 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for kind in [k for k in ("ivf-flat", "ivf-pq") if k in a]:
            k = a[kind]
            built = f"{k['build_s']:.0f} s" if k["build_s"] is not None else "(earlier run)"
            for r in k["runs"]:
                lines.append(f"| {kind} | {k['lists']} | {k['bytes'] / gib:.2f} GiB | "
                             f"{built} | {r['nprobe']} | {r['per_query_s']:.4f} s | "
                             f"{r['speedup']:.1f}x | {r['recall_at_10']:.3f} | "
                             f"{r['identical_top10']:.2f} |")
        lines.append("")
        lines.append("The first approximate query after a change of the pool mean computes the "
                     "per-row terms (one pass over the rows): "
                     + ", ".join(f"{kind} {a[kind]['row_terms_first_query_s']:.1f} s"
                                 for kind in ("ivf-flat", "ivf-pq") if kind in a) + ".")
    lines += ["", "## Not measured here", "", report.get("not_run", ""), ""]
    out.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--merge", type=Path, help="add to this report (scale.json) instead of "
                    "starting a new one")
    ap.add_argument("--s3-size", type=int, default=100_000)
    ap.add_argument("--ann-size", type=int, default=100_000)
    ap.add_argument("--ann-queries", type=int, default=50)
    ap.add_argument("--ann-kinds", nargs="+", default=["ivf-flat", "ivf-pq"])
    ap.add_argument("--ann-reuse", action="store_true",
                    help="search the ANN indexes already built (their build time is not measured)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPORTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for f in ("--root", "--prefix", "--queries", "--cache-dir", "--s3", "--counts"):
        ap.add_argument(f, help=argparse.SUPPRESS)
    for f in ("--budget", "--replica", "--replicas"):
        ap.add_argument(f, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    DATA.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_start": round(os.getloadavg()[0], 1), "sizes": {},
        "not_run": "10^6 examples (24 GiB): `.venv/bin/python tests/benchmarks/bench_scale.py "
                   "--sizes 1000000 --s3-size 0 --ann-size 0`; generating its shards takes "
                   "about two hours on 2 cores."}
    if a.merge:
        old = json.loads(a.merge.read_text())
        report["sizes"] = old["sizes"]
        report["load_start"] = old["load_start"]
        if "ann" in old and not a.ann_size:
            report["ann"] = old["ann"]
    for n in a.sizes:
        bench_size(n, a.repeats, report, {} if n == a.s3_size else None)
    if a.ann_size:
        bench_ann(a.ann_size, report, a.ann_queries, a.ann_kinds, a.ann_reuse)
    report["load_end"] = round(os.getloadavg()[0], 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scale.json").write_text(json.dumps(report, indent=1))
    write_md(report, a.out / "scale.md")


if __name__ == "__main__":
    main()
