"""Training-data records: reading, validating, writing back, and tokenizing.

A record has an id and either a plain ``text`` or a prompt and a response.  Files are JSONL
(``.jsonl``, ``.json``, ``.jsonl.gz``) or Parquet (``.parquet``), chosen by extension.  Every
bad-input error is one line naming the problem, the file and the record.

A record is refused before it is parsed or tokenized when it is over the size cap
(``rise.constants.max_record_bytes``: 1 MiB, $RISE_MAX_RECORD_BYTES), nested deeper than
``MAX_JSON_DEPTH``, or has an id over 256 UTF-8 bytes (integers included).  The readers
take the name a message shows for the file (``name=``): the services pass the dataset URI
the caller gave, never the local copy's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import os
import secrets
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from rise import constants
from rise.errors import InvalidInput, Mismatch, NotFound
from rise.idcheck import Candidate, IdChecker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# pyarrow is imported by the two Parquet functions only: it takes ~0.18 s to import
# (measured; all of `rise --help` takes ~0.25 s), and JSONL data never needs it.

StrPath = str | os.PathLike[str]
MAX_ID_BYTES = 256
# Longest suffix first, so ".jsonl.gz" is not mistaken for something else.
_FORMATS = {".jsonl.gz": "jsonl.gz", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class FieldMap:
    """Which fields of a record hold the id, the text, or the prompt and the response."""

    text_field: str = "text"
    id_field: str = "id"
    prompt_field: str | None = None
    response_field: str | None = None
    chat_template: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_prompt_response(self) -> bool:
        """True when records are prompt/response pairs rather than plain text."""
        return self.prompt_field is not None and self.response_field is not None

    def validate(self) -> None:
        """Raise InvalidInput for an inconsistent field map."""
        for name in ("text_field", "id_field", "prompt_field", "response_field"):
            value = getattr(self, name)
            optional = name in ("prompt_field", "response_field")
            if not (isinstance(value, str) and value) and not (optional and value is None):
                raise InvalidInput(f"field map: {name} must be a non-empty string")
        if (self.prompt_field is None) != (self.response_field is None):
            raise InvalidInput("field map: set both prompt_field and response_field, or neither")
        if self.is_prompt_response and self.prompt_field == self.response_field:
            raise InvalidInput("field map: prompt_field and response_field must differ")
        if not isinstance(self.chat_template, bool):
            raise InvalidInput("field map: chat_template must be true or false")
        # A chat template only applies to prompts; accepting it for plain text would
        # silently ignore a flag the user asked for.
        if self.chat_template and not self.is_prompt_response:
            raise InvalidInput("field map: chat_template needs prompt_field and response_field")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, stored in the index manifest."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FieldMap:
        """Inverse of to_dict; unknown keys are an error so a typo is not silently ignored."""
        if not isinstance(d, Mapping):
            raise InvalidInput("field map: expected an object")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InvalidInput(f"field map: unknown key(s) {', '.join(map(repr, unknown))}")
        return cls(**dict(d))


@dataclass(frozen=True)
class Record:
    """One validated training record; ``raw`` is the original object, for writing back."""

    id: str
    number: int
    text: str | None
    prompt: str | None
    response: str | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class Encoded:
    """A tokenized record.  Hidden position t predicts input_ids[t+1], supervised iff
    t+1 >= sup_start; position 0 is never a target since nothing precedes it."""

    input_ids: list[int]
    sup_start: int
    truncated: bool

    @property
    def n_supervised(self) -> int:
        """Number of supervised next-token targets."""
        return len(self.input_ids) - max(self.sup_start, 1)


def _format(path: StrPath, shown: str | None = None) -> str:
    """'jsonl', 'jsonl.gz' or 'parquet' from the file name, else InvalidInput naming
    ``shown`` (default: the path)."""
    name = os.fspath(path)
    for suffix, fmt in _FORMATS.items():
        if name.lower().endswith(suffix):
            return fmt
    raise InvalidInput(f"{shown or name}: unknown data file extension "
                       f"(use {', '.join(_FORMATS)})")


def _open_binary(path: StrPath, name: str | None = None) -> IO[bytes]:
    """Open a data file for reading, mapping OS errors onto the platform's errors;
    messages show ``name`` (default: the path)."""
    shown = name or os.fspath(path)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"data file not found: {shown}") from None
    except IsADirectoryError:
        raise InvalidInput(f"{shown}: is a directory, not a data file") from None
    except PermissionError:
        raise InvalidInput(f"{shown}: permission denied") from None


def _too_big(where: str, size: int | None, cap: int) -> InvalidInput:
    """The error of a record over the cap (``size`` None: not read to its end)."""
    what = f": {size:,} bytes" if size is not None else ""
    return InvalidInput(f"{where}: the record is over the limit of {cap:,} bytes "
                        f"({constants.MAX_RECORD_BYTES_ENV}){what}")


def _check_depth(obj: Any, where: str, brackets: int) -> None:
    """InvalidInput when ``obj`` nests objects and arrays deeper than MAX_JSON_DEPTH.
    Iterative (no recursion to blow up), and skipped when the record has too few
    brackets to be that deep."""
    limit = constants.MAX_JSON_DEPTH
    if brackets <= limit:
        return
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            raise InvalidInput(f"{where}: JSON nested deeper than {limit} levels")
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))


def _parse_json(text: str, where: str) -> Any:
    """json.loads with every failure as InvalidInput naming the record."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:  # the decoder recurses per level: deep input ends here
        raise InvalidInput(f"{where}: JSON nested deeper than {constants.MAX_JSON_DEPTH} "
                           "levels") from None
    except ValueError:  # an integer of more digits than int() converts
        raise InvalidInput(f"{where}: invalid JSON: a number of more than "
                           f"{sys.get_int_max_str_digits()} digits") from None


