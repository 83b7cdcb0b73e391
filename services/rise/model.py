"""Loading a causal LM for readout, and its identity.

A model is a local folder (config.json + safetensors), a ``.gguf`` file (converted once
into a cached folder), or a hub id already in the local Hugging Face cache.  Safetensors
only, never remote code.  Loading takes a device map and a dtype so the same code serves
one CPU, one GPU and a model sharded over several GPUs; the head and the sketch work stay
together on the head's device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from rise.adapter import merge_adapter, read_adapter
from rise.constants import cache_dir
from rise.errors import InvalidInput, NotFound, UnsupportedModel
from rise.readout import Head

# transformers (and huggingface_hub's API) are imported in the functions that load a model:
# they add ~0.9 s to an import that already has torch (measured), which the scorer, the
# gateway and the CLI verbs that load no model would pay for nothing.  gguf (~0.2 s) is
# imported only for .gguf files.

# Config keys that do not change the function the model computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
    "use_cache", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "return_dict", "architectures", "_commit_hash",
}

DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two loads of a model the same model for an index.

    Hashes of the config, of the LM head tensor as stored in the checkpoint and of the
    tokenizer, so an fp32 CPU run and a bf16 GPU run of the same checkpoint agree; with a
    LoRA adapter merged, the adapter's hash (``rise.adapter``), None without one.
    """

    name: str
    revision: str | None
    config_sha256: str
    head_sha256: str
    tokenizer_sha256: str
    adapter_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    ).hexdigest()


def config_sha256(config: Any) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha256_json(d)


def tokenizer_sha256(tokenizer: Any) -> str:
    return _sha256_json(
        {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "bos": getattr(tokenizer, "add_bos_token", None),
            "eos": getattr(tokenizer, "add_eos_token", None),
        }
    )


def _tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _checkpoint_keys(folder: Path) -> dict[str, Path]:
    """Map tensor names to the safetensors file holding them."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    single = folder / "model.safetensors"
    if single.exists():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    return {}


def head_sha256(model: Any, folder: Path | None, gguf_file: Path | None) -> str:
    """sha256 of the LM head tensor's bytes as stored in the checkpoint.

    Falls back to the loaded tensor in float32 when the checkpoint cannot be read.
    """
    head_param = model.get_output_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head_param]
    prefix = getattr(model, "base_model_prefix", "")
    candidates: list[str] = []
    for n in names:
        candidates += [n, n.removeprefix(prefix + "."), f"{prefix}.{n}"]
    if gguf_file is not None:
        # start-up: gguf only for .gguf files (note at the top)
        from gguf import GGUFReader

        tensors = {t.name: t for t in GGUFReader(str(gguf_file)).tensors}
        for name in ("output.weight", "token_embd.weight"):
            if name in tensors:
                return hashlib.sha256(tensors[name].data.tobytes()).hexdigest()
    elif folder is not None:
        keys = _checkpoint_keys(folder)
        for c in candidates:
            if c in keys:
                with safe_open(str(keys[c]), framework="pt") as f:
                    return _tensor_sha256(f.get_tensor(c))
    return _tensor_sha256(head_param.detach().float())


def head_of(model: Any, dtype: torch.dtype) -> Head:
    """The head in compute precision (float32 or wider) with the model's logit transform."""
    lin = model.get_output_embeddings()
    cfg = model.config
    scale = 1.0
    if getattr(cfg, "logit_scale", None):  # Cohere: logits * logit_scale
        scale = float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale = 1.0 / float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    bias = getattr(lin, "bias", None)
    return Head(
        weight=lin.weight.detach().to(dtype),
        bias=None if bias is None else bias.detach().to(dtype),
        scale=scale,
        softcap=float(softcap) if softcap else None,
    )


