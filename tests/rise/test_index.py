"""The index: object store, deterministic shards, crash/resume, append/delete/compact,
verification, and sharded-vs-unsharded scoring.

Everything runs on the session's tiny random models on CPU; shard sizes of 3-4 give several
shards from a handful of records.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rise import api, ingest
from rise import index as I
from rise.config import SketchConfig, make_config
from rise.data import FieldMap
from rise.errors import (
    AlreadyExists,
    Cancelled,
    Corrupt,
    InvalidInput,
    Mismatch,
    NotFound,
)
from rise.factors import Features
from rise.model import load_model
from rise.score import ScoreSpec, make_queryset, merge_topk, shard_scores, topk_candidates
from rise.shard import build_shard, parse_shard
from rise.store import LocalStore

MORE_TEXTS = TEXTS + [
    "Compaction rewrites live rows and erases tombstoned ones.",
    "Every manifest generation is written exactly once.",
]
# Distinctive ids: a tombstoned id's bytes must be greppable without false hits.
IDS = [f"item-{i:03d}-zq" for i in range(len(MORE_TEXTS))]
QUERIES = [
    {"id": "q-fox", "text": "A fox jumped over a dog."},
    {"id": "q-shard", "text": "Shards and manifests are immutable."},
    {"id": "q-sketch", "text": "Sketching gradients with count sketch."},
]


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def lm_llama(tiny_models):
    return load_model(tiny_models["llama"])


@pytest.fixture(scope="module")
def corpus8(tmp_path_factory) -> Path:
    """The conftest corpus, at one path for the module (the manifest records the path)."""
    root = tmp_path_factory.mktemp("corpus8")
    return write_jsonl(root / "corpus.jsonl",
                       [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)])


@pytest.fixture(scope="module")
def ref8(tmp_path_factory, lm, corpus8) -> Path:
    """An undisturbed index of corpus8, shard size 3 (3 shards)."""
    root = tmp_path_factory.mktemp("ref8")
    s = make_index(LocalStore(root), lm, corpus8)
    assert s.shards_written == 3 and s.shards_skipped == 0
    return root


@pytest.fixture
def idx8(tmp_path, ref8) -> LocalStore:
    """A private copy of ref8 (cheaper than indexing again)."""
    shutil.copytree(ref8, tmp_path / "idx")
    return LocalStore(tmp_path / "idx")


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (temp files included), relative path -> bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


def objects_of(store: LocalStore) -> dict[str, bytes]:
    """Every object of a store (what readers see), key -> bytes."""
    return {k: store.get(k) for k in store.list()}


def shard_files(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in files_of(root).items() if k.startswith("shards/")}


def records(ids: list[str], texts: list[str]) -> list[dict]:
    return [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]


def make_index(store: LocalStore, lm, data: Path, **kw) -> ingest.IngestSummary:
    kw.setdefault("shard_size", 3)
    return ingest.create_index(store, lm, data, FieldMap(), make_config(), **kw)


def cli_index_cmd(model: Path, data: Path, out: Path, shard_size: int) -> list[str]:
    return [sys.executable, "-m", "rise.cli", "index", "--model", str(model), "--data",
            str(data), "--out", str(out), "--shard-size", str(shard_size)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    env["OMP_NUM_THREADS"] = "1"  # two CLI runs share the cores; bytes must not depend on it
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return env


# -------------------------------------------------------------------------- LocalStore


def test_localstore_put_get_list_delete(tmp_path):
    s = LocalStore(tmp_path / "st")
    assert s.list() == []
    s.put("a/b/c.bin", b"one")
    s.put("a/x.bin", b"two")
    s.put("top", b"three")
    assert s.get("a/b/c.bin") == b"one"
    assert s.exists("a/x.bin") and not s.exists("a/nope")
    assert s.list() == ["a/b/c.bin", "a/x.bin", "top"]
    assert s.list("a/") == ["a/b/c.bin", "a/x.bin"]
    assert s.list("a/b") == ["a/b/c.bin"]
    s.put("a/x.bin", b"overwritten")
    assert s.get("a/x.bin") == b"overwritten"
    s.delete("a/x.bin")
    s.delete("a/x.bin")  # idempotent
    assert s.list() == ["a/b/c.bin", "top"]
    with pytest.raises(NotFound, match="a/x.bin"):
        s.get("a/x.bin")


def test_localstore_create_only(tmp_path):
    s = LocalStore(tmp_path)
    s.put("m.json", b"first", create_only=True)
    with pytest.raises(AlreadyExists, match="m.json"):
        s.put("m.json", b"second", create_only=True)
    assert s.get("m.json") == b"first"
    # the refused write leaves no temp file behind
    assert sorted(os.listdir(tmp_path)) == ["m.json"]


@pytest.mark.parametrize("key", ["../x", "/abs", "", "a/../b", "a//b", "./a", "a/"])
def test_localstore_invalid_keys(tmp_path, key):
    s = LocalStore(tmp_path / "st")
    with pytest.raises(InvalidInput, match="invalid object key"):
        s.put(key, b"x")
    with pytest.raises(InvalidInput):
        s.get(key)
    with pytest.raises(InvalidInput):
        s.delete(key)
    assert not (tmp_path / "x").exists()


def test_localstore_no_temp_files_after_put(tmp_path):
    s = LocalStore(tmp_path)
    for i in range(5):
        s.put(f"d/k{i}", bytes([i]) * 100)
    assert s.list() == [f"d/k{i}" for i in range(5)]
    assert not [n for n in os.listdir(tmp_path / "d") if n.startswith(".tmp-")]
    # an interrupted put (a stray temp file) is never an object
    (tmp_path / "d" / ".tmp-crashed").write_bytes(b"half")
    assert s.list() == [f"d/k{i}" for i in range(5)]


def test_localstore_delete_prunes_empty_folders(tmp_path):
    s = LocalStore(tmp_path / "root")
    s.put("a/b/c/k1", b"1")
    s.put("a/k2", b"2")
    s.delete("a/b/c/k1")
    assert not (tmp_path / "root" / "a" / "b").exists()
    assert (tmp_path / "root" / "a").is_dir()
    s.delete("a/k2")
    assert not (tmp_path / "root" / "a").exists()
    assert (tmp_path / "root").is_dir()  # the store's root itself stays
    assert s.list() == []


# -------------------------------------------------------------------------- determinism


def test_index_twice_is_byte_identical(tmp_path, lm, corpus8, ref8):
    a, b = ref8, tmp_path / "b"
    sb = make_index(LocalStore(b), lm, corpus8)
    assert sb.shards_written == 3
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    assert len([k for k in fa if k.startswith("shards/")]) == 3
    for k in fa:
        assert fa[k] == fb[k], k
    ma = I.open_index(LocalStore(a)).manifest
    mb = I.open_index(LocalStore(b)).manifest
    assert ma == mb


def test_index_is_byte_identical_across_processes(tmp_path, tiny_model, corpus8, ref8):
    outs = [tmp_path / "p1", tmp_path / "p2"]
    procs = [subprocess.Popen(cli_index_cmd(tiny_model, corpus8, o, 3), env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for o in outs]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    f1, f2 = shard_files(outs[0]), shard_files(outs[1])
    assert len(f1) == 3 and sorted(f1) == sorted(f2)
    assert all(f1[k] == f2[k] for k in f1)
    # ... and the same bytes as this (third) process made, manifest included
    assert files_of(outs[0]) == files_of(outs[1]) == files_of(ref8)


# ------------------------------------------------------------------------- crash/resume


class Boom(Exception):
    pass


def _crash_after_first_shard():
    calls = {"n": 0}

    def progress(examples, tokens):
        calls["n"] += 1
        if calls["n"] == 2:  # shard size 3 < batch size: one progress call per shard
            raise Boom()

    return progress


def test_crash_in_progress_then_resume(tmp_path, lm, corpus8, ref8):
    ref = ref8
    root = tmp_path / "crash"
    store = LocalStore(root)
    with pytest.raises(Boom):
        make_index(store, lm, corpus8, progress=_crash_after_first_shard())
    assert I.manifest_generations(store) == []
    assert store.list() == ["shards/g00000001/shard-000000.safetensors"]
    with pytest.raises(NotFound, match="no manifest"):
        I.open_index(store)
    s = make_index(store, lm, corpus8)
    assert s.shards_skipped >= 1
    assert s.shards_written + s.shards_skipped == 3
    assert files_of(root) == files_of(ref)


def test_cancel_then_resume(tmp_path, lm, corpus8, ref8):
    ref = ref8
    root = tmp_path / "cancel"
    store = LocalStore(root)
    polls = {"n": 0}

    def cancel() -> bool:
        polls["n"] += 1
        return polls["n"] >= 2  # polled before each batch: stop before shard 1

    with pytest.raises(Cancelled):
        make_index(store, lm, corpus8, cancel=cancel)
    assert len(store.list("shards/")) == 1
    with pytest.raises(NotFound):
        I.open_index(store)
    s = make_index(store, lm, corpus8, cancel=lambda: False)
    assert s.shards_skipped == 1 and s.shards_written == 2
    assert files_of(root) == files_of(ref)


def test_corrupt_leftover_shard_is_rewritten(tmp_path, lm, corpus8, ref8):
    ref = ref8
    root = tmp_path / "crash"
    store = LocalStore(root)
    with pytest.raises(Boom):
        make_index(store, lm, corpus8, progress=_crash_after_first_shard())
    key = "shards/g00000001/shard-000000.safetensors"
    good = store.get(key)
    store.put(key, good[: len(good) // 2])  # a torn write at the shard key
    s = make_index(store, lm, corpus8)
    assert s.shards_skipped == 0 and s.shards_written == 3
    assert store.get(key) == good
    assert files_of(root) == files_of(ref)
    assert I.verify(store).ok


def test_leftover_shard_of_other_work_is_not_trusted(tmp_path, lm, corpus8, ref8):
    """A valid shard at the right key from different data is rewritten (meta differs)."""
    ref = ref8
    other = write_jsonl(tmp_path / "other.jsonl",
                        records([f"o{i}" for i in range(8)], list(reversed(TEXTS))))
    root = tmp_path / "idx"
    LocalStore(root).put("shards/g00000001/shard-000000.safetensors",
                         shard_files(_index_to(tmp_path / "o", lm, other))[
                             "shards/g00000001/shard-000000.safetensors"])
    s = make_index(LocalStore(root), lm, corpus8)
    assert s.shards_skipped == 0 and s.shards_written == 3
    assert files_of(root) == files_of(ref)


def _index_to(root: Path, lm, data: Path) -> Path:
    make_index(LocalStore(root), lm, data)
    return root


def test_killed_cli_resumes_to_identical_index(tmp_path, tiny_model, lm):
    rows = [{"id": f"k{i:02d}", "text": f"{TEXTS[i % 8]} {TEXTS[(i * 3) % 8]} #{i}"}
            for i in range(40)]
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    out = tmp_path / "killed"
    shard_dir = out / "shards" / "g00000001"
    proc = subprocess.Popen(cli_index_cmd(tiny_model, data, out, 4), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            written = [n for n in os.listdir(shard_dir) if n.endswith(".safetensors")] \
                if shard_dir.is_dir() else []
            if written:
                break
            try:
                proc.wait(timeout=0.01)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"rise index exited ({proc.returncode}) before a shard was written")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = LocalStore(out)
    assert I.manifest_generations(store) == [], "killed too late: the run had finished"
    n_before = len(store.list("shards/"))
    assert 1 <= n_before < 10
    with pytest.raises(NotFound):
        I.open_index(store)
    rerun = subprocess.run(cli_index_cmd(tiny_model, data, out, 4) + ["--json"], env=cli_env(),
                           capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped"] >= 1
    assert summary["shards_skipped"] + summary["shards_written"] == 10
    ref = LocalStore(tmp_path / "ref")
    ingest.create_index(ref, lm, data, FieldMap(), make_config(), shard_size=4)
    # what readers see is identical; an interrupted put may leave a hidden temp file
    assert objects_of(store) == objects_of(ref)
    assert I.verify(store).ok


# ------------------------------------------------------------ append, delete, compact


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_files")
    a = write_jsonl(root / "a.jsonl", records(IDS[:5], MORE_TEXTS[:5]))
    b = write_jsonl(root / "b.jsonl", records(IDS[5:], MORE_TEXTS[5:]))
    return a, b


@pytest.fixture(scope="module")
def gen2_ref(tmp_path_factory, lm, two_files) -> Path:
    """Generation 1 = a.jsonl (shards of 3 and 2), generation 2 = b.jsonl appended."""
    root = tmp_path_factory.mktemp("gen2")
    store = LocalStore(root)
    make_index(store, lm, two_files[0])
    s = ingest.append(store, lm, two_files[1])
    assert s.generation == 2 and s.records == 5 and s.shards_written == 2
    return root


@pytest.fixture
def gen2(tmp_path, gen2_ref) -> LocalStore:
    shutil.copytree(gen2_ref, tmp_path / "idx")
    return LocalStore(tmp_path / "idx")


@pytest.fixture
def queries(tmp_path):
    return write_jsonl(tmp_path / "queries.jsonl", QUERIES)


def _all_rows(idx: I.Index):
    ids, rh, gh, norms, tc = [], [], [], [], []
    for sd in idx.shards():
        ids += sd.ids
        rh.append(sd.rh.float())
        gh.append(sd.gh.float())
        norms.append(sd.norms)
        tc.append(sd.token_count)
    return ids, torch.cat(rh), torch.cat(gh), torch.cat(norms), torch.cat(tc)


def test_append_delete_compact_equals_fresh_index(tmp_path, lm, gen2, queries):
    store = gen2
    root = store.root
    gone = [IDS[1], IDS[4], IDS[7]]  # two from generation 1, one from generation 2
    assert I.delete(store, gone) == 3
    idx = I.open_index(store)
    assert idx.live_count == 7 and idx.tombstones == set(gone)
    gen = I.compact(store)
    assert gen == 4
    assert I.manifest_generations(store) == [4]

    survivors = [i for i in IDS if i not in gone]
    fresh_data = write_jsonl(tmp_path / "fresh.jsonl",
                             [r for r in records(IDS, MORE_TEXTS) if r["id"] in survivors])
    fresh = LocalStore(tmp_path / "fresh")
    make_index(fresh, lm, fresh_data)

    ci, fi = I.open_index(store), I.open_index(fresh)
    assert ci.tombstones == set() and ci.live_count == 7 == fi.live_count
    assert set(ci.live_ids()) == set(fi.live_ids()) == set(survivors)
    assert [s.count for s in ci.manifest.shards] == [3, 3, 1]
    c_ids, c_rh, c_gh, c_n, c_tc = _all_rows(ci)
    f_ids, f_rh, f_gh, f_n, f_tc = _all_rows(fi)
    assert c_ids == f_ids == survivors
    assert torch.equal(c_tc, f_tc)
    assert (c_rh - f_rh).abs().max() <= 2e-3
    assert (c_gh - f_gh).abs().max() <= 2e-3
    assert torch.allclose(c_n, f_n, rtol=1e-4, atol=0)

    hc = api.attribute(ci, lm, queries, top=5)
    hf = api.attribute(fi, lm, queries, top=5)
    assert [q for q, _ in hc] == [q["id"] for q in QUERIES]
    for (qc, hits_c), (qf, hits_f) in zip(hc, hf, strict=True):
        assert qc == qf and len(hits_c) == 5
        assert [h.id for h in hits_c] == [h.id for h in hits_f]

    # the erased ids are nowhere in the store: not in shards, not in any manifest
    blobs = files_of(root)
    assert any(k.startswith("shards/g00000004/") for k in blobs)
    assert not any(k.startswith(("shards/g00000001/", "shards/g00000002/")) for k in blobs)
    for rid in gone:
        needle = rid.encode()
        assert not [k for k, v in blobs.items() if needle in v], rid
    for rid in survivors:  # the grep itself works
        assert any(rid.encode() in v for v in blobs.values())


def test_compact_without_tombstones_is_a_no_op(tmp_path, lm, idx8):
    store = idx8
    before = files_of(store.root)
    assert I.compact(store) is None
    assert files_of(store.root) == before


def test_delete_unknown_id_names_it(tmp_path, lm, idx8):
    store = idx8
    with pytest.raises(NotFound, match="no-such-id"):
        I.delete(store, ["doc-1", "no-such-id"])
    assert I.manifest_generations(store) == [1]
    I.delete(store, ["doc-1"])
    with pytest.raises(NotFound, match="doc-1"):  # already tombstoned: not live any more
        I.delete(store, ["doc-1"])


def test_attribute_never_returns_tombstoned_ids(lm, gen2, queries):
    store = gen2
    gone = {IDS[0], IDS[2], IDS[8]}
    I.delete(store, sorted(gone))
    idx = I.open_index(store)
    for spec in (ScoreSpec(), ScoreSpec(channel="rh", score="raw"), ScoreSpec(center=True)):
        for q, hits in api.attribute(idx, lm, queries, top=10, spec=spec):
            ids = [h.id for h in hits]
            assert len(ids) == 7 and not gone & set(ids), (q, spec)
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)
    values = api.value(idx, lm, queries)
    assert len(values) == 7 and not gone & {h.id for h in values}


def test_append_duplicate_of_live_id_names_both(tmp_path, lm, idx8):
    store = idx8
    dup = write_jsonl(tmp_path / "dup.jsonl",
                      [{"id": "new-0", "text": "fresh text"}, {"id": "doc-3", "text": "clash"}])
    with pytest.raises(InvalidInput) as e:
        ingest.append(store, lm, dup)
    msg = str(e.value)
    assert "'doc-3'" in msg and "record 1" in msg  # the new record
    assert "generation 1 record 3" in msg  # the live record it clashes with
    assert I.manifest_generations(store) == [1]


APPEND_AFTER_DELETE = ("id 'doc-1' of record 0 clashes with a deleted id not yet compacted "
                       "(run rise compact first)")
"""The one refusal of an id deleted but not compacted, whatever the path (CLI, API, gateway)."""


def test_append_reusing_a_tombstoned_id_is_refused(tmp_path, lm, idx8):
    """An id deleted (not yet compacted) still has a row in a shard: appended again, the
    new record would be born deleted.  ingest.plan refuses it, before any shard is written."""
    store = idx8
    I.delete(store, ["doc-1"])
    again = write_jsonl(tmp_path / "again.jsonl", [{"id": "doc-1", "text": "a new text"}])
    with pytest.raises(InvalidInput) as e:
        ingest.append(store, lm, again)
    assert str(e.value) == APPEND_AFTER_DELETE
    assert I.manifest_generations(store) == [1, 2]
    assert not store.list("shards/g00000003/")
    # After compaction the id is free again, and the new record is live.
    I.compact(store)
    ingest.append(store, lm, again)
    idx = I.open_index(store)
    assert "doc-1" in idx.live_ids()
    assert idx.live_count == len(idx.live_ids()) == 8


def test_append_with_other_model_is_mismatch(tmp_path, lm, lm_llama, idx8, two_files):
    store = idx8
    with pytest.raises(Mismatch, match="mismatch"):
        ingest.append(store, lm_llama, two_files[1])
    assert I.manifest_generations(store) == [1]


def test_create_over_existing_index_is_refused(tmp_path, lm, idx8):
    store = idx8
    with pytest.raises(AlreadyExists, match="rise append"):
        make_index(store, lm, Path(I.open_index(store).manifest.ingests[0].dataset_uri))


# ------------------------------------------------------------------------------- verify


def test_verify_good_index(tmp_path, gen2):
    store = gen2
    r = I.verify(store)
    assert r.ok and r.current == 2
    assert r.generations == {1: "ok", 2: "ok"}
    assert r.shards_checked == 4


def test_verify_flipped_byte_in_latest_generation(tmp_path, gen2):
    store = gen2
    key = "shards/g00000002/shard-000001.safetensors"
    path = store.root / key
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x40  # inside the tensor data, past the header
    path.write_bytes(bytes(data))
    r = I.verify(store)
    assert key in r.generations[2] and "sha256" in r.generations[2]
    assert r.generations[1] == "ok" and r.current == 1
    idx = I.open_index(store)  # present, so still opened; reading it fails
    entry = next(e for e in idx.manifest.shards if e.key == key)
    with pytest.raises(Corrupt, match="sha256"):
        idx.shard(entry)
    with pytest.raises(Corrupt):
        list(idx.shards())
    # id checks read the id files, which are intact: the sketches are not read for them
    assert set(idx.live_ids()) == set(IDS)


def test_verify_flipped_byte_in_first_generation_taints_both(tmp_path, gen2):
    store = gen2
    key = "shards/g00000001/shard-000000.safetensors"
    path = store.root / key
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    r = I.verify(store)
    assert not r.ok and r.current is None
    assert key in r.generations[1] and key in r.generations[2]


def test_missing_shard_falls_back_to_previous_generation(tmp_path, gen2):
    store = gen2
    store.delete("shards/g00000002/shard-000000.safetensors")
    idx = I.open_index(store)
    assert idx.generation == 1
    assert set(idx.live_ids()) == set(IDS[:5])
    r = I.verify(store)
    assert r.current == 1 and "missing" in r.generations[2]


def test_no_generation_verifies(tmp_path, lm, idx8):
    store = idx8
    store.delete("shards/g00000001/shard-000002.safetensors")
    with pytest.raises(Corrupt, match="missing"):
        I.open_index(store)


# -------------------------------------------------- sharded vs unsharded scan (property)

DIMS = (3, 4, 2)  # kr*kh = 12, kg*kh = 8
CFG = SketchConfig(dims=DIMS)


def _shards_for(feats_rh, feats_gh, counts, ids, sizes) -> list:
    out, start = [], 0
    for n, size in enumerate(sizes):
        sl = slice(start, start + size)
        f = Features(token_counts=counts[sl], rh=feats_rh[sl], gh=feats_gh[sl])
        data = build_shard({"kind": "test", "shard": n}, ids[sl], [1] * size,
                           list(range(start, start + size)), f, CFG.storage_dtype)
        out.append(parse_shard(data))
        start += size
    assert start == len(ids)
    return out


def _scan(qs, shards, spec, dead, top):
    per_q = [[] for _ in range(len(qs))]
    for sd in shards:
        for q, c in enumerate(topk_candidates(shard_scores(qs, sd, spec, 7), sd.ids, dead, top)):
            per_q[q].append(c)
    return [merge_topk(parts, top) for parts in per_q]


@st.composite
def scan_case(draw):
    n_unique = draw(st.integers(1, 8))
    n_dups = draw(st.integers(0, 6))
    n = n_unique + n_dups
    seed = draw(st.integers(0, 2**31 - 1))
    dup_of = draw(st.lists(st.integers(0, n_unique - 1), min_size=n_dups, max_size=n_dups))
    perm_seed = draw(st.integers(0, 2**31 - 1))
    cuts = draw(st.lists(st.integers(1, n), max_size=4, unique=True))
    dead = draw(st.sets(st.integers(0, n - 1), max_size=n))
    top = draw(st.integers(1, n + 2))
    spec = draw(st.sampled_from([ScoreSpec(), ScoreSpec(lam=0.2), ScoreSpec(channel="gh"),
                                 ScoreSpec(channel="rh", score="raw")]))
    return n_unique, dup_of, seed, perm_seed, sorted(set(cuts) - {n}), dead, top, spec


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scan_case())
def test_sharded_scan_equals_unsharded(case):
    n_unique, dup_of, seed, perm_seed, cuts, dead_rows, top, spec = case
    g = torch.Generator().manual_seed(seed)
    kr, kh, kg = DIMS
    rh = torch.randn(n_unique, kr * kh, generator=g, dtype=torch.float64)
    gh = torch.randn(n_unique, kg * kh, generator=g, dtype=torch.float64)
    # duplicated rows score exactly the same: ties that only the id can break
    rows = list(range(n_unique)) + list(dup_of)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(perm_seed))
    rows = [rows[i] for i in order.tolist()]
    n = len(rows)
    ids = [f"r{(i * 7919) % 1009:04d}-{i}" for i in range(n)]  # id order != row order
    R, G = rh[rows] * (1 + torch.arange(n)[:, None]), gh[rows]  # scale: raw scores differ
    counts = torch.arange(1, n + 1)
    dead = {ids[i] for i in dead_rows}

    bounds = [0] + cuts + [n]
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    single = _shards_for(R, G, counts, ids, [n])
    multi = _shards_for(R, G, counts, ids, sizes)

    q_feats = Features(token_counts=torch.tensor([3, 4]),
                       rh=torch.cat([rh[:1], torch.randn(1, kr * kh, generator=g,
                                                         dtype=torch.float64)]),
                       gh=torch.cat([gh[:1], torch.randn(1, kg * kh, generator=g,
                                                         dtype=torch.float64)]))
    qs = make_queryset(["qa", "qb"], q_feats, CFG, 7)

    got_single = _scan(qs, single, spec, dead, top)
    got_multi = _scan(qs, multi, spec, dead, top)
    assert got_multi == got_single

    # and both equal the brute-force ranking of all live rows
    full = shard_scores(qs, single[0], spec, 7).to(torch.float32)
    live = [i for i in range(n) if ids[i] not in dead]
    for q in range(len(qs)):
        expect = sorted(((ids[i], float(full[q, i])) for i in live),
                        key=lambda t: (-t[1], t[0]))[:top]
        assert got_single[q] == expect
        assert len(got_single[q]) == min(top, len(live))
        assert not {i for i, _ in got_single[q]} & dead


# ------------------------------------------------------------------ pool-mean centering


def test_centering_default_applies_to_sketched_cosine_only():
    assert ScoreSpec().center is None
    assert ScoreSpec().centered(sketched=True, live_count=3) is True
    assert ScoreSpec().centered(sketched=False, live_count=3) is False  # exact / no-sketch: plain
    assert ScoreSpec(channel="rh", score="raw").centered(sketched=True, live_count=3) is False
    assert ScoreSpec(center=False).centered(sketched=True, live_count=3) is False
    assert ScoreSpec(center=True).centered(sketched=True, live_count=3) is True
    with pytest.raises(InvalidInput, match="sketched index"):  # forced: no pool mean to use
        ScoreSpec(center=True).centered(sketched=False, live_count=3)
    with pytest.raises(InvalidInput, match="cosine scores only"):
        ScoreSpec(channel="gh", score="raw", center=True)


def test_an_empty_index_has_no_pool_mean_to_center_by():
    """Nothing live, no pool mean: the default is uncentered and a forced center=True is a
    clear InvalidInput (the same answer for the API, the scorer and the gateway)."""
    for spec in (ScoreSpec(), ScoreSpec(channel="rh"), ScoreSpec(lam=0.2)):
        assert spec.centered(sketched=True, live_count=0) is False
        assert spec.centered(sketched=True, live_count=1) is True
    assert ScoreSpec(center=False).centered(sketched=True, live_count=0) is False
    with pytest.raises(InvalidInput, match="no live examples"):
        ScoreSpec(center=True).centered(sketched=True, live_count=0)


def test_default_scores_are_pool_mean_centered_cosines(lm, gen2, queries):
    """Default scores = lambda-weighted cosines of (q - mu) and (x - mu) per channel, mu the
    mean of the live stored rows; computed here directly in float64."""
    store = gen2
    I.delete(store, [IDS[3]])
    idx = I.open_index(store)
    recs = api.read_records(queries, FieldMap())
    qs = api.sketch_queries(idx, lm, recs, FieldMap())
    n = idx.live_count
    got = {q: {h.id: h.score for h in hits}
           for q, hits in zip(qs.ids, api.attribute_sketched(idx, qs, ScoreSpec(), n), strict=True)}
    forced = api.attribute_sketched(idx, qs, ScoreSpec(center=True), n)
    plain = api.attribute_sketched(idx, qs, ScoreSpec(center=False), n)
    assert [[(h.id, h.score) for h in hs] for hs in forced] == \
        [sorted(got[q].items(), key=lambda kv: (-kv[1], kv[0])) for q in qs.ids]

    ids, rh, gh, _, _ = _all_rows(idx)
    live = torch.tensor([i != IDS[3] for i in ids])
    want = torch.zeros(len(qs), len(ids), dtype=torch.float64)
    for q, x in ((qs.rh, rh), (qs.gh, gh)):
        x = x.double()
        mu = x[live].mean(0)  # the stored rows' mean, as the shards' sums give it
        xu = x / x.norm(dim=1, keepdim=True)  # stored rows renormalised
        qc, xc = q - mu, xu - mu
        want += 0.5 * (qc @ xc.T) / (qc.norm(dim=1)[:, None] * xc.norm(dim=1)[None, :])
    diff = 0.0
    for qi, q in enumerate(qs.ids):
        assert set(got[q]) == {i for i, ok in zip(ids, live.tolist(), strict=True) if ok}
        for j, rid in enumerate(ids):
            if live[j]:
                assert got[q][rid] == pytest.approx(float(want[qi, j]), abs=2e-6)
                diff = max(diff, abs(got[q][rid] - {h.id: h.score for h in plain[qi]}[rid]))
    assert diff > 1e-3  # centering changed the scores (the check above can fail)


def test_default_does_not_center_an_exact_index(tmp_path, lm, corpus8, queries):
    store = LocalStore(tmp_path / "exact")
    ingest.create_index(store, lm, corpus8, FieldMap(), make_config(exact=True), shard_size=3)
    idx = I.open_index(store)
    default = api.attribute(idx, lm, queries, top=8)
    assert default == api.attribute(idx, lm, queries, top=8, spec=ScoreSpec(center=False))
    with pytest.raises(InvalidInput, match="sketched index"):
        api.attribute(idx, lm, queries, top=8, spec=ScoreSpec(center=True))


def test_default_on_an_index_with_no_live_examples(lm, idx8, queries):
    I.delete(idx8, [f"doc-{i}" for i in range(len(TEXTS))])
    idx = I.open_index(idx8)
    assert all(hits == [] for _, hits in api.attribute(idx, lm, queries, top=5))
    assert api.value(idx, lm, queries) == []
    with pytest.raises(InvalidInput, match="no live examples"):
        api.attribute(idx, lm, queries, top=5, spec=ScoreSpec(center=True))


def test_temperature_default_and_exact_mode():
    from rise import constants

    assert SketchConfig().temperature == constants.DEFAULT_TEMPERATURE
    assert SketchConfig(mode="nosketch").temperature == constants.DEFAULT_TEMPERATURE
    assert SketchConfig(mode="exact", topk=None).temperature == 1.0  # exact fixes tau = 1
    assert make_config(exact=True).temperature == 1.0
    assert make_config().temperature == constants.DEFAULT_TEMPERATURE
    with pytest.raises(ValueError, match="tau = 1"):
        SketchConfig(mode="exact", topk=None, temperature=2.0)


# --------------------------------------------------------------------------- copying


class _FailingPuts(LocalStore):
    """A destination whose puts fail after ``ok`` of them (a copy cut off half-way)."""

    def __init__(self, root, ok: int) -> None:
        super().__init__(root)
        self.ok = ok

    def put(self, key, data, *, create_only=False):
        if self.ok <= 0:
            raise OSError("disk full")
        self.ok -= 1
        super().put(key, data, create_only=create_only)


def test_copy_index_is_verified_and_byte_identical(tmp_path, ref8):
    dst = LocalStore(tmp_path / "copy")
    report = I.copy_index(LocalStore(ref8), dst)
    assert (report.generation, report.shards, report.copied) == (1, 3, 3)
    assert objects_of(dst) == objects_of(LocalStore(ref8))
    assert I.verify(dst).ok
    with pytest.raises(AlreadyExists):  # never over an index
        I.copy_index(LocalStore(ref8), dst)


def test_a_copy_cut_off_leaves_nothing_visible_and_resumes(tmp_path, ref8):
    src = LocalStore(ref8)
    cut = _FailingPuts(tmp_path / "copy", ok=2)
    with pytest.raises(OSError):
        I.copy_index(src, cut)
    with pytest.raises(NotFound):  # two shards there, no manifest: no index
        I.open_index(LocalStore(tmp_path / "copy"))
    report = I.copy_index(src, LocalStore(tmp_path / "copy"))
    assert report.copied == 1  # the two shards already there were verified, not rewritten
    assert objects_of(LocalStore(tmp_path / "copy")) == objects_of(src)


def test_a_damaged_source_shard_is_never_copied(tmp_path, idx8):
    key = I.open_index(idx8).manifest.shards[1].key
    data = bytearray(idx8.get(key))
    data[-1] ^= 1
    idx8.put(key, bytes(data))
    with pytest.raises(Corrupt, match="nothing was made visible"):
        I.copy_index(idx8, LocalStore(tmp_path / "copy"))
    assert I.manifest_generations(LocalStore(tmp_path / "copy")) == []


def test_copy_takes_the_current_generation(tmp_path, idx8):
    I.delete(idx8, ["doc-1"])
    dst = LocalStore(tmp_path / "copy")
    assert I.copy_index(idx8, dst).generation == 2
    assert I.open_index(dst).tombstones == {"doc-1"}
    assert I.manifest_generations(dst) == [2]


# ------------------------------------------------- manifest lists, delete files, id files


class _ReadLog(LocalStore):
    """A LocalStore that records every key it reads (whole or ranged)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, key: str) -> bytes:
        self.reads.append(key)
        return super().get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.reads.append(key)
        return super().get_range(key, offset, length)