def _jsonl_objects(path: StrPath, gz: bool, name: str, cap: int
                   ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, object) per non-blank line; location names line and record number.
    A line over ``cap`` bytes is refused after reading at most cap + 2 of its bytes."""
    with contextlib.ExitStack() as stack:
        stream: IO[bytes] | gzip.GzipFile = stack.enter_context(_open_binary(path, name))
        if gz:
            stream = stack.enter_context(gzip.GzipFile(fileobj=stream))
        try:
            for loc, obj, _, _ in _jsonl_lines(stream, name, cap):
                if obj is not None:
                    yield loc, obj
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InvalidInput(f"{name}: not a valid gzip file ({e})") from None


def _jsonl_lines(stream: IO[bytes] | gzip.GzipFile, name: str, cap: int, *,
                 first_line: int = 1, first_number: int = 0
                 ) -> Iterator[tuple[str, dict[str, Any] | None, int, bytes]]:
    """Every line of a JSONL stream: (location, object or None for a blank line, the
    line's byte offset in the stream, its bytes).  ``first_line`` and ``first_number`` are
    the line and record numbers the stream starts at (a range of a file)."""
    number = first_number
    lineno = first_line - 1
    pos = 0
    while line := stream.readline(cap + 2):
        lineno += 1
        start, pos = pos, pos + len(line)
        loc = f"line {lineno} (record {number})"
        where = f"{name} {loc}"
        body = line[:-1] if line.endswith(b"\n") else line
        body = body[:-1] if body.endswith(b"\r") else body
        if len(body) > cap:
            whole = line.endswith(b"\n") or len(line) < cap + 2
            raise _too_big(where, len(body) if whole else None, cap)
        if not body.strip():
            yield loc, None, start, line  # blank lines are not records: number stays
            continue
        try:
            # utf-8-sig on line 1 so a BOM written by some editors is not an error.
            text = body.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"{where}: invalid UTF-8 at byte {e.start}") from None
        obj = _parse_json(text, where)
        if not isinstance(obj, dict):
            kind = "array" if isinstance(obj, list) else type(obj).__name__
            raise InvalidInput(f"{where}: not a JSON object (got {kind})")
        _check_depth(obj, where, body.count(b"{") + body.count(b"["))
        yield loc, obj, start, line
        number += 1


def _row_bytes(batch: Any) -> list[int]:
    """Per row of a pyarrow RecordBatch, the bytes of its string and binary values (what
    a tokenizer would read) plus its share of every other column."""
    # start-up: pyarrow only for Parquet (note at the top)
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    sizes = [0] * n
    for col in batch.columns:
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) \
                or pa.types.is_large_binary(t):
            lengths = pc.fill_null(pc.binary_length(col), 0).to_pylist()
            sizes = [a + b for a, b in zip(sizes, lengths, strict=True)]
        elif n:
            share = col.nbytes // n
            sizes = [a + share for a in sizes]
    return sizes


def _parquet_rows(path: StrPath | IO[bytes] | io.RawIOBase, name: str, cap: int, *,
                  row_groups: list[int] | None = None, first_number: int = 0,
                  shown_path: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, row) for each Parquet row, streamed in batches; a row over ``cap``
    bytes is refused before the batch becomes Python objects.  ``row_groups``: only those
    (numbered from ``first_number``); ``path`` may be an open file object."""
    # start-up: pyarrow only for Parquet (note at the top)
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = first_number
    local = shown_path if shown_path is not None else \
        (os.fspath(path) if isinstance(path, str | os.PathLike) else None)
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, row_groups=row_groups):
            for i, size in enumerate(_row_bytes(batch)):
                if size > cap:
                    raise _too_big(f"{name} record {number + i}", size, cap)
            for row in batch.to_pylist():
                loc = f"record {number}"
                _check_depth(row, f"{name} {loc}", constants.MAX_JSON_DEPTH + 1)
                yield loc, row
                number += 1
    except (pa.ArrowException, OSError) as e:
        detail = str(e).replace(local, name) if local else str(e)  # never the local copy
        raise InvalidInput(f"{name}: not a valid Parquet file ({detail})") from None


