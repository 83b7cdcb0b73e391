"""The ``rise`` command line: one-line errors with the right exit codes, and happy paths.

``rise.cli.main`` runs in-process on the session's tiny models; every index is small.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import TEXTS, write_jsonl
from rise import errors
from rise.cli import main

VERBS = ["index", "attribute", "value", "append", "delete", "compact", "verify", "inspect", "plan",
         "explain", "copy"]
PR_ROWS = [
    {"id": f"pr-{i}", "prompt": f"Question {i}: what does line {i} say?", "response": t}
    for i, t in enumerate(TEXTS)
]
QUERY_ROWS = [
    {"id": "q-fox", "text": "A fox jumped over a dog."},
    {"id": "q-shard", "text": "Shards and manifests are immutable."},
]


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    """The real CLI disables Hugging Face progress bars before transformers is imported;
    here transformers is already imported, so switch its bars off the same way."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was:
        hf_logging.enable_progress_bar()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``rise argv``; argparse exits become codes too."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    """The single stderr line of a failed command (asserts there is exactly one)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rise: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_data")
    write_jsonl(d / "corpus.jsonl", [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)])
    write_jsonl(d / "queries.jsonl", QUERY_ROWS)
    return d


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir, tiny_model) -> Path:
    """An index of the 8-record corpus made by ``rise index`` (shard size 3)."""
    out = tmp_path_factory.mktemp("cli_idx") / "idx"
    code = main(["index", "--model", str(tiny_model), "--data", str(data_dir / "corpus.jsonl"),
                 "--out", str(out), "--shard-size", "3"])
    assert code == 0
    return out


@pytest.fixture
def idx_copy(tmp_path, built) -> Path:
    shutil.copytree(built, tmp_path / "idx")
    return tmp_path / "idx"


def index_args(model, data, out, *extra) -> list[str]:
    return ["index", "--model", str(model), "--data", str(data), "--out", str(out), *extra]


# ------------------------------------------------------------------------------ errors


def test_missing_data_file(capsys, tmp_path, tiny_model):
    code, out, err = run(capsys, *index_args(tiny_model, tmp_path / "nope.jsonl", tmp_path / "i"))
    line = one_error(err)
    assert code == errors.NotFound.exit_code == 3
    assert "nope.jsonl" in line and "not" in line
    assert out == "" and not (tmp_path / "i").exists()


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', ["invalid JSON", "line 2"]),
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n',
         ["invalid UTF-8", "line 2"]),
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "body": "no text"}\n',
         ["missing field 'text'", "'b'"]),
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "   "}\n', ["'text'", "empty", "'b'"]),
        (b'{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n{"id": "a", "text": "3"}\n',
         ["duplicate id 'a'", "line 1 (record 0)", "line 3 (record 2)"]),
        (b'[1, 2]\n', ["not a JSON object"]),
    ],
    ids=["invalid-json", "invalid-utf8", "missing-text", "empty-text", "duplicate-id",
         "not-object"],
)
def test_bad_data_file(capsys, tmp_path, tiny_model, content, expect):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    code, out, err = run(capsys, *index_args(tiny_model, data, tmp_path / "i"))
    line = one_error(err)
    assert code == errors.InvalidInput.exit_code == 2
    assert "bad.jsonl" in line
    for e in expect:
        assert e in line, line
    assert out == ""
    assert not list(tmp_path.glob("i/manifest-*"))


def test_missing_custom_text_field_is_named(capsys, tmp_path, tiny_model, data_dir):
    code, _, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl", tmp_path / "i",
                                           "--text-field", "body"))
    line = one_error(err)
    assert code == 2 and "missing field 'body'" in line


def test_missing_response_field_is_named(capsys, tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "pr.jsonl", [{"id": "x", "prompt": "p", "answer": "a"}])
    code, _, err = run(capsys, *index_args(tiny_model, data, tmp_path / "i", "--prompt-field",
                                           "prompt", "--response-field", "response"))
    line = one_error(err)
    assert code == 2 and "missing field 'response'" in line and "'x'" in line


def test_unknown_model(capsys, tmp_path, data_dir):
    code, _, err = run(capsys, *index_args(tmp_path / "no-model", data_dir / "corpus.jsonl",
                                           tmp_path / "i"))
    line = one_error(err)
    assert code == errors.NotFound.exit_code
    assert "unknown model" in line and "no-model" in line


