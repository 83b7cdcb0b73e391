"""The fuzz run's strategies and oracle, without servers: every request message of
rise.v1 is generated field by field from its descriptor and goes on the wire; malformed
bytes do not parse; and each generated dataset's expected job end agrees with what
``rise.data`` and the tokenizer make of it (so the run's oracle for datasets is the
documented behaviour, checked here against the data layer itself)."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
from conftest import byte_tokenizer
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rise.data import encode_record, read_records
from rise.errors import InvalidInput
from rise.v1 import common_pb2, rise_pb2

from . import oracle
from .hints import hints
from .strategies import INVALID, SUCCEEDED, datasets, is_repeated, messages, wire_bytes

FAST = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _state() -> oracle.State:
    s = oracle.State(tenant="fuzz", pool="tiny", bucket="rise", cap=2**20)
    s.indexes["base"] = oracle.IndexInfo(1, 12, "sketch", 512, {f"doc-{i}" for i in range(12)})
    s.jobs["job-1"] = "SUCCEEDED"
    return s


@pytest.mark.parametrize("rpc", oracle.RPCS)
def test_every_field_of_every_request_is_generated(rpc):
    """The walker reaches every field (nested ones included) and the messages serialize
    and parse back; the oracle answers for each without an exception."""
    cls = getattr(rise_pb2, rpc + "Request")
    seen: dict[str, int] = defaultdict(int)
    state = _state()

    def walk(msg):
        for field, value in msg.ListFields():
            seen[field.full_name] += 1
            if field.type == field.TYPE_MESSAGE:
                for v in value if is_repeated(field) else [value]:
                    walk(v)

    @FAST
    @given(st.data())
    def one(data):
        msg = data.draw(messages(cls.DESCRIPTOR, hints(state, ["ctl-base"], ["job-ctl"])))
        body = msg.SerializeToString()
        assert cls.FromString(body) == msg or _has_nan(msg)
        walk(msg)
        exp = oracle.expect(rpc, msg, state, size=len(body))
        assert exp.allowed and not exp.allowed & oracle.NEVER

    one()

    def fields(desc, prefix=()):
        for f in desc.fields:
            yield f.full_name
            if f.type == f.TYPE_MESSAGE:
                yield from fields(f.message_type)

    missing = [f for f in fields(cls.DESCRIPTOR) if not seen[f]]
    assert not missing, f"never set in 100 {rpc} requests: {missing}"


def _has_nan(msg) -> bool:
    """NaN != NaN, so a message holding one never equals its own copy."""
    for field, value in msg.ListFields():
        if field.type == field.TYPE_MESSAGE:
            if any(_has_nan(v) for v in (value if is_repeated(field) else [value])):
                return True
        elif isinstance(value, float) and math.isnan(value):
            return True
    return False


@pytest.mark.parametrize("rpc", ["CreateIndex", "GetJob", "Attribute", "ListIndexes"])
def test_malformed_bytes_do_not_parse(rpc):
    cls = getattr(rise_pb2, rpc + "Request")

    @FAST
    @given(wire_bytes(cls.DESCRIPTOR))
    def one(kind_body):
        kind, body = kind_body
        with pytest.raises(DecodeError):
            cls.FromString(body)

    one()


def test_the_oracle_reads_the_table():
    """A few rows of docs/bad-input.md, by hand."""
    s = _state()
    ci = rise_pb2.CreateIndexRequest
    ok = dict(index="new", dataset_uri="s3://rise/tenants/fuzz/data/good.jsonl", pool="tiny")
    assert oracle.expect("CreateIndex", ci(**ok), s).allowed == {"OK"}
    assert oracle.expect("CreateIndex", ci(**ok), s).job.ends == {SUCCEEDED}
    assert oracle.expect("CreateIndex", ci(**{**ok, "index": "docs\n"}), s).allowed == \
        {"INVALID_ARGUMENT"}
    assert oracle.expect("CreateIndex", ci(**{**ok, "index": "base"}), s).allowed == \
        {"ALREADY_EXISTS"}
    other = {**ok, "dataset_uri": "s3://rise/tenants/ctl/data/good.jsonl", "index": "Bad"}
    assert oracle.expect("CreateIndex", ci(**other), s).allowed == \
        {"PERMISSION_DENIED", "INVALID_ARGUMENT"}
    for cfg in (dict(temperature=1e-300), dict(temperature=math.nan), dict(kr=2**32 - 1),
                dict(max_length=1), dict(mode="exact"), dict(seed=2**63)):
        msg = ci(**ok, config=common_pb2.SketchConfig(**cfg))
        assert oracle.expect("CreateIndex", msg, s).allowed == {"INVALID_ARGUMENT"}, cfg
    assert not oracle.expect("CreateIndex", ci(**ok), s, authenticated=False).allowed - \
        {"UNAUTHENTICATED"}
    at = rise_pb2.AttributeRequest
    q = [common_pb2.Record(text="a fox")]
    assert oracle.expect("Attribute", at(index="base", queries=q), s).allowed == {"OK"}
    assert oracle.expect("Attribute", at(index="nope", queries=q), s).allowed == {"NOT_FOUND"}
    assert oracle.expect("Attribute", at(index="base", queries=q, top=10_001), s).allowed == \
        {"RESOURCE_EXHAUSTED"}
    one_token = [common_pb2.Record(text="a")]
    assert oracle.expect("Attribute", at(index="base", queries=one_token), s).allowed == \
        {"INVALID_ARGUMENT"}
    de = rise_pb2.DeleteExamplesRequest
    assert oracle.expect("DeleteExamples", de(index="base", ids=["doc-1"]), s).allowed == {"OK"}
    assert oracle.expect("DeleteExamples", de(index="base", ids=["zzz"]), s).allowed == \
        {"NOT_FOUND"}
    s.indexes["unknown-ids"] = oracle.IndexInfo(1, 3, "sketch", 512, None)
    assert oracle.expect("DeleteExamples", de(index="unknown-ids", ids=["a"]), s).allowed == \
        {"OK", "NOT_FOUND"}
    assert oracle.expect("DeleteExamples", de(index="unknown-ids", ids=["a", "a"]), s).allowed \
        == {"INVALID_ARGUMENT", "NOT_FOUND"}  # which check comes first is the gateway's
    assert oracle.expect("GetJob", rise_pb2.GetJobRequest(id="job-2"), s).allowed == \
        {"NOT_FOUND"}


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(datasets("t", cap=2**14))
def test_dataset_expectations_match_the_data_layer(tmp_path_factory, ds):
    """A dataset expected to succeed reads and tokenizes (every record supervised); one
    expected to fail with INVALID_ARGUMENT is refused by the reader or the tokenizer."""
    from rise.data import FieldMap

    folder = tmp_path_factory.mktemp("ds")
    path = folder / ("data" + ds.suffix)
    path.write_bytes(ds.data)
    tok = _tokenizer()
    try:
        records = read_records(path, FieldMap(), max_record_bytes=2**14)
        if not records:
            raise InvalidInput("no records")
        for r in records:
            encode_record(r, tok, 512)
        outcome = SUCCEEDED
    except InvalidInput:
        outcome = INVALID
    assert outcome in ds.expect, (ds.kind, ds.data[:200])
    if outcome == SUCCEEDED and ds.ids is not None:
        assert [r.id for r in records] == ds.ids


_TOK = []


def _tokenizer():
    if not _TOK:
        _TOK.append(byte_tokenizer())
    return _TOK[0]


def test_json_records_survive_the_report():
    """Problems quote requests: the report's JSON must hold any generated string."""
    assert json.loads(json.dumps({"r": "\x00\u2028😀"}))["r"] == "\x00\u2028😀"


