"""Fairness under abuse: one tenant's scoring calls while another tenant holds streams and
runs a long shard on the same pool.

Run from the repository root (``make bench-fairness``)::

    python tests/benchmarks/bench_fairness.py [--quick] [--out tests/benchmarks/reports]

Brings the local stack up in a temporary folder (``rise.stack``: Redis, SeaweedFS S3, the
gateway with its default limits, one Celery worker of pool ``smollm2`` with concurrency 1
on the CPU, one scorer, the controller) with two tenants, and always brings it down again.

Tenant A indexes 32 lee docs (max_length 64, shard size 16), makes 5 warm-up Attribute
calls and one unmeasured round of 50 concurrent ones.  Then 5 rounds (``--quick`` 1),
each:

1. **A alone**: 50 concurrent Attribute calls (one lee-query each, top 10, each call on
   its own thread over one channel).
2. Tenant B creates an index of one shard of 480 records (lee docs again under new ids;
   60 batches of the pool's 8) on the same pool, so the pool's only worker process is busy
   for minutes.  Three of B's batches are timed from the job's progress counter (sampled in
   Redis every 10 ms; each batch ends with one update) while nothing else runs.
3. B opens 100 WatchJob streams (interval 1 s) and keeps the admitted ones open.
4. **A under load**: after a random delay within one batch (so the calls arrive at any
   point of B's batch in progress), the same 50 concurrent calls, while B's streams are
   open and its shard runs (checked after the round).
5. B's streams are closed and its job cancelled; the round ends when the worker process is
   free again (the shard's heartbeat gone).

Alone and loaded rounds alternate, so a drift of the machine's load hits both.  All along,
a health Check (grpc.health.v1, service "") every 100 ms with a 2 s deadline.

The claims checked: 0 errors for A; every health check SERVING; at most
``max_streams_per_tenant`` of B's streams admitted; B's shard running through every loaded
round; A's p99 under load (all rounds' calls) at most A's p99 alone plus one batch of B's
job, that is the longest of the batches timed in step 2 and of the waits for the batch in
progress when A's calls arrived (that batch runs beside the gateway taking 50 calls).  The
worker's mean time per query sketch is reported for both conditions (its histogram, which
the tasks and the between-batches path both feed).  Markdown on stdout, progress on
stderr, ``OUT/fairness.json`` and ``OUT/fairness.md`` written.  Exit status 1 when a claim
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from bench_stack import LEE, LEE_QUERIES, MODEL, REPO, hist, log, scrape, stamp, summary_ms

POOL = "smollm2"
A, B = "tenant-a", "tenant-b"
MAX_LENGTH = 64
A_DOCS, A_SHARD = 32, 16
B_RECORDS = 480
CALLS = 50
STREAMS = 100
STREAM_INTERVAL_S = 1.0
HEALTH_EVERY_S = 0.1
HEALTH_DEADLINE_S = 2.0
TOP = 10
WARMUP_CALLS = 5
QUIET_BATCHES = 3  # B's batches timed before anything else runs beside them
CLAIMS = ("a_errors_zero", "health_always_serving", "p99_within_bound", "b_streams_bounded",
          "b_shard_ran_through_the_load")


class Health(threading.Thread):
    """Health Check every HEALTH_EVERY_S until stopped: (time, ok, seconds, status)."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.pb = health_pb2
        self.channel = grpc.insecure_channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.samples: list[tuple[float, bool, float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                resp = self.stub.Check(self.pb.HealthCheckRequest(service=""),
                                       timeout=HEALTH_DEADLINE_S)
                status = self.pb.HealthCheckResponse.ServingStatus.Name(resp.status)
                ok = resp.status == self.pb.HealthCheckResponse.SERVING
            except Exception as e:  # noqa: BLE001 - a failed check is the measurement
                code = e.code() if hasattr(e, "code") else type(e).__name__
                status, ok = f"error: {code}", False
            took = time.monotonic() - t0
            self.samples.append((time.time(), ok, took, status))
            self.stop.wait(max(0.0, HEALTH_EVERY_S - took))
        self.channel.close()

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        xs = [s for s in self.samples if since <= s[0] <= until]
        bad = [s for s in xs if not s[1]]
        return {"checks": len(xs), "not_serving": len(bad),
                "statuses": sorted({s[3] for s in bad}),
                "latency_ms": summary_ms([s[2] for s in xs]) if xs else {}}


class Progress(threading.Thread):
    """B's job's examples_done, read from Redis every 10 ms: the time of each change."""

    def __init__(self, redis_url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        import redis

        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.key = f"rise:job:{job_id}"
        self.changes: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = -1
        while not self.stop.is_set():
            done = int(self.r.hget(self.key, "examples_done") or 0)
            if done != last:
                self.changes.append((time.time(), done))
                last = done
            self.stop.wait(0.01)

    def done(self) -> int:
        return self.changes[-1][1] if self.changes else 0

    def intervals(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Seconds between successive batch ends inside [since, until] (the first change,
        from 0, is the job starting, not a batch end)."""
        ends = [t for t, n in self.changes if n > 0 and since <= t <= until]
        return [b - a for a, b in zip(ends, ends[1:], strict=False)]


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.a = args
        self.tmp = tmp
        self.tokens = {A: secrets.token_urlsafe(24), B: secrets.token_urlsafe(24)}
        self.stack: Any = None

    def up(self) -> None:
        from rise.stack import Stack

        os.environ.update(OMP_NUM_THREADS=str(self.a.threads), MKL_NUM_THREADS=str(self.a.threads),
                          HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        t = time.perf_counter()
        self.stack = Stack.up(self.tmp / "stack", pools={POOL: str(MODEL)}, tokens=self.tokens,
                              gateway_port="auto", scorer_port="auto", metrics_port="auto",
                              die_with_parent=True, log=log)
        self.up_s = time.perf_counter() - t
        log(f"stack up in {self.up_s:.1f} s: gateway {self.stack.endpoints['gateway']}")

    def client(self, tenant: str):
        from rise.client import RiseClient

        return RiseClient(self.stack.endpoints["gateway"], self.tokens[tenant], timeout=300)

    def upload(self, tenant: str, name: str, rows: list[dict[str, Any]]) -> str:
        from rise.stack import minio_client

        path = self.tmp / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        s3 = self.stack.s3
        key = f"tenants/{tenant}/data/{name}"
        minio_client(s3["endpoint"], s3["access_key"], s3["secret_key"]).fput_object(
            s3["bucket"], key, str(path), content_type="application/x-ndjson")
        return f"s3://{s3['bucket']}/{key}"

    def worker_sketch(self) -> tuple[float, float]:
        """(seconds, count) of the worker's rise.queries.sketch histogram so far."""
        url = self.stack.endpoints["metrics"][f"worker-{POOL}"]
        return hist(scrape(url), "rise_task_duration_seconds", task="rise.queries.sketch")

    def calls(self, client, queries: list[dict[str, Any]], n: int) -> dict[str, Any]:
        """n concurrent Attribute calls of tenant A; latencies, errors, and the worker's
        mean time per query sketch over them."""
        gate = threading.Barrier(n)

        def one(i: int) -> tuple[float, str]:
            q = queries[i % len(queries)]
            gate.wait()
            t0 = time.perf_counter()
            try:
                client.attribute("a-docs", [{"id": q["id"], "text": q["text"]}], top=TOP)
                return time.perf_counter() - t0, ""
            except Exception as e:  # noqa: BLE001 - an error is the measurement
                return time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:200]

        s0, c0 = self.worker_sketch()
        t0 = time.time()
        with futures.ThreadPoolExecutor(n) as pool:
            out = list(pool.map(one, range(n)))
        s1, c1 = self.worker_sketch()
        lat = [x for x, err in out if not err]
        errors = [err for _, err in out if err]
        return {"started": t0, "ended": time.time(), "calls": n, "errors": len(errors),
                "error_samples": errors[:5], "latency_ms": summary_ms(lat) if lat else {},
                "worker_sketches": int(c1 - c0),
                "worker_sketch_mean_ms": round((s1 - s0) / (c1 - c0) * 1000, 1) if c1 > c0 else None,
                "_latencies": lat}

    def streams(self, n: int, job_id: str) -> tuple[list[Any], dict[str, int]]:
        """B opens n WatchJob streams at once; the admitted stay open (read on threads)."""
        import grpc
        from rise.v1 import rise_pb2, rise_pb2_grpc

        channel = grpc.insecure_channel(self.stack.endpoints["gateway"])
        stub = rise_pb2_grpc.JobServiceStub(channel)
        md = [("authorization", f"Bearer {self.tokens[B]}")]
        outcome: dict[str, int] = {}
        lock = threading.Lock()
        opened: list[Any] = []
        first = threading.Barrier(n + 1)

        def watch() -> None:
            stream = stub.WatchJob(rise_pb2.WatchJobRequest(
                id=job_id, interval_seconds=STREAM_INTERVAL_S), metadata=md, timeout=3600)
            with lock:
                opened.append(stream)
            try:
                next(stream)
                code = "admitted"
            except grpc.RpcError:
                code = stream.code().name
            with lock:
                outcome[code] = outcome.get(code, 0) + 1
            first.wait()
            if code == "admitted":
                try:
                    for _ in stream:
                        pass
                except grpc.RpcError:
                    pass

        for _ in range(n):
            threading.Thread(target=watch, daemon=True).start()
        first.wait(timeout=120)
        return [channel, *opened], outcome


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from rise.client import state_name
    from rise.settings import Settings

    b = Bench(args, tmp)
    lee = [json.loads(line) for line in LEE.read_text().splitlines() if line.strip()]
    queries = [json.loads(line) for line in LEE_QUERIES.read_text().splitlines() if line.strip()]
    rep: dict[str, Any] = {"stamp": stamp(args.threads), "quick": args.quick}
    try:  # the code measured: the commit, and whether services/ differed from it
        changed = subprocess.run(["git", "status", "--porcelain", "--", "services"], cwd=REPO,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        changed = ""
    rep["stamp"]["services_uncommitted_changes"] = bool(changed)
    defaults = Settings()
    rep["gateway_settings"] = {k: getattr(defaults, k) for k in (
        "gateway_threads", "gateway_reserved_threads", "max_streams", "max_streams_per_tenant",
        "max_calls_per_tenant", "max_active_jobs_per_tenant", "query_timeout_seconds")}
    rep["params"] = {"calls": CALLS, "rounds": args.rounds, "streams": STREAMS,
                     "stream_interval_s": STREAM_INTERVAL_S, "a_docs": A_DOCS,
                     "a_shard_size": A_SHARD, "b_records": B_RECORDS, "max_length": MAX_LENGTH,
                     "health_every_s": HEALTH_EVERY_S, "health_deadline_s": HEALTH_DEADLINE_S,
                     "top": TOP, "quiet_batches": QUIET_BATCHES}
    t_run = time.perf_counter()
    b.up()
    rep["stack_up_s"] = round(b.up_s, 1)
    try:
        ca, cb = b.client(A), b.client(B)
        import redis

        r = redis.Redis.from_url(b.stack.endpoints["redis"], decode_responses=True)
        batch = pool_batch(b)
        rep["params"]["batch_size"] = batch
        log(f"A indexes {A_DOCS} docs")
        uri = b.upload(A, "a.jsonl", lee[:A_DOCS])
        job = ca.create_index("a-docs", uri, POOL, shard_size=A_SHARD,
                              config={"max_length": MAX_LENGTH})
        job = ca.wait(job.id, timeout=1800, interval=0.5)
        if state_name(job) != "SUCCEEDED":
            raise RuntimeError(f"A's index job ended {state_name(job)}: {job.error_message}")
        b_rows = [{"id": f"b-{i:05d}", "text": lee[(A_DOCS + i) % len(lee)]["text"]}
                  for i in range(B_RECORDS)]
        b_uri = b.upload(B, "b.jsonl", b_rows)
        log(f"warm-up: {WARMUP_CALLS} Attribute calls, then one round of {CALLS} at once")
        for i in range(WARMUP_CALLS):
            q = queries[i % len(queries)]
            ca.attribute("a-docs", [{"id": q["id"], "text": q["text"]}], top=TOP)
        warm = b.calls(ca, queries, CALLS)
        warm.pop("_latencies")
        rep["warmup_round"] = warm

        health = Health(b.stack.endpoints["gateway"])
        health.start()
        alone, load, windows = [], [], []
        rng = random.Random(0)
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}: A alone, {CALLS} concurrent Attribute calls")
            alone.append(b.calls(ca, queries, CALLS))
            log(f"  p50 {alone[-1]['latency_ms'].get('p50')} ms, p99 "
                f"{alone[-1]['latency_ms'].get('p99')} ms, errors {alone[-1]['errors']}")

            name = f"b-long-{rnd}"
            bjob = cb.create_index(name, b_uri, POOL, shard_size=B_RECORDS,
                                   config={"max_length": MAX_LENGTH})
            prog = Progress(b.stack.endpoints["redis"], bjob.id)
            prog.start()
            deadline = time.monotonic() + 600
            while len(prog.intervals()) < QUIET_BATCHES:
                if time.monotonic() > deadline:
                    raise RuntimeError("B's shard did not get going")
                state = state_name(cb.get_job(bjob.id))
                if state in ("FAILED", "CANCELLED", "SUCCEEDED"):
                    raise RuntimeError(f"B's job ended {state} before A's round")
                time.sleep(0.1)
            quiet = prog.intervals()
            t_streams = time.time()
            held, outcome = b.streams(STREAMS, bjob.id)
            # The calls arrive at a random point of B's batch in progress (not always
            # just after one ended, which the wait for the quiet batches above would give).
            phase = rng.uniform(0.0, statistics.median(quiet))
            time.sleep(phase)
            before = prog.done()
            log(f"  B: one shard of {B_RECORDS} records running ({before} done; quiet batches "
                f"{', '.join(f'{x:.2f}' for x in quiet)} s); {STREAMS} WatchJob streams: "
                f"{outcome}")
            res = b.calls(ca, queries, CALLS)
            after = prog.done()
            res["b_examples_before"], res["b_examples_after"] = before, after
            res["b_running_after"] = (state_name(cb.get_job(bjob.id)) == "RUNNING"
                                      and after < B_RECORDS)
            res["b_quiet_batches_s"] = [round(x, 3) for x in quiet]
            res["arrival_delay_s"] = round(phase, 3)
            res["b_streams"] = outcome
            res["b_streams_open_at_end"] = sum(1 for x in held[1:] if x.is_active())
            first_end = min((t for t, n in prog.changes if n > 0 and t > res["started"]),
                            default=float("nan"))
            res["b_batch_in_progress_ended_after_s"] = round(first_end - res["started"], 3)
            load.append(res)
            windows.append((t_streams, res["ended"]))
            log(f"  A under load: p50 {res['latency_ms'].get('p50')} ms, p99 "
                f"{res['latency_ms'].get('p99')} ms, errors {res['errors']}; B {before} -> "
                f"{after}; B's batch in progress ended {res['b_batch_in_progress_ended_after_s']}"
                " s after the calls started")
            for x in held[1:]:
                x.cancel()
            held[0].close()
            cb.cancel_job(bjob.id)
            deadline = time.monotonic() + 120  # until the worker process is free again
            while r.exists(f"rise:beat:{bjob.id}:0"):
                if time.monotonic() > deadline:
                    raise RuntimeError("B's cancelled shard did not stop")
                time.sleep(0.1)
            prog.stop.set()
            time.sleep(1.0)  # the chord's commit (control queue) sees the cancel and ends
        health.stop.set()
        health.join(timeout=5)

        lat_alone = [x for rr in alone for x in rr.pop("_latencies")]
        lat_load = [x for rr in load for x in rr.pop("_latencies")]
        s_alone, s_load = summary_ms(lat_alone), summary_ms(lat_load)
        quiet_all = [x for rr in load for x in rr["b_quiet_batches_s"]]
        waits = [rr["b_batch_in_progress_ended_after_s"] for rr in load]
        batch_s = statistics.median(quiet_all)
        # One batch of B's job: the longest batch measured with nothing beside it, or the
        # longest wait for the batch in progress when A's calls arrived (that batch ran
        # beside the gateway taking the 50 calls), whichever is longer.
        one_batch = max(max(quiet_all), max(waits))
        bound = s_alone["p99"] + one_batch * 1000
        health_load = [health.summary(t0, t1) for t0, t1 in windows]
        rep.update({
            "a_alone": {"rounds": alone, "all": s_alone,
                        "errors": sum(rr["errors"] for rr in alone)},
            "a_under_load": {"rounds": load, "all": s_load,
                             "errors": sum(rr["errors"] for rr in load)},
            "b_job": {"batch_size": batch, "records": B_RECORDS,
                      "batch_s_median_quiet": round(batch_s, 3),
                      "batch_s_max_quiet": round(max(quiet_all), 3),
                      "batches_timed_quiet": len(quiet_all),
                      "batch_in_progress_wait_s_max": round(max(waits), 3),
                      "examples_during_load": sum(rr["b_examples_after"] - rr["b_examples_before"]
                                                  for rr in load),
                      "running_through_every_round": all(rr["b_running_after"] for rr in load)},
            "health": {"whole_run": health.summary(),
                       "while_streams_and_load": {
                           "checks": sum(h["checks"] for h in health_load),
                           "not_serving": sum(h["not_serving"] for h in health_load),
                           "latency_ms": summary_ms([s[2] for s in health.samples if any(
                               t0 <= s[0] <= t1 for t0, t1 in windows)])}},
        })
        rep["claims"] = {
            "a_errors_zero": rep["a_alone"]["errors"] == 0 and rep["a_under_load"]["errors"] == 0,
            "health_always_serving": health.summary()["not_serving"] == 0,
            "a_p99_load_ms": s_load["p99"], "a_p99_alone_ms": s_alone["p99"],
            "b_batch_ms": round(one_batch * 1000, 1), "bound_ms": round(bound, 1),
            "b_batch_ms_median_quiet": round(batch_s * 1000, 1),
            "p99_within_bound": s_load["p99"] <= bound,
            "b_shard_ran_through_the_load": rep["b_job"]["running_through_every_round"],
            "b_streams_bounded": all(rr["b_streams"].get("admitted", 0)
                                     <= defaults.max_streams_per_tenant for rr in load),
        }
    finally:
        log("stack down")
        b.stack.down()
    rep["run_s"] = round(time.perf_counter() - t_run, 1)
    rep["stamp"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return rep


def pool_batch(b: Bench) -> int:
    from rise.settings import Pool

    pools = json.loads(b.stack.proc("gateway").env["RISE_POOLS"])
    return Pool(**pools[POOL]).batch_size


def mean_sketch(rounds: list[dict[str, Any]]) -> str:
    n = sum(r["worker_sketches"] for r in rounds)
    total = sum(r["worker_sketch_mean_ms"] * r["worker_sketches"] for r in rounds
                if r["worker_sketch_mean_ms"] is not None)
    return f"{total / n:.1f}" if n else "-"


def fmt_lat(x: dict[str, Any]) -> str:
    return " | ".join(f"{x[k]:,.0f}" for k in ("n", "p50", "p90", "p99", "max"))


def markdown(rep: dict[str, Any]) -> str:
    s, c, g = rep["stamp"], rep["claims"], rep["gateway_settings"]
    p, bj = rep["params"], rep["b_job"]
    ok = all(c[k] for k in CLAIMS)
    n = p["calls"] * p["rounds"]
    out = [f"# Fairness under abuse ({'quick' if rep['quick'] else 'full'} run)", "",
           f"commit `{s['commit']}`"
           f"{' with uncommitted changes under services/' if s.get('services_uncommitted_changes') else ''}"
           f", {s['date']}, rise {s['rise']}, python {s['python']}, "
           f"torch {s['torch']}, celery {s['celery']}, grpcio {s['grpcio']}; CPU {s['cpu']} x "
           f"{s['cpu_count']}, torch threads {s['torch_threads']}; load average "
           f"{s['loadavg_start']} -> {s['loadavg_end']}; stack up in {rep['stack_up_s']} s; "
           f"whole run {rep['run_s']:.0f} s.", "",
           "The local stack (one gateway, one worker process of pool `smollm2` = "
           "SmolLM2-135M-Instruct on the CPU, one scorer) with the gateway's default limits: "
           f"{g['gateway_threads']} threads, {g['gateway_reserved_threads']} reserved, "
           f"{g['max_streams']} streams in all, {g['max_streams_per_tenant']} streams and "
           f"{g['max_calls_per_tenant']} unary calls per tenant.", "",
           f"{p['rounds']} rounds, each: tenant A makes {p['calls']} concurrent Attribute calls "
           f"(1 query, top {p['top']}, a {p['a_docs']}-doc index) alone; then tenant B starts "
           f"one shard of {p['b_records']} records (batches of {p['batch_size']}, max_length "
           f"{p['max_length']}) on the same worker process, {p['quiet_batches']} of its batches "
           f"are timed, B opens {p['streams']} WatchJob streams, and after a random delay "
           f"within one batch A makes the same {p['calls']} calls again while they are open "
           "and the shard runs; B's job is then cancelled.  Alone and loaded rounds "
           "alternate, so a drift of the machine's load hits both.  A health Check every "
           f"{p['health_every_s']} s all along.", "",
           f"## Result: {'PASS' if ok else 'FAIL'}", "",
           "| claim | figures | holds |", "|---|---|---|",
           f"| 0 errors for A | alone {rep['a_alone']['errors']}, under load "
           f"{rep['a_under_load']['errors']} (of {n} calls each) | {c['a_errors_zero']} |",
           f"| health always SERVING | {rep['health']['whole_run']['checks']} checks, "
           f"{rep['health']['whole_run']['not_serving']} not SERVING | "
           f"{c['health_always_serving']} |",
           f"| A's p99 under load <= A's p99 alone + one batch of B | {c['a_p99_load_ms']:,.0f} "
           f"ms <= {c['a_p99_alone_ms']:,.0f} + {c['b_batch_ms']:,.0f} = {c['bound_ms']:,.0f} ms "
           f"| {c['p99_within_bound']} |",
           f"| B's streams bounded | admitted per round: "
           f"{', '.join(str(r['b_streams'].get('admitted', 0)) for r in rep['a_under_load']['rounds'])}"
           f" of {p['streams']} | {c['b_streams_bounded']} |",
           f"| B's shard ran through every loaded round | B sketched "
           f"{bj['examples_during_load']} examples during them | "
           f"{c['b_shard_ran_through_the_load']} |", "",
           f"One batch of B = the longest of: its batches timed with nothing beside them "
           f"({bj['batches_timed_quiet']}: median {bj['batch_s_median_quiet']:.2f} s, max "
           f"{bj['batch_s_max_quiet']:.2f} s) and the waits for the batch in progress when A's "
           f"calls arrived (max {bj['batch_in_progress_wait_s_max']:.2f} s; that batch ran "
           "beside the gateway taking the 50 calls).", "",
           "## A's Attribute latency (ms, client round trip)", "",
           "| condition | calls | p50 | p90 | p99 | max | worker ms per query sketch |",
           "|---|---:|---:|---:|---:|---:|---:|",
           f"| alone, all rounds | {fmt_lat(rep['a_alone']['all'])} | "
           f"{mean_sketch(rep['a_alone']['rounds'])} |",
           f"| under load, all rounds | {fmt_lat(rep['a_under_load']['all'])} | "
           f"{mean_sketch(rep['a_under_load']['rounds'])} |"]
    for i, (a, ld) in enumerate(zip(rep["a_alone"]["rounds"], rep["a_under_load"]["rounds"],
                                    strict=True)):
        for label, r in (("alone", a), ("under load", ld)):
            if r["latency_ms"]:
                out.append(f"| round {i + 1}, {label} | {fmt_lat(r['latency_ms'])} | "
                           f"{r['worker_sketch_mean_ms']} |")
    out += ["", f"(Before the rounds: {WARMUP_CALLS} single calls and one unmeasured round of "
            f"{p['calls']}: p99 {rep['warmup_round']['latency_ms'].get('p99', 0):,.0f} ms.)", "",
            "## B's job and streams, per loaded round", "",
            "| round | B's quiet batches (s) | A's calls after (s) | batch in progress ended "
            "after (s) | B's examples before -> after | B's 100 streams | open at the end |",
            "|---:|---|---:|---:|---|---|---:|"]
    for i, r in enumerate(rep["a_under_load"]["rounds"]):
        out.append(f"| {i + 1} | {', '.join(f'{x:.2f}' for x in r['b_quiet_batches_s'])} | "
                   f"{r['arrival_delay_s']:.2f} | "
                   f"{r['b_batch_in_progress_ended_after_s']:.2f} | {r['b_examples_before']} -> "
                   f"{r['b_examples_after']} | {r['b_streams']} | {r['b_streams_open_at_end']} |")
    h = rep["health"]
    hw, hl = h["whole_run"]["latency_ms"], h["while_streams_and_load"]["latency_ms"]
    out += ["", "## Health checks (ms)", "",
            "| window | checks | not SERVING | p50 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
            f"| whole run | {h['whole_run']['checks']} | {h['whole_run']['not_serving']} | "
            f"{hw['p50']:.1f} | {hw['p99']:.1f} | {hw['max']:.1f} |",
            f"| B's streams open + A under load | {h['while_streams_and_load']['checks']} | "
            f"{h['while_streams_and_load']['not_serving']} | {hl['p50']:.1f} | {hl['p99']:.1f} | "
            f"{hl['max']:.1f} |", "",
            "## How", "",
            "- The gateway admits each call (`rise.gateway.limits`): B's streams beyond its "
            "per-tenant allowance are refused RESOURCE_EXHAUSTED at once, so B holds a bounded "
            "number of threads; unary calls and the health check keep theirs.",
            "- The worker's shard task answers the pool's waiting query tasks between two "
            "batches (`rise.worker.tasks.QueryDrain`, same process, same loaded model): A's "
            "queries wait for the batch in progress, not for B's shard.", ""]
    out += ["## Notes", ""] + [f"- {x}" for x in notes(rep)] + [""]
    return "\n".join(out)


def notes(rep: dict[str, Any]) -> list[str]:
    s, p, bj = rep["stamp"], rep["params"], rep["b_job"]
    rounds = rep["a_alone"]["rounds"] + rep["a_under_load"]["rounds"]
    per = [r["worker_sketch_mean_ms"] for r in rounds if r["worker_sketch_mean_ms"]]
    per_round = bj["examples_during_load"] / max(1, p["rounds"])
    return [
        f"The worker's mean time per query sketch ranged {min(per):.0f}-{max(per):.0f} ms "
        f"over the rounds (load average {s['loadavg_start'][0]} at the start, "
        f"{s['loadavg_end'][0]} at the end, on {s['cpu_count']} cores): other processes "
        "shared the machine, so a round's latencies move by more than one batch of B from "
        "that alone; alone and loaded rounds alternate so such drift hits both.",
        f"During each loaded round B sketched {per_round:g} examples on average (its batch is "
        f"{p['batch_size']}): A's 50 queries waited for the batch in progress and were then "
        "answered back to back, between that batch and the next.",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round instead of 5")
    ap.add_argument("--out", default=str(REPO / "tests/benchmarks/reports"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the worker and scorer (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    a = ap.parse_args()
    a.rounds = 1 if a.quick else 5

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    for path in (MODEL, LEE, LEE_QUERIES):
        if not path.exists():
            print(f"bench_fairness: {path} is missing (make assets)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="rise-bench-fairness-"))
    try:
        rep = run(a, tmp)
    finally:
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    md = markdown(rep)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fairness.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    (out / "fairness.md").write_text(md + "\n")
    print(md)
    return 0 if all(rep["claims"][k] for k in CLAIMS) else 1


if __name__ == "__main__":
    sys.exit(main())
