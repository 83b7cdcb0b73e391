"""The documented Python API: the functions the CLI, the Celery tasks and the scorer call.

    from rise import api
    from rise.store import LocalStore
    lm = api.load("path/to/model")
    api.create(LocalStore("idx"), lm, "train.jsonl", FieldMap(), make_config())
    hits = api.attribute(api.open_index(LocalStore("idx")), lm, "queries.jsonl", top=10)

Query sketching (``sketch_queries``) is separate from scoring (``attribute_sketched`` /
``value_sketched``) so that workers sketch and the scorer scores.  ``explain`` decomposes
one hit's score into (query token, training token) pairs (``rise.explain``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rise import ann, constants
from rise.config import check_collapse
from rise.data import FieldMap, Record, read_records, write_records
from rise.errors import InvalidInput
from rise.explain import Explanation, explain, ingest_records, pick_query
from rise.factors import check_finite
from rise.featurize import CancelFn, ProgressFn, featurize
from rise.generate import GenerateSpec, generate_responses
from rise.index import Index, delete, open_index, verify
from rise.index import compact as compact_shards
from rise.ingest import append, create_index, encode_all
from rise.manifest import Manifest, ShardEntry
from rise.model import LoadedModel, load_model
from rise.score import (
    PoolMean,
    QuerySet,
    ScoreSpec,
    group_near_duplicates,
    make_queryset,
    merge_topk,
    pool_mean,
    rank_values,
    row_similarity,
    shard_scores,
    stored_unit,
    topk_candidates,
    value_scores,
)
from rise.shard import ShardData
from rise.store import Store

__all__ = [
    "load", "create", "append", "delete", "compact", "verify", "open_index",
    "sketch_queries", "attribute", "attribute_sketched", "value", "value_sketched",
    "score_candidates", "value_candidates", "replica_shards", "index_mean",
    "check_fraction", "top_fraction_records", "select_top_fraction", "fetch_records",
    "inspect", "read_records", "Hit", "ScoreSpec", "FieldMap", "explain", "pick_query",
    "candidate_rows", "collapse_ranked", "overfetch",
    "Explanation", "attribute_generated", "generate_queries", "GenerateSpec",
    "build_ann", "approximate_candidates", "attribute_approximate",
]

load = load_model
create = create_index


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    duplicates: tuple[Hit, ...] = ()
    """With collapse: the near-duplicates grouped into this hit, best first."""


def sketch_queries(index: Index, lm: LoadedModel, records: Sequence[Record],
                   fields: FieldMap, *, batch_size: int = constants.DEFAULT_BATCH_SIZE,
                   progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                   ) -> QuerySet:
    """Sketch queries with the index's configuration; refuse a different model, and
    features that are not finite (InvalidInput naming the query: no score is NaN)."""
    index.check_model(lm)
    config = index.config
    encoded = encode_all(records, lm, config, fields)
    feats = featurize(lm, encoded, config, batch_size=batch_size, progress=progress,
                      cancel=cancel)
    check_finite(feats, [r.id for r in records], "query")
    return make_queryset([r.id for r in records], feats, config, lm.head.vocab)


ShardLoader = Callable[[ShardEntry], ShardData]


def replica_shards(manifest: Manifest, replica: int = 0, replicas: int = 0
                   ) -> list[ShardEntry]:
    """The manifest's shard entries that replica ``replica`` of ``replicas`` scores
    (position i goes to replica i % replicas; replicas = 0 means all)."""
    shards = manifest.shards
    if replicas <= 0:
        return list(shards)
    if not 0 <= replica < replicas:
        raise InvalidInput(f"replica {replica} out of range for {replicas} replicas")
    return [e for i, e in enumerate(shards) if i % replicas == replica]


def index_mean(index: Index, spec: ScoreSpec, load: ShardLoader | None = None
               ) -> PoolMean | None:
    """Pool mean over every shard of the index (all replicas agree on it); None when
    ``spec`` does not center this index's scores (``ScoreSpec.centered``)."""
    if not spec.centered(index.config.sketched, index.live_count):
        return None
    load = load or index.shard
    return pool_mean((load(e) for e in index.manifest.shards), index.tombstones)


Located = dict[str, tuple[ShardEntry, int]]
"""Candidate id -> (its shard's manifest entry, its row in the shard)."""


