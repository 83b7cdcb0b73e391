"""Placement: the planner (rise.placement) and the placed model doing what it plans.

The planner: parameter counts, placement, fit verdicts, index sizes, parsing, table; it runs
on the meta device from the shipped config.json fixtures: no weights, no GPU, no network.
The placed model: the sharded (accelerate-dispatched) path gives the plain path's sketches,
and the head never allocates tokens x vocabulary at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TEXTS
from rise import constants
from rise import placement as P
from rise.config import make_config
from rise.data import Record, encode_record
from rise.errors import InvalidInput, NotFound, UnsupportedModel
from rise.factors import Features
from rise.featurize import featurize
from rise.model import load_model
from rise.shard import build_shard

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
OLMO_32B = str(CONFIGS / "olmo-2-32b.json")
GiB = 1024**3

# Published totals: the Pythia suite's model card table (exact) and the OLMo 2 releases
# (1B = 1.48B, 7B = 7.30B, 13B = 13.7B, 32B = 32.2B).
PUBLISHED_PARAMS = {
    "pythia-14m": 14_067_712,
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "olmo-2-1b": 1.48e9,
    "olmo-2-7b": 7.30e9,
    "olmo-2-13b": 13.7e9,
    "olmo-2-32b": 32.2e9,
}


@pytest.fixture(scope="module")
def plan_4x80() -> P.Placement:
    return P.plan_placement(OLMO_32B, gpus=4, gpu_memory_bytes=P.parse_bytes("80GiB"))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_fixture_param_counts_match_published(name: str) -> None:
    path = CONFIGS / f"{name}.json"
    raw = json.loads(path.read_text())
    assert raw["model_type"] in ("gpt_neox", "olmo2") and raw["architectures"]
    net = P.build_meta_model(P.load_config(str(path)))
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.01, (name, n)
    assert next(net.parameters()).device.type == "meta"


def test_olmo_32b_fits_on_4x80gib_spread_over_all_gpus(plan_4x80: P.Placement) -> None:
    p = plan_4x80
    assert abs(p.n_params - 32.2e9) / 32.2e9 < 0.01
    assert p.weight_bytes == p.n_params * 2  # bfloat16
    assert p.fits and p.reason is None
    gpus = [d for d in p.devices if d.device.startswith("cuda")]
    assert len(gpus) == 4 and all(d.n_layers > 0 for d in gpus)
    assert sum(d.n_layers for d in gpus) == p.n_layers == 64
    assert sum(d.weight_bytes for d in gpus) == p.weight_bytes
    assert all(d.peak_bytes <= d.budget_bytes == 80 * GiB for d in gpus)
    assert all(d.context_bytes == P.CUDA_CONTEXT_BYTES for d in gpus)


def test_head_and_final_norm_share_the_last_gpu(plan_4x80: P.Placement) -> None:
    dm = plan_4x80.device_map
    assert dm["lm_head"] == dm["model.norm"] == 3
    assert plan_4x80.head_device == "cuda:3"
    head = [d for d in plan_4x80.devices if d.has_head]
    assert [d.device for d in head] == ["cuda:3"] and head[0].head_workspace_bytes > 0
    pythia = P.plan_placement(str(CONFIGS / "pythia-6.9b.json"), 2, "24GiB")
    head_name = next(n for n, m in P.build_meta_model(P.load_config(
        str(CONFIGS / "pythia-6.9b.json"))).named_modules() if n.endswith(("lm_head", "embed_out")))
    assert pythia.device_map[head_name] == pythia.device_map["gpt_neox.final_layer_norm"] == 1


def test_olmo_32b_fits_on_one_141gib_gpu() -> None:
    p = P.plan_placement(OLMO_32B, gpus=1, gpu_memory_bytes="141GiB")
    assert p.fits, p.reason
    (gpu,) = p.devices
    assert gpu.n_layers == 64 and gpu.has_head and gpu.weight_bytes == p.weight_bytes
    assert gpu.peak_bytes == (P.CUDA_CONTEXT_BYTES + gpu.weight_bytes + gpu.activation_bytes
                              + gpu.head_workspace_bytes)


def test_olmo_32b_does_not_fit_on_2x24gib_but_does_with_cpu_offload() -> None:
    p = P.plan_placement(OLMO_32B, gpus=2, gpu_memory_bytes="24GiB")
    assert not p.fits and "no room" in (p.reason or "")
    assert p.devices[-1].device == "unplaced" and p.devices[-1].n_layers > 0
    off = P.plan_placement(OLMO_32B, gpus=2, gpu_memory_bytes="24GiB", cpu_memory_bytes="128GiB")
    assert off.fits, off.reason
    cpu = [d for d in off.devices if d.device == "cpu"]
    assert cpu and cpu[0].n_layers > 0 and any("offloaded" in n for n in off.notes)


def test_a_gpu_too_small_for_the_head_is_reported() -> None:
    p = P.plan_placement(OLMO_32B, gpus=1, gpu_memory_bytes="2GiB")
    assert not p.fits and "cuda:0 peak" in (p.reason or "")


def test_sketch_bytes_per_example_formula() -> None:
    # float16 sketches + two float32 norms + three int64 columns + the id's int64 offset
    assert P.sketch_bytes_per_example((64, 32, 32)) == (64 * 32 + 32 * 32) * 2 + 40 == 6184
    kr, kh, kg = 8, 4, 2
    assert P.sketch_bytes_per_example((kr, kh, kg)) == (kr * kh + kg * kh) * 2 + 40 == 120
    assert P.sketch_bytes_per_example((kr, kh, kg), id_bytes=12) == 132
    assert P.rapidin_bytes_per_example() == 65536 * 2


@pytest.mark.parametrize("dims, n, id_bytes", [((8, 4, 2), 300, 12), ((128, 64, 64), 1024, 7)])
def test_sketch_bytes_per_example_is_what_a_shard_stores(dims, n, id_bytes) -> None:
    """The planner's figure against a shard built from fixed tensors (ids of one length),
    at the default dims and shard size among others."""
    kr, kh, kg = dims
    gen = torch.Generator().manual_seed(0)
    feats = Features(token_counts=torch.arange(1, n + 1, dtype=torch.int64),
                     rh=torch.randn(n, kr * kh, generator=gen),
                     gh=torch.randn(n, kg * kh, generator=gen))
    ids = [f"{i:0{id_bytes}d}" for i in range(n)]
    assert {len(i.encode()) for i in ids} == {id_bytes}
    data = build_shard({"kind": "test"}, ids, [1] * n, list(range(n)), feats, "float16")
    header = 8 + int.from_bytes(data[:8], "little")  # safetensors: length, then JSON header
    per_example = P.sketch_bytes_per_example(dims, id_bytes=id_bytes)
    assert len(data) == header + n * per_example + P.sketch_shard_fixed_bytes(dims)
    # Per example, a shard of n examples costs the planner's figure plus its fixed part / n.
    overhead = (header + P.sketch_shard_fixed_bytes(dims)) / n
    assert len(data) / n == pytest.approx(per_example + overhead)
    if n == constants.DEFAULT_SHARD_SIZE:  # a full shard: the fixed part is under 1% per example
        assert overhead < 0.01 * per_example


def test_storage_ratio_and_dense_gradient(plan_4x80: P.Placement) -> None:
    p = plan_4x80
    # default dims (128, 64, 64): (8192 + 4096) float16 values + 40 bytes of the rest
    assert p.sketch_bytes_per_example == 24616 and p.rapidin_bytes_per_example == 131072
    assert p.storage_ratio == pytest.approx(131072 / 24616) and p.storage_ratio > 1
    assert p.dense_gradient_bytes == p.n_params * 4 > 80 * GiB
    assert f"{p.storage_ratio:.1f}x" in P.format_placement(p)
    assert not hasattr(p, "tokens_per_s")  # never measured by the planner: not reported


def test_head_chunk_default_and_workspace() -> None:
    # 256 MiB for 4 float32 (chunk, V) temporaries, at most 4096 tokens (rise.readout).
    assert P.default_head_chunk_tokens(100352) == 167
    assert P.default_head_chunk_tokens(50304) == 333
    assert P.default_head_chunk_tokens(1000) == 4096
    v, d, chunk = 100352, 5120, 512
    want = (v * d + chunk * v * 4 + chunk * 129 * d + 8 * 512 * d) * 4
    assert P.head_workspace_bytes(v, d, 8, 512, chunk, weight_is_fp32=False) == want
    assert P.head_workspace_bytes(v, d, 8, 512, chunk, weight_is_fp32=True) == want - v * d * 4
    # A chunk never holds more tokens than the batch.
    assert P.head_workspace_bytes(10, 4, 1, 2, 4096, True) == (2 * 10 * 4 + 2 * 129 * 4 + 8) * 4
    assert P.activation_bytes(8, 512, 5120, 27648, 2) == 8 * 512 * (2 * 5120 + 2 * 27648) * 2


@pytest.mark.parametrize("text, want", [
    ("80GiB", 80 * GiB), ("80GB", 80 * 10**9), ("141GiB", 141 * GiB), ("24G", 24 * 10**9),
    ("24Gi", 24 * GiB), (" 80 gib ", 80 * GiB), ("1.5GiB", 3 * GiB // 2), ("512MiB", 2**29),
    ("1000", 1000), ("7B", 7), ("2TiB", 2 * 2**40), (1000, 1000), (0, 0),
])
def test_parse_bytes(text: int | str, want: int) -> None:
    assert P.parse_bytes(text) == want


@pytest.mark.parametrize("bad", ["", "abc", "GiB", "-1GiB", "80XB", "80 G iB", "1e9", "0x10",
                                 -5, True, 1.5, None])
def test_parse_bytes_rejects(bad: object) -> None:
    with pytest.raises(InvalidInput):
        P.parse_bytes(bad)  # type: ignore[arg-type]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        P.plan_placement(str(tmp_path / "missing.json"), 1, "80GiB")
    with pytest.raises(NotFound):  # a folder without config.json
        P.plan_placement(str(tmp_path), 1, "80GiB")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidInput):
        P.plan_placement(str(tmp_path), 1, "80GiB")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(UnsupportedModel):
        P.plan_placement(str(tmp_path), 1, "80GiB")
    for kwargs in ({"gpus": 0}, {"gpu_memory_bytes": 0}, {"batch_size": 0}, {"dtype": "int8"},
                   {"dims": (0, 32, 32)}, {"dims": (64, 32)}, {"head_chunk_tokens": 0},
                   {"max_length": -1}, {"gpu_memory_bytes": "lots"}):
        args = {"gpus": 1, "gpu_memory_bytes": "80GiB"} | kwargs
        with pytest.raises(InvalidInput):
            P.plan_placement(OLMO_32B, **args)


def test_model_folder_and_tied_embeddings(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # 2 GiB: with V = 1000 a head chunk is 4096 tokens, whose float64 sketch outer
    # products alone take 4096 x 8192 x 8 B = 256 MiB on the head device.
    p = P.plan_placement(str(tmp_path), gpus=2, gpu_memory_bytes="2GiB", dtype="float32")
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert p.n_params == 1000 * 64 + 4 * layer + 64  # the tied head counted once
    dm = p.device_map
    assert dm["lm_head"] == dm["model.norm"] == dm["model.embed_tokens"] == 1
    assert p.fits and p.dtype == "float32" and p.weight_bytes == p.n_params * 4


def test_table_and_dict(plan_4x80: P.Placement) -> None:
    table = P.format_placement(plan_4x80)
    for needle in ("32,234,279,936", "60.04 GiB", "olmo2", "cuda:0", "cuda:3", "+head",
                   "fits      yes", "24,616", "131,072", "5.3x", "80.00 GiB", "SDPA"):
        assert needle in table, needle
    assert "tokens/s" not in table
    assert len(table.splitlines()) == 3 + 2 + 4 + 4 + len(plan_4x80.notes)
    d = plan_4x80.to_dict()
    json.dumps(d)
    assert d["devices"][0]["n_layers"] == plan_4x80.devices[0].n_layers
    assert d["dims"] == [128, 64, 64] and d["fits"] is True
    failing = P.format_placement(P.plan_placement(OLMO_32B, 2, "24GiB"))
    assert "NO: " in failing and "unplaced" in failing


def _encoded(lm):
    recs = [Record(id=str(i), number=i, text=t, prompt=None, response=None, raw={})
            for i, t in enumerate(TEXTS)]
    return [encode_record(r, lm.tokenizer, 64) for r in recs]


def test_cpu_and_disk_offload_dispatch_gives_the_same_sketches(tiny_models, tmp_path):
    folder = tiny_models["llama"]
    cfg = make_config(dims=(32, 16, 16), topk=16)
    plain = load_model(folder)
    # Layers spread over the CPU and disk offload, head with the final norm: the layout a
    # worker gets when a model is larger than its GPUs, exercised here without a GPU.
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    sharded = load_model(folder, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert getattr(sharded.model, "hf_device_map", None), "accelerate dispatch not used"
    assert any(v == "disk" for v in sharded.model.hf_device_map.values())
    a = featurize(plain, _encoded(plain), cfg, batch_size=3)
    b = featurize(sharded, _encoded(sharded), cfg, batch_size=3)
    torch.testing.assert_close(a.rh, b.rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.gh, b.gh, rtol=1e-5, atol=1e-7)
    assert plain.identity == sharded.identity


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from transformers import GPTNeoXConfig, AutoModelForCausalLM
    from rise.readout import Head, supervised_positions, sketch_batch
    from rise.sketch import make_sketcher
    V, d, B, T = 262144, 16, 4, 256
    torch.manual_seed(0)
    head = Head(weight=torch.randn(V, d))
    hidden = torch.randn(B, T, d)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    pos = supervised_positions(hidden, ids, mask, torch.ones(B, dtype=torch.long), "mean",
                               torch.float32)
    sk = make_sketcher(0, V, d, (64, 16, 16))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chunk = int(sys.argv[1])
    sketch_batch(pos, head, sk, 128, 1.0, chunk, B)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": peak - base}))
""")


