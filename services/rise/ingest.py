"""The ingest pipeline: ``plan``, ``write_shard(n)``, ``commit``.

Every way of adding data to an index runs these three steps: ``create_index`` and
``append`` in one process (the CLI and the Python API), and the Celery chord
``rise.ingest.prepare`` -> ``rise.ingest.shard`` x n -> ``rise.ingest.commit`` across
workers.  So a rule about what may be ingested (ids, budgets, models) is written once.

- ``plan`` reads and checks the dataset against the index (ids unique and not taken by a
  live or a deleted-but-not-compacted record, the model the index's, the exact-mode budget)
  and fixes everything the other steps need in a JSON-able ``IngestPlan``; it writes
  nothing.  It reads the dataset once, streaming, in bounded memory: ids are checked as
  digests (``rise.idcheck``, spilled to temporary files), the index's ids come from its
  id files, and the file is cut into one byte range per shard (JSONL lines, Parquet row
  groups) with a sha256 each.  It tokenises nothing (exact modes excepted: their storage
  budget is checked before any work).
- ``write_shard(n)`` takes only shard n's records (read from its range alone, checked
  against the range's hash), tokenises and sketches them and writes the shard
  under a key that is a pure function of (generation, n); a valid shard already there is
  kept, so a redelivered or rerun shard task does no harm.  Features that are not finite
  (NaN, infinity) are refused before the put, naming the record: no index holds a NaN.
- ``commit`` writes the manifest (create-only) once every shard is there; rerunning it
  after success is a no-op.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from rise import constants, exact
from rise.config import SketchConfig
from rise.data import (
    ByteSource,
    DataRange,
    DataScan,
    Encoded,
    FieldMap,
    FileBytes,
    Record,
    confirm_unique,
    encode_record,
    iter_records,
    read_range,
    scan_dataset,
)
from rise.errors import AlreadyExists, BudgetExceeded, InvalidInput, Mismatch, StorageError
from rise.factors import check_finite
from rise.featurize import CancelFn, ProgressFn, featurize
from rise.idcheck import CHUNK, EXISTING, TOMBSTONED, IdChecker
from rise.index import (
    carried_files,
    check_model,
    manifest_generations,
    model_entry,
    open_index,
    read_manifest,
    shard_entry_meta,
    shard_is_valid,
    write_generation,
    write_part,
)
from rise.manifest import FieldsEntry, IngestEntry, Manifest, ModelEntry
from rise.model import LoadedModel
from rise.shard import build_shard
from rise.store import Store


class ShardsPending(StorageError):
    """Commit found shards not yet written (a redelivered shard task made a chord fire
    early, say).  A StorageError, so a commit task is retried with backoff."""


class RangeEntry(BaseModel):
    """A shard's byte range of the dataset (``rise.data.DataRange``), in the plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: Annotated[int, Field(ge=0)]
    stop: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]
    length: Annotated[int, Field(ge=0)]
    sha256: str
    line: Annotated[int, Field(ge=1)] = 1
    row_groups: list[int] = []
    skip: Annotated[int, Field(ge=0)] = 0

    def data_range(self) -> DataRange:
        return DataRange(start=self.start, stop=self.stop, offset=self.offset,
                         length=self.length, sha256=self.sha256, line=self.line,
                         row_groups=tuple(self.row_groups), skip=self.skip)


