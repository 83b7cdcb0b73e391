"""Hypothesis strategies for the fuzz run: request messages built by walking their
protobuf descriptors, dataset files of generated records, and malformed wire bytes.

``messages(descriptor, hints)`` walks a message descriptor of rise.v1 and draws every
field from the generic strategy of its type (``scalar``): strings with unicode, control
characters, newlines and very long runs; integers at their type's extremes (0, 1, 2^31,
2^32 - 1, 2^63, 2^64 - 1); doubles with NaN, infinities, -0.0, subnormals and the bounds of
the documented ranges; enums with unknown values; nested messages set or left unset (their
presence matters: ``HasField``); repeated fields empty, short, or just past the limits.
``hints`` maps a field's full name to a strategy of values that mean something to the
service (an index that exists, a job id, a dataset of the tenant); a hinted field takes the
hint most of the time and a generic value otherwise, so requests get past the first check
often enough to reach the later ones.  Nothing here knows the gateway's code: the walker
sees only descriptors, the hints only the README's and the proto's words.

``datasets()`` draws a dataset file (JSONL, gzip, Parquet or an unknown extension) of
generated records, with the job ends ``docs/bad-input.md`` allows for it: deep JSON at and
past 64 levels, ids at and past 256 bytes, numbers at and past 4300 digits, records at and
past the size cap, invalid UTF-8, empty and one-token texts, duplicate ids, lines that are
not objects, and free-form JSON records.

``wire_bytes(descriptor)`` draws bytes a protobuf parser must refuse: a string field
holding invalid UTF-8, a truncated field, a length past the end.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from collections.abc import Mapping
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

FD = FieldDescriptor

# ------------------------------------------------------------------------------ scalars

SPECIAL_STRINGS = [
    "", " ", "  ", "\n", "\r\n", "\t", "\x00", "\x7f", "\x1b[2J", "\u0085", "\u00a0",
    "\u2028", "\u202e", "\ufeff", "\ufffd", "😀", "é", "a", "ab", ".", "..", "../..", "/", "//",
    "\\", "*", "?", "#", "%", "%00", "%2e%2e", "%s%s%n", "{}", "[]", "null", "NaN", "-1",
    "0", "1e309", "docs", "docs\n", "\ndocs", "Docs", "docs ", " docs", "-docs", ".docs",
    "a" * 63, "a" * 64, "<|endoftext|>", "<|pad|>", "' OR '1'='1", "${jndi:x}", "tenants",
    "tenants/", "s3://", "file:///etc/passwd", "/etc/passwd", "CON", "nul",
]
"""Strings every field gets now and then: edges of names, paths, encodings, escapes."""

LONG_SIZES = [63, 64, 65, 128, 129, 255, 256, 257, 1000, 4301, 70_000, 2**20 + 1]
"""Lengths of the long runs: name and id limits (63, 256 bytes), just past the 1 MiB
record cap.  70,000 characters is the longest run under the cap: a query of 70k tokens
is sketched (seconds on the tiny model), never a million-token one."""


def long_strings() -> st.SearchStrategy[str]:
    return st.builds(lambda unit, n: (unit * n)[: n if len(unit) == 1 else n * len(unit)],
                     st.sampled_from(["x", "é", "😀", "\n", " ", "a\x00", "ab\n"]),
                     st.sampled_from(LONG_SIZES))


def strings(small: bool = False) -> st.SearchStrategy[str]:
    """Unicode text (no lone surrogates: protobuf cannot put them on the wire; invalid
    UTF-8 is ``wire_bytes``'s), ASCII, control characters, the special strings, and long
    runs unless ``small``."""
    parts = [
        st.text(max_size=30),
        st.text(st.characters(codec="ascii"), max_size=30),
        st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=8),
        st.text(st.characters(categories=["Zs", "Zl", "Zp", "Cc", "Cf", "Mn"]), min_size=1,
                max_size=8),
        st.sampled_from(SPECIAL_STRINGS),
    ]
    if not small:
        parts.append(long_strings())
    return st.one_of(parts)


U32_EDGES = [0, 1, 2, 3, 255, 256, 1024, 2**16 - 1, 2**16, 2**16 + 1, 2**20, 2**31 - 1, 2**31,
             2**32 - 2, 2**32 - 1]
I32_EDGES = [0, 1, -1, 2**31 - 1, -(2**31)]
U64_EDGES = [0, 1, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
I64_EDGES = [0, 1, -1, 2**63 - 1, -(2**63)]
DOUBLE_EDGES = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-300,
                5e-324, 1.7976931348623157e308, 0.05, 0.0499999, 100.0, 100.0000001, 0.5,
                1.0000001, 1e-9, 60.0, 60.0001]


def _ints(lo: int, hi: int, edges: list[int]) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def scalar(field: FieldDescriptor, small: bool = False) -> st.SearchStrategy[Any]:
    """The generic strategy of a non-message field's type."""
    t = field.type
    if t == FD.TYPE_STRING:
        return strings(small)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.one_of(st.sampled_from(DOUBLE_EDGES), st.floats())
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _ints(0, 2**32 - 1, U32_EDGES)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _ints(-(2**31), 2**31 - 1, I32_EDGES)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _ints(0, 2**64 - 1, U64_EDGES)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _ints(-(2**63), 2**63 - 1, I64_EDGES)
    if t == FD.TYPE_ENUM:  # proto3 enums are open: unknown numbers must be handled too
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1, I32_EDGES))
    raise TypeError(f"{field.full_name}: no strategy for field type {t}")


