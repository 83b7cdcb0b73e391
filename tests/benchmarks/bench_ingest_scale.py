"""Memory and throughput of an ingest through the local stack as the dataset grows.

    nice -n 10 .venv/bin/python tests/benchmarks/bench_ingest_scale.py
        [--sizes 10000,100000] [--concurrency 1,2] [--throughput-size N]
        [--record-bytes 10000] [--max-length 64] [--shard-size 1024]
        [--work .cache/ingest-scale] [--out tests/benchmarks/reports] [--keep]

Real text: the passages of the corpora ``make assets-corpus`` writes to
``.cache/corpus/`` (Lee news documents, enwiki passages, and fortunes and GCIDE entries
where they are there) are concatenated into records of about ``--record-bytes`` bytes each:
record ``i`` draws its passages with a generator seeded by ``i`` (so every record is a
different concatenation, and a smaller dataset is the prefix of a larger one), starts with
its own number, and has the id ``rec-<i>``.  The JSONL files go to ``--work`` (git-ignored),
are uploaded into the stack's S3 and are deleted at the end (with the stack's data) unless
``--keep``.

The stack (``rise.stack``: Redis, SeaweedFS S3, gateway, one Celery worker with
``--concurrency`` processes, scorer, controller) runs one pool on a tiny random Llama
(hidden size 32, two layers, a byte-level tokenizer) built from a config and pushed to the
stack's S3, and every index is sketched at ``--max-length`` tokens per record with small
sketch widths (``--dims``, ``--topk``): the model and the sketch cost little, so the data
path (download, planning, ranged reads, tokenising, shard writes) is what is measured.

For each worker concurrency a fresh stack is started; a warm-up ingest of 64 records in
shards of 8 loads the model in every worker process; then the idle RSS of the gateway and
of the worker (every process of its group: the Celery main process and its prefork
children, VmRSS from ``/proc/<pid>/status`` summed) is sampled for 3 s: these are the
baselines (the worker's is "its loaded model").  Each ingest (``RiseClient.create_index``,
then ``wait``) runs while a thread samples the same RSS every 0.5 s; the figure is the peak
during the job minus the baseline.  Goals (issue 13): gateway growth < 100 MB and worker
growth < 200 MB at 10^4 and 10^5 records.  Throughput (records/s and MB/s of JSONL, from
the CreateIndex call to the job's end) is compared between 1 and 2 worker processes at
``--throughput-size`` records (default: the smallest size).  Writes
``OUT/ingest-scale.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import save_tiny_model  # noqa: E402
from rise.client import RiseClient, state_name  # noqa: E402
from rise.stack import Stack, minio_client  # noqa: E402

CORPORA = ("lee.jsonl", "wiki.jsonl", "fortunes.jsonl", "gcide.jsonl")
TENANT, TOKEN, POOL = "bench", "tok-bench-ingest-scale", "tiny"
MB = 1e6


# ----------------------------------------------------------------------------- data


def passages(corpus_dir: Path) -> tuple[list[str], dict[str, int]]:
    texts: list[str] = []
    used: dict[str, int] = {}
    for name in CORPORA:
        path = corpus_dir / name
        if not path.exists():
            continue
        n = 0
        with open(path) as f:
            for line in f:
                text = json.loads(line).get("text", "").strip()
                if text:
                    texts.append(text)
                    n += 1
        used[name] = n
    if not texts:
        raise SystemExit(f"no corpus in {corpus_dir}: run make assets-corpus")
    return texts, used


def write_data(path: Path, n: int, pool: list[str], record_bytes: int) -> int:
    """``n`` records of about ``record_bytes`` bytes of real text; returns the file's size."""
    with open(path, "w") as f:
        for i in range(n):
            rng = random.Random(i)
            parts = [f"Record {i}."]
            size = len(parts[0])
            while size < record_bytes:
                p = pool[rng.randrange(len(pool))]
                parts.append(p)
                size += len(p) + 1
            f.write(json.dumps({"id": f"rec-{i:07d}", "text": " ".join(parts)}) + "\n")
    return path.stat().st_size


