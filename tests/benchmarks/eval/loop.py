"""Quality task, closed loop: continue training on a selection, measure held-out loss.

Same partial fine-tune recipe for every selection (meta.json ``loop``: last n blocks +
final norm, fixed steps, batch, lr and seed) from the same pretrained model; held-out =
``heldout.jsonl`` (clean paragraphs of articles disjoint from the pool and the targets).
The frozen prefix's outputs are computed once per task and cached.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from common import HERE, code_version, log, read_jsonl, sha256_json, write_json


def _items(ctx, rows, n):
    from common import encode_rows
    from train import Item, prefix_outputs

    encs = encode_rows(ctx.task, ctx.lm, rows)
    pre = prefix_outputs(ctx.lm.model, encs, n)
    return [Item(p, e.input_ids, e.sup_start) for p, e in zip(pre, encs, strict=True)]


def prefix_cache(ctx, n: int):
    path = ctx.work / f"loop-prefix-{n}.pt"
    key = sha256_json([ctx.task.data_hash(), n])
    if path.exists():
        d = torch.load(path, weights_only=False)
        if d.get("key") == key:
            return d["pool"], d["heldout"]
    from train import Item  # noqa: F401

    log(f"{ctx.task.dir.name}: loop: prefix outputs of pool and held-out")
    pool = _items(ctx, ctx.task.pool, n)
    held = _items(ctx, read_jsonl(ctx.task.dir / "heldout.jsonl"), n)
    torch.save({"key": key, "pool": pool, "heldout": held}, path)
    return pool, held


def run_loop(ctx, selections: dict[str, np.ndarray], out_dir: Path) -> dict[str, dict]:
    """selections: name -> pool indices.  Cached per selection in out_dir/<name>.json."""
    from train import eval_nll, restore, snapshot, train_tail

    cfg = ctx.task.meta["loop"]
    n = cfg["n_blocks"]
    cv = code_version([HERE / "loop.py", HERE / "train.py"])
    results: dict[str, dict] = {}
    todo = {}
    for name, sel in selections.items():
        key = sha256_json([ctx.task.data_hash(), cfg, sorted(int(i) for i in sel), cv])[:16]
        p = out_dir / f"{name}.json"
        if p.exists():
            r = json.loads(p.read_text())
            if r.get("cache_key") == key:
                results[name] = r
                continue
        todo[name] = (sel, key)
    base_p = out_dir / "_base.json"
    base_key = sha256_json([ctx.task.data_hash(), cfg, cv])[:16]
    need_base = not (base_p.exists() and json.loads(base_p.read_text()).get("cache_key") == base_key)
    if not todo and not need_base:
        results["_base"] = json.loads(base_p.read_text())
        return results
    pool_items, held = prefix_cache(ctx, n)
    model = ctx.lm.model
    snap = snapshot(model, n)
    if need_base:
        write_json(base_p, {"cache_key": base_key, "heldout": eval_nll(model, held, n),
                            "name": "_base", "note": "pretrained model, no training"})
    results["_base"] = json.loads(base_p.read_text())
    clean = np.array([bool(r["clean"]) for r in ctx.task.pool])
    for name, (sel, key) in todo.items():
        log(f"{ctx.task.dir.name}: loop: training on {name} ({len(sel)} examples)")
        restore(model, n, snap)
        t = time.perf_counter()
        info = train_tail(model, [pool_items[int(i)] for i in sel], n, steps=cfg["steps"],
                          batch=cfg["batch"], lr=cfg["lr"], seed=cfg["seed"], log_every=0)
        ev = eval_nll(model, held, n)
        r = {"name": name, "cache_key": key, "n_selected": len(sel),
             "clean_fraction": float(clean[np.asarray(sel, dtype=int)].mean()),
             "train": info, "heldout": ev, "seconds": time.perf_counter() - t, "recipe": cfg}
        write_json(out_dir / f"{name}.json", r)
        results[name] = r
        log(f"{ctx.task.dir.name}: loop: {name}: held-out token NLL {ev['token_nll']:.4f}")
    restore(model, n, snap)
    return results
