"""Full-model gradient similarity with a random projection (TracIn / RapidIn style): the
expensive reference.

Per example, the gradient of its loss (mean NLL over its supervised tokens) with respect
to the weight of every ``nn.Linear`` of the model -- the q/k/v/o and MLP projections of all
blocks and the LM head, i.e. all parameters except the norms and the input-embedding path
of the tied embedding -- is projected per layer to ``k_out x k_in`` numbers with a seeded
Gaussian projection and the concatenation is compared by cosine.

A dense Gaussian projection of 135M parameters to even 256 dims would need 35G random
numbers per projection (regenerated per batch, or 70 GB stored): not possible on 2 CPU
cores.  The projection used is the Kronecker-structured Gaussian one (as in LoGra): for a
linear layer the per-example gradient is G = sum_t d_t x_t^T (output gradient d_t, input
x_t), and (P_out (x) P_in) vec(G) = sum_t (P_out^T d_t)(P_in^T x_t)^T is computed from the
projected d_t and x_t without ever forming G; P_out (out x k_out) and P_in (in x k_in) are
Gaussian/sqrt(k), seeded per layer.  This is an exact linear random projection of the full
per-example gradient (a JL map with Kronecker structure), computed with one forward and one
activation-only backward per batch (parameters frozen, the input embeddings require grad).
"""

from __future__ import annotations

import time  # noqa: F401

import numpy as np
import torch
from common import clock, log, pad_batch, pad_id_of

VERSION = 1  # bump when the gradient features change


def _projections(model, k_in: int, k_out: int, seed: int):
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    out = []
    for i, (name, m) in enumerate(layers):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        p_in = torch.randn(m.in_features, k_in, generator=g) / k_in ** 0.5
        p_out = torch.randn(m.out_features, k_out, generator=g) / k_out ** 0.5
        out.append((name, m, p_in, p_out))
    return out


def grad_features(model, tokenizer, encs, *, k_in: int, k_out: int, seed: int, batch: int = 4,
                  label: str = "") -> tuple[np.ndarray, int]:
    """(n, n_layers * k_out * k_in) float32 projected per-example gradients."""
    projs = _projections(model, k_in, k_out, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    xs: dict[int, torch.Tensor] = {}
    ds: dict[int, torch.Tensor] = {}
    hooks = []

    def fwd_hook(i, p_in, p_out):
        def hook(mod, inp, out):
            xs[i] = inp[0].detach() @ p_in
            if out.requires_grad:
                out.register_hook(lambda g: ds.__setitem__(i, g.detach() @ p_out))
        return hook

    for i, (_, m, p_in, p_out) in enumerate(projs):
        hooks.append(m.register_forward_hook(fwd_hook(i, p_in, p_out)))
    pid = pad_id_of(tokenizer)
    emb = model.get_input_embeddings()
    feats = []
    t0 = clock()
    try:
        for lo in range(0, len(encs), batch):
            part = encs[lo : lo + batch]
            ids, mask = pad_batch(part, pid)
            x = emb(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=x, attention_mask=mask, use_cache=False)
            lp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
            tgt = ids[:, 1:]
            sup = torch.zeros_like(tgt, dtype=torch.bool)
            for b, e in enumerate(part):
                sup[b, max(e.sup_start, 1) - 1 : len(e.input_ids) - 1] = True
            nll = -lp.gather(-1, tgt[..., None])[..., 0]
            per_ex = (nll * sup).sum(1) / sup.sum(1).clamp_min(1)
            per_ex.sum().backward()
            blocks = []
            for i in range(len(projs)):
                d, xx = ds.pop(i), xs.pop(i)
                blocks.append(torch.einsum("bto,bti->boi", d, xx).reshape(len(part), -1))
            feats.append(torch.cat(blocks, 1).to(torch.float32))
            del out, lp, nll
            if (lo // batch) % 25 == 0:
                log(f"  grad {label} {lo + len(part)}/{len(encs)} "
                    f"({clock() - t0:.0f}s)")
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats).numpy(), len(projs)


def grad_scores(ctx, k_in: int = 16, k_out: int = 16, seed: int = 0
                ) -> tuple[np.ndarray, dict, dict]:
    import json

    from common import sha256_json

    lm = ctx.lm
    fwd = ctx.forward_seconds
    work = ctx.work / f"grad-kron{k_out}x{k_in}-s{seed}"
    work.mkdir(exist_ok=True)
    want = sha256_json([ctx.task.data_hash(), k_in, k_out, seed, VERSION])
    secs: dict[str, float] = {}
    feats: dict[str, np.ndarray] = {}
    for which in ("pool", "queries"):
        f, info = work / f"{which}.npy", work / f"{which}.json"
        if f.exists() and info.exists() and json.loads(info.read_text()).get("want") == want:
            feats[which] = np.load(f)
            secs[which] = json.loads(info.read_text())["seconds"]
            n_layers = json.loads(info.read_text())["layers"]
            continue
        t0 = clock()
        feats[which], n_layers = grad_features(lm.model, lm.tokenizer, ctx.enc(which),
                                               k_in=k_in, k_out=k_out, seed=seed, label=which)
        secs[which] = clock() - t0
        np.save(f, feats[which])
        info.write_text(json.dumps({"want": want, "seconds": secs[which], "layers": n_layers}))
    p, q = feats["pool"], feats["queries"]
    idx_s = secs["pool"]
    t0 = clock() - secs["queries"]
    p16 = p.astype(np.float16).astype(np.float64)
    q = q.astype(np.float64)
    pn = p16 / np.maximum(np.linalg.norm(p16, axis=1, keepdims=True), 1e-30)
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    scores = qn @ pn.T
    q_s = clock() - t0
    dim = p.shape[1]
    cost = {"index_seconds": idx_s, "forward_seconds_same_data": fwd,
            "bytes_per_example": 2.0 * dim + 4.0, "query_seconds": q_s}
    n_params = sum(m.weight.numel() for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
    return scores.astype(np.float32), cost, {
        "layers": n_layers, "dims": dim, "projected_params": n_params,
        "bytes": "float16 projected gradient + float32 norm",
        "projection": f"Kronecker Gaussian per linear layer, k_out x k_in = {k_out} x {k_in}"}
