"""The index: immutable manifest generations over immutable, deterministic shards.

Layout inside a store (a folder, or a prefix of a bucket)::

    manifest-00000001.json          generation 1 (create-only): a manifest list
    meta/g00000001-shards-<h>.json  the shards generation 1 wrote (a shard list)
    meta/g00000002-deletes-<h>.json the ids generation 2 deleted (a delete file)
    shards/g00000001/shard-000000.safetensors
    ids/g00000001/shard-000000.json the ids, generations and record numbers of that shard
    ...

The manifest list names the shard lists and delete files by key and sha256 (format
version 3, ``rise.manifest``); a new generation reuses its predecessor's and adds at most
one of each, so what is written per generation does not grow with the index.  A
generation is resolved (its files read and checked) once per process and cached by the
sha256 of its manifest list.  Indexes of versions 1 and 2 (one manifest holding every
shard and tombstone, no id files) open, score and verify as before.

Shard n of an ingest holds input records [nS, (n+1)S); its key is a pure function of
(generation, n) and its bytes a pure function of the data, the model and the config, so a
crashed ingest is resumed by rerunning it: shards already written and valid are skipped,
the others are (re)written, and the manifest -- written last, create-only -- is what makes
the generation exist.  Shards without a manifest are never trusted.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from rise import constants
from rise.config import SketchConfig
from rise.data import FieldMap
from rise.errors import AlreadyExists, Corrupt, InvalidInput, Mismatch, NotFound, RiseError
from rise.manifest import (
    LIST_VERSION,
    DeleteEntry,
    DeleteFile,
    IngestEntry,
    Manifest,
    ManifestList,
    ModelEntry,
    PartEntry,
    ShardEntry,
    ShardList,
    parse_json_object,
    parse_model,
)
from rise.shard import ShardData, concat_rows, parse_shard, read_meta, serialize, sha256
from rise.store import Store


class ReadoutModel(Protocol):
    """What the index needs of a loaded model (``rise.model.LoadedModel``): its identity
    and its head's shape.  A protocol, so that this module never imports the model
    pipeline (the gateway and the scorer open indexes without torch models)."""

    @property
    def identity(self) -> Any: ...

    @property
    def head(self) -> Any: ...


# ----------------------------------------------------------------------------- manifests


IDS_DIR = "ids"
"""Per-shard id files: ``ids/g<generation>/shard-<n>.json``."""
META_DIR = "meta"
"""Shard lists and delete files of manifest lists (version 3)."""
INDEX_PREFIXES = (constants.MANIFEST_PREFIX, constants.SHARD_DIR + "/", IDS_DIR + "/",
                  META_DIR + "/")
"""Every key of an index starts with one of these."""
CACHED_GENERATIONS = 32
"""Resolved manifest generations a process keeps (by the sha256 of their lists)."""


def manifest_generations(store: Store) -> list[int]:
    gens = [constants.parse_manifest_key(k) for k in store.list(constants.MANIFEST_PREFIX)]
    return sorted(g for g in gens if g is not None)


_resolved: OrderedDict[tuple[str, int, str], Manifest] = OrderedDict()
_resolved_lock = threading.Lock()
_present: set[tuple[str, int, str]] = set()
"""Resolved generations whose shards and id files were all found once by ``open_index``
(a shard lost later is reported when it is read: every read checks its sha256)."""
_last_memo = threading.local()
"""The cache key of the manifest list this thread read last (None: an older manifest)."""


def read_manifest(store: Store, generation: int, *, cached: bool = True) -> Manifest:
    """Manifest generation ``generation``, resolved: a manifest list's shard lists and
    delete files are read, checked against their sha256 and cached (a list is immutable,
    so the cache is keyed by its bytes' hash; ``cached=False`` reads them again, as
    ``verify`` does); older manifests are parsed as they are."""
    key = constants.manifest_key(generation)
    data = store.get(key)
    raw = parse_json_object(data, key, "manifest")
    _last_memo.value = None
    if raw["format_version"] < LIST_VERSION:
        return Manifest.parse(data, key)
    memo = (store.describe(), generation, sha256(data))
    _last_memo.value = memo
    with _resolved_lock:
        hit = _resolved.get(memo) if cached else None
        if hit is not None:
            _resolved.move_to_end(memo)
            return hit
    ml = parse_model(ManifestList, raw, key, "manifest list")
    if ml.generation != generation:
        raise Corrupt(f"{key} holds generation {ml.generation}")
    shards: list[ShardEntry] = []
    for part in ml.parts:
        sl = _read_meta_file(store, part.key, part.sha256, ShardList, "shard list")
        if len(sl.shards) != part.shards or sum(e.count for e in sl.shards) != part.records:
            raise Corrupt(f"{part.key} does not hold the shards {key} says")
        shards += sl.shards
    dead: list[str] = []
    for d in ml.deletes:
        df = _read_meta_file(store, d.key, d.sha256, DeleteFile, "delete file")
        if len(df.ids) != d.count:
            raise Corrupt(f"{d.key} holds {len(df.ids)} ids, {key} says {d.count}")
        dead += df.ids
    try:
        m = ml.resolve(shards, dead)
    except ValueError as e:
        raise Corrupt(f"{key} does not resolve to a valid manifest: {e}") from None
    with _resolved_lock:
        _resolved[memo] = m
        while len(_resolved) > CACHED_GENERATIONS:
            gone, _ = _resolved.popitem(last=False)
            _present.discard(gone)
    return m


def _read_meta_file(store: Store, key: str, digest: str, cls: type[Any], what: str) -> Any:
    try:
        data = store.get(key)
    except NotFound:
        raise NotFound(f"{what} {key} is missing") from None
    if sha256(data) != digest:
        raise Corrupt(f"{what} {key} fails verification (sha256 differs from its manifest)")
    return parse_model(cls, parse_json_object(data, key, what), key, what)


def write_manifest(store: Store, manifest: Manifest) -> None:
    """Write a manifest of version 1 or 2 as one object (kept for tools and tests that
    build old-format indexes; the pipeline writes manifest lists: ``write_generation``)."""
    store.put(constants.manifest_key(manifest.generation), manifest.to_json(), create_only=True)


def _put_same(store: Store, key: str, data: bytes) -> None:
    """Create ``key`` holding ``data``; an object already there must hold the same bytes
    (keys of meta files carry their content's hash, so a rerun writes the same object)."""
    try:
        store.put(key, data, create_only=True)
    except AlreadyExists:
        if store.get(key) != data:
            raise Corrupt(f"{key} in {store.describe()} holds other bytes than its "
                          "name promises") from None


def _meta_json(obj: Any) -> bytes:
    return json.dumps(obj.model_dump(mode="json"), sort_keys=True, indent=1).encode()


def write_part(store: Store, generation: int, shards: Sequence[ShardEntry]) -> PartEntry:
    """The shard list of ``shards`` (written by ``generation``), put; its entry."""
    data = _meta_json(ShardList(format_version=LIST_VERSION, generation=generation,
                                shards=list(shards)))
    digest = sha256(data)
    key = f"{META_DIR}/g{generation:08d}-shards-{digest[:16]}.json"
    _put_same(store, key, data)
    return PartEntry(key=key, generation=generation, sha256=digest, shards=len(shards),
                     records=sum(s.count for s in shards), bytes=sum(s.bytes for s in shards))


def write_deletes(store: Store, generation: int, ids: Iterable[str]) -> DeleteEntry:
    """The delete file of ``ids`` (tombstoned by ``generation``), put; its entry."""
    dead = sorted(set(ids))
    data = _meta_json(DeleteFile(format_version=LIST_VERSION, generation=generation,
                                 ids=dead))
    digest = sha256(data)
    key = f"{META_DIR}/g{generation:08d}-deletes-{digest[:16]}.json"
    _put_same(store, key, data)
    return DeleteEntry(key=key, generation=generation, sha256=digest, count=len(dead))


def carried_files(store: Store, m: Manifest) -> tuple[list[PartEntry], list[DeleteEntry]]:
    """The shard lists and delete files of ``m`` for the next generation to reuse.  An
    older manifest (version 1 or 2) has none: its shards go into one shard list per run
    of shards of one generation, its tombstones into one delete file (written now)."""
    if m.format_version >= LIST_VERSION:
        return list(m.parts), list(m.deletes)
    parts: list[PartEntry] = []
    run: list[ShardEntry] = []
    for s in m.shards:
        if run and s.generation != run[-1].generation:
            parts.append(write_part(store, run[-1].generation, run))
            run = []
        run.append(s)
    if run:
        parts.append(write_part(store, run[-1].generation, run))
    deletes = [write_deletes(store, m.generation, m.tombstones)] if m.tombstones else []
    return parts, deletes


def write_generation(store: Store, generation: int, *, model: ModelEntry,
                     config: SketchConfig, ingests: list[IngestEntry],
                     parts: list[PartEntry], deletes: list[DeleteEntry],
                     before_write: Callable[[], None] | None = None) -> Manifest:
    """Commit generation ``generation``: its manifest list, create-only (AlreadyExists if
    another writer committed it first).  The shard lists and delete files must be in the
    store already.  Returns the resolved manifest."""
    ml = ManifestList.build(generation, model=model, config=config, ingests=ingests,
                            parts=parts, deletes=deletes)
    if before_write is not None:
        before_write()
    store.put(constants.manifest_key(generation), ml.to_json(), create_only=True)
    return read_manifest(store, generation)


def generation_keys(store: Store, generation: int) -> set[str]:
    """Every key generation ``generation`` uses: its manifest, its shard lists and delete
    files, its shards and their id files."""
    m = read_manifest(store, generation)
    keys = {constants.manifest_key(generation)}
    keys.update(p.key for p in m.parts)
    keys.update(d.key for d in m.deletes)
    for s in m.shards:
        keys.add(s.key)
        if s.ids_key is not None:
            keys.add(s.ids_key)
    return keys


def _shards_present(store: Store, manifest: Manifest) -> str | None:
    """None if every shard (and id file) of the manifest exists, else why not."""
    present = set(store.list(constants.SHARD_DIR + "/"))
    if any(s.ids_key is not None for s in manifest.shards):
        present.update(store.list(IDS_DIR + "/"))
    for s in manifest.shards:
        if s.key not in present:
            return f"shard {s.key} is missing"
        if s.ids_key is not None and s.ids_key not in present:
            return f"id file {s.ids_key} is missing"
    return None


# ---------------------------------------------------------------------------- id files


@dataclass(frozen=True)
class ShardIds:
    """The ids of one shard with each record's ingest generation and record number."""

    ids: list[str]
    ingest: list[int]
    record: list[int]


def ids_key(shard_key: str) -> str:
    """Key of the id file of the shard at ``shard_key``."""
    rest = shard_key.removeprefix(constants.SHARD_DIR + "/")
    return f"{IDS_DIR}/{rest.removesuffix(constants.SHARD_SUFFIX)}.json"


def ids_bytes(ids: ShardIds) -> bytes:
    """An id file's bytes (deterministic: sorted keys, no timestamps)."""
    return json.dumps({"format_version": LIST_VERSION, "ids": ids.ids, "ingest": ids.ingest,
                       "record": ids.record}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def parse_ids(data: bytes, where: str) -> ShardIds:
    raw = parse_json_object(data, where, "id file")
    ids, ingest, record = raw.get("ids"), raw.get("ingest"), raw.get("record")
    if not (isinstance(ids, list) and isinstance(ingest, list) and isinstance(record, list)
            and len(ids) == len(ingest) == len(record)
            and all(isinstance(i, str) for i in ids)):
        raise Corrupt(f"{where} is not a valid id file")
    return ShardIds(ids, [int(g) for g in ingest], [int(r) for r in record])


_ID_TENSORS = {"ids_utf8": np.uint8, "ids_offsets": np.int64, "ingest": np.int64,
               "record": np.int64}


def shard_ids(data: bytes) -> ShardIds:
    """The ids, generations and record numbers of shard bytes, read from the safetensors
    header's offsets without decoding the sketches."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        t = {}
        for name, dt in _ID_TENSORS.items():
            lo, hi = (8 + n + int(v) for v in header[name]["data_offsets"])
            if not 8 + n <= lo <= hi <= len(data):
                raise ValueError(f"tensor {name} out of range")
            t[name] = np.frombuffer(data, dtype=dt, count=(hi - lo) // np.dtype(dt).itemsize,
                                    offset=lo)
        raw = t["ids_utf8"].tobytes()
        off = t["ids_offsets"].tolist()
        ids = [raw[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise Corrupt(f"malformed shard: {e}") from None
    return ShardIds(ids, t["ingest"].tolist(), t["record"].tolist())


def model_entry(lm: ReadoutModel) -> ModelEntry:
    """The manifest's ``model`` entry of a loaded model: identity plus the head's shape."""
    return ModelEntry(**lm.identity.to_dict(), vocab=lm.head.vocab, hidden=lm.head.hidden)


def check_model(built_with: ModelEntry, lm: ReadoutModel) -> None:
    """Mismatch naming the first identity hash in which ``lm`` differs from ``built_with``."""
    mine = model_entry(lm)
    key = built_with.differs_from(mine)
    if key is not None:
        field = f"{key}_sha256"
        raise Mismatch(
            f"model mismatch: index was built with {built_with.name!r} but the query "
            f"model {mine.name!r} differs in {key} "
            f"({(getattr(built_with, field) or 'none')[:12]} vs "
            f"{(getattr(mine, field) or 'none')[:12]})")


@dataclass
class Index:
    """An opened index: its store and current manifest.  Shards are read on demand and
    verified against the manifest's sha256 as they are read."""

    store: Store
    manifest: Manifest

    @property
    def generation(self) -> int:
        return self.manifest.generation

    @property
    def config(self) -> SketchConfig:
        return self.manifest.config

    @property
    def tombstones(self) -> frozenset[str]:
        return self.manifest.tombstone_set()

    @property
    def live_count(self) -> int:
        return self.manifest.live_count

    def _verified(self, entry: ShardEntry) -> bytes:
        data = self.store.get(entry.key)
        if sha256(data) != entry.sha256:
            raise Corrupt(
                f"shard {entry.key} in {self.store.describe()} fails verification "
                f"(sha256 differs from manifest generation {self.generation}); run rise verify"
            )
        return data

    def shard(self, entry: ShardEntry) -> ShardData:
        return parse_shard(self._verified(entry))

    def shards(self) -> Iterator[ShardData]:
        for entry in self.manifest.shards:
            yield self.shard(entry)

    def ids(self, entry: ShardEntry) -> ShardIds:
        """The ids of one shard: its id file (checked against the manifest's sha256), or
        for a shard of an older index without one, the shard itself."""
        if entry.ids_key is None or entry.ids_sha256 is None:
            return shard_ids(self._verified(entry))
        try:
            data = self.store.get(entry.ids_key)
        except NotFound:
            raise Corrupt(f"id file {entry.ids_key} in {self.store.describe()} is missing; "
                          "run rise verify") from None
        if sha256(data) != entry.ids_sha256:
            raise Corrupt(f"id file {entry.ids_key} in {self.store.describe()} fails "
                          f"verification (sha256 differs from manifest generation "
                          f"{self.generation}); run rise verify")
        got = parse_ids(data, entry.ids_key)
        if len(got.ids) != entry.count:
            raise Corrupt(f"id file {entry.ids_key} holds {len(got.ids)} ids, the manifest "
                          f"says {entry.count}")
        return got

    def iter_ids(self) -> Iterator[tuple[str, int, int]]:
        """(id, ingest generation, record number) of every row, live or not, shard by
        shard (one shard's ids in memory at a time)."""
        for entry in self.manifest.shards:
            got = self.ids(entry)
            yield from zip(got.ids, got.ingest, got.record, strict=True)

    def live_ids(self) -> dict[str, str]:
        """Live id -> where it is ("index generation g record n"), from the id files."""
        dead = self.tombstones
        return {rid: f"index generation {g} record {n}"
                for rid, g, n in self.iter_ids() if rid not in dead}

    def where(self, wanted: Iterable[str]) -> dict[str, str]:
        """Of ``wanted``, the live ids -> where they are (``live_ids`` restricted to a few
        ids, without holding every id of the index)."""
        want = set(wanted)
        dead = self.tombstones
        return {rid: f"index generation {g} record {n}"
                for rid, g, n in self.iter_ids() if rid in want and rid not in dead}

    @property
    def default_fields(self) -> FieldMap:
        """The first ingest's field map: the default of appends and queries."""
        return FieldMap(**self.manifest.first_fields.model_dump())

    def check_model(self, lm: ReadoutModel) -> None:
        check_model(self.manifest.model, lm)


def open_index(store: Store) -> Index:
    """The highest manifest generation whose shards are all present.  A manifest list
    (version 3) is resolved and its shards listed once per process; later opens of the
    same generation read only the list of manifests and the newest manifest list."""
    gens = manifest_generations(store)
    if not gens:
        raise NotFound(f"no index at {store.describe()} (no manifest)")
    problems = []
    for g in reversed(gens):
        try:
            m = read_manifest(store, g)
        except RiseError as e:
            problems.append(str(e))
            continue
        memo = getattr(_last_memo, "value", None)
        if memo is not None and memo in _present:
            return Index(store, m)  # listed once per generation and process
        why = _shards_present(store, m)
        if why is None:
            if memo is not None:
                with _resolved_lock:
                    if memo in _resolved:
                        _present.add(memo)
            return Index(store, m)
        problems.append(f"generation {g}: {why}")
    raise Corrupt(f"no generation of the index at {store.describe()} verifies: {problems[0]}")


# ------------------------------------------------------------------------------- shards


def shard_is_valid(store: Store, key: str, meta: dict[str, Any]) -> bool:
    """A shard already at ``key`` counts only if it parses and describes this exact work."""
    if not store.exists(key):
        return False
    try:
        data = store.get(key)
        got = read_meta(data)
        parse_shard(data)
    except RiseError:
        return False
    return all(got.get(k) == v for k, v in meta.items())


def shard_entry(store: Store, key: str, generation: int, n: int) -> ShardEntry:
    """Manifest entry of a written shard, with the sha256 read back from the store; its
    id file is written (from the shard's own ids) and named."""
    return shard_entry_meta(store, key, generation, n)[0]


def shard_entry_meta(store: Store, key: str, generation: int, n: int
                     ) -> tuple[ShardEntry, dict[str, Any]]:
    """``shard_entry`` and the shard's metadata."""
    data = store.get(key)
    return _entry_of(store, data, key, generation, n), read_meta(data)


def _entry_of(store: Store, data: bytes, key: str, generation: int, n: int) -> ShardEntry:
    id_data = ids_bytes(shard_ids(data))
    id_key = ids_key(key)
    store.put(id_key, id_data)
    return ShardEntry(key=key, generation=generation, shard=n, count=read_meta(data)["count"],
                      sha256=sha256(data), bytes=len(data), ids_key=id_key,
                      ids_sha256=sha256(id_data))


# ------------------------------------------------------------------------ other changes


def delete(store: Store, ids: Sequence[str]) -> int:
    """Tombstone ``ids`` in a new generation; returns the new generation.  The ids are
    looked up in the id files (never the shards) and written as one delete file."""
    if len(set(ids)) != len(ids):
        idx = open_index(store)
        unknown = [i for i in dict.fromkeys(ids) if i not in idx.where(ids)]
        if unknown:
            _unknown(unknown)
        raise InvalidInput("the ids file names an id twice")
    idx = open_index(store)
    live = idx.where(ids)
    unknown = [i for i in ids if i not in live]
    if unknown:
        _unknown(unknown)
    m = idx.manifest
    gen = idx.generation + 1
    parts, deletes = carried_files(store, m)
    deletes.append(write_deletes(store, gen, ids))
    write_generation(store, gen, model=m.model, config=m.config, ingests=m.ingests,
                     parts=parts, deletes=deletes)
    return gen


def _unknown(unknown: list[str]) -> None:
    more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
    raise NotFound(f"ids not live in the index: {', '.join(map(repr, unknown[:3]))}{more}")


def _take_rows(sd: ShardData, rows: list[int]) -> ShardData:
    """A shard of only ``rows`` of ``sd`` (copies), so the rest of ``sd`` can be freed."""
    sel = torch.tensor(rows, dtype=torch.int64)
    out = ShardData(meta=sd.meta, ids=[sd.ids[i] for i in rows], ingest=sd.ingest[sel],
                    record=sd.record[sel], token_count=sd.token_count[sel],
                    norms=sd.norms[sel])
    if sd.rh is not None and sd.gh is not None:
        out.rh, out.gh = sd.rh[sel].clone(), sd.gh[sel].clone()
    else:
        out.factors = [(sd.factors or [])[i] for i in rows]
    return out


def compact(store: Store, *, shard_size: int | None = None,
            before_write: Callable[[], None] | None = None) -> int | None:
    """Rewrite live records into new shards and erase deleted data physically.

    Returns the new generation, or None when there is nothing to erase.  The new manifest
    is committed before anything old is deleted, so a crash at any point leaves a valid
    index; rerunning finishes the clean-up.  Streams: one old shard is read at a time and
    only its live rows are kept until a new shard is full, so memory stays within about
    two shards whatever the size of the index.
    """
    idx = open_index(store)
    m = idx.manifest
    if not m.tombstones:
        _delete_unreferenced(store, m)
        return None
    gen = idx.generation + 1
    size = shard_size or m.shard_size
    dead = idx.tombstones
    entries: list[ShardEntry] = []
    pending: list[tuple[ShardData, list[int]]] = []
    n_pending = 0

    def flush() -> None:
        nonlocal pending, n_pending
        n = len(entries)
        meta = {"kind": "compact", "generation": gen, "shard": n,
                "config_sha256": m.config_sha256, "head_sha256": m.model.head_sha256,
                "vocab": m.model.vocab}
        key = constants.shard_key(gen, n)
        data = serialize(meta, concat_rows(pending))
        pending, n_pending = [], 0
        if before_write is not None:
            before_write()
        store.put(key, data)
        entries.append(_entry_of(store, data, key, gen, n))

    for entry in m.shards:
        if all(rid in dead for rid in idx.ids(entry).ids):
            continue  # nothing live: the shard need not even be read
        sd = idx.shard(entry)
        rows = [i for i, rid in enumerate(sd.ids) if rid not in dead]
        while rows:
            take = rows[: size - n_pending]
            rows = rows[len(take):]
            part = _take_rows(sd, take)
            pending.append((part, list(range(len(take)))))
            n_pending += len(take)
            if n_pending == size:
                flush()
        del sd
    if n_pending:
        flush()
    parts = [write_part(store, gen, entries)] if entries else []
    write_generation(store, gen, model=m.model, config=m.config, ingests=m.ingests,
                     parts=parts, deletes=[], before_write=before_write)
    _delete_unreferenced(store, read_manifest(store, gen))
    return gen


def _delete_unreferenced(store: Store, manifest: Manifest) -> None:
    """Delete shards, id files, shard lists and delete files the current manifest does
    not use, and older manifests.

    Older manifests would point at erased shards; removing them keeps "the highest
    generation whose shards verify" equal to the current one.
    """
    keep = {s.key for s in manifest.shards}
    keep.update(s.ids_key for s in manifest.shards if s.ids_key is not None)
    keep.update(p.key for p in manifest.parts)
    keep.update(d.key for d in manifest.deletes)
    for prefix in (constants.SHARD_DIR + "/", IDS_DIR + "/", META_DIR + "/"):
        for key in store.list(prefix):
            if key not in keep:
                store.delete(key)
    for g in manifest_generations(store):
        if g < manifest.generation:
            store.delete(constants.manifest_key(g))


def discard_generation(store: Store, generation: int) -> int:
    """Delete what an ingest of ``generation`` wrote before it failed (its shards, id files
    and shard list), unless that generation was committed; returns the objects deleted.
    A shard task that finds a bad record (tokenising happens there) fails the job after
    other shards may have been written: nothing of a failed job stays behind."""
    if generation in manifest_generations(store):
        return 0
    gone = 0
    for prefix in (f"{constants.SHARD_DIR}/g{generation:08d}/", f"{IDS_DIR}/g{generation:08d}/",
                   f"{META_DIR}/g{generation:08d}-"):
        for key in store.list(prefix):
            store.delete(key)
            gone += 1
    return gone


@dataclass
class VerifyReport:
    current: int | None  # highest generation whose shards all verify
    generations: dict[int, str]  # generation -> "ok" or the problem
    shards_checked: int = 0

    @property
    def latest(self) -> int:
        return max(self.generations)

    @property
    def ok(self) -> bool:
        """True only when the newest generation verifies: an older good generation does
        not make a damaged newest one healthy."""
        return self.generations.get(self.latest) == "ok"


def verify(store: Store) -> VerifyReport:
    """Read every shard of every manifest generation and check its sha256 and format (and
    its id file against the shard's own ids); a manifest list's shard lists and delete
    files are checked as they are read.  One shard is in memory at a time; each is read
    once however many generations use it."""
    gens = manifest_generations(store)
    if not gens:
        raise NotFound(f"no index at {store.describe()} (no manifest)")
    report = VerifyReport(current=None, generations={})
    checked: dict[str, str | None] = {}
    for g in reversed(gens):
        try:
            m = read_manifest(store, g, cached=False)
            problem = None
            for s in m.shards:
                if s.key not in checked:
                    checked[s.key] = _check_shard(store, s)
                problem = problem or checked[s.key]
        except RiseError as e:
            problem = str(e)
        report.generations[g] = problem or "ok"
        if problem is None and report.current is None:
            report.current = g
    report.shards_checked = len(checked)
    return report


def _check_shard(store: Store, entry: ShardEntry) -> str | None:
    try:
        data = store.get(entry.key)
    except NotFound:
        return f"shard {entry.key} is missing"
    if sha256(data) != entry.sha256:
        return f"shard {entry.key} sha256 differs from the manifest"
    try:
        sd = parse_shard(data)
    except Corrupt as e:
        return f"shard {entry.key}: {e}"
    if len(sd) != entry.count:
        return f"shard {entry.key} holds {len(sd)} records, manifest says {entry.count}"
    if entry.ids_key is not None:
        try:
            id_data = store.get(entry.ids_key)
        except NotFound:
            return f"id file {entry.ids_key} is missing"
        if sha256(id_data) != entry.ids_sha256:
            return f"id file {entry.ids_key} sha256 differs from the manifest"
        try:
            got = parse_ids(id_data, entry.ids_key)
        except RiseError as e:
            return str(e)
        if got != ShardIds(sd.ids, sd.ingest.tolist(), sd.record.tolist()):
            return f"id file {entry.ids_key} differs from the ids of shard {entry.key}"
    return None


# ------------------------------------------------------------------------------ copying


@dataclass
class CopyReport:
    generation: int
    shards: int  # shards of the copied generation
    copied: int  # shards written (the others were already there with the right sha256)
    bytes: int  # bytes of the generation's shards and manifest


def copy_index(src: Store, dst: Store,
               progress: Callable[[int, int], None] | None = None) -> CopyReport:
    """Copy the current generation of the index in ``src`` into ``dst``, verified by sha256.

    Shards first, each read back from ``dst`` and checked against the manifest's sha256,
    then the manifest, create-only and last: until it is written ``dst`` holds no index
    (``open_index`` finds no manifest), so a copy that fails half-way leaves nothing a
    reader would trust, and rerunning it skips the shards already there and verified.
    ``dst`` must hold no manifest yet (AlreadyExists).  ``progress(shards done, total)``
    after each shard.  Datasets stay where the manifest's ingests point (results that
    return texts read them from there).
    """
    idx = open_index(src)
    m = idx.manifest
    if manifest_generations(dst):
        raise AlreadyExists(f"{dst.describe()} already holds an index; copy into an empty "
                            "place (or drop that index first)")
    present = set(dst.list(constants.SHARD_DIR + "/"))
    copied, total = 0, len(m.shards)
    for n, entry in enumerate(m.shards, 1):
        if not (entry.key in present and _stored_sha256(dst, entry.key) == entry.sha256):
            data = src.get(entry.key)
            if sha256(data) != entry.sha256:
                raise Corrupt(f"shard {entry.key} in {src.describe()} fails verification "
                              f"(sha256 differs from manifest generation {m.generation}); "
                              "nothing was made visible at the destination")
            dst.put(entry.key, data)
            if _stored_sha256(dst, entry.key) != entry.sha256:
                raise Corrupt(f"shard {entry.key} read back from {dst.describe()} differs "
                              "from what was written; nothing was made visible there")
            copied += 1
        if progress is not None:
            progress(n, total)
    # The small files of a manifest list (id files, shard lists, delete files) next.
    small = [(s.ids_key, s.ids_sha256) for s in m.shards if s.ids_key and s.ids_sha256]
    small += [(p.key, p.sha256) for p in m.parts] + [(d.key, d.sha256) for d in m.deletes]
    extra = 0  # their bytes
    for key, digest in small:
        try:
            there: bytes | None = dst.get(key)
        except (NotFound, Corrupt):
            there = None
        if there is not None and sha256(there) == digest:
            extra += len(there)
            continue
        data = src.get(key)
        if sha256(data) != digest:
            raise Corrupt(f"{key} in {src.describe()} fails verification; nothing was made "
                          "visible at the destination")
        dst.put(key, data)
        if _stored_sha256(dst, key) != digest:
            raise Corrupt(f"{key} read back from {dst.describe()} differs from what was "
                          "written; nothing was made visible there")
        extra += len(data)
    key = constants.manifest_key(m.generation)
    raw = src.get(key)
    if read_manifest(src, m.generation) != m:
        raise Corrupt(f"{key} in {src.describe()} changed during the copy")
    dst.put(key, raw, create_only=True)
    if dst.get(key) != raw:
        raise Corrupt(f"{key} read back from {dst.describe()} differs from what was written")
    return CopyReport(generation=m.generation, shards=total, copied=copied,
                      bytes=m.total_bytes + len(raw) + extra)


def _stored_sha256(store: Store, key: str) -> str | None:
    try:
        return sha256(store.get(key))
    except (NotFound, Corrupt):
        return None