def test_id_checks_read_id_files_never_sketches(tmp_path, lm, idx8):
    store = _ReadLog(idx8.root)
    idx = I.open_index(store)
    assert all(s.ids_key and s.ids_sha256 for s in idx.manifest.shards)
    assert set(idx.live_ids()) == {f"doc-{i}" for i in range(len(TEXTS))}
    I.delete(store, ["doc-2"])
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "doc-5", "text": "clash"}])
    with pytest.raises(InvalidInput, match="clashes with index generation 1 record 5"):
        ingest.plan(store, lm, dup, append=True)
    assert store.reads and not [k for k in store.reads if k.startswith("shards/")]
    assert any(k.startswith("ids/") for k in store.reads)


def test_manifest_list_and_delete_files_round_trip(tmp_path, gen2):
    store = gen2
    raw1 = store.get("manifest-00000002.json")
    listed = json.loads(raw1)
    assert listed["format_version"] == 3 and "shards" not in listed
    assert [p["generation"] for p in listed["parts"]] == [1, 2] and listed["deletes"] == []
    I.delete(store, [IDS[0], IDS[6]])
    I.delete(store, [IDS[3]])
    raw = store.get("manifest-00000004.json")
    m4 = json.loads(raw)
    assert m4["parts"] == listed["parts"]  # reused, not rewritten
    assert [(d["generation"], d["count"]) for d in m4["deletes"]] == [(3, 2), (4, 1)]
    assert not any(i.encode() in raw for i in IDS)  # ids live in the delete files only
    deletes = [store.get(d["key"]) for d in m4["deletes"]]
    assert json.loads(deletes[0])["ids"] == sorted([IDS[0], IDS[6]])
    m = I.read_manifest(store, 4)
    assert m.tombstones == sorted([IDS[0], IDS[3], IDS[6]]) and m.live_count == 7
    assert [s.key for s in m.shards] == [s.key for s in I.read_manifest(store, 2).shards]
    assert I.read_manifest(store, 4) is m  # resolved once per generation, then cached
    # one more delete adds one small file; the list grows by one entry, not by its ids
    I.delete(store, [IDS[i] for i in (1, 2, 4, 5, 7, 8, 9)])
    assert len(store.get("manifest-00000005.json")) - len(raw) < len(raw) - len(raw1)
    r = I.verify(store)
    assert r.ok and set(r.generations.values()) == {"ok"}


