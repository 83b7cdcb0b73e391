"""The readout math against autograd in float64: exact mode (rise.exact), projected errors
and the Top-K residual (rise.readout), sketches (rise.sketch), all through rise.featurize."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TEXTS, save_tiny_model
from rise import exact
from rise.config import SketchConfig, make_config
from rise.data import Record, encode_record
from rise.featurize import featurize
from rise.model import load_model
from rise.sketch import make_map

PAIRS = [
    ("Question: what is a sketch?", " A small random projection."),
    ("Translate to French: cat", " chat"),
    ("2 + 2 =", " 4, as every engineer knows."),
]


def _records(prompt_response: bool) -> list[Record]:
    if prompt_response:
        return [Record(id=str(i), number=i, text=None, prompt=p, response=r, raw={})
                for i, (p, r) in enumerate(PAIRS)]
    return [Record(id=str(i), number=i, text=t, prompt=None, response=None, raw={})
            for i, t in enumerate(TEXTS[:4])]


@pytest.fixture(scope="module")
def models64(tmp_path_factory):
    root = tmp_path_factory.mktemp("models64")
    out = {a: load_model(save_tiny_model(a, root / a, torch.float64), dtype="float64")
           for a in ("gpt_neox", "llama", "gpt2")}
    return out


def ground_truth(lm, enc, weighting: str):
    """Autograd of the example's loss w.r.t. a separate float64 copy of the head weight.

    The copy replaces the head's weight for this forward only, so for tied embeddings the
    gradient holds the head's part alone.  Returns (dL/dW (V, d), dL/dh (T-1, d) of the
    supervised positions).
    """
    model = lm.model
    head = model.get_output_embeddings()
    orig = head.weight
    w64 = torch.nn.Parameter(orig.detach().clone().double())
    ids = torch.tensor([enc.input_ids])
    mask = torch.ones_like(ids)
    try:
        head.weight = w64
        with torch.enable_grad():
            h = model.base_model(input_ids=ids, attention_mask=mask)[0].detach().requires_grad_()
            logits = model.get_output_embeddings()(h)
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            labels = ids.clone()
            labels[0, : max(enc.sup_start, 1)] = -100
            tgt = labels[0, 1:]
            per_tok = torch.nn.functional.cross_entropy(logits[0, :-1], tgt, reduction="none",
                                                        ignore_index=-100)
            n = int((tgt != -100).sum())
            loss = per_tok.sum() / (n if weighting == "mean" else 1)
            loss.backward()
    finally:
        head.weight = orig
    sup = (tgt != -100).nonzero(as_tuple=True)[0]
    return w64.grad.detach(), h.grad[0, sup].detach()


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
@pytest.mark.parametrize("prompt_response", [False, True])
@pytest.mark.parametrize("weighting", ["mean", "sum"])
def test_exact_rh_is_head_gradient_inner_product(models64, arch, prompt_response, weighting):
    lm = models64[arch]
    recs = _records(prompt_response)
    encs = [encode_record(r, lm.tokenizer, 64) for r in recs]
    cfg = make_config(exact=True, weighting=weighting)
    feats = featurize(lm, encs, cfg, batch_size=2)  # batches of 2 exercise padding
    truth = [ground_truth(lm, e, weighting) for e in encs]
    vocab = lm.head.vocab
    for i, fi in enumerate(feats.factors):
        # g_t = dLoss_t/dh_t: the weighted projected error is the hidden-state gradient
        gw = fi.g * fi.w[:, None]
        torch.testing.assert_close(gw, truth[i][1], rtol=1e-9, atol=1e-12)
        for j, fj in enumerate(feats.factors):
            want = float((truth[i][0] * truth[j][0]).sum())
            got = exact.inner(fi, fj, "rh", vocab)
            assert abs(got - want) <= 1e-6 * abs(want), (i, j, got, want)


def test_exact_gh_matches_dense_gh(models64):
    lm = models64["llama"]
    encs = [encode_record(r, lm.tokenizer, 64) for r in _records(False)]
    feats = featurize(lm, encs, make_config(exact=True), batch_size=3)
    dense = [(f.w[:, None] * f.g).T @ f.h for f in feats.factors]  # (d, d) GH matrices
    for i, fi in enumerate(feats.factors):
        for j, fj in enumerate(feats.factors):
            want = float((dense[i] * dense[j]).sum())
            assert exact.inner(fi, fj, "gh", lm.head.vocab) == pytest.approx(want, rel=1e-9)


def test_softcapped_logits_stay_exact(tmp_path):
    """Gemma-2 soft-caps logits: the cap's Jacobian is folded into r_t."""
    from conftest import VOCAB, byte_tokenizer
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, final_logit_softcapping=3.0, pad_token_id=257,
                       bos_token_id=256, eos_token_id=256)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64)
    m.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    lm = load_model(tmp_path, dtype="float64")
    assert lm.head.softcap == 3.0
    encs = [encode_record(r, lm.tokenizer, 64) for r in _records(False)[:3]]
    feats = featurize(lm, encs, make_config(exact=True), batch_size=3)
    truth = [ground_truth(lm, e, "mean") for e in encs]
    for i, fi in enumerate(feats.factors):
        torch.testing.assert_close(fi.g * fi.w[:, None], truth[i][1], rtol=1e-9, atol=1e-12)
        for j, fj in enumerate(feats.factors):
            want = float((truth[i][0] * truth[j][0]).sum())
            assert exact.inner(fi, fj, "rh", lm.head.vocab) == pytest.approx(want, rel=1e-6)