def test_model_folder_without_config(capsys, tmp_path, data_dir):
    (tmp_path / "empty-model").mkdir()
    code, _, err = run(capsys, *index_args(tmp_path / "empty-model", data_dir / "corpus.jsonl",
                                           tmp_path / "i"))
    line = one_error(err)
    assert code == 3 and "config.json" in line


def test_query_with_other_model_is_mismatch(capsys, tmp_path, tiny_models, built, data_dir):
    code, out, err = run(capsys, "attribute", "--index", built, "--model", tiny_models["llama"],
                         "--queries", data_dir / "queries.jsonl", "--output", tmp_path / "o.jsonl")
    line = one_error(err)
    assert code == errors.Mismatch.exit_code == 5
    assert "mismatch" in line.lower()
    assert not (tmp_path / "o.jsonl").exists()


def test_append_with_other_model_is_mismatch(capsys, tiny_models, idx_copy, data_dir):
    code, _, err = run(capsys, "append", "--index", idx_copy, "--model", tiny_models["gpt2"],
                       "--data", data_dir / "queries.jsonl")
    assert code == 5 and "mismatch" in one_error(err).lower()


def test_exact_over_budget(capsys, tmp_path, tiny_model, data_dir):
    code, out, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                             tmp_path / "i", "--exact", "--exact-budget",
                                             "0.0001"))
    line = one_error(err)
    assert code == errors.BudgetExceeded.exit_code == 6
    assert "budget" in line and "--exact-budget" in line
    assert not (tmp_path / "i").exists() or not list((tmp_path / "i").rglob("*.safetensors"))


def test_exact_with_topk(capsys, tmp_path, tiny_model, data_dir):
    code, _, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                           tmp_path / "i", "--exact", "--topk", "5"))
    line = one_error(err)
    assert code == 2 and "--exact" in line and "--topk" in line


def test_exact_with_no_sketch(capsys, tmp_path, tiny_model, data_dir):
    code, _, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                           tmp_path / "i", "--exact", "--no-sketch"))
    line = one_error(err)
    assert code == 2 and "--no-sketch" in line


@pytest.mark.parametrize("verb", ["attribute", "value"])
def test_raw_score_with_both_channels(capsys, tmp_path, tiny_model, built, data_dir, verb):
    flag = "--queries" if verb == "attribute" else "--target"
    code, _, err = run(capsys, verb, "--index", built, "--model", tiny_model, flag,
                       data_dir / "queries.jsonl", "--output", tmp_path / "o.jsonl",
                       "--score", "raw", "--channel", "both")
    line = one_error(err)
    assert code == 2 and "raw" in line and "--channel" in line


@pytest.mark.parametrize("dims", ["1,2", "a,b,c", "0,4,4", "4,4,4,4", "-1,2,2",
                                  "4294967295,64,64", "1" * 5000 + ",4,4", "65537,4,4"])
def test_bad_dims(capsys, tmp_path, tiny_model, data_dir, dims):
    code, _, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                           tmp_path / "i", f"--dims={dims}"))
    line = one_error(err)
    assert code == 2 and ("--dims" in line or "dims must be" in line)
    assert not (tmp_path / "i").exists()


@pytest.mark.parametrize(("flag", "value", "expect"),
                         [("--topk", "zero", "--topk"), ("--temperature", "0", "temperature"),
                          ("--temperature", "1e-300", "temperature must be in [0.05, 100]"),
                          ("--temperature", "1000", "temperature must be in [0.05, 100]"),
                          ("--max-length", "1", "max_length")])
def test_bad_sketch_flags(capsys, tmp_path, tiny_model, data_dir, flag, value, expect):
    code, _, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                           tmp_path / "i", flag, value))
    line = one_error(err)
    assert code == 2 and expect in line


