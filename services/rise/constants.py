"""Names, keys and defaults in one place.

Object keys are pure functions of (index, generation, shard number): writing a shard twice
writes the same key and the same bytes.  Ids never appear in keys.
"""

from __future__ import annotations

import os
from pathlib import Path

from rise.errors import InvalidInput

FORMAT_VERSION = 1

MANIFEST_PREFIX = "manifest-"
SHARD_DIR = "shards"
SHARD_SUFFIX = ".safetensors"

# Defaults (tunable; the identities in the design are normative, these numbers are not).
DEFAULT_TOPK = 128
# tau = 2 (the design's provisional default was 1): with pool-mean centering it lifted the
# evaluation's domain precision@10 from 0.847 to 0.925 and quality clean-precision from
# 0.440 to 0.837 at equal bytes (tests/benchmarks/reports/eval/).  Exact mode fixes tau = 1.
DEFAULT_TEMPERATURE = 2.0
# (kr, kh, kg) = (128, 64, 64): 24.6 KB per example.  Chosen by measurement
# (tests/benchmarks/reports/engine.md and eval/): at this size the sketched combined score
# matched the exact head-gradient ceiling on the domain-separation task (precision@10 0.847
# both), and top-10 agreement with the no-sketch ranking was within 0.02 of the largest
# size tried (0.62 vs 0.64 at 41 KB).  (64, 32, 32) at 6.2 KB lost 0.085 precision@10.
DEFAULT_DIMS = (128, 64, 64)
DEFAULT_SEED = 0
DEFAULT_MAX_LENGTH = 512
DEFAULT_BATCH_SIZE = 8
DEFAULT_SHARD_SIZE = 1024
DEFAULT_LAMBDA = 0.5
# Collapse of near-duplicate hits: two hits are one source when the combined cosine of
# their sketches is at least this.  Measured on a planted pool (SmolLM2-135M, Lee articles
# and lightly edited copies): 95.7% of near-duplicate pairs at or above 0.6, no pair of
# distinct articles (at most 0.51); tests/benchmarks/reports/collapse.md.
DEFAULT_COLLAPSE = 0.6
# Candidates fetched per shown hit when collapsing (then more, until k groups or the pool,
# or COLLAPSE_MAX_FETCH per query: a bound on what one scorer answer and one grouping hold).
COLLAPSE_OVERFETCH = 4
COLLAPSE_MAX_FETCH = 2048
# Exact mode keeps per-token factors; refuse above this many bytes unless raised.
DEFAULT_EXACT_BUDGET_BYTES = 2 * 1024**3
# Head work per chunk: logits, softmax and the residual each take chunk x V floats.
DEFAULT_HEAD_CHUNK_BYTES = 256 * 1024**2
# A data record (a JSONL line, a Parquet row's strings, an inline query) is refused above
# this many bytes, before it is parsed or tokenized: a 20 MB record took 67 s and 3.9 GB to
# tokenize, and max_length keeps only its first tokens anyway.  $RISE_MAX_RECORD_BYTES
# changes it for every process (CLI, workers, gateway).
DEFAULT_MAX_RECORD_BYTES = 1024**2
MAX_RECORD_BYTES_ENV = "RISE_MAX_RECORD_BYTES"
# Nesting of a JSON record (objects and arrays); deeper records are refused.
MAX_JSON_DEPTH = 64


def cache_dir(configured: str = "") -> Path:
    """The local cache folder (converted models, downloaded datasets): ``configured`` (the
    services' ``Settings.cache_dir``), else $RISE_CACHE_DIR, else ~/.cache/rise."""
    return Path(configured or os.environ.get("RISE_CACHE_DIR") or Path.home() / ".cache" / "rise")


def max_record_bytes(configured: int | None = None) -> int:
    """The record size cap: ``configured``, else $RISE_MAX_RECORD_BYTES, else
    DEFAULT_MAX_RECORD_BYTES.  InvalidInput for a value that is not a positive integer."""
    if configured is None:
        raw = os.environ.get(MAX_RECORD_BYTES_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_RECORD_BYTES
        if not raw.isdigit() or len(raw) > 15:
            raise InvalidInput(f"{MAX_RECORD_BYTES_ENV}={raw[:40]!r} is not a positive integer")
        configured = int(raw)
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise InvalidInput(f"the record size cap must be a positive integer, got {configured!r}")
    return configured


def manifest_key(generation: int) -> str:
    """Key of manifest generation ``generation`` (zero-padded so keys sort by generation)."""
    return f"{MANIFEST_PREFIX}{generation:08d}.json"


def parse_manifest_key(key: str) -> int | None:
    """Generation of a manifest key, or None if ``key`` is not a manifest."""
    name = key.rsplit("/", 1)[-1]
    if not (name.startswith(MANIFEST_PREFIX) and name.endswith(".json")):
        return None
    digits = name[len(MANIFEST_PREFIX) : -len(".json")]
    return int(digits) if digits.isdigit() else None


def shard_key(generation: int, shard: int) -> str:
    """Key of shard ``shard`` written by generation ``generation`` (ingest or compaction)."""
    return f"{SHARD_DIR}/g{generation:08d}/shard-{shard:06d}{SHARD_SUFFIX}"
