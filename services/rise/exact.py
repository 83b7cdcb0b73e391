"""Inner products of exact per-token factors, without any dense V x d matrix.

    <RH(a), RH(b)> = sum_{s,t} w_s w_t <r_s, r_t> <h_s, h_t>
    <GH(a), GH(b)> = sum_{s,t} w_s w_t <g_s, g_t> <h_s, h_t>

Residuals are dense (T, V) in exact mode, or (T, m) values at indices in ``nosketch``
mode; the residual Gram densifies one side only.
"""

from __future__ import annotations

import torch

from rise.factors import TokenFactors


def _dense_r(f: TokenFactors, vocab: int) -> torch.Tensor:
    if f.idx is None:
        return f.r
    out = torch.zeros(f.r.shape[0], vocab, dtype=f.r.dtype)
    return out.scatter_add_(1, f.idx, f.r)


def residual_gram(a: TokenFactors, b: TokenFactors, vocab: int) -> torch.Tensor:
    """<r_s, r_t> for s in a, t in b: (Ta, Tb)."""
    da = _dense_r(a, vocab)
    if b.idx is None:
        return da @ b.r.T
    # gather a's dense rows at b's indices: (Ta, Tb, m) * (Tb, m)
    return (da[:, b.idx] * b.r[None, :, :]).sum(-1)


def inner(a: TokenFactors, b: TokenFactors, channel: str, vocab: int) -> float:
    """Exact <C(a), C(b)> for channel 'rh' or 'gh'."""
    hh = a.h.double() @ b.h.double().T
    if channel == "rh":
        other = residual_gram(a, b, vocab).double()
    else:
        other = a.g.double() @ b.g.double().T
    return float((a.weights.double()[:, None] * b.weights.double()[None, :] * other * hh).sum())


def norms(fs: list[TokenFactors], vocab: int) -> torch.Tensor:
    """(n, 2) norms ||RH||, ||GH|| of each example."""
    out = torch.zeros(len(fs), 2, dtype=torch.float64)
    for i, f in enumerate(fs):
        out[i, 0] = max(inner(f, f, "rh", vocab), 0.0) ** 0.5
        out[i, 1] = max(inner(f, f, "gh", vocab), 0.0) ** 0.5
    return out


def score_matrix(queries: list[TokenFactors], items: list[TokenFactors], channel: str,
                 vocab: int) -> torch.Tensor:
    """Raw inner products (n_queries, n_items) in float64."""
    out = torch.zeros(len(queries), len(items), dtype=torch.float64)
    for i, q in enumerate(queries):
        for j, x in enumerate(items):
            out[i, j] = inner(q, x, channel, vocab)
    return out
