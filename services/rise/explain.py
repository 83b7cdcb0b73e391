"""Explain a hit: the score of a query against one training example, token pair by pair.

Both examples are featurised again with the index's own K and tau, without a sketch: the
per-token factors ``(h_t, r_t, g_t, w_t)`` of ``rise.factors``.  Per channel c,

    <C(q), C(x)> = sum_{s in S(q), t in S(x)} w_s w_t <u_s, u_t> <h_s, h_t>

(u = r for RH, u = g for GH), so the unsketched score is a sum over (query token,
training token) pairs.  For a cosine each pair is divided by ``|C(q)| |C(x)|``; a centered
cosine (the default of a sketched index) is

    cos = (<q^, x^> - <q^, mu> - <x^, mu> + |mu|^2) / (|q^ - mu| |x^ - mu|)

with ``q^ = C(q) / |C(q)|``.  The pool mean ``mu`` exists only as a sketch (kept from the
shards' sums), so the terms with ``mu`` take the sketch of each side's unsketched unit
gradient, ``<S(q^), mu>``, and ``|q^ - mu|^2 = 1 - 2 <S(q^), mu> + |mu|^2``.  The first
term is the pair sum; the rest is one line of its own, ``centering``, which belongs to no
token pair.  The combined score ``lambda * cos_RH + (1 - lambda) * cos_GH`` is then

    score = sum_{s,t} P[s, t] + centering

exactly, in float64.  The index's sketched score of the same pair is reported beside it
(``sketched_score``): it estimates ``score`` within the sketch's error.

A pair's contribution is credited to the two *target* tokens: the hidden state at position
t predicts token t + 1, and it is that token's residual that enters the gradient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rise import constants, exact
from rise.config import SketchConfig
from rise.data import Encoded, FieldMap, Record, encode_record, file_sha256, iter_records
from rise.errors import InvalidInput, Mismatch, NotFound
from rise.factors import Features, TokenFactors, check_finite
from rise.featurize import featurize
from rise.index import Index
from rise.manifest import IngestEntry
from rise.model import LoadedModel
from rise.score import PoolMean, ScoreSpec, make_queryset, pool_mean, shard_scores
from rise.shard import ShardData

CHANNELS = ("rh", "gh")
DEFAULT_TOP = 10
"""Tokens of each side and pairs reported as the top ones."""


@dataclass(frozen=True)
class Token:
    """One token of an example: its place in the tokenized record, its text and, for a
    supervised target token, its share of the score (the sum of its pairs)."""

    position: int
    token_id: int
    text: str
    supervised: bool
    contribution: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "token_id": self.token_id, "text": self.text,
                "supervised": self.supervised, "contribution": self.contribution}


@dataclass(frozen=True)
class ChannelPart:
    """One channel's share: ``weight * (pairs + centering)`` is its term of the score."""

    channel: str
    weight: float
    value: float
    pairs: float
    centering: float
    query_norm: float
    hit_norm: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Explanation:
    """The token-pair decomposition of one (query, hit) score.

    ``pairs`` (n_q, n_x) float64: contribution of (query supervised token i, hit supervised
    token j), both channels weighted; ``query_tokens`` / ``hit_tokens``: every token of
    each side, the supervised ones carrying their row / column sums; ``supervised_q`` /
    ``supervised_x``: the token list positions of the pair matrix's rows / columns.
    """

    query_id: str
    hit_id: str
    spec: ScoreSpec
    score: float
    centering: float
    sketched_score: float
    channels: list[ChannelPart]
    query_tokens: list[Token]
    hit_tokens: list[Token]
    pairs: torch.Tensor
    supervised_q: list[int]
    supervised_x: list[int]
    top: int = DEFAULT_TOP
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pair_total(self) -> float:
        return float(self.pairs.sum())

    def top_pairs(self, n: int | None = None) -> list[tuple[int, int, float]]:
        """The ``n`` pairs of largest |contribution|: (query token position, hit token
        position, contribution), ties by position."""
        n = self.top if n is None else n
        flat = self.pairs.flatten().tolist()
        cols = self.pairs.shape[1] if self.pairs.dim() == 2 else 0
        order = sorted(range(len(flat)), key=lambda k: (-abs(flat[k]), k))[:n]
        return [(self.supervised_q[k // cols], self.supervised_x[k % cols], flat[k])
                for k in order]

    def top_share(self, n: int | None = None) -> float:
        """Fraction of the pair total that the top ``n`` pairs explain (signed: pairs of
        the other sign elsewhere can make it exceed 1)."""
        total = self.pair_total
        part = sum(c for _, _, c in self.top_pairs(n))
        return part / total if total != 0.0 else 0.0

    def top_abs_share(self, n: int | None = None) -> float:
        """Fraction of the pairs' total absolute contribution in the top ``n`` pairs."""
        total = float(self.pairs.abs().sum())
        part = sum(abs(c) for _, _, c in self.top_pairs(n))
        return part / total if total > 0.0 else 0.0

    @staticmethod
    def top_tokens(tokens: Sequence[Token], n: int) -> list[Token]:
        sup = [t for t in tokens if t.supervised]
        return sorted(sup, key=lambda t: (-t.contribution, t.position))[:n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: what ``rise explain --json`` prints and the HTML view reads."""
        return {
            "query_id": self.query_id, "hit_id": self.hit_id,
            "scoring": {"channel": self.spec.channel, "score": self.spec.score,
                        "lambda": self.spec.lam, "center": bool(self.centering_applied)},
            "score": self.score, "pair_total": self.pair_total, "centering": self.centering,
            "sketched_score": self.sketched_score,
            "channels": [c.to_dict() for c in self.channels],
            "query_tokens": [t.to_dict() for t in self.query_tokens],
            "hit_tokens": [t.to_dict() for t in self.hit_tokens],
            "pair_rows": self.supervised_q, "pair_cols": self.supervised_x,
            "pairs": self.pairs.tolist(),
            "top_query_tokens": [t.position for t in self.top_tokens(self.query_tokens, self.top)],
            "top_hit_tokens": [t.position for t in self.top_tokens(self.hit_tokens, self.top)],
            "top_pairs": [{"query": q, "hit": x, "contribution": c}
                          for q, x, c in self.top_pairs()],
            "top_pairs_share": self.top_share(), "top_pairs_abs_share": self.top_abs_share(),
            **self.extra,
        }

    @property
    def centering_applied(self) -> bool:
        return bool(self.extra.get("centered", False))


Resolve = Callable[[str], "str | os.PathLike[str]"]


def find_hit(index: Index, hit_id: str) -> tuple[ShardData, int]:
    """The shard holding live id ``hit_id`` and its row; NotFound when it is not a live
    example of the index."""
    if hit_id in index.tombstones:
        raise NotFound(f"hit id {hit_id!r} was deleted from the index")
    for entry in index.manifest.shards:  # found by the id files; only its shard is read
        ids = index.ids(entry).ids
        if hit_id in ids:
            return index.shard(entry), ids.index(hit_id)
    raise NotFound(f"hit id {hit_id!r} is not an example of the index")


def ingest_records(ing: IngestEntry, resolve: Resolve | None = None) -> Iterator[Record]:
    """The records of an ingest's dataset, read back (``resolve`` maps its URI to a local
    file; by default URIs are local paths), once the file still matches the sha256 the
    manifest recorded."""
    uri = ing.dataset_uri
    path = resolve(uri) if resolve is not None else uri
    if not os.path.exists(path):
        raise Mismatch(f"dataset {uri} of ingest generation {ing.generation} is gone")
    if file_sha256(path, uri) != ing.dataset_sha256:
        raise Mismatch(f"dataset {uri} changed since it was indexed (sha256 differs)")
    return iter_records(path, FieldMap(**ing.fields.model_dump()), name=uri)


def hit_record(index: Index, sd: ShardData, row: int, resolve: Resolve | None = None,
               ) -> tuple[Record, FieldMap]:
    """The original record of a shard row, read back from its ingest's dataset (which must
    still match the sha256 the manifest recorded), with that ingest's field map."""
    gen, number = int(sd.ingest[row]), int(sd.record[row])
    for ing in index.manifest.ingests:
        if ing.generation != gen:
            continue
        for rec in ingest_records(ing, resolve):
            if rec.number == number:
                return rec, FieldMap(**ing.fields.model_dump())
        break
    raise Mismatch(f"record {number} of ingest generation {gen} is missing from its dataset")


def pick_query(records: Sequence[Record], query_id: str | None) -> Record:
    """The query named ``query_id``, or the only one; InvalidInput otherwise."""
    if not records:
        raise InvalidInput("no query records")
    if query_id is None:
        if len(records) > 1:
            raise InvalidInput(f"the queries hold {len(records)} records; name one by its "
                               "id (--query ID, or query_id)")
        return records[0]
    for r in records:
        if r.id == query_id:
            return r
    raise InvalidInput(f"query id {query_id!r} is not among the queries")


def factor_config(config: SketchConfig) -> SketchConfig:
    """The index's readout (K, tau, weighting, max length) without the sketch."""
    if not config.sketched:
        return config
    return config.model_copy(update={"mode": "nosketch"})


def _pair_grams(fq: TokenFactors, fx: TokenFactors, channel: str, vocab: int) -> torch.Tensor:
    """w_s w_t <u_s, u_t> <h_s, h_t> (n_q, n_x) in float64: the matrix whose sum
    ``rise.exact.inner`` returns, kept whole."""
    hh = fq.h.double() @ fx.h.double().T
    if channel == "rh":
        uu = exact.residual_gram(fq, fx, vocab).double()
    else:
        uu = fq.g.double() @ fx.g.double().T
    return fq.weights.double()[:, None] * fx.weights.double()[None, :] * uu * hh


def _tokens(lm: LoadedModel, enc: Encoded, contrib: torch.Tensor) -> tuple[list[Token], list[int]]:
    first = max(enc.sup_start, 1)
    out, sup = [], []
    for pos, tid in enumerate(enc.input_ids):
        is_sup = pos >= first
        c = float(contrib[pos - first]) if is_sup else 0.0
        out.append(Token(position=pos, token_id=int(tid), text=lm.tokenizer.decode([int(tid)]),
                         supervised=is_sup, contribution=c))
        if is_sup:
            sup.append(pos)
    return out, sup


def explain(index: Index, lm: LoadedModel, query: Record, hit_id: str, *,
            fields: FieldMap | None = None, spec: ScoreSpec | None = None,
            top: int = DEFAULT_TOP, resolve: Resolve | None = None,
            mean: PoolMean | None = None,
            batch_size: int = constants.DEFAULT_BATCH_SIZE) -> Explanation:
    """The token-pair decomposition of ``query``'s score against the indexed ``hit_id``.

    ``fields`` say how the query record is read (default: the index's first ingest's);
    the hit is read back from its own ingest's dataset (``resolve`` maps a dataset URI to
    a local file).  ``mean``: the index's pool mean when the caller holds it already.
    """
    spec = spec or ScoreSpec()
    if top < 1:
        raise InvalidInput("top must be >= 1")
    index.check_model(lm)
    config = index.config
    vocab = lm.head.vocab
    centered = spec.centered(config.sketched, index.live_count)
    sd, row = find_hit(index, hit_id)
    hit, hit_fields = hit_record(index, sd, row, resolve)
    qfields = fields or index.default_fields
    encs = [encode_record(query, lm.tokenizer, config.max_length, qfields.chat_template),
            encode_record(hit, lm.tokenizer, config.max_length, hit_fields.chat_template)]
    fcfg = factor_config(config)
    feats = featurize(lm, encs, fcfg, batch_size=batch_size)
    check_finite(feats, [query.id, hit.id], "record")
    assert feats.factors is not None
    fq, fx = feats.factors
    sketch: Features | None = None
    if config.sketched:
        sketch = featurize(lm, encs, config, batch_size=batch_size)
        check_finite(sketch, [query.id, hit.id], "record")
    if centered and mean is None:
        mean = pool_mean(index.shards(), index.tombstones)
    pairs = torch.zeros(fq.h.shape[0], fx.h.shape[0], dtype=torch.float64)
    parts: list[ChannelPart] = []
    for c, w in zip(CHANNELS, spec.weights, strict=True):
        if w == 0.0:
            continue
        p = _pair_grams(fq, fx, c, vocab)
        nq = math.sqrt(max(float(_pair_grams(fq, fq, c, vocab).sum()), 0.0))
        nx = math.sqrt(max(float(_pair_grams(fx, fx, c, vocab).sum()), 0.0))
        cent = 0.0
        if spec.score == "cosine":
            denom = nq * nx
            if centered:
                assert sketch is not None and mean is not None
                mu = getattr(mean, c)
                phi = getattr(sketch, c)
                a = float(phi[0] @ mu) / max(nq, 1e-300)
                b = float(phi[1] @ mu) / max(nx, 1e-300)
                mm = float(mu @ mu)
                cq = max(math.sqrt(max(1.0 - 2.0 * a + mm, 0.0)), 1e-30)
                cx = max(math.sqrt(max(1.0 - 2.0 * b + mm, 0.0)), 1e-30)
                denom *= cq * cx
                cent = (mm - a - b) / (cq * cx)
            p = p / max(denom, 1e-300)
        value = float(p.sum()) + cent
        parts.append(ChannelPart(channel=c, weight=w, value=value, pairs=float(p.sum()),
                                 centering=cent, query_norm=nq, hit_norm=nx))
        pairs += w * p
    centering = sum(pt.weight * pt.centering for pt in parts)
    score = float(pairs.sum()) + centering
    # The index's own (sketched) score of the pair, as attribution reports it.
    qs = make_queryset([query.id], _first(sketch if sketch is not None else feats), config, vocab)
    sketched = float(shard_scores(qs, _one_row(sd, row), spec, vocab,
                                  mean if centered else None)[0, 0])
    qtok, qsup = _tokens(lm, encs[0], pairs.sum(1))
    xtok, xsup = _tokens(lm, encs[1], pairs.sum(0))
    return Explanation(query_id=query.id, hit_id=hit_id, spec=spec, score=score,
                       centering=centering, sketched_score=sketched, channels=parts,
                       query_tokens=qtok, hit_tokens=xtok, pairs=pairs, supervised_q=qsup,
                       supervised_x=xsup, top=top,
                       extra={"centered": centered, "query_text": _text(query),
                              "hit_text": _text(hit), "topk": config.topk,
                              "temperature": config.temperature, "mode": config.mode})


def _text(r: Record) -> str:
    return r.text if r.text is not None else (r.prompt or "") + (r.response or "")


def _first(feats: Features) -> Features:
    """The features of the first example alone."""
    return Features(token_counts=feats.token_counts[:1],
                    rh=None if feats.rh is None else feats.rh[:1],
                    gh=None if feats.gh is None else feats.gh[:1],
                    factors=None if feats.factors is None else feats.factors[:1])


def _one_row(sd: ShardData, row: int) -> ShardData:
    """A view of one row of a shard, for scoring that row alone."""
    sl = slice(row, row + 1)
    return ShardData(
        meta=sd.meta, ids=[sd.ids[row]], ingest=sd.ingest[sl], record=sd.record[sl],
        token_count=sd.token_count[sl], norms=sd.norms[sl],
        rh=None if sd.rh is None else sd.rh[sl], gh=None if sd.gh is None else sd.gh[sl],
        factors=None if sd.factors is None else [sd.factors[row]])
