"""logix-ai (LogIX, LoGra) on a causal LM, for the RISE eval harness.

    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 .cache/peers/logix/venv/bin/python \
        tests/benchmarks/peers/run_logix.py --task-dir .cache/eval/domain --out-dir .cache/eval/results/domain

LogIX's documented LoGra recipe: `run = logix.init(project, config)`, `run.watch(model,
name_filter=...)`, `LogIXScheduler(run, lora="random", hessian="raw", save="grad")` (adds the
random-initialised LoGra "LoRA" bottlenecks, whose per-example gradients are the
Kronecker-projected gradients, and accumulates their raw covariance), one logging pass over
the pool with `with run(data_id=ids, mask=attention_mask): loss.backward()`, `run.finalize()`;
then `run.setup({"grad": ["log"]})`, `run.eval()`, log the queries the same way and
`run.compute_influence_all(query_log, run.build_log_dataloader(), mode="dot")`, which
preconditions the query gradients with the damped inverse covariance (LoGra influence).

Restricted to fit this CPU: only the MLP linears of the last --layers decoder layers are
watched (LogIX turns requires_grad off for every other leaf module), LoRA rank --rank (so
rank^2 numbers per module per example). logix-ai 0.1.1 declares Requires-Python <3.11
(installed with --ignore-requires-python) and loads its logs with torch.load, which needs
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 on torch >= 2.6.
"""

from __future__ import annotations

import os
import shutil
import sys

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import yaml

import common as C

PEER = "logix"


def lib_versions():
    import importlib.metadata as md

    return {"logix-ai": md.version("logix-ai")}


def run(args, task: C.Task) -> None:
    import logix

    model, tok, pool, queries, fwd = C.setup(args, task, PEER)
    n = len(pool)

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    names = [f"model.layers.{i}.mlp.{p}" for i in layers for p in args.parts.split(",")]

    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg_path = work / "logix.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "root_dir": str(work),
        "logging": {"flush_threshold": 50_000_000, "num_workers": 1, "cpu_offload": False,
                    "log_dtype": "float32"},
        "lora": {"init": "random", "rank": args.rank},
    }))
    run_ = logix.init(project="peer", config=str(cfg_path))
    run_.watch(model, name_filter=names)
    scheduler = logix.LogIXScheduler(run_, lora="random", hessian="raw", save="grad")

    def log_pass(ds: C.EncodedDataset, prefix: str):
        for s in range(0, len(ds), args.batch_size):
            b = C.collate(ds.items[s: s + args.batch_size], ds.pad_id)
            ids = [f"{prefix}{i}" for i in range(s, s + b["input_ids"].shape[0])]
            with run_(data_id=ids, mask=b["attention_mask"]):
                model.zero_grad()
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                C.per_example_loss(logits, b["labels"]).sum().backward()

    t = C.Timer()
    for _ in scheduler:
        log_pass(pool, "p")
    run_.finalize()
    index_s = t()
    nbytes = C.dir_bytes(work)
    log_bytes = sum(f.stat().st_size for f in work.rglob("*.mmap"))  # the per-example gradients only
    print(f"[{PEER}] index: {index_s:.1f}s, {nbytes/1e6:.2f} MB", flush=True)

    t = C.Timer()
    run_.setup({"grad": ["log"]})
    run_.eval()
    log_loader = run_.build_log_dataloader(batch_size=64)
    b = C.collate(queries.items, queries.pad_id)
    with run_(data_id=[f"q{i}" for i in range(len(queries))], mask=b["attention_mask"]):
        model.zero_grad()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        C.per_example_loss(logits, b["labels"]).sum().backward()
    qlog = run_.get_log()
    res = run_.compute_influence_all(qlog, log_loader, mode=args.mode, damping=args.damping)
    inf = res["influence"].float().numpy()  # (n_q, n_logged)
    col = {k: j for j, k in enumerate(res["tgt_ids"])}
    row = {k: i for i, k in enumerate(res["src_ids"])}
    scores = np.empty((len(queries), n), dtype=np.float32)
    for i in range(len(queries)):
        scores[i] = inf[row[f"q{i}"], [col[f"p{j}"] for j in range(n)]]
    query_s = t()
    print(f"[{PEER}] scores {scores.shape}: {query_s:.1f}s", flush=True)
    sub = list(range(n))
    if args.max_pool:
        scores = C.subset_scores(task, scores, sub)
    cfg = {"algorithm": "LoGra (LogIXScheduler lora=random, hessian=raw, save=grad)", "mode": args.mode,
           "lora_rank": args.rank, "watched_modules": names, "damping": args.damping,
           "loss": "sum next-token CE over supervised tokens", "max_length": task.max_length,
           "batch_size": args.batch_size, "log_dtype": "float32",
           "gradient_log_bytes_per_example": log_bytes / n,
           "fixed_bytes": nbytes - log_bytes}
    if args.max_pool:
        cfg["subset"] = sub
    notes = (f"logix-ai LoGra: random-init LoRA bottlenecks of rank {args.rank} on the {len(names)} MLP "
             f"linears ({args.parts}) of the last {args.layers} of {n_layers} layers (other modules frozen by "
             f"LogIX), per-example projected gradients ({args.rank}x{args.rank} per module) logged to disk, raw "
             f"covariance Hessian, influence mode '{args.mode}' with the query side preconditioned "
             f"(damping {args.damping if args.damping is not None else 'LogIX default'}). "
             "bytes_per_example = LogIX log dir (gradients + covariance state + lora weights) / n_pool; "
             "config.gradient_log_bytes_per_example = the per-example gradient log alone. "
             "Installed with --ignore-requires-python (declares <3.11); TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1.")
    C.write_result(args.out_dir, args.method, task, scores, config=cfg, index_seconds=index_s,
                   forward_seconds=fwd, bytes_per_example=nbytes / n, query_seconds=query_s,
                   notes=notes, lib_versions=lib_versions())
    print(f"[{PEER}] wrote {args.out_dir}/{args.method}.npy", flush=True)


def main() -> int:
    ap = C.base_parser(PEER, "logix-logra")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--parts", default="gate_proj,up_proj,down_proj")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--mode", choices=["dot", "cosine", "l2"], default="dot")
    ap.add_argument("--damping", type=float, default=None)
    return C.main_wrapper(PEER, run, ap, lib_versions)


if __name__ == "__main__":
    sys.exit(main())
