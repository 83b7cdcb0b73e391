"""Scan speed of the scorer against the machine's limits, in one run (make bench).

    .venv/bin/python tests/benchmarks/bench_scorer.py [--examples 16384] [--large 32768]
        [--dims 128 64 64] [--shard-size 4096] [--out tests/benchmarks/reports]

Writes real shards (``rise.shard.build_shard``, random float16 unit sketches at the default
dims: 24.6 KB per example) into a local store, then times with ``torch.set_num_threads(1)``
(numpy reads with one thread too), cases interleaved, median of ``--repeats``:

* read bandwidth: a plain streaming read of the same sketch bytes (numpy sum of the
  memory-mapped files viewed as int64), warm in the page cache;
* the scorer's scan (``rise.api.score_candidates`` through ``ShardCache`` in disk mode:
  shards memory-mapped from the node-local cache, both channels, cosine, centered, top 10)
  over a memory-resident index, for 1, 16 and 256 queries; and a bare float32 matrix
  product of the same shape on a preloaded float32 copy (the compute limit);
* the same scan over a larger index with the cache budget set to a quarter of it, so that
  every pass evicts and fetches again (download, sha256, atomic write, map);
* copies of the memory-resident index's files dropped from the page cache before each
  pass (``posix_fadvise(DONTNEED)``) and mapped afresh (what a scan of an index larger
  than RAM reads: the disk), beside the plain read of the same cold bytes.

Rates are GB/s of stored sketch bytes; ratios are times of the same bytes.  Reports:
``scorer.json`` and ``scorer.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rise.api import score_candidates
from rise.featurize import Features
from rise.manifest import ShardEntry
from rise.score import QuerySet, ScoreSpec, pool_mean, scan_dots, stored_unit
from rise.scorer.cache import ShardCache
from rise.shard import build_shard, map_shard, sha256
from rise.store import LocalStore

QUERIES = (1, 16, 256)
REPORTS = Path(__file__).resolve().parent / "reports"


def make_index(root: Path, n: int, shard_size: int, dims: tuple[int, int, int], seed: int
               ) -> tuple[LocalStore, list[ShardEntry]]:
    kr, kh, kg = dims
    store = LocalStore(root)
    g = torch.Generator().manual_seed(seed)
    entries = []
    for s, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        feats = Features(token_counts=torch.full((m,), 100, dtype=torch.int64),
                         rh=torch.randn(m, kr * kh, generator=g, dtype=torch.float32).double(),
                         gh=torch.randn(m, kg * kh, generator=g, dtype=torch.float32).double())
        ids = [f"ex-{start + i:09d}" for i in range(m)]
        data = build_shard({"kind": "bench", "shard": s}, ids, [1] * m,
                           list(range(start, start + m)), feats, "float16")
        key = f"shards/g00000001/shard-{s:06d}.safetensors"
        store.put(key, data)
        entries.append(ShardEntry(key=key, generation=1, shard=s, count=m,
                                  sha256=sha256(data), bytes=len(data)))
        del feats, data
    return store, entries


def queries(q: int, dims: tuple[int, int, int], seed: int) -> QuerySet:
    kr, kh, kg = dims
    g = torch.Generator().manual_seed(seed)

    def unit(d: int) -> torch.Tensor:
        x = torch.randn(q, d, generator=g, dtype=torch.float64)
        return stored_unit((x / x.norm(dim=1, keepdim=True)).to(torch.float16))

    return QuerySet(ids=[f"q{i}" for i in range(q)], norms=torch.ones(q, 2, dtype=torch.float64),
                    rh=unit(kr * kh), gh=unit(kg * kh))


def sketch_views(cache: ShardCache, prefix: str, entries: list[ShardEntry]) -> list[np.ndarray]:
    """The memory-mapped sketch bytes of every shard, as the scan reads them."""
    out = []
    for e in entries:
        sd = cache.load(prefix, e)
        for t in (sd.rh, sd.gh):
            assert t is not None
            out.append(t.numpy().view(np.int64))
    return out


def drop_page_cache(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    if before is not None:
        before()
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=16384)
    ap.add_argument("--large", type=int, default=32768)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--dims", type=int, nargs=3, default=(128, 64, 64))
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(REPORTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    dims = tuple(args.dims)
    d = dims[0] * dims[1] + dims[2] * dims[1]
    work = Path(args.work or tempfile.mkdtemp(prefix="rise-bench-scorer-"))
    prefix = "bench/"
    try:
        t0 = time.perf_counter()
        small_store, small = make_index(work / "small", args.examples, args.shard_size, dims, 0)
        large_store, large = make_index(work / "large", args.large, args.shard_size, dims, 1)
        small_bytes = args.examples * d * 2
        large_bytes = args.large * d * 2
        built = time.perf_counter() - t0
        resident = ShardCache(lambda p: small_store, 1 << 40, directory=work / "cache-small")
        budget = sum(e.bytes for e in large) // 4
        evicting = ShardCache(lambda p: large_store, budget, directory=work / "cache-large")
        views = sketch_views(resident, prefix, small)
        spec = ScoreSpec(center=True)
        mean_small = pool_mean((resident.load(prefix, e) for e in small), frozenset())
        mean_large = pool_mean((evicting.load(prefix, e, keep=False) for e in large), frozenset())
        index_small = SimpleNamespace(manifest=SimpleNamespace(model=SimpleNamespace(vocab=1)),
                                      tombstones=frozenset())
        x32 = torch.randn(args.shard_size, d, dtype=torch.float32)  # one shard, float32
        assert resident.directory is not None

        def read_all() -> None:
            for v in views:
                v.sum()

        # Cold copies of the same shard files, opened afresh for each pass (pages still
        # mapped by a process are not dropped from the page cache).
        cold_dir = work / "cold"
        cold_dir.mkdir()
        cold_paths = {}
        for e in small:
            cold_paths[e.key] = str(cold_dir / f"{e.sha256}.safetensors")
            shutil.copyfile(os.path.join(resident.directory, f"{e.sha256}.safetensors"),
                            cold_paths[e.key])

        def cold() -> None:
            gc.collect()
            drop_page_cache(str(cold_dir))

        def read_cold() -> None:
            for e in small:
                sd = map_shard(cold_paths[e.key])
                for t in (sd.rh, sd.gh):
                    assert t is not None
                    t.numpy().view(np.int64).sum()

        cases: list[tuple[str, int, float, Callable[[], object], Callable[[], object] | None]] = [
            ("read: numpy sum over the mapped sketches", 0, small_bytes, read_all, None),
            ("read, cold (page cache dropped)", 0, small_bytes, read_cold, cold),
        ]
        for q in QUERIES:
            qs = queries(q, dims, seed=q)
            q32 = torch.cat([qs.rh, qs.gh], 1).float()
            shards = len(small)

            def scan(qs=qs) -> None:
                score_candidates(index_small, qs, spec, args.top, entries=small,
                                 load=resident.loader(prefix), mean=mean_small)

            def scan_large(qs=qs) -> None:
                score_candidates(index_small, qs, spec, args.top, entries=large,
                                 load=evicting.loader(prefix), mean=mean_large)

            def scan_cold(qs=qs) -> None:
                score_candidates(index_small, qs, spec, args.top, entries=small,
                                 load=lambda e: map_shard(cold_paths[e.key]), mean=mean_small)

            def kernel(qs=qs) -> None:
                for e in small:
                    sd = resident.load(prefix, e)
                    scan_dots(sd.rh, torch.cat([qs.rh, mean_small.rh[None, :]]))
                    scan_dots(sd.gh, torch.cat([qs.gh, mean_small.gh[None, :]]))

            def gemm(q32=q32, shards=shards) -> None:
                for _ in range(shards):
                    q32 @ x32.T

            cases += [
                ("bare float32 GEMM, same shape (preloaded)", q, small_bytes, gemm, None),
                ("kernel only (rise.score.scan_dots), resident", q, small_bytes, kernel, None),
                ("scan, memory-resident index", q, small_bytes, scan, None),
                ("scan, index 4x the cache budget", q, large_bytes, scan_large, None),
                ("scan, cold files (page cache dropped)", q, small_bytes, scan_cold, cold),
            ]
        times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
        for _ in range(args.repeats):
            for i, (_, _, _, fn, before) in enumerate(cases):
                times[i].append(timed(fn, before))
        rows = []
        for i, (name, q, nbytes, _, _) in enumerate(cases):
            t = statistics.median(times[i])
            rows.append({"case": name, "queries": q, "seconds": t, "bytes": nbytes,
                         "gb_per_s": nbytes / t / 1e9})
        rate = {(r["case"], r["queries"]): r["gb_per_s"] for r in rows}
        read = rate[("read: numpy sum over the mapped sketches", 0)]
        read_cold = rate[("read, cold (page cache dropped)", 0)]
        ratios = {}
        for q in QUERIES:
            ratios[q] = {
                "scan / read bandwidth": rate[("scan, memory-resident index", q)] / read,
                "scan / bare GEMM": rate[("scan, memory-resident index", q)]
                / rate[("bare float32 GEMM, same shape (preloaded)", q)],
                "kernel / read bandwidth":
                    rate[("kernel only (rise.score.scan_dots), resident", q)] / read,
                "over-budget scan / read bandwidth":
                    rate[("scan, index 4x the cache budget", q)] / read,
                "cold scan / cold read": rate[("scan, cold files (page cache dropped)", q)]
                / read_cold,
            }
        report = {
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "torch": torch.__version__,
                        "numpy": np.__version__, "threads": 1,
                        "load_average_at_end": os.getloadavg()},
            "index": {"dims": dims, "values_per_example": d, "examples": args.examples,
                      "sketch_bytes": small_bytes, "large_examples": args.large,
                      "large_sketch_bytes": large_bytes, "cache_budget_large": budget,
                      "shard_size": args.shard_size, "built_seconds": built},
            "repeats": args.repeats, "rows": rows,
            "ratios": {str(q): r for q, r in ratios.items()},
        }
        write_report(Path(args.out), report)
        resident.close()
        evicting.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scorer.json").write_text(json.dumps(report, indent=1) + "\n")
    ix, m = report["index"], report["machine"]
    lines = [
        "# Scorer scan speed against the machine's limits",
        "",
        "`make bench` (`tests/benchmarks/bench_scorer.py`); one thread for numpy and torch, "
        f"cases interleaved, median of {report['repeats']}.  {m['cores']} cores shared with "
        f"other work (load average at the end {m['load_average_at_end'][0]:.2f}); "
        f"torch {m['torch']}, numpy {m['numpy']}.",
        "",
        f"Index: {ix['examples']} examples at dims {tuple(ix['dims'])} ({ix['values_per_example']} "
        f"float16 values, {ix['values_per_example'] * 2 / 1000:.1f} KB each): "
        f"{ix['sketch_bytes'] / 1e9:.2f} GB of sketches in shards of {ix['shard_size']}, "
        "memory-mapped from the scorer's cache folder.  Over-budget index: "
        f"{ix['large_examples']} examples ({ix['large_sketch_bytes'] / 1e9:.2f} GB) with a cache "
        f"budget of {ix['cache_budget_large'] / 1e9:.2f} GB, so every pass evicts and fetches "
        "again (read from the store, sha256, atomic write, map).  The scan is "
        "`rise.api.score_candidates`: both channels, cosine, centered, top 10.",
        "",
        "| case | queries | s | GB/s of sketches |",
        "|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        q = r["queries"] or "-"
        lines.append(f"| {r['case']} | {q} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} |")
    lines += ["", "| queries | scan / read bandwidth | kernel / read bandwidth | scan / bare GEMM "
              "| over-budget scan / read bandwidth | cold scan / cold read |",
              "|---:|---:|---:|---:|---:|---:|"]
    for q, r in report["ratios"].items():
        lines.append(f"| {q} | {r['scan / read bandwidth']:.2f} | "
                     f"{r.get('kernel / read bandwidth', float('nan')):.2f} | "
                     f"{r['scan / bare GEMM']:.2f} | "
                     f"{r['over-budget scan / read bandwidth']:.2f} | "
                     f"{r['cold scan / cold read']:.2f} |")
    lines += ["", "Goals: one query at >= 0.50 of the read bandwidth; many queries at the "
              "speed of a bare GEMM of the same shape (ratio near 1).", "",
              "Reading it: the scan widens each block of float16 rows to float32 (torch's "
              "copy, one core) before the matrix product, so one query is bound by that "
              "widening, not by memory (the kernel row: the scan without top-k and "
              "centering); a kernel that multiplies float16 directly (this CPU has no "
              "AVX512-FP16) is what would reach the goal.  Many queries are compute-bound "
              "and run near a bare GEMM.  The over-budget index pays a fetch per shard per "
              "pass (read from the store, sha256, write, map) and cold files pay the disk: "
              "both are bound by the store and the disk, not by the scan.  Loaded runs "
              "(load average above 2 on 2 cores) lower every rate; the ratios are of cases "
              "interleaved in the same run.", ""]
    (out / "scorer.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--rewrite-md"]:  # the markdown again from a report's json
        out = Path(sys.argv[2])
        write_report(out, json.loads((out / "scorer.json").read_text()))
    else:
        main()
