"""Simple baselines: BM25 and TF-IDF over the text, mean final-hidden-state cosine.

Text of a record: ``text``, or ``prompt + response``.  Words: lower-cased ``\\w+`` runs.
BM25 is ``rank_bm25.BM25Okapi`` (k1 1.5, b 0.75, epsilon 0.25) when rank-bm25 is
installed, else the same formula implemented here (the config says which).
TF-IDF: sublinear tf (1 + log tf), smooth idf log((1 + n) / (1 + df)) + 1, L2-normalised
rows, cosine.  Hidden: mean over all tokens of the record of the final hidden state (the LM
head's input), cosine (optionally after subtracting the pool mean).
"""

from __future__ import annotations

import math
import pickle
import re
import time  # noqa: F401
from collections import Counter

import numpy as np
from common import clock

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _BM25:
    """BM25Okapi as in rank_bm25 0.2.2 (fallback when the package is absent)."""

    def __init__(self, corpus, k1=1.5, b=0.75, epsilon=0.25):
        self.k1, self.b, self.eps = k1, b, epsilon
        self.doc_len = [len(d) for d in corpus]
        self.avgdl = sum(self.doc_len) / len(corpus)
        self.doc_freqs = [Counter(d) for d in corpus]
        df = Counter(w for d in corpus for w in set(d))
        n = len(corpus)
        idf = {w: math.log(n - f + 0.5) - math.log(f + 0.5) for w, f in df.items()}
        avg = sum(idf.values()) / len(idf)
        floor = self.eps * avg
        self.idf = {w: (v if v >= 0 else floor) for w, v in idf.items()}

    def get_scores(self, query):
        dl = np.array(self.doc_len, dtype=np.float64)
        s = np.zeros(len(dl))
        for q in query:
            f = np.array([d.get(q, 0) for d in self.doc_freqs], dtype=np.float64)
            s += self.idf.get(q, 0.0) * (f * (self.k1 + 1)
                                         / (f + self.k1 * (1 - self.b + self.b * dl / self.avgdl)))
        return s


def bm25_scores(ctx) -> tuple[np.ndarray, dict, dict]:
    try:
        from rank_bm25 import BM25Okapi

        impl = "rank_bm25.BM25Okapi"
    except ImportError:  # pragma: no cover - depends on the environment
        BM25Okapi, impl = _BM25, "built-in BM25Okapi (rank-bm25 not installed)"
    t = ctx.task
    t0 = clock()
    corpus = [words(t.text(r)) for r in t.pool]
    bm = BM25Okapi(corpus)
    idx_s = clock() - t0
    nbytes = len(pickle.dumps(bm.doc_freqs)) + len(pickle.dumps(bm.idf))
    t0 = clock()
    scores = np.stack([np.asarray(bm.get_scores(words(t.text(q))), dtype=np.float64)
                       for q in t.queries])
    q_s = clock() - t0
    cost = {"index_seconds": idx_s, "bytes_per_example": nbytes / len(corpus),
            "query_seconds": q_s}
    return scores.astype(np.float32), cost, {"impl": impl,
                                             "bytes": "pickled per-document term counts + idf table"}


def tfidf_scores(ctx) -> tuple[np.ndarray, dict, dict]:
    t = ctx.task
    t0 = clock()
    docs = [Counter(words(t.text(r))) for r in t.pool]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    n = len(docs)
    df = np.zeros(len(vocab))
    for d in docs:
        for w in d:
            df[vocab[w]] += 1
    idf = np.log((1 + n) / (1 + df)) + 1.0

    def vec(c: Counter) -> dict[int, float]:
        v = {vocab[w]: (1 + math.log(f)) * idf[vocab[w]] for w, f in c.items() if w in vocab}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {k: x / norm for k, x in v.items()}

    rows = [vec(d) for d in docs]
    mat = np.zeros((n, len(vocab)), dtype=np.float32)
    for i, r in enumerate(rows):
        for k, x in r.items():
            mat[i, k] = x
    idx_s = clock() - t0
    nnz = sum(len(r) for r in rows)
    t0 = clock()
    q = np.zeros((len(t.queries), len(vocab)), dtype=np.float32)
    for i, r in enumerate(t.queries):
        for k, x in vec(Counter(words(t.text(r)))).items():
            q[i, k] = x
    scores = q @ mat.T
    q_s = clock() - t0
    cost = {"index_seconds": idx_s, "bytes_per_example": nnz * 8 / n, "query_seconds": q_s}
    return scores, cost, {"bytes": "sparse rows: nnz x (int32 index + float32 value)",
                          "vocab": len(vocab)}


def _mean_hidden(ctx, which: str) -> np.ndarray:
    hc = ctx.hidden
    out = []
    for e in ctx.enc(which):
        h = hc.get(e.input_ids)
        out.append(h.double().mean(0).numpy())
    return np.stack(out)


def hidden_scores(ctx, center: bool) -> tuple[np.ndarray, dict, dict]:
    fwd = ctx.forward_seconds
    t0 = clock()
    p = _mean_hidden(ctx, "pool")
    idx_s = clock() - t0
    t0 = clock()
    q = _mean_hidden(ctx, "queries")
    if center:
        mu = p.mean(0)
        p, q = p - mu, q - mu
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-30)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    scores = q @ p.T
    q_s = clock() - t0
    d = p.shape[1]
    cost = {"index_seconds": fwd + idx_s, "forward_seconds_same_data": fwd,
            "bytes_per_example": 2.0 * d, "query_seconds": ctx.query_forward_seconds + q_s}
    return scores.astype(np.float32), cost, {
        "bytes": f"float16 mean hidden state (d={d})",
        "index_time": "bare forward over the pool (measured) + pooling"}
