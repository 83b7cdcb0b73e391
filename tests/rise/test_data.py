"""Unit tests for rise.data: reading, validating, writing and tokenizing records."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rise.data import (
    Encoded,
    FieldMap,
    FileBytes,
    Record,
    check_unique_ids,
    encode_record,
    file_sha256,
    iter_records,
    read_range,
    read_records,
    scan_dataset,
    write_records,
)
from rise.errors import InvalidInput, Mismatch, NotFound
from rise.idcheck import IdChecker
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"w{i}" for i in range(50)]
SPECIALS = ["<unk>", "<s>", "</s>", "<user>", "<asst>"]
BOS = 1
PR = FieldMap(prompt_field="prompt", response_field="response")


def _make_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built in memory: token id = vocabulary position."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        # Like Llama: add_special_tokens=True prepends BOS.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} <asst>{% endif %}"
    )
    return fast


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer that prepends BOS."""
    return _make_tokenizer()


@pytest.fixture(scope="module")
def bare_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer without any special tokens added."""
    return _make_tokenizer(with_bos=False)


def wid(word: str) -> int:
    """Token id of a word in the test vocabulary."""
    return len(SPECIALS) + WORDS.index(word)


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Write raw JSONL lines (str encoded as UTF-8, bytes as-is)."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def rec(**kw: Any) -> Record:
    """A hand-built record."""
    base: dict[str, Any] = {"id": "r", "number": 0, "text": None, "prompt": None, "response": None}
    base.update(kw)
    return Record(raw={}, **base)


def error_of(fn: Callable[[], Any], kind: type[Exception] = InvalidInput) -> str:
    """Run fn, expect `kind`, return its one-line message."""
    with pytest.raises(kind) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---- reading: bad input ---------------------------------------------------------------


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    msg = error_of(lambda: read_records(path, FieldMap()), NotFound)
    assert str(path) in msg
    # Checked eagerly, before the first record is pulled.
    error_of(lambda: iter_records(path, FieldMap()), NotFound)
    error_of(lambda: file_sha256(path), NotFound)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "data.csv" in msg and "extension" in msg


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a b"}', b'{"text": "\xff\xfe"}'])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "UTF-8" in msg and "line 2" in msg and str(path) in msg


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', "", '{"text": "b",'])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "invalid JSON" in msg and "line 3" in msg and "record 1" in msg and str(path) in msg


@pytest.mark.parametrize(("line", "kind"), [("[1, 2]", "array"), ('"text"', "str"), ("3", "int")])
def test_non_object_line(tmp_path: Path, line: str, kind: str) -> None:
    path = write_lines(tmp_path / "d.json", [line])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "not a JSON object" in msg and kind in msg and "line 1" in msg


def test_missing_field_named(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"id": "x", "txt": "a"}'])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "missing field 'text'" in msg and "'x'" in msg and "line 1" in msg
    path = write_lines(tmp_path / "p.jsonl", ['{"id": "x", "prompt": "a"}'])
    assert "missing field 'response'" in error_of(lambda: read_records(path, PR))
    path = write_lines(tmp_path / "n.jsonl", ['{"id": "x", "text": null}'])
    assert "missing field 'text'" in error_of(lambda: read_records(path, FieldMap()))


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_text_and_response(tmp_path: Path, value: str) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"id": "e1", "text": value})])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "'text'" in msg and "empty" in msg and "'e1'" in msg and "line 1" in msg
    path = write_lines(
        tmp_path / "p.jsonl", [json.dumps({"id": "e2", "prompt": "a", "response": value})]
    )
    msg = error_of(lambda: read_records(path, PR))
    assert "'response'" in msg and "empty" in msg and "'e2'" in msg


def test_empty_prompt_is_allowed(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "", "response": "a"}'])
    assert read_records(path, PR)[0].prompt == ""


@pytest.mark.parametrize("value", [3, ["a"], {"a": 1}, True])
def test_non_string_text(tmp_path: Path, value: Any) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"id": "n", "text": value})])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "'text'" in msg and "must be a string" in msg and "'n'" in msg


@pytest.mark.parametrize("value", [True, 1.5, [1], {"a": 1}])
def test_bad_id_types(tmp_path: Path, value: Any) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"id": value, "text": "a"})])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "id field 'id'" in msg and type(value).__name__ in msg and "line 1" in msg


def test_id_length_limit_in_utf8_bytes(tmp_path: Path) -> None:
    ok = "é" * 128  # 256 bytes
    path = write_lines(tmp_path / "ok.jsonl", [json.dumps({"id": ok, "text": "a"})])
    assert read_records(path, FieldMap())[0].id == ok
    path = write_lines(tmp_path / "long.jsonl", [json.dumps({"id": ok + "a", "text": "a"})])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "257 UTF-8 bytes" in msg
    path = write_lines(tmp_path / "empty.jsonl", ['{"id": "", "text": "a"}'])
    assert "0 UTF-8 bytes" in error_of(lambda: read_records(path, FieldMap()))


def test_lone_surrogate_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"id": "s", "text": "a \\ud800"}'])
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "'text'" in msg and "Unicode" in msg and "line 1" in msg


def test_duplicate_id_names_both_records(tmp_path: Path) -> None:
    lines = ['{"id": "a", "text": "x"}', "", '{"id": "b", "text": "x"}', '{"id": "a", "text": "y"}']
    path = write_lines(tmp_path / "d.jsonl", lines)
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "duplicate id 'a'" in msg
    assert "line 1 (record 0)" in msg and "line 4 (record 2)" in msg and str(path) in msg
    # Streaming yields the records before the duplicate, then raises.
    it = iter_records(path, FieldMap())
    assert [next(it).id, next(it).id] == ["a", "b"]
    with pytest.raises(InvalidInput, match="duplicate id 'a'"):
        next(it)


def test_absent_id_clashing_with_explicit_id(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"id": "1", "text": "x"}', '{"text": "y"}'])
    assert "duplicate id '1'" in error_of(lambda: read_records(path, FieldMap()))


def test_bad_gzip_and_bad_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    assert "gzip" in error_of(lambda: read_records(path, FieldMap()))
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet")
    assert "Parquet" in error_of(lambda: read_records(path, FieldMap()))


# ---- reading: ids and numbering -------------------------------------------------------


def test_blank_lines_skipped_and_ids(tmp_path: Path) -> None:
    lines = ['{"id": 7, "text": "a"}', "", "   ", '{"text": "b"}', '{"id": "z", "text": "c"}']
    path = write_lines(tmp_path / "d.jsonl", lines)
    records = read_records(path, FieldMap())
    assert [r.id for r in records] == ["7", "1", "z"]
    assert [r.number for r in records] == [0, 1, 2]
    assert records[0].raw == {"id": 7, "text": "a"}


def test_custom_fields_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"key": 5, "body": "a b"}\n')
    records = read_records(path, FieldMap(text_field="body", id_field="key"))
    assert records[0].id == "5" and records[0].text == "a b"


def test_parquet_without_id_column_and_null_ids(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), path)
    assert [r.id for r in read_records(path, FieldMap())] == ["0", "1"]
    pq.write_table(pa.table({"id": [10, None, 12], "text": ["a", "b", "c"]}), path)
    assert [r.id for r in read_records(path, FieldMap())] == ["10", "1", "12"]


def test_parquet_errors_name_record(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", " "]}), path)
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "record 1" in msg and "'b'" in msg and "'text'" in msg and str(path) in msg
    pq.write_table(pa.table({"id": ["a", "a"], "text": ["x", "y"]}), path)
    msg = error_of(lambda: read_records(path, FieldMap()))
    assert "duplicate id 'a'" in msg and "record 0" in msg and "record 1" in msg


# ---- writing ---------------------------------------------------------------------------


RAWS = [
    {"id": "a", "text": "x y", "meta": {"k": 1}},
    {"id": "b", "text": "é ☃", "extra": 2.5},
    {"id": "c", "text": "z"},
]


@pytest.mark.parametrize("name", ["out.jsonl", "out.json", "out.jsonl.gz", "out.parquet"])
def test_write_read_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write_records(path, iter(RAWS))
    records = read_records(path, FieldMap())
    assert [r.id for r in records] == ["a", "b", "c"]
    assert [r.text for r in records] == ["x y", "é ☃", "z"]
    raws = [{k: v for k, v in r.raw.items() if v is not None} for r in records]
    assert raws == RAWS  # Parquet fills absent keys with null; no key is dropped
    assert os.listdir(tmp_path) == [name]  # no temp file left behind
    write_records(path, [])
    assert read_records(path, FieldMap()) == []


def test_write_gzip_is_reproducible(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    write_records(path, RAWS)
    first = file_sha256(path)
    write_records(path, RAWS)  # a different temp file name must not reach the header
    assert file_sha256(path) == first
    assert gzip.decompress(path.read_bytes()).count(b"\n") == 3


def test_write_failure_leaves_target_untouched(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    bad: list[Any] = [{"id": "a"}, "not a dict"]
    msg = error_of(lambda: write_records(path, bad))
    assert "record 1" in msg
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]
    error_of(lambda: write_records(path, [{"x": object()}]))
    assert os.listdir(tmp_path) == ["out.jsonl"]
    msg = error_of(lambda: write_records(tmp_path / "p.parquet", [{"id": 1}, {"id": "a"}]))
    assert "'id'" in msg and os.listdir(tmp_path) == ["out.jsonl"]


def test_write_errors(tmp_path: Path) -> None:
    error_of(lambda: write_records(tmp_path / "missing" / "x.jsonl", RAWS), NotFound)
    error_of(lambda: write_records(tmp_path / "x.txt", RAWS))


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob.jsonl"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several 1 MiB blocks
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


# ---- id uniqueness across files and index generations ---------------------------------


def test_check_unique_ids() -> None:
    records = [rec(id="a", number=0), rec(id="b", number=1)]
    check_unique_ids(records)
    check_unique_ids(records, {"c": "index generation 1 record 0"})
    msg = error_of(lambda: check_unique_ids(records, {"b": "index generation 2 record 7"}))
    assert "'b'" in msg and "record 1" in msg and "index generation 2 record 7" in msg
    msg = error_of(lambda: check_unique_ids([*records, rec(id="a", number=5)]))
    assert "duplicate id 'a'" in msg and "record 0" in msg and "5" in msg


# ---- FieldMap --------------------------------------------------------------------------


def test_field_map() -> None:
    assert not FieldMap().is_prompt_response and PR.is_prompt_response
    fm = FieldMap(id_field="k", prompt_field="p", response_field="r", chat_template=True)
    assert FieldMap.from_dict(json.loads(json.dumps(fm.to_dict()))) == fm
    assert "both" in error_of(lambda: FieldMap(prompt_field="p"))
    assert "both" in error_of(lambda: FieldMap(response_field="r"))
    assert "chat_template" in error_of(lambda: FieldMap(chat_template=True))
    assert "differ" in error_of(lambda: FieldMap(prompt_field="x", response_field="x"))
    assert "text_field" in error_of(lambda: FieldMap(text_field=""))
    assert "colour" in error_of(lambda: FieldMap.from_dict({"colour": "red"}))


# ---- encoding --------------------------------------------------------------------------


def test_plain_text_encoding(tokenizer: PreTrainedTokenizerFast) -> None:
    enc = encode_record(rec(text="a b c"), tokenizer, max_length=10)
    assert enc == Encoded([BOS, wid("a"), wid("b"), wid("c")], sup_start=1, truncated=False)
    assert enc.n_supervised == 3  # every next-token position


def test_plain_text_truncated_from_right(tokenizer: PreTrainedTokenizerFast) -> None:
    enc = encode_record(rec(text="a b c d e"), tokenizer, max_length=3)
    assert enc.input_ids == [BOS, wid("a"), wid("b")] and enc.truncated
    assert enc.n_supervised == 2
    exact = encode_record(rec(text="a b"), tokenizer, max_length=3)
    assert not exact.truncated


def test_plain_text_too_short(bare_tokenizer: PreTrainedTokenizerFast) -> None:
    msg = error_of(lambda: encode_record(rec(id="s1", text="a"), bare_tokenizer, 8))
    assert "'s1'" in msg and "supervised" in msg


def test_prompt_response_encoding(tokenizer: PreTrainedTokenizerFast) -> None:
    enc = encode_record(rec(prompt="a b", response="c d"), tokenizer, max_length=10)
    assert enc.input_ids == [BOS, wid("a"), wid("b"), wid("c"), wid("d")]
    assert enc.sup_start == 3 and not enc.truncated
    # Hidden position t is supervised iff t+1 >= sup_start: positions 2 and 3 predict c, d.
    supervised = [t for t in range(len(enc.input_ids) - 1) if t + 1 >= enc.sup_start]
    assert supervised == [2, 3] and enc.n_supervised == 2


def test_prompt_cut_from_left_never_response(tokenizer: PreTrainedTokenizerFast) -> None:
    enc = encode_record(rec(prompt="a b c d", response="x y z"), tokenizer, max_length=5)
    assert enc.input_ids == [wid("c"), wid("d"), wid("x"), wid("y"), wid("z")]
    assert enc.sup_start == 2 and enc.truncated and enc.n_supervised == 3
    # Response exactly fills the window: prompt gone, first response token unpredicted.
    enc = encode_record(rec(prompt="a b", response="x y z"), tokenizer, max_length=3)
    assert enc.input_ids == [wid("x"), wid("y"), wid("z")]
    assert enc.sup_start == 0 and enc.truncated and enc.n_supervised == 2


def test_response_too_long(tokenizer: PreTrainedTokenizerFast) -> None:
    msg = error_of(lambda: encode_record(rec(id="r9", prompt="a", response="x y z"), tokenizer, 2))
    assert "'r9'" in msg and "--max-length" in msg


def test_no_supervised_token(bare_tokenizer: PreTrainedTokenizerFast) -> None:
    msg = error_of(lambda: encode_record(rec(id="q", prompt="", response="x"), bare_tokenizer, 4))
    assert "'q'" in msg and "supervised" in msg


def test_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    enc = encode_record(rec(prompt="a", response="b"), tokenizer, 10, chat_template=True)
    # Rendered prompt is tokenized without BOS: the template owns the special tokens.
    assert enc.input_ids == [3, wid("a"), 4, wid("b")] and enc.sup_start == 3


def test_bad_max_length(tokenizer: PreTrainedTokenizerFast) -> None:
    for bad in (1, 0, True):
        assert "max_length" in error_of(lambda b=bad: encode_record(rec(text="a b"), tokenizer, b))


@settings(max_examples=60, deadline=None)
@given(
    prompt=st.lists(st.sampled_from(WORDS), max_size=12),
    response=st.lists(st.sampled_from(WORDS), min_size=1, max_size=8),
    max_length=st.integers(min_value=2, max_value=16),
)
def test_prompt_response_invariants(
    tokenizer: PreTrainedTokenizerFast, prompt: list[str], response: list[str], max_length: int
) -> None:
    prompt_ids = [BOS] + [wid(w) for w in prompt]
    response_ids = [wid(w) for w in response]
    r = rec(prompt=" ".join(prompt), response=" ".join(response))
    if len(response_ids) > max_length:
        error_of(lambda: encode_record(r, tokenizer, max_length))
        return
    enc = encode_record(r, tokenizer, max_length)
    assert len(enc.input_ids) <= max_length
    assert enc.input_ids[enc.sup_start :] == response_ids  # the response is whole
    kept = enc.input_ids[: enc.sup_start]
    assert kept == prompt_ids[len(prompt_ids) - len(kept) :]  # a suffix of the prompt
    assert enc.truncated == (len(kept) < len(prompt_ids))
    assert enc.n_supervised == len(response_ids) - (1 if enc.sup_start == 0 else 0)


# --- bad input refused before parsing or tokenizing (docs/bad-input.md) -----------------


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_a_record_over_the_size_cap_is_refused_without_reading_it_whole(tmp_path: Path,
                                                                        monkeypatch) -> None:
    monkeypatch.delenv("RISE_MAX_RECORD_BYTES", raising=False)
    big = _jsonl(tmp_path / "big.jsonl", ['{"id": 1, "text": "ok"}',
                                          json.dumps({"id": 2, "text": "a" * (20 * 2**20)})])
    with pytest.raises(InvalidInput) as e:
        read_records(big, FieldMap())
    msg = str(e.value)
    assert "line 2 (record 1)" in msg and "over the limit of 1,048,576 bytes" in msg
    assert "RISE_MAX_RECORD_BYTES" in msg


def test_the_size_cap_is_configurable(tmp_path: Path, monkeypatch) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [json.dumps({"id": 1, "text": "x" * 100})])
    assert len(read_records(path, FieldMap(), max_record_bytes=200)) == 1
    with pytest.raises(InvalidInput, match="over the limit of 100 bytes"):
        read_records(path, FieldMap(), max_record_bytes=100)
    monkeypatch.setenv("RISE_MAX_RECORD_BYTES", "100")
    with pytest.raises(InvalidInput, match="over the limit of 100 bytes"):
        read_records(path, FieldMap())
    monkeypatch.setenv("RISE_MAX_RECORD_BYTES", "lots")
    with pytest.raises(InvalidInput, match="RISE_MAX_RECORD_BYTES"):
        read_records(path, FieldMap())


def test_a_line_exactly_at_the_cap_passes_whatever_its_line_ending(tmp_path: Path) -> None:
    line = json.dumps({"id": 1, "text": "x" * 50})
    cap = len(line.encode())
    for ending in ("\n", "\r\n", ""):
        path = tmp_path / "d.jsonl"
        path.write_bytes(line.encode() + ending.encode())
        assert len(read_records(path, FieldMap(), max_record_bytes=cap)) == 1
        with pytest.raises(InvalidInput, match="over the limit"):
            read_records(path, FieldMap(), max_record_bytes=cap - 1)


def test_the_size_cap_applies_to_gzip_and_parquet(tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "x"}, {"id": "b", "text": "y" * 5000}]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(InvalidInput, match="line 2 .*over the limit of 1,000 bytes"):
        read_records(gz, FieldMap(), max_record_bytes=1000)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(InvalidInput, match="record 1: the record is over the limit of 1,000 "
                                           "bytes .*: 5,001 bytes"):
        read_records(tmp_path / "d.parquet", FieldMap(), max_record_bytes=1000)
    assert len(read_records(tmp_path / "d.parquet", FieldMap(), max_record_bytes=10_000)) == 2


def test_inline_records_over_the_cap_are_refused() -> None:
    from rise.data import records_from_dicts

    with pytest.raises(InvalidInput, match="request record 1: the record is over the limit"):
        records_from_dicts([{"text": "a"}, {"text": "b" * 2000}], FieldMap(),
                           max_record_bytes=1000)


@pytest.mark.parametrize("depth,ok", [(63, True), (64, False), (70, False), (200_000, False)])
def test_json_nesting_is_limited(tmp_path: Path, depth: int, ok: bool) -> None:
    """The record object is level 1; 200k levels once blew Python's recursion limit
    (RecursionError: INTERNAL)."""
    line = '{"id": 1, "text": "t", "a": ' + "[" * depth + "]" * depth + "}"
    path = _jsonl(tmp_path / "d.jsonl", [line])
    if ok:
        assert len(read_records(path, FieldMap())) == 1
    else:
        with pytest.raises(InvalidInput, match=r"line 1 \(record 0\): JSON nested deeper "
                                               "than 64 levels"):
            read_records(path, FieldMap())


def test_deep_objects_are_refused_too(tmp_path: Path) -> None:
    line = '{"id": 1, "text": "t", "a": ' + '{"b": ' * 80 + "1" + "}" * 80 + "}"
    with pytest.raises(InvalidInput, match="nested deeper than 64"):
        read_records(_jsonl(tmp_path / "d.jsonl", [line]), FieldMap())


def test_integer_ids_are_bounded_like_strings(tmp_path: Path) -> None:
    from rise.data import records_from_dicts

    # 5,000 digits: more than int() converts, refused while parsing (was a ValueError)
    path = _jsonl(tmp_path / "d.jsonl", ['{"id": ' + "7" * 5000 + ', "text": "t"}'])
    with pytest.raises(InvalidInput, match="line 1 .*a number of more than 4300 digits"):
        read_records(path, FieldMap())
    # 300 digits parse, but are longer than an id may be
    path = _jsonl(tmp_path / "d.jsonl", ['{"id": ' + "7" * 300 + ', "text": "t"}'])
    with pytest.raises(InvalidInput, match="integer of more than 256 digits"):
        read_records(path, FieldMap())
    with pytest.raises(InvalidInput, match="integer of more than 256 digits"):
        records_from_dicts([{"id": 10**5000, "text": "t"}], FieldMap())
    with pytest.raises(InvalidInput, match="integer of more than 256 digits"):
        records_from_dicts([{"id": -(10**256), "text": "t"}], FieldMap())
    assert records_from_dicts([{"id": 10**255, "text": "t"}], FieldMap())[0].id == str(10**255)
    with pytest.raises(InvalidInput, match="id field 'id' is 257 UTF-8 bytes"):
        records_from_dicts([{"id": -(10**256) + 1, "text": "t"}], FieldMap())
    with pytest.raises(InvalidInput, match="5000 UTF-8 bytes"):
        records_from_dicts([{"id": "7" * 5000, "text": "t"}], FieldMap())


def test_messages_name_the_file_as_the_caller_named_it(tmp_path: Path) -> None:
    """A worker reads a local copy of s3://...: its errors must name the URI, not the copy."""
    local = _jsonl(tmp_path / "cache-3f2a.jsonl", ['{"id": 1, "text": "t"}', "{bad"])
    with pytest.raises(InvalidInput) as e:
        read_records(local, FieldMap(), name="s3://rise/tenants/a/d.jsonl")
    assert str(e.value).startswith("s3://rise/tenants/a/d.jsonl line 2 (record 1)")
    assert str(tmp_path) not in str(e.value)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InvalidInput) as e:
        read_records(tmp_path / "bad.parquet", FieldMap(), name="s3://rise/tenants/a/d.parquet")
    assert str(tmp_path) not in str(e.value) and "s3://rise/tenants/a/d.parquet" in str(e.value)
    with pytest.raises(NotFound) as nf:
        file_sha256(tmp_path / "gone.jsonl", "s3://rise/tenants/a/gone.jsonl")
    assert str(tmp_path) not in str(nf.value)


