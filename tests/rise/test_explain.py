"""Explaining a hit (rise.explain): the token-pair decomposition sums to the unsketched
score, which float64 autograd of the head reproduces; the index's sketched score agrees
with it within the sketch's error, over many sketch seeds."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import TEXTS, save_tiny_model, write_jsonl
from rise import api
from rise.config import make_config
from rise.data import FieldMap, Record, encode_record
from rise.errors import InvalidInput, NotFound
from rise.explain import explain, pick_query
from rise.model import load_model
from rise.score import ScoreSpec
from rise.sketch import make_sketcher
from rise.store import LocalStore

QUERY = Record(id="q", number=0, text="Sketches of gradients say which examples shaped it.",
               prompt=None, response=None, raw={})


@pytest.fixture(scope="module")
def lm64(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain64")
    return {a: load_model(save_tiny_model(a, root / a, torch.float64), dtype="float64")
            for a in ("gpt_neox", "llama", "gpt2")}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("explainpool")
    return write_jsonl(root / "pool.jsonl", [{"id": f"doc-{i}", "text": t}
                                              for i, t in enumerate(TEXTS)])


def build(tmp_path, lm, pool, **cfg) -> api.Index:
    store = LocalStore(tmp_path / f"idx-{len(list(tmp_path.iterdir()))}")
    api.create(store, lm, pool, FieldMap(), make_config(**cfg))
    return api.open_index(store)


def head_gradients(lm, rec: Record, tau: float, max_length: int = 512):
    """Dense (RH, GH) of one example by float64 autograd of ``tau * CE(W h / tau)``
    (mean over supervised tokens) w.r.t. a separate float64 copy of the head: with K = V,
    d/dz of it is softmax(z / tau) - onehot, the residual; GH is sum_t dL/dh_t h_t^T."""
    enc = encode_record(rec, lm.tokenizer, max_length)
    ids = torch.tensor([enc.input_ids])
    w64 = lm.model.get_output_embeddings().weight.detach().clone().double().requires_grad_()
    with torch.enable_grad():
        h = lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
        h = h[0, :-1].detach().double().requires_grad_()
        first = max(enc.sup_start, 1)
        keep = torch.arange(h.shape[0]) + 1 >= first
        tgt = ids[0, 1:][keep]
        z = h[keep] @ w64.T
        loss = tau * torch.nn.functional.cross_entropy(z / tau, tgt, reduction="mean")
        loss.backward()
    return w64.grad.detach(), h.grad[keep].T @ h.detach()[keep]


def cos(a, b) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def hit_record(pool_id: str) -> Record:
    i = int(pool_id.split("-")[1])
    return Record(id=pool_id, number=i, text=TEXTS[i], prompt=None, response=None, raw={})


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])  # gpt2: tied embeddings
def test_exact_index_explanation_sums_to_autograd_cosine(tmp_path, lm64, pool, arch):
    lm = lm64[arch]
    index = build(tmp_path, lm, pool, exact=True)
    e = explain(index, lm, QUERY, "doc-2")
    rq, gq = head_gradients(lm, QUERY, 1.0)
    rx, gx = head_gradients(lm, hit_record("doc-2"), 1.0)
    want = 0.5 * cos(rq, rx) + 0.5 * cos(gq, gx)
    assert abs(e.score - want) <= 1e-6 * abs(want)
    assert e.centering == 0.0 and not e.centering_applied
    # the pair matrix, the token sums and the total are one decomposition
    assert abs(e.pair_total - e.score) <= 1e-12
    qsum = sum(t.contribution for t in e.query_tokens)
    xsum = sum(t.contribution for t in e.hit_tokens)
    assert abs(qsum - e.score) <= 1e-9 and abs(xsum - e.score) <= 1e-9
    assert e.pairs.shape == (len(e.supervised_q), len(e.supervised_x))
    # exact index: what attribution reports is this very number (stored factors)
    assert abs(e.sketched_score - e.score) <= 1e-5
    hits = dict((h.id, h.score) for _, hs in api.attribute(index, lm, _qfile(tmp_path), top=8)
                for h in hs)
    assert abs(hits["doc-2"] - e.score) <= 1e-5


def _qfile(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "text": QUERY.text}])


def test_centered_sketched_index_explanation_matches_autograd(tmp_path, lm64, pool):
    """K = V, tau = 2, the product's centered cosine: the pair sum is the cosine of the
    autograd gradients; the centering line takes the index's pool mean against the sketch
    of each side's unit gradient."""
    lm = lm64["llama"]
    tau = 2.0
    index = build(tmp_path, lm, pool, topk="all", temperature=tau)
    spec = ScoreSpec()
    e = explain(index, lm, QUERY, "doc-5", spec=spec)
    assert e.centering_applied
    mean = api.index_mean(index, spec)
    cfg = index.config
    sk = make_sketcher(cfg.seed, lm.head.vocab, lm.head.hidden, cfg.dims)
    ch = sk.ch.matrix(torch.float64)
    want = 0.0
    dense = [head_gradients(lm, QUERY, tau), head_gradients(lm, hit_record("doc-5"), tau)]
    for c, (m_left, lam) in {"rh": (sk.cr.matrix(torch.float64), 0.5),
                             "gh": (sk.cg.matrix(torch.float64), 0.5)}.items():
        k = 0 if c == "rh" else 1
        uq, ux = dense[0][k] / dense[0][k].norm(), dense[1][k] / dense[1][k].norm()
        mu = getattr(mean, c)
        a = float((m_left.T @ uq @ ch).flatten() @ mu)
        b = float((m_left.T @ ux @ ch).flatten() @ mu)
        mm = float(mu @ mu)
        num = float((uq * ux).sum()) - a - b + mm
        want += lam * num / math.sqrt((1 - 2 * a + mm) * (1 - 2 * b + mm))
        part = next(p for p in e.channels if p.channel == c)
        assert abs(part.pairs * math.sqrt((1 - 2 * a + mm) * (1 - 2 * b + mm))
                   - float((uq * ux).sum())) <= 1e-6 * abs(float((uq * ux).sum()))
    assert abs(e.score - want) <= 1e-6 * abs(want)
    assert e.centering != 0.0
    assert abs(e.pair_total + e.centering - e.score) <= 1e-12


