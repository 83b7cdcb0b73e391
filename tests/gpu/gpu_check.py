#!/usr/bin/env python3
"""GPU check: RISE featurize throughput, memory vs the planner, and a CPU-offload split.

For each model config in tests/fixtures/configs it builds a random-init model of that
architecture directly on the device (parameters on meta, then ``to_empty`` + init there:
no float32 copy on the CPU), wraps it in ``rise.model.LoadedModel`` and measures, after a
warm-up, (a) the bare forward with full logits and (b) ``rise.featurize.featurize``:
tokens/s of each, their ratio, peak memory against the estimate of
``rise.placement.plan_placement``, index bytes per example and the RapidIn storage ratio.
For the smallest model it also dispatches the first half of the stack (embeddings first)
to offload ("cpu" on a GPU run, "disk" on a CPU run) with accelerate and compares the
sketches with the one-device run.

On an H200 machine (tests/gpu/README.md; `make gpu-check` fetches pydantic and its needs as
cp312 wheels into .whl/ and prints this command), from the repository root with .whl/::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONUNBUFFERED=1 PYTHONPATH=services:/tmp/site python3 tests/gpu/gpu_check.py

(the two joined by ``&&``).  About 2-4 minutes.  Results go to --out (default $OUT, else
./gpu-check-out) as gpu_check.json and gpu_check.md, rewritten after each model.  Last, it
checks the workers' GPU metrics (``rise.worker.gpustats``): torch's memory gauges and
NVML's utilisation and device memory (nvidia-ml-py, one of the wheels in .whl/) are
exported for the device (``gpu_metrics`` in gpu_check.json).
CPU smoke (CI): ``python tests/gpu/gpu_check.py --device cpu --models pythia-14m --tokens 2x32``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rise.config import SketchConfig
from rise.data import Encoded
from rise.featurize import Features, featurize
from rise.model import LoadedModel, ModelIdentity, head_of
from rise.placement import load_config, plan_placement, sketch_bytes_per_example
from torch import nn

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
GPU_MEMORY = "141GiB"


def log(msg: str) -> None:
    print(msg, flush=True)


class _Tokenizer:
    """What featurize needs of a tokenizer when it is given token ids."""

    pad_token_id = 0
    eos_token_id = 0


def build_model(config: Path, device: str, dtype: torch.dtype) -> nn.Module:
    """Random-init model of ``config`` on ``device``: parameters on meta, then to_empty."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # rotary tables stay real (and tiny)
        model = AutoModelForCausalLM.from_config(load_config(str(config)), dtype=dtype,
                                                 attn_implementation="sdpa")
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if hasattr(t, "_is_hf_initialized"):
                del t._is_hf_initialized
        model.apply(model._init_weights)
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        for p in model.parameters():  # anything _init_weights left as raw memory
            if not torch.isfinite(p).all():
                p.normal_(0.0, 0.02)
    model.tie_weights()
    return model.eval()


def wrap(model: nn.Module, name: str) -> LoadedModel:
    ident = ModelIdentity(name=name, revision=None, config_sha256="-", head_sha256="-",
                          tokenizer_sha256="-")
    return LoadedModel(model=model, tokenizer=_Tokenizer(), head=head_of(model, torch.float32),
                       identity=ident, compute_dtype=torch.float32)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, warm: Callable[[], Any], work: Callable[[], Any]) -> tuple[float, dict]:
    """Seconds of ``work`` after ``warm``, and the memory figures of both together."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    warm()
    sync(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        torch.cuda.synchronize()
        secs = start.elapsed_time(end) / 1000
        free, total = torch.cuda.mem_get_info()
        mem = {"peak_allocated": torch.cuda.max_memory_allocated(),
               "peak_reserved": torch.cuda.max_memory_reserved(), "device_used": total - free}
    else:
        t0 = time.perf_counter()
        work()
        secs, mem = time.perf_counter() - t0, {}
    return secs, mem


def records(vocab: int, n: int, length: int, seed: int) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    return [Encoded(input_ids=row.tolist(), sup_start=0, truncated=False) for row in ids]


def sketches(feats: Features) -> torch.Tensor:
    assert feats.rh is not None and feats.gh is not None
    return torch.cat([feats.rh, feats.gh], dim=1)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-example ||a - b|| / ||a|| over the raw (rh | gh) sketches."""
    return float(((a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)).max())