# --------------------------------------------------------- streaming scan, byte ranges


def _scan(path: Path, shard_size: int):
    with IdChecker() as checker:
        return scan_dataset(path, FieldMap(), shard_size, checker)


def _ranged_rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"text number {i} " * (1 + i % 3)} for i in range(n)]


def test_jsonl_ranges_read_back_exactly_their_records(tmp_path):
    rows = _ranged_rows(11)
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n" + "\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")
    scan = _scan(path, 4)
    assert scan.records == 11 and scan.sha256 == file_sha256(path)
    assert [(r.start, r.stop) for r in scan.ranges] == [(0, 4), (4, 8), (8, 11)]
    assert sum(r.length for r in scan.ranges) == path.stat().st_size  # ranges tile the file
    whole = read_records(path, FieldMap())
    for r in scan.ranges:
        got = read_range(FileBytes(path), "jsonl", r, FieldMap(), name="d.jsonl")
        assert got == whole[r.start:r.stop]


def test_a_changed_range_is_refused_and_the_others_still_read(tmp_path):
    rows = _ranged_rows(9)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scan = _scan(path, 3)
    data = bytearray(path.read_bytes())
    middle = scan.ranges[1]
    at = data.index(b"number 4")
    assert middle.offset <= at < middle.offset + middle.length
    data[at + 7] = ord("9")  # same length, one byte: only range 1's hash catches it
    path.write_bytes(bytes(data))
    with pytest.raises(Mismatch) as e:
        read_range(FileBytes(path), "jsonl", middle, FieldMap(), name="s3://b/d.jsonl")
    assert str(e.value).startswith("s3://b/d.jsonl: the range of records [3, 6)")
    assert "changed since the job was planned" in str(e.value)
    for r in (scan.ranges[0], scan.ranges[2]):
        assert len(read_range(FileBytes(path), "jsonl", r, FieldMap(), name="d")) == 3


