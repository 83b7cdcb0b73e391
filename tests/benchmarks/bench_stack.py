"""Stack benchmark: the platform (gRPC gateway -> Celery worker -> S3 -> scorer) against
the embedded CLI on the same data and configuration, side by side in one run.

Run from the repository root::

    python tests/benchmarks/bench_stack.py [--quick] [--out tests/benchmarks/reports]

Brings the local stack up in a temporary folder (``rise.stack``: Redis,
SeaweedFS S3, gateway, one Celery worker of pool ``smollm2`` with concurrency 1 on the
CPU, one scorer), and always brings it down again.  Measures:

1. **Index job throughput.**  The first N lee docs (64; ``--quick`` 16) as JSONL in the
   stack's bucket under ``tenants/bench/``; CreateIndex over gRPC (max_length 64, shard
   size 16, the pool's batch size 8) timed from the call to the job's ``finished_at``
   (SUCCEEDED); against ``rise index`` (same model, data, config, shard size, batch) in a
   subprocess, timing the whole command.  A first (cold) stack job pays the worker's model
   load; then 2 rounds (``--quick`` 1) of one warm stack job and one CLI run, the order
   alternating, medians reported.
2. **Latency through the gateway.**  On the built index: 200 sequential Attribute calls
   (``--quick`` 40), one lee-queries text each, top 10, after 5 warm-up calls; and 50
   Value calls (``--quick`` 10) with the 5 lee-queries as targets.  Every other call
   (``--embedded-every``) is followed by the embedded equivalent in this process
   (``rise.api.sketch_queries`` then ``rise.api.attribute_sketched`` / ``value_sketched``
   on a LocalStore copy of the index, with a model loaded here once).  The stack's time is
   split with the services' Prometheus histograms over the same calls (gateway RPC, worker
   query-sketch task, scorer RPC) into sketching, scoring and transport/queueing.
3. **Correctness.**  The stack's Attribute answer for the 5 lee-queries (one call) equals
   ``rise attribute`` on the CLI-built index (ids equal, scores within 1e-6); also the
   one-query calls, the Value answer (vs ``value_sketched`` on the CLI index), and the
   shard bytes of both indexes.

Torch threads are fixed for every model-running process (``--threads``, default 1, passed
as OMP_NUM_THREADS to the worker and the CLI).  Markdown on stdout, progress on stderr,
``OUT/stack.json`` and ``OUT/stack.md`` written.  Exit status 1 if a correctness check
fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rise.stack import Stack, minio_client

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / ".cache/models/smollm2-135m-instruct"
LEE = REPO / ".cache/corpus/lee.jsonl"
LEE_QUERIES = REPO / ".cache/corpus/lee-queries.jsonl"
POOL = "smollm2"
TENANT = "bench"
MAX_LENGTH, SHARD_SIZE, BATCH = 64, 16, 8
TOP = 10
TOL = 1e-6
WARMUP_CALLS = 5

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ stamp


def stamp(threads: int) -> dict[str, Any]:
    import celery
    import grpc
    import rise
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "commit": commit or "unknown",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rise": rise.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "celery": celery.__version__, "grpcio": grpc.__version__,
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "model": MODEL.name,
    }


# ------------------------------------------------------------------------------ helpers


def pct(xs: list[float], p: float) -> float:
    """Percentile with linear interpolation (p in [0, 100])."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(xs: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "mean": round(statistics.fmean(ms), 2), "p50": round(pct(ms, 50), 2),
            "p90": round(pct(ms, 90), 2), "p99": round(pct(ms, 99), 2),
            "max": round(max(ms), 2)}


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of live processes (children not counted)."""
    total = 0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()
        total += int(f[11]) + int(f[12])
    return total / _TICK


def stack_cpu(stack) -> dict[str, float]:
    return {p.name: cpu_seconds(p.members()) for p in stack.procs}


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b.get(k, 0.0) - a.get(k, 0.0), 2) for k in a}


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(name, labels): value} (samples only)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = []
        for item in labels.rstrip("}").split(","):
            if "=" in item:
                k, v = item.split("=", 1)
                pairs.append((k.strip(), v.strip().strip('"')))
        try:
            out[(name, frozenset(pairs))] = float(value)
        except ValueError:
            pass
    return out


def hist(samples: dict, name: str, **labels: str) -> tuple[float, float]:
    """(sum, count) of a histogram's series with these labels."""
    want = set(labels.items())
    s = sum(v for (n, ls), v in samples.items() if n == f"{name}_sum" and want <= ls)
    c = sum(v for (n, ls), v in samples.items() if n == f"{name}_count" and want <= ls)
    return s, c