PR_QUERY = Record(id="pq", number=0, text=None, prompt="Question: what do sketches keep?",
                  response=" A few kilobytes of each gradient.", raw={})


@pytest.mark.parametrize("query", [QUERY, PR_QUERY], ids=["text", "prompt-response"])
def test_raw_score_explanation_is_the_head_gradient_inner_product(tmp_path, lm64, pool, query):
    """Raw inner products, a prompt/response query included (its response alone is
    supervised, its prompt tokens carry nothing)."""
    lm = lm64["gpt_neox"]
    index = build(tmp_path, lm, pool, exact=True)
    fields = FieldMap(prompt_field="prompt", response_field="response") \
        if query.prompt is not None else None
    for ch, k in (("rh", 0), ("gh", 1)):
        e = explain(index, lm, query, "doc-0", spec=ScoreSpec(channel=ch, score="raw"),
                    fields=fields)
        if query.prompt is not None:
            n_prompt = len(lm.tokenizer.encode(query.prompt, add_special_tokens=True))
            assert all(not t.supervised for t in e.query_tokens[:n_prompt])
            assert all(t.supervised for t in e.query_tokens[n_prompt:])
        gq = head_gradients(lm, query, 1.0)[k]
        gx = head_gradients(lm, hit_record("doc-0"), 1.0)[k]
        want = float((gq * gx).sum())
        assert abs(e.score - want) <= 1e-6 * abs(want)


def test_sketched_score_agrees_within_the_sketch_error(tmp_path, tiny_model, pool):
    """Over sketch seeds: raw RH/GH sketched inner products are unbiased estimates of the
    explained (unsketched) score, and the default centered cosine stays within a few
    standard deviations of its unsketched counterpart."""
    lm = load_model(tiny_model)
    errs: dict[str, list[float]] = {"rh": [], "gh": [], "both": []}
    truth: dict[str, float] = {}
    for seed in range(12):
        index = build(tmp_path, lm, pool, seed=seed, dims=(64, 32, 32))
        for ch in ("rh", "gh"):
            e = explain(index, lm, QUERY, "doc-1", spec=ScoreSpec(channel=ch, score="raw"))
            truth[ch] = e.score
            errs[ch].append(e.sketched_score - e.score)
        e = explain(index, lm, QUERY, "doc-1")
        errs["both"].append(e.sketched_score - e.score)
    for ch in ("rh", "gh"):
        m, sd = statistics.mean(errs[ch]), statistics.stdev(errs[ch])
        assert sd > 0
        assert abs(m) <= 4 * sd / math.sqrt(len(errs[ch])), (ch, m, sd, truth[ch])
        assert sd <= abs(truth[ch]) + 1e-12  # the sketch's error is of the score's order at most
    m, sd = statistics.mean(errs["both"]), statistics.stdev(errs["both"])
    assert abs(m) <= 4 * sd / math.sqrt(len(errs["both"])) + 0.05, (m, sd)
    assert max(abs(x) for x in errs["both"]) <= 0.5


def test_bad_query_and_hit_are_refused(tmp_path, tiny_model, pool):
    lm = load_model(tiny_model)
    index = build(tmp_path, lm, pool)
    with pytest.raises(NotFound, match="nope"):
        explain(index, lm, QUERY, "nope")
    api.delete(index.store, ["doc-3"])
    with pytest.raises(NotFound, match="deleted"):
        explain(api.open_index(index.store), lm, QUERY, "doc-3")
    with pytest.raises(InvalidInput, match="not among the queries"):
        pick_query([QUERY], "other")
    with pytest.raises(InvalidInput, match="--query"):
        pick_query([QUERY, hit_record("doc-1")], None)
    assert pick_query([QUERY], None) is QUERY


def test_top_tokens_and_pairs(tmp_path, tiny_model, pool):
    lm = load_model(tiny_model)
    index = build(tmp_path, lm, pool)
    e = explain(index, lm, QUERY, "doc-2", top=5)
    d = e.to_dict()
    assert len(d["top_pairs"]) == 5 and len(d["top_query_tokens"]) == 5
    flat = sorted((abs(x) for row in d["pairs"] for x in row), reverse=True)
    assert [abs(p["contribution"]) for p in d["top_pairs"]] == flat[:5]
    assert 0.0 < d["top_pairs_abs_share"] <= 1.0
    assert d["query_tokens"][0]["supervised"] is False  # nothing predicts the first token
    assert "".join(t["text"] for t in d["hit_tokens"]).endswith(TEXTS[2])