def _utf8_len(value: str, field: str, where: str) -> int:
    """UTF-8 size of a string; JSON "\\ud800" escapes yield lone surrogates that UTF-8 (and
    so the tokenizer) cannot take, so they are rejected here with the record named."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"{where}: field {field!r} is not valid Unicode") from None


def _parse_id(value: Any, field: str, number: int, where: str) -> str:
    """Validate an id; an absent id (missing or null) becomes the record number."""
    if value is None:
        return str(number)
    if isinstance(value, bool) or not isinstance(value, int | str):
        kind = type(value).__name__
        raise InvalidInput(f"{where}: id field {field!r} must be a string or integer, got {kind}")
    if isinstance(value, int) and abs(value) >= 10**MAX_ID_BYTES:
        # More digits than an id may have bytes; checked before str(), which refuses
        # integers of thousands of digits with a ValueError.
        raise InvalidInput(f"{where}: id field {field!r} is an integer of more than "
                           f"{MAX_ID_BYTES} digits, over {MAX_ID_BYTES} UTF-8 bytes")
    ident = str(value)
    size = _utf8_len(ident, field, where)
    if not 0 < size <= MAX_ID_BYTES:
        limit = f"1-{MAX_ID_BYTES}"
        raise InvalidInput(f"{where}: id field {field!r} is {size} UTF-8 bytes, not {limit}")
    return ident


def _string_field(obj: Mapping[str, Any], field: str, where: str, non_blank: bool) -> str:
    """Fetch a required string field; non_blank also rejects whitespace-only strings."""
    value = obj.get(field)
    if value is None:
        raise InvalidInput(f"{where}: missing field {field!r} (absent or null)")
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if non_blank and not value.strip():
        raise InvalidInput(f"{where}: field {field!r} is empty or whitespace-only")
    _utf8_len(value, field, where)
    return value


def iter_records(path: StrPath, fields: FieldMap, *, name: str | None = None,
                 max_record_bytes: int | None = None, unique: bool = True
                 ) -> Iterator[Record]:
    """Stream validated records; a duplicate id raises when its second copy is reached.

    ``name`` is what messages call the file (default: its path); ``max_record_bytes``
    the size cap (default: ``rise.constants.max_record_bytes()``); ``unique=False``: no
    duplicate check (which holds every id seen; a planned dataset was checked already).
    The extension, the cap and the file's existence are checked now, not on first
    iteration, so a caller's try block around this call sees those errors."""
    shown = name or os.fspath(path)
    fmt = _format(path, shown)
    cap = constants.max_record_bytes(max_record_bytes)
    _open_binary(path, shown).close()
    return _iter_records(path, fmt, fields, shown, cap, unique)


