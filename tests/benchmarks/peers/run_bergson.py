"""bergson (EleutherAI) gradient index + query on a causal LM, for the RISE eval harness.

    HF_HUB_OFFLINE=1 .cache/peers/bergson/venv/bin/python tests/benchmarks/peers/run_bergson.py \
        --task-dir .cache/eval/domain --out-dir .cache/eval/results/domain

bergson's standard flow, through its Python API (the same objects the `bergson build` CLI
parses): `Build(IndexConfig, PreprocessConfig).execute()` collects per-example gradients of
the summed next-token CE for every tracked nn.Linear of the model's base model, each
projected per module to a projection_dim x projection_dim random sketch (bergson's
factored projection), into an on-disk index (`gradients.bin` + `info.json`); the queries are
built into a second index with the same projection seed; `Attributor(index, unit_norm=True)`
(bergson's query default: cosine) scores every query against the whole pool (k = n_pool).

The records are handed to bergson pre-tokenised (jsonl with input_ids / labels / length),
so the tokenisation and the loss mask are exactly FORMAT.md's, not bergson's chat-template
path for prompt/completion data. bergson loads the model itself inside Build, so
index_seconds include one model load (~1-2 s here).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

import common as C

PEER = "bergson"


def lib_versions():
    import importlib.metadata as md

    return {"bergson": md.version("bergson"), "datasets": md.version("datasets")}


def write_tokenised(ds: C.EncodedDataset, path) -> None:
    with open(path, "w") as f:
        for ids, lab in ds.items:
            f.write(json.dumps({"input_ids": ids, "labels": lab, "length": len(ids)}) + "\n")


def build_index(run_path, data_path, model_dir, args, modules):
    from bergson.cli.commands import Build
    from bergson.config.config import DataConfig, IndexConfig, PreprocessConfig

    shutil.rmtree(run_path, ignore_errors=True)
    cfg = IndexConfig(run_path=str(run_path), model=str(model_dir), precision="fp32",
                      data=DataConfig(dataset=str(data_path)), projection_dim=args.proj_dim,
                      projection_seed=0, token_batch_size=args.token_batch,
                      loss_reduction="sum", modules=modules, overwrite=True)
    Build(index_cfg=cfg, preprocess_cfg=PreprocessConfig()).execute()


def run(args, task: C.Task) -> None:
    from bergson.data import column_offsets, load_gradients
    from bergson.query.attributor import Attributor

    model, tok = C.load_model(task.model_dir)
    pool = C.EncodedDataset(task.pool, tok, task.max_length)
    queries = C.EncodedDataset(task.queries, tok, task.max_length)
    if args.max_pool:
        pool.items = pool.items[: args.max_pool]
    n = len(pool)
    fwd = C.time_forward(model, C.EncodedDataset(task.pool, tok, task.max_length), args.batch_size)
    print(f"[{PEER}] bare forward over pool: {fwd:.1f}s", flush=True)
    n_layers = model.config.num_hidden_layers
    del model

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    write_tokenised(pool, work / "pool.jsonl")
    write_tokenised(queries, work / "queries.jsonl")
    modules = []
    if args.layers:
        layers = range(n_layers - args.layers, n_layers)
        modules = [f"model.layers.{i}.{m}" for i in layers for m in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

    t = C.Timer()
    build_index(work / "pool_index", work / "pool.jsonl", task.model_dir, args, modules)
    index_s = t()
    nbytes = C.dir_bytes(work / "pool_index")
    print(f"[{PEER}] index: {index_s:.1f}s, {nbytes/1e6:.2f} MB", flush=True)

    t = C.Timer()
    build_index(work / "query_index", work / "queries.jsonl", task.model_dir, args, modules)
    attr = Attributor(work / "pool_index", device="cpu", dtype=torch.float32, unit_norm=args.unit_norm)
    qm = load_gradients(work / "query_index")
    with open(work / "query_index" / "info.json") as f:
        sizes = json.load(f)["grad_sizes"]
    # copy: Attributor.search normalises the queries in place, and the memmap is read-only
    q = {name: torch.from_numpy(np.array(qm[:, lo:hi], dtype=np.float32, copy=True))
         for name, (lo, hi) in column_offsets(sizes).items()}
    vals, idx = attr.search(q, k=None)
    scores = np.empty((len(queries), n), dtype=np.float32)
    np.put_along_axis(scores, idx.numpy(), vals.float().numpy(), axis=1)
    query_s = t()
    print(f"[{PEER}] scores {scores.shape}: {query_s:.1f}s", flush=True)
    with open(work / "pool_index" / "info.json") as f:
        info = json.load(f)
    assert info["num_grads"] == n, info
    sub = list(range(n))
    if args.max_pool:
        scores = C.subset_scores(task, scores, sub)

    tracked = list(info["grad_sizes"])
    cfg = {"projection_dim": args.proj_dim, "projection": "bergson per-module factored random projection "
           f"(rademacher, {args.proj_dim}x{args.proj_dim} per module)", "projection_seed": 0,
           "unit_norm": args.unit_norm, "preconditioning": "none",
           "loss": "sum next-token CE over supervised tokens (loss_reduction=sum)",
           "tracked_modules": tracked if len(tracked) <= 30 else f"{len(tracked)} modules (all nn.Linear of the base model)",
           "grad_dim": int(sum(info["grad_sizes"].values())), "store_dtype": str(info.get("base_dtype")),
           "max_length": task.max_length, "token_batch_size": args.token_batch}
    if args.max_pool:
        cfg["subset"] = sub
    what = (f"the {len(tracked)} linears of the last {args.layers} layers" if args.layers
            else f"all {len(tracked)} nn.Linear modules of the base model (lm_head excluded)")
    notes = (f"bergson build (gradient index) + Attributor query, no preconditioner, "
             f"{'cosine (unit_norm=True, the bergson query default)' if args.unit_norm else 'inner product'}. "
             f"Tracked {what}; each module's per-example gradient projected to "
             f"{args.proj_dim}x{args.proj_dim}. Records passed pre-tokenised (FORMAT.md tokenisation and loss mask). "
             "index_seconds include bergson's own model load; query_seconds = building the query "
             "gradients (a second bergson build) + scoring. bytes_per_example = pool index dir / n_pool.")
    C.write_result(args.out_dir, args.method, task, scores, config=cfg, index_seconds=index_s,
                   forward_seconds=fwd, bytes_per_example=nbytes / n, query_seconds=query_s,
                   notes=notes, lib_versions=lib_versions())
    print(f"[{PEER}] wrote {args.out_dir}/{args.method}.npy", flush=True)


def main() -> int:
    ap = C.base_parser(PEER, "bergson")
    ap.add_argument("--proj-dim", type=int, default=16)
    ap.add_argument("--layers", type=int, default=0, help="0 = all layers (bergson default)")
    ap.add_argument("--token-batch", type=int, default=1024)
    ap.add_argument("--no-unit-norm", dest="unit_norm", action="store_false")
    return C.main_wrapper(PEER, run, ap, lib_versions)


if __name__ == "__main__":
    sys.exit(main())
