"""Attributing the model's own generations (rise.generate, api.attribute_generated, and
``rise attribute --generate``) on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXTS, write_jsonl
from rise import api
from rise.cli import main
from rise.config import make_config
from rise.data import FieldMap, Record, encode_record
from rise.errors import InvalidInput
from rise.generate import GenerateSpec, generate_responses
from rise.model import load_model
from rise.store import LocalStore

PROMPTS = [Record(id=f"p{i}", number=i, text=t, prompt=None, response=None, raw={})
           for i, t in enumerate(["The quick brown", "Sketches compress", "A shard is"])]


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model)


@pytest.fixture(scope="module")
def index(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("gen")
    pool = write_jsonl(root / "pool.jsonl", [{"id": f"doc-{i}", "text": t}
                                              for i, t in enumerate(TEXTS)])
    store = LocalStore(root / "idx")
    api.create(store, lm, pool, FieldMap(), make_config())
    return api.open_index(store)


def greedy_continuation(lm, prompt: str, n: int) -> list[int]:
    """Greedy decoding by hand: argmax of the full model's logits, one token at a time."""
    ids = list(lm.tokenizer.encode(prompt, add_special_tokens=True))
    out = []
    with torch.inference_mode():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == lm.tokenizer.eos_token_id:
                break
            out.append(nxt)
    return out


def test_greedy_is_the_argmax_continuation(lm):
    recs = generate_responses(lm, PROMPTS, GenerateSpec(max_new_tokens=8))
    for p, r in zip(PROMPTS, recs, strict=True):
        assert r.id == p.id and r.prompt == p.text and r.text is None
        assert r.response == lm.tokenizer.decode(greedy_continuation(lm, p.text, 8),
                                                 skip_special_tokens=True)


def test_sampling_is_seeded_and_per_prompt(lm):
    spec = GenerateSpec(max_new_tokens=12, temperature=1.5, seed=7)
    a = generate_responses(lm, PROMPTS, spec)
    b = generate_responses(lm, PROMPTS, spec)
    assert [r.response for r in a] == [r.response for r in b]
    # prompt i uses seed + i: a prompt's response does not depend on the others before it
    alone = generate_responses(lm, PROMPTS[1:2], GenerateSpec(max_new_tokens=12, temperature=1.5,
                                                             seed=8))
    assert alone[0].response == a[1].response
    other = generate_responses(lm, PROMPTS, GenerateSpec(max_new_tokens=12, temperature=1.5,
                                                         seed=1000))
    assert [r.response for r in other] != [r.response for r in a]
    # the global generator is left as it was
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    generate_responses(lm, PROMPTS[:1], spec)
    assert torch.equal(torch.rand(1), before)


def test_generated_response_is_attributed_with_response_only_supervision(lm, index):
    gen = GenerateSpec(max_new_tokens=10)
    out = api.attribute_generated(index, lm, PROMPTS, gen, top=3)
    assert [r.id for r, _ in out] == ["p0", "p1", "p2"]
    recs = [r for r, _ in out]
    # the same records, attributed as prompt/response queries, give the same hits
    fields = FieldMap(prompt_field="prompt", response_field="response")
    qs = api.sketch_queries(index, lm, recs, fields)
    want = api.attribute_sketched(index, qs, api.ScoreSpec(), 3)
    assert [hs for _, hs in out] == want
    for r, hs in out:
        assert len(hs) == 3
        enc = encode_record(r, lm.tokenizer, index.config.max_length)
        # only the response is supervised
        assert enc.sup_start == len(lm.tokenizer.encode(r.prompt, add_special_tokens=True))
    # ... and that differs from attributing prompt + response as plain text
    plain = [Record(id=r.id, number=0, text=(r.prompt or "") + (r.response or ""), prompt=None,
                    response=None, raw={}) for r in recs]
    qp = api.sketch_queries(index, lm, plain, FieldMap())
    assert api.attribute_sketched(index, qp, api.ScoreSpec(), 3) != want or \
        not torch.equal(qp.rh, qs.rh)


def test_bad_generation_settings(lm, index):
    for kw in ({"max_new_tokens": 0}, {"temperature": -1.0}, {"temperature": float("nan")},
               {"seed": -1}):
        with pytest.raises(InvalidInput):
            GenerateSpec(**kw)
    with pytest.raises(InvalidInput, match="below the index's max_length"):
        api.generate_queries(index, lm, PROMPTS, GenerateSpec(max_new_tokens=4096))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_attribute_generate(capsys, tmp_path, tiny_model, index):
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": p.id, "text": p.text} for p in PROMPTS])
    out = tmp_path / "gen.jsonl"
    base = ["attribute", "--index", index.store.root, "--model", tiny_model, "--output", out]
    code, _, err = run(capsys, *base, "--generate", "--prompts", prompts, "--max-new-tokens", 6,
                       "--top", 2)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == ["p0", "p1", "p2"]
    assert all(r["generated"] and len(r["results"]) == 2 for r in rows)
    assert rows[0]["prompt"] == PROMPTS[0].text
    # sampled, with a seed: reproducible
    code, _, _ = run(capsys, *base, "--generate", "--prompts", prompts, "--temperature", 1.2,
                     "--seed", 5, "--max-new-tokens", 6)
    a = out.read_text()
    run(capsys, *base, "--generate", "--prompts", prompts, "--temperature", 1.2, "--seed", 5,
        "--max-new-tokens", 6)
    assert code == 0 and out.read_text() == a


@pytest.mark.parametrize("extra, expect", [
    (["--generate", "--queries", "q.jsonl"], "drop --queries"),
    (["--prompts", "p.jsonl"], "--prompts needs --generate"),
    (["--queries", "q.jsonl", "--seed", "3"], "--seed needs --generate"),
    ([], "--queries is required"),
    (["--generate", "--prompts", "p.jsonl", "--max-new-tokens", "0"], "max new tokens"),
])
def test_cli_generate_flags(capsys, tmp_path, tiny_model, index, extra, expect):
    code, _, err = run(capsys, "attribute", "--index", index.store.root, "--model", tiny_model,
                       "--output", tmp_path / "o.jsonl", *extra)
    assert code == 2
    assert expect in err


@pytest.mark.parametrize("extra, expect", [
    (["--queries", "q.jsonl", "--seed", "3"], "--seed needs --generate"),
    (["--prompts", "p.jsonl"], "takes no --queries"),
    (["--generate", "--prompts", "p.jsonl", "--queries", "q.jsonl"], "takes no --queries"),
    ([], "--queries is required"),
])
def test_remote_generate_flags(capsys, tmp_path, monkeypatch, extra, expect):
    """Refused before any call: no gateway is reached."""
    monkeypatch.setenv("RISE_GATEWAY", "127.0.0.1:1")
    monkeypatch.setenv("RISE_TOKEN", "t")
    code, _, err = run(capsys, "remote", "attribute", "c", "--output", tmp_path / "o.jsonl",
                       *extra)
    assert code == 2
    assert expect in err