# ------------------------------------------------------------------------------ messages

Hints = Mapping[str, st.SearchStrategy[Any]]

HINT_PERCENT = 75
"""How often a hinted field takes its hint rather than a generic value (wild requests)."""
TAME_HINT_PERCENT = 99
"""The same for tame requests: nearly every field meaningful, now and then one generic."""

REPEATED_COUNTS = [1, 2, 0, 1, 3, 5, 8, 255, 256, 257, 300]
"""Lengths of repeated fields: empty, short, and around the 256 queries of a call.  The
first of a list is what Hypothesis draws most (its simplest choice): one element."""


def is_repeated(field: FieldDescriptor) -> bool:
    rep = getattr(field, "is_repeated", None)
    return bool(rep) if rep is not None else field.label == FD.LABEL_REPEATED


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, hints: Hints | None = None,
             small: bool = False, depth: int = 0, hint_percent: int = HINT_PERCENT) -> Any:
    """A message of ``descriptor``'s class with every field drawn (see the module); a
    hinted field takes its hint ``hint_percent`` % of the time."""
    hints = hints or {}
    msg = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.has_presence and not is_repeated(field) and not draw(st.booleans()):
            continue  # a message field or a proto3 `optional` left unset
        if is_repeated(field):
            n = draw(st.sampled_from(REPEATED_COUNTS))
            many = small or n > 8  # long lists hold small values: one message stays < 64 MiB
            values = [draw(_value(field, hints, many, depth, hint_percent)) for _ in range(n)]
            target = getattr(msg, field.name)
            if field.type == FD.TYPE_MESSAGE:
                for v in values:
                    target.add().CopyFrom(v)
            else:
                target.extend(values)
            continue
        value = draw(_value(field, hints, small, depth, hint_percent))
        if field.type == FD.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(value)
        else:
            setattr(msg, field.name, value)  # setattr: a field may be called `lambda`
    return msg


def _value(field: FieldDescriptor, hints: Hints, small: bool, depth: int, hint_percent: int
           ) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        if depth > 8:
            raise RecursionError(f"{field.full_name}: messages nest deeper than 8")
        generic = messages(field.message_type, hints, small, depth + 1, hint_percent)
    else:
        generic = scalar(field, small)
    hint = hints.get(field.full_name)
    if hint is None:
        return generic
    return st.integers(0, 99).flatmap(lambda k: hint if k < hint_percent else generic)


# ------------------------------------------------------------------------------ unknown fields and wire bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Well-formed fields of numbers no rise.v1 message uses (proto3 keeps and ignores
    them): every wire type, the largest field number."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        number = draw(st.one_of(st.integers(100, 10_000), st.just(2**29 - 1)))
        wt = draw(st.sampled_from([0, 1, 2, 5]))
        if wt == 0:
            payload = _varint(draw(st.integers(0, 2**64 - 1)))
        elif wt == 1:
            payload = draw(st.binary(min_size=8, max_size=8))
        elif wt == 5:
            payload = draw(st.binary(min_size=4, max_size=4))
        else:
            body = draw(st.binary(max_size=32))
            payload = _varint(len(body)) + body
        out += _tag(number, wt) + payload
    return out


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xc0\xaf", b"ok\x80"]


