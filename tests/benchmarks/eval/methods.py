"""Method registry.  Every method implements

    score(task_dir) -> (scores, cost)

with ``scores`` a float32 numpy array (n_queries x n_pool; query and pool order as in the
task's queries.jsonl / pool.jsonl; valuation-only methods may return (1, n_pool)) and
``cost`` = {index_seconds, forward_seconds_same_data, bytes_per_example, query_seconds}
(see FORMAT.md).  ``Method.run(ctx)`` is the same with a shared per-task context (one
model load and one measured forward pass for all methods of a run) and also returns notes.

Names: ``rise-k{K}-d{kr}x{kh}x{kg}-{channel}[lambda][-c][-sum][-skip{m}]``; ``-c`` = pool-
mean centering (ScoreSpec(center=True)), ``-sum`` = token weighting "sum", ``-skip{m}`` =
the first m supervised targets of text records dropped (experimental, not a product
option).  The product default (``DEFAULT``) follows rise.constants.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import HERE, RISE_CORE, code_version, product_default

DEFAULT = product_default()


@dataclass
class Method:
    name: str
    family: str
    config: dict[str, Any]
    fn: Callable[[Any], tuple[np.ndarray, dict, dict]]
    code: list[Path] = field(default_factory=list)
    notes: str = ""
    tasks: tuple[str, ...] | None = None  # None: every task

    def applies(self, task: str) -> bool:
        return self.tasks is None or task.removeprefix("smoke-") in self.tasks

    def code_version(self) -> str:
        return code_version([HERE / "common.py", HERE / "ctx.py", *self.code])

    def run(self, ctx) -> tuple[np.ndarray, dict, dict]:
        return self.fn(ctx)

    def score(self, task_dir: str | Path) -> tuple[np.ndarray, dict]:
        """Stand-alone: load the task and its model, score, return (scores, cost)."""
        import tempfile

        from ctx import Ctx

        with tempfile.TemporaryDirectory() as tmp:
            ctx = Ctx.open(Path(task_dir), Path(tmp))
            scores, cost, _ = self.run(ctx)
        return scores, cost


def _rise_name(k, dims, channel, lam=0.5, center=False, weighting="mean", skip=0, temp=1.0,
               seed=0):
    s = f"rise-k{k if k is not None else 'all'}-d{'x'.join(map(str, dims))}-{channel}"
    if channel == "both" and lam != 0.5:
        s += f"{lam:g}"
    if center:
        s += "-c"
    if weighting != "mean":
        s += f"-{weighting}"
    if skip:
        s += f"-skip{skip}"
    if temp != 1.0:
        s += f"-t{temp:g}"
    if seed:
        s += f"-s{seed}"
    return s


def rise_method(k, dims, channel, lam=0.5, center=False, weighting="mean", skip=0, temp=1.0,
                seed=0) -> Method:
    from m_rise import IndexCfg, rise_sketch_scores

    icfg = IndexCfg(dims=tuple(dims), topk=k, temperature=temp, weighting=weighting,
                    skip_first=skip, seed=seed)
    cfg = {"mode": "sketch", "topk": k, "dims": list(dims), "temperature": temp,
           "weighting": weighting, "seed": seed, "channel": channel,
           "lambda": lam if channel == "both" else None, "center": center,
           "skip_first": skip}
    return Method(
        name=_rise_name(k, dims, channel, lam, center, weighting, skip, temp, seed),
        family="rise",
        config=cfg, fn=lambda ctx: rise_sketch_scores(ctx, icfg, channel, lam, center),
        code=[HERE / "m_rise.py", *RISE_CORE],
        tasks=("domain", "quality") if skip else None)


def exact_method(topk, channel, lam=0.5, temp=1.0) -> Method:
    from m_rise import rise_exact_scores

    base = "rise-exact" if topk is None else f"rise-nosketch-k{topk}"
    if temp != 1.0:
        base += f"-t{temp:g}"
    name = f"{base}-{channel}" + (f"{lam:g}" if channel == "both" and lam != 0.5 else "")
    return Method(
        name=name, family="rise-exact" if topk is None else "rise-nosketch",
        config={"mode": "exact" if topk is None else "nosketch", "topk": topk,
                "temperature": temp, "channel": channel,
                "lambda": lam if channel == "both" else None, "center": False},
        fn=lambda ctx: rise_exact_scores(ctx, topk, channel, lam, temp),
        code=[HERE / "m_rise.py", *RISE_CORE])


def base_methods() -> list[Method]:
    import m_base

    code = [HERE / "m_base.py"]
    return [
        Method("bm25", "text", {"k1": 1.5, "b": 0.75, "epsilon": 0.25, "words": "lower \\w+"},
               m_base.bm25_scores, code),
        Method("tfidf", "text", {"tf": "1+log", "idf": "smooth", "norm": "l2"},
               m_base.tfidf_scores, code),
        Method("hidden-cos", "hidden", {"pool": "mean over tokens", "center": False},
               lambda ctx: m_base.hidden_scores(ctx, False), code),
        Method("hidden-cos-c", "hidden", {"pool": "mean over tokens", "center": True},
               lambda ctx: m_base.hidden_scores(ctx, True), code),
    ]


def grad_method(k_in=16, k_out=16) -> Method:
    import m_grad

    return Method(f"grad-kron{k_out}x{k_in}", "grad",
                  {"projection": "kronecker-gaussian", "k_in": k_in, "k_out": k_out,
                   "layers": "all nn.Linear (blocks + LM head)", "seed": 0, "score": "cosine"},
                  lambda ctx: m_grad.grad_scores(ctx, k_in, k_out), [HERE / "m_grad.py"])


DIMS = [(16, 16, 16), (32, 16, 16), (64, 32, 32), (128, 64, 64)]


def full_registry() -> list[Method]:
    ms = base_methods()
    specs = [(c, cen) for c in ("both", "rh", "gh") for cen in (False, True)]
    # the sketch-size sweep at the default K, and the small K
    for k in (128, 16):
        for dims in DIMS:
            for c, cen in specs:
                ms.append(rise_method(k, dims, c, center=cen))
    # channel weights (lambda) at the default dims
    for k in (128, 16):
        for lam in (0.25, 0.75):
            for cen in (False, True):
                ms.append(rise_method(k, (64, 32, 32), "both", lam=lam, center=cen))
    # first-token exclusion and softmax temperature (documented knobs).  Token weighting
    # "sum" is not swept: for cosine scores it is provably the same as "mean" (the weights of
    # one example differ by a constant factor, which the unit normalisation removes).
    for c, cen in specs:
        ms.append(rise_method(16, (64, 32, 32), c, center=cen, skip=4))
        for temp in (2.0, 4.0):
            for k in (128, 16):
                ms.append(rise_method(k, (64, 32, 32), c, center=cen, temp=temp))
        ms.append(rise_method(128, (64, 32, 32), c, center=cen, temp=0.5))
    # temperature x sketch size (the strongest knob on the domain task, see findings.md)
    for temp in (2.0, 4.0):
        for dims in ((32, 16, 16), (128, 64, 64)):
            for c, cen in specs:
                ms.append(rise_method(16, dims, c, center=cen, temp=temp))
    for c, cen in specs:
        ms.append(rise_method(128, (128, 64, 64), c, center=cen, temp=4.0))
        ms.append(rise_method(128, (128, 64, 64), c, center=cen, temp=2.0))
    # the size sweep at the product's settings (K 128, tau 2, centered)
    for dims in ((16, 16, 16), (32, 16, 16)):
        for c in ("both", "rh", "gh"):
            ms.append(rise_method(128, dims, c, center=True, temp=2.0))
    for k in (1, 4, 64, 512):
        for c, cen in (("gh", True), ("both", True), ("both", False), ("rh", True)):
            ms.append(rise_method(k, (64, 32, 32), c, center=cen))
    # ceilings: exact LM-head gradients and no-sketch at K
    for topk in (None, 128, 16):
        for c in ("both", "rh", "gh"):
            ms.append(exact_method(topk, c))
    for c in ("both", "rh", "gh"):
        ms.append(exact_method(16, c, temp=4.0))
        ms.append(exact_method(128, c, temp=2.0))  # the sketch's ceiling at the default
    # sketch-seed repeats of the default and of the candidate defaults (hash noise)
    for seed in (1, 2):
        for c, cen in specs:
            ms.append(rise_method(128, (64, 32, 32), c, center=cen, seed=seed))
            ms.append(rise_method(16, (64, 32, 32), c, center=cen, temp=4.0, seed=seed))
            ms.append(rise_method(128, (64, 32, 32), c, center=cen, temp=4.0, seed=seed))
            ms.append(rise_method(128, (64, 32, 32), c, center=cen, temp=2.0, seed=seed))
        # the default dims: spec settings and the candidate default (centered, tau 2)
        ms.append(rise_method(128, (128, 64, 64), "both", seed=seed))
        ms.append(rise_method(128, (128, 64, 64), "both", center=True, temp=2.0, seed=seed))
        ms.append(rise_method(16, (128, 64, 64), "both", center=True, temp=2.0, seed=seed))
    # the sketch size at the default settings, over the three sketch seeds
    for seed in (1, 2):
        for dims in ((32, 16, 16), (16, 16, 16)):
            ms.append(rise_method(128, dims, "both", center=True, temp=2.0, seed=seed))
    # channel weights at the default settings, over the three sketch seeds (score-time only:
    # they reuse the seeds' indexes)
    for seed in (0, 1, 2):
        for c, lam in (("both", 0.25), ("both", 0.75), ("rh", 0.5), ("gh", 0.5)):
            ms.append(rise_method(128, (128, 64, 64), c, lam=lam, center=True, temp=2.0,
                                  seed=seed))
    ms.append(grad_method())
    unique: dict[str, Method] = {}
    for m in ms:  # sweeps overlap; one target per name
        unique.setdefault(m.name, m)
    return list(unique.values())


def smoke_registry() -> list[Method]:
    ms = [m for m in base_methods() if m.name in ("bm25", "hidden-cos")]
    ms.append(rise_method(128, (64, 32, 32), "both"))
    ms.append(rise_method(16, (16, 16, 16), "gh", center=True))
    return ms


def registry(smoke: bool = False) -> list[Method]:
    return smoke_registry() if smoke else full_registry()


def select(methods: list[Method], patterns: str | None) -> list[Method]:
    """Methods matching comma-separated glob patterns; '!pattern' excludes."""
    if not patterns:
        return methods
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    inc = [p for p in pats if not p.startswith("!")] or ["*"]
    exc = [p[1:] for p in pats if p.startswith("!")]
    out = [m for m in methods if any(fnmatch.fnmatchcase(m.name, p) for p in inc)
           and not any(fnmatch.fnmatchcase(m.name, p) for p in exc)]
    if not out:
        raise SystemExit(f"no method matches {patterns!r}")
    return out