def _iter_records(path: StrPath, fmt: str, fields: FieldMap, name: str, cap: int,
                  unique: bool = True) -> Iterator[Record]:
    """Generator behind iter_records."""
    rows = _parquet_rows(path, name, cap) if fmt == "parquet" else \
        _jsonl_objects(path, fmt == "jsonl.gz", name, cap)
    return _validated(rows, fields, name, unique=unique)


def _inline_bytes(row: Mapping[str, Any]) -> int:
    """UTF-8 bytes of an inline record's keys and string values (what is tokenized)."""
    return sum(len(str(k).encode("utf-8", "surrogatepass"))
               + (len(v.encode("utf-8", "surrogatepass")) if isinstance(v, str) else 0)
               for k, v in row.items())


def records_from_dicts(rows: Iterable[Mapping[str, Any]], fields: FieldMap,
                       source: str = "request", *,
                       max_record_bytes: int | None = None) -> list[Record]:
    """Validate records sent inline (a gRPC request) exactly as file records are, the
    size cap (``max_record_bytes``, default ``rise.constants.max_record_bytes()``)
    included."""
    cap = constants.max_record_bytes(max_record_bytes)
    objs = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InvalidInput(f"{source} record {i}: expected an object")
        size = _inline_bytes(row)
        if size > cap:
            raise _too_big(f"{source} record {i}", size, cap)
        objs.append((f"record {i}", dict(row)))
    return list(_validated(iter(objs), fields, source))


def _validated(rows: Iterator[tuple[str, dict[str, Any]]], fields: FieldMap,
               name: str, *, start: int = 0, unique: bool = True) -> Iterator[Record]:
    """Records of ``rows`` (numbered from ``start``); ``unique``: a repeated id raises
    (holding every id seen: planning checks big files with ``rise.idcheck`` instead)."""
    seen: dict[str, str] = {}
    for number, (loc, obj) in enumerate(rows, start):
        ident = _parse_id(obj.get(fields.id_field), fields.id_field, number, f"{name} {loc}")
        where = f"{name} {loc}, id {ident!r}"
        text = prompt = response = None
        if fields.is_prompt_response:
            # An empty prompt is allowed (the response is still supervised after the
            # special tokens); an empty response would leave nothing to learn.
            prompt = _string_field(obj, fields.prompt_field or "", where, non_blank=False)
            response = _string_field(obj, fields.response_field or "", where, non_blank=True)
        else:
            text = _string_field(obj, fields.text_field, where, non_blank=True)
        if unique:
            first = seen.get(ident)
            if first is not None:
                raise InvalidInput(f"duplicate id {ident!r} in {name}: {first} and {loc}")
            seen[ident] = loc
        yield Record(ident, number, text, prompt, response, obj)


def read_records(path: StrPath, fields: FieldMap, *, name: str | None = None,
                 max_record_bytes: int | None = None) -> list[Record]:
    """All validated records of a file, in file order (``name``, ``max_record_bytes``: as
    for ``iter_records``)."""
    return list(iter_records(path, fields, name=name, max_record_bytes=max_record_bytes))