def score_candidates(index: Index, qs: QuerySet, spec: ScoreSpec, top: int, *,
                     entries: Sequence[ShardEntry] | None = None,
                     load: ShardLoader | None = None, mean: PoolMean | None = None,
                     reference: bool = False, locate: Located | None = None,
                     ) -> list[list[tuple[float, str]]]:
    """Per query, the candidates of the given shards (default: all) for the global top.
    ``reference``: float64 arithmetic instead of the float32 scan (``rise.score``);
    ``locate``: filled with where each candidate is (collapsing reads its sketch)."""
    if top < 1:
        raise InvalidInput("top must be >= 1")
    load = load or index.shard
    vocab = index.manifest.model.vocab
    dead = index.tombstones
    per_query: list[list[tuple[float, str]]] = [[] for _ in range(len(qs))]
    for entry in index.manifest.shards if entries is None else entries:
        sd = load(entry)
        cands = topk_candidates(shard_scores(qs, sd, spec, vocab, mean, reference=reference),
                                sd.ids, dead, top)
        rows = ({rid: i for i, rid in enumerate(sd.ids) if rid not in dead}
                if locate is not None else {})
        for q, c in enumerate(cands):
            per_query[q].extend(c)
            if locate is not None:
                for _, rid in c:
                    locate[rid] = (entry, rows[rid])
    return per_query


def overfetch(top: int, live: int) -> int:
    """Candidates fetched to show ``top`` collapsed hits at first (more when too few
    distinct sources are among them)."""
    return min(max(top * constants.COLLAPSE_OVERFETCH, top + 16), max(live, 1))


def candidate_rows(index: Index, ids: Sequence[str], located: Located,
                   load: ShardLoader | None = None) -> QuerySet:
    """The stored rows (unit sketches, or exact factors, and norms) of indexed ids, in
    the order given, read shard by shard."""
    load = load or index.shard
    by_shard: dict[str, list[int]] = {}
    entries: dict[str, ShardEntry] = {}
    for n, rid in enumerate(ids):
        if rid not in located:
            raise InvalidInput(f"candidate {rid!r} has no location")
        entry, _ = located[rid]
        by_shard.setdefault(entry.key, []).append(n)
        entries[entry.key] = entry
    sketched = index.config.sketched
    norms = torch.zeros(len(ids), 2, dtype=torch.float64)
    rh: list[torch.Tensor | None] = [None] * len(ids)
    gh: list[torch.Tensor | None] = [None] * len(ids)
    factors: list[Any] = [None] * len(ids)
    for key, positions in by_shard.items():
        sd = load(entries[key])
        rows = [located[ids[n]][1] for n in positions]
        for n, r in zip(positions, rows, strict=True):
            if not 0 <= r < len(sd) or sd.ids[r] != ids[n]:
                raise InvalidInput(f"candidate {ids[n]!r} is not at row {r} of {key}")
        norms[positions] = sd.norms[rows].double()
        if sketched:
            assert sd.rh is not None and sd.gh is not None
            urh, ugh = stored_unit(sd.rh[rows]), stored_unit(sd.gh[rows])
            for j, n in enumerate(positions):
                rh[n], gh[n] = urh[j], ugh[j]
        else:
            assert sd.factors is not None
            for n, r in zip(positions, rows, strict=True):
                factors[n] = sd.factors[r]
    if sketched:
        dim_r, dim_g = index.config.channel_dim("rh"), index.config.channel_dim("gh")
        return QuerySet(ids=list(ids), norms=norms,
                        rh=torch.stack(rh) if ids else torch.zeros(0, dim_r),  # type: ignore[arg-type]
                        gh=torch.stack(gh) if ids else torch.zeros(0, dim_g))  # type: ignore[arg-type]
    return QuerySet(ids=list(ids), norms=norms, factors=factors)


