"""Job state and the per-tenant index registry, kept in Redis.

The gateway creates jobs and reads them; workers advance them.  A job's hash holds its
state and counters; counters only grow (HINCRBY), and terminal states are final (a Lua
script refuses to leave them), so a redelivered task can never resurrect a cancelled job.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from rise.errors import InvalidInput, NotFound

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
KINDS = ("CREATE_INDEX", "APPEND", "COMPACT")

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_COUNTERS = ("shards_total", "shards_done", "examples_total", "examples_done", "tokens_done",
             "generation", "truncated", "tokens_total")
_FLOATS = ("created_at", "started_at", "finished_at")

# Move to a state unless the job is already terminal; returns 1 if moved.
_SET_STATE = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return -1 end
if s == 'SUCCEEDED' or s == 'FAILED' or s == 'CANCELLED' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def check_name(name: str, what: str = "index") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(
            f"{what} name {name!r} must be 1-63 characters of [a-z0-9._-] starting with a "
            "letter or digit"
        )
    return name


def index_prefix(tenant: str, index: str) -> str:
    """Store prefix of a tenant's index: tenant and index names only, never example ids."""
    return f"tenants/{tenant}/indexes/{index}/"


class JobStore:
    """Jobs and index registry over a ``redis.Redis`` client (decode_responses=True)."""

    def __init__(self, redis: Any, namespace: str = "rise") -> None:
        self.r = redis
        self.ns = namespace
        self._set_state = redis.register_script(_SET_STATE)

    def _job(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    # ----------------------------------------------------------------------- jobs

    def create(self, tenant: str, kind: str, index: str, **fields: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise InvalidInput(f"unknown job kind {kind!r}")
        job_id = uuid.uuid4().hex
        now = time.time()
        job = {"id": job_id, "tenant": tenant, "kind": kind, "index": index, "state": QUEUED,
               "created_at": now, "started_at": 0.0, "finished_at": 0.0, "error_code": "",
               "error_message": "", **{c: 0 for c in _COUNTERS}}
        job.update(fields)
        pipe = self.r.pipeline()
        pipe.hset(self._job(job_id), mapping={k: _enc(v) for k, v in job.items()})
        pipe.zadd(f"{self.ns}:jobs:{tenant}", {job_id: now})
        pipe.execute()
        return self.get_any(job_id)

    def get_any(self, job_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self._job(job_id))
        if not raw:
            raise NotFound(f"job {job_id!r} not found")
        return _dec(raw)

    def get(self, tenant: str, job_id: str) -> dict[str, Any]:
        """A tenant's job; another tenant's job is NOT_FOUND, never PERMISSION_DENIED,
        so job ids leak nothing."""
        job = self.get_any(job_id) if isinstance(job_id, str) and job_id else None
        if job is None or job["tenant"] != tenant:
            raise NotFound(f"job {job_id!r} not found")
        return job

    def list(self, tenant: str, index: str = "", limit: int = 100) -> list[dict[str, Any]]:
        ids = self.r.zrevrange(f"{self.ns}:jobs:{tenant}", 0, -1)
        out = []
        for job_id in ids:
            raw = self.r.hgetall(self._job(job_id))
            if raw and (not index or raw.get("index") == index):
                out.append(_dec(raw))
                if len(out) >= limit:
                    break
        return out

    def update(self, job_id: str, **fields: Any) -> None:
        self.r.hset(self._job(job_id), mapping={k: _enc(v) for k, v in fields.items()})

    def set_state(self, job_id: str, state: str, **fields: Any) -> bool:
        """Move to ``state`` unless terminal already; stamps started/finished times."""
        if state not in STATES:
            raise InvalidInput(f"unknown job state {state!r}")
        if state == RUNNING:
            fields.setdefault("started_at", time.time())
        if state in TERMINAL:
            fields.setdefault("finished_at", time.time())
        args: list[str] = ["state", state]
        for k, v in fields.items():
            args += [k, _enc(v)]
        return self._set_state(keys=[self._job(job_id)], args=args) == 1

    def add_progress(self, job_id: str, shards: int = 0, examples: int = 0, tokens: int = 0) -> None:
        pipe = self.r.pipeline()
        key = self._job(job_id)
        if shards:
            pipe.hincrby(key, "shards_done", shards)
        if examples:
            pipe.hincrby(key, "examples_done", examples)
        if tokens:
            pipe.hincrby(key, "tokens_done", tokens)
        pipe.execute()

    def is_shard_done(self, job_id: str, n: int) -> bool:
        """Whether shard ``n`` of the job was already counted by ``mark_shard_done``."""
        return bool(self.r.sismember(f"{self.ns}:jobshards:{job_id}", n))

    def mark_shard_done(self, job_id: str, n: int, ttl_seconds: int = 30 * 86400) -> bool:
        """Count shard ``n`` of the job once, however often its task runs; True the first
        time.  A redelivered or retried shard task must not push shards_done past
        shards_total, so done shards are a set beside the job hash."""
        key = f"{self.ns}:jobshards:{job_id}"  # not under job:*, which holds hashes only
        pipe = self.r.pipeline()
        pipe.sadd(key, n)
        pipe.expire(key, ttl_seconds)
        added, _ = pipe.execute()
        if added:
            self.add_progress(job_id, shards=1)
        return bool(added)

    def is_cancelled(self, job_id: str) -> bool:
        return self.r.hget(self._job(job_id), "state") == CANCELLED

    def state_counts(self) -> dict[str, int]:
        """Jobs by state over all tenants (for the rise_jobs gauge)."""
        counts = dict.fromkeys(STATES, 0)
        for key in self.r.scan_iter(f"{self.ns}:job:*", count=1000, _type="HASH"):
            s = self.r.hget(key, "state")
            if s in counts:
                counts[s] += 1
        return counts

    # ----------------------------------------------------------------- indexes

    def _indexes(self, tenant: str) -> str:
        return f"{self.ns}:indexes:{tenant}"

    def register_index(self, tenant: str, index: str, pool: str) -> bool:
        """Claim an index name; False if the tenant already has it."""
        entry = json.dumps({"pool": pool, "created_at": time.time()})
        return bool(self.r.hsetnx(self._indexes(tenant), index, entry))

    def index_entry(self, tenant: str, index: str) -> dict[str, Any]:
        raw = self.r.hget(self._indexes(tenant), index)
        if raw is None:
            raise NotFound(f"index {index!r} not found")
        return json.loads(raw)

    def index_names(self, tenant: str) -> list[str]:
        return sorted(self.r.hkeys(self._indexes(tenant)))

    def drop_index(self, tenant: str, index: str) -> None:
        self.r.hdel(self._indexes(tenant), index)

    def lock_index(self, tenant: str, index: str, job_id: str, ttl_seconds: int) -> str | None:
        """Take the index's writer lock for ``job_id``; returns the holder if taken."""
        key = f"{self.ns}:lock:{tenant}:{index}"
        if self.r.set(key, job_id, nx=True, ex=ttl_seconds):
            return None
        holder = self.r.get(key)
        if holder is None:  # expired in between: try once more
            return None if self.r.set(key, job_id, nx=True, ex=ttl_seconds) else self.r.get(key)
        return holder

    def unlock_index(self, tenant: str, index: str, job_id: str) -> None:
        key = f"{self.ns}:lock:{tenant}:{index}"
        if self.r.get(key) == job_id:
            self.r.delete(key)


def _enc(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _dec(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(raw)
    for c in _COUNTERS:
        out[c] = int(raw.get(c, 0) or 0)
    for f in _FLOATS:
        out[f] = float(raw.get(f, 0) or 0)
    for k in ("plan", "request"):
        if k in out and out[k]:
            out[k] = json.loads(out[k])
    return out
