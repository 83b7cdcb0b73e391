"""Where featurize spends its time on a GPU: a torch.profiler table of one batch.

    PYTHONPATH=services:tests/gpu python3 tests/gpu/profile_featurize.py [--model pythia-1b]

Builds the model from tests/fixtures/configs like gpu_check.py, runs a bare forward and
featurize once to warm up, then profiles one featurize call and prints the CUDA operators by
total time, and the same for the head's steps timed alone (logits, softmax, top-K, the
projected error g = W^T r by gather vs by a dense product).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from gpu_check import build_model, records, wrap
from rise.config import SketchConfig
from rise.featurize import featurize

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def cuda_time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pythia-1b")
    ap.add_argument("--tokens", default="8x512")
    a = ap.parse_args()
    b, length = (int(x) for x in a.tokens.split("x"))
    model = build_model(CONFIGS / f"{a.model}.json", "cuda:0", torch.bfloat16)
    lm = wrap(model, a.model)
    encs = records(lm.head.vocab, b, length, seed=0)
    config = SketchConfig()
    ids = torch.tensor([e.input_ids for e in encs], device="cuda:0")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        fwd = cuda_time(lambda: model(input_ids=ids, attention_mask=mask).logits)
    feat = cuda_time(lambda: featurize(lm, encs, config, batch_size=b))
    print(f"forward {fwd * 1e3:.1f} ms, featurize {feat * 1e3:.1f} ms, "
          f"ratio {fwd / feat:.2f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        featurize(lm, encs, config, batch_size=b)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
    # The head's steps alone, on one chunk of 1024 positions.
    head = lm.head
    n, k = 1024, config.topk or 128
    h = torch.randn(n, head.hidden, device="cuda:0", dtype=head.weight.dtype)
    y = torch.randint(0, head.vocab, (n,), device="cuda:0")
    with torch.inference_mode():
        z = h @ head.weight.T
        p = torch.softmax(z / 2.0, dim=-1)
        top = torch.topk(p, k, dim=-1, sorted=False).indices
        idx = torch.cat([top, y[:, None]], dim=1)
        vals = p.gather(1, idx)
        steps = {
            "logits": lambda: h @ head.weight.T,
            "softmax": lambda: torch.softmax(z / 2.0, dim=-1),
            "topk": lambda: torch.topk(p, k, dim=-1, sorted=False),
            "g by gather": lambda: torch.einsum("nk,nkd->nd", vals, head.weight[idx]),
            "g by dense": lambda: torch.zeros_like(p).scatter_(1, idx, vals) @ head.weight,
        }
        for name, fn in steps.items():
            print(f"  {name:12s} {cuda_time(fn) * 1e3:8.2f} ms per {n} positions")


if __name__ == "__main__":
    main()
