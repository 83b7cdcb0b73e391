"""Values that mean something to the service, per field of the rise.v1 requests: the
fuzzed tenant's own indexes and jobs, another tenant's (which must look absent), its
datasets, and the edges of every documented range.  ``strategies.messages`` takes a hint
most of the time and a generic value of the field's type otherwise."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from rise.v1 import common_pb2

from .oracle import State
from .strategies import Hints, good_text, long_strings, strings

P = "rise.v1."


def _pick(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(list(values))


def live(get: Callable[[], list[Any]], fallback: Any) -> st.SearchStrategy[Any]:
    """One of the values ``get()`` returns when the value is drawn (``fallback`` when there
    are none).  The draw is an integer whatever the run's state, so Hypothesis sees the
    same shape of choices in every state (it refuses strategies whose shape changes)."""

    def pick(k: int) -> Any:
        values = get()
        return values[k % len(values)] if values else fallback

    return st.integers(0, 2**16 - 1).map(pick)


def names(state: State, foreign: list[str], fresh: bool) -> st.SearchStrategy[str]:
    """Index names: the tenant's own, new ones, another tenant's, and names just outside
    the rule (a newline, an upper-case letter, 64 characters, a leading dot)."""
    near = ["base\n", "Base", "-base", ".base", "base/x", "base ", "a" * 64, "a" * 63, "0",
            "x.y_z-1", "é", "base\x00"]
    parts = [live(lambda: sorted(state.indexes), "base"),
             live(lambda: list(foreign), "ctl-base"), st.sampled_from(near)]
    if fresh:  # a small pool of new names: some are taken by the time they come again
        parts += [st.integers(0, 400).map(lambda n: f"n{n}")] * 3
    return st.one_of(parts)


def dataset_uris(state: State) -> st.SearchStrategy[str]:
    t, b = state.tenant, state.bucket
    own = f"s3://{b}/tenants/{t}/"
    return st.one_of(
        _pick(own + "data/good.jsonl", own + "data/good.jsonl", own + "data/missing.jsonl",
              own + "data/good.txt", f"s3://{b}/tenants/ctl/data/good.jsonl",
              f"s3://{b}/tenants/{t}y/data/good.jsonl", f"s3://{b}/tenants/{t}",
              f"s3://{b}/tenants/{t}/../ctl/data/good.jsonl",
              f"s3://{b}/tenants/{t}/./data/good.jsonl",
              f"s3://{b}/tenants/{t}//data/good.jsonl",
              f"s3://{b}/tenants/{t}/data/good.jsonl?versionId=1",
              f"s3://{b}/tenants/{t}/data/good.jsonl#x", f"s3://{b.upper()}/tenants/{t}/x.jsonl",
              f"s3://other/tenants/{t}/data/good.jsonl", f"s3://{b}/", f"s3://{b}", "s3://",
              f"s3://{b}/tenants/{t}/data/", "/etc/passwd", "../../etc/passwd", "data.jsonl",
              "file:///etc/passwd", "http://127.0.0.1/x.jsonl", f"S3://{b}/tenants/{t}/x.jsonl",
              f"s3://{b}@evil/tenants/{t}/x.jsonl", f"s3://{b}/tenants/{t}/data\\good.jsonl",
              f"s3://{b}/tenants/{t}/a\x00.jsonl", f"s3://{b}/tenants/{t}/a\nb.jsonl"),
        st.builds(lambda s, ext: own + s + ext, strings(small=True),
                  _pick(".jsonl", ".parquet", ".jsonl.gz", "")),
    )


def _token(obj: Any, raw: str | None = None) -> str:
    """A page token as the gateway's look (unpadded URL-safe base64 of JSON), of ``obj`` or
    of the text ``raw``: the gateway's own format with values it never writes."""
    text = raw if raw is not None else json.dumps(obj, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


FORGED_TOKENS = [
    _token({"k": "indexes", "s": "", "a": "zzz"}), _token({"k": "indexes", "s": "", "a": ""}),
    _token({"k": "indexes", "s": "", "a": 7}), _token({"k": "jobs", "s": "", "a": "x"}),
    _token({"k": "jobs", "s": "", "a": [0, ""]}), _token({"k": "jobs", "s": "", "a": [-1, "z"]}),
    _token({"k": "jobs", "s": "", "a": [True, "x"]}),
    _token({"k": "jobs", "s": "", "a": [10**400, "x"]}),
    _token({"k": "jobs", "s": "base", "a": [1.5e308, "x"]}),
    _token(None, '{"k":"jobs","s":"","a":[Infinity,"x"]}'),
    _token(None, '{"k":"jobs","s":"","a":[-Infinity,"x"]}'),
    _token(None, '{"k":"jobs","s":"","a":[NaN,"x"]}'),
    _token({"k": "jobs", "s": "", "a": [1, "x", 2]}), _token({"k": "jobs", "s": None, "a": None}),
    _token(None, "[" * 100_000 + "]" * 100_000), _token(None, '{"k":' * 5000 + "1" + "}" * 5000),
    _token(None, '"\\udc80"'), _token(None, '"' + "x" * 70_000 + '"'), _token([1, 2]),
    "!!!", "====", "a", "%00", "e30", "e30=", "eyJrIjoiam9icyJ9",
]
"""Page tokens the gateway never gave: its format (base64 of JSON) with every value a
cursor cannot hold (infinities, NaN, a 400-digit number, booleans, deep nesting, another
listing's kind or filter), and text that is no base64."""


def page_tokens(state: State, listing: str) -> st.SearchStrategy[str]:
    given = live(lambda: sorted(t for t, (kind, _) in state.page_tokens.items()
                                if kind == listing), "")
    return st.one_of(st.just(""), given, given, st.sampled_from(FORGED_TOKENS))


def request_ids() -> st.SearchStrategy[str]:
    return st.one_of(
        _pick("", "", "rid-1", "rid-2", "rid-3", "a b", "x" * 128, "x" * 129, "é", "rid\n",
              "a/b", "::..--__"),
        st.uuids().map(str))


def job_ids(state: State, foreign: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        _pick("", "0", "*", "job:*", "../x", "a" * 300), st.uuids().map(str),
        *[live(lambda: sorted(state.jobs), "")] * 3, live(lambda: list(foreign), ""))


def live_ids(state: State) -> st.SearchStrategy[str]:
    def known() -> list[str]:
        return sorted({i for info in state.indexes.values() for i in (info.ids or ())})

    return st.one_of(_pick("doc-0", "doc-1", "nope", "", " ", "doc-0\n", "0", "é" * 129),
                     *[live(known, "doc-0")] * 3)


def records_hints() -> dict[str, st.SearchStrategy[Any]]:
    texts = st.one_of(good_text(), _pick("a", "", " ", "\n\t", "<|endoftext|>", "ab", "é"),
                      long_strings())
    return {
        P + "Record.id": _pick("", "", "", "q1", "q2", "1", "x" * 256, "x" * 257, "é" * 128,
                               "é" * 129, "\n"),
        P + "Record.text": texts,
        P + "Record.prompt": st.one_of(good_text(), _pick("", " ", "a")),
        P + "Record.response": texts,
    }


def fieldmap_hints() -> dict[str, st.SearchStrategy[Any]]:
    return {
        P + "FieldMap.text_field": _pick("", "", "text", "body", "id"),
        P + "FieldMap.id_field": _pick("", "", "id", "text", "nope"),
        P + "FieldMap.prompt_field": _pick("", "", "", "prompt", "text"),
        P + "FieldMap.response_field": _pick("", "", "", "response", "text"),
        P + "FieldMap.chat_template": st.sampled_from([False, False, False, True]),
    }


def config_hints() -> dict[str, st.SearchStrategy[Any]]:
    dims = _pick(0, 0, 0, 1, 2, 16, 64, 128, 1024, 65536, 65537, 2**32 - 1)
    return {
        P + "SketchConfig.mode": _pick("", "", "sketch", "nosketch", "exact", "SKETCH"),
        P + "SketchConfig.topk": _pick(0, 0, 1, 2, 128, 263, 264, 265, 2**31, 2**32 - 1),
        P + "SketchConfig.topk_all": st.sampled_from([False, False, False, True]),
        P + "SketchConfig.temperature": _pick(0.0, 0.0, 0.05, 0.0499, 1.0, 2.0, 100.0, 100.01,
                                              float("nan"), float("inf"), 1e-300, -1.0),
        P + "SketchConfig.kr": dims, P + "SketchConfig.kh": dims, P + "SketchConfig.kg": dims,
        P + "SketchConfig.seed": _pick(0, 0, 7, 2**63 - 1, 2**63, 2**64 - 1),
        P + "SketchConfig.weighting": _pick("", "", "mean", "sum", "MEAN"),
        P + "SketchConfig.max_length": _pick(0, 0, 0, 1, 2, 3, 16, 512, 4096, 70_000,
                                             2**32 - 1),
    }


def generation_hints() -> dict[str, st.SearchStrategy[Any]]:
    """Attribute's generate: at and past the proto's bounds.  (The run keeps an accepted
    max_new_tokens at most 64: thousands of tokens for hundreds of prompts would hold the
    CPU worker for many minutes.)"""
    return {
        P + "Generation.max_new_tokens": _pick(0, 0, 1, 2, 8, 4096, 4097, 2**32 - 1),
        P + "Generation.temperature": _pick(0.0, 0.0, 0.001, 0.00099, 1.0, 100.0, 100.01,
                                            float("nan"), float("inf"), -1.0, 5e-324),
        P + "Generation.seed": _pick(0, 0, 7, 2**63 - 1, 2**64 - 1),
    }


def scoring_hints() -> dict[str, st.SearchStrategy[Any]]:
    return {
        P + "Scoring.channel": _pick("", "", "both", "rh", "gh", "RH", "none"),
        P + "Scoring.score": _pick("", "", "cosine", "raw", "RAW"),
        P + "Scoring.lambda": _pick(0.0, 0.25, 0.5, 1.0, -0.0, 1.0000001, -1e-9,
                                    float("nan"), float("inf")),
    }


def hints(state: State, foreign_indexes: list[str], foreign_jobs: list[str],
          tame: bool = False) -> Hints:
    """Every hint, for the state the run is in now; ``tame``: values that pass the checks
    most of the time (so requests reach the index, the worker and the jobs), else values
    at and past every edge."""
    t, b = state.tenant, state.bucket
    h: dict[str, st.SearchStrategy[Any]] = {}
    for msg in ("AppendToIndexRequest", "DeleteExamplesRequest", "CompactIndexRequest",
                "DeleteIndexRequest", "GetIndexRequest", "AttributeRequest", "ValueRequest",
                "ListJobsRequest", "ExplainRequest"):
        h[P + msg + ".index"] = names(state, foreign_indexes, fresh=False)
    h[P + "CreateIndexRequest.index"] = names(state, foreign_indexes, fresh=True)
    h[P + "ImportIndexRequest.index"] = st.one_of(
        names(state, foreign_indexes, fresh=True), live(lambda: sorted(state.stored), "base"))
    for msg in ("CreateIndexRequest", "AppendToIndexRequest"):
        h[P + msg + ".dataset_uri"] = dataset_uris(state)
    for msg in ("CreateIndexRequest", "AppendToIndexRequest", "DeleteExamplesRequest",
                "CompactIndexRequest", "ImportIndexRequest"):
        h[P + msg + ".request_id"] = request_ids()
    for msg in ("CreateIndexRequest", "ImportIndexRequest"):
        h[P + msg + ".pool"] = _pick(state.pool, state.pool, state.pool, "",
                                     state.pool.upper(), state.pool + "\n", "smollm2")
    h[P + "CreateIndexRequest.shard_size"] = _pick(0, 0, 1, 2, 3, 4, 1024, 2**32 - 1)
    h[P + "DeleteExamplesRequest.ids"] = live_ids(state)
    for msg in ("GetJobRequest", "WatchJobRequest", "CancelJobRequest"):
        h[P + msg + ".id"] = job_ids(state, foreign_jobs)
    h[P + "WatchJobRequest.interval_seconds"] = _pick(0.0, 0.0, 0.05, 0.049, 0.1, 60.0, 60.1,
                                                      float("nan"), float("inf"), -1.0)
    h[P + "ListJobsRequest.limit"] = _pick(0, 1, 2, 100, 2**32 - 1)
    for msg, listing in (("ListIndexesRequest", "indexes"), ("ListJobsRequest", "jobs")):
        h[P + msg + ".page_size"] = _pick(0, 0, 1, 2, 3, 999, 1000, 1001, 2**32 - 1)
        h[P + msg + ".page_token"] = page_tokens(state, listing)
    h[P + "AttributeRequest.top"] = _pick(0, 0, 1, 3, 10, 10_000, 10_001, 2**32 - 1)
    h[P + "ValueRequest.top"] = _pick(0, 0, 1, 3, 2**32 - 1)
    h[P + "ExplainRequest.top"] = _pick(0, 0, 1, 3, 10_000, 10_001, 2**32 - 1)
    h[P + "AttributeRequest.collapse_threshold"] = _pick(
        0.0, 0.0, 0.0, 0.5, 1.0, 1.0000001, -0.0, 5e-324, -1e-9, float("nan"), float("inf"))
    h[P + "ExplainRequest.hit_id"] = live_ids(state)
    h[P + "ExplainRequest.query_id"] = _pick("", "", "", "q1", "q2", "0", "1", "nope")
    h.update(generation_hints())
    h[P + "ValueRequest.select_fraction"] = _pick(0.0, 0.0, 0.25, 1.0, 1.0001, -0.5,
                                                  float("nan"), float("inf"), 5e-324)
    own = f"s3://{b}/tenants/{t}/"
    h[P + "ValueRequest.selection_uri"] = _pick(
        own + "sel/a.jsonl", own + "sel/b.parquet", own + "sel/c.txt", own + "sel/",
        f"s3://{b}/tenants/ctl/sel.jsonl", f"s3://other/tenants/{t}/x.jsonl",
        "http://x/y.jsonl", own + "../ctl/x.jsonl", own + "sel//x.jsonl", own + "sel/./x.jsonl",
        "", f"s3://{b}/tenants/{t}y/x.jsonl", own + "sel/a\x00.jsonl",
        own + "k" * 1100 + ".jsonl")
    h[P + "ValueRequest.values_uri"] = _pick(
        "", "", "", own + "vals/a.parquet", own + "vals/a.parquet", own + "vals/a.jsonl",
        own + "vals/", f"s3://{b}/tenants/ctl/v.parquet", f"s3://other/tenants/{t}/v.parquet",
        "http://x/v.parquet", own + "../ctl/v.parquet", own + "vals//v.parquet",
        own + "v\x00.parquet", own + "k" * 1100 + ".parquet")
    h.update(records_hints())
    h.update(fieldmap_hints())
    h.update(config_hints())
    h.update(scoring_hints())
    if tame:
        h.update(tame_hints(state, foreign_indexes, foreign_jobs))
    return h


def tame_hints(state: State, foreign_indexes: list[str], foreign_jobs: list[str]) -> Hints:
    t, b = state.tenant, state.bucket
    own = live(lambda: sorted(state.indexes), "base")
    fresh = st.just(None).map(lambda _: state.fresh_name())  # no draw: the same shape
    h: dict[str, st.SearchStrategy[Any]] = {}
    for msg in ("AppendToIndexRequest", "DeleteExamplesRequest", "CompactIndexRequest",
                "DeleteIndexRequest", "GetIndexRequest", "AttributeRequest", "ValueRequest",
                "ExplainRequest"):
        h[P + msg + ".index"] = st.one_of(own, own, own, own, fresh,
                                          live(lambda: list(foreign_indexes), "ctl-base"))
    h[P + "CreateIndexRequest.index"] = st.one_of(fresh, fresh, fresh, fresh, fresh, own)
    # Hypothesis draws the first of a list most often: each list starts with a value that
    # passes
    for msg in ("CreateIndexRequest", "AppendToIndexRequest"):
        h[P + msg + ".dataset_uri"] = st.one_of(
            _pick(f"s3://{b}/tenants/{t}/data/good.jsonl",
                  f"s3://{b}/tenants/{t}/data/missing.jsonl"),
            # keys the gateway lets through (they are in the tenant's area) that only the
            # worker's reading can refuse
            _pick(f"s3://{b}/tenants/{t}/../ctl/data/good.jsonl",
                  f"s3://{b}/tenants/{t}/./data/good.jsonl",
                  f"s3://{b}/tenants/{t}//data/good.jsonl",
                  f"s3://{b}/tenants/{t}/data/good.jsonl?versionId=1",
                  f"s3://{b}/tenants/{t}/data\\good.jsonl", f"s3://{b}/tenants/{t}/a\x00.jsonl",
                  f"s3://{b}/tenants/{t}/a\nb.jsonl", f"s3://{b}/tenants/{t}/{'k' * 1100}.jsonl",
                  f"s3://{b}/tenants/{t}/data/good.jsonl/"))
    for msg in ("CreateIndexRequest", "AppendToIndexRequest", "DeleteExamplesRequest",
                "CompactIndexRequest"):
        h[P + msg + ".request_id"] = st.one_of(st.just(""), st.uuids().map(str))
    h[P + "CreateIndexRequest.pool"] = st.just(state.pool)
    h[P + "CreateIndexRequest.shard_size"] = _pick(0, 0, 1, 2, 4, 1024, 2**32 - 1)
    known = live(lambda: sorted({i for info in state.indexes.values()
                                 for i in (info.ids or ())}), "doc-0")
    h[P + "DeleteExamplesRequest.ids"] = st.one_of(known, known, known, _pick("nope"))
    jobs = live(lambda: sorted(state.jobs), "")
    for msg in ("GetJobRequest", "WatchJobRequest", "CancelJobRequest"):
        h[P + msg + ".id"] = st.one_of(jobs, jobs, jobs, st.uuids().map(str))
    h[P + "WatchJobRequest.interval_seconds"] = _pick(0.0, 0.05, 0.1, 1.0, 60.0)
    h[P + "Record.id"] = _pick("", "", "", "q1", "q2", "x" * 256, "é" * 128)
    h[P + "Record.text"] = good_text()
    h[P + "Record.prompt"] = st.one_of(good_text(), st.just(""))
    h[P + "Record.response"] = good_text()
    # whole field maps, consistent ones: a message field can be hinted too
    maps = _pick(*[common_pb2.FieldMap(**kw) for kw in (
        {}, {"text_field": "text"}, {"id_field": "nope"}, {"text_field": "body"},
        {"prompt_field": "prompt", "response_field": "response"},
        {"prompt_field": "prompt", "response_field": "response", "chat_template": True})])
    for msg in ("CreateIndexRequest", "AppendToIndexRequest", "AttributeRequest",
                "ValueRequest", "ExplainRequest"):
        h[P + msg + ".fields"] = maps
    h[P + "FieldMap.text_field"] = _pick("", "", "text")
    h[P + "FieldMap.id_field"] = _pick("", "", "id", "nope")
    h[P + "FieldMap.prompt_field"] = _pick("", "", "", "", "prompt")
    h[P + "FieldMap.response_field"] = _pick("", "", "", "", "response")
    h[P + "FieldMap.chat_template"] = _pick(False, False, False, False, False, True)
    dims = _pick(0, 0, 0, 0, 1, 16, 64, 256, 65536)
    h.update({
        P + "SketchConfig.mode": _pick("", "", "sketch", "nosketch"),
        P + "SketchConfig.topk": _pick(0, 0, 1, 2, 128, 264, 265, 2**32 - 1),
        P + "SketchConfig.temperature": _pick(0.0, 0.0, 0.05, 1.0, 2.0, 100.0),
        P + "SketchConfig.kr": dims, P + "SketchConfig.kh": dims, P + "SketchConfig.kg": dims,
        P + "SketchConfig.seed": _pick(0, 0, 7, 2**63 - 1),
        P + "SketchConfig.weighting": _pick("", "", "mean", "sum"),
        P + "SketchConfig.max_length": _pick(0, 0, 0, 2, 3, 16, 512, 4096, 70_000, 2**32 - 1),
        P + "Scoring.channel": _pick("", "", "both", "rh", "gh"),
        P + "Scoring.score": _pick("", "", "cosine", "raw"),
        P + "Scoring.lambda": _pick(0.0, 0.25, 0.5, 1.0),
        P + "AttributeRequest.top": _pick(0, 0, 1, 5, 10, 10_000),
        P + "ValueRequest.top": _pick(0, 0, 1, 3, 2**32 - 1),
        P + "ValueRequest.select_fraction": _pick(0.0, 0.0, 0.0, 0.25, 1.0, 5e-324),
        P + "ValueRequest.selection_uri": _pick(f"s3://{b}/tenants/{t}/sel/a.jsonl",
                                                f"s3://{b}/tenants/{t}/sel/b.parquet"),
        P + "ValueRequest.values_uri": _pick("", "", f"s3://{b}/tenants/{t}/vals/a.parquet"),
        P + "ExplainRequest.query_id": _pick("", "", "q1", "0"),
        P + "ExplainRequest.top": _pick(0, 0, 1, 5, 10_000),
        P + "Generation.max_new_tokens": _pick(0, 1, 2, 8),
        P + "Generation.temperature": _pick(0.0, 0.0, 1.0, 0.001, 100.0),
    })
    h[P + "ExplainRequest.hit_id"] = h[P + "DeleteExamplesRequest.ids"]
    return h
