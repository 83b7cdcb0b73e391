"""Scoring query sketches against an index: attribution (top-k) and valuation.

Per channel c, raw score <phi_c(q), phi_c(x)> and cosine; the combined score is
``lambda * cos_RH + (1 - lambda) * cos_GH``.  Raw scores of the two channels have different
units, so combining them raw is refused.  Shards are scored one at a time, each shard's
top-k (with every tie at the cut) is kept, and the candidates are merged into the global
top-k.  Ties break by id.

Scores are computed in float64 from the stored float16 unit sketches (queries are rounded
to the same storage dtype, so score(q, x) is the same function whichever side is indexed)
and reported as float32-rounded values, which makes a sharded scan give exactly the
ranking of an unsharded one.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors.torch import load, save

from rise import constants, exact
from rise.config import SketchConfig
from rise.errors import InvalidInput
from rise.factors import Features, TokenFactors
from rise.shard import (
    ShardData,
    decode_ids,
    encode_ids,
    factor_tensors,
    factors_from_tensors,
    unit_rows,
)

Channel = Literal["rh", "gh", "both"]
ScoreKind = Literal["raw", "cosine"]


@dataclass(frozen=True)
class ScoreSpec:
    """How to score: channel(s), raw or cosine, lambda, pool-mean centering.

    ``center``: ``None`` (the default) centers cosine scores of a sketched index with live
    examples by the pool mean and leaves raw scores, exact / no-sketch indexes and an empty
    index as they are (exact mode stays the plain head-gradient ground truth); ``True``
    forces centering (an error where it cannot apply), ``False`` turns it off.  ``centered``
    decides it.  The default was chosen by measurement: ``tests/benchmarks/reports/eval/``.
    """

    channel: Channel = "both"
    score: ScoreKind = "cosine"
    lam: float = constants.DEFAULT_LAMBDA
    center: bool | None = None

    def __post_init__(self) -> None:
        if self.channel not in ("rh", "gh", "both"):
            raise InvalidInput(f"channel must be rh, gh or both, got {self.channel!r}")
        if self.score not in ("raw", "cosine"):
            raise InvalidInput(f"score must be raw or cosine, got {self.score!r}")
        if self.score == "raw" and self.channel == "both":
            raise InvalidInput(
                "raw scores of RH and GH have different units; use --score cosine to combine "
                "channels, or pick one with --channel rh|gh"
            )
        if not 0.0 <= self.lam <= 1.0:
            raise InvalidInput(f"lambda must be in [0, 1], got {self.lam}")
        if self.center and self.score == "raw":
            raise InvalidInput("pool-mean centering applies to cosine scores only")

    def centered(self, sketched: bool, live_count: int) -> bool:
        """Whether scores against an index are centered by the pool mean of its live
        examples.  Only a sketched index with live examples has a pool mean: by default
        (``center=None``) its cosine scores are centered and nothing else is; an explicit
        ``center=True`` on an index without a pool mean is InvalidInput."""
        if self.center is None:
            return sketched and self.score == "cosine" and live_count > 0
        if self.center and not sketched:
            raise InvalidInput("pool-mean centering needs a sketched index")
        if self.center and live_count <= 0:
            raise InvalidInput("pool-mean centering needs a pool mean, and an index with no "
                               "live examples has none")
        return self.center

    @property
    def weights(self) -> tuple[float, float]:
        """Weights of (RH, GH) in the combined score."""
        if self.channel == "rh":
            return (1.0, 0.0)
        if self.channel == "gh":
            return (0.0, 1.0)
        return (self.lam, 1.0 - self.lam)


@dataclass
class QuerySet:
    """Features of queries or targets, in the index's storage precision."""

    ids: list[str]
    norms: torch.Tensor  # (q, 2) float64
    rh: torch.Tensor | None = None  # (q, kr*kh) unit, float64 holding storage-dtype values
    gh: torch.Tensor | None = None
    factors: list[TokenFactors] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def make_queryset(ids: list[str], feats: Features, config: SketchConfig, vocab: int) -> QuerySet:
    if feats.rh is not None and feats.gh is not None:
        dt = getattr(torch, config.storage_dtype)
        urh, nrh = unit_rows(feats.rh)
        ugh, ngh = unit_rows(feats.gh)
        norms = torch.stack([nrh, ngh], 1).to(torch.float32).double()
        return QuerySet(ids=ids, norms=norms, rh=stored_unit(urh.to(dt)),
                        gh=stored_unit(ugh.to(dt)))
    fs = feats.factors or []
    return QuerySet(ids=ids, norms=exact.norms(fs, vocab), factors=fs)


