"""The index manifest as typed models: read and validated once, used as attributes.

A manifest generation is one JSON object (``manifest-<generation>.json``): the model and
sketch configuration the index was built with, the ingests (one per create or append),
the shards that make up the index and the tombstoned ids.  This module does no I/O on
stores and imports neither torch nor the model pipeline, so a process that only routes
requests (the gateway) can read manifests cheaply.

Format versions
---------------
``FORMAT_VERSION`` is the newest version this code reads and writes.  The rule for
changing the format:

1. A field may be *added* to a model here only with a default that means "as before"
   (an index without it behaves exactly as it did), and it is listed in ``FIELD_SINCE``
   with the version that introduced it; ``FORMAT_VERSION`` goes up by one.
2. A manifest is written with the lowest version that can express it: the highest
   ``FIELD_SINCE`` among the fields that differ from their defaults (1 if none).  An index
   that uses no new feature stays readable by older code.
3. Readers accept every version up to their own and refuse a newer one with a message that
   names both versions (older code cannot know what a newer field means, and
   ``extra="forbid"`` would otherwise reject it with a less useful message).
4. Removing or re-interpreting a field is a breaking change: it needs a migration (a new
   generation written by ``rise compact``), never a silent reinterpretation.

Shard files carry their own ``format_version`` in their metadata under the same rule.

Version 3: the manifest list
----------------------------
From version 3 the object ``manifest-<generation>.json`` is a *manifest list*
(``ManifestList``): the model, the config and the ingests as before, but instead of every
shard and every tombstoned id it names small immutable files by key and sha256 -- a
*shard list* per generation that wrote shards (``ShardList``: an ingest or a compaction)
and a *delete file* per generation that deleted ids (``DeleteFile``).  A new generation
reuses the files of the previous one and adds at most one of each, so the object written
per generation does not grow with the shards or the tombstones (as table formats such as
Iceberg and Delta do).  Each shard entry of a shard list also names the shard's *id file*
(``ids_key``, ``ids_sha256``): the ids, ingest generations and record numbers of the
shard alone, so id checks read ids, never sketches.  Readers resolve a list into the same
``Manifest`` that older versions hold in one object (``rise.index.read_manifest``); the
``parts`` and ``deletes`` of a resolved manifest say which files it came from.
Older indexes (versions 1 and 2) open as before; the first generation written over one
carries its shards and tombstones into files of version 3.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rise import __version__
from rise.config import SketchConfig
from rise.errors import Corrupt, Mismatch, validation_message

FORMAT_VERSION = 3
"""The newest manifest format this code reads and writes."""

LIST_VERSION = 3
"""The first version written as a manifest list over shard lists and delete files."""

FIELD_SINCE: dict[str, int] = {"model.adapter_sha256": 2, "parts": 3, "deletes": 3}
"""Dotted field path (``"model.adapter_sha256"``) -> the format version that added it."""

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0)]
Generation = Annotated[int, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """The model an index was built with: its identity hashes and the head's shape."""

    name: str
    revision: str | None = None
    config_sha256: Sha256
    head_sha256: Sha256
    tokenizer_sha256: Sha256
    vocab: Annotated[int, Field(ge=1)]
    hidden: Annotated[int, Field(ge=1)]
    adapter_sha256: Sha256 | None = None
    """The LoRA adapter merged into the model (``rise.adapter``); None: the base model."""

    def differs_from(self, other: ModelEntry) -> str | None:
        """The first identity hash that differs (``"config"``, ``"head"``, ``"tokenizer"``,
        ``"adapter"``: another adapter, or one on one side only)."""
        for key in ("config_sha256", "head_sha256", "tokenizer_sha256", "adapter_sha256"):
            if getattr(self, key) != getattr(other, key):
                return key.removesuffix("_sha256")
        return None


class FieldsEntry(_Strict):
    """Which fields of a data record hold the id and the text (``rise.data.FieldMap``)."""

    text_field: str = "text"
    id_field: str = "id"
    prompt_field: str | None = None
    response_field: str | None = None
    chat_template: bool = False