class IngestPlan(BaseModel):
    """Everything a shard task and the commit need besides the model: fixed before any
    work, JSON-able (``model_dump(mode="json")``) for task messages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generation: Annotated[int, Field(ge=1)]
    dataset_uri: str
    dataset_sha256: str
    fields: FieldsEntry
    config: SketchConfig
    model: ModelEntry
    n_records: Annotated[int, Field(ge=1)]
    shard_size: Annotated[int, Field(ge=1)]
    tokens: Annotated[int, Field(ge=0)] = 0
    """Supervised tokens over all records."""
    truncated: Annotated[int, Field(ge=0)] = 0
    """Records cut to max_length."""
    exact_bytes_estimate: int | None = None
    """Storage of per-token factors (modes exact and nosketch only)."""
    data_format: str | None = None
    """``jsonl``, ``jsonl.gz`` or ``parquet`` (None: a plan without ranges)."""
    data_size: Annotated[int, Field(ge=0)] | None = None
    ranges: list[RangeEntry] = []
    """One byte range per shard, each with its sha256 (empty: read the whole file, which
    must hash to ``dataset_sha256``; gzip has no ranges)."""
    tail_offset: Annotated[int, Field(ge=0)] | None = None
    tail_sha256: str | None = None
    """Parquet: the footer every range read starts from, and its hash."""

    @property
    def appends(self) -> bool:
        return self.generation > 1

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_records / self.shard_size)

    @property
    def field_map(self) -> FieldMap:
        return FieldMap(**self.fields.model_dump())

    def shard_range(self, n: int) -> range:
        """Record numbers of shard n: [nS, (n+1)S) clipped to the dataset."""
        return range(n * self.shard_size, min((n + 1) * self.shard_size, self.n_records))

    def shard_key(self, n: int) -> str:
        return constants.shard_key(self.generation, n)

    def shard_meta(self, n: int) -> dict[str, Any]:
        """The metadata shard n carries: what makes an existing shard this work's."""
        r = self.shard_range(n)
        meta: dict[str, Any] = {
            "kind": "ingest", "generation": self.generation, "shard": n,
            "dataset_sha256": self.dataset_sha256, "start": r.start, "stop": r.stop,
            "config_sha256": self.config.sha256(), "head_sha256": self.model.head_sha256,
            "vocab": self.model.vocab,
        }
        if self.model.adapter_sha256 is not None:  # absent without one: shards as before
            meta["adapter_sha256"] = self.model.adapter_sha256
        return meta

    def ingest_entry(self, truncated: int | None = None) -> IngestEntry:
        """The manifest's entry for this ingest (``truncated``: as counted by the shards)."""
        return IngestEntry(generation=self.generation, dataset_uri=self.dataset_uri,
                           dataset_sha256=self.dataset_sha256, fields=self.fields,
                           records=self.n_records,
                           truncated=self.truncated if truncated is None else truncated,
                           shard_size=self.shard_size)


class RecordSource(Protocol):
    """Where a shard's records come from: only the range it asks for is needed."""

    def read(self, start: int, stop: int) -> Sequence[Record]: ...


@dataclass(frozen=True)
class RecordList:
    """A RecordSource over records already in memory."""

    records: Sequence[Record]

    def read(self, start: int, stop: int) -> Sequence[Record]:
        return self.records[start:stop]


class DatasetRecords:
    """A RecordSource over a planned dataset: each read fetches only the byte ranges of
    the records asked for (``plan.ranges``), each checked against its sha256.  Also a
    read-only sequence (``len``, indexing, slicing) for callers that hold "the records"."""

    def __init__(self, p: IngestPlan, src: ByteSource, path: str | os.PathLike[str] | None,
                 max_record_bytes: int | None = None) -> None:
        self.plan, self.src, self.path = p, src, path
        self.max_record_bytes = max_record_bytes

    def __len__(self) -> int:
        return self.plan.n_records

    def __iter__(self) -> Iterator[Record]:
        for n in range(self.plan.n_shards):
            yield from self.read(*_bounds(self.plan.shard_range(n)))

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                raise ValueError("records are read in ranges: step 1 only")
            return self.read(start, stop)
        index = range(len(self))[item]
        return self.read(index, index + 1)[0]

    def read(self, start: int, stop: int) -> Sequence[Record]:
        p = self.plan
        if stop <= start:
            return []
        if not p.ranges:
            if self.path is None:
                raise InvalidInput(f"{p.dataset_uri}: a plan without ranges reads the whole "
                                   "file, and none was given")
            rows = iter_records(self.path, p.field_map, name=p.dataset_uri,
                                max_record_bytes=self.max_record_bytes, unique=False)
            return list(itertools.islice(rows, start, stop))
        out: list[Record] = []
        for r in p.ranges:
            if r.stop <= start or r.start >= stop:
                continue
            got = read_range(self.src, p.data_format or "", r.data_range(), p.field_map,
                             name=p.dataset_uri, max_record_bytes=self.max_record_bytes,
                             tail=(p.tail_offset, p.tail_sha256)
                             if p.tail_offset is not None and p.tail_sha256 else None,
                             size=p.data_size)
            out += got[max(0, start - r.start): stop - r.start]
        return out


@dataclass
class IngestSummary:
    generation: int
    records: int
    tokens: int = 0
    truncated: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    exact_bytes_estimate: int | None = None


@dataclass(frozen=True)
class ShardWrite:
    """What ``write_shard`` did: written (False: a valid copy was there), its size."""

    written: bool
    examples: int
    tokens: int
    truncated: int = 0


# ----------------------------------------------------------------------------- helpers


def encode_all(records: Sequence[Record], lm: LoadedModel, config: SketchConfig,
               fields: FieldMap) -> list[Encoded]:
    return [encode_record(r, lm.tokenizer, config.max_length, fields.chat_template)
            for r in records]


