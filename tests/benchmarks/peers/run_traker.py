"""TRAK (MadryLab `traker`) on a causal LM, for the RISE eval harness.

    .cache/peers/traker/venv/bin/python tests/benchmarks/peers/run_traker.py \
        --task-dir .cache/eval/domain --out-dir .cache/eval/results/domain [--proj-dim 512]

traker ships image/text-classification and CLIP model-output functions only, so this adapter
adds the two pieces TRAK asks a new task to supply:

* `CausalLMModelOutput` (an `AbstractModelOutput`): model output f(z) = sum over the
  supervised tokens t of the multi-class margin log(p_t / (1 - p_t)) (TRAK's classification
  margin applied to each next-token prediction), out-to-loss gradient Q(z) = mean_t (1 - p_t)
  (TRAK's 1 - p, averaged over the sequence's tokens).
* `LinearHookGradientComputer` (an `AbstractGradientComputer`): exact per-example gradients
  of f for the tracked nn.Linear weights from one batched forward/backward, via module hooks
  (sum over positions of grad_output x input). traker's default FunctionalGradientComputer
  vmaps torch.func.grad over *all* 135M parameters before dropping those outside grad_wrt,
  which does not fit this CPU's time or memory.

Everything else is stock traker: TRAKer with its CPU BasicProjector (Gaussian JL, block-wise
regenerated), MmapSaver, BasicScoreComputer (X (X^T X + lambda I)^-1), one checkpoint (the
task's model; no ensemble), finalize_features / score / finalize_scores. Scores are
(n_pool, n_q) in traker; transposed here. proj_dim is kept below the pool size (TRAK returns
garbage when proj_dim > n with lambda_reg = 0).
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

import common as C

PEER = "traker"


def lib_versions():
    import importlib.metadata as md

    return {"traker": md.version("traker")}


def margins_and_probs(model, input_ids, attention_mask, labels):
    lg = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :].float()
    lb = labels[:, 1:]
    mask = lb != C.IGNORE
    safe = lb.clamp(min=0)
    logp = torch.log_softmax(lg, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    # margin = logit_y - logsumexp_{v != y} logit_v = log p - log(1 - p), computed stably
    log1mp = torch.log(-torch.expm1(logp.clamp(max=-1e-7)))
    margin = ((logp - log1mp) * mask).sum(dim=1)
    p = logp.exp()
    q = ((1 - p) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return margin, q


def build(model, modules: list[str]):
    from trak.gradient_computers import AbstractGradientComputer
    from trak.modelout_functions import AbstractModelOutput

    class CausalLMModelOutput(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, input_ids, attention_mask, labels):
            return margins_and_probs(model, input_ids, attention_mask, labels)[0]

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            input_ids, attention_mask, labels = batch
            with torch.no_grad():
                return margins_and_probs(model, input_ids, attention_mask, labels)[1].unsqueeze(-1)

    named = dict(model.named_modules())

    class LinearHookGradientComputer(AbstractGradientComputer):
        def __init__(self, model, task, grad_dim, dtype, device, grad_wrt=None) -> None:
            super().__init__(model, task, grad_dim, dtype, device)
            self.load_model_params(model)

        def load_model_params(self, model) -> None:
            self.model = model

        def compute_per_sample_grad(self, batch):
            acts, outs = {}, {}
            hooks = []
            for m in modules:
                mod = named[m]

                def fwd(mod_, inp, out, m=m):
                    acts[m] = inp[0].detach()
                    out.register_hook(lambda g, m=m: outs.__setitem__(m, g.detach()))

                hooks.append(mod.register_forward_hook(fwd))
            try:
                with torch.enable_grad():
                    f = self.modelout_fn.get_output(self.model, None, None, *batch)
                    f.sum().backward()
            finally:
                for h in hooks:
                    h.remove()
            # per-example dW = sum_t g_t a_t^T, named by the weight like a state-dict key
            return {f"{m}.weight": torch.einsum("bto,bti->boi", outs[m], acts[m]) for m in modules}

        def compute_loss_grad(self, batch):
            return self.modelout_fn.get_out_to_loss_grad(self.model, None, None, batch)

    return CausalLMModelOutput(), LinearHookGradientComputer


def run(args, task: C.Task) -> None:
    from trak import TRAKer

    model, tok = C.load_model(task.model_dir)
    pool = C.EncodedDataset(task.pool, tok, task.max_length)
    queries = C.EncodedDataset(task.queries, tok, task.max_length)
    idx = list(range(len(pool) if not args.max_pool else min(args.max_pool, len(pool))))
    n = len(idx)

    fwd = C.time_forward(model, pool, args.batch_size)
    print(f"[{PEER}] bare forward over pool: {fwd:.1f}s", flush=True)

    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - args.layers, n_layers))
    modules = [f"model.layers.{i}.mlp.{p}" for i in layers for p in args.parts.split(",")]
    wanted = {f"{m}.weight" for m in modules}
    for nme, p in model.named_parameters():
        p.requires_grad_(nme in wanted)
    proj_dim = args.proj_dim
    lam = args.lambda_reg
    if proj_dim > n and lam == 0 and not args.lambda_rel:
        raise ValueError(f"proj_dim {proj_dim} > n_pool {n} with lambda_reg 0: TRAK is degenerate; "
                         f"lower --proj-dim or set --lambda-reg/--lambda-rel")
    mo, gc = build(model, modules)
    save = args.work_dir
    shutil.rmtree(save, ignore_errors=True)  # a partial store from a killed run is not trusted
    save.mkdir(parents=True)
    traker = TRAKer(model=model, task=mo, train_set_size=n, save_dir=str(save), device="cpu",
                    gradient_computer=gc, proj_dim=proj_dim, use_half_precision=False,
                    grad_wrt=sorted(wanted), lambda_reg=lam, projector_seed=0,
                    load_from_save_dir=True)
    bs = args.proj_batch
    t = C.Timer()
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for s in range(0, n, bs):
        b = C.collate(pool.items[s: min(s + bs, n)], pool.pad_id)
        traker.featurize(batch=(b["input_ids"], b["attention_mask"], b["labels"]),
                         num_samples=b["input_ids"].shape[0])
        print(f"[{PEER}] featurized {min(s + bs, n)}/{n} ({t():.0f}s)", flush=True)
    if args.lambda_rel:
        # ridge relative to the Gram matrix's scale: lambda = rel * trace(X^T X) / proj_dim
        g = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float32)
        lam = float(args.lambda_rel * (g * g).sum() / g.shape[1])
        traker.score_computer.lambda_reg = lam
        print(f"[{PEER}] lambda_reg = {args.lambda_rel} x mean diag(X^T X) = {lam:.4g}", flush=True)
    traker.finalize_features(del_grads=True)
    index_s = t()
    nbytes = C.dir_bytes(save)
    print(f"[{PEER}] index: {index_s:.1f}s, {nbytes/1e6:.2f} MB", flush=True)

    t = C.Timer()
    pj = traker.projector
    if getattr(pj, "num_blocks", 0) == 1 and not getattr(pj, "proj_matrix_available", True):
        # traker 0.3.2: finalize_features frees the single-block matrix and score() does not
        # regenerate it (AttributeError: no proj_matrix); regenerate it from the same seed.
        pj.generate_sketch_matrix(pj.generator_states[0])
    traker.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0,
                                    num_targets=len(queries))
    for s in range(0, len(queries), bs):
        b = C.collate(queries.items[s: s + bs], queries.pad_id)
        traker.score(batch=(b["input_ids"], b["attention_mask"], b["labels"]),
                     num_samples=b["input_ids"].shape[0])
    scores = np.asarray(traker.finalize_scores(exp_name="q")).T  # (n_q, n)
    query_s = t()
    print(f"[{PEER}] scores {scores.shape}: {query_s:.1f}s", flush=True)
    if args.max_pool:
        scores = C.subset_scores(task, scores, idx)

    n_params = sum(dict(model.named_parameters())[w].numel() for w in wanted)
    cfg = {"proj_dim": proj_dim, "projector": "BasicProjector (normal, CPU)", "lambda_reg": lam,
           "lambda_rel": args.lambda_rel,
           "tracked_modules": modules, "n_tracked_params": n_params, "checkpoints": 1,
           "model_output": "sum_t log(p_t/(1-p_t)) over supervised tokens",
           "out_to_loss": "mean_t (1 - p_t)", "dtype": "float32", "max_length": task.max_length}
    if args.max_pool:
        cfg["subset"] = idx
    notes = (f"TRAK (traker {lib_versions()['traker']}) with one checkpoint (the task model, no ensemble), "
             f"Gaussian JL projection to {proj_dim} dims of the per-example gradients of the "
             f"{len(modules)} MLP linears ({args.parts}) of the last {args.layers} of {n_layers} layers "
             f"({n_params/1e6:.2f}M params; everything else frozen); lambda_reg={lam}. Custom causal-LM "
             "model output (traker has none) and a hook-based per-sample-gradient computer (exact for "
             "nn.Linear; traker's vmap computer differentiates all params). bytes_per_example = traker's "
             "save dir after finalize_features(del_grads=True) (features + out_to_loss + metadata) / n_pool.")
    C.write_result(args.out_dir, args.method, task, scores, config=cfg, index_seconds=index_s,
                   forward_seconds=fwd, bytes_per_example=nbytes / n, query_seconds=query_s,
                   notes=notes, lib_versions=lib_versions())
    print(f"[{PEER}] wrote {args.out_dir}/{args.method}.npy", flush=True)


def main() -> int:
    ap = C.base_parser(PEER, "trak")
    ap.add_argument("--proj-dim", type=int, default=512)
    ap.add_argument("--lambda-reg", type=float, default=0.0)
    ap.add_argument("--lambda-rel", type=float, default=0.0,
                    help="if > 0: lambda_reg = this x mean diagonal of X^T X (overrides --lambda-reg)")
    ap.add_argument("--layers", type=int, default=1, help="track the MLPs of the last N layers")
    ap.add_argument("--parts", default="gate_proj,up_proj,down_proj")
    ap.add_argument("--proj-batch", type=int, default=32, help="examples per featurize/score call")
    args_ns = ap.parse_known_args()[0]
    if args_ns.method == "trak":
        ap.set_defaults(method=f"trak-p{args_ns.proj_dim}")
    return C.main_wrapper(PEER, run, ap, lib_versions)


if __name__ == "__main__":
    sys.exit(main())
