"""Shared plumbing of the evaluation harness: paths, JSONL, hashing, stamps, task loading,
the memoised backbone (hidden-state cache) and timing.

Nothing here is product code; the harness lives under tests/benchmarks/eval/ and imports the
``rise`` package as a user would.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CACHE = REPO / ".cache"
EVAL_CACHE = CACHE / "eval"
SMOLLM = CACHE / "models" / "smollm2-135m-instruct"
CORPUS = CACHE / "corpus"

T0 = time.perf_counter()


def clock() -> float:
    """CPU seconds of this process (all its threads).  Costs are measured in CPU time, not
    wall time: with one torch thread it is the compute a method needs, and it does not
    move when other processes load the shared cores (wall time on 2 busy cores did by 2-4x).
    """
    return time.process_time()


def log(msg: str) -> None:
    print(f"[eval {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ files


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    tmp.replace(path)
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(path)


def repo_relative(obj: Any) -> Any:
    """``obj`` with absolute paths inside the repository made relative to it (reports must
    not carry this machine's paths)."""
    if isinstance(obj, str) and obj.startswith(str(REPO) + os.sep):
        return os.path.relpath(obj, REPO)
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [repo_relative(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                   default=_json_default).encode())


def code_version(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 over the given source files (the 'code version' part of a cache key)."""
    h = hashlib.sha256()
    for p in sorted(str(x) for x in paths):
        h.update(p.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


RISE_SRC = REPO / "services" / "rise"
RISE_CORE = [RISE_SRC / f for f in ("featurize.py", "readout.py", "sketch.py", "score.py",
                                    "shard.py", "exact.py", "index.py", "config.py", "data.py",
                                    "model.py", "api.py")]


# ------------------------------------------------------------------------------ stamp


def git_commit() -> str:
    """Read-only ``git rev-parse HEAD`` (never any other git command)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return out or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("rise", "torch", "transformers", "numpy", "rank-bm25", "matplotlib",
                "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def product_default() -> str:
    """Method name of what `rise index` + `rise attribute` do with no flags (read from the
    library, so the harness follows the product's defaults wherever they move)."""
    from rise import constants as c
    from rise.score import ScoreSpec

    name = f"rise-k{c.DEFAULT_TOPK}-d{'x'.join(map(str, c.DEFAULT_DIMS))}-both"
    if ScoreSpec().centered(sketched=True, live_count=1):
        name += "-c"
    if c.DEFAULT_TEMPERATURE != 1.0:
        name += f"-t{c.DEFAULT_TEMPERATURE:g}"
    return name


# The design's settings before the evaluation moved the defaults: K 128, tau 1, uncentered
# cosine (at the default dims).
DESIGN_SETTINGS = "rise-k128-d128x64x64-both"


def stamp() -> dict[str, Any]:
    import torch

    return {
        "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
    }


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------ tasks


@dataclass
class TaskData:
    """A built task directory, read back."""

    dir: Path
    meta: dict[str, Any]
    pool: list[dict[str, Any]]
    queries: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.meta["task"]

    @property
    def kind(self) -> str:
        """'attribution' (backdoor, domain) or 'valuation' (quality)."""
        return self.meta["kind"]

    @property
    def prompt_response(self) -> bool:
        return self.meta["format"] == "prompt_response"

    @property
    def model_path(self) -> Path:
        p = Path(self.meta["model"])
        return p if p.is_absolute() else (self.dir / p)

    @property
    def max_length(self) -> int:
        return int(self.meta["max_length"])

    def fields(self):
        from rise.data import FieldMap

        if self.prompt_response:
            return FieldMap(prompt_field="prompt", response_field="response")
        return FieldMap()

    def text(self, rec: dict[str, Any]) -> str:
        """The record as one string (for text baselines)."""
        if self.prompt_response:
            return rec["prompt"] + rec["response"]
        return rec["text"]

    def data_hash(self) -> str:
        files = [self.dir / "pool.jsonl", self.dir / "queries.jsonl", self.dir / "meta.json"]
        h = [sha256_file(f) for f in files]
        mdir = self.model_path
        for name in ("model.safetensors", "config.json"):
            if (mdir / name).exists():
                h.append(sha256_file(mdir / name) if name != "model.safetensors"
                         else _fast_file_id(mdir / name))
        return sha256_json(h)[:16]


def _fast_file_id(path: Path) -> str:
    """Content hash of a large file (full sha256, memoised next to it by size+mtime)."""
    st = path.stat()
    memo = path.with_name(path.name + ".sha256")
    key = f"{st.st_size}:{st.st_mtime_ns}"
    if memo.exists():
        k, _, v = memo.read_text().strip().partition(" ")
        if k == key:
            return v
    v = sha256_file(path)
    try:
        memo.write_text(f"{key} {v}\n")
    except OSError:
        pass
    return v


def load_task(task_dir: str | os.PathLike) -> TaskData:
    d = Path(task_dir)
    meta = json.loads((d / "meta.json").read_text())
    return TaskData(dir=d, meta=meta, pool=read_jsonl(d / "pool.jsonl"),
                    queries=read_jsonl(d / "queries.jsonl"))


# ---------------------------------------------------------------------- model + backbone


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_transformers() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def records_of(task: TaskData, rows: list[dict[str, Any]]):
    """rise Records of rows (validated exactly as files are)."""
    from rise.data import records_from_dicts

    return records_from_dicts(rows, task.fields(), source=task.name)


def encode_rows(task: TaskData, lm, rows: list[dict[str, Any]]):
    from rise.data import encode_record

    recs = records_of(task, rows)
    return [encode_record(r, lm.tokenizer, task.max_length) for r in recs]


def pad_batch(encs, pad_id: int):
    """(ids, mask) right-padded exactly as the product's featurize pads."""
    from rise.featurize import pad_batch as product_pad

    ids, mask, _ = product_pad(encs, pad_id)
    return ids, mask


def pad_id_of(tok) -> int:
    pid = tok.pad_token_id
    if pid is None:
        pid = tok.eos_token_id or 0
    return int(pid)


BATCH = 8


@dataclass
class HiddenCache:
    """Final hidden states (the LM head's input) per token sequence, float32 CPU tensors.

    Filled by one full forward pass (with logits: the 'bare forward' every method's cost
    is compared with) over each record set, timed per set.  RISE configurations and the
    hidden-state baseline read the backbone from here instead of recomputing it; their
    index time is charged the measured full forward pass (an upper bound of the backbone
    pass they would run) plus their own measured head/sketch/write time.
    """

    table: dict[tuple[int, ...], Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def get(self, ids: Sequence[int]):
        return self.table.get(tuple(int(i) for i in ids))

    def save(self, path: Path) -> None:
        import torch

        keys = list(self.table)
        torch.save({"keys": [list(k) for k in keys],
                    "hidden": [self.table[k].to(torch.float32) for k in keys],
                    "seconds": self.seconds, "tokens": self.tokens}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    @classmethod
    def load(cls, path: Path) -> HiddenCache:
        import torch

        d = torch.load(path, weights_only=False)
        return cls(table={tuple(k): h for k, h in zip(d["keys"], d["hidden"], strict=True)},
                   seconds=d["seconds"], tokens=d["tokens"])


def forward_pass(lm, encs, *, capture_hidden: bool, batch: int = BATCH,
                 cache: HiddenCache | None = None) -> float:
    """Full forward (logits included) over ``encs`` in batches of ``batch``, input order,
    right padding, inference mode, as featurize batches.  Returns seconds; optionally
    stores the final hidden states (captured at the LM head's input) in ``cache``."""
    import torch

    pid = pad_id_of(lm.tokenizer)
    head = lm.model.get_output_embeddings()
    grabbed: list[Any] = []
    hook = None
    if capture_hidden:
        hook = head.register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].detach()))
    t = clock()
    try:
        for s in range(0, len(encs), batch):
            part = encs[s : s + batch]
            ids, mask = pad_batch(part, pid)
            with torch.inference_mode():
                out = lm.model(input_ids=ids.to(lm.input_device),
                               attention_mask=mask.to(lm.input_device), use_cache=False)
            del out
            if capture_hidden and cache is not None:
                h = grabbed.pop().to("cpu", torch.float32)
                for i, e in enumerate(part):
                    cache.table[tuple(e.input_ids)] = h[i, : len(e.input_ids)].clone()
    finally:
        if hook is not None:
            hook.remove()
    return clock() - t


def cached_lm(lm, cache: HiddenCache):
    """A LoadedModel whose backbone is served from ``cache`` (computed and stored on a miss)."""
    import torch
    from rise.model import LoadedModel

    class CachedLM(LoadedModel):
        def hidden_states(self, input_ids, attention_mask):  # noqa: D401
            rows = []
            lens = attention_mask.sum(1).tolist()
            for i, n in enumerate(lens):
                rows.append(cache.get(input_ids[i, : int(n)].tolist()))
            if any(r is None for r in rows):
                h = LoadedModel.hidden_states(self, input_ids, attention_mask)
                for i, n in enumerate(lens):
                    cache.table[tuple(input_ids[i, : int(n)].tolist())] = (
                        h[i, : int(n)].to("cpu", torch.float32).clone())
                return h
            b, t = input_ids.shape
            d = rows[0].shape[-1]
            out = torch.zeros(b, t, d, dtype=torch.float32)
            for i, r in enumerate(rows):
                out[i, : r.shape[0]] = r
            return out.to(self.head.weight.device, self.model.dtype)

    return CachedLM(model=lm.model, tokenizer=lm.tokenizer, head=lm.head,
                    identity=lm.identity, compute_dtype=lm.compute_dtype)
