"""dattri TracIn (single checkpoint: Grad-Dot / Grad-Cos) on a causal LM, for the RISE eval harness.

    .cache/peers/dattri/venv/bin/python tests/benchmarks/peers/run_dattri.py \
        --task-dir .cache/eval/domain --out-dir .cache/eval/results/domain [--variant gradcos]

dattri's recipe for GPT-2/WikiText (experiments/gpt2_wikitext/score_TRAK.py, methods
"TracIn", "Grad-Dot", "Grad-Cos"): an `AttributionTask` whose loss is a torch.func
functional call of the HF model, `TracInAttributor(task, weight_list, normalized_grad,
projector_kwargs, layer_name)`, `attribute(train_loader, test_loader)`. Per-example gradients
come from dattri's vmap(grad(loss)) over the tracked MLP weights (every other parameter frozen,
which AttributionTask honours; its `layer_name` path is far slower, see README) and are
projected by dattri's random projector (CPU: block-wise Gaussian) to proj_dim. With the single checkpoint
we have (the task model), TracIn = one gradient dot product (weight 1); `gradcos` sets
normalized_grad=True (dattri's Grad-Cos).

TracIn keeps no index: attribute() recomputes (and re-projects) the query gradients for every
pool batch. So index_seconds = 0 and bytes_per_example = 0 here, and query_seconds is the
whole attribution (say so in notes). The loss is the summed next-token CE over supervised
tokens of one example (vmap strips the batch dim); no attention mask is passed (right padding
with a causal model: real tokens never see the pads, and pads carry no loss).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

import common as C

PEER = "dattri"


def lib_versions():
    import importlib.metadata as md

    return {"dattri": md.version("dattri")}


def run(args, task: C.Task) -> None:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    # eager attention: torch has no vmap batching rule for the CPU SDPA kernel (it falls back
    # to a slow per-example loop with a warning)
    model, tok = C.load_model(task.model_dir, attn_implementation="eager")
    pool = C.EncodedDataset(task.pool, tok, task.max_length)
    queries = C.EncodedDataset(task.queries, tok, task.max_length)
    fwd = C.time_forward(model, pool, args.batch_size)
    print(f"[{PEER}] bare forward over pool: {fwd:.1f}s", flush=True)
    if args.max_pool:
        pool.items = pool.items[: args.max_pool]
    n = len(pool)

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    layer_name = [f"model.layers.{i}.mlp.{p}.weight" for i in layers for p in args.parts.split(",")]

    def loss(params, data):
        ids, lab = data
        logits = torch.func.functional_call(model, params, (ids.unsqueeze(0),)).logits
        return C.per_example_loss(logits, lab.unsqueeze(0)).sum()

    # dattri's `layer_name` path flattens *all* requires_grad parameters (135M) into one vector
    # per vmapped example and differentiates through the concatenation (minutes per batch
    # here). Freezing everything but the tracked weights is dattri's other documented way to
    # restrict the parameters (AttributionTask keeps only requires_grad params), and is exact.
    for nme, p in model.named_parameters():
        p.requires_grad_(nme in layer_name)
    atask = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    attributor = TracInAttributor(
        task=atask, weight_list=torch.ones(1), normalized_grad=(args.variant == "gradcos"),
        device="cpu", layer_name=None,
        projector_kwargs={"proj_dim": args.proj_dim, "proj_max_batch_size": 32, "proj_seed": 0,
                          "device": "cpu"},
    )
    train_dl = torch.utils.data.DataLoader(C.PaddedPairs(pool), batch_size=args.train_batch, shuffle=False)
    test_dl = torch.utils.data.DataLoader(C.PaddedPairs(queries), batch_size=len(queries), shuffle=False)
    t = C.Timer()
    score = attributor.attribute(train_dl, test_dl)  # (n_train, n_test)
    query_s = t()
    scores = score.T.float().numpy()
    print(f"[{PEER}] scores {scores.shape}: {query_s:.1f}s", flush=True)
    sub = list(range(n))
    if args.max_pool:
        scores = C.subset_scores(task, scores, sub)
    n_params = sum(dict(model.named_parameters())[w].numel() for w in layer_name)
    cfg = {"algorithm": "TracInAttributor", "variant": args.variant,
           "normalized_grad": args.variant == "gradcos", "checkpoints": 1, "weight_list": [1.0],
           "proj_dim": args.proj_dim, "projector": "dattri random_project (CPU, normal)",
           "layer_name": layer_name, "n_tracked_params": n_params, "train_batch": args.train_batch,
           "loss": "sum next-token CE over supervised tokens", "max_length": task.max_length}
    if args.max_pool:
        cfg["subset"] = sub
    notes = (f"dattri TracInAttributor with the single task checkpoint ("
             f"{'Grad-Cos: normalized_grad=True' if args.variant == 'gradcos' else 'TracIn/Grad-Dot: raw dot product'}), "
             f"gradients of the {len(layer_name)} MLP weights ({args.parts}) of the last {args.layers} of "
             f"{n_layers} layers ({n_params/1e6:.2f}M params; all other params frozen, since dattri's layer_name "
             f"path differentiates through a flat copy of all 135M params) via dattri's vmap(grad) with eager "
             f"attention (no vmap rule for CPU SDPA), projected to "
             f"{args.proj_dim} dims by dattri's CPU projector. TracIn stores no index: index_seconds=0, "
             "bytes_per_example=0, query_seconds = the whole attribute() call (pool + query gradients, "
             "query gradients recomputed per pool batch).")
    C.write_result(args.out_dir, args.method, task, scores, config=cfg, index_seconds=0.0,
                   forward_seconds=fwd, bytes_per_example=0.0, query_seconds=query_s,
                   notes=notes, lib_versions=lib_versions())
    print(f"[{PEER}] wrote {args.out_dir}/{args.method}.npy", flush=True)


def main() -> int:
    ap = C.base_parser(PEER, "dattri")
    ap.add_argument("--variant", choices=["tracin", "gradcos"], default="tracin")
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--parts", default="gate_proj,up_proj,down_proj")
    ap.add_argument("--train-batch", type=int, default=50)
    ns = ap.parse_known_args()[0]
    if ns.method == "dattri":
        ap.set_defaults(method=f"dattri-{ns.variant}")
    return C.main_wrapper(PEER, run, ap, lib_versions)


if __name__ == "__main__":
    sys.exit(main())