class Metrics:
    """Before/after snapshots of the stack's /metrics endpoints."""

    def __init__(self, stack) -> None:
        self.urls = stack.endpoints["metrics"]

    def snap(self) -> dict[str, dict]:
        return {k: scrape(u) for k, u in self.urls.items()}

    @staticmethod
    def mean_ms(a: dict, b: dict, endpoint: str, name: str, **labels: str) -> dict[str, float]:
        s0, c0 = hist(a[endpoint], name, **labels)
        s1, c1 = hist(b[endpoint], name, **labels)
        n = c1 - c0
        return {"count": int(n), "mean_ms": round((s1 - s0) / n * 1000, 2) if n else float("nan")}


def write_jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))


def compare_hits(a: list[tuple[str, list[tuple[str, float]]]],
                 b: list[tuple[str, list[tuple[str, float]]]]) -> dict[str, Any]:
    """Same query ids, same hit ids in the same order, scores within TOL."""
    ok = len(a) == len(b)
    max_diff, mismatches = 0.0, []
    for (qa, ha), (qb, hb) in zip(a, b, strict=False):
        ids_a, ids_b = [i for i, _ in ha], [i for i, _ in hb]
        if qa != qb or ids_a != ids_b:
            ok = False
            mismatches.append({"query": qa, "a": ids_a, "b": ids_b})
        for (_, sa), (_, sb) in zip(ha, hb, strict=False):
            max_diff = max(max_diff, abs(sa - sb))
    return {"ok": ok and max_diff <= TOL, "ids_equal": ok, "max_abs_score_diff": max_diff,
            "mismatches": mismatches[:5]}


