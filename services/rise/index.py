"""The index: immutable manifest generations over immutable, deterministic shards.

Layout inside a store (a folder, or a prefix of a bucket)::

    manifest-00000001.json          generation 1 (create-only)
    shards/g00000001/shard-000000.safetensors
    ...

Shard n of an ingest holds input records [nS, (n+1)S); its key is a pure function of
(generation, n) and its bytes a pure function of the data, the model and the config, so a
crashed ingest is resumed by rerunning it: shards already written and valid are skipped,
the others are (re)written, and the manifest -- written last, create-only -- is what makes
the generation exist.  Shards without a manifest are never trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rise import constants
from rise.config import SketchConfig
from rise.data import FieldMap
from rise.errors import AlreadyExists, Corrupt, InvalidInput, Mismatch, NotFound, RiseError
from rise.manifest import Manifest, ModelEntry, ShardEntry
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


def manifest_generations(store: Store) -> list[int]:
    gens = [constants.parse_manifest_key(k) for k in store.list(constants.MANIFEST_PREFIX)]
    return sorted(g for g in gens if g is not None)


def read_manifest(store: Store, generation: int) -> Manifest:
    key = constants.manifest_key(generation)
    return Manifest.parse(store.get(key), key)


def write_manifest(store: Store, manifest: Manifest) -> None:
    store.put(constants.manifest_key(manifest.generation), manifest.to_json(), create_only=True)


def _shards_present(store: Store, manifest: Manifest) -> str | None:
    """None if every shard of the manifest exists, else why not."""
    present = set(store.list(constants.SHARD_DIR + "/"))
    for s in manifest.shards:
        if s.key not in present:
            return f"shard {s.key} is missing"
    return None


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

    def shard(self, entry: ShardEntry) -> ShardData:
        data = self.store.get(entry.key)
        if sha256(data) != entry.sha256:
            raise Corrupt(
                f"shard {entry.key} in {self.store.describe()} fails verification "
                f"(sha256 differs from manifest generation {self.generation}); run rise verify"
            )
        return parse_shard(data)

    def shards(self) -> Iterator[ShardData]:
        for entry in self.manifest.shards:
            yield self.shard(entry)

    def live_ids(self) -> dict[str, str]:
        """Live id -> where it is ("index generation g record n")."""
        dead = self.tombstones
        out = {}
        for sd in self.shards():
            for i, rid in enumerate(sd.ids):
                if rid not in dead:
                    out[rid] = f"index generation {int(sd.ingest[i])} record {int(sd.record[i])}"
        return out

    @property
    def default_fields(self) -> FieldMap:
        """The first ingest's field map: the default of appends and queries."""
        return FieldMap(**self.manifest.first_fields.model_dump())

    def check_model(self, lm: ReadoutModel) -> None:
        check_model(self.manifest.model, lm)


def open_index(store: Store) -> Index:
    """The highest manifest generation whose shards are all present."""
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
        why = _shards_present(store, m)
        if why is None:
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
    """Manifest entry of a written shard, with the sha256 read back from the store."""
    data = store.get(key)
    return ShardEntry(key=key, generation=generation, shard=n, count=read_meta(data)["count"],
                      sha256=sha256(data), bytes=len(data))


# ------------------------------------------------------------------------ other changes


def delete(store: Store, ids: Sequence[str]) -> int:
    """Tombstone ``ids`` in a new generation; returns the new generation."""
    idx = open_index(store)
    live = idx.live_ids()
    unknown = [i for i in ids if i not in live]
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise NotFound(f"ids not live in the index: {', '.join(map(repr, unknown[:3]))}{more}")
    if len(set(ids)) != len(ids):
        raise InvalidInput("the ids file names an id twice")
    m = idx.manifest
    gen = idx.generation + 1
    write_manifest(store, Manifest.build(gen, model=m.model, config=m.config,
                                         ingests=m.ingests, shards=m.shards,
                                         tombstones=idx.tombstones | set(ids)))
    return gen


def compact(store: Store, *, shard_size: int | None = None,
            before_write: Callable[[], None] | None = None) -> int | None:
    """Rewrite live records into new shards and erase deleted data physically.

    Returns the new generation, or None when there is nothing to erase.  The new manifest
    is committed before anything old is deleted, so a crash at any point leaves a valid
    index; rerunning finishes the clean-up.
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
        if before_write is not None:
            before_write()
        store.put(key, data)
        entries.append(shard_entry(store, key, gen, n))
        pending, n_pending = [], 0

    for sd in idx.shards():
        rows = [i for i, rid in enumerate(sd.ids) if rid not in dead]
        while rows:
            take = rows[: size - n_pending]
            rows = rows[len(take):]
            pending.append((sd, take))
            n_pending += len(take)
            if n_pending == size:
                flush()
    if n_pending:
        flush()
    if before_write is not None:
        before_write()
    write_manifest(store, Manifest.build(gen, model=m.model, config=m.config,
                                         ingests=m.ingests, shards=entries, tombstones=[]))
    _delete_unreferenced(store, read_manifest(store, gen))
    return gen


def _delete_unreferenced(store: Store, manifest: Manifest) -> None:
    """Delete shards the current manifest does not use, and older manifests.

    Older manifests would point at erased shards; removing them keeps "the highest
    generation whose shards verify" equal to the current one.
    """
    keep = {s.key for s in manifest.shards}
    for key in store.list(constants.SHARD_DIR + "/"):
        if key not in keep:
            store.delete(key)
    for g in manifest_generations(store):
        if g < manifest.generation:
            store.delete(constants.manifest_key(g))


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
    """Read every shard of every manifest generation and check its sha256 and format."""
    gens = manifest_generations(store)
    if not gens:
        raise NotFound(f"no index at {store.describe()} (no manifest)")
    report = VerifyReport(current=None, generations={})
    checked: dict[str, str | None] = {}
    for g in reversed(gens):
        try:
            m = read_manifest(store, g)
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
    key = constants.manifest_key(m.generation)
    raw = src.get(key)
    if Manifest.parse(raw, key) != m:
        raise Corrupt(f"{key} in {src.describe()} changed during the copy")
    dst.put(key, raw, create_only=True)
    if dst.get(key) != raw:
        raise Corrupt(f"{key} read back from {dst.describe()} differs from what was written")
    return CopyReport(generation=m.generation, shards=total, copied=copied,
                      bytes=m.total_bytes + len(raw))


def _stored_sha256(store: Store, key: str) -> str | None:
    try:
        return sha256(store.get(key))
    except (NotFound, Corrupt):
        return None
