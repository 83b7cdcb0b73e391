"""The engine on a real pretrained model (SmolLM2-135M-Instruct, shipped as a GGUF file in
a PyPI wheel) and real news text: loading from .gguf, exactness of the head, and
attribution finding the document a query was taken from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rise import api
from rise.config import make_config
from rise.data import FieldMap, read_records
from rise.index import open_index
from rise.ingest import create_index
from rise.model import load_model
from rise.store import LocalStore

pytestmark = pytest.mark.integration

CACHE = Path(__file__).resolve().parents[2] / ".cache"
GGUF = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LEE = CACHE / "corpus" / "lee.jsonl"


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    if not GGUF.exists() or not LEE.exists():
        pytest.fail("real assets missing: run `make assets-model` and "
                    "`.venv/bin/python tests/assets.py corpus --only lee,queries`")
    cache = tmp_path_factory.mktemp("rise-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("RISE_CACHE_DIR", str(cache))
    try:
        yield load_model(GGUF)
    finally:
        mp.undo()


def test_gguf_loads_with_a_stable_identity(smollm):
    assert smollm.head.vocab == 49152 and smollm.head.hidden == 576
    # Tied embeddings: the head is the input embedding, hashed as stored in the GGUF file.
    assert smollm.model.get_output_embeddings().weight is smollm.model.get_input_embeddings().weight
    again = load_model(GGUF)  # from the converted cache folder, same identity
    assert again.identity == smollm.identity


def test_attribution_finds_the_source_document(smollm, tmp_path):
    docs = read_records(LEE, FieldMap())[:40]
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "text": r.text}) + "\n" for r in docs))
    # Queries: the opening sentence of every 4th document.
    queries = tmp_path / "q.jsonl"
    qrows = [{"id": f"q-{r.id}", "text": r.text.split(". ")[0] + "."} for r in docs[::4]]
    queries.write_text("".join(json.dumps(q) + "\n" for q in qrows))
    store = LocalStore(tmp_path / "idx")
    create_index(store, smollm, data, FieldMap(), make_config(max_length=48), shard_size=16,
                 batch_size=8)
    idx = open_index(store)
    results = api.attribute(idx, smollm, queries, top=5)
    hits_at_5 = sum(q.removeprefix("q-") in [h.id for h in hits] for q, hits in results)
    top1 = sum(hits[0].id == q.removeprefix("q-") for q, hits in results)
    # A sentence and the document it opens share their readout: most are found first.
    assert top1 >= 0.7 * len(results), results
    assert hits_at_5 >= 0.9 * len(results), results


def test_real_head_gradient_is_exact_in_float64(smollm):
    """Exact mode on the real head: RH inner products equal float64 autograd's on the same
    hidden states.  The model (and so the engine's head math) is float32 here, so the bound
    is float32's: the relative difference depends on the CPU's summation kernels (1.7e-6
    on one 2-core AMD machine, below 1e-6 on another); 1e-5 still catches any real error
    (a wrong weight, target or softmax term moves it by orders of magnitude).  The float64
    models of tests/rise/test_readout.py check the identities to 1e-9."""
    from rise import exact
    from rise.data import Record, encode_record
    from rise.featurize import featurize

    lm = smollm
    texts = ["The fire crossed the highway.", "Counting is proceeding very slowly."]
    recs = [Record(str(i), i, t, None, None, {}) for i, t in enumerate(texts)]
    encs = [encode_record(r, lm.tokenizer, 16) for r in recs]
    feats = featurize(lm, encs, make_config(exact=True), batch_size=2)
    grads = []
    for e in encs:
        ids = torch.tensor([e.input_ids])
        h = lm.hidden_states(ids, torch.ones_like(ids))[0].double()
        w = lm.head.weight.detach().clone().double().requires_grad_()
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(h[:-1] @ w.T, ids[0, 1:])
            loss.backward()
        grads.append(w.grad)
    want = float((grads[0] * grads[1]).sum())
    got = exact.inner(feats.factors[0], feats.factors[1], "rh", lm.head.vocab)
    assert abs(got - want) <= 1e-5 * abs(want)