def test_chunking_changes_nothing(models64):
    lm = models64["gpt_neox"]
    encs = [encode_record(r, lm.tokenizer, 64) for r in _records(False)]
    cfg = make_config(topk=8, dims=(16, 8, 8))
    big = featurize(lm, encs, cfg, batch_size=4)
    tiny = featurize(lm, encs, cfg, batch_size=1, head_chunk_bytes=1)  # one token per chunk
    torch.testing.assert_close(big.rh, tiny.rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(big.gh, tiny.gh, rtol=1e-10, atol=1e-12)


def test_batches_fill_the_shard_tensors_in_place(models64):
    """Each batch's sketches land in their rows of one (n, k) tensor per channel (no
    concatenation of per-batch parts): the same bytes as featurizing each batch alone,
    the last batch short; no records give empty tensors of the right width."""
    lm = models64["gpt_neox"]
    encs = [encode_record(r, lm.tokenizer, 64) for r in _records(False)]
    assert len(encs) % 3  # a short last batch
    cfg = make_config(topk=8, dims=(16, 8, 8))
    whole = featurize(lm, encs, cfg, batch_size=3)
    parts = [featurize(lm, encs[i:i + 3], cfg, batch_size=3) for i in range(0, len(encs), 3)]
    assert whole.rh is not None and whole.gh is not None
    assert whole.rh.shape == (len(encs), 16 * 8) and whole.gh.shape == (len(encs), 8 * 8)
    assert not whole.rh.is_inference() and not whole.gh.is_inference()  # callers may edit
    assert torch.equal(whole.rh, torch.cat([p.rh for p in parts if p.rh is not None]))
    assert torch.equal(whole.gh, torch.cat([p.gh for p in parts if p.gh is not None]))
    none = featurize(lm, [], cfg)
    assert none.rh is not None and none.gh is not None
    assert none.rh.shape == (0, 16 * 8) and none.gh.shape == (0, 8 * 8)


def test_topk_keeps_target_and_top_entries(models64):
    """Residual entries: TopK(p) U {y}; the dense residual restricted to them, zero elsewhere."""
    from rise.readout import readout

    lm = models64["llama"]
    torch.manual_seed(1)
    h = torch.randn(6, lm.head.hidden, dtype=torch.float64)
    y = torch.randint(0, lm.head.vocab, (6,))
    sparse = readout(h, y, lm.head, 5, 1.0)
    dense = readout(h, y, lm.head, None, 1.0)
    rebuilt = torch.zeros_like(dense.r).scatter_add_(1, sparse.idx, sparse.r)
    p = torch.softmax(h @ lm.head.weight.T, -1)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep.scatter_(1, p.topk(5, -1).indices, True)
    keep[torch.arange(6), y] = True
    torch.testing.assert_close(rebuilt, torch.where(keep, dense.r, torch.zeros_like(dense.r)))
    torch.testing.assert_close(sparse.g, rebuilt @ lm.head.weight)


def _sketch_inner(lm, encs, seed, dims):
    f = featurize(lm, encs, make_config(topk="all", dims=dims, seed=seed), batch_size=4)
    return float(f.rh[0] @ f.rh[1]), float(f.gh[0] @ f.gh[1])


def test_sketched_inner_products_are_unbiased_and_tighten_with_dims(models64):
    lm = models64["gpt_neox"]
    encs = [encode_record(r, lm.tokenizer, 64) for r in _records(False)[:2]]
    ex = featurize(lm, encs, SketchConfig(mode="nosketch", topk=None), batch_size=2).factors
    want_rh = exact.inner(ex[0], ex[1], "rh", lm.head.vocab)
    want_gh = exact.inner(ex[0], ex[1], "gh", lm.head.vocab)
    mse = {}
    for dims in [(4, 4, 4), (32, 16, 16)]:
        vals = torch.tensor([_sketch_inner(lm, encs, s, dims) for s in range(300)],
                            dtype=torch.float64)
        mean, se = vals.mean(0), vals.std(0) / math.sqrt(len(vals))
        for c, want in enumerate((want_rh, want_gh)):
            assert abs(float(mean[c]) - want) <= 4 * float(se[c]), (dims, c, mean, want, se)
        mse[dims] = ((vals - torch.tensor([want_rh, want_gh])) ** 2).mean(0)
    assert (mse[(32, 16, 16)] < 0.5 * mse[(4, 4, 4)]).all(), mse


def test_count_sketch_maps_are_pinned():
    """Maps are a pure function of (seed, map, index); these values must never change,
    or every index ever written stops matching its queries."""
    m = make_map(seed=7, name="r", n=10, k=16)
    again = make_map(seed=7, name="r", n=10, k=16)
    assert torch.equal(m.bucket, again.bucket) and torch.equal(m.sign, again.sign)
    # prefix property: counter-based, so a longer map extends a shorter one
    longer = make_map(seed=7, name="r", n=1000, k=16)
    assert torch.equal(longer.bucket[:10], m.bucket)
    assert m.bucket.tolist() == PINNED_BUCKETS and m.sign.tolist() == PINNED_SIGNS
    other = make_map(seed=8, name="r", n=10, k=16)
    assert not torch.equal(other.bucket, m.bucket)
    assert set(m.sign.tolist()) <= {-1.0, 1.0}


PINNED_BUCKETS = [7, 4, 0, 14, 12, 3, 2, 12, 10, 1]
PINNED_SIGNS = [-1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0]
