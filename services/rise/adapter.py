"""PEFT LoRA adapters, merged into the base model's weights before the readout.

An adapter is a folder as PEFT saves it: ``adapter_config.json`` and
``adapter_model.safetensors``.  Merging adds, for every target module, the low-rank update

    delta_W = scale * B @ A        scale = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA)

to its weight (transposed for GPT-2's ``Conv1D``, whose weight is (in, out); for an
embedding, PEFT's ``lora_embedding_A/B`` give ``(B @ A)^T``).  Ranks come from the tensors,
``alpha_pattern`` may override lora_alpha per module (PEFT's rule: the pattern matches the
end of the module's name).  ``modules_to_save`` copies replace the module's tensors.  The
update is computed in float64 and added in the weight's dtype, so the merged model computes
what PEFT's unmerged forward computes, up to that rounding.

A module whose weight is shared with another (tied input/output embeddings) gets its own
copy before the update: PEFT's LoRA on ``lm_head`` changes the head, not the input
embedding.  With ``lm_head`` among the targets the head ``W`` the
readout uses is the adapted one.

The adapter's identity is ``sha256``: a hash of its configuration (canonical JSON, without
the keys that only say where it came from) and of its tensors file's bytes.  Indexes record
it, and a query with another adapter, or none, is refused like another model.

DoRA, LoRA biases and layers other than linear, Conv1D and embedding layers are refused
(UnsupportedModel) rather than merged approximately.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rise.errors import InvalidInput, Mismatch, NotFound, UnsupportedModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Config keys that say where an adapter came from, not what it computes.
_VOLATILE_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version",
                  "auto_mapping", "task_type"}


@dataclass
class LoraAdapter:
    """A LoRA adapter read from its folder: configuration, tensors and identity hash."""

    name: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sha256: str
    # module name -> {"A": ..., "B": ...} (lora_A/B or lora_embedding_A/B)
    lora: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # module name -> {param name: tensor} of modules_to_save copies
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """Module names the adapter changes (LoRA targets and saved modules)."""
        return sorted(set(self.lora) | set(self.saved))

    def scale(self, module: str, rank: int) -> float:
        alpha = float(self.config.get("lora_alpha", 8))
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        if self.config.get("use_rslora"):
            return alpha / math.sqrt(rank)
        return alpha / rank


def adapter_sha256(config: dict[str, Any], weights: bytes) -> str:
    """Identity of an adapter: its configuration (without provenance keys) and tensors."""
    cfg = {k: v for k, v in config.items() if k not in _VOLATILE_KEYS}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str).encode())
    h.update(b"\0")
    h.update(hashlib.sha256(weights).digest())
    return h.hexdigest()


def read_adapter(folder: str | os.PathLike) -> LoraAdapter:
    """Read and check a PEFT LoRA folder (NotFound, InvalidInput, UnsupportedModel)."""
    path = Path(folder)
    where = str(folder)
    if not path.is_dir():
        raise NotFound(f"adapter folder {where!r} does not exist")
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise NotFound(f"adapter folder {where!r} has no {CONFIG_FILE}")
    if not w_path.is_file():
        raise NotFound(f"adapter folder {where!r} has no {WEIGHTS_FILE} (safetensors only)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"adapter {where!r}: {CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"adapter {where!r}: {CONFIG_FILE} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise UnsupportedModel(f"adapter {where!r} is a {kind} adapter; RISE merges LoRA only")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise UnsupportedModel(f"adapter {where!r} uses {what}, which RISE does not merge")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise InvalidInput(f"adapter {where!r}: lora_alpha must be a positive number")
    weights = w_path.read_bytes()
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidInput(f"adapter {where!r}: {WEIGHTS_FILE} cannot be read: {e}") from None
    ad = LoraAdapter(name=path.name, config=config, tensors=tensors,
                     sha256=adapter_sha256(config, weights))
    _sort_tensors(ad, where)
    if not ad.targets:
        raise InvalidInput(f"adapter {where!r} holds no LoRA tensors")
    return ad


_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                   r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


def _sort_tensors(ad: LoraAdapter, where: str) -> None:
    saved_names = set(ad.config.get("modules_to_save") or [])
    for key, t in ad.tensors.items():
        name = key.removeprefix(PREFIX)
        m = _LORA.match(name)
        if m is not None:
            slot = "A" if m["kind"].endswith("A") else "B"
            module = m["module"]
            if m["kind"].startswith("lora_embedding"):
                module += "#embedding"
            ad.lora.setdefault(module, {})[slot] = t
            continue
        if ".modules_to_save." in name:
            module, _, rest = name.partition(".modules_to_save.")
            param = rest.split(".", 1)[1] if "." in rest else rest
            ad.saved.setdefault(module, {})[param] = t
            continue
        module, _, param = name.rpartition(".")
        if module and module.rsplit(".", 1)[-1] in saved_names | {s.rsplit(".", 1)[-1]
                                                                  for s in saved_names}:
            ad.saved.setdefault(module, {})[param] = t
            continue
        raise UnsupportedModel(f"adapter {where!r}: tensor {key!r} is neither a LoRA factor "
                               "nor a saved module")
    for module, ab in ad.lora.items():
        if set(ab) != {"A", "B"}:
            raise InvalidInput(f"adapter {where!r}: module {module.split('#')[0]!r} has "
                               f"lora_{'B' if 'A' in ab else 'A'} missing")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidInput(f"adapter {where!r}: module {module.split('#')[0]!r} has LoRA "
                               f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)}")


def _own_parameter(model: torch.nn.Module, module: torch.nn.Module, param: str) -> None:
    """Give ``module.<param>`` its own storage when another module shares it (tied
    embeddings), so an update of one leaves the other as it was."""
    p = getattr(module, param)
    users = sum(1 for _, q in model.named_parameters(remove_duplicate=False) if q is p)
    if users > 1:
        setattr(module, param, torch.nn.Parameter(p.detach().clone(),
                                                  requires_grad=p.requires_grad))


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, ad: LoraAdapter) -> list[str]:
    """Merge ``ad`` into ``model`` in place; returns the module names it changed.

    Mismatch when a target module is missing or its shape differs (an adapter of another
    base model); UnsupportedModel for layer kinds RISE cannot merge exactly.
    """
    modules = dict(model.named_modules())
    changed = []
    for name, ab in sorted(ad.lora.items()):
        embedding = name.endswith("#embedding")
        mname = name.removesuffix("#embedding")
        mod = modules.get(mname)
        if mod is None:
            raise Mismatch(f"adapter {ad.name!r} targets module {mname!r}, which the model "
                           "does not have (an adapter of another base model?)")
        w = getattr(mod, "weight", None)
        if w is None or w.device.type == "meta":
            raise UnsupportedModel(f"adapter {ad.name!r}: module {mname!r} has no weight in "
                                   "memory (offloaded models cannot be merged)")
        a, b = ab["A"].double(), ab["B"].double()
        delta = ad.scale(mname, a.shape[0]) * (b @ a)
        kind = type(mod).__name__
        if embedding or isinstance(mod, torch.nn.Embedding):
            delta = delta.T if embedding else delta
        elif kind == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
            delta = delta.T
        elif not isinstance(mod, torch.nn.Linear):
            raise UnsupportedModel(f"adapter {ad.name!r}: module {mname!r} is a {kind}; "
                                   "RISE merges LoRA into linear and embedding layers only")
        if tuple(delta.shape) != tuple(w.shape):
            raise Mismatch(f"adapter {ad.name!r}: module {mname!r} update is "
                           f"{tuple(delta.shape)} but its weight is {tuple(w.shape)} "
                           "(an adapter of another base model?)")
        _own_parameter(model, mod, "weight")
        w = mod.weight
        w.copy_((w.double() + delta.to(w.device)).to(w.dtype))
        changed.append(mname)
    for mname, params in sorted(ad.saved.items()):
        mod = modules.get(mname)
        if mod is None:
            raise Mismatch(f"adapter {ad.name!r} saves module {mname!r}, which the model "
                           "does not have")
        for pname, t in params.items():
            cur = getattr(mod, pname, None)
            if not isinstance(cur, torch.Tensor) or tuple(cur.shape) != tuple(t.shape):
                raise Mismatch(f"adapter {ad.name!r}: saved {mname}.{pname} does not fit "
                               "the model")
            _own_parameter(model, mod, pname)
            getattr(mod, pname).copy_(t.to(cur.device, cur.dtype))
        changed.append(mname)
    return sorted(set(changed))
