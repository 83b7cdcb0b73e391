"""What the readout produces, as plain tensors: per-token factors and per-example features.

Torch only: the storage format (``rise.shard``), the scorer's arithmetic (``rise.score``,
``rise.exact``) and the model pipeline (``rise.readout``, ``rise.featurize``) all speak
these types, and none of the first three needs the last two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rise.errors import InvalidInput


@dataclass(frozen=True)
class TokenFactors:
    """The head gradient's factors at n supervised positions.

    h: (n, d) hidden states; g: (n, d) projected errors W^T r; r: (n, m) kept residual
    entries at the vocabulary ids idx (n, m) int64, or r (n, V) dense and idx None;
    w: (n,) token weights, or None where the weights are not known yet (one chunk of the
    readout, before its positions are grouped into examples).
    """

    h: torch.Tensor
    g: torch.Tensor
    r: torch.Tensor
    idx: torch.Tensor | None
    w: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        if self.w is None:
            raise ValueError("these factors carry no token weights")
        return self.w

    @property
    def vocab_ids(self) -> torch.Tensor:
        if self.idx is None:
            raise ValueError("these factors hold a dense residual: no vocabulary ids")
        return self.idx


@dataclass
class Features:
    """Features of a list of examples, in input order."""

    token_counts: torch.Tensor  # (n,) int64 supervised tokens
    rh: torch.Tensor | None = None  # (n, kr*kh) float64 raw sketches (mode sketch)
    gh: torch.Tensor | None = None  # (n, kg*kh)
    factors: list[TokenFactors] | None = None  # modes exact / nosketch, one per example


def check_finite(feats: Features, ids: Sequence[str], what: str = "record") -> None:
    """InvalidInput naming the first example whose features hold a NaN or an infinity, or
    whose sketch norm overflows float32 (the dtype norms are stored in): what an ingest
    checks before it writes a shard, and query sketching before it answers, so that no
    index or score is ever NaN."""
    bad: list[tuple[int, str]] = []
    for name, x in (("RH", feats.rh), ("GH", feats.gh)):
        if x is not None and x.numel():
            norms = x.norm(dim=1).to(torch.float32)
            rows = (~torch.isfinite(x).all(dim=1) | ~torch.isfinite(norms)).nonzero()
            if rows.numel():
                bad.append((int(rows[0]), name))
    for i, f in enumerate(feats.factors or []):
        parts = [("h", f.h), ("g", f.g), ("r", f.r)] + ([("w", f.w)] if f.w is not None else [])
        broken = [n for n, t in parts if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if broken:
            bad.append((i, "/".join(broken)))
            break
    if bad:
        i, where = min(bad)
        ident = ids[i] if i < len(ids) else str(i)
        raise InvalidInput(
            f"{what} id {ident!r}: its features are not finite (NaN or infinity in {where}): "
            "the model's logits or hidden states overflowed on it (refused: no index "
            "stores and no answer carries a NaN)")