class IngestEntry(_Strict):
    """One create or append: where its records came from and how they were split."""

    generation: Generation
    dataset_uri: str
    dataset_sha256: Sha256
    fields: FieldsEntry
    records: Count
    truncated: Count
    shard_size: Annotated[int, Field(ge=1)]


class ShardEntry(_Strict):
    """One shard object: its key, which ingest (or compaction) wrote it, and its hash;
    from version 3 also its id file (None: an older shard, whose ids are in it only)."""

    key: str
    generation: Generation
    shard: Count
    count: Count
    sha256: Sha256
    bytes: Count
    ids_key: str | None = None
    ids_sha256: Sha256 | None = None


class PartEntry(_Strict):
    """A shard list (``ShardList``) named by a manifest list (version 3)."""

    key: str
    generation: Generation
    sha256: Sha256
    shards: Count
    records: Count
    bytes: Count


class DeleteEntry(_Strict):
    """A delete file (``DeleteFile``) named by a manifest list (version 3)."""

    key: str
    generation: Generation
    sha256: Sha256
    count: Count


class ShardList(_Strict):
    """The shards one generation wrote (an ingest or a compaction), in order."""

    format_version: Annotated[int, Field(ge=LIST_VERSION)]
    generation: Generation
    shards: list[ShardEntry]


class DeleteFile(_Strict):
    """The ids one generation tombstoned, sorted."""

    format_version: Annotated[int, Field(ge=LIST_VERSION)]
    generation: Generation
    ids: list[str]


class ManifestList(_Strict):
    """A manifest generation of version 3 or later, as stored: shard lists and delete
    files by key and hash instead of every shard and tombstone."""

    format_version: Annotated[int, Field(ge=LIST_VERSION)]
    generation: Generation
    tool_version: str
    model: ModelEntry
    config: SketchConfig
    config_sha256: Sha256
    ingests: list[IngestEntry]
    parts: list[PartEntry]
    deletes: list[DeleteEntry]
    live_count: Count

    @model_validator(mode="after")
    def _consistent(self) -> ManifestList:
        if self.config.sha256() != self.config_sha256:
            raise ValueError("config_sha256 does not match config")
        if not self.ingests:
            raise ValueError("a manifest has at least one ingest")
        if self.live_count != sum(p.records for p in self.parts) - sum(
                d.count for d in self.deletes):
            raise ValueError("live_count differs from the shard lists' records less the "
                             "delete files' ids")
        return self

    @classmethod
    def build(cls, generation: int, *, model: ModelEntry, config: SketchConfig,
              ingests: list[IngestEntry], parts: list[PartEntry],
              deletes: list[DeleteEntry]) -> ManifestList:
        return cls(format_version=LIST_VERSION, generation=generation,
                   tool_version=f"rise {__version__}", model=model, config=config,
                   config_sha256=config.sha256(), ingests=ingests, parts=parts,
                   deletes=deletes,
                   live_count=sum(p.records for p in parts) - sum(d.count for d in deletes))

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()

    def resolve(self, shards: list[ShardEntry], tombstones: list[str]) -> Manifest:
        """The ``Manifest`` of this generation given its shard lists' shards and its
        delete files' ids (in list order)."""
        return Manifest(format_version=self.format_version, generation=self.generation,
                        tool_version=self.tool_version, model=self.model,
                        config=self.config, config_sha256=self.config_sha256,
                        ingests=self.ingests, shards=shards, tombstones=sorted(tombstones),
                        live_count=self.live_count, parts=self.parts, deletes=self.deletes)


