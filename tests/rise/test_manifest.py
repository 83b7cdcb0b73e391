"""The typed manifest (rise.manifest) and the golden indexes of format version 1.

tests/fixtures/golden holds indexes written by the code before the manifest was typed
(make_golden.py says how); they must open, verify and score exactly as they did then.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from rise import api, manifest
from rise import index as I
from rise.data import FieldMap
from rise.errors import Corrupt, Mismatch
from rise.factors import Features
from rise.manifest import FIELD_SINCE, Manifest
from rise.score import ScoreSpec
from rise.shard import build_shard
from rise.store import LocalStore

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


def golden_manifests() -> list[Path]:
    return sorted(GOLDEN.glob("*/manifest-*.json"))


# ----------------------------------------------------------------------------- models


def test_golden_manifests_round_trip_byte_for_byte():
    paths = golden_manifests()
    assert len(paths) == 4
    for path in paths:
        data = path.read_bytes()
        m = Manifest.parse(data, path.name)
        assert m.format_version == 1
        assert m.to_json() == data, path


def golden_raw() -> dict:
    return json.loads((GOLDEN / "sketch" / "manifest-00000003.json").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(extra_field=1), "extra_field: Extra inputs are not permitted"),
    (lambda m: m["shards"][0].update(sha256="abc"), "shards.0.sha256"),
    (lambda m: m["model"].pop("vocab"), "model.vocab: Field required"),
    (lambda m: m.update(live_count=99), "live_count differs"),
    (lambda m: m["config"].update(seed=7), "config_sha256 does not match config"),
    (lambda m: m.update(ingests=[]), "at least one ingest"),
    (lambda m: m.update(format_version="1"), "format version '1'"),
])
def test_invalid_manifests_are_corrupt_naming_the_field(mutate, message):
    raw = golden_raw()
    mutate(raw)
    with pytest.raises(Corrupt) as e:
        Manifest.parse(json.dumps(raw), "manifest-00000003.json")
    assert "manifest-00000003.json" in str(e.value)
    assert message in str(e.value)


def test_not_json_is_corrupt():
    with pytest.raises(Corrupt, match="not valid JSON"):
        Manifest.parse(b"{", "m.json")
    with pytest.raises(Corrupt, match="not a JSON object"):
        Manifest.parse(b"[]", "m.json")


def test_newer_format_is_refused_with_both_versions():
    raw = golden_raw()
    raw["format_version"] = manifest.FORMAT_VERSION + 1
    with pytest.raises(Mismatch) as e:
        Manifest.parse(json.dumps(raw), "m.json")
    assert f"format version {manifest.FORMAT_VERSION + 1}" in str(e.value)
    assert f"reads up to {manifest.FORMAT_VERSION}" in str(e.value)


def test_written_version_is_the_lowest_that_expresses_the_manifest(monkeypatch):
    """Rule 2 of rise.manifest: a field added in version v raises the written version only
    when it differs from its default (here the seed stands in for a future field)."""
    m = Manifest.parse((GOLDEN / "sketch" / "manifest-00000003.json").read_bytes(), "m")
    monkeypatch.setitem(FIELD_SINCE, "config.seed", 2)
    assert manifest.written_version(m) == 1  # seed 0 is the default
    seeded = m.config.model_copy(update={"seed": 5})
    rebuilt = Manifest.build(3, model=m.model, config=seeded, ingests=m.ingests,
                             shards=m.shards, tombstones=m.tombstones)
    assert rebuilt.format_version == 2
    assert rebuilt.config_sha256 == seeded.sha256()


def test_manifest_module_is_torch_free():
    """The gateway reads manifests without torch or the model pipeline."""
    code = ("import sys, rise.manifest; "
            "bad = [m for m in ('torch', 'transformers', 'rise.featurize', 'rise.model') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


# ---------------------------------------------------------------------- shard bytes


def test_shard_writer_bytes_are_pinned():
    """The storage format does not drift: a shard built from fixed tensors hashes the same
    as the code before the typed manifest wrote it (format version 1)."""
    g = torch.Generator().manual_seed(0)
    feats = Features(token_counts=torch.tensor([3, 5], dtype=torch.int64),
                     rh=torch.randn(2, 8, generator=g, dtype=torch.float64),
                     gh=torch.randn(2, 4, generator=g, dtype=torch.float64))
    meta = {"kind": "ingest", "generation": 1, "shard": 0, "start": 0, "stop": 2}
    data = build_shard(meta, ["a", "b"], [1, 1], [0, 1], feats, "float16")
    assert hashlib.sha256(data).hexdigest() == \
        "63e9b0872655e63a1774161e0b3c225f3968ed04c9c000efa3111918ab2bc3be"


# ------------------------------------------------------------------------ golden indexes


@pytest.fixture(scope="module")
def golden_lm(tmp_path_factory):
    """The tiny model the golden indexes were built with (seed 0, as make_golden.py)."""
    folder = save_tiny_model("gpt_neox", tmp_path_factory.mktemp("golden") / "model")
    return api.load(str(folder), dtype="float32")


@pytest.mark.parametrize("name", ["sketch", "exact"])
def test_golden_index_opens_verifies_and_scores_the_same(tmp_path, golden_lm, name):
    shutil.copytree(GOLDEN / name, tmp_path / name)
    store = LocalStore(tmp_path / name)
    report = I.verify(store)
    assert report.ok and report.current == max(report.generations)
    index = I.open_index(store)
    index.check_model(golden_lm)
    expected = json.loads((GOLDEN / "expected.json").read_text())[name]
    records = api.read_records(GOLDEN / "queries.jsonl", FieldMap())
    qs = api.sketch_queries(index, golden_lm, records, FieldMap())
    # The float64 path scores exactly as format-version-1 code did; the float32 scan (the
    # default for sketched indexes, rise.score) ranks the same within its precision bound.
    for reference in (True, False):
        hits = api.attribute_sketched(index, qs, ScoreSpec(), top=index.live_count,
                                      reference=reference)
        got = {r.id: [[h.id, h.score] for h in hs] for r, hs in zip(records, hits, strict=True)}
        values = [[h.id, h.score]
                  for h in api.value_sketched(index, qs, ScoreSpec(), reference=reference)]
        if reference or name == "exact":
            assert got == expected["attribute"]
            assert values == expected["value"]
            continue
        for qid, want in expected["attribute"].items():
            assert [i for i, _ in got[qid]] == [i for i, _ in want]
            assert max(abs(a[1] - b[1]) for a, b in zip(got[qid], want, strict=True)) < 1e-4
        assert [i for i, _ in values] == [i for i, _ in expected["value"]]
        assert max(abs(a[1] - b[1]) for a, b in zip(values, expected["value"], strict=True)) < 1e-4


def test_a_delete_over_an_old_index_writes_a_manifest_list(tmp_path):
    """The first generation written over a version-1 index carries its shards and
    tombstones into shard lists and a delete file (version 3); the old generations stay
    as they are, and both open and verify."""
    shutil.copytree(GOLDEN / "sketch", tmp_path / "sketch")
    store = LocalStore(tmp_path / "sketch")
    old = I.open_index(store)
    assert old.manifest.format_version == 1 and old.manifest.tombstones
    live = sorted(old.live_ids())
    gen = I.delete(store, [live[0]])
    raw = json.loads(store.get(f"manifest-{gen:08d}.json"))
    assert raw["format_version"] == manifest.FORMAT_VERSION == 3
    assert "shards" not in raw and "tombstones" not in raw
    new = I.open_index(store)
    assert new.generation == gen
    assert [s.key for s in new.manifest.shards] == [s.key for s in old.manifest.shards]
    assert set(new.manifest.tombstones) == set(old.manifest.tombstones) | {live[0]}
    assert sorted(new.live_ids()) == live[1:]  # older shards: ids read from the shards
    report = I.verify(store)
    assert report.ok and set(report.generations.values()) == {"ok"}
    assert I.read_manifest(store, old.generation) == old.manifest  # untouched
    I.compact(store)  # compaction writes id files for the shards it writes
    assert all(s.ids_key for s in I.open_index(store).manifest.shards)
    assert sorted(I.open_index(store).live_ids()) == live[1:]


def test_a_manifest_list_is_refused_by_older_readers_naming_both_versions():
    raw = json.loads((GOLDEN / "sketch" / "manifest-00000003.json").read_text())
    raw["format_version"] = manifest.FORMAT_VERSION + 1
    with pytest.raises(Mismatch, match=f"reads up to {manifest.FORMAT_VERSION}"):
        manifest.parse_json_object(json.dumps(raw), "m.json", "manifest")
