"""A picture of the RISE dashboard's panels from a real local run (``make dashboard-picture``).

Starts the local stack (rise.stack: Redis, S3, gateway, one CPU worker with SmolLM2-135M,
scorer, controller) and a real Prometheus (Debian's ``prometheus``) scraping every /metrics
each second, then runs a few jobs as a user would through the gateway:

1. CreateIndex ``lee`` (the first lee docs), and while it runs a second CreateIndex
   ``lee-b`` that waits in the pool's queue behind it (queue wait);
2. a CreateIndex of a dataset that is not JSONL, which ends FAILED (error rate);
3. Attribute calls with the lee queries (gateway and scorer latency), an AppendToIndex to
   ``lee`` and more Attribute calls.

Every panel of deploy/grafana/rise-dashboard.json is then evaluated over the run with
Prometheus' range API (each variable at "All", ``$__rate_interval`` = 30 s) and drawn at its
place on the dashboard's grid with matplotlib into ``docs/dashboard.png``.  GPU panels
stay empty on this CPU machine (they say so).  Needs ``make assets-model assets-lee``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "deploy"))
from promstack import DASHBOARD, Prometheus, expand, legend  # noqa: E402

MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"
LEE = REPO / ".cache" / "corpus" / "lee.jsonl"
LEE_QUERIES = REPO / ".cache" / "corpus" / "lee-queries.jsonl"
POOL, TENANT = "smollm2", "demo"
RATE = "30s"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_jobs(stack, docs: int) -> None:
    """The jobs of the picture, through the gateway as a user runs them."""
    from rise.client import RiseClient, state_name
    from rise.stack import minio_client

    s3 = stack.s3
    client = minio_client(s3["endpoint"], s3["access_key"], s3["secret_key"])
    lines = LEE.read_text().splitlines()
    queries = [json.loads(x) for x in LEE_QUERIES.read_text().splitlines() if x.strip()]
    parts = {"a.jsonl": lines[:docs], "b.jsonl": lines[docs:docs + docs // 2],
             "c.jsonl": lines[docs + docs // 2:docs * 2],
             "bad.jsonl": ["this is not JSON"] * 4}
    for name, rows in parts.items():
        data = ("\n".join(rows) + "\n").encode()
        client.put_object(s3["bucket"], f"tenants/{TENANT}/data/{name}", io.BytesIO(data),
                          len(data))

    def uri(name: str) -> str:
        return f"s3://{s3['bucket']}/tenants/{TENANT}/data/{name}"

    config = {"max_length": 128}
    with RiseClient(stack.endpoints["gateway"], stack.tokens[TENANT], timeout=600) as c:
        a = c.create_index("lee", uri("a.jsonl"), POOL, shard_size=8, config=config)
        time.sleep(2)
        b = c.create_index("lee-b", uri("b.jsonl"), POOL, shard_size=8, config=config)
        log(f"jobs {a.id} (lee) and {b.id} (lee-b, queued behind it) submitted")
        assert state_name(c.wait(a.id, timeout=1800, interval=1)) == "SUCCEEDED"
        bad = c.create_index("bad", uri("bad.jsonl"), POOL, shard_size=8, config=config)
        stop = threading.Event()

        def ask() -> None:
            n = 0
            with RiseClient(stack.endpoints["gateway"], stack.tokens[TENANT], timeout=600) as q:
                while not stop.is_set():
                    q.attribute("lee", [queries[n % len(queries)]], top=5)
                    n += 1
                    stop.wait(1.0)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        for job in (b, bad):
            log(f"job {job.id}: {state_name(c.wait(job.id, timeout=1800, interval=1))}")
        time.sleep(5)
        d = c.append("lee", uri("c.jsonl"))
        log(f"job {d.id}: {state_name(c.wait(d.id, timeout=1800, interval=1))}")
        time.sleep(10)
        stop.set()
        asker.join(timeout=60)


UNIT = {"bytes": (1 / 2**20, "MiB"), "percentunit": (100, "%"), "s": (1, "s"),
        "reqps": (1, "/s"), "short": (1, "")}


def evaluate(prom: Prometheus, start: float, end: float) -> dict[str, list]:
    """"<panel id>/<refId>" -> the range query's result, for every panel target."""
    dash = json.loads(DASHBOARD.read_text())
    step = max(1.0, (end - start) / 300)
    return {f"{p['id']}/{t['refId']}": prom.query_range(expand(t["expr"], RATE), start, end,
                                                         step)
            for p in dash["panels"] for t in p.get("targets", [])}


