"""The LM-head readout: residuals, projected errors and their sketches, in token chunks.

For a supervised position with final hidden state ``h`` (d,) and target ``y``:

    z = W h + b            logits before any model-specific transform
    l = f(z)               logit scale and/or soft-capping, as the model applies them
    p = softmax(l / tau)
    r = (p - onehot(y)) * f'(z)   kept on TopK(p, K) U {y}, zero elsewhere
    g = W^T r

With K = V and tau = 1, r = dLoss/dz and g = dLoss/dh exactly, so sum_t w_t r_t h_t^T is
the gradient of the example's loss with respect to W.  Logits are never materialised for
a whole batch: at most ``chunk`` x V at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rise.factors import TokenFactors
from rise.sketch import Sketcher, outer_accumulate


@dataclass(frozen=True)
class Head:
    """The LM head in compute precision, with the model's logit transform.

    weight: (V, d); bias: (V,) or None.  ``scale`` multiplies logits (Cohere's logit_scale,
    1/logits_scaling for Granite); ``softcap`` is Gemma-2 style ``cap * tanh(z / cap)``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1]

    def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Transformed logits l (n, V) and the elementwise derivative dl/dz."""
        z = h @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        if self.scale != 1.0:
            z = z * self.scale
        deriv: torch.Tensor | float = self.scale
        if self.softcap is not None:
            t = torch.tanh(z / self.softcap)
            deriv = self.scale * (1.0 - t * t)
            z = t * self.softcap
        return z, deriv


# Live (chunk, V) tensors at the peak of ``readout``: logits, softmax, the temperature
# division's copy and the top-K/derivative work.  The planner sizes the head with this too.
HEAD_TEMPORARIES = 4
HEAD_CHUNK_MAX_TOKENS = 4096


def chunk_tokens_for(vocab: int, dtype: torch.dtype, budget_bytes: int) -> int:
    """Tokens per head chunk so that the (chunk, V) temporaries fit in ``budget_bytes``."""
    per_token = HEAD_TEMPORARIES * vocab * torch.finfo(dtype).bits // 8
    return max(1, min(HEAD_CHUNK_MAX_TOKENS, budget_bytes // per_token))


def readout(
    h: torch.Tensor, y: torch.Tensor, head: Head, topk: int | None, temperature: float
) -> TokenFactors:
    """Residual and projected error for one chunk: h (n, d), y (n,) int64."""
    logits, deriv = head.logits(h)
    p = torch.softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    n, vocab = p.shape
    rows = torch.arange(n, device=h.device)
    if topk is None or topk >= vocab:
        r = p
        r[rows, y] -= 1.0
        if not isinstance(deriv, float) or deriv != 1.0:
            r = r * deriv
        return TokenFactors(h=h, g=r @ head.weight, r=r, idx=None)
    top = torch.topk(p, topk, dim=-1, sorted=False).indices  # (n, K)
    in_top = (top == y[:, None]).any(dim=1)
    # K + 1 slots: the target fills the last one; if it is already in the top K the extra
    # slot points at y with value 0, which adds nothing to sketches or inner products.
    idx = torch.cat([top, y[:, None]], dim=1)
    vals = p.gather(1, idx)
    hit = idx == y[:, None]  # where onehot(y) is subtracted: exactly one slot per row
    hit[:, -1] &= ~in_top
    vals[:, -1] = torch.where(in_top, torch.zeros_like(vals[:, -1]), vals[:, -1])
    vals = vals - hit.to(vals.dtype)
    if not isinstance(deriv, float):
        vals = vals * deriv.gather(1, idx)
    elif deriv != 1.0:
        vals = vals * deriv
    g = torch.einsum("nk,nkd->nd", vals, head.weight[idx])
    return TokenFactors(h=h, g=g, r=vals, idx=idx)


@dataclass(frozen=True)
class Positions:
    """Supervised positions of a batch, flattened: hidden states and bookkeeping."""

    h: torch.Tensor  # (N, d) in head compute dtype, on the head device
    y: torch.Tensor  # (N,) targets
    example: torch.Tensor  # (N,) example index within the batch
    w: torch.Tensor  # (N,) token weights
    counts: torch.Tensor  # (B,) supervised tokens per example


def supervised_positions(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sup_start: torch.Tensor,
    weighting: str,
    dtype: torch.dtype,
) -> Positions:
    """Select positions t whose target input_ids[t+1] is real and supervised.

    hidden (B, T, d); sup_start (B,): target index t+1 is supervised iff t+1 >= sup_start.
    """
    b, t, _ = hidden.shape
    dev = hidden.device
    pos = torch.arange(t - 1, device=dev)[None, :]
    mask = attention_mask[:, 1:].to(dev).bool() & (pos + 1 >= sup_start.to(dev)[:, None])
    counts = mask.sum(dim=1)
    ex, tt = mask.nonzero(as_tuple=True)
    h = hidden[ex, tt].to(dtype)
    y = input_ids.to(dev)[ex, tt + 1]
    if weighting == "mean":
        w = 1.0 / counts[ex].to(dtype)
    else:
        w = torch.ones(ex.shape[0], dtype=dtype, device=dev)
    return Positions(h=h, y=y, example=ex, w=w, counts=counts)


def iter_readouts(
    pos: Positions, head: Head, topk: int | None, temperature: float, chunk: int
) -> Iterator[tuple[slice, TokenFactors]]:
    """Readouts of consecutive chunks of at most ``chunk`` positions."""
    for start in range(0, pos.h.shape[0], chunk):
        sl = slice(start, start + chunk)
        yield sl, readout(pos.h[sl], pos.y[sl], head, topk, temperature)


def sketch_batch(
    pos: Positions,
    head: Head,
    sketcher: Sketcher,
    topk: int | None,
    temperature: float,
    chunk: int,
    n_examples: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """phi_RH (B, kr*kh) and phi_GH (B, kg*kh) in float64 for the examples of a batch."""
    kr, kh, kg = sketcher.dims
    dev = pos.h.device
    dt = pos.h.dtype
    sh = sketcher.ch.matrix(dt, dev)
    sg = sketcher.cg.matrix(dt, dev)
    rh = torch.zeros(n_examples, kr * kh, dtype=torch.float64, device=dev)
    gh = torch.zeros(n_examples, kg * kh, dtype=torch.float64, device=dev)
    for sl, ro in iter_readouts(pos, head, topk, temperature, chunk):
        if ro.idx is None:
            cr = sketcher.cr.apply_dense(ro.r)
        else:
            cr = sketcher.cr.apply_sparse(ro.idx, ro.r)
        chh = (ro.h @ sh).double()
        cgg = (ro.g @ sg).double()
        ex, w = pos.example[sl], pos.w[sl].double()
        rh += outer_accumulate(cr.double(), chh, w, ex, n_examples)
        gh += outer_accumulate(cgg, chh, w, ex, n_examples)
    return rh, gh