def test_parquet_ranges_are_row_groups_and_read_only_their_bytes(tmp_path):
    rows = _ranged_rows(23)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    scan = _scan(path, 4)
    assert [r.row_groups for r in scan.ranges[:3]] == [(0,), (0, 1), (1, 2)]
    whole = read_records(path, FieldMap())
    reads: list[tuple[int, int]] = []

    class Counting(FileBytes):
        def read(self, offset: int, length: int) -> bytes:
            reads.append((offset, length))
            return super().read(offset, length)

    for r in scan.ranges:
        reads.clear()
        got = read_range(Counting(path), "parquet", r, FieldMap(), name="d",
                         tail=(scan.tail_offset, scan.tail_sha256), size=scan.size)
        assert got == whole[r.start:r.stop]
        assert reads == [(r.offset, r.length), (scan.tail_offset, scan.size - scan.tail_offset)]
    bad = bytearray(path.read_bytes())
    bad[scan.ranges[-1].offset + 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(Mismatch, match="changed since the job was planned"):
        read_range(FileBytes(path), "parquet", scan.ranges[-1], FieldMap(), name="d",
                   tail=(scan.tail_offset, scan.tail_sha256), size=scan.size)


def test_gzip_has_no_ranges_but_is_scanned(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in _ranged_rows(5))
    scan = _scan(path, 2)
    assert scan.records == 5 and scan.ranges == [] and scan.sha256 == file_sha256(path)
