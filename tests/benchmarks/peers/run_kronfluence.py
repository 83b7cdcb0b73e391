"""kronfluence (EKFAC influence functions) on a causal LM, for the RISE eval harness.

    .cache/peers/kronfluence/venv/bin/python tests/benchmarks/peers/run_kronfluence.py \
        --task-dir .cache/eval/domain --out-dir .cache/eval/results/domain

Standard kronfluence recipe for language models (its examples/openwebtext): a Task whose
train loss is the summed next-token CE (true Fisher: labels sampled from the model for the
covariance/eigen fits), measurement = summed CE of the query, EKFAC factors fitted on the
pool, pairwise influence scores query x pool. Restricted to fit 2 CPU cores: only the MLP
linears (gate/up/down_proj) of the last --layers decoder layers are tracked, every other
parameter is frozen (so backward stops at the first tracked layer), and the query gradients
are full rank by default (--query-rank N: kronfluence's query_gradient_low_rank; its full-SVD
path was far too slow on this CPU).

"Index" = the fitted EKFAC factors (covariances, eigenbases, corrected eigenvalues): kronfluence
stores no per-example pool features, it recomputes pool gradients while scoring, so its
query_seconds include a forward+backward pass over the whole pool.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
import torch.nn.functional as F

import common as C

PEER = "kronfluence"


def lib_versions():
    import importlib.metadata as md

    return {"kronfluence": md.version("kronfluence"), "accelerate": md.version("accelerate")}


def build_task(modules: list[str]):
    from kronfluence.task import Task

    class LMTask(Task):
        def _logits(self, batch, model):
            lg = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return lg[..., :-1, :].contiguous().float().view(-1, lg.size(-1))

        def compute_train_loss(self, batch, model, sample=False):
            logits = self._logits(batch, model)
            labels = batch["labels"][..., 1:].contiguous().view(-1)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    sampled = torch.multinomial(probs, num_samples=1).flatten()
                    sampled[labels == C.IGNORE] = C.IGNORE
                labels = sampled
            return F.cross_entropy(logits, labels, ignore_index=C.IGNORE, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = self._logits(batch, model)
            labels = batch["labels"][..., 1:].contiguous().view(-1)
            return F.cross_entropy(logits, labels, ignore_index=C.IGNORE, reduction="sum")

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


def run(args, task: C.Task) -> None:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    model, tok = C.load_model(task.model_dir)
    pool = C.EncodedDataset(task.pool, tok, task.max_length)
    queries = C.EncodedDataset(task.queries, tok, task.max_length)
    idx = list(range(len(pool))) if not args.max_pool else list(range(min(args.max_pool, len(pool))))
    pool_sub = torch.utils.data.Subset(pool, idx)

    fwd = C.time_forward(model, pool, args.batch_size)
    print(f"[{PEER}] bare forward over pool: {fwd:.1f}s", flush=True)

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    modules = [f"model.layers.{i}.mlp.{p}" for i in layers for p in ("gate_proj", "up_proj", "down_proj")]
    for n, p in model.named_parameters():
        p.requires_grad_(any(n.startswith(m + ".") for m in modules))
    ktask = build_task(modules)
    model = prepare_model(model, ktask)

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    analyzer = Analyzer(analysis_name="peer", model=model, task=ktask, cpu=True,
                        output_dir=str(work), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0, collate_fn=pool.collate_fn))

    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=False,
                                  amp_dtype=None, activation_covariance_dtype=torch.float32,
                                  gradient_covariance_dtype=torch.float32,
                                  covariance_max_examples=args.fit_examples or None,
                                  lambda_max_examples=args.fit_examples or None)
    # Resumable: each factor stage is timed and recorded when it completes; a rerun reuses the
    # stages kronfluence finds on disk (overwrite_output_dir=False) with their recorded times.
    timing_path = work / "stage_seconds.json"
    fit_sig = {"layers": layers, "fit_examples": args.fit_examples, "n_pool": len(idx),
               "task": task.name, "model": str(task.model_dir)}
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    if timing.get("sig") != fit_sig:
        timing = {"sig": fit_sig}
    stages = [("covariance", analyzer.fit_covariance_matrices,
               dict(dataset=pool_sub, per_device_batch_size=args.batch_size)),
              ("eigen", analyzer.perform_eigendecomposition, {}),
              ("lambda", analyzer.fit_lambda_matrices,
               dict(dataset=pool_sub, per_device_batch_size=args.batch_size))]
    for name, fn, kw in stages:
        if name in timing:
            print(f"[{PEER}] factor stage {name}: reused ({timing[name]:.1f}s recorded)", flush=True)
            continue
        t = C.Timer()
        # a stage without a recorded time may be partial on disk: recompute it
        fn(factors_name="ekfac", factor_args=factor_args, overwrite_output_dir=True, **kw)
        timing[name] = t()
        timing_path.write_text(json.dumps(timing))
        print(f"[{PEER}] factor stage {name}: {timing[name]:.1f}s", flush=True)
    index_s = sum(timing[n] for n, _, _ in stages)
    fdir = Path(analyzer.factors_output_dir(factors_name="ekfac"))
    fbytes = C.dir_bytes(fdir)
    print(f"[{PEER}] factors: {index_s:.1f}s, {fbytes/1e6:.1f} MB in {fdir}", flush=True)

    score_args = ScoreArguments(damping_factor=args.damping, amp_dtype=None,
                                query_gradient_low_rank=(args.query_rank or None),
                                use_full_svd=bool(args.query_rank),
                                per_sample_gradient_dtype=torch.float32,
                                precondition_dtype=torch.float32, score_dtype=torch.float32)
    t = C.Timer()
    analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac",
                                     query_dataset=queries, train_dataset=pool_sub,
                                     per_device_query_batch_size=min(args.query_batch, len(queries)),
                                     per_device_train_batch_size=args.batch_size,
                                     score_args=score_args, overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].float().numpy()
    query_s = t()
    print(f"[{PEER}] scores {scores.shape}: {query_s:.1f}s", flush=True)
    if args.max_pool:
        scores = C.subset_scores(task, scores, idx)

    cfg = {"strategy": "ekfac", "tracked_modules": modules, "layers": layers,
           "damping_factor": args.damping if args.damping is not None else "kronfluence heuristic (0.1 x mean eigenvalue)",
           "query_gradient_low_rank": args.query_rank or None, "fisher": "true (sampled labels)",
           "loss": "sum next-token CE over supervised tokens", "max_length": task.max_length,
           "batch_size": args.batch_size, "dtype": "float32",
           "factor_fit_examples": args.fit_examples or len(idx), "stage_seconds": timing}
    if args.max_pool:
        cfg["subset"] = idx
    qdesc = (f"query gradients rank-{args.query_rank} (query_gradient_low_rank)" if args.query_rank
             else "full-rank query gradients")
    notes = (f"kronfluence EKFAC influence (Grosse et al. 2023 recipe). Tracked only the MLP linears of the "
             f"last {args.layers} of {n_layers} decoder layers ({len(modules)} modules), other params frozen; "
             f"{qdesc}")
    notes += (f". EKFAC factors (covariances, eigenbases, eigenvalue correction) fitted on the first "
              f"{args.fit_examples or len(idx)} pool records (covariance_max_examples/lambda_max_examples)")
    notes += (". bytes_per_example = EKFAC factor files / n_pool "
              "(kronfluence stores no per-example features; query_seconds include recomputing pool "
              "gradients, i.e. a forward+backward over the pool).")
    C.write_result(args.out_dir, args.method, task, scores, config=cfg, index_seconds=index_s,
                   forward_seconds=fwd, bytes_per_example=fbytes / len(idx), query_seconds=query_s,
                   notes=notes, lib_versions=lib_versions())
    print(f"[{PEER}] wrote {args.out_dir}/{args.method}.npy", flush=True)


def main() -> int:
    ap = C.base_parser(PEER, "kronfluence-ekfac")
    ap.add_argument("--layers", type=int, default=4, help="track the MLPs of the last N layers")
    ap.add_argument("--query-rank", type=int, default=0, help="0 = full-rank query gradients (default); >0 = kronfluence query_gradient_low_rank")
    ap.add_argument("--query-batch", type=int, default=64)
    ap.add_argument("--damping", type=float, default=None)
    ap.add_argument("--fit-examples", type=int, default=200,
                    help="pool records used to fit the EKFAC factors (0 = all)")
    return C.main_wrapper(PEER, run, ap, lib_versions)


if __name__ == "__main__":
    sys.exit(main())