def split_map(model: nn.Module, offload: str, main: int | str, embed_offloaded: bool
              ) -> dict[str, int | str]:
    """Embeddings (optionally) and the first half of the layers on ``offload``; the rest of
    the stack, the final norm and the LM head on ``main``."""
    prefix = model.base_model_prefix
    base = model.base_model
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    dmap: dict[str, int | str] = {}
    for child_name, child in base.named_children():
        full = f"{prefix}.{child_name}"
        if isinstance(child, nn.ModuleList):
            for i in range(len(child)):
                dmap[f"{full}.{i}"] = offload if i < len(child) // 2 else main
        else:
            dmap[full] = offload if child is emb and embed_offloaded else main
    dmap[names[id(model.get_output_embeddings())]] = main
    return dmap


def split_check(model: nn.Module, name: str, device: str, enc: list[Encoded],
                cfg: SketchConfig, batch: int) -> dict[str, Any]:
    """Sketches of the one-device model against accelerate-dispatched copies of it."""
    from accelerate import dispatch_model

    cuda = device.startswith("cuda")
    offload, main = ("cpu", 0) if cuda else ("disk", "cpu")
    ref = sketches(featurize(wrap(model, name), enc, cfg, batch_size=batch))
    host = model.to("cpu")  # the caller's model is done with; its weights move to the CPU
    out: dict[str, Any] = {"model": name, "offload": offload, "tokens": f"{batch}x{cfg.max_length}",
                           "placements": []}
    for label, embed_off in (("embeddings + first half offloaded", True),
                             ("first half offloaded, embeddings on main", False)):
        row: dict[str, Any] = {"placement": label, "ok": False}
        try:
            with tempfile.TemporaryDirectory() as off:
                m = dispatch_model(copy.deepcopy(host), split_map(host, offload, main, embed_off),
                                   offload_dir=off)
                lm = wrap(m, name)
                row["head_device"] = str(lm.head.weight.device)
                t0 = time.perf_counter()
                got = sketches(featurize(lm, enc, cfg, batch_size=batch))
                row["tokens_per_s"] = len(enc) * cfg.max_length / (time.perf_counter() - t0)
                row["max_rel_diff"] = max_rel_diff(ref, got)
                row["ok"] = True
                del m, lm
        except Exception as e:  # noqa: BLE001 - a finding to report, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log(f"  split [{label}]: " + json.dumps({k: v for k, v in row.items() if k != "placement"}))
        out["placements"].append(row)
        gc.collect()
    good = [r for r in out["placements"] if r["ok"]]
    out["max_rel_diff"] = good[0]["max_rel_diff"] if good else None
    return out


