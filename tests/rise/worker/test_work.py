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
        work.dataset_source(Settings(), plan)
    assert str(e.value).startswith(f"{uri} line 2") and str(tmp_path) not in str(e.value)