@st.composite
def wire_bytes(draw: st.DrawFn, descriptor: Descriptor) -> tuple[str, bytes]:
    """(kind, bytes) a parser of ``descriptor`` must refuse."""
    strings_ = [f for f in descriptor.fields if f.type == FD.TYPE_STRING]
    kinds = ["truncated", "overlong-length", "bad-wire-type"] + (["invalid-utf8"] if strings_
                                                                 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "invalid-utf8":
        field = draw(st.sampled_from(strings_))
        body = draw(st.sampled_from(INVALID_UTF8))
        return kind, _tag(field.number, 2) + _varint(len(body)) + body
    number = draw(st.sampled_from([f.number for f in descriptor.fields] or [1]))
    if kind == "truncated":  # a varint whose continuation bit promises more bytes
        return kind, _tag(number, 0) + b"\xff\xff"
    if kind == "overlong-length":  # a length-delimited field longer than the message
        return kind, _tag(number, 2) + _varint(draw(st.integers(5, 2**31))) + b"abc"
    return kind, _tag(number, draw(st.sampled_from([3, 4, 6, 7]))) + b"\x00"  # groups, 6, 7


# ------------------------------------------------------------------------------ datasets

INVALID = "FAILED:INVALID_ARGUMENT"
SUCCEEDED = "SUCCEEDED"


@dataclasses.dataclass
class Dataset:
    """A generated dataset file and the job ends allowed for a CreateIndex of it with the
    default field map (``rise.data``'s rules, ``docs/bad-input.md``)."""

    kind: str
    suffix: str
    data: bytes
    expect: frozenset[str]
    ids: list[str] | None = None  # the ids it adds when it is valid, when known
    at_cap: bool = False  # holds a record at the size cap (a long sequence to sketch)
    structural: bool = True
    """The expectation holds whatever the field map (the file, the JSON, the record's size
    are at fault); False when the fault is in a field another map would not read (an id,
    a text)."""

    def summary(self) -> str:
        return f"{self.kind}{self.suffix} ({len(self.data)} bytes)"


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def n_tokens(text: str) -> int:
    """Tokens of ``text`` under the tests' byte tokenizer (``conftest.byte_tokenizer``: one
    token per UTF-8 byte, the two special tokens one each)."""
    for special in ("<|endoftext|>", "<|pad|>"):
        text = text.replace(special, "\x00")
    return len(text.encode("utf-8"))


def good_text() -> st.SearchStrategy[str]:
    """A text a record may hold: not blank, at least two tokens (one position supervised)."""
    return st.one_of(st.text(min_size=2, max_size=60), st.sampled_from(
        ["The fox runs.", "Shards are immutable.", "é😀 mixed ünïcode", "tab\tand\nnewline"]),
    ).filter(lambda t: bool(t.strip()) and n_tokens(t) >= 2)


@st.composite
def good_rows(draw: st.DrawFn, tag: str, n_max: int = 12) -> list[dict[str, Any]]:
    n = draw(st.integers(1, n_max))
    return [{"id": f"{tag}-{i}", "text": draw(good_text())} for i in range(n)]


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), strings(small=True))
json_values = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(strings(small=True), kids, max_size=4)),
    max_leaves=12)


def _nested(levels: int) -> Any:
    """A value nesting ``levels`` arrays and objects (no recursion to build it)."""
    v: Any = 0
    for i in range(levels):
        v = [v] if i % 2 else {"k": v}
    return v


def _deep_line(total_depth: int) -> bytes:
    """One record nested ``total_depth`` levels (the record object is level 1), written
    without json.dumps' recursion."""
    inner = total_depth - 1
    return (b'{"id": "deep", "text": "deep text", "a": ' + b"[" * inner + b"]" * inner
            + b"}\n")


