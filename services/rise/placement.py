"""Placement planner (``rise plan``): does a model's RISE readout fit on these GPUs, and
how is it placed?

RISE reads only the LM head: indexing an example is one forward pass (no backward) plus
the head's work in token chunks.  The planner builds the model on the meta device (config
only: no weights, no download), counts its parameters, spreads the decoder layers over the
GPUs with accelerate, pins the LM head and the final norm to the LAST GPU (the "head
device", which also runs the sketches) and estimates each device's peak as CUDA context +
its weights + one layer's activations (+ the float32 head workspace and the float64
sketch work of the configuration's dims and top-K on the head device).

Activations assume scaled-dot-product attention (SDPA or flash): the (B, heads, L, L)
scores are never materialised, so there is no L^2 term (eager attention would add
B * heads * L^2 * bytes).  These are planning estimates, not measurements.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rise import constants
from rise.errors import InvalidInput, NotFound, UnsupportedModel
from rise.readout import HEAD_TEMPORARIES, chunk_tokens_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# transformers and accelerate are imported where used: they add ~1.0 s to an import that
# already has torch (measured), paid only by a process that plans (the gateway imports this
# module but plans only for GPU pools).

MiB, GiB = 1024**2, 1024**3
# Driver state plus the kernel images torch/cuBLAS load on first use take ~300-600 MiB on
# every device touched, before any tensor exists; take the high end to be safe.
CUDA_CONTEXT_BYTES = 600 * MiB
FP32_BYTES = 4
# What a sketch shard stores per example (rise.shard.build_shard): the float16 unit sketches
# phi_RH (kr*kh values) and phi_GH (kg*kh), two float32 norms, three int64 columns (ingest
# generation, record number, supervised token count), and the id: its UTF-8 bytes and an
# int64 offset.  Once per shard: a float64 sum per channel, one more offset and the
# safetensors header.
SKETCH_VALUE_BYTES = 2
NORMS_BYTES = 2 * 4
COLUMNS_BYTES = 3 * 8
ID_OFFSET_BYTES = 8
SUM_VALUE_BYTES = 8
# RapidIn (Lin et al., ACL 2024, "Token-wise Influential Training Data Retrieval for Large
# Language Models", arXiv:2405.11724) caches each example's full-model gradient as a
# "RapidGrad" of K random-projected values.  Assumption: K = 2^16 = 65536 in float16, as in
# its public code (examples/config_caching.json: "RapidGrad_K": 65536, model run in .half()
# so cached vectors are float16).  The paper also runs larger K (to 2^20): a wider gap.
RAPIDIN_K = 2**16
RAPIDIN_VALUE_BYTES = 2
# A dense per-example gradient in float32: what a full-gradient method holds at once.
DENSE_GRAD_VALUE_BYTES = 4

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
    "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
# SI units are decimal (GB, G = 10^9), IEC units binary (GiB, Gi = 2^30), as in Kubernetes.
_UNITS = {"": 1, "b": 1} | {p + s: 1000**i for i, p in enumerate("kmgt", 1) for s in ("", "b")} \
    | {p + s: 1024**i for i, p in enumerate("kmgt", 1) for s in ("i", "ib")}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def _positive(what: str, v: object, minimum: int = 1) -> int:
    """``v`` if it is an int >= ``minimum``, else InvalidInput."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InvalidInput(f"{what} must be an integer >= {minimum}, not {v!r}")
    return v


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string: "80GiB", "141GiB", "80GB", "24G", "512Mi", "1000"."""
    if isinstance(value, str):
        m = _BYTES_RE.match(value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise InvalidInput(f"bad memory size {value!r}: use e.g. 80GiB, 80GB, 24G or 1000")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    return _positive("memory size", value, minimum=0)


def format_bytes(n: int) -> str:
    """Human-readable binary size: "64.47 GiB", "6.02 KiB", "512 B"."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def sketch_bytes_per_example(dims: tuple[int, int, int] = constants.DEFAULT_DIMS,
                             id_bytes: int = 0) -> int:
    """Bytes a sketch shard stores per example for CountSketch dims (kr, kh, kg) and ids of
    ``id_bytes`` UTF-8 bytes: float16 phi_RH (kr*kh) and phi_GH (kg*kh), two float32 norms,
    three int64 columns and the id with its int64 offset (40 bytes besides the sketches and
    the id).  What a shard stores once is ``sketch_shard_fixed_bytes``."""
    kr, kh, kg = dims
    return ((kr * kh + kg * kh) * SKETCH_VALUE_BYTES + NORMS_BYTES + COLUMNS_BYTES
            + ID_OFFSET_BYTES + id_bytes)


