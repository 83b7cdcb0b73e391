"""Scoring query sketches against an index: attribution (top-k) and valuation.

Per channel c, raw score <phi_c(q), phi_c(x)> and cosine; the combined score is
``lambda * cos_RH + (1 - lambda) * cos_GH``.  Raw scores of the two channels have different
units, so combining them raw is refused.  Shards are scored one at a time, each shard's
top-k (with every tie at the cut) is kept, and the candidates are merged into the global
top-k.  Ties break by id.

Sketched indexes are scanned by one kernel (``scan_dots``), whether a shard's rows are
memory-mapped or in memory: the stored float16 rows are read in blocks of ``SCAN_ROWS``
rows by ``SCAN_COLS`` columns, each block widened to float32 into a small reused buffer and
multiplied by every query at once (a matrix product, never a loop over queries), the
partial products of the column blocks accumulated in float32.  Row norms of the stored
rows (``row_norms``), the pool mean and the centering algebra stay in float64.

Precision bound (sketched cosine scores).  Queries are float16-rounded unit rows like the
indexed ones, renormalised in float64 and rounded once to float32 (relative error u =
2^-24 per element; float16 values widen to float32 exactly).  A float32 sum of m products
is within gamma_m = m*u / (1 - m*u) of the exact sum, relative to the sum of the products'
magnitudes (any summation order), which is at most |q| |x| by Cauchy-Schwarz.  Each
column block sums at most c = SCAN_COLS products and d/c block sums are then added, so
for unit q and the stored row x (divided by its float64 norm):

    |cos32 - cos64| <= eps := gamma_c + gamma_{d/c} + 2u          (uncentered)

which is 6.2e-5 for c = 1024 and d <= 8192 (kr*kh at the default dims is 8192).  Centering
by the pool mean mu (|mu| <= 1) computes x.mu in the same pass, with the same error times
|mu|; the centered cosine (s - q.mu - x.mu + mu.mu) / (|q-mu| |x-mu|) is then within
eps * ((1 + |mu|) / (|q-mu| |x-mu|) + |mu| / |x-mu|^2) (to first order; ``precision_bound``),
and the weighted channel sum within the largest channel bound (a convex combination).
These are worst cases; observed errors are near 1e-6 (``tests/rise/test_score.py`` checks
both against the float64 path, ``shard_scores(..., reference=True)``).  Scores are
reported float32-rounded; a sharded scan ranks exactly as an unsharded one because each
shard is scored by the same arithmetic.
Exact-factor indexes (modes ``exact`` and ``nosketch``) are scored in float64.
"""

from __future__ import annotations

import heapq
import json
import math
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


# Rows and columns of one block of the scan: 256 x 1024 float32 is a 1 MiB buffer (fits
# the L2 cache), and 1024 products per float32 partial sum keep the bound above.  With
# many queries the product, not the read, is the work: blocks of MANY_ROWS rows make
# larger matrix products (measured: 0.9 -> 1.0 of a bare GEMM at 256 queries).
SCAN_ROWS = 256
SCAN_COLS = 1024
MANY_QUERIES = 32
MANY_ROWS = 1024
_U32 = 2.0 ** -24


def _gamma(m: int) -> float:
    return m * _U32 / (1.0 - m * _U32)


