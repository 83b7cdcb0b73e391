"""Job state and the per-tenant index registry, kept in Redis.

The gateway creates jobs and reads them; workers advance them.  A job's hash holds its
state and counters; counters only grow (HINCRBY), and terminal states are final (a Lua
script refuses to leave them), so a redelivered task can never resurrect a cancelled job.

Jobs not yet ended are members of an active set; a job that ends leaves it and joins the
ended set, which the controller empties: the job's end state to its record in the store,
its duration to the metrics, then (``expire_ended``) its hash and per-job keys expire
``ended_ttl_seconds`` after the end (``RISE_JOB_TTL_SECONDS``), never before the durable
record holds the end.  Nothing here scans every job: counts by state come from the active
set.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import socket
import time
import uuid
from typing import Any

from rise.errors import InvalidInput, NotFound, RiseError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
KINDS = ("CREATE_INDEX", "APPEND", "COMPACT")

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # whole names only: fullmatch, never $
_COUNTERS = ("shards_total", "shards_done", "examples_total", "examples_done", "tokens_done",
             "generation", "truncated", "tokens_total", "fence")
_FLOATS = ("created_at", "started_at", "finished_at", "first_task_at")
DEFAULT_ENDED_TTL_SECONDS = 7 * 86400

# Move to a state unless the job is already terminal; returns 1 if moved.  A terminal
# state also takes the job out of the active set (KEYS[2]) that the controller watches and
# puts it in the ended set (KEYS[3], scored by its end time).  ARGV: end time, then the
# field/value pairs (state first).
_SET_STATE = """
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return -1 end
if s == 'SUCCEEDED' or s == 'FAILED' or s == 'CANCELLED' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
local new = ARGV[3]
if new == 'SUCCEEDED' or new == 'FAILED' or new == 'CANCELLED' then
  local id = redis.call('HGET', KEYS[1], 'id')
  redis.call('SREM', KEYS[2], id)
  redis.call('ZADD', KEYS[3], ARGV[1], id)
end
return 1
"""

# The first task of a job started: stamp it once (a redelivered task finds it stamped).
_FIRST_TASK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[1], 'first_task_at', ARGV[1])
"""

# Field writes to a job that exists: after Redis lost its data, a worker still running must
# not recreate a job hash with a counter and nothing else (the controller restores the job
# from its record).  KEYS[1]: job hash; ARGV: "set"|"incr", then field/value pairs.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local op = ARGV[1]
for i = 2, #ARGV, 2 do
  if op == 'set' then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""

# Progress of one shard, counted once: the shard's own counters keep the highest values any
# attempt reported, and the job's totals grow by what a report adds above them, so a retried
# or redelivered shard never counts its examples twice.  KEYS: job hash, shard progress
# hash; ARGV: shard number, examples, tokens (this attempt's totals so far).
_SHARD_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ex_key, tok_key = ARGV[1] .. ':examples', ARGV[1] .. ':tokens'
local ex_old = tonumber(redis.call('HGET', KEYS[2], ex_key) or '0')
local tok_old = tonumber(redis.call('HGET', KEYS[2], tok_key) or '0')
local ex_new, tok_new = tonumber(ARGV[2]), tonumber(ARGV[3])
if ex_new > ex_old then
  redis.call('HSET', KEYS[2], ex_key, ex_new)
  redis.call('HINCRBY', KEYS[1], 'examples_done', ex_new - ex_old)
end
if tok_new > tok_old then
  redis.call('HSET', KEYS[2], tok_key, tok_new)
  redis.call('HINCRBY', KEYS[1], 'tokens_done', tok_new - tok_old)
end
return 1
"""

# Renew the controller's lease if this controller holds it (or take it if free).
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class Fenced(RiseError):
    """A write by a job that no longer owns its index (cancelled, failed, or its lock taken
    over): refused before it reaches the store."""

    grpc_code = "ABORTED"
    exit_code = 130


def check_name(name: str, what: str = "index") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = name[:80] if isinstance(name, str) else name  # an echo, not a megabyte
        raise InvalidInput(
            f"{what} name {shown!r} must be 1-63 characters of [a-z0-9._-] starting with a "
            "letter or digit"
        )
    return name


def index_prefix(tenant: str, index: str) -> str:
    """Store prefix of a tenant's index: tenant and index names only, never example ids."""
    return f"tenants/{tenant}/indexes/{index}/"