def sketch_shard_fixed_bytes(dims: tuple[int, int, int] = constants.DEFAULT_DIMS) -> int:
    """Tensor bytes a sketch shard stores once whatever its size: the float64 sum of each
    channel's unit sketches and the ids' leading offset (the safetensors header is extra)."""
    kr, kh, kg = dims
    return (kr * kh + kg * kh) * SUM_VALUE_BYTES + ID_OFFSET_BYTES


def rapidin_bytes_per_example(k: int = RAPIDIN_K) -> int:
    """Cache bytes of one RapidIn RapidGrad: K float16 values (see ``RAPIDIN_K``)."""
    return k * RAPIDIN_VALUE_BYTES


def default_head_chunk_tokens(vocab: int) -> int:
    """Tokens per head chunk at run time: float32 temporaries within the default budget."""
    return chunk_tokens_for(vocab, torch.float32, constants.DEFAULT_HEAD_CHUNK_BYTES)


def activation_bytes(batch: int, length: int, hidden: int, intermediate: int, nbytes: int) -> int:
    """One decoder layer's live tensors under inference_mode: residual stream and attention
    output (2 * hidden) plus the MLP up/gate intermediates (2 * intermediate); no L^2."""
    return batch * length * (2 * hidden + 2 * intermediate) * nbytes


def sketch_workspace_bytes(dims: tuple[int, int, int], hidden: int, batch: int, length: int,
                           chunk: int, compute_bytes: int = FP32_BYTES) -> int:
    """The sketch work of one batch on the head device (``rise.readout.sketch_batch``):
    the float64 (batch, kr*kh) and (batch, kg*kh) accumulators, one chunk's flattened
    float64 outer products (chunk, max(kr, kg)*kh) with their (batch, ...) product, the
    chunk's sketched factors (kr, kh, kg columns, float64 and compute dtype), the token ->
    example matrix, and the dense CountSketch matrices of h and g (hidden x kh, kg).

    An upper bound: it is added to the head workspace, whose (chunk, V) temporaries are
    freed before the outer products peak.  On an H200 (V = 49152, d = 2048, 8 x 512
    tokens, chunk 341) the two together came to 1.2-1.4x the measured peak of
    ``sketch_batch`` for dims from (16, 8, 8) to (960, 1024, 64)."""
    kr, kh, kg = dims
    tokens = min(chunk, batch * length)
    widest = max(kr, kg) * kh
    accumulators = batch * (kr + kg) * kh * 8
    outer = (tokens + batch) * widest * 8
    factors = tokens * (kr + kh + kg) * (8 + compute_bytes) + batch * tokens * 8
    matrices = hidden * (kh + kg) * compute_bytes
    return accumulators + outer + factors + matrices


def head_workspace_bytes(vocab: int, hidden: int, batch: int, length: int, chunk: int,
                         weight_is_fp32: bool, topk: int = constants.DEFAULT_TOPK) -> int:
    """Float32 head work: the head weight cast to float32 (free if it already is), the
    (chunk, V) temporaries, the gathered top-K (+ target) head rows and the batch's final
    hidden states.  A chunk never holds more tokens than the batch."""
    chunk = min(chunk, batch * length)
    cast = 0 if weight_is_fp32 else vocab * hidden
    per_chunk = chunk * vocab * HEAD_TEMPORARIES + chunk * (topk + 1) * hidden
    return (cast + per_chunk + batch * length * hidden) * FP32_BYTES


@dataclass
class DevicePlacement:
    """Placement and peak estimate of one device: "cuda:i", "cpu", or "unplaced"."""

    device: str
    budget_bytes: int
    weight_bytes: int
    layers: list[int]
    has_head: bool
    context_bytes: int
    activation_bytes: int
    head_workspace_bytes: int
    peak_bytes: int
    fits: bool

    @property
    def n_layers(self) -> int:
        return len(self.layers)


