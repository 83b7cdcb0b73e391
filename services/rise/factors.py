"""What the readout produces, as plain tensors: per-token factors and per-example features.

Torch only: the storage format (``rise.shard``), the scorer's arithmetic (``rise.score``,
``rise.exact``) and the model pipeline (``rise.readout``, ``rise.featurize``) all speak
these types, and none of the first three needs the last two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