def collapse_ranked(index: Index, ranked: Sequence[Sequence[tuple[str, float]]],
                    located: Located, spec: ScoreSpec, threshold: float, top: int, *,
                    load: ShardLoader | None = None, mean: PoolMean | None = None,
                    ) -> list[list[list[tuple[str, float]]]]:
    """Per query, its ranked candidates grouped into at most ``top`` groups of
    near-duplicates (``rise.score.group_near_duplicates``), the similarity being the
    combined cosine of their stored sketches (``row_similarity``, centered by ``mean``
    when the scores are).  Each candidate's sketch is read once for all queries."""
    check_collapse(threshold)
    ids = sorted({rid for hits in ranked for rid, _ in hits})
    rows = candidate_rows(index, ids, located, load)
    where = {rid: n for n, rid in enumerate(ids)}
    vocab = index.manifest.model.vocab
    out = []
    for hits in ranked:
        pick = [where[rid] for rid, _ in hits]
        sub = QuerySet(ids=[ids[n] for n in pick], norms=rows.norms[pick],
                       rh=rows.rh[pick] if rows.rh is not None else None,
                       gh=rows.gh[pick] if rows.gh is not None else None,
                       factors=[rows.factors[n] for n in pick]
                       if rows.factors is not None else None)
        sim = row_similarity(sub, sub, spec, vocab, mean)
        out.append(group_near_duplicates(hits, sim, threshold, top))
    return out


def approximate_candidates(index: Index, qs: QuerySet, spec: ScoreSpec, top: int, *,
                           mean: PoolMean | None = None, nprobe: int | None = None,
                           kind: str | None = None, load: ShardLoader | None = None,
                           handle: ann.AnnIndex | None = None
                           ) -> list[list[tuple[float, str]]]:
    """Per query, candidates for the global top from the index's ANN index (``handle``, or
    the one ``rise.ann.load_ann`` finds) over the shards it covers, and from an exact scan
    of the current shards it does not cover (appended since it was built)."""
    load = load or index.shard
    handle = handle or ann.load_ann(index.store, index, kind)
    per_query = ann.search(handle, qs, spec, top, dead=index.tombstones, mean=mean,
                           nprobe=nprobe, load=load)
    covered = handle.covered
    rest = [e for e in index.manifest.shards if e.key not in covered]
    if rest:
        scanned = score_candidates(index, qs, spec, top, entries=rest, load=load, mean=mean)
        per_query = [a + b for a, b in zip(per_query, scanned, strict=True)]
    return per_query


def attribute_approximate(index: Index, qs: QuerySet, spec: ScoreSpec, top: int, *,
                          nprobe: int | None = None, kind: str | None = None,
                          handle: ann.AnnIndex | None = None,
                          load: ShardLoader | None = None) -> list[list[Hit]]:
    """``attribute_sketched`` through the index's ANN index (``rise.ann``; ``kind`` picks
    one, ``nprobe`` lists probed, default all) instead of a scan of every shard: hits are
    reranked exactly, and with every list probed an ``ivf-flat`` answer is the scan's
    (ids and order; scores the float64 reference's, float32-rounded)."""
    mean = index_mean(index, spec, load)
    cands = approximate_candidates(index, qs, spec, top, mean=mean, nprobe=nprobe,
                                   kind=kind, load=load, handle=handle)
    return [[Hit(i, s) for i, s in merge_topk([c], top)] for c in cands]


def build_ann(index: Index, *, kind: str = "ivf-flat", lists: int | None = None,
              pq_m: int = 64, threads: int | None = None) -> ann.AnnMeta:
    """Build the ANN index of ``index``'s current shards beside them (``rise.ann.build``;
    ``rise ann build INDEX``)."""
    return ann.build(index.store, index, kind=kind, lists=lists, pq_m=pq_m, threads=threads)


def compact(store: Store, *, shard_size: int | None = None,
            before_write: Callable[[], None] | None = None) -> int | None:
    """``rise.index.compact``, then the ANN indexes the index had are built again over the
    new shards (same kind, lists and PQ width; lists capped by the rows left) and the old
    ones deleted.  Returns the new generation, or None when there was nothing to erase."""
    metas = ann.all_metas(store)
    gen = compact_shards(store, shard_size=shard_size, before_write=before_write)
    if gen is None or not metas:
        return gen
    index = open_index(store)
    rows = sum(e.count for e in index.manifest.shards)
    built = set()
    for m in sorted(metas, key=lambda m: m.generation, reverse=True):
        if m.kind in built or rows == 0:
            continue
        if before_write is not None:
            before_write()
        ann.build(store, index, kind=m.kind, lists=min(m.lists, rows),
                  pq_m=m.pq_m or 64)
        built.add(m.kind)
    ann.delete_stale(store, index)
    return gen