@pytest.mark.parametrize("key", ["tenants/fuzz/../ctl/d.jsonl", "tenants/fuzz/./d.jsonl",
                                 "tenants/fuzz//d.jsonl", "tenants/fuzz/d\x00.jsonl",
                                 "tenants/fuzz/d\n.jsonl", "tenants/fuzz/d\\e.jsonl",
                                 "tenants/fuzz/" + "k" * 1100 + ".jsonl"])
def test_the_oracle_refuses_keys_the_table_refuses(key):
    s = _state()
    uri = f"s3://rise/{key}"
    ci = rise_pb2.CreateIndexRequest(index="new", dataset_uri=uri, pool="tiny")
    assert oracle.expect("CreateIndex", ci, s).allowed == {"INVALID_ARGUMENT"}
    ap = rise_pb2.AppendToIndexRequest(index="base", dataset_uri=uri)
    assert oracle.expect("AppendToIndex", ap, s).allowed == {"INVALID_ARGUMENT"}
    va = rise_pb2.ValueRequest(index="base", targets=[common_pb2.Record(text="a fox")],
                               select_fraction=0.5, selection_uri=uri)
    assert oracle.expect("Value", va, s).allowed == {"INVALID_ARGUMENT"}


def test_the_oracle_knows_page_tokens():
    s = _state()
    li, lj = rise_pb2.ListIndexesRequest, rise_pb2.ListJobsRequest
    assert oracle.expect("ListIndexes", li(page_size=2**32 - 1), s).allowed == {"OK"}
    s.page_tokens["t-idx"] = ("indexes", "")
    s.page_tokens["t-job"] = ("jobs", "base")
    assert oracle.expect("ListIndexes", li(page_token="t-idx"), s).allowed == {"OK"}
    assert oracle.expect("ListIndexes", li(page_token="t-job"), s).allowed == \
        {"INVALID_ARGUMENT"}
    assert oracle.expect("ListJobs", lj(index="base", page_token="t-job"), s).allowed == {"OK"}
    assert oracle.expect("ListJobs", lj(index="", page_token="t-job"), s).allowed == \
        {"INVALID_ARGUMENT"}  # the same filter only
    assert oracle.expect("ListJobs", lj(page_token="forged"), s).allowed == \
        {"OK", "INVALID_ARGUMENT"}


