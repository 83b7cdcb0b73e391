"""The evaluation's full-model gradient reference is what it says: per example, the
Kronecker-projected gradient of the mean supervised NLL with respect to every nn.Linear
weight, equal to projecting the autograd gradient of that example alone (padding and the
prompt/response loss mask included)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rise.data import Encoded
from rise.model import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "eval"))

from m_grad import _projections, grad_features  # noqa: E402


def _reference(model, enc: Encoded, k_in: int, k_out: int, seed: int) -> torch.Tensor:
    """Projected autograd gradient of one example, run alone (no padding)."""
    projs = _projections(model, k_in, k_out, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m, _, _ in projs:
        m.weight.requires_grad_(True)
        m.weight.grad = None
    ids = torch.tensor([enc.input_ids])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1)
    tgt = ids[0, 1:]
    lo = max(enc.sup_start, 1) - 1
    nll = -lp[lo:].gather(-1, tgt[lo:, None])[:, 0]
    nll.mean().backward()
    out = [(p_out.double().T @ m.weight.grad.double() @ p_in.double()).reshape(-1)
           for _, m, p_in, p_out in projs]
    for _, m, _, _ in projs:
        m.weight.requires_grad_(False)
    return torch.cat(out)


def test_projected_gradients_equal_autograd_per_example(tiny_models):
    lm = load_model(tiny_models["llama"])
    model = lm.model
    g = torch.Generator().manual_seed(0)
    encs = [
        Encoded(torch.randint(0, 256, (9,), generator=g).tolist(), 1, False),
        Encoded(torch.randint(0, 256, (5,), generator=g).tolist(), 1, False),
        Encoded(torch.randint(0, 256, (12,), generator=g).tolist(), 7, False),  # response only
    ]
    k_in, k_out, seed = 4, 3, 5
    want = torch.stack([_reference(model, e, k_in, k_out, seed) for e in encs])
    got, n_layers = grad_features(model, lm.tokenizer, encs, k_in=k_in, k_out=k_out, seed=seed,
                                  batch=2)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n_layers == n_linear and got.shape == (3, n_linear * k_in * k_out)
    got = torch.from_numpy(got).double()
    rel = (got - want).norm(dim=1) / want.norm(dim=1)
    assert rel.max() < 1e-4, rel
    # the rows differ between examples (the comparison above can fail)
    assert (want[0] - want[1]).norm() > 0.1 * want[0].norm()
