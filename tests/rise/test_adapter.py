"""LoRA adapters (rise.adapter): merged like PEFT's unmerged forward, the readout of the
adapted model exact against float64 autograd, the adapter in the index identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, save_tiny_model, write_jsonl
from rise import exact
from rise.adapter import read_adapter
from rise.config import make_config
from rise.data import FieldMap, Record, encode_record
from rise.errors import InvalidInput, Mismatch, NotFound, UnsupportedModel
from rise.featurize import featurize
from rise.index import open_index
from rise.ingest import create_index
from rise.manifest import Manifest
from rise.model import load_model
from rise.store import LocalStore
from safetensors.torch import save_file

# Module names per architecture: attention projections and the LM head.
TARGETS = {
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head"],
    "gpt2": ["transformer.h.0.attn.c_attn", "lm_head"],  # Conv1D, and a tied head
    "gpt_neox": ["gpt_neox.layers.0.attention.query_key_value", "lm_head"],
}


def make_lora(model_dir: Path, out: Path, targets: list[str], *, r: int = 4,
              alpha: float = 8.0, seed: int = 1, rslora: bool = False) -> Path:
    """A PEFT-format LoRA folder with non-zero A and B (PEFT initialises B to zero, a
    no-op), keys as PEFT saves them (``base_model.model.<module>.lora_A.weight``)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    modules = dict(base.named_modules())
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in targets:
        w = modules[name].weight
        fan_in, fan_out = ((w.shape[0], w.shape[1]) if type(modules[name]).__name__ == "Conv1D"
                           else (w.shape[1], w.shape[0]))
        tensors[f"base_model.model.{name}.lora_A.weight"] = \
            torch.randn(r, fan_in, generator=g) * 0.3
        tensors[f"base_model.model.{name}.lora_B.weight"] = \
            torch.randn(fan_out, r, generator=g) * 0.3
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}),
        "use_rslora": rslora, "fan_in_fan_out": any("c_attn" in t for t in targets),
        "base_model_name_or_path": str(model_dir), "lora_dropout": 0.0, "bias": "none"}))
    return out


