"""The sketched scan (rise.score): float32 accumulation over the stored float16 rows within
its stated bound of the float64 reference, one kernel for memory-mapped and in-memory
shards (equal bit for bit), many queries in one pass, and the exact-factor path untouched.
"""

from __future__ import annotations

import pytest
import torch
from rise import score as S
from rise.factors import Features
from rise.score import PoolMean, QuerySet, ScoreSpec
from rise.shard import build_shard, map_shard, parse_shard

# The default dims (128, 64, 64): RH rows of 8192 values, GH rows of 4096.
KR, KH, KG = 128, 64, 64
N = 2 * S.SCAN_ROWS + 37  # several row blocks and a ragged last one


def _rows(n: int, d: int, g: torch.Generator, common: torch.Tensor) -> torch.Tensor:
    """Rows sharing a common direction, as real sketches do (what centering removes)."""
    return torch.randn(n, d, generator=g, dtype=torch.float64) + 2.0 * common


@pytest.fixture(scope="module")
def shard_bytes() -> bytes:
    g = torch.Generator().manual_seed(1)
    feats = Features(token_counts=torch.full((N,), 7, dtype=torch.int64),
                     rh=_rows(N, KR * KH, g, torch.randn(KR * KH, generator=g, dtype=torch.float64)),
                     gh=_rows(N, KG * KH, g, torch.randn(KG * KH, generator=g, dtype=torch.float64)))
    ids = [f"x{i:04d}" for i in range(N)]
    return build_shard({"kind": "test"}, ids, [1] * N, list(range(N)), feats, "float16")


def _queries(q: int, seed: int) -> QuerySet:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c, d in (("rh", KR * KH), ("gh", KG * KH)):
        x = torch.randn(q, d, generator=g, dtype=torch.float64)
        out[c] = S.stored_unit((x / x.norm(dim=1, keepdim=True)).to(torch.float16))
    return QuerySet(ids=[f"q{i}" for i in range(q)], norms=torch.rand(q, 2, dtype=torch.float64) + 1,
                    rh=out["rh"], gh=out["gh"])


SPECS = [ScoreSpec(), ScoreSpec(center=False), ScoreSpec(channel="rh", lam=1.0),
         ScoreSpec(channel="gh", center=True), ScoreSpec(channel="rh", score="raw"),
         ScoreSpec(lam=0.3, center=True)]


def test_dot_error_is_the_stated_bound():
    # gamma_1024 + gamma_8 + 2u for the RH rows of the default dims
    assert S.dot_error(KR * KH) == pytest.approx(6.17e-5, rel=1e-2)
    assert S.dot_error(KG * KH) < S.dot_error(KR * KH) < 1e-4


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_scan_is_within_the_bound_of_the_float64_reference(shard_bytes, spec):
    sd = parse_shard(shard_bytes)
    qs = _queries(16, 2)
    mean = S.pool_mean([sd], frozenset()) if spec.centered(True, N) else None
    got = S.shard_scores(qs, sd, spec, vocab=0, mean=mean)
    ref = S.shard_scores(qs, sd, spec, vocab=0, mean=mean, reference=True)
    err = (got - ref).abs()
    if spec.score == "raw":
        scale = qs.norms[:, :1] * sd.norms[:, 0].double()[None, :]
        assert (err / scale).max() <= S.dot_error(KR * KH)
        return
    bound = torch.zeros_like(ref)
    for c, w in zip(("rh", "gh"), spec.weights, strict=True):
        if w:
            mu = getattr(mean, c) if mean is not None else None
            bound = torch.maximum(bound, S.precision_bound(getattr(qs, c), sd, c, mu))
    assert bool((err <= bound).all())
    assert float(err.max()) < 1e-4  # the product's promise on sketches like these
    # values too: the mean over targets of the same cosines
    v = S.value_scores(qs, sd, spec, 0, mean)
    vr = S.value_scores(qs, sd, spec, 0, mean, reference=True)
    assert float((v - vr).abs().max()) < 1e-4


def test_memory_mapped_scan_equals_in_memory_bit_for_bit(shard_bytes, tmp_path):
    path = tmp_path / "shard.safetensors"
    path.write_bytes(shard_bytes)
    mem, mapped = parse_shard(shard_bytes), map_shard(path)
    assert mapped.ids == mem.ids
    assert torch.equal(mapped.norms, mem.norms) and torch.equal(mapped.rh_sum, mem.rh_sum)
    cases = [(_queries(5, 3), spec) for spec in SPECS] + [(_queries(40, 4), ScoreSpec())]
    for qs, spec in cases:  # 40 queries: the scan's larger blocks
        mean = S.pool_mean([mem], frozenset()) if spec.centered(True, N) else None
        a = S.shard_scores(qs, mem, spec, 0, mean)
        b = S.shard_scores(qs, mapped, spec, 0, mean)
        assert torch.equal(a, b)
        assert torch.equal(S.value_scores(qs, mem, spec, 0, mean),
                           S.value_scores(qs, mapped, spec, 0, mean))


