"""Chaos run: every fault shape against the local stack, with counts; a report per run.

From the repository root::

    python -m tests.chaos.run            # the full run (an hour or more; never in CI)
    python -m tests.chaos.run --quick    # one trial of each kind (CI: test_chaos_quick.py)

``make chaos`` writes the committed report (``tests/benchmarks/reports/chaos.json`` and
``chaos.md``); ``make chaos-quick`` and ``--quick`` write to ``.cache/chaos-quick/``
unless ``--out`` says otherwise.

The run brings up a stack of its own (``rise.stack``: Redis, S3, gateway, one worker with
concurrency 1, scorer, and the job controller ``python -m rise.controller`` where that
module exists and the stack did not start one) in a temporary folder, with a tiny random
Llama built from a config as the pool's model, and always brings it down again.  The
services get the timing settings below as ``RISE_*`` variables (``--env`` adds more); one
storage budget holds for the whole run, so the quick run's S3 stop (10 s) fits in its 20 s
and its over-budget outage (40 s) does not, as the full run's 30 s and 60 s stops fit in the
default 300 s and its 360 s outage does not.

Per trial: CreateIndex over the same small dataset (shard size 4) under a new index name;
once the job reports its first shard done, the fault (``faults.shapes``); then the job is
followed for at most ``--trial-timeout`` seconds plus the reference run's time (it follows
the machine's load) after the fault ended.  A job still not ended then is cancelled, so it
cannot disturb the next trial.  Recorded: its end (state,
error code), time to recover (from the end of the fault to the job's ``finished_at``;
negative when it ended during the fault), whether a SUCCEEDED index is byte-identical to
the reference run's (an undisturbed CreateIndex of the same data at the start), the
indexes listed before the fault and not after (indexes lost), and, after every trial ran
and the sweeper had its grace period and two sweep intervals, the orphan objects in each
trial's index folder.  Between trials every process is checked and one that died or stopped
answering is started again (recorded as ``healed``), so one fault does not spill into the
next trial.

Exit status: 0 when every check of ``problems`` passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rise import errors
from rise.client import RiseClient, state_name
from rise.stack import Stack, free_port

from . import faults, measure

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
POOL = "tiny"
TENANT = "chaos"
DATA_KEY = f"tenants/{TENANT}/data/chaos.jsonl"
DATA_URI = f"s3://rise/{DATA_KEY}"
MAX_LENGTH = 256

# Settings of the services (RISE_*), per mode.  The quick run shortens every wait so a
# fixed stack recovers within its trial timeout; the full run keeps the defaults but for
# the sweeper, whose defaults (an hour of grace) would make orphans uncountable here.
QUICK = dict(storage_budget=20.0, controller_interval=1.0, stall=10.0, heartbeat=1.0,
             sweep_grace=5.0, sweep_interval=5.0, trial_timeout=60.0, records=40,
             s3_outage=10.0, settle=10.0)
FULL = dict(storage_budget=300.0, controller_interval=5.0, stall=60.0, heartbeat=5.0,
            sweep_grace=60.0, sweep_interval=30.0, trial_timeout=600.0, records=60,
            s3_outage=10.0, settle=30.0)

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[chaos {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one trial of each kind (CI)")
    ap.add_argument("--out", help="report folder (default: tests/benchmarks/reports, "
                    "--quick: .cache/chaos-quick)")
    ap.add_argument("--work", help="folder of the stack and model (default: a temporary "
                    "folder, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ap.add_argument("--only", default="", help="comma-separated shape names or kinds")
    ap.add_argument("--trials", type=int, help="trials per shape (default: each shape's)")
    ap.add_argument("--records", type=int, help="dataset records (shard size 4)")
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the tiny model")
    ap.add_argument("--layers", type=int, default=6, help="layers of the tiny model")
    ap.add_argument("--trial-timeout", type=float,
                    help="seconds a job may take to end after its fault ended")
    ap.add_argument("--first-shard-timeout", type=float, default=120.0)
    ap.add_argument("--settle", type=float, help="seconds an index may take to be listed "
                    "again after its job ended")
    ap.add_argument("--storage-budget", type=float,
                    help="RISE_STORAGE_RETRY_BUDGET_SECONDS; the over-budget outage exceeds it")
    ap.add_argument("--over-budget-outage", type=float,
                    help="seconds S3 stays down in s3-over-budget (default: budget + "
                    "max(20, budget / 5))")
    ap.add_argument("--s3-outage", type=float, help="seconds of the quick run's S3 stop")
    ap.add_argument("--controller-interval", type=float,
                    help="RISE_CONTROLLER_INTERVAL_SECONDS")
    ap.add_argument("--stall", type=float, help="RISE_SHARD_STALL_SECONDS")
    ap.add_argument("--heartbeat", type=float, help="RISE_HEARTBEAT_SECONDS")
    ap.add_argument("--sweep-grace", type=float, help="RISE_SWEEP_GRACE_SECONDS; orphans "
                    "are counted once this and two sweep intervals have passed")
    ap.add_argument("--sweep-interval", type=float, help="RISE_SWEEP_INTERVAL_SECONDS")
    ap.add_argument("--env", action="append", default=[], metavar="RISE_KEY=VALUE",
                    help="another setting for the services (repeatable)")
    ap.add_argument("--render", metavar="CHAOS_JSON", help="no run: write the report of "
                    "an earlier run's chaos.json to --out again")
    ap.add_argument("--code-label", default="", help="what code ran, for the report "
                    "(default: this checkout's commit, and whether services/ has changes)")
    opts = ap.parse_args(argv)
    mode = QUICK if opts.quick else FULL
    for k, v in mode.items():
        if getattr(opts, k, None) is None:
            setattr(opts, k, v)
    if opts.over_budget_outage is None:
        opts.over_budget_outage = opts.storage_budget + max(20.0, opts.storage_budget / 5)
    if opts.out is None:
        opts.out = str(REPO / (".cache/chaos-quick" if opts.quick
                               else "tests/benchmarks/reports"))
    return opts


def service_env(opts: argparse.Namespace) -> dict[str, str]:
    env = {
        "RISE_STORAGE_RETRY_BUDGET_SECONDS": f"{opts.storage_budget:g}",
        "RISE_CONTROLLER_INTERVAL_SECONDS": f"{opts.controller_interval:g}",
        "RISE_SHARD_STALL_SECONDS": f"{opts.stall:g}",
        "RISE_HEARTBEAT_SECONDS": f"{opts.heartbeat:g}",
        "RISE_SWEEP_GRACE_SECONDS": f"{opts.sweep_grace:g}",
        "RISE_SWEEP_INTERVAL_SECONDS": f"{opts.sweep_interval:g}",
    }
    for item in opts.env:
        k, sep, v = item.partition("=")
        if not sep or not k.startswith("RISE_"):
            raise SystemExit(f"--env {item!r}: expected RISE_KEY=VALUE")
        env[k] = v
    return env


def selected_shapes(opts: argparse.Namespace) -> list[tuple[faults.Shape, int]]:
    all_shapes = faults.shapes(opts.storage_budget, opts.over_budget_outage, opts.s3_outage)
    only = {s for s in opts.only.split(",") if s}
    out = []
    for s in all_shapes:
        if only and s.name not in only and s.kind not in only:
            continue
        n = opts.trials if opts.trials is not None else (1 if opts.quick else s.trials)
        if (opts.quick and not s.quick) or (not opts.quick and not s.trials and not only):
            continue
        if n > 0:
            out.append((s, n))
    if not out:
        raise SystemExit(f"no shape selected by --only {opts.only!r}")
    return out


# ------------------------------------------------------------------------------ set-up


def build_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama with the tests' byte tokenizer, big enough that a shard of 4 records
    takes about half a second on one core: faults land while the job runs."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    conftest = importlib.import_module("conftest")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=conftest.VOCAB, bos_token_id=256, eos_token_id=256,
                      pad_token_id=257, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=2 * hidden, max_position_embeddings=2 * MAX_LENGTH,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    conftest.byte_tokenizer().save_pretrained(folder)
    return folder


WORDS = ("shard manifest sketch worker broker bucket index query tenant gateway residual "
         "hidden head token prompt response object store redis retry budget lease fence "
         "controller sweeper orphan recover restart outage signal process queue").split()


def dataset(n: int) -> bytes:
    """``n`` records of 30-50 words (about 250-400 bytes, cut to 256 tokens), fixed seed."""
    rng = random.Random(0)
    rows = [{"id": f"rec-{i:04d}",
             "text": f"Record {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 50)))}
            for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@contextlib.contextmanager
def services_env(extra: dict[str, str]):
    """For a ``Stack.up`` without its ``env`` parameter (older checkouts), which passes no
    RISE_* variable of its caller on (``clean_env``): wrap the ``clean_env`` its services
    module calls so the services also get ``extra`` (the stack's own settings win over
    them).  ``ensure_env`` checks the result either way."""
    from rise.stack import services

    orig = services.clean_env

    def with_extra(d: dict[str, str]) -> dict[str, str]:
        return orig({**extra, **d})

    services.clean_env = with_extra
    try:
        yield
    finally:
        services.clean_env = orig


def ensure_env(chaos: faults.Chaos, extra: dict[str, str]) -> list[str]:
    """Restart, with ``extra`` added, any service that did not get it."""
    fixed = []
    for p in list(chaos.stack.procs):
        if p.name in faults.SERVERS:
            continue
        launch = chaos.launches[p.name]
        if all(launch.env.get(k) == v for k, v in extra.items()):
            continue
        launch.env.update(extra)
        chaos.stop(p.name)
        chaos.start(p.name)
        fixed.append(p.name)
    return fixed


def ensure_controller(chaos: faults.Chaos) -> str:
    """Start ``python -m rise.controller`` beside the stack if that module exists and the
    stack did not start a process named ``controller``."""
    if "controller" in chaos.names():
        return "started by the stack"
    if importlib.util.find_spec("rise.controller") is None:
        return "none (no rise.controller module)"
    gw = chaos.launches["gateway"]
    port = free_port()
    chaos.add("controller", [sys.executable, "-m", "rise.controller"],
              {**gw.env, "RISE_METRICS_PORT": str(port)}, gw.cwd, ports={"metrics": port})
    if not chaos.responsive("controller", 15):
        raise RuntimeError("the controller exited at start:\n"
                           + chaos.proc("controller").log_tail())
    return "started by the harness"


# ------------------------------------------------------------------------------ trials


def submit(client: RiseClient, name: str, shard_size: int):
    """CreateIndex, retried for a while if the gateway is briefly unavailable."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.create_index(name, DATA_URI, POOL, shard_size=shard_size,
                                       config={"max_length": MAX_LENGTH})
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def reference(client: RiseClient, s3, opts) -> dict[str, Any]:
    t0 = time.time()
    job = submit(client, "reference", opts.shard_size)
    watch = measure.JobWatch(client, job.id, t0)
    watch.wait_end(time.monotonic() + 300)
    if not watch.ended or state_name(watch.job) != "SUCCEEDED":
        raise RuntimeError(f"the undisturbed reference run did not succeed: "
                           f"{watch.job and state_name(watch.job)} "
                           f"{watch.job and watch.job.error_message}")
    fp = measure.fingerprint(s3, TENANT, "reference")
    if fp is None:
        raise RuntimeError("the reference index has no manifest")
    return {"fingerprint": fp, "job_s": round(watch.end_time() - t0, 2),
            "shards": len(fp["shards"])}


