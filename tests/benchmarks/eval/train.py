"""Partial fine-tuning that 2 CPU cores allow: the last ``n`` transformer blocks and the
final norm of a causal LM, everything below frozen (the tied embedding / LM head too).

Because the frozen prefix never changes, its output (the input of block L-n) is computed
once per example and cached; training then runs only the last n blocks, the final norm and
the (frozen) head, by temporarily giving the base model only its last n layers and feeding
the cached prefix output as ``inputs_embeds`` (works for Llama and GPT-NeoX, whose forward
adds nothing to ``inputs_embeds`` before the layers).  The trained model is saved as a
whole, loadable Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from common import log, pad_id_of


@dataclass
class Item:
    """One training / evaluation example: prefix output (T, d), ids, first supervised target."""

    prefix: torch.Tensor
    ids: list[int]
    sup_start: int


def base_of(model):
    return model.base_model


def final_norm(model):
    b = base_of(model)
    for name in ("norm", "final_layer_norm", "ln_f"):
        if hasattr(b, name):
            return getattr(b, name)
    raise ValueError("no final norm found")


@contextlib.contextmanager
def tail_only(model, n: int):
    """Inside: the base model holds only its last n layers (forward takes the prefix output)."""
    b = base_of(model)
    full = b.layers
    b.layers = torch.nn.ModuleList(list(full)[-n:])
    try:
        yield
    finally:
        b.layers = full


def tail_params(model, n: int) -> list[torch.nn.Parameter]:
    b = base_of(model)
    mods = list(b.layers)[-n:] + [final_norm(model)]
    return [p for m in mods for p in m.parameters()]


@torch.inference_mode()
def prefix_outputs(model, encs, n: int, batch: int = 8) -> list[torch.Tensor]:
    """Input of block L-n for each encoded record (T_i, d), float32 CPU."""
    layer = list(base_of(model).layers)[-n]
    got: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(
        lambda m, args, kwargs: got.append((args[0] if args else kwargs["hidden_states"]).detach()),
        with_kwargs=True)
    pid = 0
    out: list[torch.Tensor] = []
    try:
        for s in range(0, len(encs), batch):
            part = encs[s : s + batch]
            t = max(len(e.input_ids) for e in part)
            ids = torch.full((len(part), t), pid, dtype=torch.long)
            mask = torch.zeros((len(part), t), dtype=torch.long)
            for i, e in enumerate(part):
                ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
                mask[i, : len(e.input_ids)] = 1
            # the base model only: the head is not needed for the prefix
            base_of(model)(input_ids=ids, attention_mask=mask, use_cache=False)
            h = got.pop().to(torch.float32)
            for i, e in enumerate(part):
                out.append(h[i, : len(e.input_ids)].clone())
    finally:
        hook.remove()
    return out


def _batch(items: Sequence[Item], pad_id: int):
    t = max(len(it.ids) for it in items)
    d = items[0].prefix.shape[-1]
    x = torch.zeros(len(items), t, d)
    mask = torch.zeros(len(items), t, dtype=torch.long)
    labels = torch.full((len(items), t), -100, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it.ids)
        x[i, :n] = it.prefix
        mask[i, :n] = 1
        ids = torch.tensor(it.ids)
        lab = ids.clone()
        lab[: max(it.sup_start, 1)] = -100
        labels[i, :n] = lab
    return x, mask, labels


def _token_nll(model, x, mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of supervised tokens per example (B,), (B,)."""
    out = model(inputs_embeds=x, attention_mask=mask, use_cache=False)
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:]
    valid = tgt != -100
    lp = torch.log_softmax(logits, dim=-1)
    nll = -lp.gather(-1, tgt.clamp_min(0)[..., None])[..., 0]
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return nll.sum(1), valid.sum(1)


def train_tail(model, items: Sequence[Item], n: int, *, steps: int, batch: int, lr: float,
               seed: int, pad_id: int = 0, log_every: int = 25) -> dict:
    """AdamW on the last n blocks + final norm; examples drawn by seeded epoch permutations.

    Loss: mean NLL over the batch's supervised tokens (the Hugging Face loss).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = tail_params(model, n)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    model.train()
    with tail_only(model, n):
        for step in range(steps):
            # linear warm-up (10%) then cosine decay to 10%
            w = min(1.0, (step + 1) / max(1, steps // 10))
            c = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
            for g in opt.param_groups:
                g["lr"] = lr * w * c
            take = []
            while len(take) < batch:
                if not order:
                    order = list(range(len(items)))
                    rng.shuffle(order)
                take.append(order.pop())
            x, mask, labels = _batch([items[i] for i in take], pad_id)
            s, cnt = _token_nll(model, x, mask, labels)
            loss = s.sum() / cnt.sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if log_every and (step + 1) % log_every == 0:
                log(f"  train step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "n_blocks": n,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "first_loss": losses[0] if losses else None, "seconds": time.perf_counter() - t0,
            "trainable_params": sum(p.numel() for p in params)}


@torch.inference_mode()
def eval_nll(model, items: Sequence[Item], n: int, batch: int = 8, pad_id: int = 0) -> dict:
    """Token-weighted mean NLL (and per-example mean) with the current tail."""
    model.eval()
    tot, cnt, per = 0.0, 0, []
    with tail_only(model, n):
        for s in range(0, len(items), batch):
            x, mask, labels = _batch(items[s : s + batch], pad_id)
            nll, c = _token_nll(model, x, mask, labels)
            tot += float(nll.sum())
            cnt += int(c.sum())
            per += (nll / c.clamp_min(1)).tolist()
    return {"token_nll": tot / max(cnt, 1), "example_nll": sum(per) / max(len(per), 1),
            "tokens": cnt, "examples": len(items)}


def snapshot(model, n: int) -> dict[str, torch.Tensor]:
    params = tail_params(model, n)
    return {str(i): p.detach().clone() for i, p in enumerate(params)}


def restore(model, n: int, snap: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, p in enumerate(tail_params(model, n)):
            p.copy_(snap[str(i)])


def pad_of(tokenizer) -> int:
    return pad_id_of(tokenizer)
