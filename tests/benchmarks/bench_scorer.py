"""Scan throughput of the scorer's core, one core, side by side with plain matrix products.

    .venv/bin/python tests/benchmarks/bench_scorer.py [--examples 32768] [--shard-size 4096]

Builds random float16 unit sketches (dims 64x32x32 unless --dims: 3072 values, 6 KiB per
example) in real shard bytes (``rise.shard.build_shard``), parses them as the scorer's
cache holds them, and times with ``torch.set_num_threads(1)``, median of 3:

* ``rise.api.score_candidates`` (both channels, cosine; and centered), 1 and 16 queries,
  on float16 shards (whose float64 unit rows are derived once per load, as the
  scorer's cache keeps them), and on shards stored as float64 for comparison;
* ``q @ X.T`` on a preloaded float32 X of the same sketches (the floor of a float32 scan);
* ``q @ X.T`` on preloaded float64 shards (the scorer's arithmetic, conversion excluded);
* float16 -> float64 unit rows per shard (``stored_unit``), then ``q @ X.T`` (the
  scorer's arithmetic, conversion included, no top-k);
* a cache miss's CPU work: sha256 + ``parse_shard`` of the shard bytes.

Throughput is in GB/s of stored sketches (float16 bytes) per core for every row, so the
ratios are ratios of time.  Cases are interleaved (each repeat runs them all) so that load
from other processes hits every case alike.  Memory: about 2 GB at the default size (the
sketches in float16, float32 and float64).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from rise.api import score_candidates
from rise.featurize import Features
from rise.index import Index
from rise.score import QuerySet, ScoreSpec, pool_mean, stored_unit
from rise.shard import ShardData, build_shard, parse_shard, sha256


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_shards(n: int, shard_size: int, dims: tuple[int, int, int], seed: int
                ) -> tuple[list[dict], dict[str, bytes]]:
    kr, kh, kg = dims
    g = torch.Generator().manual_seed(seed)
    entries, blobs = [], {}
    for s, start in enumerate(range(0, n, shard_size)):
        m = min(shard_size, n - start)
        feats = Features(token_counts=torch.full((m,), 100, dtype=torch.int64),
                         rh=torch.randn(m, kr * kh, generator=g, dtype=torch.float64),
                         gh=torch.randn(m, kg * kh, generator=g, dtype=torch.float64))
        ids = [f"ex-{start + i:09d}" for i in range(m)]
        data = build_shard({"kind": "bench", "shard": s}, ids, [1] * m,
                           list(range(start, start + m)), feats, "float16")
        key = f"shards/g00000001/shard-{s:06d}.safetensors"
        blobs[key] = data
        entries.append({"key": key, "generation": 1, "shard": s, "count": m,
                        "sha256": sha256(data), "bytes": len(data)})
    return entries, blobs


def queries(q: int, dims: tuple[int, int, int], seed: int) -> QuerySet:
    kr, kh, kg = dims
    g = torch.Generator().manual_seed(seed)

    def unit(d: int) -> torch.Tensor:
        x = torch.randn(q, d, generator=g, dtype=torch.float64)
        return stored_unit((x / x.norm(dim=1, keepdim=True)).to(torch.float16))

    return QuerySet(ids=[f"q{i}" for i in range(q)],
                    norms=torch.ones(q, 2, dtype=torch.float64),
                    rh=unit(kr * kh), gh=unit(kg * kh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=8 * 4096)
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--dims", type=int, nargs=3, default=(64, 32, 32))
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dims = tuple(args.dims)
    n, d = args.examples, dims[0] * dims[1] + dims[2] * dims[1]

    t0 = time.perf_counter()
    entries, blobs = make_shards(n, args.shard_size, dims, seed=0)
    shards: dict[str, ShardData] = {k: parse_shard(v) for k, v in blobs.items()}
    sketch_bytes = sum(sd.rh.nbytes + sd.gh.nbytes for sd in shards.values())
    stored_bytes = sum(len(v) for v in blobs.values())
    print(f"{n} examples x {d} float16 values ({sketch_bytes / 1e9:.3f} GB of sketches, "
          f"{stored_bytes / 1e9:.3f} GB of shard bytes) in {len(entries)} shards of "
          f"{args.shard_size}; built in {time.perf_counter() - t0:.1f} s; torch "
          f"{torch.__version__}, 1 thread, median of {args.repeats}")

    def miss() -> None:
        for e in entries:
            data = blobs[e["key"]]
            assert sha256(data) == e["sha256"]
            parse_shard(data)

    t_miss = median_time(miss, args.repeats)
    blobs = {}  # drop the serialised copies; the parsed shards stay
    gc.collect()

    manifest = {"model": {"vocab": 1}, "tombstones": [], "shards": entries}
    index = Index(store=None, manifest=manifest)  # type: ignore[arg-type] - never read
    load = lambda e: shards[e["key"]]  # noqa: E731 - the cache's hit path
    # The same sketches stored as float64 (same scores): a comparison point.
    wide = {k: ShardData(meta=sd.meta, ids=sd.ids, ingest=sd.ingest, record=sd.record,
                         token_count=sd.token_count, norms=sd.norms, rh=sd.rh.double(),
                         gh=sd.gh.double(), rh_sum=sd.rh_sum, gh_sum=sd.gh_sum)
            for k, sd in shards.items()}
    load_wide = lambda e: wide[e["key"]]  # noqa: E731
    # The same sketches as one preloaded float32 matrix (both channels side by side).
    x32 = torch.cat([torch.cat([shards[e["key"]].rh, shards[e["key"]].gh], 1).float()
                     for e in entries])
    spec, centered = ScoreSpec(), ScoreSpec(center=True)
    mean = pool_mean(shards.values(), set())

    cases: list[tuple[str, int, Callable[[], object]]] = []
    for q in (1, 16):
        qs = queries(q, dims, seed=q)
        q32 = torch.cat([qs.rh, qs.gh], 1).float()
        assert score_candidates(index, qs, spec, args.top, load=load_wide) == \
            score_candidates(index, qs, spec, args.top, load=load)

        def f64_preloaded(qs=qs) -> None:
            for sd in wide.values():
                qs.rh @ sd.rh.T
                qs.gh @ sd.gh.T

        def f16_to_f64(qs=qs) -> None:
            for sd in shards.values():
                qs.rh @ stored_unit(sd.rh).T
                qs.gh @ stored_unit(sd.gh).T

        cases += [
            ("plain q @ X.T, float32 X preloaded", q, lambda q32=q32: q32 @ x32.T),
            ("plain q @ X.T, float64 X preloaded", q, f64_preloaded),
            ("float16 -> float64 unit rows + q @ X.T", q, f16_to_f64),
            ("rise.api.score_candidates, cosine", q,
             lambda qs=qs: score_candidates(index, qs, spec, args.top, load=load)),
            ("score_candidates, cosine, float64 cache", q,
             lambda qs=qs: score_candidates(index, qs, spec, args.top, load=load_wide)),
            ("rise.api.score_candidates, centered", q,
             lambda qs=qs: score_candidates(index, qs, centered, args.top, load=load,
                                            mean=mean)),
        ]

    # Interleaved: every repeat runs every case, so load from other processes hits all.
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for _ in range(args.repeats):
        for i, (_, _, fn) in enumerate(cases):
            times[i].append(median_time(fn, 1))
    base = {q: statistics.median(times[i]) for i, (name, q, _) in enumerate(cases)
            if name.startswith("plain q @ X.T, float32")}
    print()
    print(f"| {'case':<42} | queries | {'ms':>9} | sketch GB/s/core | x float32 matmul time |")
    print(f"|{'-' * 44}|---------|{'-' * 11}|------------------|-----------------------|")
    for i, (name, q, _) in enumerate(cases):
        t = statistics.median(times[i])
        print(f"| {name:<42} | {q:>7} | {t * 1e3:>9.1f} | {sketch_bytes / t / 1e9:>16.2f} | "
              f"{t / base[q]:>21.1f} |")
    print(f"| {'cache miss: sha256 + parse_shard':<42} | {'-':>7} | {t_miss * 1e3:>9.1f} | "
          f"{sketch_bytes / t_miss / 1e9:>16.2f} | {'':>21} |")


if __name__ == "__main__":
    main()