def test_a_damaged_delete_file_fails_its_generation(tmp_path, gen2):
    store = gen2
    I.delete(store, [IDS[0]])
    key = next(k for k in store.list("meta/") if "-deletes-" in k)
    store.put(key, store.get(key).replace(IDS[0].encode(), IDS[1].encode()))
    r = I.verify(store)
    assert key in r.generations[3] and r.current == 2
    with pytest.raises(Corrupt, match="fails verification"):
        I.read_manifest(store, 3, cached=False)
    # a process that had not resolved generation 3 yet opens the newest that resolves
    assert I.open_index(LocalStore(store.root, label="elsewhere")).generation == 2


def test_compaction_keeps_only_the_current_files(tmp_path, gen2):
    store = gen2
    I.delete(store, [IDS[2]])
    I.compact(store)
    m = I.open_index(store).manifest
    keys = set(store.list())
    assert keys == I.generation_keys(store, m.generation)
    assert all(k.startswith(("manifest-", "meta/g00000004-", "shards/g00000004/",
                             "ids/g00000004/")) for k in keys)


def test_localstore_ranged_get(tmp_path):
    s = LocalStore(tmp_path)
    s.put("a/b.bin", b"0123456789")
    assert s.get_range("a/b.bin", 2, 3) == b"234"
    assert s.get_range("a/b.bin", 8, 10) == b"89"
    assert s.get_range("a/b.bin", 20, 5) == b""
    with pytest.raises(NotFound):
        s.get_range("nope", 0, 1)
    with pytest.raises(InvalidInput):
        s.get_range("a/b.bin", -1, 2)