@pytest.mark.parametrize("line,expect", [
    ('{"id": ' + "7" * 5000 + ', "text": "t"}', "more than 4300 digits"),
    ('{"id": 1, "text": "t", "a": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "nested deeper than 64 levels"),
    ('{"id": 1, "text": "' + "a" * (2 * 2**20) + '"}', "over the limit of 1,048,576 bytes"),
])
def test_bad_records_exit_2_naming_the_record(capsys, tmp_path, tiny_model, line, expect):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": 0, "text": "fine"}\n' + line + "\n")
    code, _, err = run(capsys, *index_args(tiny_model, data, tmp_path / "i"))
    msg = one_error(err)
    assert code == 2 and "bad.jsonl line 2 (record 1)" in msg and expect in msg
    assert not (tmp_path / "i").exists()


def test_empty_data_file(capsys, tmp_path, tiny_model):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    code, _, err = run(capsys, *index_args(tiny_model, data, tmp_path / "i"))
    line = one_error(err)
    assert code == 2 and "empty.jsonl" in line and "no records" in line


def test_unknown_data_extension(capsys, tmp_path, tiny_model):
    data = tmp_path / "data.txt"
    data.write_text('{"id": "a", "text": "x y"}\n')
    code, _, err = run(capsys, *index_args(tiny_model, data, tmp_path / "i"))
    line = one_error(err)
    assert code == 2 and "extension" in line


def test_bad_shard_size(capsys, tmp_path, tiny_model, data_dir):
    code, _, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                           tmp_path / "i", "--shard-size", "0"))
    line = one_error(err)
    assert code == 2 and "shard size" in line
    assert not list(tmp_path.glob("i/**/*.safetensors"))


@pytest.mark.parametrize("verb", ["attribute", "value"])
def test_output_in_missing_directory(capsys, tmp_path, tiny_model, built, data_dir, verb):
    """Writing results where no folder exists is bad input: one line, not a traceback."""
    flag = "--queries" if verb == "attribute" else "--target"
    target = tmp_path / "no-such-dir" / "out.jsonl"
    code, _, err = run(capsys, verb, "--index", built, "--model", tiny_model, flag,
                       data_dir / "queries.jsonl", "--output", target)
    line = one_error(err)
    assert code != 0 and "no-such-dir" in line


def test_index_into_existing_index(capsys, tiny_model, data_dir, idx_copy):
    code, _, err = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl", idx_copy))
    line = one_error(err)
    assert code == errors.AlreadyExists.exit_code == 4 and "append" in line


def test_missing_index(capsys, tmp_path, tiny_model, data_dir):
    for argv in (["inspect", tmp_path / "none"], ["verify", tmp_path / "none"],
                 ["compact", tmp_path / "none"],
                 ["attribute", "--index", tmp_path / "none", "--model", tiny_model, "--queries",
                  data_dir / "queries.jsonl", "--output", tmp_path / "o.jsonl"]):
        code, _, err = run(capsys, *argv)
        line = one_error(err)
        assert code == 3 and "none" in line, argv


def test_bad_top(capsys, tmp_path, tiny_model, built, data_dir):
    code, _, err = run(capsys, "attribute", "--index", built, "--model", tiny_model, "--queries",
                       data_dir / "queries.jsonl", "--output", tmp_path / "o.jsonl", "--top", "0")
    assert code == 2 and "top must be >= 1" in one_error(err)


def test_select_fraction_needs_output(capsys, tmp_path, tiny_model, built, data_dir):
    code, _, err = run(capsys, "value", "--index", built, "--model", tiny_model, "--target",
                       data_dir / "queries.jsonl", "--output", tmp_path / "v.jsonl",
                       "--select-fraction", "0.5")
    assert code == 2 and "--select-output" in one_error(err)


def test_bad_select_fraction(capsys, tmp_path, tiny_model, built, data_dir):
    code, _, err = run(capsys, "value", "--index", built, "--model", tiny_model, "--target",
                       data_dir / "queries.jsonl", "--output", tmp_path / "v.jsonl",
                       "--select-fraction", "1.5", "--select-output", tmp_path / "s.jsonl")
    assert code == 2 and "--select-fraction" in one_error(err)
    assert not (tmp_path / "s.jsonl").exists()


def test_delete_unknown_id(capsys, tmp_path, idx_copy):
    ids = tmp_path / "ids.txt"
    ids.write_text("doc-1\nghost-id\n")
    code, _, err = run(capsys, "delete", "--index", idx_copy, "--ids", ids)
    line = one_error(err)
    assert code == 3 and "ghost-id" in line


def test_argparse_errors_are_one_line(capsys, tmp_path):
    for argv in (["index"], ["nope-verb"], ["attribute", "--index", "x", "--top", "many"]):
        code, out, err = run(capsys, *argv)
        one_error(err)
        assert code == 2 and out == "", argv


# --------------------------------------------------------------------------- happy paths


