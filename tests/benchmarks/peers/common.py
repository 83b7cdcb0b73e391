"""Shared plumbing for the peer adapters (run_<peer>.py).

Imported from inside each peer's own venv, so it depends only on torch, transformers and
numpy. It reads a task dir (FORMAT.md in ../eval/), tokenises the records the way the
product does (rise.data.encode_record: text -> first max_length tokens, loss on all;
prompt/response -> prompt with special tokens + response without, prompt cut from the
left, loss on the response tokens only), times a bare forward pass over the pool, and
writes `<out>/<method>.npy` + `<method>.json` (or a `"status": "failed"` json).

Per-example loss used by every adapter: the SUM of next-token cross-entropy over the
supervised tokens (the convention of kronfluence's and TRAK's language-model examples).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

IGNORE = -100


# --------------------------------------------------------------------------- arguments
def base_parser(peer: str, default_method: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=f"{peer} adapter for the RISE eval harness")
    ap.add_argument("--task-dir", required=True, type=Path)
    ap.add_argument("--model", type=Path, default=None,
                    help="model folder; default: meta.json's `model` (relative to the task dir)")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--method", default=default_method, help="result file stem")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PEERS_THREADS", "1")))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-pool", type=int, default=0,
                    help="score only the first N pool records (others -1e30; config.subset)")
    ap.add_argument("--max-queries", type=int, default=0, help="debug: first N queries only")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the library writes its index (default .cache/peers/<peer>/work/<task>/<method>)")
    ap.add_argument("--force", action="store_true", help="recompute even if the result exists")
    return ap


# --------------------------------------------------------------------------- task
@dataclass
class Task:
    dir: Path
    meta: dict
    name: str
    pool: list[dict]
    queries: list[dict]
    model_dir: Path
    max_length: int


def _read_jsonl(p: Path) -> list[dict]:
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task(task_dir: Path, model: Path | None) -> Task:
    meta = json.loads((task_dir / "meta.json").read_text())
    if model is None:
        m = meta.get("model") or meta.get("model_dir")
        if not m:
            raise SystemExit("no --model and meta.json names no model")
        model = Path(m) if os.path.isabs(m) else (task_dir / m)
    name = meta.get("task") or meta.get("name") or task_dir.name
    return Task(task_dir, meta, name, _read_jsonl(task_dir / "pool.jsonl"),
                _read_jsonl(task_dir / "queries.jsonl"), Path(model).resolve(),
                int(meta.get("max_length", 128)))


def encode(rec: dict, tok, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = input_ids on supervised positions, IGNORE elsewhere
    (the model shifts labels itself)."""
    if rec.get("response") is None:
        ids = list(tok.encode(rec["text"], add_special_tokens=True))[:max_length]
        return ids, list(ids)
    p_ids = list(tok.encode(rec.get("prompt") or "", add_special_tokens=True))
    r_ids = list(tok.encode(rec["response"], add_special_tokens=False))[:max_length]
    keep = max_length - len(r_ids)
    p_ids = p_ids[max(0, len(p_ids) - keep):]
    return p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(i) for i, _ in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    lab = torch.full((len(items), n), IGNORE, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for k, (i, l) in enumerate(items):
        ids[k, : len(i)] = torch.tensor(i)
        lab[k, : len(l)] = torch.tensor(l)
        att[k, : len(i)] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


class EncodedDataset(torch.utils.data.Dataset):
    """Each item is a dict of 1-D tensors (unpadded); use `collate_fn` to batch."""

    def __init__(self, records: list[dict], tok, max_length: int):
        self.items = [encode(r, tok, max_length) for r in records]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, lab = self.items[i]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(lab)}

    def collate_fn(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate([(b["input_ids"].tolist(), b["labels"].tolist()) for b in batch], self.pad_id)

    def batches(self, bs: int) -> Iterable[dict[str, torch.Tensor]]:
        for s in range(0, len(self.items), bs):
            yield collate(self.items[s: s + bs], self.pad_id)


class PaddedPairs(torch.utils.data.Dataset):
    """(input_ids, labels) all right-padded to the longest record, for libraries whose loaders
    stack tensors with the default collate (dattri, captum). No attention mask: with right
    padding and a causal model, real tokens never attend to the pads, and pads carry no loss."""

    def __init__(self, ds: EncodedDataset):
        b = collate(ds.items, ds.pad_id)
        self.ids, self.lab = b["input_ids"], b["labels"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.lab[i]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE over supervised positions, one value per row."""
    lg = logits[:, :-1, :].float()
    lb = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1),
                                           ignore_index=IGNORE, reduction="none")
    return ce.view(lb.shape).sum(dim=1)


def load_model(model_dir: Path, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------- timing
class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def setup(args: argparse.Namespace, task: Task, peer: str):
    """The model, pool and query datasets of a run, and the timed bare forward over the
    whole pool (before --max-pool trims it): (model, tokenizer, pool, queries, seconds)."""
    model, tok = load_model(task.model_dir)
    pool = EncodedDataset(task.pool, tok, task.max_length)
    queries = EncodedDataset(task.queries, tok, task.max_length)
    fwd = time_forward(model, pool, args.batch_size)
    print(f"[{peer}] bare forward over pool: {fwd:.1f}s", flush=True)
    if args.max_pool:
        pool.items = pool.items[: args.max_pool]
    return model, tok, pool, queries, fwd


def time_forward(model, ds: EncodedDataset, bs: int) -> float:
    """Wall time of one bare forward pass (no grad, full logits) over the dataset."""
    t = Timer()
    with torch.inference_mode():
        for b in ds.batches(bs):
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return t()


def dir_bytes(*paths: Path | str) -> int:
    tot = 0
    for p in paths:
        p = Path(p)
        if p.is_file():
            tot += p.stat().st_size
        elif p.is_dir():
            for q in p.rglob("*"):
                if q.is_file():
                    tot += q.stat().st_size
    return tot


# --------------------------------------------------------------------------- output
def versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__, "numpy": np.__version__}
    v.update(extra or {})
    return v


def hardware() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()}-core CPU {cpu}".strip()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def result_exists(out_dir: Path, method: str) -> bool:
    j = out_dir / f"{method}.json"
    if not j.exists():
        return False
    try:
        d = json.loads(j.read_text())
    except ValueError:
        return False
    return d.get("status", "ok") == "ok" and (out_dir / f"{method}.npy").exists()


def write_result(out_dir: Path, method: str, task: Task, scores: np.ndarray, *, config: dict,
                 index_seconds: float, forward_seconds: float, bytes_per_example: float,
                 query_seconds: float, notes: str, lib_versions: dict[str, str]) -> None:
    scores = np.ascontiguousarray(np.asarray(scores, dtype=np.float32))
    want = (len(task.queries), len(task.pool))
    if scores.shape != want:
        raise ValueError(f"score matrix {scores.shape}, expected {want}")
    bad = ~np.isfinite(scores)
    if bad.any():
        notes += f" [{int(bad.sum())} non-finite scores replaced by -1e30]"
        scores[bad] = -1e30
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{method}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, scores)
    os.replace(tmp, out_dir / f"{method}.npy")
    meta = {"method": method, "task": task.name, "status": "ok", "config": config,
            "index_seconds": round(index_seconds, 3),
            "forward_seconds_same_data": round(forward_seconds, 3),
            "bytes_per_example": float(bytes_per_example), "query_seconds": round(query_seconds, 3),
            "notes": notes, "versions": versions(lib_versions), "hardware": hardware(),
            "threads": torch.get_num_threads(), "date": _now(), "n_pool": len(task.pool),
            "n_queries": len(task.queries), "model": str(task.model_dir)}
    (out_dir / f"{method}.json").write_text(json.dumps(meta, indent=1) + "\n")


def write_failure(out_dir: Path, method: str, task_name: str, err: BaseException | str,
                  notes: str, lib_versions: dict[str, str] | None = None,
                  config: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(err, BaseException):
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        msg = f"{type(err).__name__}: {err}"
    else:
        tb, msg = "", str(err)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out_dir / f"{method}.npy")
    meta = {"method": method, "task": task_name, "status": "failed", "error": msg,
            "traceback": tb[-6000:], "notes": notes, "config": config or {},
            "versions": versions(lib_versions), "hardware": hardware(), "date": _now()}
    (out_dir / f"{method}.json").write_text(json.dumps(meta, indent=1) + "\n")


def subset_scores(task: Task, full_cols: np.ndarray, idx: list[int]) -> np.ndarray:
    """Place scores computed on pool indices idx into a (n_q, n_pool) matrix of -1e30."""
    out = np.full((len(task.queries), len(task.pool)), -1e30, dtype=np.float32)
    out[:, idx] = full_cols
    return out


def main_wrapper(peer: str, run: Callable[[argparse.Namespace, Task], None],
                 parser: argparse.ArgumentParser, lib_versions: Callable[[], dict[str, str]]) -> int:
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    np.random.seed(0)
    task = load_task(args.task_dir, args.model)
    if args.max_queries:
        task.queries = task.queries[: args.max_queries]
    if args.work_dir is None:
        root = Path(__file__).resolve().parents[3]
        args.work_dir = root / ".cache" / "peers" / peer / "work" / task.name / args.method
    if not args.force and result_exists(args.out_dir, args.method):
        print(f"[{peer}] {args.out_dir}/{args.method}.npy exists; skipping (--force to redo)")
        return 0
    print(f"[{peer}] task={task.name} pool={len(task.pool)} queries={len(task.queries)} "
          f"model={task.model_dir} threads={torch.get_num_threads()}", flush=True)
    try:
        run(args, task)
    except Exception as e:  # record the exact error for the report, then fail loudly
        try:
            lv = lib_versions()
        except Exception:
            lv = {}
        write_failure(args.out_dir, args.method, task.name, e,
                      f"{peer} adapter raised; see error/traceback", lv)
        raise
    return 0