@dataclass(frozen=True)
class PoolMean:
    """Mean unit sketch of the live pool per channel (for centering)."""

    rh: torch.Tensor
    gh: torch.Tensor


def pool_mean(shards: Iterable[ShardData], dead: AbstractSet[str]) -> PoolMean:
    """From the shards' stored sums, minus tombstoned rows: no re-index needed."""
    rh = gh = None
    n = 0
    for sd in shards:
        if sd.rh is None or sd.gh is None or sd.rh_sum is None or sd.gh_sum is None:
            raise InvalidInput("pool-mean centering needs a sketched index")
        s_rh, s_gh = sd.rh_sum.clone(), sd.gh_sum.clone()
        gone = [i for i, rid in enumerate(sd.ids) if rid in dead]
        if gone:
            s_rh -= sd.rh[gone].double().sum(0)
            s_gh -= sd.gh[gone].double().sum(0)
        rh = s_rh if rh is None else rh + s_rh
        gh = s_gh if gh is None else gh + s_gh
        n += len(sd) - len(gone)
    if rh is None or gh is None or n == 0:
        raise InvalidInput("the index has no live examples")
    return PoolMean(rh=rh / n, gh=gh / n)


def stored_unit(x: torch.Tensor) -> torch.Tensor:
    """Stored (float16-rounded) unit rows, renormalised in float64.

    Rounding leaves norms of 1 +- 1e-4; renormalising makes a self-cosine exactly 1 and
    is the same function for queries and indexed rows.
    """
    x = x.double()
    n = x.norm(dim=1, keepdim=True)
    return x / torch.where(n > 0, n, torch.ones_like(n))


def shard_unit(sd: ShardData, channel: str) -> torch.Tensor:
    """The shard's renormalised float64 unit rows of a channel, computed once per load."""
    key = ("unit", channel)
    if key not in sd.derived:
        sd.derived[key] = stored_unit(getattr(sd, channel))
    return sd.derived[key]


