"""The ingest pipeline refuses what must never reach an index: features that are not
finite, and messages that name the local copy of a dataset instead of its URI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TEXTS, write_jsonl
from rise import api, ingest
from rise.config import make_config
from rise.data import FieldMap
from rise.errors import InvalidInput, Mismatch
from rise.index import open_index
from rise.model import load_model
from rise.store import LocalStore

CONFIG = make_config(dims=(16, 8, 8), max_length=64)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model, dtype="float32")


def poisoned(featurize, row: int, channel: str, value: float):
    """featurize whose features of example ``row`` hold ``value`` in ``channel``."""

    def run(*args, **kwargs):
        feats = featurize(*args, **kwargs)
        if channel in ("rh", "gh"):
            getattr(feats, channel)[row, 3] = value
        else:  # factors are inference tensors: replace one with a poisoned copy
            f = feats.factors[row]
            t = getattr(f, channel).clone()
            t[0, 0] = value
            feats.factors[row] = dataclasses.replace(f, **{channel: t})
        return feats

    return run


@pytest.mark.parametrize("channel,value", [("rh", float("nan")), ("gh", float("inf")),
                                           ("rh", 1e300)])
def test_a_shard_with_non_finite_features_is_never_written(tmp_path, lm, monkeypatch,
                                                           channel, value):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "text": t}
                                              for i, t in enumerate(TEXTS[:6])])
    store = LocalStore(tmp_path / "idx")
    p, records = ingest.plan(store, lm, data, config=CONFIG, shard_size=3)
    monkeypatch.setattr(ingest, "featurize", poisoned(ingest.featurize, 1, channel, value))
    with pytest.raises(InvalidInput) as e:
        ingest.write_shard(store, lm, p, 1, records[3:6])
    assert "record id 'r4'" in str(e.value) and "not finite" in str(e.value)
    assert store.list("") == []  # nothing put, nothing committed


def test_exact_factors_are_checked_too(tmp_path, lm, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "text": t}
                                              for i, t in enumerate(TEXTS[:2])])
    store = LocalStore(tmp_path / "idx")
    p, records = ingest.plan(store, lm, data, config=make_config(exact=True, max_length=32))
    monkeypatch.setattr(ingest, "featurize", poisoned(ingest.featurize, 0, "g", float("nan")))
    with pytest.raises(InvalidInput, match=r"record id 'r0'.*NaN or infinity in g"):
        ingest.write_shard(store, lm, p, 0, records)
    assert store.list("") == []


def test_queries_with_non_finite_features_are_refused(tmp_path, lm, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "text": t}
                                              for i, t in enumerate(TEXTS[:4])])
    store = LocalStore(tmp_path / "idx")
    ingest.create_index(store, lm, data, FieldMap(), CONFIG)
    index = open_index(store)
    records = api.read_records(data, FieldMap())
    monkeypatch.setattr(api, "featurize", poisoned(api.featurize, 2, "gh", float("nan")))
    with pytest.raises(InvalidInput, match="query id 'r2'"):
        api.sketch_queries(index, lm, records, FieldMap())


def test_plan_names_the_dataset_uri_not_the_local_copy(tmp_path, lm):
    copy = tmp_path / "cache" / "datasets" / "9c1e.jsonl"
    copy.parent.mkdir(parents=True)
    copy.write_text(json.dumps({"id": "a", "text": "fine"}) + "\n{broken\n")
    uri = "s3://rise/tenants/a/data/d.jsonl"
    with pytest.raises(InvalidInput) as e:
        ingest.plan(LocalStore(tmp_path / "idx"), lm, copy, config=CONFIG, dataset_uri=uri)
    assert str(e.value).startswith(f"{uri} line 2 (record 1): invalid JSON")
    assert str(tmp_path) not in str(e.value)


def test_plan_applies_the_record_size_cap(tmp_path, lm):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x" * 500}])
    with pytest.raises(InvalidInput, match="over the limit of 100 bytes"):
        ingest.plan(LocalStore(tmp_path / "idx"), lm, data, config=CONFIG,
                    max_record_bytes=100)


def test_features_are_finite_at_the_temperature_bounds(tmp_path, lm):
    """The ends of the allowed range still index finite sketches (1e-300 built NaNs)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "text": t}
                                              for i, t in enumerate(TEXTS[:3])])
    for tau in (0.05, 100.0):
        store = LocalStore(tmp_path / f"idx-{tau}")
        ingest.create_index(store, lm, data, FieldMap(),
                            make_config(dims=(16, 8, 8), max_length=64, temperature=tau))
        for sd in open_index(store).shards():
            assert sd.rh is not None and sd.gh is not None
            assert torch.isfinite(sd.rh.float()).all() and torch.isfinite(sd.norms).all()


def test_a_shard_reads_only_its_range_and_refuses_it_changed(tmp_path, lm):
    """Planning tokenises nothing and cuts the file into hashed ranges; a shard's records
    come from its range alone, and a range whose bytes changed since is refused."""
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS[:7])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    store = LocalStore(tmp_path / "idx")
    p, records = ingest.plan(store, lm, data, config=CONFIG, shard_size=3)
    assert p.tokens == 0 and [(r.start, r.stop) for r in p.ranges] == [(0, 3), (3, 6), (6, 7)]
    assert ingest.IngestPlan.model_validate(p.model_dump(mode="json")) == p  # a task message
    assert [r.id for r in records[3:6]] == ["r3", "r4", "r5"]
    raw = bytearray(data.read_bytes())
    at = raw.index(b'"r4"')
    raw[at + 2] = ord("9")  # r4 -> r9 in place: same length, other bytes
    data.write_bytes(bytes(raw))
    changed = r"records \[3, 6\) \(bytes \d+ to \d+\) changed since the job was planned"
    with pytest.raises(Mismatch, match=changed):
        records.read(3, 6)
    assert [r.id for r in records.read(0, 3)] == ["r0", "r1", "r2"]  # the others are intact
    with pytest.raises(Mismatch):
        ingest.run(store, lm, p, records)
    assert not store.list("manifest-")


def test_truncation_is_counted_by_the_shards(tmp_path, lm):
    """Planning no longer tokenises: the manifest's truncated count comes from the shards."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"r{i}", "text": t}
                                              for i, t in enumerate(TEXTS[:5])])
    store = LocalStore(tmp_path / "idx")
    s = ingest.create_index(store, lm, data, FieldMap(),
                            make_config(dims=(16, 8, 8), max_length=4), shard_size=2)
    assert s.truncated == 5 and s.tokens == 5 * 3
    assert open_index(store).manifest.ingests[0].truncated == 5


def test_jsonl_gzip_and_parquet_index_the_same(tmp_path, lm):
    """Byte ranges (JSONL), row groups (Parquet) and the whole-file read (gzip) give the
    same shards' content."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS[:7])]
    plain = write_jsonl(tmp_path / "d.jsonl", rows)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=2)
    got = []
    for path in (plain, gz, parquet):
        store = LocalStore(tmp_path / path.name.replace(".", "-"))
        ingest.create_index(store, lm, path, FieldMap(), CONFIG, shard_size=3)
        shards = list(open_index(store).shards())
        got.append(([sd.ids for sd in shards], torch.cat([sd.rh for sd in shards])))
    for ids, rh in got[1:]:
        assert ids == got[0][0] and torch.equal(rh, got[0][1])