@dataclass
class Placement:
    """What ``plan_placement`` found: sizes, placement, per-device peaks and index costs."""

    model: str
    model_type: str
    architecture: str
    dtype: str
    n_params: int
    weight_bytes: int
    n_layers: int
    hidden_size: int
    vocab_size: int
    gpus: int
    gpu_memory_bytes: int
    cpu_memory_bytes: int | None
    batch_size: int
    max_length: int
    head_chunk_tokens: int
    dims: tuple[int, int, int]
    head_device: str
    devices: list[DevicePlacement]
    device_map: dict[str, int | str]  # accelerate/transformers device_map, head included
    fits: bool
    reason: str | None
    sketch_bytes_per_example: int  # ids' UTF-8 bytes excluded (they vary)
    rapidin_bytes_per_example: int
    storage_ratio: float  # rapidin / rise bytes per example
    dense_gradient_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict; device rows gain ``n_layers``."""
        out = asdict(self) | {"dims": list(self.dims)}
        for row, dev in zip(out["devices"], self.devices, strict=True):
            row["n_layers"] = dev.n_layers
        return out


def load_config(model: str):  # -> transformers.PretrainedConfig
    """Config of a model folder holding config.json, or of a config.json path; local only,
    built-in architectures only (no remote code)."""
    # start-up: transformers/accelerate only when planning (note at the top)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(model) / "config.json" if Path(model).is_dir() else Path(model)
    if not path.is_file():
        raise NotFound(f"no config.json at {model}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise InvalidInput(f"{path} has no model_type")
    if raw["model_type"] not in CONFIG_MAPPING:
        raise UnsupportedModel(f"model_type {raw['model_type']!r} is not built into transformers")
    try:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{path} is not a valid {raw['model_type']} config: {e}") from e


def build_meta_model(cfg) -> PreTrainedModel:
    """The causal LM of ``cfg`` on the meta device: shapes only, no memory, no weights."""
    # start-up: transformers/accelerate only when planning (note at the top)
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise UnsupportedModel(f"no causal LM class for {cfg.model_type}: {e}") from e


def _layers_and_head(model: PreTrainedModel, no_split: list[str]) -> tuple[str, int, list[str]]:
    """(name, count) of the decoder-block ModuleList, and the head modules: the LM head, the
    final norm (last norm beside the blocks) and, if tied to the head, the input embedding."""
    names = {id(m): n for n, m in model.named_modules()}
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and len(m) and type(m[0]).__name__ in no_split]
    if not found:
        raise UnsupportedModel(f"cannot find the decoder layers of {type(model).__name__}")
    layers, blocks = found[0]
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    parent = model.get_submodule(layers.rpartition(".")[0])
    norms = [names[id(m)] for m in parent.children() if "norm" in type(m).__name__.lower()]
    tied = [names[id(in_emb)]] if out_emb.weight is in_emb.weight else []
    return layers, len(blocks), [names[id(out_emb)], *norms[-1:], *tied]


def _device_of(name: str, device_map: dict[str, int | str]) -> int | str:
    """Device of a parameter or module under its longest prefix in ``device_map``."""
    key = name
    while key not in device_map:
        if not key:
            raise KeyError(name)
        key = key.rpartition(".")[0]
    return device_map[key]


def _place_body(model: nn.Module, budgets: dict[int | str, int], no_split: list[str],
                dtype: torch.dtype) -> dict[str, int | str]:
    """accelerate's map, balanced over the GPUs when that still fits; "disk" = no room."""
    # start-up: transformers/accelerate only when planning (note at the top)
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)  # "Device i is not available": planning needs no GPU here
    try:
        with warnings.catch_warnings():  # hints about offloaded buffers: a plan loads nothing
            warnings.simplefilter("ignore", UserWarning)
            kw = dict(no_split_module_classes=no_split, dtype=dtype)
            balanced = get_balanced_memory(model, max_memory=dict(budgets), **kw)
            balanced = {k: min(v, budgets[k]) for k, v in balanced.items() if k in budgets}
            dmap = infer_auto_device_map(model, max_memory=balanced, clean_result=False, **kw)
            if "disk" in dmap.values():  # balancing can strand layers: fill greedily instead
                dmap = infer_auto_device_map(model, max_memory=dict(budgets), clean_result=False,
                                             **kw)
        return dict(dmap)
    finally:
        log.setLevel(level)


