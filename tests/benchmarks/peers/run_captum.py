"""captum TracInCP on a causal LM, for the RISE eval harness.

    .cache/peers/captum/venv/bin/python tests/benchmarks/peers/run_captum.py \
        --task-dir .cache/eval/domain --out-dir .cache/eval/results/domain

captum.influence.TracInCP with one checkpoint (the task model, learning rate 1), the loss a
"reduction" loss (sum over the batch of each example's summed next-token CE) so that captum's
batched per-sample gradients (`sample_wise_grads_per_batch=True`, hooks on nn.Linear) apply,
`layers` = the MLP linears of the last --layers decoder layers (captum turns requires_grad
off everywhere else), and `influence(inputs)` in score mode (k=None): the exact
(unprojected) dot product of per-example gradients for every query x pool pair.

TracInCP keeps no index: influence() computes the query gradients once and then the pool
gradients batch by batch. index_seconds = 0 and bytes_per_example = 0; query_seconds is the
whole influence() call. The HF model is wrapped so that model(input_ids) returns the logits;
batches are (input_ids, labels), right-padded, no attention mask (see common.PaddedPairs).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

import common as C

PEER = "captum"


def lib_versions():
    import importlib.metadata as md

    return {"captum": md.version("captum")}


class LogitsOnly(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids).logits


class SumLMLoss(torch.nn.Module):
    reduction = "sum"

    def forward(self, logits, labels):
        return C.per_example_loss(logits, labels).sum()


def run(args, task: C.Task) -> None:
    from captum.influence import TracInCP

    model, tok, pool, queries, fwd = C.setup(args, task, PEER)
    n = len(pool)

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    names = [f"m.model.layers.{i}.mlp.{p}" for i in layers for p in args.parts.split(",")]
    wrapped = LogitsOnly(model).eval()
    train_dl = torch.utils.data.DataLoader(C.PaddedPairs(pool), batch_size=args.train_batch, shuffle=False)
    tracin = TracInCP(wrapped, train_dl, checkpoints=[str(task.model_dir)],
                      checkpoints_load_func=lambda m, path: 1.0,  # model already holds the weights
                      layers=names, loss_fn=SumLMLoss(), batch_size=args.train_batch,
                      sample_wise_grads_per_batch=True)
    q = C.PaddedPairs(queries)
    t = C.Timer()
    scores = tracin.influence((q.ids, q.lab), k=None, show_progress=False)  # (n_q, n_pool)
    query_s = t()
    scores = scores.detach().float().numpy()
    print(f"[{PEER}] scores {scores.shape}: {query_s:.1f}s", flush=True)
    sub = list(range(n))
    if args.max_pool:
        scores = C.subset_scores(task, scores, sub)
    n_params = sum(p.numel() for nme, p in wrapped.named_parameters()
                   if any(nme.startswith(x + ".") for x in names))
    cfg = {"algorithm": "TracInCP", "checkpoints": 1, "learning_rate": 1.0, "layers": names,
           "n_tracked_params": n_params, "sample_wise_grads_per_batch": True, "projection": None,
           "train_batch": args.train_batch, "loss": "sum next-token CE over supervised tokens",
           "max_length": task.max_length}
    if args.max_pool:
        cfg["subset"] = sub
    notes = (f"captum TracInCP, single checkpoint (lr 1): exact gradient dot product over the "
             f"{len(names)} MLP linears ({args.parts}) of the last {args.layers} of {n_layers} layers "
             f"({n_params/1e6:.2f}M params; captum disables grads elsewhere), no projection. "
             "TracInCP stores no index: index_seconds=0, bytes_per_example=0, query_seconds = the "
             "whole influence() call (query gradients once + a forward/backward over the pool).")
    C.write_result(args.out_dir, args.method, task, scores, config=cfg, index_seconds=0.0,
                   forward_seconds=fwd, bytes_per_example=0.0, query_seconds=query_s,
                   notes=notes, lib_versions=lib_versions())
    print(f"[{PEER}] wrote {args.out_dir}/{args.method}.npy", flush=True)


def main() -> int:
    ap = C.base_parser(PEER, "captum-tracincp")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--parts", default="gate_proj,up_proj,down_proj")
    ap.add_argument("--train-batch", type=int, default=16)
    return C.main_wrapper(PEER, run, ap, lib_versions)


if __name__ == "__main__":
    sys.exit(main())