class JobStore:
    """Jobs and index registry over a ``redis.Redis`` client (decode_responses=True)."""

    def __init__(self, redis: Any, namespace: str = "rise",
                 ended_ttl_seconds: float = DEFAULT_ENDED_TTL_SECONDS) -> None:
        self.r = redis
        self.ns = namespace
        self.ended_ttl_seconds = max(1, int(ended_ttl_seconds))
        self._set_state = redis.register_script(_SET_STATE)
        self._first_task = redis.register_script(_FIRST_TASK)
        self._shard_progress = redis.register_script(_SHARD_PROGRESS)
        self._lease = redis.register_script(_LEASE)
        self._update = redis.register_script(_UPDATE)

    def _job(self, job_id: str) -> str:
        return f"{self.ns}:job:{job_id}"

    @property
    def _active(self) -> str:
        return f"{self.ns}:jobs:active"

    @property
    def _ended(self) -> str:
        return f"{self.ns}:jobs:ended"

    def _job_keys(self, job_id: str) -> list[str]:
        """The keys beside a job's hash that live as long as it (they expire with it)."""
        return [f"{self.ns}:{k}:{job_id}" for k in ("jobprogress", "jobshards", "enqueued")]

    # ----------------------------------------------------------------------- jobs

    def create(self, tenant: str, kind: str, index: str, **fields: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise InvalidInput(f"unknown job kind {kind!r}")
        job_id = uuid.uuid4().hex
        now = time.time()
        job = {"id": job_id, "tenant": tenant, "kind": kind, "index": index, "state": QUEUED,
               "created_at": now, "started_at": 0.0, "finished_at": 0.0, "error_code": "",
               "error_message": "", **{c: 0 for c in _COUNTERS}}
        request = fields.get("request")
        job["pool"] = str(request.get("pool") or "") if isinstance(request, dict) else ""
        job.update(fields)
        pipe = self.r.pipeline()
        pipe.hset(self._job(job_id), mapping={k: _enc(v) for k, v in job.items()})
        pipe.zadd(f"{self.ns}:jobs:{tenant}", {job_id: now})
        pipe.sadd(self._active, job_id)
        pipe.execute()
        return self.get_any(job_id)

    def restore(self, job: dict[str, Any], now: float | None = None) -> bool:
        """Recreate a job that Redis lost (same id), from its record in the store; active
        unless its state is terminal.  False when the job is already here, or when it ended
        longer than the ended jobs' TTL ago (its hash expired on purpose)."""
        key = self._job(job["id"])
        if self.r.hexists(key, "state"):
            return False
        ttl = self.ended_ttl_seconds
        ended_at = float(job.get("finished_at") or 0)
        now = time.time() if now is None else now
        if job["state"] in TERMINAL and ended_at and ended_at + ttl <= now:
            return False
        self.r.delete(key)  # a stray counter a worker wrote after the loss
        full = {"started_at": 0.0, "finished_at": 0.0, "error_code": "", "error_message": "",
                **{c: 0 for c in _COUNTERS}, **job}
        if "pool" not in full:
            request = full.get("request")
            full["pool"] = str(request.get("pool") or "") if isinstance(request, dict) else ""
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={k: _enc(v) for k, v in full.items()})
        pipe.zadd(f"{self.ns}:jobs:{job['tenant']}", {job["id"]: float(job["created_at"])})
        if job["state"] not in TERMINAL:
            pipe.sadd(self._active, job["id"])
        else:
            pipe.expire(key, max(1, int((ended_at or now) + ttl - now)))
        pipe.execute()
        return True

    def get_any(self, job_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(self._job(job_id))
        if not raw or "state" not in raw or "tenant" not in raw:  # absent, or a stray counter
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
        out, gone = [], []
        for job_id in ids:
            raw = self.r.hgetall(self._job(job_id))
            if not raw:
                gone.append(job_id)  # expired after it ended: drop it from the list too
            elif "state" in raw and (not index or raw.get("index") == index):
                out.append(_dec(raw))
                if len(out) >= limit:
                    break
        if gone:
            self.r.zrem(f"{self.ns}:jobs:{tenant}", *gone)
        return out

    def page(self, tenant: str, index: str, size: int,
             after: tuple[float, str] | None = None
             ) -> tuple[builtins.list[dict[str, Any]], tuple[float, str] | None]:
        """One page of the tenant's jobs, newest first (created time, then id, both
        descending), strictly after the cursor ``after``; returns the jobs and the cursor of
        the next page (None on the last).  A job created while paging is newer than any
        cursor, so the jobs present throughout come exactly once, never twice."""
        entries = self.r.zrevrange(f"{self.ns}:jobs:{tenant}", 0, -1, withscores=True)
        out: builtins.list[dict[str, Any]] = []
        gone = []
        more = False
        for job_id, score in entries:
            if after is not None and (score, job_id) >= after:
                continue
            raw = self.r.hgetall(self._job(job_id))
            if not raw:
                gone.append(job_id)
            elif "state" in raw and (not index or raw.get("index") == index):
                if len(out) >= size:
                    more = True
                    break
                out.append(dict(_dec(raw), _order=(score, job_id)))
        if gone:
            self.r.zrem(f"{self.ns}:jobs:{tenant}", *gone)
        cursor = out[-1]["_order"] if more and out else None
        for job in out:
            job.pop("_order")
        return out, cursor

    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields of a job that exists (a job Redis lost is not recreated half)."""
        args: list[str] = ["set"]
        for k, v in fields.items():
            args += [k, _enc(v)]
        self._update(keys=[self._job(job_id)], args=args)

    def set_state(self, job_id: str, state: str, **fields: Any) -> bool:
        """Move to ``state`` unless terminal already; stamps started/finished times."""
        if state not in STATES:
            raise InvalidInput(f"unknown job state {state!r}")
        if state == RUNNING:
            fields.setdefault("started_at", time.time())
        if state in TERMINAL:
            fields.setdefault("finished_at", time.time())
        args: list[str | float] = [float(fields.get("finished_at") or time.time()),
                                   "state", state]
        for k, v in fields.items():
            args += [k, _enc(v)]
        return self._set_state(keys=[self._job(job_id), self._active, self._ended],
                               args=args) == 1

    def expire_ended(self, job_id: str, finished_at: float, now: float | None = None) -> None:
        """Let an ended job's hash and its other keys expire ``ended_ttl_seconds`` after
        its end (the controller calls it once the job's record holds the end state)."""
        now = time.time() if now is None else now
        seconds = max(1, int(finished_at + self.ended_ttl_seconds - now))
        pipe = self.r.pipeline()
        for key in (self._job(job_id), *self._job_keys(job_id)):
            pipe.expire(key, seconds)
        pipe.execute()

    def mark_first_task(self, job_id: str, now: float | None = None) -> bool:
        """Stamp the start of the job's first task; True only the first time (the queue
        wait is observed once however often its task is delivered)."""
        return self._first_task(keys=[self._job(job_id)],
                                args=[time.time() if now is None else now]) == 1

    def ended_ids(self, limit: int = 1000) -> builtins.list[str]:
        """Jobs that ended and that the controller has not yet taken from the ended set,
        oldest end first."""
        return list(self.r.zrange(self._ended, 0, limit - 1))

    def forget_ended(self, job_id: str) -> bool:
        """Take the job from the ended set; True for the one caller that did."""
        return bool(self.r.zrem(self._ended, job_id))

    def active_ids(self) -> builtins.list[str]:
        """Jobs not yet in a terminal state (the controller's work list)."""
        return sorted(self.r.smembers(self._active))

    def active_of(self, tenant: str) -> builtins.list[str]:
        """The tenant's jobs not yet ended, oldest first (ties by id): the gateway's
        per-tenant job limit counts them."""
        ids = self.active_ids()
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hmget(self._job(job_id), ["tenant", "state", "created_at"])
        mine = [(float(created or 0), job_id)
                for job_id, (owner, state, created) in zip(ids, pipe.execute(), strict=True)
                if owner == tenant and state is not None and state not in TERMINAL]
        return [job_id for _, job_id in sorted(mine)]

    def forget_active(self, job_id: str) -> None:
        self.r.srem(self._active, job_id)

    def add_progress(self, job_id: str, shards: int = 0, examples: int = 0, tokens: int = 0) -> None:
        args: list[str | int] = ["incr"]
        for field, n in (("shards_done", shards), ("examples_done", examples),
                         ("tokens_done", tokens)):
            if n:
                args += [field, n]
        if len(args) > 1:
            self._update(keys=[self._job(job_id)], args=args)

    def shard_progress(self, job_id: str, n: int, examples: int, tokens: int) -> None:
        """Shard ``n``'s progress in its current attempt (totals so far); the job's counters
        grow only past what any attempt of that shard reported before."""
        key = f"{self.ns}:jobprogress:{job_id}"
        self._shard_progress(keys=[self._job(job_id), key], args=[n, examples, tokens])
        self.r.expire(key, 30 * 86400)

    def shards_done(self, job_id: str) -> set[int]:
        return {int(x) for x in self.r.smembers(f"{self.ns}:jobshards:{job_id}")}

    # ------------------------------------------------------------- liveness

    def _beat(self, job_id: str, part: str) -> str:
        return f"{self.ns}:beat:{job_id}:{part}"

    def heartbeat(self, job_id: str, part: str, ttl_seconds: float,
                  claim: bool = False) -> bool:
        """Say that ``part`` of the job (a shard number, or "prepare") is being worked on,
        for ``ttl_seconds``.  With ``claim``, only if nobody else's heartbeat is alive;
        returns whether the heartbeat is ours."""
        ms = max(1, int(ttl_seconds * 1000))
        key = self._beat(job_id, part)
        if claim:
            return bool(self.r.set(key, _host_id(), nx=True, px=ms))
        self.r.set(key, _host_id(), px=ms)
        return True

    def end_heartbeat(self, job_id: str, part: str) -> None:
        self.r.delete(self._beat(job_id, part))

    def alive(self, job_id: str, parts: builtins.list[str]) -> set[str]:
        """The parts of the job whose heartbeat has not expired."""
        if not parts:
            return set()
        vals = self.r.mget([self._beat(job_id, p) for p in parts])
        return {p for p, v in zip(parts, vals, strict=True) if v is not None}

    def note_enqueued(self, job_id: str, part: str, by_controller: bool,
                      now: float | None = None) -> int:
        """Record that ``part`` of the job was (re-)enqueued ``now``; returns how often the
        controller has re-enqueued it."""
        key = f"{self.ns}:enqueued:{job_id}"
        pipe = self.r.pipeline()
        pipe.hset(key, f"{part}:at", time.time() if now is None else now)
        if by_controller:
            pipe.hincrby(key, f"{part}:requeued", 1)
        pipe.hget(key, f"{part}:requeued")
        pipe.expire(key, 30 * 86400)
        out = pipe.execute()
        return int(out[-2] or 0)

    def enqueued(self, job_id: str) -> dict[str, float]:
        """part -> when it was last enqueued (epoch seconds)."""
        raw = self.r.hgetall(f"{self.ns}:enqueued:{job_id}")
        return {k.removesuffix(":at"): float(v) for k, v in raw.items() if k.endswith(":at")}

    # ------------------------------------------------------------- fencing

    def fence_ok(self, job_id: str) -> bool:
        """Whether the job may still write: not ended, and its index lock is still its own
        with the fence it was given."""
        job = self.r.hmget(self._job(job_id), ["state", "tenant", "index", "fence"])
        state, tenant, index, fence = job
        if state is None or state in TERMINAL:
            return False
        pipe = self.r.pipeline()
        pipe.get(f"{self.ns}:lock:{tenant}:{index}")
        pipe.get(f"{self.ns}:fence:{tenant}:{index}")
        holder, current = pipe.execute()
        return holder == job_id and str(current) == str(fence)

    def check_fence(self, job_id: str) -> None:
        """Fenced unless ``fence_ok``: called just before every shard write and commit (S3
        cannot check a token on PUT, so the check is as late as possible)."""
        if not self.fence_ok(job_id):
            raise Fenced(f"job {job_id} no longer owns its index (ended or superseded); "
                         "its write was refused")

    # ------------------------------------------------------------- controller lease

    def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew a named lease for ``holder``; False while someone else holds it."""
        return self._lease(keys=[f"{self.ns}:lease:{name}"],
                           args=[holder, max(1, int(seconds * 1000))]) == 1

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

    def active_counts(self) -> dict[tuple[str, str], int]:
        """(pool, state) -> jobs not yet ended, over all tenants, from the active set (for
        the rise_jobs gauge): one read per active job, never a scan of every job."""
        ids = self.active_ids()
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hmget(self._job(job_id), ["state", "pool"])
        counts: dict[tuple[str, str], int] = {}
        for state, pool in pipe.execute() if ids else []:
            if state is not None and state not in TERMINAL:
                counts[(pool or "", state)] = counts.get((pool or "", state), 0) + 1
        return counts

    # ----------------------------------------------------------------- indexes

    def _indexes(self, tenant: str) -> str:
        return f"{self.ns}:indexes:{tenant}"

    def register_index(self, tenant: str, index: str, entry: str | dict[str, Any]) -> bool:
        """Claim an index name (``entry``: its pool, or the registry's entry); False if the
        tenant already has it.  ``rise.registry`` keeps the store's record beside it."""
        if isinstance(entry, str):
            entry = {"pool": entry, "created_at": time.time()}
        return bool(self.r.hsetnx(self._indexes(tenant), index, json.dumps(entry)))

    def registry_complete(self) -> bool:
        """Whether the registry copy here was rebuilt from the store since Redis last lost
        its data (the marker goes with the data)."""
        return bool(self.r.exists(f"{self.ns}:registry:complete"))

    def mark_registry_complete(self) -> None:
        self.r.set(f"{self.ns}:registry:complete", time.time())

    def set_index_entry(self, tenant: str, index: str, entry: dict[str, Any]) -> None:
        self.r.hset(self._indexes(tenant), index, json.dumps(entry))

    def index_entry(self, tenant: str, index: str) -> dict[str, Any]:
        raw = self.r.hget(self._indexes(tenant), index)
        if raw is None:
            raise NotFound(f"index {index!r} not found")
        return json.loads(raw)

    def index_names(self, tenant: str) -> builtins.list[str]:
        return sorted(self.r.hkeys(self._indexes(tenant)))

    def drop_index(self, tenant: str, index: str) -> None:
        self.r.hdel(self._indexes(tenant), index)

    def lock_index(self, tenant: str, index: str, job_id: str, ttl_seconds: int) -> str | None:
        """Take the index's writer lock for ``job_id``; returns the holder if taken.  Each
        lock taken raises the index's fence and records it in the job (``check_fence``)."""
        key = f"{self.ns}:lock:{tenant}:{index}"
        got = bool(self.r.set(key, job_id, nx=True, ex=ttl_seconds))
        if not got:
            holder = self.r.get(key)
            if holder is not None:
                return holder
            got = bool(self.r.set(key, job_id, nx=True, ex=ttl_seconds))  # expired in between
            if not got:
                return self.r.get(key)
        fence = self.r.incr(f"{self.ns}:fence:{tenant}:{index}")
        # Into the job's hash if it has one: a gateway call's own lock (DeleteExamples,
        # DeleteIndex) has a token, not a job, and a bare hash would be a job of nothing.
        self._update(keys=[self._job(job_id)], args=["set", "fence", fence])
        return None

    def unlock_index(self, tenant: str, index: str, job_id: str) -> None:
        key = f"{self.ns}:lock:{tenant}:{index}"
        if self.r.get(key) == job_id:
            self.r.delete(key)

    # ------------------------------------------------------------- client request ids

    def _request(self, tenant: str, request_id: str) -> str:
        return f"{self.ns}:request:{tenant}:{request_id}"

    def claim_request(self, tenant: str, request_id: str, fingerprint: str, owner: str,
                      pending_seconds: float) -> dict[str, Any] | None:
        """Claim a tenant's client request id (AIP-155) for the call ``owner`` is making
        (SET NX, for ``pending_seconds`` until ``finish_request``).  None when claimed;
        else the record holding it: ``fingerprint`` of its request and, once finished,
        ``result`` (a record without one is still in progress)."""
        key = self._request(tenant, request_id)
        mine = _request_record(fingerprint, owner)
        if self.r.set(key, mine, nx=True, px=max(1, int(pending_seconds * 1000))):
            return None
        raw = self.r.get(key)
        if raw is None:  # released or expired in between: in progress, ask again
            return {"fingerprint": fingerprint, "owner": ""}
        return json.loads(raw)

    def finish_request(self, tenant: str, request_id: str, fingerprint: str, owner: str,
                       result: dict[str, Any], ttl_seconds: int) -> bool:
        """Record the answer of a claimed request id for ``ttl_seconds``; False (nothing
        written) when someone else holds the id now."""
        done = json.dumps({"fingerprint": fingerprint, "owner": owner, "result": result},
                          sort_keys=True)
        return self.r.eval(_FINISH_REQUEST, 1, self._request(tenant, request_id),
                           _request_record(fingerprint, owner), done, int(ttl_seconds)) == 1

    def release_request(self, tenant: str, request_id: str, fingerprint: str,
                        owner: str) -> None:
        """Free a request id this call claimed but did not finish (the call failed), so a
        retry of the same request does the work; another call's record is left alone."""
        self.r.eval(_RELEASE_REQUEST, 1, self._request(tenant, request_id),
                    _request_record(fingerprint, owner))


# A request id's record: the pending claim (ARGV[1]) becomes the finished record (ARGV[2],
# kept ARGV[3] seconds) only if it is still this call's claim or has expired meanwhile.
_FINISH_REQUEST = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""
_RELEASE_REQUEST = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _request_record(fingerprint: str, owner: str) -> str:
    """The pending record of a claimed request id (compared byte for byte by the scripts)."""
    return json.dumps({"fingerprint": fingerprint, "owner": owner}, sort_keys=True)


def _host_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