# ---------------------------------------------------------------------------- memory


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def group_rss_mb(stack: Stack, name: str) -> tuple[float, int]:
    """Summed VmRSS (MB) of the live processes of service ``name`` and how many there are."""
    pids = stack.proc(name).members()
    return sum(rss_kb(p) for p in pids) * 1024 / MB, len(pids)


class Sampler(threading.Thread):
    def __init__(self, stack: Stack, names: list[str], every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.stack, self.names, self.every = stack, names, every
        self.samples: list[dict[str, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            row: dict[str, float] = {"t": time.monotonic()}
            for name in self.names:
                row[name], row[name + ".procs"] = group_rss_mb(self.stack, name)
            self.samples.append(row)
            self.stopping.wait(self.every)

    def stop(self) -> list[dict[str, float]]:
        self.stopping.set()
        self.join()
        return self.samples

    def peak(self, name: str) -> float:
        return max((s[name] for s in self.samples), default=0.0)


def idle_rss(stack: Stack, names: list[str], seconds: float = 3.0) -> dict[str, float]:
    s = Sampler(stack, names)
    s.start()
    time.sleep(seconds)
    rows = s.stop()
    return {n: round(sum(r[n] for r in rows) / len(rows), 1) for n in names} | {
        n + ".procs": max(r[n + ".procs"] for r in rows) for n in names}


# ----------------------------------------------------------------------------- run


def run_stack(args: argparse.Namespace, concurrency: int, model: Path,
              datasets: dict[int, tuple[Path, int]], warm: Path, sizes: list[int],
              runs: list[dict[str, Any]], on_job: Any) -> None:
    worker = f"worker-{POOL}"
    names = ["gateway", worker]
    log = lambda m: print(f"  [c={concurrency}] {m}", flush=True)  # noqa: E731
    stack = Stack.up(args.work / f"stack-c{concurrency}", pools={POOL: str(model)},
                     tokens={TENANT: TOKEN}, gateway_port="auto", scorer_port="auto",
                     metrics_port="auto", die_with_parent=True,
                     worker_concurrency=concurrency, log=log)
    out: dict[str, Any] = {"concurrency": concurrency, "jobs": []}
    runs.append(out)
    try:
        s3 = minio_client(stack.s3["endpoint"], stack.s3["access_key"], stack.s3["secret_key"])
        for path in [warm] + [datasets[n][0] for n in sizes]:
            t0 = time.monotonic()
            s3.fput_object(stack.s3["bucket"], f"tenants/{TENANT}/data/{path.name}", str(path))
            log(f"uploaded {path.name} ({path.stat().st_size / MB:.0f} MB) in "
                f"{time.monotonic() - t0:.1f} s")
        kr, kh, kg = (int(d) for d in args.dims.split(","))
        config = {"max_length": args.max_length, "kr": kr, "kh": kh, "kg": kg,
                  "topk": args.topk}
        with RiseClient(stack.endpoints["gateway"], TOKEN, timeout=600) as c:
            t0 = time.monotonic()
            job = c.wait(c.create_index("warm", f"s3://{stack.s3['bucket']}/tenants/{TENANT}/"
                                        f"data/{warm.name}", POOL, config=config,
                                        shard_size=8).id, timeout=1800)
            if state_name(job) != "SUCCEEDED":
                raise RuntimeError(f"warm-up job {state_name(job)}: {job.error_message}")
            log(f"warm-up ingest done in {time.monotonic() - t0:.1f} s")
            c.delete_index("warm")
            time.sleep(2)
            base = idle_rss(stack, names)
            out["idle"] = base
            log(f"idle RSS: gateway {base['gateway']:.1f} MB, worker {base[worker]:.1f} MB "
                f"({base[worker + '.procs']:.0f} processes)")
            for n in sizes:
                path, size = datasets[n]
                before = idle_rss(stack, names, 1.5)
                sampler = Sampler(stack, names)
                sampler.start()
                t0 = time.monotonic()
                job = c.create_index(f"n{n}", f"s3://{stack.s3['bucket']}/tenants/{TENANT}/"
                                     f"data/{path.name}", POOL, config=config,
                                     shard_size=args.shard_size)
                job = c.wait(job.id, timeout=args.job_timeout)
                seconds = time.monotonic() - t0
                samples = sampler.stop()
                if state_name(job) != "SUCCEEDED":
                    raise RuntimeError(f"ingest of {n} records {state_name(job)}: "
                                       f"{job.error_message}")
                row = {
                    "records": n, "bytes": size, "seconds": round(seconds, 1),
                    "records_per_s": round(n / seconds, 1),
                    "mb_per_s": round(size / MB / seconds, 2),
                    "examples": job.examples_done, "shards": job.shards_total,
                    "gateway_idle_mb": base["gateway"], "worker_idle_mb": base[worker],
                    "gateway_before_mb": before["gateway"], "worker_before_mb": before[worker],
                    "gateway_peak_mb": round(sampler.peak("gateway"), 1),
                    "worker_peak_mb": round(sampler.peak(worker), 1),
                    "worker_procs": max(s[worker + ".procs"] for s in samples),
                    "samples": len(samples)}
                row["gateway_growth_mb"] = round(row["gateway_peak_mb"] - base["gateway"], 1)
                row["worker_growth_mb"] = round(row["worker_peak_mb"] - base[worker], 1)
                out["jobs"].append(row)
                log(f"{n} records ({size / MB:.0f} MB): {seconds:.1f} s, "
                    f"{row['records_per_s']} rec/s; gateway +{row['gateway_growth_mb']} MB, "
                    f"worker +{row['worker_growth_mb']} MB (peak {row['worker_peak_mb']} MB)")
                trace = args.work / f"trace-c{concurrency}-n{n}.json"
                trace.write_text(json.dumps(samples))
                c.delete_index(f"n{n}")
                on_job()
    finally:
        stack.down()


def report_md(rep: dict[str, Any]) -> str:
    g = rep["goals"]
    lines = [
        "# Ingest at scale through the stack: memory and throughput", "",
        f"Command: `{rep['command']}`  ", f"Date: {rep['date']}; machine: {rep['machine']}",
        "",
        f"Data: {rep['data']['how']}", "",
        f"Model: {rep['model']}", "",
        "Memory is the summed VmRSS of each service's processes (the worker: the Celery main "
        "process and its prefork children), sampled every 0.5 s from /proc during the job; "
        "growth is the peak during the job minus the idle baseline measured after a warm-up "
        "ingest (for the worker: with the model loaded in every process).", "",
        "| worker processes | records | JSONL MB | job s | records/s | MB/s | gateway idle MB "
        "| gateway growth MB | worker idle MB | worker peak MB | worker growth MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in rep["runs"]:
        for j in run["jobs"]:
            lines.append(
                f"| {run['concurrency']} | {j['records']:,} | {j['bytes'] / MB:,.0f} "
                f"| {j['seconds']} | {j['records_per_s']} | {j['mb_per_s']} "
                f"| {j['gateway_idle_mb']} | {j['gateway_growth_mb']} | {j['worker_idle_mb']} "
                f"| {j['worker_peak_mb']} | {j['worker_growth_mb']} |")
    lines += ["", "## Verdict", ""]
    lines += [f"- {v}" for v in rep["verdict"]]
    lines += ["", f"Goals: gateway growth < {g['gateway_growth_mb']} MB, worker growth < "
              f"{g['worker_growth_mb']} MB, at 10^4 and 10^5 records."]
    if rep.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rep["notes"]]
    return "\n".join(lines) + "\n"


def verdict(runs: list[dict[str, Any]], goals: dict[str, float], tsize: int) -> list[str]:
    out = []
    for run in runs:
        for j in run["jobs"]:
            ok_g = j["gateway_growth_mb"] < goals["gateway_growth_mb"]
            ok_w = j["worker_growth_mb"] < goals["worker_growth_mb"]
            out.append(f"{j['records']:,} records, {run['concurrency']} worker process(es): "
                       f"gateway +{j['gateway_growth_mb']} MB ({'met' if ok_g else 'NOT met'}), "
                       f"worker +{j['worker_growth_mb']} MB ({'met' if ok_w else 'NOT met'})")
    measured = {j["records"] for r in runs for j in r["jobs"]}
    out += [f"{n:,} records: not measured in this run" for n in (10_000, 100_000)
            if n not in measured]
    rate = {r["concurrency"]: next((j["records_per_s"] for j in r["jobs"]
                                    if j["records"] == tsize), None) for r in runs}
    if rate.get(1) and rate.get(2):
        out.append(f"throughput at {tsize:,} records: {rate[1]} records/s with 1 worker "
                   f"process, {rate[2]} with 2 ({rate[2] / rate[1]:.2f}x)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--concurrency", default="1,2")
    ap.add_argument("--throughput-size", type=int, default=0,
                    help="the size run at every concurrency (default: the smallest); "
                         "the other sizes run at the first concurrency only")
    ap.add_argument("--record-bytes", type=int, default=10_000)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--dims", default="32,16,16",
                    help="CountSketch widths kr,kh,kg (default 32,16,16: the sketch costs "
                         "little, as the model does)")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--job-timeout", type=float, default=7200)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "ingest-scale")
    ap.add_argument("--corpus", type=Path, default=ROOT / ".cache" / "corpus")
    ap.add_argument("--out", type=Path, default=HERE / "reports")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    ap.add_argument("--keep", action="store_true", help="keep the data and the stacks' files")
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    conc = [int(c) for c in args.concurrency.split(",")]
    tsize = args.throughput_size or sizes[0]
    args.work = args.work.resolve()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    def save(runs: list[dict[str, Any]], partial: bool) -> dict[str, Any]:
        """The report as it stands (written after every job, so a stopped run keeps what
        it measured; ``partial`` says so)."""
        goals = {"gateway_growth_mb": 100, "worker_growth_mb": 200}
        rep = {
            "command": "nice -n 10 .venv/bin/python tests/benchmarks/bench_ingest_scale.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                       f"{platform.python_version()}",
            "data": {"corpora": used, "passages": len(pool), "record_bytes": args.record_bytes,
                     "how": f"{len(pool):,} passages of {', '.join(used)} (.cache/corpus, make "
                            f"assets-corpus); record i = 'Record i.' then passages drawn with a "
                            f"generator seeded by i until {args.record_bytes:,} bytes; ids "
                            f"rec-<i>; a smaller dataset is the prefix of a larger one"},
            "model": f"tiny random Llama (conftest.save_tiny_model: hidden 32, 2 layers, byte "
                     f"tokenizer), pushed to the stack's S3; SketchConfig max_length "
                     f"{args.max_length}, dims (kr, kh, kg) = ({args.dims}), topk {args.topk}; shard "
                     f"size {args.shard_size}",
            "goals": goals, "runs": runs, "verdict": verdict(runs, goals, tsize),
            "notes": args.note + (["partial: the run stopped before every job ran"]
                                  if partial else [])}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ingest-scale.json").write_text(json.dumps(rep, indent=2) + "\n")
        (args.out / "ingest-scale.md").write_text(report_md(rep))
        return rep

    try:
        pool, used = passages(args.corpus)
        print(f"{len(pool)} passages from {used}", flush=True)
        model = save_tiny_model("llama", args.work / "tiny-llama")
        warm = args.work / "warm.jsonl"
        write_data(warm, 64, pool, args.record_bytes)
        datasets = {}
        for n in sorted(set(sizes) | {tsize}):
            t0 = time.monotonic()
            path = args.work / f"records-{n}.jsonl"
            datasets[n] = (path, write_data(path, n, pool, args.record_bytes))
            print(f"wrote {path.name}: {datasets[n][1] / MB:.0f} MB in "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
        runs: list[dict[str, Any]] = []
        for i, c in enumerate(conc):
            run_sizes = sorted(set(sizes) | {tsize}) if i == 0 else [tsize]
            run_stack(args, c, model, datasets, warm, run_sizes, runs,
                      lambda: save(runs, partial=True))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    rep = save(runs, partial=False)
    print(report_md(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
