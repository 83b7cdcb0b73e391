"""The scorer's shard cache: shards by content, LRU by bytes, safe across threads.

Two modes.  With a ``directory`` (the scorer's: ``RISE_SCORER_CACHE_DIR``, a private
temporary folder when empty) shards live in node-local files named by their sha256,
downloaded from the store once, verified against the manifest's sha256 as they are
written, made visible by an atomic rename, and opened memory-mapped (``rise.shard.
map_shard``): a scan reads the sketches from the page cache or the disk, so the index may
be larger than the machine's memory, and the files are evicted least recently used once
their bytes pass ``max_bytes`` (``RISE_SCORER_CACHE_BYTES``).  Memory per open shard is its
ids, norms and sums, not its sketches.  Without a directory, parsed shards are held in
memory under the same LRU (tests, embedded use).

Entries are keyed by (prefix, key, sha256): the sha256 is the manifest's, and the bytes
are verified against it when read, so a shard rewritten under the same key (an index
deleted and created again) is a different entry and never served stale.  Concurrent loads
of one shard read the store once; the others wait for that read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from rise.errors import Corrupt
from rise.manifest import ShardEntry
from rise.shard import ShardData, map_shard, parse_shard, sha256
from rise.store import Store

StoreFactory = Callable[[str], Store]
"""prefix -> the Store holding that index (``rise.datasets.open_store`` bound to settings)."""

CacheKey = tuple[str, str, str]

# Open stores kept per prefix (an S3 store holds a client and its connection pool).
MAX_STORES = 256


# Bytes per read when a shard is streamed from the store into the cache folder.
_COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class _Item:
    shard: ShardData
    nbytes: int  # in memory: stored size plus derived norms; on disk: the file's size
    scan_bytes: int  # bytes of sketches (or exact factors) a scan of the shard reads
    path: str | None = None  # the cached file (disk mode)


def _scan_bytes(sd: ShardData) -> int:
    if sd.rh is not None and sd.gh is not None:
        return sd.rh.nbytes + sd.gh.nbytes
    return sum(t.nbytes for f in sd.factors or [] for t in (f.h, f.g, f.w, f.r, f.idx)
               if t is not None)


class ShardCache:
    """Shards by (prefix, key, sha256), evicted least recently used by bytes.

    ``max_bytes`` <= 0 disables caching (every load reads the store).  A shard larger
    than ``max_bytes`` is served but not kept.  ``directory``: keep shard files there and
    memory-map them (module docstring); a folder it creates itself when ``directory`` is
    ``""``, removed by ``close``; ``None``: parsed shards in memory.

    A loaded sketch shard also holds its float64 row norms (rise.score.shard_dots), computed
    by its first scan and kept while it is cached (counted in memory mode: 16 bytes a row).
    """

    def __init__(self, store_factory: StoreFactory, max_bytes: int, metrics: Any | None = None,
                 service: str = "scorer", directory: str | os.PathLike | None = None) -> None:
        self._factory = store_factory
        self.max_bytes = int(max_bytes)
        self._own_dir = directory == ""
        self.directory: str | None = None
        if directory is not None:
            self.directory = tempfile.mkdtemp(prefix="rise-shards-") if self._own_dir \
                else str(directory)
            os.makedirs(self.directory, exist_ok=True)
            # Files of an earlier process are not counted: start empty.
            for name in os.listdir(self.directory):
                if name.endswith(".safetensors") or name.startswith(".part-"):
                    os.unlink(os.path.join(self.directory, name))
        self._metrics = metrics
        self._lock = threading.Lock()
        self._items: OrderedDict[CacheKey, _Item] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[CacheKey, Future[_Item]] = {}
        self._stores: OrderedDict[str, Store] = OrderedDict()
        self._read_counter = None
        if metrics is not None:
            # Children created up front so /metrics shows the series from the start.
            self._read_counter = metrics.storage_bytes_read_total.labels(service)
            metrics.scorer_cache_bytes.set(0)

    # -------------------------------------------------------------------- stores

    def store(self, prefix: str) -> Store:
        """The store of ``prefix``, opened once and reused."""
        with self._lock:
            s = self._stores.get(prefix)
            if s is not None:
                self._stores.move_to_end(prefix)
                return s
        s = self._factory(prefix)
        with self._lock:
            s = self._stores.setdefault(prefix, s)
            self._stores.move_to_end(prefix)
            while len(self._stores) > MAX_STORES:
                self._stores.popitem(last=False)
        return s

    # -------------------------------------------------------------------- shards

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._items

    def load(self, prefix: str, entry: ShardEntry, *, keep: bool = True,
             scan: bool = False) -> ShardData:
        """The parsed shard of manifest entry ``entry`` in the index at ``prefix``.

        ``keep``: insert it into the cache when read (False for a one-off sweep, such as
        the pool mean over other replicas' shards).  ``scan``: count it as scored.
        Raises Corrupt when the bytes do not match the entry's sha256, NotFound when the
        object is gone, StorageError when the store fails.
        """
        key: CacheKey = (prefix, entry.key, entry.sha256)
        owner = False
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            else:
                pending = self._inflight.get(key)
                if pending is None:
                    pending = self._inflight[key] = Future()
                    owner = True
                fut = pending
        if item is None:
            if owner:
                try:
                    item = self._read(prefix, entry)
                except BaseException as e:
                    with self._lock:
                        del self._inflight[key]
                    fut.set_exception(e)
                    raise
                with self._lock:
                    del self._inflight[key]
                    if keep:
                        self._insert(key, item)
                    else:
                        self._drop(item)
                fut.set_result(item)
            else:
                item = fut.result()
                if keep:
                    with self._lock:
                        self._insert(key, item)
        if scan and self._metrics is not None:
            self._metrics.scorer_shards_scanned_total.inc()
            self._metrics.scorer_bytes_scanned_total.inc(item.scan_bytes)
        return item.shard

    def loader(self, prefix: str, *, keep: bool = True, scan: bool = False
               ) -> Callable[[ShardEntry], ShardData]:
        """``load`` bound to a prefix: the ``load=`` argument of the rise.api functions."""
        return lambda entry: self.load(prefix, entry, keep=keep, scan=scan)

    def clear(self) -> None:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
            for item in items:
                self._drop(item)
            self._bytes = 0
            self._publish()

    def close(self) -> None:
        """Forget every shard; remove the cache folder when this cache made it."""
        self.clear()
        if self._own_dir and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _read(self, prefix: str, entry: ShardEntry) -> _Item:
        if self.directory is not None:
            return self._read_file(prefix, entry)
        store = self.store(prefix)
        data = store.get(entry.key)
        if self._read_counter is not None:
            self._read_counter.inc(len(data))
        if sha256(data) != entry.sha256:
            raise Corrupt(
                f"shard {entry.key} in {store.describe()} fails verification (sha256 "
                "differs from the manifest); run rise verify")
        sd = parse_shard(data)
        scan_bytes, nbytes = _scan_bytes(sd), len(data)
        if sd.rh is not None and sd.gh is not None:
            nbytes += 16 * len(sd)  # the float64 row norms of both channels
        return _Item(shard=sd, nbytes=nbytes, scan_bytes=scan_bytes)

    def _file(self, entry: ShardEntry) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"{entry.sha256}.safetensors")

    def _read_file(self, prefix: str, entry: ShardEntry) -> _Item:
        """Disk mode: the shard's file (downloaded and verified unless already there),
        memory-mapped.  The file is written to a temporary name and renamed, so a reader
        never sees half a file; a file whose content differs from its name is refused."""
        path = self._file(entry)
        for _ in range(2):
            if not os.path.exists(path):
                self._download(prefix, entry, path)
            try:
                sd = map_shard(path)
                break
            except FileNotFoundError:  # evicted between the check and the open: fetch again
                continue
        else:
            raise Corrupt(f"shard {entry.key} vanished from the scorer's cache twice")
        return _Item(shard=sd, nbytes=os.path.getsize(path), scan_bytes=_scan_bytes(sd),
                     path=path)

    def _download(self, prefix: str, entry: ShardEntry, path: str) -> None:
        """Write the shard into a temporary file, check its sha256, rename it in place."""
        store = self.store(prefix)
        data = store.get(entry.key)
        if self._read_counter is not None:
            self._read_counter.inc(len(data))
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self.directory)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                view = memoryview(data)
                for lo in range(0, len(view), _COPY_CHUNK):
                    chunk = view[lo:lo + _COPY_CHUNK]
                    digest.update(chunk)
                    f.write(chunk)
            del data, view
            if digest.hexdigest() != entry.sha256:
                raise Corrupt(
                    f"shard {entry.key} in {store.describe()} fails verification (sha256 "
                    "differs from the manifest); run rise verify")
            os.replace(tmp, path)
            tmp = ""
        finally:
            if tmp:
                os.unlink(tmp)

    def _insert(self, key: CacheKey, item: _Item) -> None:
        """Under the lock: add ``item`` (if it fits) and evict down to max_bytes."""
        if key in self._items:
            self._items.move_to_end(key)
            return
        if item.nbytes > self.max_bytes:
            self._drop(item)
            return
        self._items[key] = item
        self._bytes += item.nbytes
        while self._bytes > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
            self._drop(old)
        self._publish()

    def _drop(self, item: _Item) -> None:
        """Remove an evicted item's file (shards still being scanned keep their mapping:
        an unlinked file stays readable through it until it is closed)."""
        if item.path is not None and not any(i.path == item.path for i in self._items.values()):
            try:
                os.unlink(item.path)
            except FileNotFoundError:
                pass

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.scorer_cache_bytes.set(self._bytes)