def compare_values(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> dict[str, Any]:
    ids_equal = [i for i, _ in a] == [i for i, _ in b]
    da, db = dict(a), dict(b)
    max_diff = max((abs(da[k] - db[k]) for k in da.keys() & db.keys()), default=float("inf"))
    return {"ok": ids_equal and da.keys() == db.keys() and max_diff <= TOL,
            "ids_equal": ids_equal, "max_abs_score_diff": max_diff, "examples": len(a)}


# ------------------------------------------------------------------------------ part 1


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.a = args
        self.tmp = tmp
        self.stack = None
        self.client = None
        self.token = secrets.token_urlsafe(24)
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("RISE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        exe = Path(sys.executable).parent / "rise"
        self.rise = [str(exe)] if exe.is_file() else [sys.executable, "-m", "rise.cli"]

    # ---------------------------------------------------------------- stack

    def up(self) -> None:
        # The services inherit this process's environment (less RISE_*): fix their threads.
        os.environ.update({k: self.env[k] for k in
                           ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE",
                            "TRANSFORMERS_OFFLINE")})
        t = time.perf_counter()
        self.stack = Stack.up(
            self.tmp / "stack", pools={POOL: str(MODEL)}, tokens={TENANT: self.token},
            gateway_port="auto", scorer_port="auto", metrics_port="auto",
            die_with_parent=True, log=log)
        self.up_s = time.perf_counter() - t
        from rise.client import RiseClient
        from rise.settings import Pool

        self.client = RiseClient(self.stack.endpoints["gateway"], self.token, timeout=300)
        pools = json.loads(self.stack.proc("gateway").env["RISE_POOLS"])
        self.pool = Pool(**pools[POOL])
        if self.pool.batch_size != BATCH or self.pool.gpus != 0:
            raise RuntimeError(f"pool {POOL} has batch_size {self.pool.batch_size}, gpus "
                               f"{self.pool.gpus}; this benchmark needs {BATCH} and 0")
        log(f"stack up in {self.up_s:.1f} s: gateway {self.stack.endpoints['gateway']}")

    def upload(self, data: Path) -> str:
        s3 = self.stack.s3
        client = minio_client(s3["endpoint"], s3["access_key"], s3["secret_key"])
        key = f"tenants/{TENANT}/data/{data.name}"
        client.fput_object(s3["bucket"], key, str(data), content_type="application/x-ndjson")
        return f"s3://{s3['bucket']}/{key}"

    def stack_job(self, name: str, uri: str) -> dict[str, Any]:
        from rise.client import state_name

        cpu0 = stack_cpu(self.stack)
        t_wall = time.time()
        t0 = time.perf_counter()
        job = self.client.create_index(name, uri, POOL, shard_size=SHARD_SIZE,
                                       config={"max_length": MAX_LENGTH})
        t_ret = time.perf_counter() - t0
        job = self.client.wait(job.id, timeout=self.a.job_timeout, interval=0.2)
        observed = time.perf_counter() - t0
        cpu = cpu_delta(cpu0, stack_cpu(self.stack))
        if state_name(job) != "SUCCEEDED":
            raise RuntimeError(f"stack job {name} ended {state_name(job)}: "
                               f"{job.error_code} {job.error_message}")
        seconds = job.finished_at - t_wall
        r = {"index": name, "seconds": round(seconds, 3), "observed_s": round(observed, 3),
             "create_call_s": round(t_ret, 3),
             "queued_and_plan_s": round(job.started_at - job.created_at, 3),
             "shards_s": round(job.finished_at - job.started_at, 3),
             "examples": job.examples_done, "tokens": job.tokens_done,
             "shards": job.shards_total, "cpu_s": cpu,
             "worker_cpu_share": round(cpu[f"worker-{POOL}"] / seconds, 2)}
        r["examples_per_s"] = round(r["examples"] / seconds, 2)
        r["tokens_per_s"] = round(r["tokens"] / seconds, 1)
        log(f"stack job {name}: {seconds:.2f} s ({r['examples_per_s']} ex/s, "
            f"{r['tokens_per_s']} tok/s; plan phase {r['queued_and_plan_s']:.2f} s)")
        return r

    def cli_job(self, out: Path, data: Path) -> dict[str, Any]:
        argv = [*self.rise, "index", "--model", str(MODEL), "--data", str(data),
                "--out", str(out), "--max-length", str(MAX_LENGTH),
                "--shard-size", str(SHARD_SIZE), "--batch-size", str(BATCH), "--json"]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                           timeout=self.a.job_timeout)
        seconds = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise RuntimeError(f"rise index failed ({p.returncode}): {p.stderr[-2000:]}")
        s = json.loads(p.stdout.strip().splitlines()[-1])
        cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        r = {"index": str(out), "seconds": round(seconds, 3),
             "index_phase_s": s["seconds"], "examples": s["records"], "tokens": s["tokens"],
             "shards": s["shards_written"], "config": s["config"], "cpu_s": round(cpu, 2),
             "cpu_share": round(cpu / seconds, 2)}
        r["examples_per_s"] = round(r["examples"] / seconds, 2)
        r["tokens_per_s"] = round(r["tokens"] / seconds, 1)
        log(f"rise index: {seconds:.2f} s ({r['examples_per_s']} ex/s, {r['tokens_per_s']} "
            f"tok/s; its index phase {s['seconds']:.2f} s)")
        return r

    def part1(self, data: Path, uri: str) -> dict[str, Any]:
        log("part 1: cold stack job (the worker loads the model)")
        m0 = scrape(self.stack.endpoints["metrics"][f"worker-{POOL}"])
        cold = self.stack_job("bench-cold", uri)
        m1 = scrape(self.stack.endpoints["metrics"][f"worker-{POOL}"])
        s0, c0 = hist(m0, "rise_model_load_seconds")
        s1, c1 = hist(m1, "rise_model_load_seconds")
        cold["model_load_s"] = round(s1 - s0, 2) if c1 > c0 else 0.0
        stack_runs, cli_runs = [], []
        for r in range(self.a.rounds):
            order = ["stack", "cli"] if r % 2 == 0 else ["cli", "stack"]
            log(f"round {r + 1}/{self.a.rounds}: {' then '.join(order)}")
            for what in order:
                if what == "stack":
                    stack_runs.append(self.stack_job(f"bench-r{r}", uri))
                else:
                    cli_runs.append(self.cli_job(self.tmp / f"cli-r{r}", data))
        self.stack_index = stack_runs[-1]["index"]
        self.cli_index = Path(cli_runs[-1]["index"])

        def med(runs: list[dict], key: str) -> float:
            return statistics.median(x[key] for x in runs)

        warm = {k: med(stack_runs, k) for k in
                ("seconds", "examples_per_s", "tokens_per_s", "queued_and_plan_s", "shards_s")}
        cli = {k: med(cli_runs, k) for k in
               ("seconds", "examples_per_s", "tokens_per_s", "index_phase_s")}
        n, tokens = cli_runs[0]["examples"], cli_runs[0]["tokens"]
        cli["index_phase_examples_per_s"] = round(n / cli["index_phase_s"], 2)
        cli["index_phase_tokens_per_s"] = round(tokens / cli["index_phase_s"], 1)
        same_work = all(x["examples"] == n and x["tokens"] == tokens
                        for x in [cold, *stack_runs, *cli_runs])
        return {
            "docs": n, "tokens": tokens, "same_examples_and_tokens": same_work,
            "cold": cold, "warm_runs": stack_runs, "cli_runs": cli_runs,
            "warm_median": warm, "cli_median": cli,
            "ratio_warm_over_cli_throughput": round(
                warm["examples_per_s"] / cli["examples_per_s"], 3),
            "ratio_cold_over_cli_throughput": round(
                cold["examples_per_s"] / cli["examples_per_s"], 3),
            "ratio_warm_over_cli_index_phase": round(
                warm["examples_per_s"] / cli["index_phase_examples_per_s"], 3),
        }

    # ---------------------------------------------------------------- part 2

    def copy_index(self, name: str, dest: Path):
        from rise.index import open_index
        from rise.jobs import index_prefix
        from rise.s3store import S3Store
        from rise.store import LocalStore

        s3 = self.stack.s3
        src = S3Store.from_url(s3["endpoint"], s3["access_key"], s3["secret_key"],
                               s3["bucket"], prefix=index_prefix(TENANT, name))
        dst = LocalStore(dest)
        keys = src.list("")
        for k in keys:
            dst.put(k, src.get(k))
        return open_index(dst), keys

    def part2(self, queries: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        from rise import api
        from rise.data import FieldMap, records_from_dicts
        from rise.model import load_model
        from rise.score import ScoreSpec

        torch.set_num_threads(self.a.threads)
        log("part 2: loading the model in this process (embedded path)")
        t = time.perf_counter()
        lm = load_model(str(MODEL), dtype="float32", device_map=None)
        load_s = time.perf_counter() - t
        index, _ = self.copy_index(self.stack_index, self.tmp / "copy")
        fields, spec = FieldMap(), ScoreSpec()
        name = self.stack_index
        targets = [{"id": q["id"], "text": q["text"]} for q in queries]
        target_recs = records_from_dicts(targets, fields)
        # Embedded shards preloaded once (as the scorer's cache holds them) for the
        # pure-compute line; attribute_sketched itself reads them from disk each call.
        cached = {e.key: index.shard(e) for e in index.manifest.shards}

        def emb_attr(rec) -> tuple[float, float, float, Any]:
            t0 = time.perf_counter()
            qs = api.sketch_queries(index, lm, [rec], fields, batch_size=BATCH)
            t1 = time.perf_counter()
            hits = api.attribute_sketched(index, qs, spec, TOP)
            t2 = time.perf_counter()
            api.score_candidates(index, qs, spec, TOP, load=lambda e: cached[e["key"]])
            t3 = time.perf_counter()
            return t1 - t0, t2 - t1, t3 - t2, hits

        def emb_value(recs) -> tuple[float, float, float, Any]:
            t0 = time.perf_counter()
            qs = api.sketch_queries(index, lm, recs, fields, batch_size=BATCH)
            t1 = time.perf_counter()
            vals = api.value_sketched(index, qs, spec)
            t2 = time.perf_counter()
            api.value_candidates(index, qs, spec, load=lambda e: cached[e["key"]])
            t3 = time.perf_counter()
            return t1 - t0, t2 - t1, t3 - t2, vals

        mx = Metrics(self.stack)
        out: dict[str, Any] = {"embedded_model_load_s": round(load_s, 2)}

        # ---- Attribute
        log(f"warm-up: {WARMUP_CALLS} Attribute calls, {WARMUP_CALLS} embedded")
        for i in range(WARMUP_CALLS):
            q = queries[i % len(queries)]
            self.client.attribute(name, [{"id": q["id"], "text": q["text"]}], top=TOP)
            emb_attr(records_from_dicts([q], fields)[0])
        n = self.a.attribute_calls
        log(f"{n} Attribute calls (1 query, top {TOP}); the embedded path after every "
            f"{self.a.embedded_every}")
        stack_t, e_sk, e_sc, e_sc_cached = [], [], [], []
        single: dict[str, list] = {}
        emb_single: dict[str, list] = {}
        a0 = mx.snap()
        for i in range(n):
            q = queries[i % len(queries)]
            t0 = time.perf_counter()
            res = self.client.attribute(name, [{"id": q["id"], "text": q["text"]}], top=TOP)
            stack_t.append(time.perf_counter() - t0)
            single.setdefault(q["id"], [(h[0], h[1]) for h in res[0][1]])
            if i % self.a.embedded_every and q["id"] in emb_single:
                continue
            sk, sc, scc, hits = emb_attr(records_from_dicts([q], fields)[0])
            e_sk.append(sk)
            e_sc.append(sc)
            e_sc_cached.append(scc)
            emb_single.setdefault(q["id"], [(h.id, h.score) for h in hits[0]])
        a1 = mx.snap()
        attr = {
            "stack": summary_ms(stack_t),
            "embedded_sketch": summary_ms(e_sk),
            "embedded_score": summary_ms(e_sc),
            "embedded_score_cached_shards": summary_ms(e_sc_cached),
            "embedded_total": summary_ms([a + b for a, b in zip(e_sk, e_sc, strict=True)]),
            "server_side": {
                "gateway_Attribute": Metrics.mean_ms(a0, a1, "gateway",
                                                     "rise_grpc_request_duration_seconds",
                                                     method="Attribute"),
                "worker_queries_sketch": Metrics.mean_ms(a0, a1, f"worker-{POOL}",
                                                         "rise_task_duration_seconds",
                                                         task="rise.queries.sketch"),
                "scorer_ScoreShards": Metrics.mean_ms(a0, a1, "scorer",
                                                      "rise_grpc_request_duration_seconds",
                                                      method="ScoreShards"),
            },
        }
        out["attribute"] = attr

        # ---- Value
        nv = self.a.value_calls
        log(f"warm-up: 2 Value calls; then {nv} Value calls ({len(targets)} targets)")
        for _ in range(2):
            self.client.value(name, targets)
            emb_value(target_recs)
        v_t, v_sk, v_sc, v_scc = [], [], [], []
        stack_vals = emb_vals = None
        v0 = mx.snap()
        for i in range(nv):
            t0 = time.perf_counter()
            vals, _sel = self.client.value(name, targets)
            v_t.append(time.perf_counter() - t0)
            stack_vals = stack_vals or vals
            if i % self.a.embedded_every:
                continue
            sk, sc, scc, ev = emb_value(target_recs)
            v_sk.append(sk)
            v_sc.append(sc)
            v_scc.append(scc)
            emb_vals = emb_vals or [(h.id, h.score) for h in ev]
        v1 = mx.snap()
        out["value"] = {
            "targets": len(targets),
            "stack": summary_ms(v_t),
            "embedded_sketch": summary_ms(v_sk),
            "embedded_score": summary_ms(v_sc),
            "embedded_score_cached_shards": summary_ms(v_scc),
            "embedded_total": summary_ms([a + b for a, b in zip(v_sk, v_sc, strict=True)]),
            "server_side": {
                "gateway_Value": Metrics.mean_ms(v0, v1, "gateway",
                                                 "rise_grpc_request_duration_seconds",
                                                 method="Value"),
                "worker_queries_sketch": Metrics.mean_ms(v0, v1, f"worker-{POOL}",
                                                         "rise_task_duration_seconds",
                                                         task="rise.queries.sketch"),
                "scorer_ValueShards": Metrics.mean_ms(v0, v1, "scorer",
                                                      "rise_grpc_request_duration_seconds",
                                                      method="ValueShards"),
            },
        }

        # ---- inputs of part 3 that need the loaded model
        self.single = single
        self.emb_single = emb_single
        self.stack_vals = stack_vals
        self.emb_vals_stack_copy = emb_vals
        from rise.index import open_index
        from rise.store import LocalStore

        cli_idx = open_index(LocalStore(self.cli_index))
        qs = api.sketch_queries(cli_idx, lm, target_recs, fields, batch_size=BATCH)
        self.cli_vals = [(h.id, h.score) for h in api.value_sketched(cli_idx, qs, spec)]
        return out

    # ---------------------------------------------------------------- part 3

    def part3(self, queries: list[dict[str, Any]]) -> dict[str, Any]:
        from rise.index import open_index
        from rise.store import LocalStore

        log("part 3: correctness (one Attribute call of the 5 queries vs rise attribute)")
        batch = self.client.attribute(self.stack_index,
                                      [{"id": q["id"], "text": q["text"]} for q in queries],
                                      top=TOP)
        stack_hits = [(qid, [(h[0], h[1]) for h in hits]) for qid, hits in batch]
        qfile = self.tmp / "queries.jsonl"
        write_jsonl(qfile, [json.dumps({"id": q["id"], "text": q["text"]}) for q in queries])
        hits_file = self.tmp / "cli-hits.jsonl"
        argv = [*self.rise, "attribute", "--index", str(self.cli_index), "--model", str(MODEL),
                "--queries", str(qfile), "--output", str(hits_file), "--top", str(TOP),
                "--batch-size", str(BATCH), "--json"]
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=600)
        cli_s = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"rise attribute failed ({p.returncode}): {p.stderr[-2000:]}")
        cli_hits = []
        for line in hits_file.read_text().splitlines():
            row = json.loads(line)
            cli_hits.append((row["query_id"], [(h["id"], h["score"]) for h in row["results"]]))
        single = [(q["id"], self.single[q["id"]]) for q in queries if q["id"] in self.single]
        cli_by_q = dict(cli_hits)
        emb_single = [(q, self.emb_single[q]) for q, _ in single]
        # Shard bytes of the two indexes (same data, same config, same model).
        s_idx = open_index(LocalStore(self.tmp / "copy"))
        c_idx = open_index(LocalStore(self.cli_index))
        s_sh = [e.sha256 for e in s_idx.manifest.shards]
        c_sh = [e.sha256 for e in c_idx.manifest.shards]
        return {
            "attribute_batch_vs_cli": compare_hits(stack_hits, cli_hits),
            "attribute_single_vs_cli": compare_hits(single, [(q, cli_by_q[q]) for q, _ in single]),
            "attribute_single_vs_embedded_inprocess": compare_hits(single, emb_single),
            "value_vs_embedded_on_cli_index": compare_values(self.stack_vals, self.cli_vals),
            "configs_equal": s_idx.manifest.config == c_idx.manifest.config,
            "models_equal": s_idx.manifest.model == c_idx.manifest.model,
            "shard_sha256_equal": s_sh == c_sh, "shards": len(s_sh),
            "cli_attribute_command_s": round(cli_s, 2),
            "stack_hits": stack_hits, "cli_hits": cli_hits,
        }