def lora_hooks(model: torch.nn.Module, adapter: Path) -> list:
    """PEFT's unmerged forward, independently of rise.adapter: each target module's output
    plus scale * B(A(x)) (for GPT-2's Conv1D the same in its (in, out) convention)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    t = load_file(str(adapter / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    handles = []
    for key in t:
        if not key.endswith("lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a = t[key].to(torch.float64)
        b = t[key.replace("lora_A", "lora_B")].to(torch.float64)
        s = cfg["lora_alpha"] / (a.shape[0] ** 0.5 if cfg.get("use_rslora") else a.shape[0])

        def hook(mod, inp, out, a=a, b=b, s=s):
            return out + s * ((inp[0].to(a.dtype) @ a.T) @ b.T).to(out.dtype)

        handles.append(modules[name].register_forward_hook(hook))
    return handles


@pytest.fixture(scope="module")
def base64_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-bases")
    return {a: save_tiny_model(a, root / a, torch.float64) for a in TARGETS}


def _records() -> list[Record]:
    return [Record(id=str(i), number=i, text=t, prompt=None, response=None, raw={})
            for i, t in enumerate(TEXTS[:3])]


def ground_truth(model, enc):
    """dLoss/dW of the head, by float64 autograd through the base model with the LoRA
    paths as hooks (the head's own LoRA path included): the adapted head's gradient."""
    head = model.get_output_embeddings()
    orig = head.weight
    w64 = torch.nn.Parameter(orig.detach().clone().double())
    ids = torch.tensor([enc.input_ids])
    try:
        head.weight = w64
        with torch.enable_grad():
            h = model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))[0]
            h = h.detach().requires_grad_()
            logits = head(h)
            tgt = ids[0, 1:]
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], tgt)
            loss.backward()
    finally:
        head.weight = orig
    return w64.grad.detach()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_lora_exact_readout_equals_autograd(base64_models, tmp_path, arch):
    base = base64_models[arch]
    adapter = make_lora(base, tmp_path / "lora", TARGETS[arch])
    lm = load_model(base, dtype="float64", adapter=adapter)
    plain = load_model(base, dtype="float64")
    # The head among the targets changes W (and, for GPT-2, not the tied input embedding).
    assert not torch.equal(lm.head.weight, plain.head.weight)
    emb = lm.model.get_input_embeddings().weight
    torch.testing.assert_close(emb, plain.model.get_input_embeddings().weight, rtol=0, atol=0)
    # The reference: the base model with the LoRA paths as hooks (PEFT's unmerged forward).
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    handles = lora_hooks(ref, adapter)
    encs = [encode_record(r, lm.tokenizer, 64) for r in _records()]
    ids = torch.tensor([encs[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   rtol=1e-10, atol=1e-10)
    feats = featurize(lm, encs, make_config(exact=True), batch_size=2)
    truth = [ground_truth(ref, e) for e in encs]
    for h in handles:
        h.remove()
    for i, fi in enumerate(feats.factors):
        for j, fj in enumerate(feats.factors):
            want = float((truth[i] * truth[j]).sum())
            got = exact.inner(fi, fj, "rh", lm.head.vocab)
            assert abs(got - want) <= 1e-6 * abs(want), (i, j, got, want)


def test_rslora_and_alpha_scale(base64_models, tmp_path):
    base = base64_models["llama"]
    adapter = make_lora(base, tmp_path / "rs", ["lm_head"], r=4, alpha=6.0, rslora=True)
    lm = load_model(base, dtype="float64", adapter=adapter)
    plain = load_model(base, dtype="float64")
    ad = read_adapter(adapter)
    a = ad.lora["lm_head"]["A"].double()
    b = ad.lora["lm_head"]["B"].double()
    torch.testing.assert_close(lm.head.weight - plain.head.weight, 6.0 / 2.0 * (b @ a))


@pytest.fixture(scope="module")
def lora_index(tmp_path_factory, base64_models):
    root = tmp_path_factory.mktemp("lora-index")
    base = base64_models["llama"]
    adapter = make_lora(base, root / "lora", TARGETS["llama"])
    data = write_jsonl(root / "d.jsonl", [{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    lm = load_model(base, adapter=adapter)
    create_index(LocalStore(root / "idx"), lm, data, FieldMap(), make_config(dims=(32, 16, 16)))
    plain = load_model(base)
    create_index(LocalStore(root / "plain"), plain, data, FieldMap(),
                 make_config(dims=(32, 16, 16)))
    return root, base, adapter, data


def test_index_identity_includes_the_adapter(lora_index):
    root, base, adapter, _ = lora_index
    sha = read_adapter(adapter).sha256
    idx = open_index(LocalStore(root / "idx"))
    assert idx.manifest.model.adapter_sha256 == sha
    raw = json.loads((root / "idx" / "manifest-00000001.json").read_text())
    assert raw["model"]["adapter_sha256"] == sha
    plain = open_index(LocalStore(root / "plain")).manifest
    assert plain.model.adapter_sha256 is None
    # Rule 2 of rise.manifest: a one-object manifest is written with the lowest version
    # that expresses it, version 2 with an adapter; without one it stays version 1, byte
    # for byte without the new key, so older code reads it.
    parts = dict(config=plain.config, ingests=plain.ingests, shards=plain.shards,
                 tombstones=plain.tombstones)
    v1 = Manifest.build(1, model=plain.model, **parts)
    assert v1.format_version == 1 and "adapter_sha256" not in json.loads(v1.to_json())["model"]
    Manifest.parse(v1.to_json(), "m")
    v2 = Manifest.build(1, model=idx.manifest.model, **parts)
    assert v2.format_version == 2
    assert Manifest.parse(v2.to_json(), "m").model.adapter_sha256 == sha
    # Query with the same adapter: accepted.
    idx.check_model(load_model(base, adapter=adapter))


def test_query_with_another_or_no_adapter_is_refused(lora_index, tmp_path):
    root, base, adapter, _ = lora_index
    idx = open_index(LocalStore(root / "idx"))
    with pytest.raises(Mismatch, match="differs in adapter"):
        idx.check_model(load_model(base))
    other = make_lora(base, tmp_path / "other", TARGETS["llama"], seed=7)
    with pytest.raises(Mismatch, match="differs in adapter"):
        idx.check_model(load_model(base, adapter=other))
    with pytest.raises(Mismatch, match="differs in adapter"):
        open_index(LocalStore(root / "plain")).check_model(load_model(base, adapter=adapter))


def test_adapter_hash_ignores_provenance_only(base64_models, tmp_path):
    base = base64_models["llama"]
    a = make_lora(base, tmp_path / "a", ["lm_head"])
    h = read_adapter(a).sha256
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "somewhere/else"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    assert read_adapter(a).sha256 == h
    cfg["lora_alpha"] = 16
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    assert read_adapter(a).sha256 != h


def test_bad_adapters_are_refused(base64_models, tmp_path):
    base = base64_models["llama"]
    with pytest.raises(NotFound):
        load_model(base, adapter=tmp_path / "missing")
    a = make_lora(base, tmp_path / "a", ["lm_head"])
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(UnsupportedModel, match="DoRA"):
        load_model(base, adapter=a)
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidInput):
        load_model(base, adapter=a)
    # An adapter of another base: its module is missing.
    b = make_lora(base, tmp_path / "b", TARGETS["llama"])
    with pytest.raises(Mismatch, match="does not have"):
        load_model(base64_models["gpt_neox"], adapter=b)


def test_cli_adapter_flag(lora_index, tmp_path, capsys):
    """``--adapter`` on the command line: a query without it is refused (exit 5, one line)
    and with it answered."""
    from rise.cli import main

    root, base, adapter, data = lora_index
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "q", "text": TEXTS[0]}])
    args = ["attribute", "--index", root / "idx", "--model", base, "--queries", q,
            "--output", tmp_path / "o.jsonl"]
    capsys.readouterr()
    assert main([str(a) for a in args]) == 5
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rise: error: model mismatch") and "adapter" in err, err
    assert main([str(a) for a in args + ["--adapter", adapter]]) == 0
    hits = json.loads((tmp_path / "o.jsonl").read_text())["results"]
    assert len(hits) == len(TEXTS)


def test_a_worker_pool_names_an_adapter(lora_index):
    """``RISE_POOLS`` entries take ``adapter``: the pool's model is the adapted one."""
    from rise.settings import Pool, Settings
    from rise.worker.work import load_pool_model

    _, base, adapter, _ = lora_index
    lm = load_pool_model(Pool(model=str(base), adapter=str(adapter)), Settings())
    assert lm.identity.adapter_sha256 == read_adapter(adapter).sha256
    assert load_pool_model(Pool(model=str(base)), Settings()).identity.adapter_sha256 is None