def plan_placement(model: str, gpus: int, gpu_memory_bytes: int | str, batch_size: int = 8,
                   max_length: int = 512, dtype: str = "bfloat16",
                   dims: tuple[int, int, int] = constants.DEFAULT_DIMS,
                   head_chunk_tokens: int | None = None,
                   cpu_memory_bytes: int | str | None = None,
                   topk: int | None = constants.DEFAULT_TOPK) -> Placement:
    """Plan a RISE readout of ``model`` (folder or config.json) on ``gpus`` GPUs.

    Layers fill the GPUs, balanced, then ``cpu_memory_bytes`` of CPU offload if given; the
    LM head and the final norm go on the last GPU, with the head's workspace for ``topk``
    (None: all V) and the sketch work of ``dims``.  ``fits`` is False, with a reason, when
    a device's estimated peak exceeds its budget or some weights find no room at all.
    """
    gpu_mem = _positive("gpu memory", parse_bytes(gpu_memory_bytes))
    cpu_mem = None if cpu_memory_bytes is None else parse_bytes(cpu_memory_bytes)
    if dtype not in _DTYPES or len(dims) != 3 or head_chunk_tokens == 0:
        raise InvalidInput(f"need dtype in {sorted(_DTYPES)}, dims (kr, kh, kg), chunk >= 1; "
                           f"got {dtype!r}, {tuple(dims)!r}, {head_chunk_tokens!r}")
    for what, v in (("gpus", gpus), ("batch_size", batch_size), ("max_length", max_length),
                    ("head_chunk_tokens", head_chunk_tokens or 1), ("topk", topk or 1),
                    *(("dims", k) for k in dims)):
        _positive(what, v)
    tdtype = _DTYPES[dtype]
    nbytes = torch.finfo(tdtype).bits // 8

    cfg = load_config(model)
    net = build_meta_model(cfg)
    no_split = sorted(net._no_split_modules or [])
    layers_name, n_layers, heads = _layers_and_head(net, no_split)
    params = [(n, p.numel()) for n, p in net.named_parameters()]  # tied weights once
    n_params = sum(k for _, k in params)
    vocab, hidden = net.get_output_embeddings().weight.shape
    intermediate = getattr(cfg.get_text_config(), "intermediate_size", None) or 4 * hidden
    chunk = head_chunk_tokens or default_head_chunk_tokens(vocab)
    head_bytes = nbytes * sum(k for n, k in params if any(n.startswith(h + ".") for h in heads))
    act = activation_bytes(batch_size, max_length, hidden, intermediate, nbytes)
    # K >= V (or all) reads the dense residual out: no gathered (chunk, K+1, d) rows.
    gathered = 0 if topk is None or topk >= vocab else topk
    sketch_ws = sketch_workspace_bytes(dims, hidden, batch_size, max_length, chunk)
    ws = head_workspace_bytes(vocab, hidden, batch_size, max_length, chunk,
                              nbytes == FP32_BYTES, topk=gathered) + sketch_ws

    last = gpus - 1
    budgets: dict[int | str, int] = {i: gpu_mem - CUDA_CONTEXT_BYTES - act for i in range(gpus)}
    budgets[last] -= head_bytes + ws
    budgets = {k: max(0, v) for k, v in budgets.items()} | ({"cpu": cpu_mem} if cpu_mem else {})
    for name in heads:  # place the body without the head; the head goes on the last GPU
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent), attr, nn.Identity())
    device_map = _place_body(net, budgets, no_split, tdtype) | {name: last for name in heads}

    on: dict[int | str, int] = {}
    for n, k in params:
        dev = _device_of(n, device_map)
        on[dev] = on.get(dev, 0) + k * nbytes
    if "disk" not in on:  # only weightless modules (rotary buffers) spilled: keep them home
        device_map = {k: last if v == "disk" else v for k, v in device_map.items()}
    layer_dev = [_device_of(f"{layers_name}.{i}", device_map) for i in range(n_layers)]
    used = set(device_map.values())

    def row(dev: int | str, label: str, budget: int, ctx: int, a: int, w: int
            ) -> DevicePlacement:
        peak = ctx + on.get(dev, 0) + a + w
        return DevicePlacement(label, budget, on.get(dev, 0), [j for j, d in enumerate(layer_dev)
                          if d == dev], dev == last, ctx, a, w, peak, peak <= budget)

    rows = [row(i, f"cuda:{i}", gpu_mem, *((CUDA_CONTEXT_BYTES, act) if i in used else (0, 0)),
                ws if i == last else 0) for i in range(gpus)]
    if cpu_mem is not None or "cpu" in used:
        rows.append(row("cpu", "cpu", cpu_mem or 0, 0, 0, 0))
    reasons = [f"{r.device} peak {format_bytes(r.peak_bytes)} > budget "
               f"{format_bytes(r.budget_bytes)}" for r in rows if not r.fits]
    if "disk" in used:  # accelerate spills to "disk" what no budget holds: never planned
        rows.append(row("disk", "unplaced", 0, 0, 0, 0))
        reasons.insert(0, f"{format_bytes(on['disk'])} of weights find no room: the body needs "
                       f"{format_bytes(n_params * nbytes - head_bytes)}, the devices hold "
                       f"{format_bytes(sum(budgets.values()))} after context, activations "
                       "and the head's weights and workspace")
    notes = ["attention assumed SDPA/flash: no B*heads*L^2 score term in activations",
             f"head ws includes the sketch work of dims {tuple(dims)}: "
             f"{format_bytes(sketch_ws)} (top-K {'all' if topk is None else topk})",
             "index bytes per example exclude the id's UTF-8 bytes, and each shard adds "
             "its channel sums and header once"]
    if offloaded := layer_dev.count("cpu"):
        notes.append(f"{offloaded} layers offloaded to CPU: streamed over PCIe every forward")
    rise_b, rapid_b = sketch_bytes_per_example(dims), rapidin_bytes_per_example()
    return Placement(
        model=model, model_type=cfg.model_type,
        architecture=(getattr(cfg, "architectures", None) or [type(net).__name__])[0],
        dtype=str(tdtype).removeprefix("torch."), n_params=n_params,
        weight_bytes=n_params * nbytes, n_layers=n_layers, hidden_size=hidden,
        vocab_size=vocab, gpus=gpus, gpu_memory_bytes=gpu_mem, cpu_memory_bytes=cpu_mem,
        batch_size=batch_size, max_length=max_length, head_chunk_tokens=chunk,
        dims=(dims[0], dims[1], dims[2]), head_device=f"cuda:{last}", devices=rows, device_map=device_map,
        fits=not reasons, reason="; ".join(reasons) or None,
        sketch_bytes_per_example=rise_b, rapidin_bytes_per_example=rapid_b,
        storage_ratio=rapid_b / rise_b, dense_gradient_bytes=n_params * DENSE_GRAD_VALUE_BYTES,
        notes=notes)


