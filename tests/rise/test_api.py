"""rise.api: collapsing near-duplicate hits on a pool with planted, lightly edited copies."""

from __future__ import annotations

import pytest
from conftest import TEXTS, write_jsonl
from rise import api, constants
from rise.config import make_config
from rise.data import FieldMap, Record
from rise.errors import InvalidInput
from rise.ingest import create_index
from rise.model import load_model
from rise.score import ScoreSpec
from rise.store import LocalStore

BASE = TEXTS + [
    "Influence functions approximate leave-one-out retraining.",
    "Object stores keep immutable blobs under keys.",
    "Celery workers take shard tasks from a queue.",
    "The dog sleeps while the fox runs.",
]
# Light edits, never byte-equal: punctuation, one word, case, a hyphen.
EDITS = {
    0: ["The quick brown fox jumps over the lazy dog!",
        "The quick brown fox jumped over the lazy dog."],
    2: ["Sketches compress gradients into a few kilobytes each.",
        "sketches compress gradients into a few kilobytes."],
    6: ["Count sketch maps are drawn from one seed.",
        "Count-sketch maps are drawn from a seed."],
}


# The tiny random model's sketches of these light edits have combined centered cosines of
# 0.75-0.98 with their originals and among themselves, distinct texts at most 0.33: the
# default threshold (measured on SmolLM2, tests/benchmarks/reports/collapse.md) lies between.
THRESHOLD = constants.DEFAULT_COLLAPSE


def source(rid: str) -> str:
    return rid.split("~")[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("planted")
    rows = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(BASE)]
    for i, variants in EDITS.items():
        for j, text in enumerate(variants):
            assert text != BASE[i]
            rows.append({"id": f"doc-{i}~{j}", "text": text})
    data = write_jsonl(root / "pool.jsonl", rows)
    lm = load_model(tiny_models["llama"])
    out = {}
    for mode in ("sketch", "nosketch"):
        store = LocalStore(root / mode)
        create_index(store, lm, data, FieldMap(), make_config(no_sketch=mode == "nosketch"),
                     shard_size=5)
        out[mode] = api.open_index(store)
    queries = [Record(id="fox", number=0, text="A quick brown fox jumps over a lazy dog.",
                      prompt=None, response=None, raw={}),
               Record(id="sketch", number=1, text="Count sketches compress gradients.",
                      prompt=None, response=None, raw={})]
    return lm, out, queries, tiny_models["llama"]


@pytest.mark.parametrize("mode", ["sketch", "nosketch"])
def test_collapse_shows_k_distinct_sources(planted, mode):
    lm, indexes, queries, _ = planted
    index = indexes[mode]
    qs = api.sketch_queries(index, lm, queries, FieldMap())
    k = 5
    plain = api.attribute_sketched(index, qs, ScoreSpec(), k)
    # Without collapse the planted copies crowd the top: fewer than k distinct sources.
    assert len({source(h.id) for h in plain[0]}) < k
    collapsed = api.attribute_sketched(index, qs, ScoreSpec(), k, collapse=THRESHOLD)
    for hits in collapsed:
        assert len(hits) == k
        assert len({source(h.id) for h in hits}) == k  # k distinct sources
        for h in hits:
            assert all(source(d.id) == source(h.id) for d in h.duplicates)
            assert [d.score for d in h.duplicates] == sorted(
                (d.score for d in h.duplicates), reverse=True)
            assert all(d.score <= h.score for d in h.duplicates)
    # Every planted copy of a shown source is among its duplicates.
    shown = {h.id: h for h in collapsed[0]}
    assert {d.id for d in shown["doc-0"].duplicates} == {"doc-0~0", "doc-0~1"}
    # The shown hits keep their scores, in the uncollapsed order.
    order = [h.id for h in api.attribute_sketched(index, qs, ScoreSpec(), 100)[0]]
    ranks = [order.index(h.id) for h in collapsed[0]]
    assert ranks == sorted(ranks)


def test_collapse_of_a_small_pool_and_a_strict_threshold(planted):
    lm, indexes, queries, _ = planted
    index = indexes["sketch"]
    qs = api.sketch_queries(index, lm, queries[:1], FieldMap())
    sources = len(BASE)
    # Asking for more than there are sources: every source once, with all its copies (the
    # best-scoring copy is the one shown).
    hits = api.attribute_sketched(index, qs, ScoreSpec(), 100, collapse=THRESHOLD)[0]
    assert sorted(source(h.id) for h in hits) == sorted(f"doc-{i}" for i in range(sources))
    assert sum(1 + len(h.duplicates) for h in hits) == index.live_count
    # A threshold of 1 collapses only identical sketches: nothing here.
    strict = api.attribute_sketched(index, qs, ScoreSpec(), 5, collapse=1.0)[0]
    assert [h.id for h in strict] == \
        [h.id for h in api.attribute_sketched(index, qs, ScoreSpec(), 5)[0]]
    assert all(h.duplicates == () for h in strict)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_a_bad_threshold_is_refused(planted, bad):
    lm, indexes, queries, _ = planted
    qs = api.sketch_queries(indexes["sketch"], lm, queries[:1], FieldMap())
    with pytest.raises(InvalidInput, match="collapse threshold"):
        api.attribute_sketched(indexes["sketch"], qs, ScoreSpec(), 3, collapse=bad)


def test_cli_collapse_flag(planted, tmp_path, capsys):
    import json

    from rise.cli import main

    _, indexes, _, model = planted
    index_dir = indexes["sketch"].store.root
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "fox", "text": "A quick brown fox."}])
    out = tmp_path / "hits.jsonl"
    args = ["attribute", "--index", index_dir, "--model", model, "--queries", q, "--output", out,
            "--top", "4"]
    assert main([str(a) for a in args + ["--collapse", str(THRESHOLD)]]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len({source(r["id"]) for r in rows}) == 4
    assert all("duplicates" in r for r in rows)
    assert main([str(a) for a in args + ["--collapse", "1.5"]]) == 2
    assert "collapse threshold" in capsys.readouterr().err