def attribute_sketched(index: Index, qs: QuerySet, spec: ScoreSpec, top: int, *,
                       reference: bool = False, collapse: float | None = None
                       ) -> list[list[Hit]]:
    """Top ``top`` live examples per query, best first, ties by id (``reference``: in
    float64, the yardstick of the float32 scan's precision bound).

    ``collapse``: a cosine threshold; hits whose sketches are at least that similar are
    one source, shown once with the others as its ``duplicates``, so the top ``top`` are
    ``top`` distinct sources (``collapse_ranked``).  Candidates are over-fetched
    (``overfetch``) and fetched again, four times as many, until ``top`` groups are found,
    the whole pool or ``constants.COLLAPSE_MAX_FETCH`` candidates were seen (the services
    stop there too, so both answer the same); duplicates are those among the candidates
    fetched."""
    mean = index_mean(index, spec)
    if collapse is None:
        cands = score_candidates(index, qs, spec, top, mean=mean, reference=reference)
        return [[Hit(i, s) for i, s in merge_topk([c], top)] for c in cands]
    check_collapse(collapse)
    if top < 1:
        raise InvalidInput("top must be >= 1")
    live = index.live_count
    fetch = overfetch(top, live)
    while True:
        located: Located = {}
        cands = score_candidates(index, qs, spec, fetch, mean=mean, reference=reference,
                                 locate=located)
        ranked = [merge_topk([c], fetch) for c in cands]
        groups = collapse_ranked(index, ranked, located, spec, collapse, top, mean=mean)
        if fetch >= min(live, constants.COLLAPSE_MAX_FETCH) \
                or all(len(g) >= top for g in groups):
            break
        fetch = min(fetch * constants.COLLAPSE_OVERFETCH, live, constants.COLLAPSE_MAX_FETCH)
    return [[Hit(g[0][0], g[0][1], tuple(Hit(i, s) for i, s in g[1:])) for g in gs]
            for gs in groups]


def value_candidates(index: Index, targets: QuerySet, spec: ScoreSpec, *,
                     entries: Sequence[ShardEntry] | None = None,
                     load: ShardLoader | None = None, mean: PoolMean | None = None,
                     reference: bool = False) -> list[tuple[str, float]]:
    """(id, value) of every live example in the given shards (default: all)."""
    if len(targets) == 0:
        raise InvalidInput("the target set is empty")
    load = load or index.shard
    vocab = index.manifest.model.vocab
    dead = index.tombstones
    vals: list[tuple[str, float]] = []
    for entry in index.manifest.shards if entries is None else entries:
        sd = load(entry)
        v = value_scores(targets, sd, spec, vocab, mean, reference=reference
                         ).to(torch.float32).tolist()
        vals.extend((rid, x) for rid, x in zip(sd.ids, v, strict=True) if rid not in dead)
    return vals


def value_sketched(index: Index, targets: QuerySet, spec: ScoreSpec, *,
                   reference: bool = False) -> list[Hit]:
    """Value of every live example for the target set, best first, ties by id."""
    vals = value_candidates(index, targets, spec, mean=index_mean(index, spec),
                            reference=reference)
    return [Hit(i, s) for i, s in rank_values(vals)]


def attribute(index: Index, lm: LoadedModel, queries: str | os.PathLike, *,
              fields: FieldMap | None = None, spec: ScoreSpec | None = None, top: int = 10,
              batch_size: int = constants.DEFAULT_BATCH_SIZE,
              progress: ProgressFn | None = None, collapse: float | None = None,
              ) -> list[tuple[str, list[Hit]]]:
    """Sketch the queries in a data file and return (query id, top hits) per query
    (``collapse``: see ``attribute_sketched``)."""
    records = read_records(queries, fields or FieldMap())
    qs = sketch_queries(index, lm, records, fields or FieldMap(), batch_size=batch_size,
                        progress=progress)
    return list(zip(qs.ids, attribute_sketched(index, qs, spec or ScoreSpec(), top,
                                               collapse=collapse), strict=True))


def generate_queries(index: Index, lm: LoadedModel, prompts: Sequence[Record],
                     gen: GenerateSpec, *, chat_template: bool = False) -> list[Record]:
    """The model's response to each prompt (a record's prompt, or its text) as a
    prompt/response record, sized for the index's max_length; refuses another model."""
    index.check_model(lm)
    return generate_responses(lm, prompts, gen, chat_template=chat_template,
                              max_length=index.config.max_length)