def run_model(name: str, device: str, dtype: torch.dtype, batch: int, length: int,
              batches: int, plan: Any, split: bool) -> dict[str, Any]:
    config = CONFIGS / f"{name}.json"
    t0 = time.perf_counter()
    model = build_model(config, device, dtype)
    sync(device)
    row: dict[str, Any] = {"model": name, "device": device, "dtype": str(dtype)[6:],
                           "n_params": plan.n_params, "batch": batch, "length": length,
                           "batches": batches, "build_s": round(time.perf_counter() - t0, 2)}
    log(f"  built in {row['build_s']} s")
    lm = wrap(model, name)
    try:
        row["check_head"] = lm.check_head() or "ok"
    except Exception as e:  # noqa: BLE001 - the engine refusing the model is a finding
        row["check_head"] = f"{type(e).__name__}: {e}"
    vocab = lm.head.vocab
    enc = records(vocab, batch * batches, length, seed=1)
    warm_enc = records(vocab, batch, length, seed=2)
    ids = [torch.tensor([e.input_ids for e in enc[i * batch:(i + 1) * batch]], device=device)
           for i in range(batches)]
    mask = torch.ones_like(ids[0])

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model(input_ids=x, attention_mask=mask, use_cache=False)

    tokens = batch * length * batches
    secs, mem = timed(device, lambda: forward(ids[0]), lambda: [forward(x) for x in ids])
    row["forward_tokens_per_s"] = tokens / secs
    row["forward_peak_bytes"] = mem.get("peak_allocated")
    cfg = SketchConfig(max_length=length)
    feats: list[Features] = []
    secs, mem = timed(device, lambda: featurize(lm, warm_enc, cfg, batch_size=batch),
                      lambda: feats.append(featurize(lm, enc, cfg, batch_size=batch)))
    used = mem.get("device_used")
    row.update(
        featurize_tokens_per_s=tokens / secs, featurize_peak_bytes=mem.get("peak_allocated"),
        featurize_reserved_bytes=mem.get("peak_reserved"), device_used_bytes=used,
        sketch_finite=bool(torch.isfinite(sketches(feats[0])).all()),
        plan_peak_bytes=plan.devices[0].peak_bytes, plan_fits=plan.fits,
        plan_over_measured=plan.devices[0].peak_bytes / used if used else None,
        sketch_bytes_per_example=sketch_bytes_per_example(cfg.dims), dims=list(cfg.dims),
        plan_sketch_bytes_per_example=plan.sketch_bytes_per_example,
        rapidin_bytes_per_example=plan.rapidin_bytes_per_example,
        storage_ratio=plan.storage_ratio)
    row["featurize_over_forward"] = row["featurize_tokens_per_s"] / row["forward_tokens_per_s"]
    log("  " + json.dumps({k: row[k] for k in ("forward_tokens_per_s", "featurize_tokens_per_s",
                                               "featurize_over_forward", "device_used_bytes",
                                               "plan_peak_bytes", "check_head")}))
    lm = ids = mask = feats = None  # free the device memory before the next model
    if split:
        sb, sl = (2, 128) if device.startswith("cuda") else (batch, length)
        row["split"] = split_check(model, name, device, records(vocab, sb, sl, seed=3),
                                   SketchConfig(max_length=sl), sb)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def gib(v: int | None) -> str:
        return "-" if v is None else f"{v / 2**30:.2f}"

    out = ["| model | params | B x L | fwd tok/s | featurize tok/s | ratio | peak alloc GiB "
           "(fwd / feat) | used GiB | plan GiB | plan/used | B/example | RapidIn x |",
           "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | error: {r['error']} |" + " |" * 10)
            continue
        ratio = "-" if r["plan_over_measured"] is None else f"{r['plan_over_measured']:.2f}"
        out.append(
            f"| {r['model']} | {r['n_params'] / 1e9:.2f} B | {r['batch']} x {r['length']} | "
            f"{r['forward_tokens_per_s']:,.0f} | {r['featurize_tokens_per_s']:,.0f} | "
            f"{r['featurize_over_forward']:.2f} | {gib(r['forward_peak_bytes'])} / "
            f"{gib(r['featurize_peak_bytes'])} | {gib(r['device_used_bytes'])} | "
            f"{gib(r['plan_peak_bytes'])} | {ratio} | {r['sketch_bytes_per_example']:,} | "
            f"{r['storage_ratio']:.1f} |")
    for r in rows:
        for p in r.get("split", {}).get("placements", []):
            what = f"max rel diff {p['max_rel_diff']:.2e}, head on {p['head_device']}, " \
                   f"{p['tokens_per_s']:,.0f} tok/s" if p["ok"] else f"FAILED: {p['error']}"
            out.append(f"\nsplit {r['model']} ({r['split']['offload']} offload, "
                       f"{p['placement']}): {what}")
    return "\n".join(out)


