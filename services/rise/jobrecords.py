"""Job records in the object store, so that no job vanishes with Redis.

Redis holds the live state of jobs (counters, heartbeats, locks); the store holds, per job,
what it takes to finish it or to know it ended: ``jobs/<tenant>/<id>.json`` with the
request, the generation its plan targets, and its end state once it ended.  The gateway
writes the record when it accepts a job (and when it cancels one), the worker adds the
planned generation, and the controller writes the end state of every job it sees end.

After Redis lost its data the controller restores each job from its record: an ended job
comes back ended; an unfinished one comes back queued with its index locked again and its
prepare task enqueued (shards are deterministic, so it finishes with the same bytes), or
SUCCEEDED at once when the manifest of its planned generation is already there.  A job
that Redis (restarted from an older snapshot) believes running while its record says it
ended is ended again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from rise.errors import NotFound
from rise.jobs import TERMINAL
from rise.store import Store

PREFIX = "jobs/"
KEEP_ENDED_SECONDS = 7 * 86400
"""Records of ended jobs are kept this long (the sweep deletes older ones)."""


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    kind: str
    index: str
    request: dict[str, Any]
    created_at: float
    state: str = "QUEUED"
    generation: int = 0
    """The generation the job's plan targets (0 until planned), or that it committed."""
    error_code: str = ""
    error_message: str = ""
    ended_at: float = 0.0
    started_at: float = 0.0
    """The job's progress as it ended (0 in records written before it ended), so that
    GetJob still answers once the job's state in Redis expired (``job_ttl_seconds``)."""
    shards_total: int = 0
    shards_done: int = 0
    examples_total: int = 0
    examples_done: int = 0
    tokens_done: int = 0

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL

    def as_job(self) -> dict[str, Any]:
        """The job as the job store holds it (``rise.jobs``), from this record."""
        return {"id": self.id, "tenant": self.tenant, "kind": self.kind, "index": self.index,
                "state": self.state, "request": self.request, "created_at": self.created_at,
                "started_at": self.started_at, "finished_at": self.ended_at,
                "error_code": self.error_code, "error_message": self.error_message,
                "generation": self.generation, "shards_total": self.shards_total,
                "shards_done": self.shards_done, "examples_total": self.examples_total,
                "examples_done": self.examples_done, "tokens_done": self.tokens_done,
                "truncated": 0, "tokens_total": 0, "fence": 0}


_PROGRESS = ("started_at", "shards_total", "shards_done", "examples_total", "examples_done",
             "tokens_done")


def record_key(tenant: str, job_id: str) -> str:
    return f"{PREFIX}{tenant}/{job_id}.json"


class JobRecords:
    """The records, in the store at the bucket's root."""

    def __init__(self, root: Store | Callable[[], Store]) -> None:
        """``root``: the store at the bucket's root, or a function that opens it (on first
        use, so that a process answering only validation errors never opens it)."""
        self._root = root
        self._opened: Store | None = None

    @property
    def root(self) -> Store:
        if self._opened is None:
            self._opened = self._root() if callable(self._root) else self._root
        return self._opened

    def get(self, tenant: str, job_id: str) -> JobRecord | None:
        try:
            return JobRecord.model_validate_json(self.root.get(record_key(tenant, job_id)))
        except (NotFound, ValidationError):
            return None

    def put(self, record: JobRecord) -> None:
        self.root.put(record_key(record.tenant, record.id),
                      record.model_dump_json(indent=1).encode())

    def submitted(self, job: dict[str, Any]) -> JobRecord:
        record = JobRecord(id=job["id"], tenant=job["tenant"], kind=job["kind"],
                           index=job["index"], request=job.get("request") or {},
                           created_at=job["created_at"])
        self.put(record)
        return record

    def planned(self, tenant: str, job_id: str, generation: int) -> None:
        record = self.get(tenant, job_id)
        if record is not None and not record.ended:
            self.put(record.model_copy(update={"generation": generation}))

    def ended(self, job: dict[str, Any]) -> None:
        """Write the end state of ``job`` (a job hash in a terminal state)."""
        record = self.get(job["tenant"], job["id"])
        if record is None:
            record = JobRecord(id=job["id"], tenant=job["tenant"], kind=job["kind"],
                               index=job["index"], request=job.get("request") or {},
                               created_at=job["created_at"])
        if record.ended:
            return
        self.put(record.model_copy(update={
            "state": job["state"], "generation": int(job.get("generation") or 0)
            or record.generation, "error_code": job.get("error_code", ""),
            "error_message": job.get("error_message", ""),
            "ended_at": job.get("finished_at") or time.time(),
            **{k: job.get(k) or 0 for k in _PROGRESS}}))

    def all(self) -> list[JobRecord]:
        out = []
        for key in self.root.list(PREFIX):
            if not key.endswith(".json"):
                continue
            try:
                out.append(JobRecord.model_validate_json(self.root.get(key)))
            except (NotFound, ValidationError):
                continue
        return out

    def expire(self, now: float | None = None) -> int:
        """Delete records of jobs ended more than KEEP_ENDED_SECONDS ago."""
        now = time.time() if now is None else now
        n = 0
        for record in self.all():
            if record.ended and now - record.ended_at > KEEP_ENDED_SECONDS:
                self.root.delete(record_key(record.tenant, record.id))
                n += 1
        return n