def test_index_summary_json(capsys, tmp_path, tiny_model, data_dir):
    out = tmp_path / "i"
    code, stdout, _ = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl", out,
                                              "--shard-size", "3", "--json"))
    assert code == 0
    s = json.loads(stdout)
    assert s["records"] == 8 and s["shards_written"] == 3 and s["shards_skipped"] == 0
    assert s["truncated"] == 0 and s["tokens"] > 8 and s["generation"] == 1
    assert s["config"]["mode"] == "sketch"
    assert (out / "manifest-00000001.json").is_file()
    code, text, _ = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                            tmp_path / "j", "--shard-size", "3"))
    assert code == 0 and "indexed 8 records" in text and "3 shards written" in text


def test_attribute_output(capsys, tmp_path, tiny_model, built, data_dir):
    out = tmp_path / "hits.jsonl"
    code, stdout, _ = run(capsys, "attribute", "--index", built, "--model", tiny_model,
                          "--queries", data_dir / "queries.jsonl", "--output", out, "--top", "3",
                          "--json")
    assert code == 0
    s = json.loads(stdout)
    assert s["queries"] == 2 and s["top"] == 3
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == ["q-fox", "q-shard"]
    corpus_ids = {f"doc-{i}" for i in range(8)}
    for r in rows:
        assert set(r) == {"query_id", "results"}
        assert len(r["results"]) == 3
        assert all(set(h) == {"id", "score"} for h in r["results"])
        assert {h["id"] for h in r["results"]} <= corpus_ids
        scores = [h["score"] for h in r["results"]]
        assert scores == sorted(scores, reverse=True)
    # the whole ranking with --top 8 starts with the same three
    out8 = tmp_path / "hits8.jsonl"
    assert run(capsys, "attribute", "--index", built, "--model", tiny_model, "--queries",
               data_dir / "queries.jsonl", "--output", out8, "--top", "8")[0] == 0
    rows8 = [json.loads(x) for x in out8.read_text().splitlines()]
    for r, r8 in zip(rows, rows8, strict=True):
        assert {h["id"] for h in r8["results"]} == corpus_ids
        assert r8["results"][:3] == r["results"]


def test_attribute_channels(capsys, tmp_path, tiny_model, built, data_dir):
    for extra in (["--channel", "rh", "--score", "raw"], ["--channel", "gh"],
                  ["--center", "--lambda", "0.3"], ["--no-center"]):
        out = tmp_path / "o.jsonl"
        code, _, err = run(capsys, "attribute", "--index", built, "--model", tiny_model,
                           "--queries", data_dir / "queries.jsonl", "--output", out, "--top", "2",
                           *extra)
        assert code == 0, err
        assert all(len(json.loads(x)["results"]) == 2 for x in out.read_text().splitlines())


def test_value_and_select(capsys, tmp_path, tiny_model, idx_copy, data_dir):
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"id": "doc-2"}\n')
    code, stdout, _ = run(capsys, "delete", "--index", idx_copy, "--ids", ids, "--json")
    assert code == 0 and json.loads(stdout) == {"generation": 2, "deleted": 1}
    vals, sel = tmp_path / "values.jsonl", tmp_path / "sel.jsonl"
    code, stdout, _ = run(capsys, "value", "--index", idx_copy, "--model", tiny_model, "--target",
                          data_dir / "queries.jsonl", "--output", vals, "--select-fraction",
                          "0.25", "--select-output", sel, "--json")
    assert code == 0
    s = json.loads(stdout)
    rows = [json.loads(x) for x in vals.read_text().splitlines()]
    assert len(rows) == s["examples"] == 7  # one per live example
    assert {r["id"] for r in rows} == {f"doc-{i}" for i in range(8)} - {"doc-2"}
    v = [r["value"] for r in rows]
    assert v == sorted(v, reverse=True)
    n = math.ceil(0.25 * 7)
    assert s["selected"] == n == 2
    originals = {r["id"]: r for r in
                 (json.loads(x) for x in (data_dir / "corpus.jsonl").read_text().splitlines())}
    selected = [json.loads(x) for x in sel.read_text().splitlines()]
    assert selected == [originals[r["id"]] for r in rows[:n]]