def run_trial(chaos: faults.Chaos, client: RiseClient, s3, ref: dict[str, Any],
              shape: faults.Shape, k: int, opts) -> dict[str, Any]:
    name = f"{shape.name}-{k:02d}"
    rec: dict[str, Any] = {"shape": shape.name, "kind": shape.kind, "trial": k, "index": name,
                           "expect": shape.expect, "submitted": False, "fault_injected": False,
                           "ended": False}
    rec["healed_before"] = chaos.heal()
    before = measure.committed(measure.listed(client))
    t_submit = time.time()
    try:
        job = submit(client, name, opts.shard_size)
    except errors.RiseError as e:
        rec["error"] = f"CreateIndex: {type(e).__name__}: {e}"
        return rec
    rec.update(submitted=True, job_id=job.id)
    watch = measure.JobWatch(client, job.id, t_submit)
    watch.wait(lambda j: j.shards_done >= 1, time.monotonic() + opts.first_shard_timeout, 0.1)
    fault_end = None
    if watch.ended:
        rec["fault_missed"] = "the job ended before its first shard was seen"
    elif watch.job is None or watch.job.shards_done < 1:
        rec["fault_missed"] = f"no shard done within {opts.first_shard_timeout:g} s"
    else:
        rec["shards_done_at_fault"] = watch.job.shards_done
        t_fault = time.time()
        try:
            rec["fault"] = shape.inject(chaos, faults.Target(client, job.id, name), watch.tick)
            rec["fault_injected"] = True
        except Exception as e:  # noqa: BLE001 - recorded; the stack is healed below
            rec["fault_error"] = f"{type(e).__name__}: {e}"
        fault_end = time.time()
        rec["fault_s"] = round(fault_end - t_fault, 2)
    # The allowance for recovery on top of what the job needs undisturbed (the reference
    # run's time, which follows the machine's load).
    deadline = time.monotonic() + opts.trial_timeout + ref["job_s"]
    watch.wait_end(deadline)
    if not watch.ended:  # one more look after healing: a dead gateway is not a hung job
        rec["healed_after"] = chaos.heal()
        watch.wait_end(min(deadline, time.monotonic() + 10))
    job = watch.job
    rec["ended"] = watch.ended
    rec["state"] = state_name(job) if job is not None else "UNKNOWN"
    if job is not None:
        rec.update(error_code=job.error_code, error_message=job.error_message[:300],
                   shards_done=job.shards_done, shards_total=job.shards_total,
                   examples_done=job.examples_done, examples_total=job.examples_total)
        rec["examples_overcount"] = job.examples_done > job.examples_total > 0
    end = watch.end_time()
    if end is not None:
        rec["job_s"] = round(end - t_submit, 2)
        if fault_end is not None:
            rec["recover_s"] = round(end - fault_end, 2)
    else:
        rec["not_found_polls"] = watch.errors.get("NotFound", 0)
        with contextlib.suppress(errors.RiseError):
            rec["jobs_of_index"] = [[j.id == rec["job_id"], state_name(j)]
                                    for j in client.list_jobs(index=name, limit=10)]
        with contextlib.suppress(errors.RiseError):
            client.cancel_job(rec["job_id"])
            rec["cancelled_by_harness"] = True
    rec["poll_errors"] = dict(watch.errors)
    rec["poll_error_messages"] = watch.error_messages
    rec["last_poll"] = watch.last_outcome
    rec["timeline"] = watch.timeline[-40:]
    rec.setdefault("healed_after", [])
    rec["healed_after"] += chaos.heal()

    deleted = {name} if shape.kind == "cancel-delete" else set()
    want = (before - deleted) | ({name} if rec["state"] == "SUCCEEDED" else set())
    rec["indexes_before"] = len(before)
    rec["indexes_lost"] = sorted(measure.lost(client, want, opts.settle))
    rec["index_listed"] = name in (measure.listed(client, 10) or {})
    if rec["state"] == "SUCCEEDED":
        got = measure.fingerprint(s3, TENANT, name)
        same, why, manifest_equal = measure.compare(ref["fingerprint"], got)
        rec.update(byte_identical=same, manifest_equal=manifest_equal)
        if why:
            rec["identical_detail"] = why
    rec["as_expected"] = as_expected(rec)
    return rec


