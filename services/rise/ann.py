"""Approximate search (optional): a FAISS inverted-file index beside the shards.

Exact scan stays the default; an ANN index is built on request (``rise ann build INDEX``,
``rise.api.build_ann``) and used only when a query asks for it (``approximate``).  It
needs the optional extra ``rise[ann]`` (``faiss-cpu``); without it building or searching
one is InvalidInput naming the extra.

What is indexed.  Every row x of the covered shards as the concatenation of its two stored
unit channels, each renormalised in float64 (``rise.score.stored_unit``) and rounded to
float16 as the shards store them:  v(x) = [x_rh, x_gh]  (kr*kh + kg*kh values, |v| =
sqrt 2).  Nothing in v depends on lambda, on the channel choice or on the pool mean, so
the ANN index never goes stale when those change: only new shards (appended, not covered:
scanned exactly) or compaction (rebuilt) touch it.  Kinds: ``ivf-flat`` (a FAISS
inverted file holding the rows uncompressed, in float16 like the shards: its fp16 scalar
quantizer, 2 bytes a value) and ``ivf-pq`` (IndexIVFPQ: ``m`` bytes a row; its inner
products are approximate, so its candidates are reranked exactly and it carries no
certificate).

The algebra (cosine scores; raw scores are not searched approximately).  For a query q
with unit channels q_c, channel weights w_c (``ScoreSpec.weights``) and, when centered,
the pool mean mu_c of the live unit rows:

* uncentered:  score(x) = sum_c w_c <q_c, x_c> = <u, v(x)> with u = [w_rh q_rh, w_gh q_gh]:
  the ANN's inner product IS the exact score (weights on the query side only).
* centered:  with q'_c = (q_c - mu_c) / |q_c - mu_c| (per query), k_c = <q'_c, mu_c> (per
  query) and n_c(x) = |x_c - mu_c| = sqrt(1 - 2 <x_c, mu_c> + |mu_c|^2) (per row),

      cos_c(q, x) = (<q'_c, x_c> - k_c) / n_c(x)

  so  score(x) = sum_c w_c (<q'_c, x_c> - k_c) / n_c(x).  The ANN searches the proxy
  P(x) = <u, v(x)> with u = [w_rh q'_rh / m_rh, w_gh q'_gh / m_gh], m_c the midpoint of
  the range of n_c over the rows, which equals sum_c w_c cos_c(q, x) n_c(x) / m_c up to the
  per-query constant sum_c w_c k_c / m_c.  Each term differs from its exact one by
  |cos_c| |n_c(x)/m_c - 1| <= delta_c = (max n_c - min n_c) / (max n_c + min n_c), so
  |score(x) - (P(x) - const)| <= Delta = sum_c w_c delta_c.

The per-row values n_c(x) (the "row terms", 16 bytes a row) are computed by one pass over
the rows for each pool mean and kept with the loaded ANN index (the cost of one exact
query, once per mean; nothing is rebuilt).  The proxy chooses the lists to probe (the
centroids are uncentered rows too) and is what ``ivf-pq`` searches.

Search, ``ivf-flat``.  The ``nprobe`` lists whose centroids have the largest proxy inner
product with the query are read (FAISS's inverted lists: the rows' float16 values), and
every row in them is scored by the exact formula above in float32, channel by channel
(<q'_c, x_c> from the rows widened to float32, then k_c and the row's n_c): the ANN index holds
uncentered rows, the centering is all on the query side and in the per-row terms.  The
best ``fetch`` of them are rescored exactly (the stored float16 rows, read from their
shards, in float64: ``rise.score.cosine_block``), dead rows dropped; if the ``top``-th
exact score does not exceed the float32 score of the last one fetched plus the float32
error bound (a dot of unit vectors of m values: gamma_m + 3u, plus 2^-11 for the float16
rounding of the indexed rows, over the smallest n_c),
``fetch`` doubles, up to every probed row.  So the answer is exact within the probed
lists, and with ``nprobe`` = the number of lists it is the exact scan's top: ids, order,
and scores equal to the float64 reference (``tests/rise/test_ann.py``).  With fewer lists,
rows of unprobed lists can be missed: recall@10 against the exact scan and the speed-up
are measured in ``tests/benchmarks/reports/scale.md``.

Search, ``ivf-pq``.  FAISS's own search of the proxy over PQ codes (``m`` bytes a row
instead of 4 bytes a value), the best ``16 top`` rescored exactly: no certificate.

Storage, beside the shards:  ``ann/g{generation:08d}-{kind}.faiss`` (FAISS's bytes) and
``ann/g{generation:08d}-{kind}.json`` (kind, lists, the shards covered with their sha256,
rows, the sha256 of the FAISS bytes), the JSON written last.  FAISS labels are
``shard_position << 32 | row``.  The index used by a query is the newest one whose shards
are all still in the index's current generation (by key and sha256); the current shards
it does not cover are scanned exactly and merged.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from rise.errors import InvalidInput, NotFound
from rise.index import Index
from rise.manifest import ShardEntry
from rise.score import PoolMean, QuerySet, ScoreSpec, cosine_block, stored_unit
from rise.shard import ShardData, sha256
from rise.store import Store

Kind = Literal["ivf-flat", "ivf-pq"]
KINDS: tuple[str, ...] = ("ivf-flat", "ivf-pq")
ANN_DIR = "ann"
ShardLoader = Callable[[ShardEntry], ShardData]

# k-means training rows per list (FAISS warns below 39) and at most this many in all.
TRAIN_PER_LIST = 40
MAX_TRAIN = 65536
# Rows added to the FAISS index per batch while building (float32: 48 KiB a row at the
# default dims, so 2048 rows are ~100 MiB).
ADD_BATCH = 2048
# Candidates fetched per shown hit at first; PQ keeps this many without a certificate.
FETCH_FACTOR = 4
_U32 = 2.0 ** -24


def _faiss() -> Any:
    try:
        # start-up: faiss is an optional extra (rise[ann]), loaded only to build or search
        import faiss
    except ImportError:
        raise InvalidInput("approximate search needs the optional extra rise[ann] "
                           "(pip install 'rise[ann]': faiss-cpu)") from None
    return faiss


def default_lists(rows: int) -> int:
    """Lists of the inverted file: about sqrt(rows) (316 at 10^5 rows), at least 1, at most
    rows / 39 (FAISS's k-means wants 39 training rows a list).  Rows are 12288 values wide
    at the default dims, so building costs rows x lists x 24.6 kFLOP: more lists probe
    less per query but build slower."""
    return max(1, min(int(math.sqrt(max(rows, 1))), rows // 39 or 1))


@dataclass(frozen=True)
class AnnMeta:
    """The JSON written beside an ANN index."""

    kind: str
    generation: int
    lists: int
    pq_m: int
    dim: int
    rows: int
    shards: list[tuple[str, str, int]]  # (key, sha256, count) in label order
    faiss_key: str
    faiss_sha256: str
    faiss_bytes: int

    def to_json(self) -> bytes:
        return json.dumps({"kind": self.kind, "generation": self.generation,
                           "lists": self.lists, "pq_m": self.pq_m, "dim": self.dim,
                           "rows": self.rows, "shards": [list(s) for s in self.shards],
                           "faiss_key": self.faiss_key, "faiss_sha256": self.faiss_sha256,
                           "faiss_bytes": self.faiss_bytes}, sort_keys=True,
                          indent=1).encode()

    @classmethod
    def parse(cls, data: bytes) -> AnnMeta:
        d = json.loads(data)
        return cls(kind=d["kind"], generation=int(d["generation"]), lists=int(d["lists"]),
                   pq_m=int(d["pq_m"]), dim=int(d["dim"]), rows=int(d["rows"]),
                   shards=[(str(k), str(h), int(c)) for k, h, c in d["shards"]],
                   faiss_key=d["faiss_key"], faiss_sha256=d["faiss_sha256"],
                   faiss_bytes=int(d["faiss_bytes"]))


def meta_key(generation: int, kind: str) -> str:
    return f"{ANN_DIR}/g{generation:08d}-{kind}.json"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidInput(f"ANN kind must be one of {', '.join(KINDS)}, got {kind!r}")


def unit_vectors(sd: ShardData, rows: slice | Sequence[int] | None = None) -> np.ndarray:
    """v(x) of the module docstring for rows of a shard: float32 (n, kr*kh + kg*kh)."""
    if sd.rh is None or sd.gh is None:
        raise InvalidInput("approximate search needs a sketched index")
    sel = slice(None) if rows is None else rows
    rh = stored_unit(sd.rh[sel])
    gh = stored_unit(sd.gh[sel])
    return torch.cat([rh, gh], 1).to(torch.float32).numpy()


def build(store: Store, index: Index, *, kind: str = "ivf-flat", lists: int | None = None,
          pq_m: int = 64, seed: int = 0, load: ShardLoader | None = None,
          threads: int | None = None) -> AnnMeta:
    """Build the ANN index of ``index``'s current shards and write it beside them.

    Rows of tombstoned ids are indexed too (they are dropped when reranked, and
    compaction rebuilds).  ``lists``: inverted lists (default ``default_lists``);
    ``pq_m``: bytes per row of ``ivf-pq`` (must divide the row width)."""
    _check_kind(kind)
    faiss = _faiss()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    if not index.config.sketched:
        raise InvalidInput("approximate search needs a sketched index")
    load = load or index.shard
    entries = list(index.manifest.shards)
    rows = sum(e.count for e in entries)
    if rows == 0:
        raise InvalidInput("the index has no rows to build an ANN index of")
    dim = index.config.channel_dim("rh") + index.config.channel_dim("gh")
    nl = lists if lists is not None else default_lists(rows)
    if not 1 <= nl <= rows:
        raise InvalidInput(f"lists must be in [1, {rows}], got {nl}")
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf-flat":
        # the rows as stored: float16 (FAISS's fp16 scalar quantizer), 2 bytes a value
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, nl, faiss.ScalarQuantizer.QT_fp16,
                                            faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False  # the rows themselves, not their offsets from the centroid
    else:
        if pq_m < 1 or dim % pq_m:
            raise InvalidInput(f"pq_m must divide the row width {dim}, got {pq_m}")
        ivf = faiss.IndexIVFPQ(quantizer, dim, nl, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    # Training sample: rows spread evenly over the index (deterministic).
    want = min(rows, max(nl * TRAIN_PER_LIST, 256 * (kind == "ivf-pq")), MAX_TRAIN)
    picks = np.unique(np.linspace(0, rows - 1, want).astype(np.int64))
    sample, start = [], 0
    for e in entries:
        local = picks[(picks >= start) & (picks < start + e.count)] - start
        if len(local):
            sample.append(unit_vectors(load(e), local.tolist()))
        start += e.count
    ivf.cp.seed = seed
    ivf.train(np.concatenate(sample))
    del sample
    for pos, e in enumerate(entries):
        sd = load(e)
        for a in range(0, len(sd), ADD_BATCH):
            b = min(len(sd), a + ADD_BATCH)
            labels = (np.int64(pos) << np.int64(32)) + np.arange(a, b, dtype=np.int64)
            ivf.add_with_ids(unit_vectors(sd, slice(a, b)), labels)
    data = faiss.serialize_index(ivf)  # a numpy buffer: no second copy of the rows
    del ivf
    fkey = f"{ANN_DIR}/g{index.generation:08d}-{kind}.faiss"
    store.put(fkey, data)
    meta = AnnMeta(kind=kind, generation=index.generation, lists=nl,
                   pq_m=pq_m if kind == "ivf-pq" else 0, dim=dim, rows=rows,
                   shards=[(e.key, e.sha256, e.count) for e in entries], faiss_key=fkey,
                   faiss_sha256=sha256(data), faiss_bytes=len(data))
    store.put(meta_key(index.generation, kind), meta.to_json())
    return meta


def find(store: Store, index: Index, kind: str | None = None) -> AnnMeta | None:
    """The newest ANN index (of ``kind``, or any) whose shards are all in ``index``'s
    current generation, unchanged; None if there is none."""
    current = {(e.key, e.sha256) for e in index.manifest.shards}
    best: AnnMeta | None = None
    for meta in all_metas(store):
        if kind is not None and meta.kind != kind:
            continue
        if all((k, h) in current for k, h, _ in meta.shards) and \
                (best is None or meta.generation >= best.generation):
            best = meta
    return best


def all_metas(store: Store) -> list[AnnMeta]:
    """Every ANN index written beside the index's shards (readable ones)."""
    out = []
    for key in sorted(store.list(ANN_DIR + "/")):
        if key.endswith(".json"):
            try:
                out.append(AnnMeta.parse(store.get(key)))
            except (ValueError, KeyError, TypeError, NotFound):
                continue
    return out


def delete_stale(store: Store, index: Index) -> int:
    """Delete the ANN indexes (and stray files) that cover a shard the index no longer
    has; returns how many objects were deleted."""
    current = {(e.key, e.sha256) for e in index.manifest.shards}
    keep: set[str] = set()
    for m in all_metas(store):
        if all((k, h) in current for k, h, _ in m.shards):
            keep.update((meta_key(m.generation, m.kind), m.faiss_key))
    gone = 0
    for key in store.list(ANN_DIR + "/"):
        if key not in keep:
            store.delete(key)
            gone += 1
    return gone


@dataclass
class AnnIndex:
    """A loaded ANN index and the per-mean row terms (module docstring)."""

    meta: AnnMeta
    faiss_index: Any
    entries: list[ShardEntry]  # the index's entries of the covered shards, label order
    row_terms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def covered(self) -> set[str]:
        return {e.key for e in self.entries}


def load_ann(store: Store, index: Index, kind: str | None = None) -> AnnIndex:
    """The ANN index ``find`` picks, read and checked against its sha256; NotFound if the
    index has none that fits its current shards (build one: ``rise ann build``)."""
    faiss = _faiss()
    meta = find(store, index, kind)
    if meta is None:
        raise NotFound("the index has no ANN index over its current shards "
                       "(build one: rise ann build INDEX)")
    data = store.get(meta.faiss_key)
    if sha256(data) != meta.faiss_sha256:
        raise InvalidInput(f"ANN index {meta.faiss_key} does not match its sha256")
    fi = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    by_key = {e.key: e for e in index.manifest.shards}
    return AnnIndex(meta=meta, faiss_index=fi, entries=[by_key[k] for k, _, _ in meta.shards])


def _row_terms(ann: AnnIndex, mean: PoolMean, load: ShardLoader
               ) -> tuple[np.ndarray, np.ndarray]:
    """(n_rh, n_gh): |x_c - mu_c| of every covered row, label order within each shard,
    concatenated; one pass per pool mean (keyed by its bytes), kept."""
    mean_key = sha256(mean.rh.numpy().tobytes() + mean.gh.numpy().tobytes())
    with ann.lock:
        got = ann.row_terms.get(mean_key)
        if got is not None:
            return got
        out = []
        for c in ("rh", "gh"):
            mu = getattr(mean, c)
            mm = float(mu @ mu)
            parts = []
            for e in ann.entries:
                x = getattr(load(e), c)
                for a in range(0, x.shape[0], ADD_BATCH):
                    xm = stored_unit(x[a:a + ADD_BATCH]) @ mu
                    parts.append((1.0 - 2.0 * xm + mm).clamp_min(0.0).sqrt().numpy())
            out.append(np.concatenate(parts) if parts else np.zeros(0))
        got = (out[0], out[1])
        if len(ann.row_terms) >= 4:
            ann.row_terms.pop(next(iter(ann.row_terms)))
        ann.row_terms[mean_key] = got
        return got


def search(ann: AnnIndex, qs: QuerySet, spec: ScoreSpec, top: int, *,
           dead: AbstractSet[str], mean: PoolMean | None = None, nprobe: int | None = None,
           load: ShardLoader) -> list[list[tuple[float, str]]]:
    """Per query, up to ``top`` live candidates (score, id) of the covered shards, scores
    exact (float64, float32-rounded as the scan reports them); module docstring.

    ``nprobe``: lists probed (default: all, which is exact for ``ivf-flat``)."""
    if top < 1:
        raise InvalidInput("top must be >= 1")
    if spec.score != "cosine":
        raise InvalidInput("approximate search ranks cosine scores; raw scores are scanned")
    if qs.rh is None or qs.gh is None:
        raise InvalidInput("approximate search needs a sketched index")
    nl = ann.meta.lists
    probe = nl if nprobe is None else nprobe
    if not 1 <= probe <= nl:
        raise InvalidInput(f"nprobe must be in [1, {nl}], got {probe}")
    w = spec.weights
    terms = _row_terms(ann, mean, load) if mean is not None else None
    # per channel: the (centered) unit query q'_c and its constant k_c = <q'_c, mu_c>
    qc, kc, mids = [], [], []
    for col, c in enumerate(("rh", "gh")):
        q = getattr(qs, c)
        if mean is not None:
            mu = getattr(mean, c)
            q = q - mu[None, :]
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
            kc.append(q @ mu)
            assert terms is not None
            mids.append(float(terms[col].min() + terms[col].max()) / 2 or 1.0)
        else:
            kc.append(torch.zeros(len(qs), dtype=torch.float64))
            mids.append(1.0)
        qc.append(q)
    u = torch.cat([w[0] / mids[0] * qc[0], w[1] / mids[1] * qc[1]], 1).to(torch.float32)
    split = qs.rh.shape[1]
    out = []
    for i in range(len(qs)):
        if ann.meta.kind == "ivf-flat":
            out.append(_flat(ann, qs, i, spec, top, probe, u[i:i + 1].numpy(), qc, kc, terms,
                             split, dead, mean, load))
        else:
            ann.faiss_index.nprobe = probe
            fetch = min(ann.meta.rows, top * FETCH_FACTOR * 4)
            _, labels = ann.faiss_index.search(u[i:i + 1].numpy(), fetch)
            labels = labels[0][labels[0] >= 0]
            scored = _rescore(ann, qs, i, spec, labels, dead, mean, load)
            out.append(sorted(scored, key=lambda c: (-c[0], c[1]))[:top])
    return out


def _flat(ann: AnnIndex, qs: QuerySet, i: int, spec: ScoreSpec, top: int, probe: int,
          ui: np.ndarray, qc: list[torch.Tensor], kc: list[torch.Tensor],
          terms: tuple[np.ndarray, np.ndarray] | None, split: int,
          dead: AbstractSet[str], mean: PoolMean | None, load: ShardLoader
          ) -> list[tuple[float, str]]:
    """IVF-Flat, one query: every row of the ``probe`` lists nearest ``ui`` (the proxy)
    scored by the exact formula in float32 from the index's float32 rows, per channel
    (``<q'_c, x_c>``, then ``k_c`` and the row's ``n_c``); the best rescored in float64
    from the shards, as many as the float32 error bound requires (module docstring)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(ann.faiss_index)
    lists = ivf.invlists
    dim = ann.meta.dim
    _, probed = ivf.quantizer.search(ui, probe)
    offsets = np.cumsum([0] + [e.count for e in ann.entries])
    w = spec.weights
    qf = [q[i].to(torch.float32).numpy() for q in qc]
    labels, scores = [], []
    for ln in probed[0].tolist():
        size = lists.list_size(ln) if ln >= 0 else 0
        if size == 0:
            continue
        rows = faiss.rev_swig_ptr(lists.get_codes(ln), size * ivf.code_size
                                  ).view(np.float16).reshape(size, dim).astype(np.float32)
        if ivf.by_residual:  # codes of offsets from the list's centroid (older builds)
            rows += ivf.quantizer.reconstruct(ln)[None, :]
        ids = faiss.rev_swig_ptr(lists.get_ids(ln), size).copy()
        s = np.zeros(size, dtype=np.float64)
        where = offsets[ids >> 32] + (ids & 0xFFFFFFFF) if terms is not None else None
        for col, (lo, hi) in enumerate(((0, split), (split, dim))):
            if w[col] == 0.0:
                continue
            d = rows[:, lo:hi] @ qf[col]
            if terms is not None:
                s += w[col] * (d - float(kc[col][i])) / terms[col][where]
            else:
                s += w[col] * d
        labels.append(ids)
        scores.append(s)
    if not labels:
        return []
    lab = np.concatenate(labels)
    s32 = np.concatenate(scores)
    order = np.argsort(-s32, kind="stable")
    # float32 error of each term: a dot of unit vectors (gamma of its length, the float32
    # roundings of q and x), divided by the smallest n_c
    eps = 0.0
    for col, (lo, hi) in enumerate(((0, split), (split, dim))):
        m = hi - lo
        low = float(terms[col].min()) if terms is not None else 1.0
        # + the float16 rounding of the indexed unit rows: |x16 - x| <= 2^-11 |x|
        eps += w[col] * (m * _U32 / (1 - m * _U32) + 3 * _U32 + 2.0 ** -11) / max(low, 1e-30)
    fetch = min(len(lab), max(top * FETCH_FACTOR, top + 16))
    while True:
        scored = _rescore(ann, qs, i, spec, lab[order[:fetch]], dead, mean, load)
        if fetch >= len(lab):
            break
        live = sorted((v for v, _ in scored), reverse=True)
        if len(live) >= top and live[top - 1] > float(s32[order[fetch - 1]]) + eps:
            break
        fetch = min(len(lab), fetch * 2)
    return sorted(scored, key=lambda c: (-c[0], c[1]))[:top]


def _rescore(ann: AnnIndex, qs: QuerySet, i: int, spec: ScoreSpec, labels: np.ndarray,
             dead: AbstractSet[str], mean: PoolMean | None, load: ShardLoader
             ) -> list[tuple[float, str]]:
    """Exact scores (float64, float32-rounded) of the labelled rows for query ``i``, the
    dead ones left out: the stored rows read from their shards (``cosine_block``, the
    float64 reference of the scan)."""
    by_shard: dict[int, list[int]] = {}
    for lab in labels.tolist():
        by_shard.setdefault(lab >> 32, []).append(lab & 0xFFFFFFFF)
    out: list[tuple[float, str]] = []
    w = spec.weights
    for pos, rows in by_shard.items():
        sd = load(ann.entries[pos])
        ids = [sd.ids[r] for r in rows]
        s = torch.zeros(len(rows), dtype=torch.float64)
        for c, wc in zip(("rh", "gh"), w, strict=True):
            if wc == 0.0:
                continue
            x = stored_unit(getattr(sd, c)[rows])
            q = getattr(qs, c)[i:i + 1]
            mu = getattr(mean, c) if mean is not None else None
            s += wc * cosine_block(q, x, mu)[0]
        vals = s.to(torch.float32).tolist()
        out.extend((v, rid) for v, rid in zip(vals, ids, strict=True) if rid not in dead)
    return out
