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

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rise import __version__, constants, exact
from rise.config import SketchConfig
from rise.data import Encoded, FieldMap, Record, check_unique_ids, encode_record, file_sha256
from rise.errors import (
    AlreadyExists,
    BudgetExceeded,
    Corrupt,
    InvalidInput,
    Mismatch,
    NotFound,
    RiseError,
)
from rise.featurize import CancelFn, ProgressFn, featurize
from rise.model import LoadedModel
from rise.shard import ShardData, build_shard, parse_shard, read_meta, sha256
from rise.store import Store

# ----------------------------------------------------------------------------- manifests


def manifest_generations(store: Store) -> list[int]:
    gens = [constants.parse_manifest_key(k) for k in store.list(constants.MANIFEST_PREFIX)]
    return sorted(g for g in gens if g is not None)


def read_manifest(store: Store, generation: int) -> dict[str, Any]:
    key = constants.manifest_key(generation)
    try:
        m = json.loads(store.get(key))
    except json.JSONDecodeError as e:
        raise Corrupt(f"{key} in {store.describe()} is not valid JSON: {e}") from None
    if m.get("format_version") != constants.FORMAT_VERSION:
        raise Corrupt(
            f"{key} has format version {m.get('format_version')}; this rise reads "
            f"{constants.FORMAT_VERSION}"
        )
    return m


def write_manifest(store: Store, manifest: dict[str, Any]) -> None:
    data = json.dumps(manifest, sort_keys=True, indent=1).encode()
    store.put(constants.manifest_key(manifest["generation"]), data, create_only=True)


def _shards_present(store: Store, manifest: dict[str, Any]) -> str | None:
    """None if every shard of the manifest exists with its recorded size, else why not."""
    present = set(store.list(constants.SHARD_DIR + "/"))
    for s in manifest["shards"]:
        if s["key"] not in present:
            return f"shard {s['key']} is missing"
    return None


@dataclass
class Index:
    """An opened index: its store and current manifest.  Shards are read on demand and
    verified against the manifest's sha256 as they are read."""

    store: Store
    manifest: dict[str, Any]

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def config(self) -> SketchConfig:
        return SketchConfig(**self.manifest["config"])

    @property
    def tombstones(self) -> set[str]:
        return set(self.manifest["tombstones"])

    @property
    def live_count(self) -> int:
        return int(self.manifest["live_count"])

    def shard(self, entry: dict[str, Any]) -> ShardData:
        data = self.store.get(entry["key"])
        if sha256(data) != entry["sha256"]:
            raise Corrupt(
                f"shard {entry['key']} in {self.store.describe()} fails verification "
                f"(sha256 differs from manifest generation {self.generation}); run rise verify"
            )
        return parse_shard(data)

    def shards(self) -> Iterator[ShardData]:
        for entry in self.manifest["shards"]:
            yield self.shard(entry)

    def live_ids(self) -> dict[str, str]:
        """Live id -> where it is ("generation g record n")."""
        dead = self.tombstones
        out = {}
        for sd in self.shards():
            for i, rid in enumerate(sd.ids):
                if rid not in dead:
                    out[rid] = f"index generation {int(sd.ingest[i])} record {int(sd.record[i])}"
        return out

    def check_model(self, lm: LoadedModel) -> None:
        lm.identity.check_same(self.manifest["model"])


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


# ------------------------------------------------------------------------------- ingest


@dataclass
class IngestPlan:
    """Everything a shard task needs besides the model: JSON-able, fixed before any work."""

    generation: int
    dataset_uri: str
    dataset_sha256: str
    fields: dict[str, Any]
    config: dict[str, Any]
    model: dict[str, Any]
    n_records: int
    shard_size: int

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_records / self.shard_size)

    def shard_range(self, n: int) -> range:
        return range(n * self.shard_size, min((n + 1) * self.shard_size, self.n_records))

    def shard_meta(self, n: int) -> dict[str, Any]:
        r = self.shard_range(n)
        return {
            "kind": "ingest", "generation": self.generation, "shard": n,
            "dataset_sha256": self.dataset_sha256, "start": r.start, "stop": r.stop,
            "config_sha256": SketchConfig(**self.config).sha256(),
            "head_sha256": self.model["head_sha256"],
            "vocab": self.model.get("vocab"),
        }

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IngestPlan:
        return cls(**d)


