"""What a worker process tells a job's owner about its own files: nothing.  Model and
dataset errors name the pool and the dataset URI; the paths go to the worker's log."""

from __future__ import annotations

import json
import logging

import pytest
from rise.errors import InvalidInput, NotFound
from rise.settings import Pool, Settings
from rise.worker import work


def test_a_model_that_cannot_load_is_named_by_its_pool(tmp_path, caplog):
    missing = tmp_path / "models" / "nowhere"
    settings = Settings(pools={"cpu": Pool(model=str(missing))})
    caplog.set_level(logging.ERROR, logger="rise.worker")
    with pytest.raises(NotFound) as e:
        work.get_model(settings, "cpu")
    assert "pool 'cpu'" in str(e.value) and str(tmp_path) not in str(e.value)
    assert any(str(missing) in r.getMessage() for r in caplog.records)  # for the operator


def test_dataset_errors_name_the_uri_not_the_cache(tmp_path, monkeypatch):
    from rise import ingest
    from rise.data import file_sha256

    copy = tmp_path / "cache" / "datasets" / "ab12.jsonl"
    copy.parent.mkdir(parents=True)
    copy.write_text(json.dumps({"id": "a", "text": "t"}) + "\n{oops\n")
    uri = "s3://rise/tenants/a/data/d.jsonl"
    monkeypatch.setattr(work, "materialize", lambda u, s: copy)
    plan = ingest.IngestPlan.model_construct(dataset_uri=uri, dataset_sha256=file_sha256(copy),
                                             fields=ingest.FieldsEntry(**work.FieldMap()
                                                                       .to_dict()))
    with pytest.raises(InvalidInput) as e:
        work.dataset_source(Settings(), plan).read(0, 2)
    assert str(e.value).startswith(f"{uri} line 2") and str(tmp_path) not in str(e.value)


def test_a_shard_reads_its_range_from_the_store_and_refuses_a_changed_one(tmp_path):
    """A planned dataset is read range by range through the store (ranged GETs; here a
    file endpoint), each range checked against the plan's sha256."""
    import dataclasses

    from rise import ingest
    from rise.data import FieldMap, scan_dataset
    from rise.errors import Mismatch
    from rise.idcheck import IdChecker

    root = tmp_path / "bucket"
    data = root / "tenants" / "a" / "data" / "d.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"id": f"r{i}", "text": f"text {i}"}) + "\n"
                            for i in range(6)))
    with IdChecker() as ids:
        scan = scan_dataset(data, FieldMap(), 3, ids)
    uri = "s3://rise/tenants/a/data/d.jsonl"
    plan = ingest.IngestPlan.model_construct(
        dataset_uri=uri, dataset_sha256=scan.sha256,
        fields=ingest.FieldsEntry(**FieldMap().to_dict()), n_records=6, shard_size=3,
        data_format="jsonl", data_size=scan.size, tail_offset=None, tail_sha256=None,
        ranges=[ingest.RangeEntry(**dataclasses.asdict(r)) for r in scan.ranges])
    settings = Settings(s3_endpoint=f"file://{root}", s3_bucket="rise")
    source = work.dataset_source(settings, plan)
    assert [r.id for r in source.read(3, 6)] == ["r3", "r4", "r5"]
    data.write_bytes(data.read_bytes().replace(b"text 1", b"text 7"))
    with pytest.raises(Mismatch) as e:
        source.read(0, 3)
    assert str(e.value).startswith(f"{uri}: the range of records [0, 3)")
    assert [r.id for r in source.read(3, 6)] == ["r3", "r4", "r5"]


def test_a_hub_pool_loads_from_the_offline_cache_and_is_named_by_its_id(tmp_path, monkeypatch):
    """A pool whose model is a hub id, with HF_HUB_OFFLINE=1: the snapshot in the cache is
    loaded and the model keeps its id as its name (not the snapshot's commit); an id not in
    the cache fails naming the pool, the id in the worker's log."""
    from conftest import save_tiny_model

    commit = "c" * 40
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny"
    save_tiny_model("gpt2", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(work, "_models", {})
    settings = Settings(pools={"hub": Pool(model="someorg/tiny"),
                               "gone": Pool(model="someorg/not-cached")})
    lm = work.get_model(settings, "hub")
    assert (lm.identity.name, lm.identity.revision) == ("someorg/tiny", None)
    with pytest.raises(NotFound, match="pool 'gone'"):
        work.get_model(settings, "gone")