def attribute_generated(index: Index, lm: LoadedModel, prompts: Sequence[Record],
                        gen: GenerateSpec, *, chat_template: bool = False,
                        spec: ScoreSpec | None = None, top: int = 10,
                        batch_size: int = constants.DEFAULT_BATCH_SIZE,
                        ) -> list[tuple[Record, list[Hit]]]:
    """Attribute the model's own responses: (generated record, top hits) per prompt, the
    response alone supervised."""
    recs = generate_queries(index, lm, prompts, gen, chat_template=chat_template)
    fields = FieldMap(prompt_field="prompt", response_field="response",
                      chat_template=chat_template)
    qs = sketch_queries(index, lm, recs, fields, batch_size=batch_size)
    return list(zip(recs, attribute_sketched(index, qs, spec or ScoreSpec(), top), strict=True))


def value(index: Index, lm: LoadedModel, target: str | os.PathLike, *,
          fields: FieldMap | None = None, spec: ScoreSpec | None = None,
          batch_size: int = constants.DEFAULT_BATCH_SIZE,
          progress: ProgressFn | None = None) -> list[Hit]:
    records = read_records(target, fields or FieldMap())
    qs = sketch_queries(index, lm, records, fields or FieldMap(), batch_size=batch_size,
                        progress=progress)
    return value_sketched(index, qs, spec or ScoreSpec())


def check_fraction(fraction: float, name: str = "fraction") -> None:
    """InvalidInput unless ``fraction`` is a selectable fraction of the pool, in (0, 1];
    ``name`` is what the caller's user called it (a flag, a request field)."""
    if not 0.0 < fraction <= 1.0:
        raise InvalidInput(f"{name} must be in (0, 1], got {fraction}")


def top_fraction_records(index: Index, ranked_ids: Sequence[str], fraction: float,
                         resolve: Callable[[str], str | os.PathLike] | None = None,
                         ) -> list[dict[str, Any]]:
    """Original records (raw dicts) of the first ceil(``fraction`` * n) ids of a best-first
    ranking of n ids, in that order.

    Records are read back from each ingest's dataset, which must still match the sha256
    the manifest recorded (``fetch_records``).
    """
    check_fraction(fraction)
    chosen = list(ranked_ids[: math.ceil(fraction * len(ranked_ids))])
    raws = fetch_records(index, chosen, resolve)
    return [raws[i] for i in chosen]


def select_top_fraction(index: Index, values: Sequence[Hit], fraction: float,
                        output: str | os.PathLike,
                        resolve: Callable[[str], str | os.PathLike] | None = None) -> int:
    """Write the original records of the top ``fraction`` by value to ``output``; returns
    the number of records written."""
    records = top_fraction_records(index, [h.id for h in values], fraction, resolve)
    write_records(output, records)
    return len(records)


def fetch_records(index: Index, ids: Iterable[str],
                  resolve: Callable[[str], str | os.PathLike] | None = None,
                  ) -> dict[str, dict[str, Any]]:
    """Original records (raw dicts) of live ids, from the datasets the manifest points at.

    ``resolve`` maps a dataset URI to a local file (the services download s3:// URIs);
    by default URIs are local paths.
    """
    wanted = set(ids)
    where: dict[int, set[int]] = {}
    for rid, gen, number in index.iter_ids():  # the id files: no sketch is read
        if rid in wanted:
            where.setdefault(gen, set()).add(number)
    out: dict[str, dict[str, Any]] = {}
    for ing in index.manifest.ingests:
        numbers = where.get(ing.generation)
        if not numbers:
            continue
        for rec in ingest_records(ing, resolve):
            if rec.number in numbers:
                out[rec.id] = rec.raw
    return out


def inspect(index: Index) -> dict[str, Any]:
    """A JSON-able summary of the current generation."""
    m = index.manifest
    return {
        "generation": m.generation, "live_count": m.live_count,
        "tombstones": len(m.tombstones), "shards": len(m.shards), "bytes": m.total_bytes,
        "model": m.model.model_dump(mode="json"), "config": m.config.to_dict(),
        "ingests": [i.model_dump(mode="json") for i in m.ingests],
        "tool_version": m.tool_version,
    }

