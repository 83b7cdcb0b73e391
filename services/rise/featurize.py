"""Turn encoded records into per-example features: sketches, or exact per-token factors.

This is the one function the CLI, the Celery shard tasks and query sketching all call.
Batches are padded on the right; the head math runs on the head's device in float32 (or
float64 for float64 models), a chunk of tokens at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from rise import constants
from rise.config import SketchConfig
from rise.data import Encoded
from rise.errors import Cancelled
from rise.factors import Features, TokenFactors
from rise.model import LoadedModel
from rise.readout import (
    chunk_tokens_for,
    iter_readouts,
    sketch_batch,
    supervised_positions,
)
from rise.sketch import make_sketcher

ProgressFn = Callable[[int, int], None]
"""Called after each batch with (examples done in this call, tokens done in this call)."""
CancelFn = Callable[[], bool]
"""Polled between batches; returning True stops the work with Cancelled."""


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def pad_batch(encs: Sequence[Encoded], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, sup_start) of a batch, as the model is run here."""
    t = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), t), dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, : len(e.input_ids)] = 1
    sup = torch.tensor([e.sup_start for e in encs], dtype=torch.long)
    return ids, mask, sup


def featurize(
    lm: LoadedModel,
    encoded: Sequence[Encoded],
    config: SketchConfig,
    *,
    batch_size: int = constants.DEFAULT_BATCH_SIZE,
    head_chunk_bytes: int = constants.DEFAULT_HEAD_CHUNK_BYTES,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> Features:
    """Features of ``encoded`` under ``config`` (sketches or per-token factors)."""
    head = lm.head
    dt = lm.compute_dtype
    chunk = chunk_tokens_for(head.vocab, dt, head_chunk_bytes)
    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id or 0
    sketcher = None
    if config.sketched:
        sketcher = make_sketcher(config.seed, head.vocab, head.hidden, config.dims)
    # A shard's sketches are filled in place, batch by batch: concatenating per-batch parts
    # at the end held every float64 sketch twice (about 200 MB for 1,024 examples at the
    # default dims; tests/benchmarks/reports/ingest-scale.md).
    rh_all: torch.Tensor | None = None
    gh_all: torch.Tensor | None = None
    counts: list[torch.Tensor] = []
    factors: list[TokenFactors] = []
    # Sorting by length inside the call would change which examples share a batch but not
    # any example's features (padding is masked); keep input order for simplicity.
    for rng in _batches(len(encoded), batch_size):
        if cancel is not None and cancel():
            raise Cancelled("cancelled")
        encs = [encoded[i] for i in rng]
        ids, mask, sup = pad_batch(encs, pad_id)
        hidden = lm.hidden_states(ids, mask)
        with torch.inference_mode():
            pos = supervised_positions(hidden, ids, mask, sup, config.weighting, dt)
            counts.append(pos.counts.cpu())
            if sketcher is not None:
                rh, gh = sketch_batch(pos, head, sketcher, config.topk, config.temperature,
                                      chunk, len(encs))
            else:
                factors.extend(_factors(pos, head, config, chunk, len(encs)))
        if sketcher is not None:  # outside inference mode: the result is a normal tensor
            if rh_all is None or gh_all is None:
                rh_all = torch.empty((len(encoded), rh.shape[1]), dtype=rh.dtype)
                gh_all = torch.empty((len(encoded), gh.shape[1]), dtype=gh.dtype)
            rh_all[rng.start:rng.stop] = rh.cpu()
            gh_all[rng.start:rng.stop] = gh.cpu()
        if progress is not None:
            progress(len(encs), int(pos.counts.sum()))
    feats = Features(token_counts=torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long))
    if sketcher is not None:
        kr, kh, kg = config.dims
        feats.rh = rh_all if rh_all is not None else torch.zeros(0, kr * kh, dtype=torch.float64)
        feats.gh = gh_all if gh_all is not None else torch.zeros(0, kg * kh, dtype=torch.float64)
    else:
        feats.factors = factors
    return feats


def _factors(pos, head, config: SketchConfig, chunk: int, n_examples: int) -> list[TokenFactors]:
    parts = [ro for _, ro in iter_readouts(pos, head, config.topk, config.temperature, chunk)]
    h = torch.cat([p.h for p in parts]).cpu()
    g = torch.cat([p.g for p in parts]).cpu()
    r = torch.cat([p.r for p in parts]).cpu()
    idx = None if parts[0].idx is None else torch.cat([p.vocab_ids for p in parts]).cpu()
    ex = pos.example.cpu()
    w = pos.w.cpu()
    out = []
    for e in range(n_examples):
        sel = (ex == e).nonzero(as_tuple=True)[0]
        out.append(TokenFactors(h=h[sel], g=g[sel], w=w[sel], r=r[sel],
                           idx=None if idx is None else idx[sel]))
    return out