def file_sha256(path: StrPath, name: str | None = None) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB blocks so large files stay cheap
    (``name``: what an error calls the file)."""
    digest = hashlib.sha256()
    with _open_binary(path, name) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_unique_ids(records: Iterable[Record], existing: Mapping[str, str] | None = None) -> None:
    """Raise InvalidInput if ids repeat among records or clash with ``existing``
    (live id -> description such as "index generation 2 record 7")."""
    existing = existing or {}
    seen: dict[str, int] = {}
    for rec in records:
        if rec.id in existing:
            other = existing[rec.id]
            raise InvalidInput(f"id {rec.id!r} of record {rec.number} clashes with {other}")
        if rec.id in seen:
            raise InvalidInput(f"duplicate id {rec.id!r}: record {seen[rec.id]} and {rec.number}")
        seen[rec.id] = rec.number


def _jsonl_line(raw: Mapping[str, Any], index: int) -> bytes:
    """One JSONL line; falls back to ASCII escapes for strings UTF-8 cannot hold."""
    try:
        text = json.dumps(raw, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"record {index} cannot be written as JSON: {e}") from None
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # lone surrogates survive only as \\u escapes
        return json.dumps(raw, ensure_ascii=True).encode("ascii") + b"\n"


def _dicts(raws: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Pass raws through, rejecting anything that is not a dict."""
    for i, raw in enumerate(raws):
        if not isinstance(raw, dict):
            raise InvalidInput(f"record {i} to write is a {type(raw).__name__}, not a dict")
        yield raw


def _write_parquet(f: IO[bytes], raws: list[dict[str, Any]]) -> None:
    """Write rows as Parquet; columns are the union of keys so no field is dropped."""
    # start-up: pyarrow only for Parquet (note at the top)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Table.from_pylist takes its columns from the first row only, so build them here.
    names = list(dict.fromkeys(k for raw in raws for k in raw))
    columns: dict[str, Any] = {}
    for name in names:
        try:
            columns[name] = pa.array([raw.get(name) for raw in raws])
        except (pa.ArrowException, TypeError) as e:
            raise InvalidInput(f"column {name!r} cannot be written as Parquet: {e}") from None
    pq.write_table(pa.table(columns), f)