def test_inspect_and_verify(capsys, built):
    code, text, _ = run(capsys, "inspect", built)
    assert code == 0
    assert "generation 1, 8 live examples, 0 tombstoned, 3 shards" in text
    assert "mode=sketch" in text and "ingest 1: 8 records" in text
    code, stdout, _ = run(capsys, "inspect", built, "--json")
    info = json.loads(stdout)
    assert info["live_count"] == 8 and info["shards"] == 3 and info["generation"] == 1
    assert info["ingests"][0]["fields"]["text_field"] == "text"
    code, text, _ = run(capsys, "verify", built)
    assert code == 0 and "generation 1: ok" in text and "current generation: 1" in text
    code, stdout, _ = run(capsys, "verify", built, "--json")
    r = json.loads(stdout)
    assert code == 0 and r["ok"] is True and r["shards_checked"] == 3
    assert r["generations"] == {"1": "ok"}


def test_verify_corrupt_index_exits_7(capsys, idx_copy):
    shard = sorted(idx_copy.rglob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, text, _ = run(capsys, "verify", idx_copy)
    assert code == errors.Corrupt.exit_code == 7
    assert "sha256" in text and shard.name in text


def test_append_delete_compact_cli(capsys, tmp_path, tiny_model, idx_copy, data_dir):
    more = write_jsonl(tmp_path / "more.jsonl",
                       [{"id": f"more-{i}", "text": f"Another record number {i}."}
                        for i in range(4)])
    code, stdout, _ = run(capsys, "append", "--index", idx_copy, "--model", tiny_model, "--data",
                          more, "--json")
    assert code == 0
    s = json.loads(stdout)
    assert s["generation"] == 2 and s["records"] == 4 and s["shards_written"] == 2
    ids = tmp_path / "ids.txt"
    ids.write_text("doc-0\nmore-3\n\n")
    assert run(capsys, "delete", "--index", idx_copy, "--ids", ids)[0] == 0
    code, stdout, _ = run(capsys, "compact", idx_copy, "--json")
    assert code == 0 and json.loads(stdout) == {"generation": 4, "compacted": True}
    code, stdout, _ = run(capsys, "compact", idx_copy, "--json")
    assert code == 0 and json.loads(stdout) == {"generation": 4, "compacted": False}
    info = json.loads(run(capsys, "inspect", idx_copy, "--json")[1])
    assert info["live_count"] == 10 and info["tombstones"] == 0 and info["shards"] == 4
    out = tmp_path / "o.jsonl"
    assert run(capsys, "attribute", "--index", idx_copy, "--model", tiny_model, "--queries",
               data_dir / "queries.jsonl", "--output", out, "--top", "10")[0] == 0
    for line in out.read_text().splitlines():
        got = {h["id"] for h in json.loads(line)["results"]}
        assert len(got) == 10 and not got & {"doc-0", "more-3"}


def test_truncation_is_counted(capsys, tmp_path, tiny_model, data_dir):
    code, stdout, _ = run(capsys, *index_args(tiny_model, data_dir / "corpus.jsonl",
                                              tmp_path / "i", "--max-length", "8", "--json"))
    assert code == 0
    s = json.loads(stdout)
    assert s["truncated"] == 8  # every record is longer than 8 byte tokens
    assert s["tokens"] == 8 * 7  # 8 kept tokens -> 7 supervised targets each
    assert s["config"]["max_length"] == 8


def test_prompt_response_records(capsys, tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "pr.jsonl", PR_ROWS)
    out = tmp_path / "i"
    code, stdout, err = run(capsys, *index_args(tiny_model, data, out, "--prompt-field",
                                                "prompt", "--response-field", "response",
                                                "--shard-size", "4", "--json"))
    assert code == 0, err
    s = json.loads(stdout)
    # only response tokens are supervised: exactly their byte counts
    assert s["records"] == 8 and s["tokens"] == sum(len(t.encode()) for t in TEXTS)
    info = json.loads(run(capsys, "inspect", out, "--json")[1])
    assert info["ingests"][0]["fields"]["prompt_field"] == "prompt"
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "prompt": "Question 0?",
                                             "response": TEXTS[0]}])
    hits = tmp_path / "hits.jsonl"
    code, _, err = run(capsys, "attribute", "--index", out, "--model", tiny_model, "--queries", q,
                       "--output", hits, "--top", "2", "--prompt-field", "prompt",
                       "--response-field", "response")
    assert code == 0, err
    row = json.loads(hits.read_text())
    assert row["query_id"] == "q0" and len(row["results"]) == 2
    assert row["results"][0]["id"] == "pr-0"  # same response: its own record ranks first


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(capsys, verb):
    code, out, _ = run(capsys, verb, "--help")
    assert code == 0
    assert f"rise {verb}" in out and "--json" in out