def cosine_block(q: torch.Tensor, x: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """Cosines (q, n) of unit rows, optionally after centering both sides by ``mu``.

    Centering is done algebraically -- <q-mu, x-mu> = q.x - q.mu - x.mu + mu.mu and
    |x-mu|^2 = 1 - 2 x.mu + mu.mu for unit x -- so the shard is never copied.
    """
    s = q @ x.T
    if mu is None:
        return s
    qm, xm, mm = q @ mu, x @ mu, mu @ mu
    nq = (1.0 - 2.0 * qm + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    nx = (1.0 - 2.0 * xm + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    return (s - qm[:, None] - xm[None, :] + mm) / (nq[:, None] * nx[None, :])


def shard_scores(qs: QuerySet, sd: ShardData, spec: ScoreSpec, vocab: int,
                 mean: PoolMean | None = None) -> torch.Tensor:
    """Scores (q, n) in float64 of every query against every row of one shard."""
    wr, wg = spec.weights
    n = len(sd)
    out = torch.zeros(len(qs), n, dtype=torch.float64)
    for c, w, col in (("rh", wr, 0), ("gh", wg, 1)):
        if w == 0.0:
            continue
        if qs.factors is not None:
            if sd.factors is None:
                raise InvalidInput("query and index modes differ")
            raw = exact.score_matrix(qs.factors, sd.factors, c, vocab)
            if spec.score == "raw":
                s = raw
            else:
                denom = qs.norms[:, col][:, None] * sd.norms[:, col].double()[None, :]
                s = raw / denom.clamp_min(1e-300)
        else:
            q = getattr(qs, c)
            x = shard_unit(sd, c)
            s = cosine_block(q, x, getattr(mean, c) if mean is not None else None)
            if spec.score == "raw":
                s = s * qs.norms[:, col][:, None] * sd.norms[:, col].double()[None, :]
        out += w * s if w != 1.0 else s
    return out


def _reportable(s: torch.Tensor) -> torch.Tensor:
    """Round to float32: the precision reported, and what ranks."""
    return s.to(torch.float32)


def topk_candidates(scores: torch.Tensor, ids: Sequence[str], dead: AbstractSet[str],
                    top: int) -> list[list[tuple[float, str]]]:
    """Per query, the rows that can be in the global top ``top``: the shard's top plus
    every row tied with the cut, so that merging with id tie-breaks is exact."""
    s = _reportable(scores)
    alive = torch.tensor([rid not in dead for rid in ids], dtype=torch.bool)
    s = torch.where(alive[None, :], s, torch.full_like(s, float("-inf")))
    n_alive = int(alive.sum())
    out: list[list[tuple[float, str]]] = []
    for row in s:
        k = min(top, n_alive)
        if k == 0:
            out.append([])
            continue
        cut = torch.topk(row, k).values[-1]
        sel = ((row >= cut) & alive).nonzero(as_tuple=True)[0].tolist()
        out.append([(float(row[i]), ids[i]) for i in sel])
    return out


def merge_topk(parts: Iterable[list[tuple[float, str]]], top: int) -> list[tuple[str, float]]:
    """Global top ``top`` from per-shard candidates: best score first, ties by id."""
    cands = [c for part in parts for c in part]
    best = heapq.nsmallest(top, cands, key=lambda c: (-c[0], c[1]))
    return [(rid, score) for score, rid in best]


def rank_values(values: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(values, key=lambda v: (-v[1], v[0]))


def value_scores(targets: QuerySet, sd: ShardData, spec: ScoreSpec, vocab: int,
                 mean: PoolMean | None = None) -> torch.Tensor:
    """Value (n,) of each row of a shard for the target set.

    Sketch mode, cosine: x's unit sketch against the mean of the targets' unit sketches
    (one pass); raw: <phi_c(x), mean_q phi_c(q)>.  Factor modes average the score matrix,
    which is the same quantity by linearity.
    """
    if targets.factors is not None:
        return shard_scores(targets, sd, spec, vocab).mean(0)
    wr, wg = spec.weights
    out = torch.zeros(len(sd), dtype=torch.float64)
    for c, w, col in (("rh", wr, 0), ("gh", wg, 1)):
        if w == 0.0:
            continue
        q = getattr(targets, c)
        x = shard_unit(sd, c)
        if spec.score == "raw":
            qbar = (q * targets.norms[:, col][:, None]).mean(0)
            s = (x @ qbar) * sd.norms[:, col].double()
        elif mean is not None:
            # mean_q cos_c(q, x): centering is not linear in x, so average the block.
            s = cosine_block(q, x, getattr(mean, c)).mean(0)
        else:
            s = x @ q.mean(0)
        out += w * s if w != 1.0 else s
    return out


def queryset_to_bytes(qs: QuerySet, storage_dtype: str = "float16") -> bytes:
    """Serialise query features for the wire (worker -> gateway -> scorer).

    Sketches travel in the storage dtype they were rounded to, so the scorer rebuilds
    exactly the vectors the embedded path scores.
    """
    ids, off = encode_ids(qs.ids)
    t = {"ids_utf8": ids, "ids_offsets": off, "norms": qs.norms.contiguous()}
    if qs.rh is not None and qs.gh is not None:
        dt = getattr(torch, storage_dtype)
        t["rh"], t["gh"] = qs.rh.to(dt).contiguous(), qs.gh.to(dt).contiguous()
    else:
        t.update(factor_tensors(qs.factors or []))
    return save(t, metadata={"rise": json.dumps({"kind": "queryset"})})


def queryset_from_bytes(data: bytes) -> QuerySet:
    try:
        t = load(data)
        ids = decode_ids(t["ids_utf8"], t["ids_offsets"])
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad payload
        raise InvalidInput(f"malformed query features: {e}") from None
    if "rh" in t:
        return QuerySet(ids=ids, norms=t["norms"].double(), rh=stored_unit(t["rh"]),
                        gh=stored_unit(t["gh"]))
    try:
        fs = factors_from_tensors(t)
    except (KeyError, ValueError, RuntimeError) as e:
        raise InvalidInput(f"malformed query features: {e}") from None
    return QuerySet(ids=ids, norms=t["norms"].double(), factors=fs)