def write_records(path: StrPath, raws: Iterable[dict[str, Any]]) -> None:
    """Write original records as JSONL or Parquet, atomically: a temp file in the same
    directory is renamed over ``path``, so a crash never leaves a half-written file."""
    fmt = _format(path)
    target = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise NotFound(f"directory not found: {directory}")
    # A hidden, random name in the same directory: os.replace is atomic only within one
    # file system, and concurrent writers must not share a temp file.
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        # "xb" rather than mkstemp so the file gets the usual umask-derived mode.
        with open(tmp, "xb") as f:
            if fmt == "parquet":
                _write_parquet(f, list(_dicts(raws)))
            elif fmt == "jsonl.gz":
                # The header holds a name and a time: use the target's name (not the temp
                # file's) and mtime=0 so identical records give identical bytes.
                name = os.path.basename(target)
                with gzip.GzipFile(name, mode="wb", fileobj=f, mtime=0) as gz:
                    gz.writelines(_jsonl_line(raw, i) for i, raw in enumerate(_dicts(raws)))
            else:
                f.writelines(_jsonl_line(raw, i) for i, raw in enumerate(_dicts(raws)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def encode_record(
    rec: Record, tokenizer: PreTrainedTokenizerBase, max_length: int, chat_template: bool = False
) -> Encoded:
    """Tokenize a record for training.  Plain text keeps its first max_length tokens;
    prompt/response keeps the whole response and the end of the prompt."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InvalidInput(f"max_length must be an integer of at least 2, got {max_length!r}")
    if rec.response is None:
        if rec.text is None:  # hand-built records only; read_records never makes these
            raise InvalidInput(f"record id {rec.id!r} has neither text nor a response")
        ids = list(tokenizer.encode(rec.text, add_special_tokens=True))
        if len(ids) < 2:
            raise InvalidInput(
                f"record id {rec.id!r}: text has {len(ids)} token(s), so no position is supervised"
            )
        return Encoded(ids[:max_length], sup_start=1, truncated=len(ids) > max_length)

    prompt = rec.prompt or ""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput("the tokenizer has no chat template; drop --chat-template")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = list(tokenizer.encode(rendered, add_special_tokens=False))
    else:
        prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    response_ids = list(tokenizer.encode(rec.response, add_special_tokens=False))
    if len(response_ids) > max_length:
        raise InvalidInput(
            f"record id {rec.id!r}: response is {len(response_ids)} tokens, over max_length "
            f"{max_length}; raise --max-length"
        )
    # Cut the prompt from the left: the response is the supervised part, and the tokens
    # nearest to it are the context that matters most.
    keep = max_length - len(response_ids)
    kept = prompt_ids[max(0, len(prompt_ids) - keep) :]
    encoded = Encoded(kept + response_ids, len(kept), truncated=len(kept) < len(prompt_ids))
    if encoded.n_supervised < 1:
        raise InvalidInput(f"record id {rec.id!r}: no supervised token left after tokenization")
    return encoded


# ------------------------------------------------------------------- streaming planning
#
# Planning an ingest reads the dataset once, streaming: it validates every record, counts
# them, feeds their ids to an IdChecker (bounded memory) and cuts the file into one byte
# range per shard (JSONL: the lines of its records; Parquet: the row groups that hold
# them), each with its sha256.  A shard task then reads only its range (a ranged GET on
# S3) and checks it against that hash, so no task holds or re-reads the whole dataset.


class ByteSource(Protocol):
    """Ranged reads of one dataset file (a local file, or an object read with ranged GETs)."""

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class FileBytes:
    """A ByteSource over a local file."""

    path: StrPath
    name: str | None = None

    def read(self, offset: int, length: int) -> bytes:
        with _open_binary(self.path, self.name) as f:
            f.seek(offset)
            return f.read(length)


@dataclass(frozen=True)
class DataRange:
    """The bytes of one shard's records: [offset, offset + length) hashing to sha256.
    JSONL: records [start, stop) begin on line ``line``.  Parquet: the row groups
    ``row_groups`` (their column chunks' span), whose first ``skip`` rows precede start."""

    start: int
    stop: int
    offset: int
    length: int
    sha256: str
    line: int = 1
    row_groups: tuple[int, ...] = ()
    skip: int = 0


@dataclass
class DataScan:
    """What one streaming pass over a dataset found."""

    fmt: str
    records: int
    sha256: str
    size: int
    ranges: list[DataRange]
    """One per shard; empty when the format has no byte ranges (gzip)."""
    tail_offset: int | None = None
    tail_sha256: str | None = None
    """Parquet: the file's last bytes (the footer a reader starts from) and their hash."""
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    """Records whose id digests repeat: to confirm with ``confirm_unique``."""


PARQUET_TAIL = 64 * 1024
"""Bytes at the end of a Parquet file every range read fetches (pyarrow's first footer
read; a longer footer is included whole)."""


def scan_dataset(path: StrPath, fields: FieldMap, shard_size: int, checker: IdChecker, *,
                 name: str | None = None, max_record_bytes: int | None = None) -> DataScan:
    """One streaming pass over a dataset: every record validated (as ``read_records``
    does), counted and its id given to ``checker``; the per-shard ranges; the file's
    sha256.  Memory does not grow with the file."""
    shown = name or os.fspath(path)
    fmt = _format(path, shown)
    cap = constants.max_record_bytes(max_record_bytes)
    if shard_size < 1:
        raise InvalidInput("shard size must be >= 1")
    if fmt == "jsonl":
        return _scan_jsonl(path, fields, shard_size, checker, shown, cap)
    count = 0
    for rec in _validated(_iter_rows(path, fmt, shown, cap), fields, shown, unique=False):
        checker.add(rec.id, rec.number)
        count += 1
    scan = DataScan(fmt=fmt, records=count, sha256=file_sha256(path, shown),
                    size=os.path.getsize(path), ranges=[])
    if fmt == "parquet" and count:
        _parquet_ranges(path, scan, shard_size, shown)
    scan.candidates = checker.candidates()
    return scan


def _iter_rows(path: StrPath, fmt: str, name: str, cap: int
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    if fmt == "parquet":
        return _parquet_rows(path, name, cap)
    return _jsonl_objects(path, fmt == "jsonl.gz", name, cap)


def _scan_jsonl(path: StrPath, fields: FieldMap, shard_size: int, checker: IdChecker,
                name: str, cap: int) -> DataScan:
    whole = hashlib.sha256()
    ranges: list[DataRange] = []
    open_range: list[Any] = []  # [start, offset, line, hasher] of the range being read
    number = 0
    size = 0

    def close(end: int) -> None:
        start, offset, line, h = open_range
        ranges.append(DataRange(start=start, stop=number, offset=offset,
                                length=end - offset, sha256=h.hexdigest(), line=line))

    with _open_binary(path, name) as stream:
        lines = _jsonl_lines(stream, name, cap)
        lineno = 0
        for loc, obj, start, line in lines:
            lineno += 1
            size = start + len(line)
            whole.update(line)
            if obj is not None:
                if number % shard_size == 0:
                    if open_range:
                        close(start)
                    open_range[:] = [number, 0 if number == 0 else start,
                                     1 if number == 0 else lineno, hashlib.sha256()]
                    if number == 0 and start:
                        open_range[3].update(_read_head(path, start, name))
                rec = next(_validated(iter([(loc, obj)]), fields, name, start=number,
                                      unique=False))
                checker.add(rec.id, number)
                number += 1
            if open_range:
                open_range[3].update(line)
    if open_range:
        close(size)
    return DataScan(fmt="jsonl", records=number, sha256=whole.hexdigest(), size=size,
                    ranges=ranges, candidates=checker.candidates())


def _read_head(path: StrPath, length: int, name: str) -> bytes:
    """The blank lines before the first record (part of range 0, which starts at 0)."""
    return FileBytes(path, name).read(0, length)


def _parquet_ranges(path: StrPath, scan: DataScan, shard_size: int, name: str) -> None:
    # start-up: pyarrow only for Parquet (note at the top)
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    bounds = []  # (first row, row count, byte start, byte end) per row group
    row = 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        lo, hi = scan.size, 0
        for c in range(rg.num_columns):
            col = rg.column(c)
            # some writers leave offset 0 for "no dictionary page": never before the data
            first = col.dictionary_page_offset if col.has_dictionary_page \
                and col.dictionary_page_offset else None
            begin = min(x for x in (first, col.data_page_offset) if x is not None)
            lo, hi = min(lo, begin), max(hi, begin + col.total_compressed_size)
        bounds.append((row, rg.num_rows, lo, max(hi, lo)))
        row += rg.num_rows
    src = FileBytes(path, name)
    for start in range(0, scan.records, shard_size):
        stop = min(start + shard_size, scan.records)
        groups = [g for g, (first, n, _, _) in enumerate(bounds)
                  if first < stop and first + n > start]
        lo = min(bounds[g][2] for g in groups)
        hi = max(bounds[g][3] for g in groups)
        scan.ranges.append(DataRange(start=start, stop=stop, offset=lo, length=hi - lo,
                                     sha256=_sha_of(src, lo, hi - lo),
                                     row_groups=tuple(groups),
                                     skip=start - bounds[groups[0]][0]))
    tail = max(0, scan.size - max(PARQUET_TAIL, meta.serialized_size + 8))
    scan.tail_offset = tail
    scan.tail_sha256 = _sha_of(src, tail, scan.size - tail)


def _sha_of(src: ByteSource, offset: int, length: int) -> str:
    h = hashlib.sha256()
    done = 0
    while done < length:
        block = src.read(offset + done, min(1 << 22, length - done))
        if not block:
            break
        h.update(block)
        done += len(block)
    return h.hexdigest()


def confirm_unique(path: StrPath, fields: FieldMap, scan: DataScan, *,
                   name: str | None = None, max_record_bytes: int | None = None,
                   existing: Callable[[str, int], str | None] | None = None) -> None:
    """InvalidInput naming the first repeated ids among ``scan.candidates`` (equal
    digests), confirmed on the ids themselves in one more pass over only those records.
    ``existing(id, tag)``: where an id of the index is (None: not there after all)."""
    if not scan.candidates:
        return
    shown = name or os.fspath(path)
    cap = constants.max_record_bytes(max_record_bytes)
    wanted = {c.later for c in scan.candidates} | \
        {c.earlier for c in scan.candidates if c.earlier >= 0}
    last = max(wanted)
    found: dict[int, tuple[str, str]] = {}
    for number, (loc, obj) in enumerate(_iter_rows(path, scan.fmt, shown, cap)):
        if number in wanted:
            rec = next(_validated(iter([(loc, obj)]), fields, shown, start=number,
                                  unique=False))
            found[number] = (rec.id, loc)
        if number >= last:
            break
    errors = []
    for c in scan.candidates:
        ident, loc = found[c.later]
        if c.earlier >= 0:
            first_id, first_loc = found[c.earlier]
            if first_id == ident:
                errors.append((ident, f"duplicate id {ident!r} in {shown}: {first_loc} and "
                                      f"{loc}"))
        elif existing is not None:
            other = existing(ident, c.earlier)
            if other is not None:
                errors.append((ident, f"id {ident!r} of record {c.later} clashes with {other}"))
    if errors:
        more = sorted({i for i, _ in errors[1:]} - {errors[0][0]})
        extra = f" (more repeated ids: {', '.join(map(repr, more[:3]))}" \
            f"{', ...' if len(more) > 3 else ''})" if more else ""
        raise InvalidInput(errors[0][1] + extra)


def read_range(src: ByteSource, scan_fmt: str, rng: DataRange, fields: FieldMap, *,
               name: str, max_record_bytes: int | None = None,
               tail: tuple[int, str] | None = None, size: int | None = None) -> list[Record]:
    """The records [rng.start, rng.stop) from their range alone, each byte checked against
    the range's sha256 (Mismatch naming the range when it changed since planning).
    Parquet needs the file's ``tail`` (offset, sha256) and ``size``."""
    cap = constants.max_record_bytes(max_record_bytes)
    data = _checked(src, rng.offset, rng.length, rng.sha256, name,
                    f"the range of records [{rng.start}, {rng.stop})")
    if scan_fmt == "jsonl":
        lines = _jsonl_lines(io.BytesIO(data), name, cap, first_line=rng.line,
                             first_number=rng.start)
        rows: Iterator[tuple[str, dict[str, Any]]] = \
            ((loc, obj) for loc, obj, _, _ in lines if obj is not None)
    elif scan_fmt == "parquet":
        if tail is None or size is None:
            raise InvalidInput(f"{name}: a Parquet range needs the file's footer and size")
        tail_data = _checked(src, tail[0], size - tail[0], tail[1], name, "the footer")
        f = _RangedFile(size, {rng.offset: data, tail[0]: tail_data})
        parquet_rows = _parquet_rows(f, name, cap, row_groups=list(rng.row_groups),
                                     first_number=rng.start - rng.skip)
        rows = itertools.islice(parquet_rows, rng.skip, rng.skip + rng.stop - rng.start)
    else:
        raise InvalidInput(f"{name}: {scan_fmt} has no byte ranges")
    out = list(_validated(rows, fields, name, start=rng.start))
    if len(out) != rng.stop - rng.start:
        raise Mismatch(f"{name}: the range of records [{rng.start}, {rng.stop}) holds "
                       f"{len(out)} records; the dataset changed since the job was planned")
    return out


def _checked(src: ByteSource, offset: int, length: int, digest: str, name: str,
             what: str) -> bytes:
    data = src.read(offset, length)
    got = hashlib.sha256(data).hexdigest()
    if len(data) != length or got != digest:
        raise Mismatch(f"{name}: {what} (bytes {offset} to {offset + length}) changed since "
                       f"the job was planned (sha256 {got[:12]} vs {digest[:12]})")
    return data


class _RangedFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some regions were fetched (and
    verified): enough for pyarrow to read the footer and the planned row groups.  A read
    outside them is an error, never bytes that were not checked."""

    def __init__(self, size: int, regions: dict[int, bytes]) -> None:
        super().__init__()
        self.size = size
        self.regions = sorted(regions.items())
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), max(0, self.size - self.pos))
        if not want:
            return 0
        for start, data in self.regions:
            if start <= self.pos and self.pos + want <= start + len(data):
                lo = self.pos - start
                buffer[:want] = data[lo:lo + want]
                self.pos += want
                return want
        raise OSError(f"read of bytes {self.pos} to {self.pos + want} outside the planned "
                      "ranges")