def draw(results: dict[str, list], start: float, end: float, out: Path,
         subtitle: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    rows_total = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_h = 0.30  # inches per grid row unit
    width, top = 18.0, 1.15
    fig = plt.figure(figsize=(width, rows_total * unit_h + top))
    fig_h = rows_total * unit_h + top
    fig.suptitle(f"{dash['title']} dashboard, every panel's PromQL over a real local run",
                 x=0.01, y=1 - 0.15 / fig_h, ha="left", fontsize=15, fontweight="bold")
    fig.text(0.01, 1 - 0.42 / fig_h, "\n".join(textwrap.wrap(subtitle, 200)), ha="left",
             va="top", fontsize=8.5, color="#444")
    plt.rcParams.update({"font.size": 7})
    for p in panels:
        g = p["gridPos"]
        x0 = g["x"] / 24
        y_top = 1 - (top + g["y"] * unit_h) / fig_h
        h = g["h"] * unit_h / fig_h
        if p["type"] == "row":
            fig.text(x0 + 0.003, y_top - h * 0.6, p["title"], fontsize=11, fontweight="bold",
                     color="#1f3b63")
            continue
        ax = fig.add_axes((x0 + 0.035 * (g["w"] / 24) + 0.012, y_top - h + 0.42 / fig_h,
                           g["w"] / 24 - 0.035 * (g["w"] / 24) - 0.02, h - 0.75 / fig_h))
        ax.set_title(p["title"], loc="left", fontsize=8.5, fontweight="bold")
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        scale, suffix = UNIT.get(unit, (1, ""))
        gpu = any("rise_gpu_" in t["expr"] for t in p["targets"])
        series = []  # (peak, name, xs, ys) of every series with a finite value
        for t in p["targets"]:
            for r in results[f"{p['id']}/{t['refId']}"]:
                xs = [float(v[0]) - start for v in r["values"]]
                ys = [float(v[1]) * scale for v in r["values"]]
                finite_ys = [abs(y) for y in ys if math.isfinite(y)]
                if finite_ys:
                    name = legend(t.get("legendFormat", ""), r["metric"]) or t["refId"]
                    series.append((max(finite_ys), name, xs, ys))
        # the busiest 8 series; series that stayed at 0 are one line, not a legend each
        moving = sorted((s for s in series if s[0] > 0), key=lambda s: -s[0])[:8]
        flat = [s for s in series if s[0] == 0]
        if flat and (p["type"] == "stat" or not moving):
            moving.append((0.0, f"{len(flat)} series, all 0" if len(flat) > 1 else flat[0][1],
                           flat[0][2], flat[0][3]))
        for _, name, xs, ys in moving:
            style = "--" if name.startswith("submitted") else "-"
            ax.plot(xs, ys, style, lw=1.1, label=name[:38])
        lines = len(moving)
        if p["type"] == "stat" and lines:
            last = [ln.get_ydata()[-1] for ln in ax.get_lines()]
            ax.text(0.98, 0.85, f"{last[0]:.3g}{suffix}", transform=ax.transAxes,
                    ha="right", va="top", fontsize=14, fontweight="bold", color="#2a7")
        if not lines:
            ax.text(0.5, 0.5, "no GPU in this run (CPU pool): empty here" if gpu
                    else "no data", transform=ax.transAxes, ha="center", va="center",
                    color="#888", fontsize=9)
        ax.set_xlim(0, end - start)
        ax.tick_params(labelsize=6.5)
        ax.grid(alpha=0.3)
        if suffix:
            ax.set_ylabel(suffix, fontsize=7)
        if lines:
            ax.legend(fontsize=5.8, loc="upper left", frameon=False, ncol=2 if lines > 4 else 1)
    fig.text(0.5, 0.12 / fig_h, "seconds since the first job was submitted", ha="center",
             fontsize=8, color="#444")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    try:  # a palette PNG: a few hundred KB instead of megabytes
        from PIL import Image

        img = Image.open(out).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        img.save(out, optimize=True)
    except ImportError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    ap.add_argument("--docs", type=int, default=40, help="lee docs of the first index")
    ap.add_argument("--keep", type=Path, help="keep the run's files in this folder")
    ap.add_argument("--redraw", type=Path, help="draw again from the query results a run "
                    "saved (.cache/dashboard-picture.json), without a run")
    args = ap.parse_args()
    if args.redraw:
        saved = json.loads(args.redraw.read_text())
        draw(saved["results"], saved["start"], saved["end"], args.out, saved["subtitle"])
        return 0
    for need in (MODEL / "tokenizer.json", LEE, LEE_QUERIES):
        if not need.exists():
            print(f"missing {need}: run make assets-model assets-lee", file=sys.stderr)
            return 2
    from rise.stack import Stack

    with tempfile.TemporaryDirectory(prefix="rise-dashboard-") as tmp:
        root = args.keep or Path(tmp)
        t = time.monotonic()
        stack = Stack.up(root / "stack", pools={POOL: str(MODEL)}, tokens={TENANT: "tok-picture"},
                         gateway_port="auto", scorer_port="auto", metrics_port="auto",
                         die_with_parent=True, env={"RISE_CONTROLLER_INTERVAL_SECONDS": "1"},
                         log=log)
        prom = None
        try:
            log(f"stack up in {time.monotonic() - t:.0f} s")
            prom = Prometheus(root / "prometheus", stack.endpoints["metrics"], interval="1s")
            prom.wait_scraped()
            log(f"prometheus {prom.url} scraping {len(stack.endpoints['metrics'])} targets")
            start = time.time()
            run_jobs(stack, args.docs)
            time.sleep(5)
            end = time.time()
            version = subprocess.run([prom.binary, "--version"], capture_output=True,
                                     text=True).stdout.split("\n")[0]
            when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            subtitle = (f"{when}: make dashboard-picture. Local stack (rise.stack), pool "
                        f"{POOL} (SmolLM2-135M-Instruct, CPU, 1 worker process), jobs: create "
                        f"lee ({args.docs} docs) + create lee-b queued behind it, a create of a "
                        f"non-JSONL file (FAILED), an append, Attribute calls once a second; "
                        f"{version}, scrape every 1 s, every variable at All, "
                        f"$__rate_interval = {RATE}.")
            results = evaluate(prom, start - 5, end)
            saved = REPO / ".cache" / "dashboard-picture.json"
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"start": start - 5, "end": end, "subtitle": subtitle,
                                         "results": results}))
            draw(results, start - 5, end, args.out, subtitle)
            log(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB, "
                f"{end - start:.0f} s of run)")
        finally:
            if prom is not None:
                prom.stop()
            stack.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
