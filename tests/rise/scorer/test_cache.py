"""The scorer's node-local shard cache (rise.scorer.cache) in disk mode: each shard
downloaded once, verified by sha256, written atomically, memory-mapped, and evicted least
recently used by bytes under the budget; a scan of an index larger than the budget reads
it all and scores exactly as the in-memory path."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from rise import score as S
from rise.errors import Corrupt
from rise.factors import Features
from rise.manifest import ShardEntry
from rise.scorer.cache import ShardCache
from rise.shard import build_shard, parse_shard, sha256
from rise.store import LocalStore

PREFIX = "tenants/a/indexes/x/"
ROWS = 40


class Counting:
    def __init__(self, inner: LocalStore) -> None:
        self.inner, self.gets = inner, 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self._lock:
            self.gets += 1
        return self.inner.get(key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.fixture()
def shards(tmp_path) -> tuple[Counting, list[ShardEntry]]:
    store = LocalStore(tmp_path / "store")
    g = torch.Generator().manual_seed(0)
    entries = []
    for n in range(4):
        feats = Features(token_counts=torch.ones(ROWS, dtype=torch.int64),
                         rh=torch.randn(ROWS, 64, generator=g, dtype=torch.float64),
                         gh=torch.randn(ROWS, 32, generator=g, dtype=torch.float64))
        ids = [f"s{n}-{i}" for i in range(ROWS)]
        data = build_shard({"shard": n}, ids, [1] * ROWS, list(range(ROWS)), feats, "float16")
        key = f"shards/g00000001/shard-{n:06d}.safetensors"
        store.put(key, data)
        entries.append(ShardEntry(key=key, generation=1, shard=n, count=ROWS,
                                  sha256=sha256(data), bytes=len(data)))
    return Counting(store), entries


def _files(cache: ShardCache) -> set[str]:
    assert cache.directory is not None
    return set(os.listdir(cache.directory))


def test_files_are_downloaded_once_verified_and_evicted_by_bytes(shards, tmp_path):
    store, entries = shards
    size = entries[0].bytes
    cache = ShardCache(lambda p: store, 2 * size + 10, directory=tmp_path / "cache")
    a, b, c, _ = entries
    sa = cache.load(PREFIX, a)
    assert cache.load(PREFIX, a) is sa and store.gets == 1
    assert _files(cache) == {f"{a.sha256}.safetensors"}  # no temporary file left
    sb = cache.load(PREFIX, b)
    cache.load(PREFIX, a)  # a is the most recent
    cache.load(PREFIX, c)  # evicts b, and its file
    assert _files(cache) == {f"{a.sha256}.safetensors", f"{c.sha256}.safetensors"}
    assert cache.nbytes == a.bytes + c.bytes <= cache.max_bytes
    # b's shard, evicted while still held, stays readable through its mapping
    assert bool(torch.isfinite(sb.rh.float()).all())
    # A shard whose bytes differ from the manifest's sha256 is refused and not kept.
    with pytest.raises(Corrupt):
        cache.load(PREFIX, b.model_copy(update={"sha256": "e" * 64}))
    assert not any(f.startswith("e" * 8) or f.startswith(".part-") for f in _files(cache))
    # keep=False (another replica's shard for the pool mean) leaves no file behind
    cache.load(PREFIX, entries[3], keep=False)
    assert f"{entries[3].sha256}.safetensors" not in _files(cache)
    cache.close()
    assert _files(cache) == set()


def test_scan_larger_than_the_budget_scores_as_in_memory(shards, tmp_path):
    store, entries = shards
    qs = S.QuerySet(ids=["q0", "q1"], norms=torch.ones(2, 2, dtype=torch.float64),
                    rh=S.stored_unit(torch.randn(2, 64).to(torch.float16)),
                    gh=S.stored_unit(torch.randn(2, 32).to(torch.float16)))
    # room for one shard: every scan of the four evicts
    cache = ShardCache(lambda p: store, entries[0].bytes + 1, directory=tmp_path / "c")
    mem = [parse_shard(store.inner.get(e.key)) for e in entries]
    mean = S.pool_mean(mem, frozenset())
    for _ in range(2):
        for e, m in zip(entries, mem, strict=True):
            got = S.shard_scores(qs, cache.load(PREFIX, e), S.ScoreSpec(), 0, mean)
            assert torch.equal(got, S.shard_scores(qs, m, S.ScoreSpec(), 0, mean))
            assert cache.nbytes <= cache.max_bytes
    assert store.gets == 8 and len(_files(cache)) == 1
    cache.close()


def test_a_private_folder_is_made_and_removed(shards):
    store, entries = shards
    cache = ShardCache(lambda p: store, 1 << 30, directory="")
    folder = cache.directory
    assert folder is not None and os.path.isdir(folder)
    cache.load(PREFIX, entries[0])
    cache.close()
    assert not os.path.exists(folder)


def test_a_folder_left_by_an_earlier_process_is_emptied(shards, tmp_path):
    store, entries = shards
    folder = tmp_path / "kept"
    folder.mkdir()
    (folder / ".part-x").write_bytes(b"half")
    (folder / f"{entries[0].sha256}.safetensors").write_bytes(b"stale")
    cache = ShardCache(lambda p: store, 1 << 30, directory=folder)
    assert _files(cache) == set()
    assert len(cache.load(PREFIX, entries[0])) == ROWS and store.gets == 1
