"""Placement: the sharded (accelerate-dispatched) path gives the plain path's sketches, and
the head never allocates tokens x vocabulary at once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from conftest import TEXTS
from rise.config import make_config
from rise.data import Record, encode_record
from rise.featurize import featurize
from rise.model import load_model


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