class _IoLog(_ReadLog):
    """A _ReadLog that also records puts, in one sequence of ("get"|"put", key)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.log: list[tuple[str, str]] = []

    def get(self, key: str) -> bytes:
        self.log.append(("get", key))
        return super().get(key)

    def put(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        self.log.append(("put", key))
        super().put(key, data, create_only=create_only)


def test_compaction_streams_shard_by_shard(tmp_path, gen2):
    """Compaction writes each new shard as soon as it is full (never after reading the
    whole index) and does not even read a shard whose rows are all deleted."""
    I.delete(gen2, [IDS[1], IDS[3], IDS[4]])  # shard g1/1 holds IDS[3:5]: all deleted
    store = _IoLog(gen2.root)
    assert I.compact(store) == 4
    gets = [k for op, k in store.log if op == "get" and k.startswith("shards/")]
    assert "shards/g00000001/shard-000001.safetensors" not in gets
    first_put = store.log.index(("put", "shards/g00000004/shard-000000.safetensors"))
    last_get = max(i for i, (op, k) in enumerate(store.log)
                   if op == "get" and k.startswith("shards/g0000000") and "g00000004" not in k)
    assert first_put < last_get  # the first new shard left memory before the last old one
    idx = I.open_index(gen2)
    assert sorted(idx.live_ids()) == sorted(set(IDS) - {IDS[1], IDS[3], IDS[4]})
    assert I.verify(gen2).ok


def test_a_generation_is_resolved_and_listed_once_per_process(tmp_path, gen2):
    class Listing(_ReadLog):
        lists: list[str] = []

        def list(self, prefix: str = "") -> list[str]:
            self.lists.append(prefix)
            return super().list(prefix)

    store = Listing(gen2.root)
    first = I.open_index(store)
    assert "shards/" in store.lists and any(k.startswith("meta/") for k in store.reads)
    store.lists.clear()
    store.reads.clear()
    again = I.open_index(store)
    assert again.manifest is first.manifest
    assert store.lists == ["manifest-"]  # no shard listing, no shard list read again
    assert store.reads == ["manifest-00000002.json"]