def dot_error(dim: int) -> float:
    """eps of the module docstring: the bound on |q.x| computed by ``scan_dots`` minus the
    exact value, for unit q and x of ``dim`` values (float32 rounding of q included)."""
    c = min(dim, SCAN_COLS)
    return _gamma(c) + _gamma(-(-dim // c)) + 2 * _U32


def scan_dots(x: torch.Tensor, q: torch.Tensor, sq_norms: torch.Tensor | None = None
              ) -> torch.Tensor:
    """(n, m) float32: every row of ``x`` (n, d) against every row of ``q`` (m, d), one pass.

    The one kernel of a sketched scan: ``x`` is the stored rows as they are (float16, a
    view of a memory-mapped file or of bytes in memory), read block by block
    (``SCAN_ROWS`` x ``SCAN_COLS``) into a reused float32 buffer and multiplied by all of
    ``q`` (rounded once to float32) at once; column blocks accumulate in float32.  The
    same shapes give the same bits, memory-mapped or not.  ``sq_norms`` (n,) float64, if
    given, receives the rows' squared norms from the same pass (squares of float16 values
    are exact in float32 and are summed in float64: the norm is exact to float64).
    """
    n, d = x.shape
    m = q.shape[0]
    out = torch.zeros(n, m, dtype=torch.float32)
    if n == 0:
        return out
    qt = [q[:, j:j + SCAN_COLS].to(torch.float32).T.contiguous()
          for j in range(0, d, SCAN_COLS)]
    step = MANY_ROWS if m >= MANY_QUERIES else SCAN_ROWS
    buf = torch.empty(min(n, step), min(d, SCAN_COLS), dtype=torch.float32)
    sq = torch.empty_like(buf) if sq_norms is not None else None
    for i in range(0, n, step):
        rows = min(step, n - i)
        o = out[i:i + rows]
        for k, j in enumerate(range(0, d, SCAN_COLS)):
            cols = min(SCAN_COLS, d - j)
            b = buf[:rows, :cols]
            b.copy_(x[i:i + rows, j:j + cols])
            if m:
                o.addmm_(b, qt[k])
            if sq is not None and sq_norms is not None:
                t = sq[:rows, :cols]
                torch.mul(b, b, out=t)
                sq_norms[i:i + rows] += t.sum(1, dtype=torch.float64)
    return out


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """(n,) float64 norms of the stored rows, read block by block (so a memory-mapped
    shard is never widened whole): the ones ``scan_dots`` computes."""
    sq = torch.zeros(x.shape[0], dtype=torch.float64)
    scan_dots(x, x.new_zeros(0, x.shape[1], dtype=torch.float32), sq)
    return sq.sqrt()


def shard_dots(sd: ShardData, channel: str, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dots (n, m) float32 of the stored rows against ``q``, the rows' float64 norms),
    one ``scan_dots`` pass: the first scan of a loaded shard computes the norms in the
    same pass, later ones reuse them."""
    x = getattr(sd, channel)
    key = ("norm", channel)
    norms = sd.derived.get(key)
    if norms is None:
        sq = torch.zeros(x.shape[0], dtype=torch.float64)
        dots = scan_dots(x, q, sq)
        norms = sd.derived[key] = sq.sqrt()
    else:
        dots = scan_dots(x, q)
    return dots, norms


def _safe(n: torch.Tensor) -> torch.Tensor:
    return torch.where(n > 0, n, torch.ones_like(n))


def channel_cosines(q: torch.Tensor, sd: ShardData, channel: str, mu: torch.Tensor | None
                    ) -> torch.Tensor:
    """Cosines (q, n) in float64 of unit query rows against the shard's stored rows of
    ``channel``, optionally after centering both sides by ``mu``; one ``scan_dots`` pass.

    Centering is done algebraically -- <q-mu, x-mu> = q.x - q.mu - x.mu + mu.mu and
    |x-mu|^2 = 1 - 2 x.mu + mu.mu for unit x -- so the shard is never copied.
    """
    nq = q.shape[0]
    both = q if mu is None else torch.cat([q, mu[None, :]])
    raw, xn = shard_dots(sd, channel, both)
    xs = _safe(xn)
    # One (q, n) float64 result, updated in place: no temporaries of the block's size.
    s = torch.empty(nq, raw.shape[0], dtype=torch.float64)
    s.copy_(raw[:, :nq].T)
    s.div_(xs[None, :])
    if mu is None:
        return s
    xm = raw[:, nq].double() / xs
    qm, mm = q @ mu, mu @ mu
    nqc = (1.0 - 2.0 * qm + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    nxc = (1.0 - 2.0 * xm + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    s.sub_(qm[:, None]).sub_(xm[None, :]).add_(mm)
    return s.div_(nqc[:, None]).div_(nxc[None, :])


def cosine_block(q: torch.Tensor, x: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """The float64 reference of ``channel_cosines``: cosines (q, n) of unit rows ``q``
    and ``x`` (float64), optionally centered by ``mu``."""
    s = q @ x.T
    if mu is None:
        return s
    qm, xm, mm = q @ mu, x @ mu, mu @ mu
    nq = (1.0 - 2.0 * qm + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    nx = (1.0 - 2.0 * xm + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    return (s - qm[:, None] - xm[None, :] + mm) / (nq[:, None] * nx[None, :])


def precision_bound(q: torch.Tensor, sd: ShardData, channel: str,
                    mu: torch.Tensor | None) -> torch.Tensor:
    """(q, n) bound of the module docstring on |channel_cosines - reference| per pair."""
    eps = dot_error(q.shape[1])
    n = len(sd)
    if mu is None:
        return torch.full((q.shape[0], n), eps, dtype=torch.float64)
    x = stored_unit(getattr(sd, channel))
    m = float(mu.norm())
    mm = mu @ mu
    nq = (1.0 - 2.0 * (q @ mu) + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    nx = (1.0 - 2.0 * (x @ mu) + mm).clamp_min(0.0).sqrt().clamp_min(1e-30)
    return eps * ((1 + m) / (nq[:, None] * nx[None, :]) + m / (nx[None, :] ** 2))


def shard_scores(qs: QuerySet, sd: ShardData, spec: ScoreSpec, vocab: int,
                 mean: PoolMean | None = None, *, reference: bool = False) -> torch.Tensor:
    """Scores (q, n) in float64 of every query against every row of one shard.

    ``reference``: compute sketched scores the float64 way (the shard widened whole to
    float64 unit rows) instead of the float32 scan: the yardstick of the precision bound.
    """
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
            if q is None or getattr(sd, c) is None:
                raise InvalidInput("query and index modes differ")
            mu = getattr(mean, c) if mean is not None else None
            if reference:
                s = cosine_block(q, stored_unit(getattr(sd, c)), mu)
            else:
                s = channel_cosines(q, sd, c, mu)
            if spec.score == "raw":
                s = s * qs.norms[:, col][:, None] * sd.norms[:, col].double()[None, :]
        out.add_(s, alpha=w)
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
                 mean: PoolMean | None = None, *, reference: bool = False) -> torch.Tensor:
    """Value (n,) of each row of a shard for the target set.

    Sketch mode, cosine: x's unit sketch against the mean of the targets' unit sketches
    (one pass); raw: <phi_c(x), mean_q phi_c(q)>.  Factor modes average the score matrix,
    which is the same quantity by linearity.  Sketched shards go through ``scan_dots``
    (the bound of the module docstring holds for each mean of cosines too); ``reference``
    computes them in float64 instead, as ``shard_scores`` does.
    """
    if targets.factors is not None:
        return shard_scores(targets, sd, spec, vocab).mean(0)
    wr, wg = spec.weights
    out = torch.zeros(len(sd), dtype=torch.float64)
    for c, w, col in (("rh", wr, 0), ("gh", wg, 1)):
        if w == 0.0:
            continue
        q = getattr(targets, c)
        x = getattr(sd, c)
        if q is None or x is None:
            raise InvalidInput("query and index modes differ")
        if reference:
            x = stored_unit(x)

        def dots(v: torch.Tensor, c: str = c, x: torch.Tensor = x) -> torch.Tensor:
            """x's unit rows . v"""
            if reference:
                return x @ v
            raw, xn = shard_dots(sd, c, v[None, :])
            return raw[:, 0].double() / _safe(xn)
        mu = getattr(mean, c) if mean is not None else None
        if spec.score == "raw":
            qbar = (q * targets.norms[:, col][:, None]).mean(0)
            s = dots(qbar) * sd.norms[:, col].double()
        elif mu is not None:
            # mean_q cos_c(q, x): centering is not linear in x, so average the block.
            s = (cosine_block(q, x, mu) if reference else channel_cosines(q, sd, c, mu)).mean(0)
        else:
            s = dots(q.mean(0))
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


# ------------------------------------------------------------------ near-duplicates


def row_similarity(a: QuerySet, b: QuerySet, spec: ScoreSpec, vocab: int,
                   mean: PoolMean | None = None) -> torch.Tensor:
    """(len(a), len(b)) float64: the combined cosine of indexed rows with the channels and
    lambda of ``spec`` (always cosine, whatever ``spec.score``), sketches centered by
    ``mean`` when given.  Rows are the stored float16 unit sketches renormalised in float64
    (``stored_unit``) or exact factors, so every process computes the same numbers."""
    wr, wg = spec.weights
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for c, w, col in (("rh", wr, 0), ("gh", wg, 1)):
        if w == 0.0:
            continue
        if a.factors is not None and b.factors is not None:
            raw = exact.score_matrix(a.factors, b.factors, c, vocab)
            denom = a.norms[:, col][:, None] * b.norms[:, col][None, :]
            s = raw / denom.clamp_min(1e-300)
        else:
            x, y = getattr(a, c), getattr(b, c)
            if x is None or y is None:
                raise InvalidInput("rows of different index modes")
            s = cosine_block(x, y, getattr(mean, c) if mean is not None else None)
        out += w * s if w != 1.0 else s
    return out


def group_near_duplicates(hits: Sequence[tuple[str, float]], sim: torch.Tensor,
                          threshold: float, top: int) -> list[list[tuple[str, float]]]:
    """Hits (best first) into at most ``top`` groups of near-duplicates, best first.

    In rank order, a hit joins the group whose first (best) hit it is most similar to when
    that similarity (``sim[i, j]``, ``row_similarity`` of the hits) is at least
    ``threshold``; otherwise it starts a new group while fewer than ``top`` exist, and is
    dropped once ``top`` groups exist (it is neither shown nor a duplicate of a shown hit).
    Deterministic: the hits' order is total (score, then id).
    """
    groups: list[list[int]] = []
    for i in range(len(hits)):
        best, at = -math.inf, -1
        for g, members in enumerate(groups):
            s = float(sim[i, members[0]])
            if s > best:
                best, at = s, g
        if at >= 0 and best >= threshold:
            groups[at].append(i)
        elif len(groups) < top:
            groups.append([i])
    return [[(hits[i][0], hits[i][1]) for i in g] for g in groups]