def format_placement(p: Placement) -> str:
    """The placement as plain text: header, one row per device, verdict, index costs,
    notes."""
    g = format_bytes
    lines = [
        f"model     {p.model} ({p.model_type}, {p.architecture})",
        f"params    {p.n_params:,}  weights {g(p.weight_bytes)} in {p.dtype}  "
        f"layers {p.n_layers}  hidden {p.hidden_size}  vocab {p.vocab_size}",
        f"run       {p.gpus} x {g(p.gpu_memory_bytes)} GPU  batch {p.batch_size} x "
        f"{p.max_length} tokens  head chunk {p.head_chunk_tokens} tokens  "
        f"dims {tuple(p.dims)}", "",
        f"{'device':<9}{'layers':>6}  {'range':<12}{'weights':>12}{'activ.':>12}"
        f"{'head ws':>12}{'peak':>12}{'budget':>12}  ok"]
    for r in p.devices:
        span = "" if not r.layers else f"{r.layers[0]}" if r.n_layers == 1 else \
            f"{r.layers[0]}-{r.layers[-1]}"  # a device may hold the head alone
        what = "+".join(x for x in (span, "head" if r.has_head else "") if x)  # fill is in order
        lines.append(f"{r.device:<9}{r.n_layers:>6}  {what or '-':<12}{g(r.weight_bytes):>12}"
                     f"{g(r.activation_bytes):>12}{g(r.head_workspace_bytes):>12}"
                     f"{g(r.peak_bytes):>12}{g(r.budget_bytes):>12}  {'yes' if r.fits else 'NO'}")
    return "\n".join(lines + [
        "", f"fits      {'yes' if p.fits else 'NO: ' + (p.reason or '')}"
        f"  (LM head + final norm on {p.head_device})",
        f"index     RISE {p.sketch_bytes_per_example:,} B/example  RapidIn "
        f"{p.rapidin_bytes_per_example:,} B/example (K={RAPIDIN_K}, fp16)  "
        f"ratio {p.storage_ratio:.1f}x",
        f"full grad dense fp32 per-example gradient {g(p.dense_gradient_bytes)}; with the "
        f"weights {g(p.dense_gradient_bytes + p.weight_bytes)} vs "
        f"{g(p.gpu_memory_bytes)} per GPU",
        *(f"note      {n}" for n in p.notes)])