def as_expected(rec: dict[str, Any]) -> bool:
    if not rec.get("ended"):
        return False
    want = rec["expect"]
    if want == "ENDED":
        return True
    state, _, code = want.partition(":")
    return rec["state"] == state and (not code or rec.get("error_code") == code)


# ------------------------------------------------------------------------------ the run


def stamp(opts, env: dict[str, str]) -> dict[str, Any]:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    runstamp = importlib.import_module("runstamp")  # tests/runstamp.py
    return {
        "code": runstamp.code_label(opts.code_label),
        **runstamp.machine(),
        "mode": "quick" if opts.quick else "full",
        "settings": env,
        "params": {"records": opts.records, "shard_size": opts.shard_size,
                   "max_length": MAX_LENGTH, "model": f"llama hidden {opts.hidden}, "
                   f"{opts.layers} layers (random)", "worker_concurrency": 1,
                   "trial_timeout_s": opts.trial_timeout, "settle_s": opts.settle,
                   "over_budget_outage_s": opts.over_budget_outage},
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """The whole run; returns the report (also written to ``opts.out``)."""
    env = service_env(opts)
    plan = selected_shapes(opts)
    report: dict[str, Any] = {"header": stamp(opts, env), "trials": []}
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="rise-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    scrub_paths = [str(work.resolve()), str(REPO), str(Path.home())]
    t_start = time.monotonic()
    stack = None
    ok = False
    try:
        log(f"model and data in {work}")
        model = build_model(work / "model", opts.hidden, opts.layers)
        token = "chaos-" + os.urandom(8).hex()
        kw = dict(pools={POOL: str(model)}, tokens={TENANT: token}, gateway_port="auto",
                  scorer_port="auto", metrics_port="auto", die_with_parent=True)
        if "env" in inspect.signature(Stack.up).parameters:
            stack = Stack.up(work / "stack", env=env, **kw)
        else:  # a stack that passes no settings on: see services_env
            with services_env(env):
                stack = Stack.up(work / "stack", **kw)
        log(f"stack up in {stack.start_seconds.get('total')} s")
        chaos = faults.Chaos(stack, log=log)
        report["header"]["env_restarted"] = ensure_env(chaos, env)
        report["header"]["controller"] = ensure_controller(chaos)
        report["header"]["processes"] = chaos.names()
        s3 = chaos.s3()
        data = dataset(opts.records)
        s3.put_object("rise", DATA_KEY, io.BytesIO(data), len(data))
        with RiseClient(stack.endpoints["gateway"], token, timeout=10) as client:
            ref = reference(client, s3, opts)
            log(f"reference: {ref['shards']} shards in {ref['job_s']} s")
            report["header"]["reference"] = {"job_s": ref["job_s"], "shards": ref["shards"]}
            for shape, n in plan:
                for k in range(n):
                    rec = run_trial(chaos, client, s3, ref, shape, k, opts)
                    report["trials"].append(rec)
                    log(line(rec))
            report["header"]["healed_at_end"] = chaos.heal()
            wait = opts.sweep_grace + 2 * opts.sweep_interval + 5
            log(f"waiting {wait:g} s for the sweeper (grace {opts.sweep_grace:g} s, "
                f"interval {opts.sweep_interval:g} s)")
            faults.pause(wait)
            deleted = {r["index"] for r in report["trials"] if r["kind"] == "cancel-delete"}
            bucket = measure.census(s3, TENANT, deleted)
            for rec in report["trials"]:
                folder = bucket.get(rec["index"], {})
                rec["orphans"] = len(folder.get("orphans", []))
                rec["orphan_keys"] = folder.get("orphans", [])[:10]
                rec["unknown_objects"] = folder.get("unknown", [])[:10]
            trial_names = {r["index"] for r in report["trials"]}
            report["header"]["orphans_elsewhere"] = {
                name: len(v["orphans"]) for name, v in bucket.items()
                if name not in trial_names and v["orphans"]}
        ok = True
    except BaseException as e:
        report["header"]["aborted"] = f"{type(e).__name__}: {e}"
        log(f"aborted: {type(e).__name__}: {e}")
        raise
    finally:
        if stack is not None:
            killed = stack.down()
            log(f"stack down ({len(killed)} process(es) needed SIGKILL)")
        report["header"]["wall_s"] = round(time.monotonic() - t_start, 1)
        derive(report)
        report = scrub(report, scrub_paths)
        if report["trials"] or ok:
            write(report, Path(opts.out))
        if opts.work is None and not opts.keep and ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work folder kept: {work}")
    return report


def line(rec: dict[str, Any]) -> str:
    parts = [f"{rec['index']}: {rec.get('state', '-')}"]
    if rec.get("error_code"):
        parts.append(rec["error_code"])
    for k in ("recover_s", "byte_identical", "indexes_lost", "fault_error", "fault_missed",
              "error", "healed_after"):
        if rec.get(k) not in (None, [], ""):
            parts.append(f"{k}={rec[k]}")
    return " ".join(str(p) for p in parts)


def scrub(obj: Any, paths: list[str]) -> Any:
    """Machine paths out of every string of the report (error messages quote logs)."""
    if isinstance(obj, str):
        for p, rep in zip(paths, ("<work>", ".", "~"), strict=True):
            if p and p != "/":
                obj = obj.replace(p, rep)
        return obj
    if isinstance(obj, dict):
        return {k: scrub(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, paths) for v in obj]
    return obj


# ------------------------------------------------------------------------------ report


def derive(report: dict[str, Any]) -> None:
    """The figures computed from the trials: each trial's extra time, the summary per
    shape, the failed checks."""
    # What each fault cost: a trial's job time over an undisturbed one's (the control
    # trials', else the reference run's, which includes the model's load).
    controls = [r["job_s"] for r in report["trials"]
                if r["kind"] == "none" and r.get("state") == "SUCCEEDED"]
    ref = report["header"].get("reference", {}).get("job_s")
    base = statistics.median(controls) if controls else ref
    if base is not None:
        report["header"]["undisturbed_job_s"] = round(base, 2)
        for rec in report["trials"]:
            if rec.get("job_s") is not None and rec.get("state") == "SUCCEEDED":
                rec["extra_s"] = round(rec["job_s"] - base, 2)
    report["summary"] = summarize(report["trials"])
    report["problems"] = problems(report)


def summarize(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rec in trials:
        s = out.setdefault(rec["shape"], {
            "kind": rec["kind"], "expect": rec["expect"], "trials": 0, "ended": 0,
            "states": Counter(), "failed_codes": Counter(), "succeeded": 0,
            "byte_identical": 0, "indexes_lost": 0, "orphans": 0, "recover": [], "extra": [],
            "as_expected": 0, "fault_not_injected": 0, "healed": 0, "overcount": 0})
        s["trials"] += 1
        s["ended"] += bool(rec.get("ended"))
        state = rec.get("state", "NOT SUBMITTED") if rec.get("submitted") else "NOT SUBMITTED"
        s["states"][state if rec.get("ended") or state == "NOT SUBMITTED"
                    else f"{state} (not ended)"] += 1
        if rec.get("state") == "FAILED":
            s["failed_codes"][rec.get("error_code") or "?"] += 1
        s["succeeded"] += rec.get("state") == "SUCCEEDED"
        s["byte_identical"] += bool(rec.get("byte_identical"))
        s["indexes_lost"] += len(rec.get("indexes_lost", []))
        s["orphans"] += rec.get("orphans", 0)
        if rec.get("recover_s") is not None:
            s["recover"].append(rec["recover_s"])
        if rec.get("extra_s") is not None:
            s["extra"].append(rec["extra_s"])
        s["as_expected"] += bool(rec.get("as_expected"))
        s["fault_not_injected"] += not rec.get("fault_injected")
        s["healed"] += bool(rec.get("healed_after"))
        s["overcount"] += bool(rec.get("examples_overcount"))
    for s in out.values():
        r = s.pop("recover")
        s["recover_median_s"] = round(statistics.median(r), 2) if r else None
        s["recover_max_s"] = round(max(r), 2) if r else None
        x = s.pop("extra")
        s["extra_median_s"] = round(statistics.median(x), 2) if x else None
        s["states"] = dict(s["states"])
        s["failed_codes"] = dict(s["failed_codes"])
    return out


def problems(report: dict[str, Any]) -> list[str]:
    """What the issue asks of every run: every job ended, no index lost, no orphan after
    the sweeper, the over-budget outage FAILED with UNAVAILABLE, every SUCCEEDED index
    byte-identical to the reference; and the control trial SUCCEEDED (else the harness
    itself is broken)."""
    out = []
    if report["header"].get("aborted"):
        out.append(f"run aborted: {report['header']['aborted']}")
    for r in report["trials"]:
        who = r["index"]
        if not r.get("submitted"):
            out.append(f"{who}: not submitted ({r.get('error')})")
            continue
        if not r.get("fault_injected") and r["kind"] != "none":
            out.append(f"{who}: fault not injected "
                       f"({r.get('fault_error') or r.get('fault_missed')})")
        if not r.get("ended"):
            then = (f", then GetJob gave {r['last_poll']}"
                    if r.get("last_poll") and r["last_poll"] != r.get("state") else "")
            out.append(f"{who}: job did not end (last seen {r.get('state')}, "
                       f"{r.get('shards_done', '?')}/{r.get('shards_total', '?')} shards{then})")
        if r.get("indexes_lost"):
            out.append(f"{who}: indexes lost: {', '.join(r['indexes_lost'])}")
        if r.get("orphans"):
            out.append(f"{who}: {r['orphans']} orphan object(s) after the sweeper, e.g. "
                       f"{r['orphan_keys'][:2]}")
        if r["kind"] == "s3-over-budget" and r.get("ended") and not (
                r.get("state") == "FAILED" and r.get("error_code") == "UNAVAILABLE"):
            out.append(f"{who}: ended {r.get('state')} {r.get('error_code') or ''} "
                       "(want FAILED UNAVAILABLE)")
        if r.get("state") == "SUCCEEDED" and not r.get("byte_identical"):
            out.append(f"{who}: SUCCEEDED but not byte-identical: {r.get('identical_detail')}")
        if r["kind"] == "none" and r.get("state") != "SUCCEEDED":
            out.append(f"{who}: the control trial (no fault) ended {r.get('state')}")
    return out


def markdown(report: dict[str, Any]) -> str:
    h = report["header"]
    title = "quick run, one trial of each kind" if h["mode"] == "quick" else "full run"
    again = ("`make chaos-quick` (`python -m tests.chaos.run --quick`)" if h["mode"] == "quick"
             else "`make chaos` (`python -m tests.chaos.run`)")
    lines = [
        f"# Chaos: every job ends ({title})", "",
        f"Code: {h['code']}; {h['date']}; {h['cpu']}, {h['cpu_count']} cores; "
        f"python {h['python']}; load average at start {h['loadavg_start']}; "
        f"whole run {h.get('wall_s')} s.", "",
        f"Reproduce: {again}; the harness is `tests/chaos/`.", "",
        f"Each trial: CreateIndex of {h['params']['records']} records at shard size "
        f"{h['params']['shard_size']} ({h['params']['model']}, max_length "
        f"{h['params']['max_length']}, one worker of concurrency 1); the fault once the job "
        f"reported its first shard; the job followed for at most "
        f"{h['params']['trial_timeout_s']:g} s plus the reference run's time after the fault "
        f"ended.  Reference (undisturbed) "
        f"run: {h.get('reference', {}).get('shards', '?')} shards in "
        f"{h.get('reference', {}).get('job_s', '?')} s.  Controller: "
        f"{h.get('controller', '?')}.", "",
        "Services' settings: " + ", ".join(f"`{k}={v}`" for k, v in h["settings"].items())
        + ".", "",
        "Columns: *ended* = reached SUCCEEDED, FAILED or CANCELLED; *identical* = SUCCEEDED "
        "and its shard bytes and manifest shard list equal the reference's; *lost* = indexes "
        "listed before the fault and not after (or the trial's own SUCCEEDED index not "
        "listed); *orphans* = objects in the trial's index folder that no manifest names, "
        "counted after every trial ran and the sweeper had its grace and two intervals; "
        "*recover* = from the end of the fault to the job's end (negative: it ended during "
        "the fault); *extra* = a SUCCEEDED job's time over an undisturbed job's "
        f"({h.get('undisturbed_job_s', '?')} s: the control trials' median).", "",
        "| shape | expect | trials | ended | SUCCEEDED | FAILED (codes) | other ends | "
        "identical | lost | orphans | recover median / max (s) | extra median (s) | "
        "as expected |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for name, s in report["summary"].items():
        failed = sum(s["failed_codes"].values())
        codes = ", ".join(f"{c} {n}" for c, n in s["failed_codes"].items())
        other = ", ".join(f"{k} {v}" for k, v in s["states"].items()
                          if k not in ("SUCCEEDED", "FAILED"))
        rec = ("-" if s["recover_median_s"] is None
               else f"{s['recover_median_s']:g} / {s['recover_max_s']:g}")
        lines.append(
            f"| {name} | {s['expect']} | {s['trials']} | {s['ended']} | {s['succeeded']} | "
            f"{failed}{f' ({codes})' if codes else ''} | {other or '-'} | "
            f"{s['byte_identical']}/{s['succeeded']} | {s['indexes_lost']} | {s['orphans']} | "
            f"{rec} | {_num(s['extra_median_s'])} | {s['as_expected']}/{s['trials']} |")
    lines += ["", "## Trials", ""]
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for r in report["trials"]:
        by_shape.setdefault(r["shape"], []).append(r)
    for name, recs in by_shape.items():
        lines += [f"### {name}", "",
                  "| trial | end | code | fault s | recover s | job s | extra s | identical | "
                  "lost | orphans | notes |", "|---:|---|---|---:|---:|---:|---:|---|---|---:|---|"]
        for r in recs:
            notes = []
            if not r.get("ended"):
                notes.append(f"not ended: {r.get('shards_done', '?')}/"
                             f"{r.get('shards_total', '?')} shards"
                             + (f", then GetJob gave {r['last_poll']}"
                                if r.get("last_poll") and r["last_poll"] != r.get("state")
                                else "")
                             + (", cancelled by the harness" if r.get("cancelled_by_harness")
                                else ""))
            for k in ("fault_missed", "fault_error", "error"):
                if r.get(k):
                    notes.append(f"{k.replace('_', ' ')}: {r[k]}")
            if r.get("examples_overcount"):
                notes.append(f"examples_done {r['examples_done']} > {r['examples_total']}")
            if r.get("identical_detail"):
                notes.append(r["identical_detail"])
            if r.get("state") in ("FAILED", "CANCELLED") and r["kind"] != "cancel-delete" \
                    and r.get("index_listed"):
                notes.append("its name stays taken")
            if r["kind"] == "cancel-delete" and r.get("index_listed"):
                notes.append("deleted index still listed")
            if r.get("healed_after"):
                notes.append("healed: " + "; ".join(r["healed_after"]))
            if r.get("error_message") and r.get("state") == "FAILED":
                notes.append(f"message: {r['error_message'][:120]}")
            ident = "-" if r.get("state") != "SUCCEEDED" else ("yes" if r.get("byte_identical")
                                                                else "NO")
            lines.append(
                f"| {r['trial']} | {r.get('state', '-')} | {r.get('error_code') or '-'} | "
                f"{_num(r.get('fault_s'))} | {_num(r.get('recover_s'))} | {_num(r.get('job_s'))} "
                f"| {_num(r.get('extra_s'))} | {ident} | {', '.join(r.get('indexes_lost', [])) or '0'} | "
                f"{r.get('orphans', '-')} | {'; '.join(notes).replace('|', '/') or '-'} |")
        lines.append("")
    if report.get("problems"):
        lines += ["## Checks that failed", ""] + [f"- {p}" for p in report["problems"]] + [""]
    else:
        lines += ["## Checks", "", "Every check passed.", ""]
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:g}"


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    (out / "chaos.md").write_text(markdown(report))
    log(f"report: {out / 'chaos.md'}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.render:  # the report again from its JSON (after a change of the report's form)
        report = json.loads(Path(opts.render).read_text())
        derive(report)
        write(report, Path(opts.out))
    else:
        report = run(opts)
    print(markdown(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