class Manifest(_Strict):
    """One manifest generation."""

    format_version: Annotated[int, Field(ge=1)]
    generation: Generation
    tool_version: str
    model: ModelEntry
    config: SketchConfig
    config_sha256: Sha256
    ingests: list[IngestEntry]
    shards: list[ShardEntry]
    tombstones: list[str]
    live_count: Count
    parts: list[PartEntry] = []
    """Version 3: the shard lists this generation was resolved from (empty: older)."""
    deletes: list[DeleteEntry] = []
    """Version 3: the delete files this generation was resolved from."""

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.config.sha256() != self.config_sha256:
            raise ValueError("config_sha256 does not match config")
        if not self.ingests:
            raise ValueError("a manifest has at least one ingest")
        if self.live_count != sum(s.count for s in self.shards) - len(self.tombstones):
            raise ValueError("live_count differs from the shards' counts less the tombstones")
        return self

    # -- derived --------------------------------------------------------------------------

    @property
    def shard_size(self) -> int:
        """Records per shard of this index (fixed by its first ingest)."""
        return self.ingests[0].shard_size

    @property
    def first_fields(self) -> FieldsEntry:
        """The field map of the first ingest: the default of later appends and queries."""
        return self.ingests[0].fields

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def tombstone_set(self) -> frozenset[str]:
        return frozenset(self.tombstones)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def build(cls, generation: int, *, model: ModelEntry, config: SketchConfig,
              ingests: list[IngestEntry], shards: list[ShardEntry],
              tombstones: list[str] | frozenset[str] | set[str]) -> Manifest:
        """A new generation; live_count, the config hash and the version are derived."""
        dead = sorted(tombstones)
        fields: dict[str, Any] = dict(
            format_version=1, generation=generation, tool_version=f"rise {__version__}",
            model=model, config=config, config_sha256=config.sha256(), ingests=ingests,
            shards=shards, tombstones=dead,
            live_count=sum(s.count for s in shards) - len(dead))
        m = cls(**fields)
        version = written_version(m)
        return m if version == 1 else m.model_copy(update={"format_version": version})

    # -- (de)serialising ------------------------------------------------------------------

    def to_json(self) -> bytes:
        """Sorted, indented JSON: the bytes written to the store.  Fields newer than
        version 1 are left out while they hold their default, so a manifest that uses no
        new feature is byte for byte what version-1 code writes (and reads)."""
        data = self.model_dump(mode="json")
        for path in FIELD_SINCE:
            *parents, last = path.split(".")
            obj: Any = self
            raw: Any = data
            for part in parents:
                obj = getattr(obj, part, None)
                raw = raw.get(part) if isinstance(raw, dict) else None
            if not isinstance(obj, BaseModel) or not isinstance(raw, dict):
                continue
            info = type(obj).model_fields.get(last)
            if info is not None and getattr(obj, last) == info.get_default(
                    call_default_factory=True):
                raw.pop(last, None)
        for shard in data["shards"]:  # shards of version 1 and 2 have no id file
            for key in ("ids_key", "ids_sha256"):
                if shard.get(key) is None:
                    shard.pop(key, None)
        return json.dumps(data, sort_keys=True, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes | str, where: str) -> Manifest:
        """Validate manifest bytes; Corrupt (or Mismatch for a newer format) naming ``where``.
        A manifest list (version 3) is resolved by ``rise.index.read_manifest``, not here."""
        raw = parse_json_object(data, where, "manifest")
        return parse_model(cls, raw, where, "manifest")


def parse_json_object(data: bytes | str, where: str, what: str) -> dict[str, Any]:
    """The JSON object of a manifest-format file, its version checked (refused newer
    naming both versions, as ``Manifest.parse``)."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Corrupt(f"{where} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise Corrupt(f"{where} is not a JSON object")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) \
            and version > FORMAT_VERSION:
        raise Mismatch(f"{where} has format version {version}, written by a newer rise; "
                       f"this rise reads up to {FORMAT_VERSION}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise Corrupt(f"{where} has format version {version!r}; this rise reads "
                      f"1 to {FORMAT_VERSION}")
    return raw


M = TypeVar("M", bound=BaseModel)


def parse_model(cls: type[M], raw: dict[str, Any], where: str, what: str) -> M:
    """``cls`` validated from ``raw``; Corrupt naming ``where`` and the field."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        detail = validation_message(e, locations=True)
        raise Corrupt(f"{where} is not a valid {what}: {detail}") from None


def written_version(m: BaseModel) -> int:
    """The lowest format version that can express ``m`` (rule 2 of the module docstring)."""
    version = 1
    for path, since in FIELD_SINCE.items():
        obj: Any = m
        default: Any = None
        for part in path.split("."):
            if not isinstance(obj, BaseModel):
                obj = None
                break
            info = type(obj).model_fields.get(part)
            default = info.get_default(call_default_factory=True) if info else None
            obj = getattr(obj, part, None)
        if obj is not None and obj != default:
            version = max(version, since)
    return version