@st.composite
def datasets(draw: st.DrawFn, tag: str, cap: int) -> Dataset:
    """A dataset file (see the module); ``tag`` makes its ids unique in the run, ``cap``
    is the record size cap of the services (RISE_MAX_RECORD_BYTES)."""
    kind = draw(st.sampled_from([
        "good", "good", "records", "records", "deep", "digits", "id-size", "oversized",
        "non-utf8", "bom", "empty-text", "not-object", "duplicate-ids", "blank", "surrogate",
        "one-token", "format", "crlf"]))
    if kind == "good":
        rows = draw(good_rows(tag))
        return Dataset(kind, ".jsonl", _jsonl(rows), frozenset({SUCCEEDED}),
                       [r["id"] for r in rows])
    if kind == "records":  # free-form JSON objects: valid or not, never INTERNAL
        rows = draw(st.lists(st.dictionaries(
            st.one_of(st.sampled_from(["id", "text", "prompt", "response"]),
                      strings(small=True)),
            st.one_of(json_values, good_text()), max_size=5), min_size=1, max_size=6))
        return Dataset(kind, ".jsonl", _jsonl(rows), frozenset({SUCCEEDED, INVALID}))
    if kind == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 200, 100_000]))
        if depth > 1000:  # Python's own decoder would recurse past its limit on this one
            data = _deep_line(depth)
        else:
            data = _jsonl([{"id": f"{tag}-deep", "text": "deep text", "a": _nested(depth - 1)}])
        return Dataset(f"deep-{depth}", ".jsonl", data,
                       frozenset({SUCCEEDED if depth <= 64 else INVALID}),
                       [f"{tag}-deep"] if depth <= 64 and depth <= 1000 else None)
    if kind == "digits":
        digits = draw(st.sampled_from([4300, 4301, 5000]))
        where = draw(st.sampled_from(["field", "id"]))
        number = "7" * digits
        if where == "id":  # an id of thousands of digits is over 256 bytes either way
            data = ('{"id": ' + number + ', "text": "digits"}\n').encode()
            return Dataset(f"digits-{digits}-id", ".jsonl", data, frozenset({INVALID}))
        data = ('{"id": "' + tag + '-dig", "text": "digits", "n": ' + number + '}\n').encode()
        ok = digits <= 4300
        return Dataset(f"digits-{digits}", ".jsonl", data,
                       frozenset({SUCCEEDED if ok else INVALID}), [f"{tag}-dig"] if ok else None)
    if kind == "id-size":
        form = draw(st.sampled_from(["str-256", "str-257", "int-256", "int-257", "neg-256",
                                     "utf8-256", "utf8-258", "int-huge"]))
        ident: Any
        if form == "str-256":
            ident = tag + "x" * (256 - len(tag))
        elif form == "str-257":
            ident = tag + "x" * (257 - len(tag))
        elif form == "utf8-256":
            ident = "é" * 128
        elif form == "utf8-258":
            ident = "é" * 129
        elif form == "int-256":
            ident = int("9" * 256)
        elif form == "neg-256":  # 256 digits and a sign: 257 bytes
            ident = -int("9" * 256)
        elif form == "int-257":
            ident = int("1" + "0" * 256)
        else:
            ident = 10**4000
        ok = form in ("str-256", "int-256", "utf8-256")
        data = ('{"id": ' + (json.dumps(ident) if isinstance(ident, str) else str(ident))
                + ', "text": "id size"}\n').encode()
        return Dataset(f"id-{form}", ".jsonl", data, frozenset({SUCCEEDED if ok else INVALID}),
                       [str(ident)] if ok else None, structural=False)
    if kind == "oversized":
        over = draw(st.sampled_from([1, 1, 2**20]))  # bytes past the cap; 0: at the cap
        at_cap = draw(st.integers(0, 2)) == 0
        size = cap if at_cap else cap + over
        head = ('{"id": "' + tag + '-big", "text": "').encode()
        tail = b'"}'
        body = head + b"a" * (size - len(head) - len(tail)) + tail
        return Dataset("at-cap" if at_cap else f"over-cap+{over}", ".jsonl", body + b"\n",
                       frozenset({SUCCEEDED if at_cap else INVALID}),
                       [f"{tag}-big"] if at_cap else None, at_cap=at_cap)
    if kind == "non-utf8":
        bad = draw(st.sampled_from(INVALID_UTF8))
        data = b'{"id": "nu", "text": "caf' + bad + b'"}\n'
        return Dataset(kind, ".jsonl", data, frozenset({INVALID}))
    if kind == "bom":  # a BOM on line 1 is allowed (editors write it)
        rows = draw(good_rows(tag, 3))
        return Dataset(kind, ".jsonl", b"\xef\xbb\xbf" + _jsonl(rows), frozenset({SUCCEEDED}),
                       [r["id"] for r in rows])
    if kind == "empty-text":
        text = draw(st.sampled_from(["", " ", "\n\t", "\u00a0\u2003", None, 7, ["t"],
                                     {"t": 1}, "MISSING"]))
        row: dict[str, Any] = {"id": "e"}
        if text != "MISSING":
            row["text"] = text
        return Dataset(kind, ".jsonl", _jsonl([row]), frozenset({INVALID}), structural=False)
    if kind == "not-object":
        line = draw(st.sampled_from(["[1, 2]", '"text"', "3", "null", "true", "{", "}",
                                     '{"id": "x", "text": "t"', "{'id': 'x'}", "NaN"]))
        return Dataset(kind, ".jsonl", (line + "\n").encode(), frozenset({INVALID}))
    if kind == "duplicate-ids":
        rows = [{"id": "same", "text": "first text"}, {"id": "same", "text": "second text"}]
        if draw(st.booleans()):  # an integer id and its string are the same id
            rows = [{"id": 7, "text": "first text"}, {"id": "7", "text": "second text"}]
        return Dataset(kind, ".jsonl", _jsonl(rows), frozenset({INVALID}), structural=False)
    if kind == "blank":
        data = draw(st.sampled_from([b"", b"\n", b"\n\n  \n", b"\r\n\t\n"]))
        return Dataset(kind, ".jsonl", data, frozenset({INVALID}))
    if kind == "surrogate":
        data = b'{"id": "s", "text": "lone \\ud800 surrogate"}\n'
        if draw(st.booleans()):
            data = b'{"id": "\\udfff", "text": "a surrogate id"}\n'
        return Dataset(kind, ".jsonl", data, frozenset({INVALID}), structural=False)
    if kind == "one-token":
        text = draw(st.sampled_from(["a", "<|endoftext|>", "\x00"]))
        return Dataset(kind, ".jsonl", _jsonl([{"id": "o", "text": text}]), frozenset({INVALID}),
                       structural=False)
    if kind == "crlf":
        rows = draw(good_rows(tag, 4))
        data = b"".join(json.dumps(r).encode() + b"\r\n" for r in rows)
        return Dataset(kind, ".jsonl", data, frozenset({SUCCEEDED}), [r["id"] for r in rows])
    # "format": the extension says one format, the bytes another, or both agree
    rows = draw(good_rows(tag, 4))
    ids = [r["id"] for r in rows]
    form = draw(st.sampled_from(["gz-ok", "gz-not-gzip", "gz-truncated", "parquet-ok",
                                 "parquet-not-parquet", "json-ext", "txt-ext", "no-ext",
                                 "upper-ext"]))
    plain = _jsonl(rows)
    if form == "gz-ok":
        return Dataset(form, ".jsonl.gz", gzip.compress(plain, mtime=0), frozenset({SUCCEEDED}),
                       ids)
    if form == "gz-not-gzip":
        return Dataset(form, ".jsonl.gz", plain, frozenset({INVALID}))
    if form == "gz-truncated":
        return Dataset(form, ".jsonl.gz", gzip.compress(plain, mtime=0)[:-9],
                       frozenset({INVALID}))
    if form == "parquet-ok":
        return Dataset(form, ".parquet", _parquet(rows), frozenset({SUCCEEDED}), ids)
    if form == "parquet-not-parquet":
        return Dataset(form, ".parquet", plain, frozenset({INVALID}))
    if form == "json-ext":
        return Dataset(form, ".json", plain, frozenset({SUCCEEDED}), ids)
    if form == "upper-ext":  # extensions are matched case-insensitively
        return Dataset(form, ".JSONL", plain, frozenset({SUCCEEDED}), ids)
    return Dataset(form, ".txt" if form == "txt-ext" else "", plain, frozenset({INVALID}))


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()