def test_top_level_help_lists_verbs(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for verb in VERBS:
        assert verb in out


def test_default_scoring_is_centered_and_no_center_turns_it_off(capsys, tmp_path, tiny_model, built,
                                                               data_dir):
    outs = {}
    for name, extra in (("default", []), ("center", ["--center"]), ("plain", ["--no-center"])):
        out = tmp_path / f"{name}.jsonl"
        code, _, err = run(capsys, "attribute", "--index", built, "--model", tiny_model,
                           "--queries", data_dir / "queries.jsonl", "--output", out, "--top", "5",
                           *extra)
        assert code == 0, err
        outs[name] = [json.loads(x) for x in out.read_text().splitlines()]
    assert outs["default"] == outs["center"]
    assert outs["default"] != outs["plain"]


def test_append_after_delete_is_refused(capsys, tmp_path, tiny_model, idx_copy):
    """The CLI refuses an id deleted but not compacted with the same message as the Python
    API and the gateway (tests/rise/test_index.py, tests/rise/stack/test_stack.py)."""
    ids = tmp_path / "ids.txt"
    ids.write_text("doc-1\n")
    assert run(capsys, "delete", "--index", idx_copy, "--ids", ids)[0] == 0
    again = write_jsonl(tmp_path / "again.jsonl", [{"id": "doc-1", "text": "a new text"}])
    code, _, err = run(capsys, "append", "--index", idx_copy, "--model", tiny_model,
                       "--data", again)
    assert code == errors.InvalidInput.exit_code == 2
    assert one_error(err) == ("rise: error: id 'doc-1' of record 0 clashes with a deleted id "
                              "not yet compacted (run rise compact first)")


# ------------------------------------------------------------------------------ explain


def explain_args(model, built, data_dir, *extra) -> list[str]:
    return ["explain", "--index", str(built), "--model", str(model), "--queries",
            str(data_dir / "queries.jsonl"), *extra]


def test_explain_text_json_and_html(capsys, tmp_path, tiny_model, built, data_dir):
    code, out, _ = run(capsys, *explain_args(tiny_model, built, data_dir, "--query", "q-fox",
                                             "--hit", "doc-0", "--top", "3"))
    assert code == 0
    assert "query 'q-fox' -> hit 'doc-0'" in out and "centering" in out and "top 3 pairs" in out
    html = tmp_path / "e.html"
    code, out, _ = run(capsys, *explain_args(tiny_model, built, data_dir, "--query", "q-fox",
                                             "--hit", "doc-0", "--json", "--html", html))
    assert code == 0
    d = json.loads(out)
    assert d["query_id"] == "q-fox" and d["hit_id"] == "doc-0"
    assert math.isclose(d["score"], d["pair_total"] + d["centering"], rel_tol=1e-12, abs_tol=1e-12)
    assert html.read_text().startswith("<!DOCTYPE html>")
    # the reported score is the one attribution reports for the pair, up to the sketch
    out_file = tmp_path / "hits.jsonl"
    assert run(capsys, "attribute", "--index", built, "--model", tiny_model, "--queries",
               data_dir / "queries.jsonl", "--output", out_file, "--top", "8")[0] == 0
    hits = {h["id"]: h["score"] for h in json.loads(out_file.read_text().splitlines()[0])["results"]}
    assert math.isclose(hits["doc-0"], d["sketched_score"], rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("extra, code, expect", [
    (["--hit", "doc-0"], 2, "hold 2 records; name one"),
    (["--query", "q-nope", "--hit", "doc-0"], 2, "query id 'q-nope' is not among the queries"),
    (["--query", "q-fox", "--hit", "doc-99"], 3, "hit id 'doc-99' is not an example"),
    (["--query", "q-fox", "--hit", "doc-0", "--top", "0"], 2, "--top must be >= 1"),
])
def test_explain_bad_input(capsys, tiny_model, built, data_dir, extra, code, expect):
    got, _, err = run(capsys, *explain_args(tiny_model, built, data_dir, *extra))
    assert got == code
    assert expect in one_error(err)
