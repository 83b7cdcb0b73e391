"""Synthetic indexes for ``bench_scale.py``: real shards made by the real sketcher.

Hidden states, sparse residuals and projected errors are drawn at random, from a mixture
of ``TOPICS`` latent topics (each topic a centre of its hidden states and of its projected
errors and a pool of the vocabulary its residuals put mass on), so that the pool has the
clustered structure real corpora have.  They go through ``rise.sketch`` (the CountSketch
maps of the default seed and ``outer_accumulate``, as ``rise.readout.sketch_batch`` does)
and ``rise.shard.build_shard`` into a store, with a manifest (``rise.index``), so the bytes
are real shards of the default dims, and ``rise.index.open_index`` opens the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from rise import constants
from rise.config import make_config
from rise.factors import Features
from rise.index import shard_entry, write_manifest
from rise.manifest import FieldsEntry, IngestEntry, Manifest, ModelEntry
from rise.score import QuerySet, make_queryset
from rise.shard import build_shard
from rise.sketch import Sketcher, make_sketcher, outer_accumulate
from rise.store import Store

VOCAB = 49152  # SmolLM2's
HIDDEN = 576
TOKENS = 16  # supervised tokens per example
TOPK = 128  # residual entries kept per token (the default K), plus the target
TOPICS = 512
TOPIC_VOCAB = 2048
BATCH = 8


class Generator:
    """Draws examples of the topic mixture and sketches them."""

    def __init__(self, seed: int = 0, dims: tuple[int, int, int] = constants.DEFAULT_DIMS
                 ) -> None:
        self.config = make_config(dims=dims)
        self.sketcher: Sketcher = make_sketcher(self.config.seed, VOCAB, HIDDEN, dims)
        self.sh = self.sketcher.ch.matrix(torch.float32)
        self.sg = self.sketcher.cg.matrix(torch.float32)
        g = torch.Generator().manual_seed(10_000 + seed)  # the topics: the same for queries
        self.h_centre = torch.randn(TOPICS, HIDDEN, generator=g)
        self.g_centre = torch.randn(TOPICS, HIDDEN, generator=g)
        self.vocab = torch.randint(0, VOCAB, (TOPICS, TOPIC_VOCAB), generator=g)

    def features(self, n: int, g: torch.Generator) -> Features:
        rh, gh = [], []
        for start in range(0, n, BATCH):
            b = min(BATCH, n - start)
            t = b * TOKENS
            topic = torch.randint(0, TOPICS, (b,), generator=g).repeat_interleave(TOKENS)
            h = self.h_centre[topic] + torch.randn(t, HIDDEN, generator=g)
            gv = self.g_centre[topic] + 2.0 * torch.randn(t, HIDDEN, generator=g)
            # residual p - onehot(y) on TopK(p) u {y}: the top entries from the topic's pool
            pick = torch.randint(0, TOPIC_VOCAB, (t, TOPK + 1), generator=g)
            idx = self.vocab[topic[:, None], pick]
            p = torch.rand(t, TOPK + 1, generator=g) ** 4
            p = p / p.sum(1, keepdim=True) * 0.9
            p[:, 0] -= 1.0  # the target
            cr = self.sketcher.cr.apply_sparse(idx, p)
            chh = h @ self.sh
            cgg = gv @ self.sg
            ex = torch.arange(b).repeat_interleave(TOKENS)
            w = torch.full((t,), 1.0 / TOKENS, dtype=torch.float64)
            rh.append(outer_accumulate(cr.double(), chh.double(), w, ex, b))
            gh.append(outer_accumulate(cgg.double(), chh.double(), w, ex, b))
        return Features(token_counts=torch.full((n,), TOKENS, dtype=torch.int64),
                        rh=torch.cat(rh), gh=torch.cat(gh))

    def queries(self, n: int, seed: int) -> QuerySet:
        g = torch.Generator().manual_seed(20_000 + seed)
        return make_queryset([f"q{i}" for i in range(n)], self.features(n, g), self.config,
                             VOCAB)


def model_entry() -> ModelEntry:
    z = "0" * 64
    return ModelEntry(name="synthetic", config_sha256=z, head_sha256=z, tokenizer_sha256=z,
                      vocab=VOCAB, hidden=HIDDEN)


def build_index(store: Store, n: int, *, seed: int = 0,
                shard_size: int = constants.DEFAULT_SHARD_SIZE,
                progress: Callable[[int, float], None] | None = None) -> Manifest:
    """An index of ``n`` synthetic examples in ``store`` (generation 1); shards already
    there are kept (a run cut off is resumed)."""
    gen = Generator(seed)
    entries = []
    t0 = time.perf_counter()
    for s, start in enumerate(range(0, n, shard_size)):
        key = constants.shard_key(1, s)
        m = min(shard_size, n - start)
        if not store.exists(key):
            g = torch.Generator().manual_seed(seed * 1_000_003 + s)
            feats = gen.features(m, g)
            ids = [f"ex-{start + i:09d}" for i in range(m)]
            data = build_shard({"generation": 1, "shard": s, "kind": "synthetic"}, ids,
                               [1] * m, list(range(start, start + m)), feats,
                               gen.config.storage_dtype)
            store.put(key, data)
        entries.append(shard_entry(store, key, 1, s))
        if progress is not None:
            progress(start + m, time.perf_counter() - t0)
    ingest = IngestEntry(generation=1, dataset_uri="synthetic:", dataset_sha256="0" * 64,
                         fields=FieldsEntry(), records=n, truncated=0, shard_size=shard_size)
    manifest = Manifest.build(1, model=model_entry(), config=gen.config, ingests=[ingest],
                              shards=entries, tombstones=[])
    if not store.exists(constants.manifest_key(1)):
        write_manifest(store, manifest)
    return manifest