def exact_bytes(encoded: Sequence[Encoded], config: SketchConfig, vocab: int, hidden: int) -> int:
    """Storage of per-token factors: h, g, w and the dense or sparse residual, 8 bytes each."""
    per_token = 2 * hidden + 1 + (vocab if config.topk is None else 3 * (config.topk + 1))
    return sum(e.n_supervised for e in encoded) * per_token * 8


def _fields_entry(fields: FieldMap) -> FieldsEntry:
    return FieldsEntry(**fields.to_dict())


# -------------------------------------------------------------------------------- plan


def plan(store: Store, lm: LoadedModel, data: str | os.PathLike[str], *,
         append: bool = False, fields: FieldMap | None = None,
         config: SketchConfig | None = None, shard_size: int | None = None,
         dataset_uri: str | None = None,
         exact_budget: int = constants.DEFAULT_EXACT_BUDGET_BYTES,
         max_record_bytes: int | None = None,
         id_chunk: int | None = None,
         ) -> tuple[IngestPlan, DatasetRecords]:
    """Check ``data`` against the index at ``store`` and fix the plan; writes nothing.

    Create (``append=False``): the store holds no manifest; ``config`` and ``shard_size``
    are the new index's.  Append: the next generation of the current index, with its
    config, shard size and (unless ``fields`` is given) its first ingest's field map; the
    model must be the index's, and an id may not be live nor deleted-but-not-compacted (it
    still has a row in some shard, so the new record would be born deleted).
    ``dataset_uri`` is what the manifest records (default: the file's absolute path) and
    what every message about the data names (never the local copy a worker reads).
    ``max_record_bytes``: the record size cap (default ``constants.max_record_bytes()``).
    ``id_chunk``: ids held in memory before they spill (``rise.idcheck.CHUNK``).
    Returns the plan and the dataset's records, read range by range on demand.
    """
    idx = None
    if append:
        idx = open_index(store)
        check_model(idx.manifest.model, lm)
        if config is not None and config != idx.config:
            raise Mismatch("an append uses the index's sketch configuration; this request "
                           "names a different one")
        if shard_size is not None and shard_size != idx.manifest.shard_size:
            raise InvalidInput(f"shard size is fixed by the index's first ingest "
                               f"({idx.manifest.shard_size}); got {shard_size}")
        config = idx.config
        if fields is None:
            fields = idx.default_fields
        generation = idx.generation + 1
        shard_size = idx.manifest.shard_size
    else:
        gens = manifest_generations(store)
        if gens:
            m = read_manifest(store, gens[-1])
            raise AlreadyExists(
                f"an index already exists at {store.describe()} (generation {m.generation}, "
                f"{m.live_count} live examples); use rise append to add data")
        config = config or SketchConfig()
        fields = fields or FieldMap()
        generation = 1
        shard_size = constants.DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InvalidInput("shard size must be >= 1")
    uri = dataset_uri or os.path.abspath(data)
    with IdChecker(chunk=id_chunk or CHUNK) as checker:
        if idx is not None:
            dead = idx.tombstones
            for rid, _, _ in idx.iter_ids():
                checker.add(rid, TOMBSTONED if rid in dead else EXISTING)
        scan = scan_dataset(data, fields, shard_size, checker, name=uri,
                            max_record_bytes=max_record_bytes)
    if not scan.records:
        raise InvalidInput(f"{uri}: no records")

    def existing(ident: str, tag: int) -> str | None:
        if tag == TOMBSTONED:
            return "a deleted id not yet compacted (run rise compact first)"
        return idx.where([ident]).get(ident) if idx is not None else None

    confirm_unique(data, fields, scan, name=uri, max_record_bytes=max_record_bytes,
                   existing=existing)
    tokens = truncated = 0
    estimate = None
    if not config.sketched:  # small validation indexes: the budget is checked up front
        encoded = encode_all(list(iter_records(data, fields, name=uri, unique=False,
                                               max_record_bytes=max_record_bytes)),
                             lm, config, fields)
        tokens = sum(e.n_supervised for e in encoded)
        truncated = sum(e.truncated for e in encoded)
        estimate = exact_bytes(encoded, config, lm.head.vocab, lm.head.hidden)
        if estimate > exact_budget:
            raise BudgetExceeded(
                f"{config.mode} mode would store about {estimate / 2**20:.1f} MiB of per-token "
                f"factors, over the budget of {exact_budget / 2**20:.1f} MiB; index fewer "
                "records or raise --exact-budget")
    p = IngestPlan(
        generation=generation, dataset_uri=uri, dataset_sha256=scan.sha256,
        fields=_fields_entry(fields), config=config, model=model_entry(lm),
        n_records=scan.records, shard_size=shard_size, tokens=tokens, truncated=truncated,
        exact_bytes_estimate=estimate, **_scan_fields(scan))
    return p, DatasetRecords(p, FileBytes(data, uri), data, max_record_bytes)