def test_many_queries_are_one_matrix_product(shard_bytes, monkeypatch):
    """One scan per channel whatever the number of queries, and each query's scores are
    those it gets alone (within the bound: the product's blocking may differ)."""
    sd = parse_shard(shard_bytes)
    calls = []
    real = S.scan_dots
    monkeypatch.setattr(S, "scan_dots",
                        lambda x, q, *a: calls.append(q.shape[0]) or real(x, q, *a))
    qs = _queries(64, 4)
    mean = S.pool_mean([sd], frozenset())
    many = S.shard_scores(qs, sd, ScoreSpec(), 0, mean)
    assert calls == [65, 65]  # both channels, 64 queries plus the pool mean
    one = S.shard_scores(QuerySet(ids=["q"], norms=qs.norms[:1], rh=qs.rh[:1], gh=qs.gh[:1]),
                         sd, ScoreSpec(), 0, mean)
    assert float((many[:1] - one).abs().max()) < 1e-5


def test_norms_come_from_the_first_scan_exact_to_float64(shard_bytes):
    sd = parse_shard(shard_bytes)
    assert ("norm", "rh") not in sd.derived
    S.shard_scores(_queries(2, 6), sd, ScoreSpec(center=False), 0)
    ref = torch.linalg.vector_norm(sd.rh.double(), dim=1)
    assert float((sd.derived[("norm", "rh")] - ref).abs().max()) < 1e-12
    assert torch.equal(S.row_norms(sd.rh), sd.derived[("norm", "rh")])


def test_scan_dots_reads_blocks_of_any_shape():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(S.SCAN_ROWS + 3, S.SCAN_COLS + 5, generator=g).to(torch.float16)
    q = torch.randn(3, S.SCAN_COLS + 5, generator=g, dtype=torch.float64)
    got = S.scan_dots(x, q)
    assert got.dtype == torch.float32 and got.shape == (S.SCAN_ROWS + 3, 3)
    ref = x.double() @ q.T
    assert float((got.double() - ref).abs().max()) < 1e-3
    assert S.scan_dots(x[:0], q).shape == (0, 3)


def test_pool_mean_from_memory_mapped_shard(shard_bytes, tmp_path):
    path = tmp_path / "s.safetensors"
    path.write_bytes(shard_bytes)
    dead = frozenset({"x0001", "x0100"})
    a = S.pool_mean([parse_shard(shard_bytes)], dead)
    b = S.pool_mean([map_shard(path)], dead)
    assert isinstance(b, PoolMean) and torch.equal(a.rh, b.rh) and torch.equal(a.gh, b.gh)


# ------------------------------------------------------------------ near-duplicates


def test_group_near_duplicates_leader_rule():
    """In rank order a hit joins the group whose best hit it is most similar to (at least
    the threshold), else starts a group while fewer than top exist, else is dropped."""
    hits = [("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6), ("e", 0.5)]
    sim = torch.eye(5, dtype=torch.float64)
    sim[1, 0] = sim[0, 1] = 0.95  # b copies a
    sim[3, 2] = sim[2, 3] = 0.91  # d copies c
    sim[3, 0] = sim[0, 3] = 0.93  # ... and copies a more closely: it joins a
    sim[4, 2] = sim[2, 4] = 0.5  # e is its own source
    groups = S.group_near_duplicates(hits, sim, 0.9, top=3)
    assert groups == [[("a", 0.9), ("b", 0.8), ("d", 0.6)], [("c", 0.7)], [("e", 0.5)]]
    assert S.group_near_duplicates(hits, sim, 0.9, top=2) == groups[:2]  # e dropped
    assert S.group_near_duplicates(hits, sim, 0.99, top=5) == [[h] for h in hits]


def test_row_similarity_is_the_centered_combined_cosine():
    g = torch.Generator().manual_seed(3)
    common = torch.randn(KR * KH, generator=g, dtype=torch.float64)
    rh = S.stored_unit(_rows(6, KR * KH, g, common))
    gh = S.stored_unit(_rows(6, KG * KH, g, common[: KG * KH]))
    rows = QuerySet(ids=[str(i) for i in range(6)], norms=torch.ones(6, 2), rh=rh, gh=gh)
    mean = PoolMean(rh=rh.mean(0), gh=gh.mean(0))
    sim = S.row_similarity(rows, rows, ScoreSpec(lam=0.25), 0, mean)

    def cos(x, y):
        return float((x @ y) / (x.norm() * y.norm()))

    for i, j in ((0, 1), (2, 5)):
        want = 0.25 * cos(rh[i] - mean.rh, rh[j] - mean.rh) \
            + 0.75 * cos(gh[i] - mean.gh, gh[j] - mean.gh)
        assert abs(float(sim[i, j]) - want) < 1e-12
    assert torch.allclose(torch.diagonal(sim), torch.ones(6, dtype=torch.float64))
    # Raw scoring still compares sketches by cosine.
    raw = S.row_similarity(rows, rows, ScoreSpec(channel="rh", score="raw"), 0, None)
    assert abs(float(raw[0, 1]) - cos(rh[0], rh[1])) < 1e-12
