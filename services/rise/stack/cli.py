"""The whole RISE platform on one machine, as background processes: a development stack.

    python -m rise.stack up      [--dir .cache/stack] [--pool NAME=MODEL ...] [--no-push]
                                 [--token TENANT=TOKEN ...] [--gateway-port 50051]
                                 [--scorer-port 50052] [--metrics-port 9464]
                                 [--redis-port auto] [--s3-port auto] [--worker-concurrency 1]
    python -m rise.stack status  [--dir .cache/stack] [--json]
    python -m rise.stack down    [--dir .cache/stack]

``up`` waits until everything answers, writes ``<dir>/stack.json`` and prints the
endpoints, the tokens and an ``export RISE_GATEWAY=... RISE_TOKEN=...`` line; ``status``
exits 3 unless every recorded process runs; ``down`` stops exactly what stack.json records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rise.stack.services import DEFAULT_DIR, DEFAULT_POOL, STATE, Stack

PROG = "rise.stack"


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k or not v:
            raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
        if k in out:
            raise ValueError(f"{what} {k!r} given twice")
        out[k] = v
    return out


def _print_up(stack: Stack) -> None:
    e = stack.endpoints
    lines = [f"RISE stack up in {stack.dir} ({stack.start_seconds.get('total', 0):.1f} s)",
             f"  gateway   {e['gateway']}   (rise remote --gateway {e['gateway']} ...)",
             f"  scorer    {e['scorer']}", f"  redis     {e['redis']}",
             f"  s3        {e['s3']}  bucket {stack.s3['bucket']}  "
             f"access key {stack.s3['access_key']}  (secret in {STATE})"]
    lines += [f"  metrics   {name:<9} {url}" for name, url in e["metrics"].items()]
    lines += [f"  pool      {k} = {v}" + (f"  (pushed from {stack.models[k]})"
                                           if k in stack.models else "")
              for k, v in stack.pools.items()]
    lines += [f"  token     {tenant}: {tok}" for tenant, tok in stack.tokens.items()]
    lines += [f"  logs      {stack.dir}/*.log", "",
              f"export RISE_GATEWAY={stack.env()['RISE_GATEWAY']} "
              f"RISE_TOKEN={stack.env()['RISE_TOKEN']}"]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the stack in the background")
    st = sub.add_parser("status", help="which recorded processes run; are they serving")
    dn = sub.add_parser("down", help="stop exactly the processes stack.json records")
    for p in (up, st, dn):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"state, logs, data (default: {DEFAULT_DIR})")
    up.add_argument("--gateway-port", default="50051")
    up.add_argument("--scorer-port", default="50052")
    up.add_argument("--metrics-port", default="9464",
                    help="gateway /metrics; the worker uses +1, the scorer +2, the controller +3 "
                         "(default: 9464)")
    up.add_argument("--redis-port", default="auto")
    up.add_argument("--s3-port", default="auto")
    up.add_argument("--worker-concurrency", type=int, default=1, metavar="N",
                    help="processes of each pool's Celery worker (default: 1)")
    up.add_argument("--pool", action="append", metavar="NAME=MODEL",
                    help="a worker pool, repeatable: a model folder, s3://bucket/prefix/ or a "
                         f"hub id (default: {DEFAULT_POOL})")
    up.add_argument("--no-push", action="store_true",
                    help="pools load their model folders in place (default: each folder is "
                         "pushed into the stack's S3 and the pool names its s3:// URI)")
    up.add_argument("--token", action="append", metavar="TENANT=TOKEN",
                    help="a tenant's bearer token, repeatable (default: demo=<random>)")
    st.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "up":
            stack = Stack.up(a.dir, pools=parse_pairs(a.pool, "--pool"),
                             tokens=parse_pairs(a.token, "--token"),
                             gateway_port=a.gateway_port, scorer_port=a.scorer_port,
                             metrics_port=a.metrics_port, redis_port=a.redis_port,
                             s3_port=a.s3_port, push_models=not a.no_push,
                             worker_concurrency=a.worker_concurrency,
                             log=lambda m: print(m, file=sys.stderr))
            _print_up(stack)
            return 0
        if not Stack.state_path(a.dir).exists():
            print(f"{PROG}: no stack recorded in {Path(a.dir).resolve()}", file=sys.stderr)
            return 0 if a.cmd == "down" else 1
        stack = Stack.load(a.dir)
        if a.cmd == "down":
            killed = stack.down()
            print(f"stopped {len(stack.procs)} process groups"
                  + (f" (SIGKILL: {killed})" if killed else ""))
            return 0
        rows = stack.status()
        if a.json:
            print(json.dumps({"endpoints": stack.endpoints, "processes": rows}, indent=2))
        else:
            for name, r in rows.items():
                state = "running" if r["running"] else "stopped"
                if "serving" in r:
                    state += ", serving" if r["serving"] else ", NOT serving"
                print(f"{name:<16} pid {r['pid']:<8} {state:<20} ports {r['ports']}")
        return 0 if all(r["running"] for r in rows.values()) else 3
    except (RuntimeError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