def test_every_failed_check_is_in_the_verdict():
    """The run's verdict names each kind of problem the issue counts, so none passes
    silently: a wrong code, INTERNAL, objects or Redis keys written on refusal, a crash,
    a failed control, a job ending as it must not, fewer requests than asked."""
    from . import run

    kinds = ["INTERNAL", "code not allowed", "objects written on refusal",
             "redis keys written on refusal", "failed job wrote objects", "job did not end",
             "crash", "control", "replay"]
    report = {"header": {"rpcs": ["GetJob"], "per_rpc": 2},
              "per_rpc": {"GetJob": {"requests": 1}},
              "problems": [{"kind": k, "rpc": "GetJob", "detail": "d", "request": "r"}
                           for k in kinds]}
    verdict = run.verdict(report)
    assert len(verdict) == len(kinds) + 1, verdict
    assert verdict[-1] == "GetJob: 1 requests, fewer than 2"
    report["problems"], report["per_rpc"]["GetJob"]["requests"] = [], 2
    assert run.verdict(report) == []


def test_every_case_of_the_issue_names_tests_that_exist():
    """The report's table of the issue's cases: every test it names is defined."""
    import re
    from pathlib import Path

    from . import run

    root = Path(__file__).resolve().parents[2]
    assert len(run.REGRESSIONS) >= 20
    for _item, case, tests in run.REGRESSIONS:
        assert tests, case
        for t in tests:
            path, name = t.split("::")
            src = (root / path).read_text()
            assert re.search(rf"^(async )?def {re.escape(name)}\(", src, re.M), t


def test_the_oracle_knows_generation():
    """Attribute's generate: the proto's bounds, the seed's int64 range, and a record's
    fault that the door may find before an absent index (a full run once counted those
    INVALID_ARGUMENT answers as wrong)."""
    s = _state()
    at, gen = rise_pb2.AttributeRequest, rise_pb2.Generation
    q = [common_pb2.Record(id="q1", text="a fox")]
    assert oracle.expect("Attribute", at(index="base", queries=q, generate=gen()), s).allowed \
        == {"OK", "INVALID_ARGUMENT"}
    for g in (gen(seed=2**64 - 1), gen(temperature=1e-300), gen(max_new_tokens=4097)):
        assert oracle.expect("Attribute", at(index="base", queries=q, generate=g), s).allowed \
            == {"INVALID_ARGUMENT"}, g
    twice = q + [common_pb2.Record(id="q1", text="a dog")]
    assert oracle.expect("Attribute", at(index="nope", queries=twice, generate=gen()),
                         s).allowed == {"NOT_FOUND", "INVALID_ARGUMENT"}