def _scan_fields(scan: DataScan) -> dict[str, Any]:
    """The plan's fields of a dataset scan: format, size, ranges, Parquet footer."""
    return {"data_format": scan.fmt, "data_size": scan.size,
            "ranges": [RangeEntry(start=r.start, stop=r.stop, offset=r.offset,
                                  length=r.length, sha256=r.sha256, line=r.line,
                                  row_groups=list(r.row_groups), skip=r.skip)
                       for r in scan.ranges],
            "tail_offset": scan.tail_offset, "tail_sha256": scan.tail_sha256}


# ------------------------------------------------------------------------- write_shard


def write_shard(store: Store, lm: LoadedModel, p: IngestPlan, n: int,
                records: Sequence[Record], *, batch_size: int = constants.DEFAULT_BATCH_SIZE,
                progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                before_write: Callable[[], None] | None = None) -> ShardWrite:
    """Write shard ``n`` of ``p`` from exactly its records, unless a valid copy is there.

    ``records`` are the shard's own (``source.read(*p.shard_range(n))``).  A skipped shard
    reports its examples and tokens to ``progress`` at once, so progress adds up either way.
    ``before_write`` runs just before the shard is put (the services check there that the
    job still owns the index: a store cannot check a token on PUT); it raises to refuse.
    """
    if not 0 <= n < p.n_shards:
        raise InvalidInput(f"shard {n} out of range: the plan has {p.n_shards} shards")
    rng = p.shard_range(n)
    if len(records) != len(rng) or (records and records[0].number != rng.start):
        raise InvalidInput(f"shard {n} holds records [{rng.start}, {rng.stop}); got "
                           f"{len(records)} records from number "
                           f"{records[0].number if records else '-'}")
    check_model(p.model, lm)
    encoded = encode_all(records, lm, p.config, p.field_map)
    tokens = sum(e.n_supervised for e in encoded)
    truncated = sum(e.truncated for e in encoded)
    key = p.shard_key(n)
    if shard_is_valid(store, key, p.shard_meta(n)):
        if progress is not None:
            progress(len(records), tokens)
        return ShardWrite(False, len(records), tokens, truncated)
    feats = featurize(lm, encoded, p.config, batch_size=batch_size, progress=progress,
                      cancel=cancel)
    ids = [r.id for r in records]
    check_finite(feats, ids)  # InvalidInput naming the record: an index never holds a NaN
    norms = None if p.config.sketched else exact.norms(feats.factors or [], lm.head.vocab)
    if norms is not None and not bool(torch.isfinite(norms).all()):
        bad = int((~torch.isfinite(norms).all(dim=1)).nonzero()[0])
        raise InvalidInput(f"record id {ids[bad]!r}: the norm of its head gradient overflows "
                           "float64 (refused: no index stores a NaN or an infinity)")
    # The truncated count rides in the shard: planning no longer tokenises, so the commit
    # sums it from the shards for the manifest.
    data = build_shard(dict(p.shard_meta(n), truncated=truncated), ids,
                       [p.generation] * len(records), [r.number for r in records], feats,
                       p.config.storage_dtype, norms)
    if before_write is not None:
        before_write()
    store.put(key, data)
    return ShardWrite(True, len(records), tokens, truncated)


# ------------------------------------------------------------------------------ commit