def test_head_work_never_allocates_tokens_by_vocab(tmp_path):
    """B*T*V float32 logits would be 1 GiB here; the chunked head must stay far below."""
    script = tmp_path / "probe.py"
    script.write_text(_MEMORY_PROBE)
    out = subprocess.run([sys.executable, str(script), "32"], capture_output=True, text=True,
                         check=True)
    growth = json.loads(out.stdout)["growth_kib"] * 1024
    full = 4 * 256 * 262144 * 4
    # 32-token chunks: a few (32, V) temporaries (~32 MiB each) plus the sketch maps.
    assert growth < full / 4, f"peak grew by {growth / 2**20:.0f} MiB"


def test_sketch_dims_and_topk_count_on_the_head_device() -> None:
    """The head device holds the sketch work of the configuration's dims and the gathered
    top-K rows: a configuration the pool cannot hold is refused by the plan, at submit."""
    kw = dict(gpus=1, gpu_memory_bytes="64GiB")
    base = P.plan_placement(OLMO_32B, **kw)
    assert base.fits, base.reason
    wide = P.plan_placement(OLMO_32B, dims=(960, 1024, 64), **kw)
    extra = P.sketch_workspace_bytes((960, 1024, 64), 5120, 8, 512, base.head_chunk_tokens) \
        - P.sketch_workspace_bytes((128, 64, 64), 5120, 8, 512, base.head_chunk_tokens)
    head_ws = [p.devices[0].head_workspace_bytes for p in (base, wide)]
    assert head_ws[1] - head_ws[0] == extra > GiB
    assert not wide.fits
    many = P.plan_placement(OLMO_32B, topk=50_000, gpus=1, gpu_memory_bytes="141GiB")
    assert not many.fits  # (chunk, K+1, d) float32 gathered head rows
    dense = P.plan_placement(OLMO_32B, topk=None, gpus=1, gpu_memory_bytes="141GiB")
    assert dense.fits, dense.reason  # K = V reads the dense residual: no gather
    assert any("sketch work of dims (960, 1024, 64)" in n for n in wide.notes)


def test_sketch_workspace_bytes() -> None:
    kr, kh, kg, d, b, length, chunk = 16, 8, 4, 32, 2, 5, 4096
    tokens = b * length  # a chunk never holds more tokens than the batch
    want = (b * (kr + kg) * kh * 8 + (tokens + b) * kr * kh * 8
            + tokens * (kr + kh + kg) * 12 + b * tokens * 8 + d * (kh + kg) * 4)
    assert P.sketch_workspace_bytes((kr, kh, kg), d, b, length, chunk) == want


def test_a_device_holding_only_the_head_formats(tmp_path: Path) -> None:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = P.plan_placement(str(tmp_path), gpus=2, gpu_memory_bytes="1GiB", dtype="float32")
    assert [d.n_layers for d in p.devices] == [4, 0]  # cuda:1: the head alone
    assert "cuda:1" in P.format_placement(p)