@dataclass
class IngestSummary:
    generation: int
    records: int
    tokens: int = 0
    truncated: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    exact_bytes_estimate: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def encode_all(records: Sequence[Record], lm: LoadedModel, config: SketchConfig,
               fields: FieldMap) -> list[Encoded]:
    return [encode_record(r, lm.tokenizer, config.max_length, fields.chat_template)
            for r in records]


def exact_bytes(encoded: Sequence[Encoded], config: SketchConfig, vocab: int, hidden: int) -> int:
    """Storage of per-token factors: h, g, w and the dense or sparse residual, 8 bytes each."""
    per_token = 2 * hidden + 1 + (vocab if config.topk is None else 3 * (config.topk + 1))
    return sum(e.n_supervised for e in encoded) * per_token * 8


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


def sketch_shard(lm: LoadedModel, plan: IngestPlan, n: int, records: Sequence[Record],
                 encoded: Sequence[Encoded], *, batch_size: int,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> bytes:
    """Bytes of shard ``n`` of ``plan`` (records/encoded are that shard's slice)."""
    config = SketchConfig(**plan.config)
    feats = featurize(lm, encoded, config, batch_size=batch_size, progress=progress,
                      cancel=cancel)
    norms = None if config.sketched else exact.norms(feats.factors or [], lm.head.vocab)
    return build_shard(
        plan.shard_meta(n), [r.id for r in records], [plan.generation] * len(records),
        [r.number for r in records], feats, config.storage_dtype, norms,
    )


def run_ingest(store: Store, lm: LoadedModel, plan: IngestPlan, records: Sequence[Record],
               encoded: Sequence[Encoded], *, batch_size: int,
               progress: ProgressFn | None = None, cancel: CancelFn | None = None,
               summary: IngestSummary) -> list[dict[str, Any]]:
    """Write every shard of the plan that is not already there; return manifest entries."""
    entries = []
    for n in range(plan.n_shards):
        key = constants.shard_key(plan.generation, n)
        rng = plan.shard_range(n)
        if shard_is_valid(store, key, plan.shard_meta(n)):
            summary.shards_skipped += 1
            if progress is not None:
                progress(len(rng), sum(encoded[i].n_supervised for i in rng))
        else:
            data = sketch_shard(lm, plan, n, records[rng.start : rng.stop],
                                encoded[rng.start : rng.stop], batch_size=batch_size,
                                progress=progress, cancel=cancel)
            store.put(key, data)
            summary.shards_written += 1
        entries.append(shard_entry(store, key, plan.generation, n))
    return entries


def shard_entry(store: Store, key: str, generation: int, n: int) -> dict[str, Any]:
    """Manifest entry of a written shard, with the sha256 read back from the store."""
    data = store.get(key)
    return {"key": key, "generation": generation, "shard": n, "count": read_meta(data)["count"],
            "sha256": sha256(data), "bytes": len(data)}


def ingest_entry(plan: IngestPlan, truncated: int) -> dict[str, Any]:
    """The manifest's ``ingests`` entry of a plan."""
    return {"generation": plan.generation, "dataset_uri": plan.dataset_uri,
            "dataset_sha256": plan.dataset_sha256, "fields": plan.fields,
            "records": plan.n_records, "truncated": truncated,
            "shard_size": plan.shard_size}


def model_entry(lm: LoadedModel) -> dict[str, Any]:
    """The manifest's ``model`` entry: identity plus the head's shape."""
    return dict(lm.identity.to_dict(), vocab=lm.head.vocab, hidden=lm.head.hidden)


def new_manifest(generation: int, *, model: dict, config: SketchConfig, ingests: list,
                 shards: list, tombstones: list[str]) -> dict[str, Any]:
    live = sum(s["count"] for s in shards) - len(tombstones)
    return {
        "format_version": constants.FORMAT_VERSION, "generation": generation,
        "tool_version": f"rise {__version__}", "model": model, "config": config.to_dict(),
        "config_sha256": config.sha256(), "ingests": ingests, "shards": shards,
        "tombstones": sorted(tombstones), "live_count": live,
    }


def _prepare(lm: LoadedModel, data: str | os.PathLike, fields: FieldMap, config: SketchConfig,
             generation: int, shard_size: int, existing: dict[str, str] | None,
             exact_budget: int) -> tuple[IngestPlan, list[Record], list[Encoded], IngestSummary]:
    from rise.data import read_records

    records = read_records(data, fields)
    if not records:
        raise InvalidInput(f"{data}: no records")
    check_unique_ids(records, existing)
    encoded = encode_all(records, lm, config, fields)
    summary = IngestSummary(generation=generation, records=len(records),
                            tokens=sum(e.n_supervised for e in encoded),
                            truncated=sum(e.truncated for e in encoded))
    if not config.sketched:
        est = exact_bytes(encoded, config, lm.head.vocab, lm.head.hidden)
        summary.exact_bytes_estimate = est
        if est > exact_budget:
            raise BudgetExceeded(
                f"{config.mode} mode would store about {est / 2**20:.1f} MiB of per-token "
                f"factors, over the budget of {exact_budget / 2**20:.1f} MiB; index fewer "
                "records or raise --exact-budget"
            )
    if shard_size < 1:
        raise InvalidInput("shard size must be >= 1")
    plan = IngestPlan(
        generation=generation, dataset_uri=os.path.abspath(data),
        dataset_sha256=file_sha256(data), fields=fields.to_dict(), config=config.to_dict(),
        model=model_entry(lm), n_records=len(records), shard_size=shard_size,
    )
    return plan, records, encoded, summary


def create_index(store: Store, lm: LoadedModel, data: str | os.PathLike, fields: FieldMap,
                 config: SketchConfig, *, shard_size: int = constants.DEFAULT_SHARD_SIZE,
                 batch_size: int = constants.DEFAULT_BATCH_SIZE,
                 exact_budget: int = constants.DEFAULT_EXACT_BUDGET_BYTES,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 on_plan: Callable[[IngestPlan, IngestSummary], None] | None = None,
                 ) -> IngestSummary:
    """Index ``data`` into an empty store (or finish a crashed run of the same command)."""
    gens = manifest_generations(store)
    if gens:
        m = read_manifest(store, gens[-1])
        raise AlreadyExists(
            f"an index already exists at {store.describe()} (generation {m['generation']}, "
            f"{m['live_count']} live examples); use rise append to add data"
        )
    plan, records, encoded, summary = _prepare(lm, data, fields, config, 1, shard_size, None,
                                               exact_budget)
    if on_plan is not None:
        on_plan(plan, summary)
    shards = run_ingest(store, lm, plan, records, encoded, batch_size=batch_size,
                        progress=progress, cancel=cancel, summary=summary)
    write_manifest(store, new_manifest(1, model=plan.model, config=config,
                                       ingests=[ingest_entry(plan, summary.truncated)], shards=shards,
                                       tombstones=[]))
    return summary


def append(store: Store, lm: LoadedModel, data: str | os.PathLike, fields: FieldMap | None = None,
           *, batch_size: int = constants.DEFAULT_BATCH_SIZE,
           exact_budget: int = constants.DEFAULT_EXACT_BUDGET_BYTES,
           progress: ProgressFn | None = None, cancel: CancelFn | None = None,
           on_plan: Callable[[IngestPlan, IngestSummary], None] | None = None) -> IngestSummary:
    """Add ``data`` as a new ingest generation; ids must not clash with live ids."""
    idx = open_index(store)
    idx.check_model(lm)
    if fields is None:
        fields = FieldMap.from_dict(idx.manifest["ingests"][0]["fields"])
    gen = idx.generation + 1
    shard_size = idx.manifest["ingests"][0]["shard_size"]
    # A tombstoned id still has a row in some shard until compaction: reusing it now would
    # make the new record share the old one's tombstone.
    taken = idx.live_ids()
    taken.update({t: "a deleted id not yet compacted (run rise compact first)"
                  for t in idx.tombstones})
    plan, records, encoded, summary = _prepare(lm, data, fields, idx.config, gen, shard_size,
                                               taken, exact_budget)
    if on_plan is not None:
        on_plan(plan, summary)
    shards = run_ingest(store, lm, plan, records, encoded, batch_size=batch_size,
                        progress=progress, cancel=cancel, summary=summary)
    m = idx.manifest
    write_manifest(store, new_manifest(
        gen, model=m["model"], config=idx.config,
        ingests=m["ingests"] + [ingest_entry(plan, summary.truncated)],
        shards=m["shards"] + shards, tombstones=m["tombstones"]))
    return summary


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
    write_manifest(store, new_manifest(
        gen, model=m["model"], config=idx.config, ingests=m["ingests"], shards=m["shards"],
        tombstones=sorted(set(m["tombstones"]) | set(ids))))
    return gen


def compact(store: Store, *, shard_size: int | None = None) -> int | None:
    """Rewrite live records into new shards and erase deleted data physically.

    Returns the new generation, or None when there is nothing to erase.  The new manifest
    is committed before anything old is deleted, so a crash at any point leaves a valid
    index; rerunning finishes the clean-up.
    """
    from rise.shard import concat_rows, serialize

    idx = open_index(store)
    m = idx.manifest
    if not m["tombstones"]:
        _delete_unreferenced(store, m)
        return None
    gen = idx.generation + 1
    size = shard_size or m["ingests"][0]["shard_size"]
    dead = idx.tombstones
    entries: list[dict[str, Any]] = []
    pending: list[tuple[ShardData, list[int]]] = []
    n_pending = 0

    def flush() -> None:
        nonlocal pending, n_pending
        n = len(entries)
        meta = {"kind": "compact", "generation": gen, "shard": n,
                "config_sha256": m["config_sha256"], "head_sha256": m["model"]["head_sha256"],
                "vocab": m["model"].get("vocab")}
        key = constants.shard_key(gen, n)
        store.put(key, serialize(meta, concat_rows(pending)))
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
    write_manifest(store, new_manifest(gen, model=m["model"], config=idx.config,
                                       ingests=m["ingests"], shards=entries, tombstones=[]))
    _delete_unreferenced(store, read_manifest(store, gen))
    return gen


def _delete_unreferenced(store: Store, manifest: dict[str, Any]) -> None:
    """Delete shards the current manifest does not use, and older manifests.

    Older manifests would point at erased shards; removing them keeps "the highest
    generation whose shards verify" equal to the current one.
    """
    keep = {s["key"] for s in manifest["shards"]}
    for key in store.list(constants.SHARD_DIR + "/"):
        if key not in keep:
            store.delete(key)
    for g in manifest_generations(store):
        if g < manifest["generation"]:
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
            for s in m["shards"]:
                if s["key"] not in checked:
                    checked[s["key"]] = _check_shard(store, s)
                problem = problem or checked[s["key"]]
        except RiseError as e:
            problem = str(e)
        report.generations[g] = problem or "ok"
        if problem is None and report.current is None:
            report.current = g
    report.shards_checked = len(checked)
    return report


def _check_shard(store: Store, entry: dict[str, Any]) -> str | None:
    try:
        data = store.get(entry["key"])
    except NotFound:
        return f"shard {entry['key']} is missing"
    if sha256(data) != entry["sha256"]:
        return f"shard {entry['key']} sha256 differs from the manifest"
    try:
        sd = parse_shard(data)
    except Corrupt as e:
        return f"shard {entry['key']}: {e}"
    if len(sd) != entry["count"]:
        return f"shard {entry['key']} holds {len(sd)} records, manifest says {entry['count']}"
    return None


def check_query_config(index: Index, lm: LoadedModel) -> None:
    """Queries are sketched with the index's config; the model must be the index's."""
    index.check_model(lm)
    if index.manifest["config_sha256"] != index.config.sha256():
        raise Mismatch("the index manifest's config hash does not match its config")