@dataclass
class LoadedModel:
    """A model ready for readout: backbone, head in compute precision, tokenizer, identity."""

    model: Any
    tokenizer: Any
    head: Head
    identity: ModelIdentity
    compute_dtype: torch.dtype

    @property
    def input_device(self) -> torch.device:
        emb = self.model.get_input_embeddings()
        if emb.weight.device.type == "meta":
            # Offloaded by accelerate: its hook streams the weight in and runs the module on
            # the execution device, which is where the token ids must go.
            hook = getattr(emb, "_hf_hook", None)
            return torch.device(getattr(hook, "execution_device", None) or "cpu")
        return emb.weight.device

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, d): the LM head's input, after the final norm."""
        out = self.model.base_model(
            input_ids=input_ids.to(self.input_device),
            attention_mask=attention_mask.to(self.input_device),
            use_cache=False,
        )
        return out[0].to(self.head.weight.device)

    @torch.inference_mode()
    def check_head(self) -> None:
        """Refuse models whose logits the head cannot reproduce (an unknown transform)."""
        ids = torch.tensor([[min(i + 2, self.head.vocab - 1) for i in range(8)]])
        mask = torch.ones_like(ids)
        logits = self.model(input_ids=ids.to(self.input_device), attention_mask=mask).logits
        logits = logits[0].to(self.head.weight.device, self.compute_dtype)
        mine, _ = self.head.logits(self.hidden_states(ids, mask)[0].to(self.compute_dtype))
        tol = 1e-3 if self.model.dtype in (torch.float32, torch.float64) else 5e-2
        err = (logits - mine).abs().max().item()
        if err > tol * (1.0 + logits.abs().max().item()):
            raise UnsupportedModel(
                f"model {self.identity.name!r} transforms its logits in a way RISE cannot "
                f"reproduce from the head (max difference {err:.3g}); its readout would not be exact"
            )


def _gguf_folder(gguf_file: Path) -> Path:
    """Convert a .gguf file once into a safetensors folder, cached by the file's sha256."""
    h = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    out = cache_dir() / "gguf" / h.hexdigest()[:16]
    if (out / "rise-identity.json").exists():
        return out
    # start-up: transformers only when a model loads (note at the top)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    kw = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
    # The GGUF loader dequantises to float but leaves a quantizer attached, which refuses
    # save_pretrained; detaching it also drops config.quantization_config.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    ident = {
        "head_sha256": head_sha256(model, None, gguf_file),
        "source": gguf_file.name,
    }
    (tmp / "rise-identity.json").write_text(json.dumps(ident))
    if out.exists():  # another process converted it first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out


def load_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: str = "float32",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    check: bool = True,
    adapter: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal LM for readout.

    dtype: weights' dtype ("float32", "float64", "bfloat16", "float16"); head math runs in
    float32, or float64 when the weights are float64.  device_map/max_memory are passed to
    transformers (accelerate) for sharded placement.  ``adapter``: a PEFT LoRA folder merged
    into the weights (``rise.adapter``); the head, the readout and the identity are the
    adapted model's.
    """
    # start-up: transformers only when a model loads (note at the top)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise InvalidInput(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    lora = read_adapter(adapter) if adapter is not None and str(adapter) else None
    path = Path(model)
    gguf_file: Path | None = None
    folder: Path | None
    stored_head: str | None = None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NotFound(f"model file {str(model)!r} does not exist")
        gguf_file = path
        folder = _gguf_folder(path)
        stored_head = json.loads((folder / "rise-identity.json").read_text())["head_sha256"]
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFound(f"model folder {str(model)!r} has no config.json")
        folder = path
    elif path.exists() or os.sep in str(model) or str(model).startswith("."):
        raise NotFound(f"unknown model {str(model)!r}: not a model folder or a .gguf file")
    else:
        folder = None  # a hub id, resolved from the local cache only
    source = str(folder) if folder is not None else str(model)
    kwargs: dict[str, Any] = dict(
        revision=revision, trust_remote_code=False, local_files_only=True,
    )
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        m = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], use_safetensors=True, device_map=device_map,
            max_memory=max_memory, offload_folder=offload_folder, **kwargs,
        )
    except (OSError, ValueError) as e:
        if folder is None:
            raise NotFound(
                f"unknown model {str(model)!r}: not a model folder, a .gguf file or a model "
                "in the local Hugging Face cache"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotFound(f"cannot load model {str(model)!r}: {first}") from None
    m.eval()
    compute = torch.float64 if m.dtype == torch.float64 else torch.float32
    if folder is None:
        # start-up: the hub API only for a hub id (note at the top)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(model), revision=revision, local_files_only=True))
    ident = ModelIdentity(
        name=gguf_file.name if gguf_file else path.name if path.is_dir() else str(model),
        revision=revision,
        config_sha256=config_sha256(m.config),
        head_sha256=stored_head or head_sha256(m, folder, None),
        tokenizer_sha256=tokenizer_sha256(tok),
        adapter_sha256=lora.sha256 if lora is not None else None,
    )
    if lora is not None:  # after the identity: the base checkpoint's hashes, plus the adapter's
        merge_adapter(m, lora)
    loaded = LoadedModel(model=m, tokenizer=tok, head=head_of(m, compute), identity=ident,
                         compute_dtype=compute)
    if check:
        loaded.check_head()
    return loaded