def commit(store: Store, p: IngestPlan,
           before_write: Callable[[], None] | None = None) -> Manifest:
    """Write the manifest of ``p``'s generation over its shards; returns it.

    Every shard must be present and describe this plan (ShardsPending otherwise).  An
    append stacks the new shards on the previous generation's, tombstones carried; the
    previous generation must still be the current one.  Rerunning after the manifest was
    written returns that manifest when it holds exactly these shards.  ``before_write`` as
    in ``write_shard``, just before the manifest is written.
    """
    missing = [n for n in range(p.n_shards)
               if not shard_is_valid(store, p.shard_key(n), p.shard_meta(n))]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ShardsPending(
            f"shards {', '.join(map(str, missing[:3]))}{more} of generation "
            f"{p.generation} are missing or invalid")
    written = [shard_entry_meta(store, p.shard_key(n), p.generation, n)
               for n in range(p.n_shards)]
    entries = [e for e, _ in written]
    # Shards count their truncated records (planning no longer tokenises); a shard of an
    # older run has no count, and then the plan's (exact modes) stands.
    truncated = max(p.truncated, sum(int(meta.get("truncated", 0)) for _, meta in written))
    if p.generation in manifest_generations(store):
        there = read_manifest(store, p.generation)
        if [s.sha256 for s in there.shards[-len(entries):]] == [e.sha256 for e in entries]:
            return there  # committed by an earlier run of this step
        raise AlreadyExists(f"generation {p.generation} of the index at {store.describe()} "
                            "was committed by another ingest")
    part = write_part(store, p.generation, entries)
    if p.appends:
        prev = open_index(store)
        if prev.generation != p.generation - 1:
            raise AlreadyExists(
                f"the index moved to generation {prev.generation} while generation "
                f"{p.generation} was being ingested")
        m = prev.manifest
        parts, deletes = carried_files(store, m)
        return write_generation(store, p.generation, model=m.model, config=m.config,
                                ingests=[*m.ingests, p.ingest_entry(truncated)],
                                parts=[*parts, part], deletes=deletes,
                                before_write=before_write)
    return write_generation(store, 1, model=p.model, config=p.config,
                            ingests=[p.ingest_entry(truncated)], parts=[part], deletes=[],
                            before_write=before_write)


# ------------------------------------------------------------------- in one process


def run(store: Store, lm: LoadedModel, p: IngestPlan, source: RecordSource, *,
        batch_size: int = constants.DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
        cancel: CancelFn | None = None) -> IngestSummary:
    """Every shard of ``p`` in turn, then the commit: the one-process ingest."""
    summary = IngestSummary(generation=p.generation, records=p.n_records, tokens=p.tokens,
                            truncated=p.truncated,
                            exact_bytes_estimate=p.exact_bytes_estimate)
    tokens = truncated = 0
    for n in range(p.n_shards):
        done = write_shard(store, lm, p, n, source.read(*_bounds(p.shard_range(n))),
                           batch_size=batch_size, progress=progress, cancel=cancel)
        tokens += done.tokens
        truncated += done.truncated
        if done.written:
            summary.shards_written += 1
        else:
            summary.shards_skipped += 1
    summary.tokens, summary.truncated = tokens, truncated
    commit(store, p)
    return summary


def _bounds(r: range) -> tuple[int, int]:
    return r.start, r.stop


PlanCallback = Callable[[IngestPlan, IngestSummary], None]


def create_index(store: Store, lm: LoadedModel, data: str | os.PathLike[str], fields: FieldMap,
                 config: SketchConfig, *, shard_size: int = constants.DEFAULT_SHARD_SIZE,
                 batch_size: int = constants.DEFAULT_BATCH_SIZE,
                 exact_budget: int = constants.DEFAULT_EXACT_BUDGET_BYTES,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 on_plan: PlanCallback | None = None) -> IngestSummary:
    """Index ``data`` into an empty store (or finish a crashed run of the same command)."""
    p, records = plan(store, lm, data, fields=fields, config=config, shard_size=shard_size,
                      exact_budget=exact_budget)
    return _run_planned(store, lm, p, records, batch_size, progress, cancel, on_plan)


def append(store: Store, lm: LoadedModel, data: str | os.PathLike[str],
           fields: FieldMap | None = None, *, batch_size: int = constants.DEFAULT_BATCH_SIZE,
           exact_budget: int = constants.DEFAULT_EXACT_BUDGET_BYTES,
           progress: ProgressFn | None = None, cancel: CancelFn | None = None,
           on_plan: PlanCallback | None = None) -> IngestSummary:
    """Add ``data`` as a new ingest generation (see ``plan`` for what is refused)."""
    p, records = plan(store, lm, data, append=True, fields=fields, exact_budget=exact_budget)
    return _run_planned(store, lm, p, records, batch_size, progress, cancel, on_plan)


def _run_planned(store: Store, lm: LoadedModel, p: IngestPlan, records: RecordSource,
                 batch_size: int, progress: ProgressFn | None, cancel: CancelFn | None,
                 on_plan: PlanCallback | None) -> IngestSummary:
    if on_plan is not None:
        on_plan(p, IngestSummary(generation=p.generation, records=p.n_records,
                                 tokens=p.tokens, truncated=p.truncated,
                                 exact_bytes_estimate=p.exact_bytes_estimate))
    return run(store, lm, p, records, batch_size=batch_size, progress=progress,
               cancel=cancel)