def gpu_metrics(device: str) -> dict[str, Any]:
    """The worker's GPU series as /metrics would serve them, after the models ran here:
    every name present for gpu 0, memory figures above zero."""
    if not device.startswith("cuda"):
        return {"skipped": "no GPU"}
    from prometheus_client import CollectorRegistry
    from rise.metrics import for_service
    from rise.worker import gpustats

    m = for_service("worker", registry=CollectorRegistry())
    x = torch.ones(1024, 1024, device=device)  # something allocated now
    gpustats.record_torch_memory(m, "gpu-check")
    found = {s.name: s.value for fam in m.registry.collect() for s in fam.samples
             if s.name.startswith("rise_gpu_") and s.labels.get("gpu") == "0"}
    found.update({s.name: s.value for fam in gpustats.NvmlCollector("gpu-check").collect()
                  for s in fam.samples if s.labels.get("gpu") == "0"})
    del x
    want = ["rise_gpu_memory_allocated_bytes", "rise_gpu_memory_reserved_bytes",
            "rise_gpu_memory_max_allocated_bytes", "rise_gpu_memory_used_bytes",
            "rise_gpu_utilization_ratio"]
    missing = [n for n in want if n not in found]
    low = [n for n in want[:4] if found.get(n, 0) <= 0]
    out: dict[str, Any] = {"series": found}
    if missing or low or not 0 <= found.get("rise_gpu_utilization_ratio", 0) <= 1:
        out["error"] = f"missing {missing}, not above zero {low}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="pythia-1b,olmo-2-7b,olmo-2-32b")
    ap.add_argument("--tokens", default=None, help="BxL for every model (default 8x512, "
                    "4x512 above 20 B parameters)")
    ap.add_argument("--batches", type=int, default=3, help="timed batches per phase")
    ap.add_argument("--quick", action="store_true", help="one timed batch per phase")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out")
    args = ap.parse_args(argv)
    device = "cuda:0" if args.device == "cuda" else args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    batches = 1 if args.quick else args.batches
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda"):
        log(f"device {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    plans: dict[str, tuple[int, int, Any]] = {}
    for name in args.models.split(","):
        b, length = map(int, (args.tokens or "8x512").lower().split("x"))
        for _ in range(2):  # re-plan once at batch 4 for a model above 20 B parameters
            p = plan_placement(str(CONFIGS / f"{name}.json"), gpus=1,
                               gpu_memory_bytes=GPU_MEMORY, batch_size=b, max_length=length,
                               dtype=dtype_name)
            if args.tokens is not None or p.n_params <= 20e9 or b == 4:
                break
            b = 4
        plans[name] = (b, length, p)
    order = sorted(plans, key=lambda n: plans[n][2].n_params)  # smallest first: split check
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(order):
        b, length, p = plans[name]
        log(f"== {name}: {p.n_params / 1e9:.2f} B params, {b} x {length} tokens on {device}")
        try:
            rows.append(run_model(name, device, dtype, b, length, batches, p, split=i == 0))
        except Exception as e:  # noqa: BLE001 - keep the other models' figures
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            log(f"  ERROR {rows[-1]['error']}")
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        (out / "gpu_check.json").write_text(json.dumps({"device": device, "models": rows},
                                                       indent=2))
        (out / "gpu_check.md").write_text(table(rows) + "\n")
    log(table(rows))
    try:
        metrics = gpu_metrics(device)
    except Exception as e:  # noqa: BLE001 - report it beside the figures
        metrics = {"error": f"{type(e).__name__}: {e}"}
    log(f"GPU metrics: {json.dumps(metrics)}")
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "models": rows,
                                                    "gpu_metrics": metrics}, indent=2))
    return 1 if any("error" in r for r in rows) or "error" in metrics else 0


if __name__ == "__main__":
    raise SystemExit(main())
