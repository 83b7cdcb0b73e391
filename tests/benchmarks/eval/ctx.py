"""Per-task run context: the task, its model (loaded once), encodings, and the measured
bare forward pass whose hidden states the RISE configurations and the hidden-state
baseline reuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    BATCH,
    HiddenCache,
    TaskData,
    cached_lm,
    encode_rows,
    forward_pass,
    load_task,
    log,
)


@dataclass
class Ctx:
    task: TaskData
    work: Path
    threads: int = 1
    _lm: Any = None
    _clm: Any = None
    _hidden: HiddenCache | None = None
    _enc: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, task_dir: Path, work_root: Path, threads: int = 1) -> Ctx:
        t = load_task(task_dir)
        w = work_root / t.dir.name
        w.mkdir(parents=True, exist_ok=True)
        return cls(task=t, work=w, threads=threads)

    # ------------------------------------------------------------------ model + encodings
    @property
    def lm(self):
        if self._lm is None:
            from rise.model import load_model

            log(f"{self.task.dir.name}: loading model {self.task.model_path}")
            self._lm = load_model(self.task.model_path)
        return self._lm

    def enc(self, which: str):
        """Encoded records of 'pool' or 'queries' (rise.data.encode_record, max_length)."""
        if which not in self._enc:
            rows = self.task.pool if which == "pool" else self.task.queries
            self._enc[which] = encode_rows(self.task, self.lm, rows)
        return self._enc[which]

    # ------------------------------------------------------------------ forward + hidden
    @property
    def hidden(self) -> HiddenCache:
        """Final hidden states of pool and queries, from one timed full forward each."""
        if self._hidden is None:
            path = self.work / "hidden.pt"
            key = self.task.data_hash()
            meta = self.work / "hidden.json"
            if path.exists() and meta.exists() and json.loads(meta.read_text()).get("key") == key:
                self._hidden = HiddenCache.load(path)
            else:
                hc = HiddenCache()
                for which in ("pool", "queries"):
                    encs = self.enc(which)
                    log(f"{self.task.dir.name}: bare forward over {which} ({len(encs)} records)")
                    # warm-up on one record so the first timed batch is not an outlier
                    forward_pass(self.lm, encs[:1], capture_hidden=False)
                    hc.seconds[which] = forward_pass(self.lm, encs, capture_hidden=True,
                                                     cache=hc, batch=BATCH)
                    hc.tokens[which] = sum(len(e.input_ids) for e in encs)
                    log(f"{self.task.dir.name}: forward {which}: {hc.seconds[which]:.1f}s "
                        f"({hc.tokens[which]} tokens)")
                hc.save(path)
                meta.write_text(json.dumps({"key": key, "seconds": hc.seconds,
                                            "tokens": hc.tokens}))
                self._hidden = hc
        return self._hidden

    @property
    def forward_seconds(self) -> float:
        """Bare forward pass (with logits, batch 8, inference mode) over the pool."""
        return float(self.hidden.seconds["pool"])

    @property
    def query_forward_seconds(self) -> float:
        return float(self.hidden.seconds["queries"])

    @property
    def clm(self):
        """The model with its backbone served from the hidden cache."""
        if self._clm is None:
            self._clm = cached_lm(self.lm, self.hidden)
        return self._clm

    def pool_file(self) -> Path:
        return self.task.dir / "pool.jsonl"

    def release(self) -> None:
        self._lm = self._clm = self._hidden = None
        self._enc.clear()