# ------------------------------------------------------------------------------ report


def fmt(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def markdown(rep: dict[str, Any]) -> str:
    s, p1, p2, p3 = rep["stamp"], rep["index_jobs"], rep["latency"], rep["correctness"]
    out = [f"# Stack vs embedded benchmark ({'quick' if rep['quick'] else 'full'} run)", "",
           f"commit `{s['commit']}`, {s['date']}, rise {s['rise']}, python {s['python']}, "
           f"torch {s['torch']}, transformers {s['transformers']}, celery {s['celery']}, "
           f"grpcio {s['grpcio']}; CPU {s['cpu']} x {s['cpu_count']}, torch threads "
           f"{s['torch_threads']}; load average {s['loadavg_start']} -> {s['loadavg_end']}; "
           f"stack up in {rep['stack_up_s']:.1f} s; whole run {rep['run_s']:.0f} s.", ""]
    cold, warm, cli = p1["cold"], p1["warm_median"], p1["cli_median"]
    out += [f"## 1. Index job: {p1['docs']} lee docs ({p1['tokens']} supervised tokens), "
            f"max_length {MAX_LENGTH}, shard size {SHARD_SIZE}, batch {BATCH}",
            "", f"Median of {len(p1['warm_runs'])} round(s), order alternating. Stack: "
            "CreateIndex call to the job's finished_at. Embedded: the whole `rise index` "
            "command (interpreter start, imports, model load, index); its index phase "
            "(from its own progress bar, after model load and planning) for reference.", "",
            "| path | seconds | examples/s | tokens/s | throughput / embedded command |",
            "|---|---:|---:|---:|---:|",
            f"| stack, cold job (worker loads model: {cold['model_load_s']:.1f} s) | "
            f"{fmt(cold['seconds'])} | {fmt(cold['examples_per_s'])} | "
            f"{fmt(cold['tokens_per_s'], 1)} | {p1['ratio_cold_over_cli_throughput']:.2f}x |",
            f"| stack, warm job | {fmt(warm['seconds'])} | {fmt(warm['examples_per_s'])} | "
            f"{fmt(warm['tokens_per_s'], 1)} | {p1['ratio_warm_over_cli_throughput']:.2f}x |",
            f"| embedded `rise index` (whole command) | {fmt(cli['seconds'])} | "
            f"{fmt(cli['examples_per_s'])} | {fmt(cli['tokens_per_s'], 1)} | 1.00x |",
            f"| embedded, index phase only | {fmt(cli['index_phase_s'])} | "
            f"{fmt(cli['index_phase_examples_per_s'])} | "
            f"{fmt(cli['index_phase_tokens_per_s'], 1)} | "
            f"(stack warm / this: {p1['ratio_warm_over_cli_index_phase']:.2f}x) |", "",
            f"Stack warm job phases (median): queued + plan {fmt(warm['queued_and_plan_s'])} s, "
            f"shards + commit {fmt(warm['shards_s'])} s; cold job: queued + plan "
            f"{fmt(cold['queued_and_plan_s'])} s, shards + commit {fmt(cold['shards_s'])} s.", ""]
    rows = [("cold", cold)] + [(f"warm r{i}", r) for i, r in enumerate(p1["warm_runs"])]
    out += ["| run | seconds | worker CPU s | worker CPU share | other stack CPU s |",
            "|---|---:|---:|---:|---:|"]
    for label, r in rows:
        other = sum(v for k, v in r["cpu_s"].items() if k != f"worker-{POOL}")
        out.append(f"| stack {label} | {fmt(r['seconds'])} | "
                   f"{fmt(r['cpu_s'][f'worker-{POOL}'])} | {fmt(r['worker_cpu_share'])} | "
                   f"{fmt(other)} |")
    for i, r in enumerate(p1["cli_runs"]):
        out.append(f"| embedded r{i} | {fmt(r['seconds'])} | {fmt(r['cpu_s'])} | "
                   f"{fmt(r['cpu_share'])} | - |")
    out.append("")

    def lat_table(d: dict[str, Any], what: str, gw: str, sc: str) -> list[str]:
        ss = d["server_side"]
        lines = ["| path | n | mean | p50 | p90 | p99 | max |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        fn = "attribute_sketched" if what == "Attribute" else "value_sketched"
        for label, key in ((f"stack {what} (client round trip)", "stack"),
                           ("embedded: sketch_queries", "embedded_sketch"),
                           (f"embedded: {fn} (shards read from disk)", "embedded_score"),
                           ("embedded: scoring, shards preloaded", "embedded_score_cached_shards"),
                           ("embedded: sketch + score", "embedded_total")):
            x = d[key]
            lines.append(f"| {label} | {x['n']} | {fmt(x['mean'])} | {fmt(x['p50'])} | "
                         f"{fmt(x['p90'])} | {fmt(x['p99'])} | {fmt(x['max'])} |")
        g, w, c = ss[gw], ss["worker_queries_sketch"], ss[sc]
        client = d["stack"]["mean"]
        rest = g["mean_ms"] - w["mean_ms"] - c["mean_ms"]
        lines += ["", f"Where the stack's mean {fmt(client)} ms goes (server histograms over "
                  "the same calls, means):", "",
                  "| part | mean ms | share |", "|---|---:|---:|",
                  f"| worker task `rise.queries.sketch` (opens the index on S3, sketches) | "
                  f"{fmt(w['mean_ms'])} | {w['mean_ms'] / client:.0%} |",
                  f"| scorer `{sc.split('_', 1)[1]}` | {fmt(c['mean_ms'])} | "
                  f"{c['mean_ms'] / client:.0%} |",
                  f"| gateway rest: Celery queue + result via Redis, gateway opens index, "
                  f"decode/merge | {fmt(rest)} | {rest / client:.0%} |",
                  f"| client <-> gateway gRPC (client minus gateway histogram) | "
                  f"{fmt(client - g['mean_ms'])} | {(client - g['mean_ms']) / client:.0%} |",
                  f"| (for comparison: embedded sketch_queries) | "
                  f"{fmt(d['embedded_sketch']['mean'])} | |"]
        return lines

    out += [f"## 2. Latency through the gateway (ms), after {WARMUP_CALLS} warm-up calls", "",
            f"Attribute: 1 query per call, top {TOP}, the 5 lee-queries in turn; every "
            f"{rep['params']['embedded_every']}th call (and the first of each query) followed "
            "by the embedded path in this "
            "process (model loaded here once, LocalStore copy of the same index, same torch "
            "threads).", ""]
    out += lat_table(p2["attribute"], "Attribute", "gateway_Attribute", "scorer_ScoreShards")
    out += ["", f"Value: {p2['value']['targets']} targets per call, every example valued.", ""]
    out += lat_table(p2["value"], "Value", "gateway_Value", "scorer_ValueShards")
    out += ["", "## 3. Correctness", "", "| check | result | ids equal | max abs score diff |",
            "|---|---|---|---:|"]
    for key, label in (
            ("attribute_batch_vs_cli", "stack Attribute (5 queries, one call) vs `rise attribute`"),
            ("attribute_single_vs_cli", "stack Attribute (1 query per call) vs `rise attribute`"),
            ("attribute_single_vs_embedded_inprocess",
             "stack Attribute (1 query) vs embedded in-process"),
            ("value_vs_embedded_on_cli_index", "stack Value vs value_sketched on the CLI's index")):
        c = p3[key]
        out.append(f"| {label} | {'PASS' if c['ok'] else 'FAIL'} | {c['ids_equal']} | "
                   f"{c['max_abs_score_diff']:.2e} |")
    out += ["", f"Index configs equal: {p3['configs_equal']}; model identities equal: "
            f"{p3['models_equal']}; shard bytes identical (sha256 of all {p3['shards']} shards): "
            f"{p3['shard_sha256_equal']}.", ""]
    if rep.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(out)


def notes(rep: dict[str, Any]) -> list[str]:
    p1, p2 = rep["index_jobs"], rep["latency"]
    n = []
    if not p1["same_examples_and_tokens"]:
        n.append("the stack jobs and the CLI runs did not report the same examples/tokens")
    a = p2["attribute"]
    g = a["server_side"]["gateway_Attribute"]["mean_ms"]
    w = a["server_side"]["worker_queries_sketch"]["mean_ms"]
    c = a["server_side"]["scorer_ScoreShards"]["mean_ms"]
    e = a["embedded_total"]["mean"]
    n.append(f"Attribute: stack mean {a['stack']['mean']:.1f} ms vs embedded sketch+score "
             f"{e:.1f} ms ({a['stack']['mean'] / e:.1f}x); worker sketch task "
             f"{w:.1f} ms vs in-process sketch_queries {a['embedded_sketch']['mean']:.1f} ms; "
             f"scorer {c:.1f} ms; queueing/transport/gateway {g - w - c:.1f} ms.")
    shares = [r["worker_cpu_share"] for r in [p1["cold"], *p1["warm_runs"]]] + \
        [r["cpu_share"] for r in p1["cli_runs"]]
    n.append(f"CPU contention: the model-running process got {min(shares):.2f}-"
             f"{max(shares):.2f} of a core during the index jobs ({rep['stamp']['cpu_count']} "
             f"cores, load average {rep['stamp']['loadavg_start'][0]} at start, "
             f"{rep['stamp']['loadavg_end'][0]} at end): absolute times are stretched and "
             "vary with the other load; the order of the paths alternates so a drift hits "
             "both, and CPU seconds are reported alongside.")
    cold, warm, cli = p1["cold"], p1["warm_median"], p1["cli_median"]
    wk = f"worker-{POOL}"
    warm_cpu = statistics.median(r["cpu_s"][wk] for r in p1["warm_runs"])
    cli_cpu = statistics.median(r["cpu_s"] for r in p1["cli_runs"])
    n.append(f"Index job in CPU seconds (less sensitive to the load than wall time): cold "
             f"stack job {cold['cpu_s'][wk]:.1f} (model load {cold['model_load_s']:.1f} s "
             f"included), warm stack job {warm_cpu:.1f} (median), embedded command "
             f"{cli_cpu:.1f} (median; interpreter, imports and model load included; "
             f"{cli['seconds'] - cli['index_phase_s']:.1f} s of wall time before its index "
             f"phase). Cold minus warm wall time: {cold['seconds'] - warm['seconds']:+.1f} s"
             + (" (negative: the load changed more between jobs than the model load costs)"
                if cold["seconds"] < warm["seconds"] else "") + ".")
    return n


# ------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 docs, 1 round, 40/10 calls")
    ap.add_argument("--out", default=str(REPO / "tests/benchmarks/reports"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the worker, the CLI and this process (default 1)")
    ap.add_argument("--embedded-every", type=int, default=2,
                    help="run the embedded path after every k-th stack call (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    a = ap.parse_args()
    a.docs = 16 if a.quick else 64
    a.rounds = 1 if a.quick else 2
    a.attribute_calls = 40 if a.quick else 200
    a.value_calls = 10 if a.quick else 50
    a.job_timeout = 600

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    for path in (MODEL, LEE, LEE_QUERIES):
        if not path.exists():
            print(f"bench_stack: {path} is missing (make assets)", file=sys.stderr)
            return 2
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    rep: dict[str, Any] = {"quick": a.quick, "stamp": stamp(a.threads),
                           "params": {"docs": a.docs, "rounds": a.rounds,
                                      "attribute_calls": a.attribute_calls,
                                      "value_calls": a.value_calls,
                                      "embedded_every": a.embedded_every,
                                      "max_length": MAX_LENGTH,
                                      "shard_size": SHARD_SIZE, "batch_size": BATCH, "top": TOP,
                                      "warmup_calls": WARMUP_CALLS, "tolerance": TOL}}
    tmp = Path(tempfile.mkdtemp(prefix="rise-bench-stack-"))
    b = Bench(a, tmp)
    try:
        lines = LEE.read_text().splitlines(keepends=True)[: a.docs]
        data = tmp / f"lee-{a.docs}.jsonl"
        data.write_text("".join(lines))
        queries = [json.loads(x) for x in LEE_QUERIES.read_text().splitlines() if x.strip()]
        log(f"bringing the stack up in {tmp / 'stack'}")
        b.up()
        rep["stack_up_s"] = round(b.up_s, 2)
        rep["stack_start_seconds"] = b.stack.start_seconds
        rep["pool"] = b.pool.model_dump()
        rep["pool"]["model"] = os.path.relpath(rep["pool"]["model"], REPO)  # no machine paths
        uri = b.upload(data)
        rep["dataset_uri"] = uri
        rep["index_jobs"] = b.part1(data, uri)
        rep["latency"] = b.part2(queries)
        rep["correctness"] = b.part3(queries)
    finally:
        if b.client is not None:
            b.client.close()
        if b.stack is not None:
            log("bringing the stack down")
            killed = b.stack.down()
            if killed:
                log(f"had to SIGKILL {killed}")
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    rep["stamp"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    rep["run_s"] = round(time.perf_counter() - T0, 1)
    rep["notes"] = notes(rep)
    c = rep["correctness"]
    rep["ok"] = all(c[k]["ok"] for k in ("attribute_batch_vs_cli", "attribute_single_vs_cli",
                                         "attribute_single_vs_embedded_inprocess",
                                         "value_vs_embedded_on_cli_index"))
    md = markdown(rep)
    print(md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stack.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    (out / "stack.md").write_text(md + "\n")
    log(f"wrote {out / 'stack.json'} and {out / 'stack.md'}; correctness "
        f"{'PASS' if rep['ok'] else 'FAIL'}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
