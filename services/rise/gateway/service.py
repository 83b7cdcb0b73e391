"""The gateway's servicers: thin adapters from rise.v1 to the job store, the Celery
queues, the object store and the scorer replicas."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import heapq
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from rise import constants, taskclient
from rise import v1convert as convert
from rise.api import (
    check_fraction,
    fetch_records,
    overfetch,
    pick_query,
    top_fraction_records,
)
from rise.config import SketchConfig, check_collapse
from rise.data import FieldMap, records_from_dicts, write_records
from rise.errors import (
    AlreadyExists,
    BudgetExceeded,
    Corrupt,
    InvalidInput,
    Mismatch,
    NotFound,
    PermissionDenied,
    RiseError,
    StorageError,
    Unauthenticated,
    Unavailable,
    UnsupportedModel,
)
from rise.gateway.limits import check_active_jobs
from rise.generate import DEFAULT_MAX_NEW_TOKENS, GenerateSpec
from rise.grpcutil import rpc
from rise.index import Index, delete, open_index, verify
from rise.internalauth import GROUP_CANDIDATES, SCORE_SHARDS, VALUE_SHARDS, Signer
from rise.jobrecords import JobRecords
from rise.jobs import TERMINAL, JobStore, check_name, index_prefix
from rise.manifest import Manifest, ModelEntry
from rise.modelsource import model_config
from rise.placement import format_placement, parse_bytes, plan_placement
from rise.registry import RECORD_KEY, Registry
from rise.score import ScoreSpec, merge_topk
from rise.settings import Settings
from rise.store import Store, key_problem
from rise.tokenfile import TokenFile
from rise.v1 import common_pb2, rise_pb2, rise_pb2_grpc, scorer_pb2, scorer_pb2_grpc

log = logging.getLogger("rise.gateway")


@dataclass
class Deps:
    """What the gateway talks to; tests and the entry point build it."""

    settings: Settings
    jobs: JobStore
    send_task: Callable[..., Any]  # rise.taskclient.TaskClient.send: (name, args=, queue=)
    store: Callable[[str], Store]  # prefix -> store
    scorers: Sequence[scorer_pb2_grpc.ScorerServiceStub]
    materialize: Callable[[str], str]  # dataset URI -> local path
    metrics: Any = None
    signer: Signer | None = None  # signs scorer calls (rise.internalauth); None: unsigned


class Auth:
    """Bearer token -> tenant, from the tokens file (``rise.tokenfile``: reloaded within
    about a second of a change, so a removed token stops working without a restart; keys
    may be ``sha256:<hex>`` digests; looked up by digest).  InvalidInput when the file
    cannot be loaded at start; later a bad file keeps the last good map (logged, and
    ``rise_auth_tokens_stale`` is 1).  No answer names the file.  With ``auth_mode`` off
    every caller is ``default_tenant`` (logged loudly at start)."""

    def __init__(self, settings: Settings, metrics: Any = None) -> None:
        self.settings = settings
        self.off = settings.auth_mode == "off"
        if self.off:
            log.warning("AUTHENTICATION IS OFF (RISE_AUTH_MODE=off): every caller is tenant "
                        "%r; use only behind a trusted network", settings.default_tenant)
            return
        stale = metrics.auth_tokens_stale.set if metrics is not None else None
        self.tokens = TokenFile(settings.auth_tokens_file, on_stale=stale)

    def tenant(self, context: grpc.ServicerContext) -> str:
        if self.off:
            return self.settings.default_tenant
        md = dict(context.invocation_metadata())
        raw = md.get("authorization", "")
        header = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not header.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token (metadata 'authorization: Bearer <token>')")
        tenant = self.tokens.tenant(header[7:].strip())
        if tenant is None:
            raise Unauthenticated("invalid bearer token")
        return tenant


# ------------------------------------------------------------------------------- paging

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def page_size(asked: int, default: int) -> int:
    """The page size of a List call: ``asked`` (0: ``default``), at most MAX_PAGE."""
    return min(asked or default, MAX_PAGE)


def make_page_token(kind: str, scope: str, after: Any) -> str:
    """An opaque cursor: the last key returned (a name, or a job's (created, id)), with
    what it lists, so it cannot be replayed against another listing."""
    raw = json.dumps({"k": kind, "s": scope, "a": after}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def read_page_token(token: str, kind: str, scope: str) -> Any:
    """The cursor of ``token`` (None for an empty one); InvalidInput when it is not a
    token of this listing."""
    if not token:
        return None
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        ok = isinstance(raw, dict) and raw.get("k") == kind and raw.get("s") == scope
        after = raw["a"] if ok else None
        if kind == "jobs" and not (isinstance(after, list) and len(after) == 2
                                   and isinstance(after[0], int | float)
                                   and isinstance(after[1], str)):
            ok = False
        if kind == "indexes" and not isinstance(after, str):
            ok = False
    except (ValueError, TypeError, KeyError, RecursionError):  # deep JSON: RecursionError
        ok = False
    if not ok:
        raise InvalidInput("page_token is not a token of this listing (pass the "
                           "next_page_token of the previous page, with the same filters)")
    return after


class _Base:
    def __init__(self, deps: Deps, auth: Auth) -> None:
        self.d = deps
        self.auth = auth
        self.metrics = deps.metrics
        self.registry = Registry(deps.jobs, deps.store)
        self.records = JobRecords(lambda: deps.store(""))

    def _index(self, tenant: str, name: str) -> tuple[dict[str, Any], Store]:
        check_name(name)
        entry = self.registry.lookup(tenant, name)  # NOT_FOUND for other tenants' names
        return entry, self.d.store(index_prefix(tenant, name))

    def _manifest(self, store: Store) -> Manifest | None:
        try:
            return open_index(store).manifest
        except NotFound:
            return None

    def _lock(self, tenant: str, name: str, job_id: str) -> None:
        holder = self.d.jobs.lock_index(tenant, name, job_id,
                                        self.d.settings.index_lock_seconds)
        if holder is not None:
            raise Mismatch(f"index {name!r} is busy with job {holder}; wait for it or cancel it")

    def _check_dataset(self, tenant: str, uri: str) -> None:
        """Datasets come from the tenant's own area of the deployment bucket, an allowed
        bucket, or an allowed shared folder: workers read with the deployment's rights,
        so anything else would let one tenant index another's (or the host's) files."""
        s = self.d.settings
        if not uri:
            raise InvalidInput("dataset_uri is required")
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            if not key or key.endswith("/"):
                raise InvalidInput(f"dataset_uri {uri!r} names no object")
            problem = key_problem(key)  # before the scope: '..' could leave the area
            if problem is not None:
                raise InvalidInput(f"invalid object key ({problem}) in dataset_uri {uri!r}")
            if bucket == s.s3_bucket:
                if not key.startswith(f"tenants/{tenant}/"):
                    raise PermissionDenied(f"dataset_uri {uri!r} is outside this tenant's "
                                           f"area s3://{s.s3_bucket}/tenants/{tenant}/")
            elif bucket not in s.dataset_buckets:
                raise PermissionDenied(f"dataset_uri {uri!r}: bucket {bucket!r} is not allowed")
            return
        if "://" in uri:
            raise InvalidInput(f"dataset_uri {uri!r}: use s3://bucket/key or a path")
        real = os.path.realpath(uri)
        roots = [os.path.realpath(r) for r in s.dataset_roots]
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
            raise PermissionDenied(f"dataset path {uri!r} is outside the allowed dataset roots")


# Client request ids (AIP-155) of the mutating IndexService calls.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_TTL_SECONDS = 24 * 3600
"""How long a request id keeps its answer: the idempotency window."""
REQUEST_PENDING_SECONDS = 300.0
"""How long a claimed id stays claimed without an answer (a gateway that died mid-call)."""
REQUEST_WAIT_SECONDS = 5.0
"""How long a duplicate of a call still in progress waits for its answer before ABORTED."""


def check_request_id(request_id: str) -> str:
    if not REQUEST_ID.fullmatch(request_id):
        raise InvalidInput(f"request_id {request_id[:160]!r} must be 1-128 characters of "
                           "[A-Za-z0-9._:-] (a uuid4, say)")
    return request_id


def request_fingerprint(method: str, req: Any) -> str:
    """sha256 of the method and the request without its request_id: what a retry with
    the same id must repeat exactly."""
    bare = type(req)()
    bare.CopyFrom(req)
    bare.ClearField("request_id")
    return hashlib.sha256(method.encode() + b"\0"
                          + bare.SerializeToString(deterministic=True)).hexdigest()


def once_per_request_id(fn: Callable) -> Callable:
    """Make an IndexService call with a ``request_id`` answer its retries with the first
    call's answer instead of doing the work again (see ``run_once``)."""

    @functools.wraps(fn)
    def call(self: IndexService, req: Any, context: grpc.ServicerContext) -> Any:
        if not req.request_id:
            return fn(self, req, context)
        tenant = self.auth.tenant(context)
        return run_once(self, tenant, fn.__name__, req, lambda: fn(self, req, context))

    return call


def run_once(svc: IndexService, tenant: str, method: str, req: Any,
             work: Callable[[], Any]) -> Any:
    """Do ``work`` at most once per tenant and request id.  The id is claimed in Redis
    before the work (two concurrent retries cannot both create a job); a duplicate gets
    the first call's answer as it is now (its job, or for DeleteExamples the index), waits
    up to REQUEST_WAIT_SECONDS while the first call runs (then ABORTED), and is
    INVALID_ARGUMENT when the request differs.  A call that fails frees its id."""
    request_id = check_request_id(req.request_id)
    fingerprint = request_fingerprint(method, req)
    owner = uuid.uuid4().hex
    jobs = svc.d.jobs
    deadline = time.monotonic() + REQUEST_WAIT_SECONDS
    while True:
        held = jobs.claim_request(tenant, request_id, fingerprint, owner,
                                  REQUEST_PENDING_SECONDS)
        if held is None:
            break
        if held["fingerprint"] != fingerprint:
            raise InvalidInput(f"request_id {request_id!r} was already used for a different "
                               "request; a retry must repeat its request exactly, and a new "
                               "request needs a new id")
        result = held.get("result")
        if result is not None:
            if "job" in result:
                return convert.job_to(jobs.get(tenant, result["job"]))
            entry, store = svc._index(tenant, req.index)
            return convert.index_to(req.index, entry["pool"], svc._manifest(store))
        if time.monotonic() >= deadline:
            raise error_from("ABORTED", f"a request with request_id {request_id!r} is in "
                                        "progress; retry")
        time.sleep(0.1)
    try:
        out = work()
    except BaseException:
        jobs.release_request(tenant, request_id, fingerprint, owner)
        raise
    result = ({"job": out.id} if isinstance(out, rise_pb2.Job)
              else {"index": out.name, "generation": out.generation})
    jobs.finish_request(tenant, request_id, fingerprint, owner, result, REQUEST_TTL_SECONDS)
    return out


class IndexService(_Base, rise_pb2_grpc.IndexServiceServicer):
    @rpc("gateway")
    @once_per_request_id
    def CreateIndex(self, req: rise_pb2.CreateIndexRequest, context) -> rise_pb2.Job:
        tenant = self.auth.tenant(context)
        check_name(req.index)
        pool = self.d.settings.pool(req.pool) if req.pool else None
        if pool is None:
            raise InvalidInput("pool is required (the worker pool whose model sketches)")
        fields = convert.fields_from(req.fields if req.HasField("fields") else None)
        config = convert.config_from(req.config)
        self._check_dataset(tenant, req.dataset_uri)
        check_fits(pool, config, req.pool, self.d.settings)
        self.registry.claim(tenant, req.index, req.pool, pool.model)
        return self._submit(tenant, "CREATE_INDEX", req.index, req.pool, {
            "dataset_uri": req.dataset_uri, "fields": fields.to_dict(),
            "config": config.to_dict(), "append": False,
            "shard_size": req.shard_size or constants.DEFAULT_SHARD_SIZE},
            drop_on_busy=True)

    @rpc("gateway")
    @once_per_request_id
    def AppendToIndex(self, req: rise_pb2.AppendToIndexRequest, context) -> rise_pb2.Job:
        tenant = self.auth.tenant(context)
        self._check_dataset(tenant, req.dataset_uri)  # the request's own fault: before lookups
        entry, store = self._index(tenant, req.index)
        m = self._manifest(store)
        if m is None:
            raise Mismatch(f"index {req.index!r} has no committed generation yet")
        fields = (convert.fields_from(req.fields) if req.HasField("fields")
                  else FieldMap(**m.first_fields.model_dump()))
        return self._submit(tenant, "APPEND", req.index, entry["pool"], {
            "dataset_uri": req.dataset_uri, "fields": fields.to_dict(),
            "config": m.config.to_dict(), "append": True, "shard_size": m.shard_size})

    def _submit(self, tenant: str, kind: str, name: str, pool: str, request: dict[str, Any],
                drop_on_busy: bool = False) -> rise_pb2.Job:
        request = dict(request, prefix=index_prefix(tenant, name), pool=pool)
        limit = self.d.settings.max_active_jobs_per_tenant
        try:
            check_active_jobs(self.d.jobs, tenant, limit)
        except RiseError:
            if drop_on_busy:
                self.registry.drop(tenant, name)
            raise
        job = self.d.jobs.create(tenant, kind, name, request=request)
        if kind == "CREATE_INDEX":
            self.registry.set_job(tenant, name, job["id"])
        try:  # again with the job counted: of two submits at once, only one may pass
            check_active_jobs(self.d.jobs, tenant, limit, job["id"])
        except RiseError as e:
            self.d.jobs.set_state(job["id"], "FAILED", error_code=e.grpc_code,
                                  error_message=e.message)
            if drop_on_busy:
                self.registry.drop(tenant, name)
            raise
        try:
            self.records.submitted(job)  # the job outlives Redis losing its data
        except RiseError as e:
            self.d.jobs.set_state(job["id"], "FAILED", error_code=e.grpc_code,
                                  error_message="the job could not be recorded in the store")
            if drop_on_busy:
                self.registry.drop(tenant, name)
            raise
        try:
            self._lock(tenant, name, job["id"])
        except RiseError as e:
            self.d.jobs.set_state(job["id"], "FAILED", error_code=e.grpc_code,
                                  error_message=e.message)
            raise
        queue = self.d.settings.queue_of(pool) if kind != "COMPACT" else \
            self.d.settings.control_queue
        task = taskclient.INDEX_COMPACT if kind == "COMPACT" else taskclient.INGEST_PREPARE
        try:
            self.d.send_task(task, args=[job["id"]], queue=queue)
        except Exception as e:  # noqa: BLE001 - broker down: the job must not vanish silently
            self.d.jobs.set_state(job["id"], "FAILED", error_code="UNAVAILABLE",
                                  error_message=f"could not enqueue: {type(e).__name__}")
            self.d.jobs.unlock_index(tenant, name, job["id"])
            if drop_on_busy:
                self.registry.drop(tenant, name)
            # The broker's error names its host:port: the log's, not the caller's.
            log.warning("could not enqueue job %s: %s", job["id"], e)
            raise Unavailable(f"the job queue is unavailable ({type(e).__name__}); "
                              "retry") from None
        self.d.jobs.note_enqueued(job["id"], "compact" if kind == "COMPACT" else "prepare",
                                  by_controller=False)
        if self.d.metrics is not None:
            self.d.metrics.jobs_submitted_total.labels(pool, kind).inc()
        return convert.job_to(self.d.jobs.get(tenant, job["id"]))

    @rpc("gateway")
    @once_per_request_id
    def DeleteExamples(self, req: rise_pb2.DeleteExamplesRequest, context) -> rise_pb2.Index:
        tenant = self.auth.tenant(context)
        entry, store = self._index(tenant, req.index)
        if not req.ids:
            raise InvalidInput("ids is empty")
        token = f"delete-{time.time_ns()}"
        self._lock(tenant, req.index, token)
        try:
            delete(store, list(req.ids))
        finally:
            self.d.jobs.unlock_index(tenant, req.index, token)
        return convert.index_to(req.index, entry["pool"], self._manifest(store))

    @rpc("gateway")
    @once_per_request_id
    def CompactIndex(self, req: rise_pb2.CompactIndexRequest, context) -> rise_pb2.Job:
        tenant = self.auth.tenant(context)
        entry, store = self._index(tenant, req.index)
        if self._manifest(store) is None:
            raise Mismatch(f"index {req.index!r} has no committed generation yet")
        return self._submit(tenant, "COMPACT", req.index, entry["pool"], {})

    @rpc("gateway")
    def DeleteIndex(self, req: rise_pb2.DeleteIndexRequest, context) -> rise_pb2.DeleteIndexResponse:
        tenant = self.auth.tenant(context)
        _, store = self._index(tenant, req.index)
        token = f"drop-{time.time_ns()}"
        self._lock(tenant, req.index, token)
        try:
            # Manifests first: once none is left the index is gone for every reader,
            # whatever happens to the shard deletes after that.
            # The registry record goes last: until then a retried DeleteIndex finds the index.
            keys = store.list("")
            manifests = [k for k in keys if k.startswith(constants.MANIFEST_PREFIX)]
            rest = [k for k in keys if k not in manifests and k != RECORD_KEY]
            for k in manifests + rest:
                store.delete(k)
            self.registry.drop(tenant, req.index)
        finally:
            self.d.jobs.unlock_index(tenant, req.index, token)
        return rise_pb2.DeleteIndexResponse(objects_deleted=len(keys))

    @rpc("gateway")
    def ListIndexes(self, req: rise_pb2.ListIndexesRequest, context) -> rise_pb2.ListIndexesResponse:
        tenant = self.auth.tenant(context)
        size = page_size(req.page_size, DEFAULT_PAGE)
        after = read_page_token(req.page_token, "indexes", "")
        names = [n for n in self.registry.names(tenant) if after is None or n > after]
        out = []
        for name in names[:size]:
            try:
                entry, store = self._index(tenant, name)
            except NotFound:  # dropped since the names were read
                continue
            out.append(convert.index_to(name, entry["pool"], self._manifest(store)))
        token = make_page_token("indexes", "", names[size - 1]) if len(names) > size else ""
        return rise_pb2.ListIndexesResponse(indexes=out, next_page_token=token)

    @rpc("gateway")
    def GetIndex(self, req: rise_pb2.GetIndexRequest, context) -> rise_pb2.Index:
        tenant = self.auth.tenant(context)
        entry, store = self._index(tenant, req.index)
        return convert.index_to(req.index, entry["pool"], self._manifest(store))

    @rpc("gateway")
    @once_per_request_id
    def ImportIndex(self, req: rise_pb2.ImportIndexRequest, context) -> rise_pb2.Index:
        """Register an index copied into the tenant's area with a pool: every shard of
        every generation verified by sha256, the pool's model identity (adapter included)
        checked against the manifest's, then the registry record written.  Until then the
        index is invisible (no registry record: not listed, NOT_FOUND, never swept)."""
        tenant = self.auth.tenant(context)
        check_name(req.index)
        if not req.pool:
            raise InvalidInput("pool is required (the worker pool whose model sketches "
                               "the index's queries)")
        pool = self.d.settings.pool(req.pool)
        try:
            self.registry.lookup(tenant, req.index)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"index {req.index!r} already exists")
        prefix = index_prefix(tenant, req.index)
        where = f"s3://{self.d.settings.s3_bucket}/{prefix}"
        store = self.d.store(prefix)
        try:
            report = verify(store)
        except NotFound:
            raise NotFound(f"no index to import at {where}: copy one there first "
                           f"(rise copy INDEX {where})") from None
        if not report.ok:
            raise Corrupt(f"the index at {where} does not verify: generation "
                          f"{report.latest}: {report.generations[report.latest]}")
        manifest = open_index(store).manifest
        built = manifest.model
        key = built.differs_from(self._pool_identity(req.pool))
        if key is not None:
            raise Mismatch(f"model mismatch: index {req.index!r} was built with "
                           f"{built.name!r} but the model of pool {req.pool!r} differs in "
                           f"{key}")
        self.registry.claim(tenant, req.index, req.pool, pool.model)
        log.info("tenant %s imported index %s for pool %s (generation %d)", tenant,
                 req.index, req.pool, manifest.generation)
        return convert.index_to(req.index, req.pool, manifest)

    def _pool_identity(self, pool: str) -> ModelEntry:
        """The pool's model identity, from one of its workers (the gateway loads no model)."""
        queue = f"{self.d.settings.query_queue}.{pool}"
        try:
            res = self.d.send_task(taskclient.POOL_IDENTITY, queue=queue, args=[])
            out = res.get(timeout=self.d.settings.query_timeout_seconds, propagate=False)
        except Exception as e:  # noqa: BLE001 - broker or worker unreachable
            log.warning("model identity of pool %s: %s: %s", pool, type(e).__name__, e)
            raise Unavailable(f"the {pool!r} pool did not answer ({type(e).__name__}); "
                              "retry") from None
        if isinstance(out, RiseError):
            raise out from None
        if not isinstance(out, dict):
            log.warning("model identity of pool %s failed: %r", pool, out)
            raise Unavailable(f"the {pool!r} pool could not say its model "
                              f"({type(out).__name__}); retry")
        return ModelEntry.model_validate(out)


_JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobService(_Base, rise_pb2_grpc.JobServiceServicer):
    @rpc("gateway")
    def GetJob(self, req: rise_pb2.GetJobRequest, context) -> rise_pb2.Job:
        tenant = self.auth.tenant(context)
        try:
            return convert.job_to(self.d.jobs.get(tenant, req.id))
        except NotFound:
            # Its state in Redis expired after it ended (RISE_JOB_TTL_SECONDS): the record
            # in the store still holds how it ended.  Job ids are uuid4 hex, nothing else.
            if not _JOB_ID.fullmatch(req.id or ""):
                raise
            record = self.records.get(tenant, req.id)
            if record is None or not record.ended:
                raise
            return convert.job_to(record.as_job())

    @rpc("gateway")
    def ListJobs(self, req: rise_pb2.ListJobsRequest, context) -> rise_pb2.ListJobsResponse:
        tenant = self.auth.tenant(context)
        size = page_size(req.page_size or req.limit, DEFAULT_PAGE)
        after = read_page_token(req.page_token, "jobs", req.index)
        jobs, cursor = self.d.jobs.page(tenant, req.index, size,
                                        tuple(after) if after is not None else None)
        token = make_page_token("jobs", req.index, list(cursor)) if cursor is not None else ""
        return rise_pb2.ListJobsResponse(jobs=[convert.job_to(j) for j in jobs],
                                         next_page_token=token)

    @rpc("gateway")
    def WatchJob(self, req: rise_pb2.WatchJobRequest, context) -> Iterator[rise_pb2.Job]:
        tenant = self.auth.tenant(context)
        interval = req.interval_seconds or 1.0
        if not 0.05 <= interval <= 60:
            raise InvalidInput("interval_seconds must be in [0.05, 60]")
        ended = threading.Event()  # the stream ended (client gone, deadline): stop at once,
        context.add_callback(ended.set)  # not up to a whole interval later, holding a thread
        while context.is_active():
            job = self.d.jobs.get(tenant, req.id)
            yield convert.job_to(job)
            if job["state"] in TERMINAL:
                return
            ended.wait(interval)

    @rpc("gateway")
    def CancelJob(self, req: rise_pb2.CancelJobRequest, context) -> rise_pb2.Job:
        tenant = self.auth.tenant(context)
        job = self.d.jobs.get(tenant, req.id)
        if job["state"] not in TERMINAL and self.d.jobs.set_state(req.id, "CANCELLED"):
            self.d.jobs.unlock_index(tenant, job["index"], req.id)
            try:  # at once, so a Redis restarted from an older snapshot cannot revive it
                self.records.ended(self.d.jobs.get(tenant, req.id))
            except RiseError as e:  # the controller writes it when the store is back
                log.warning("end of job %s not recorded yet: %s", req.id, e)
        return convert.job_to(self.d.jobs.get(tenant, req.id))


class ScoringService(_Base, rise_pb2_grpc.ScoringServiceServicer):
    def _prepare(self, tenant: str, name: str, records: Any, fields_msg: Any, has_fields: bool,
                 what: str, spec: ScoreSpec) -> tuple[Index, str, str]:
        if not records:
            raise InvalidInput(f"no {what}")
        if len(records) > self.d.settings.max_queries_per_call:
            raise_exhausted(f"{len(records)} {what} in one call; the limit is "
                            f"{self.d.settings.max_queries_per_call}")
        fields = convert.fields_from(fields_msg if has_fields else None)
        rows = convert.record_dicts(records, fields)
        # Validate here (size cap included): INVALID_ARGUMENT before any lookup or work.
        records_from_dicts(rows, fields)
        entry, store = self._index(tenant, name)
        index = open_index(store)
        spec.centered(index.config.sketched, index.live_count)  # InvalidInput before any work
        payload = self._sketch(tenant, name, entry["pool"], rows, fields)
        return index, payload, entry["pool"]

    def _sketch(self, tenant: str, name: str, pool: str, rows: list[dict[str, Any]],
                fields: FieldMap) -> str:
        queue = f"{self.d.settings.query_queue}.{pool}"
        try:
            res = self.d.send_task(taskclient.QUERIES_SKETCH, queue=queue, args=[
                tenant, index_prefix(tenant, name), rows, fields.to_dict()])
            out = res.get(timeout=self.d.settings.query_timeout_seconds, propagate=False)
        except Exception as e:  # noqa: BLE001 - broker or worker unreachable
            log.warning("query sketching on pool %s failed: %s: %s", pool, type(e).__name__, e)
            raise Unavailable(f"query sketching failed: the {pool!r} pool did not answer "
                              f"({type(e).__name__})") from None
        if isinstance(out, RiseError):
            # The task's own refusal (a query with no supervised token, say), rebuilt by
            # Celery as its rise.errors class: the caller's error, with its code, never
            # UNAVAILABLE (which a client retries).
            raise out from None
        if isinstance(out, dict) and "error_code" in out:
            raise error_from(out["error_code"], out["error_message"])
        if not isinstance(out, str):  # the worker crashed or was lost: worth a retry
            log.warning("query sketching on pool %s failed: %r", pool, out)
            raise Unavailable(f"query sketching failed on the {pool!r} pool "
                              f"({type(out).__name__}); retry")
        return out

    def _fan_out(self, call: Callable[[Any, int, int], Any]) -> list[Any]:
        stubs = self.d.scorers
        if not stubs:
            raise Unavailable("no scorer replicas configured")
        with futures.ThreadPoolExecutor(max_workers=len(stubs)) as pool:
            futs = [pool.submit(call, stub, i, len(stubs)) for i, stub in enumerate(stubs)]
            out = []
            for f in futs:
                try:
                    out.append(f.result())
                except grpc.RpcError as e:
                    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        # gRPC's details name the scorer's address: logged, not answered.
                        log.warning("scorer unavailable: %s: %s", e.code().name, e.details())
                        raise Unavailable(f"scorer unavailable ({e.code().name}); "
                                          "retry") from None
                    if e.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                    grpc.StatusCode.PERMISSION_DENIED):
                        # the deployment's fault (internal secrets differ), not the caller's
                        log.error("a scorer refused the gateway's signed call: %s", e.details())
                        raise error_from("INTERNAL", "a scorer refused the gateway's call "
                                                     "(internal secret mismatch?)") from None
                    raise error_from(e.code().name, e.details() or "") from None
        return out

    def _signed(self, method: str, tenant: str, name: str) -> tuple[tuple[str, str], ...]:
        """Metadata proving to the scorer that the gateway sends this call, for this
        tenant's index only."""
        signer = self.d.signer
        return signer.metadata(method, tenant, index_prefix(tenant, name)) if signer else ()

    def _selector(self, tenant: str, name: str, index: Index, i: int, n: int):
        return scorer_pb2.ShardSelector(prefix=index_prefix(tenant, name),
                                        generation=index.generation, replica=i, replicas=n)

    @rpc("gateway")
    def Attribute(self, req: rise_pb2.AttributeRequest, context) -> rise_pb2.AttributeResponse:
        tenant = self.auth.tenant(context)
        spec = convert.spec_from(req.scoring if req.HasField("scoring") else None)
        top = req.top or 10
        if top > 10_000:
            raise_exhausted("top is limited to 10000")
        threshold: float | None = None
        if req.collapse:
            threshold = check_collapse(req.collapse_threshold or constants.DEFAULT_COLLAPSE)
        elif req.collapse_threshold:
            raise InvalidInput("collapse_threshold needs collapse")
        generated: list[dict[str, Any]] | None = None
        if req.HasField("generate"):
            index, payload, generated = self._prepare_generated(tenant, req, spec)
        else:
            index, payload, _ = self._prepare(tenant, req.index, req.queries, req.fields,
                                              req.HasField("fields"), "queries", spec)
        qbytes = base64.b64decode(payload)
        scoring = req.scoring if req.HasField("scoring") else common_pb2.Scoring()
        if threshold is None:
            merged = [[[c] for c in hits] for hits in
                      self._candidates(tenant, req.index, index, qbytes, scoring, top)]
        else:
            merged = self._collapsed(tenant, req.index, index, qbytes, scoring, top, threshold)
        texts: dict[str, dict[str, Any]] = {}
        if req.return_texts:
            texts = fetch_records(index, {c.id for hits in merged for g in hits for c in g},
                                  self.d.materialize)

        def hit(c: scorer_pb2.Candidate) -> rise_pb2.Hit:
            return rise_pb2.Hit(id=c.id, score=c.score, record_json=json.dumps(texts[c.id])
                                if c.id in texts else "")
        fields = convert.fields_from(req.fields if req.HasField("fields") else None)
        if generated is not None:
            qids = [g["id"] for g in generated]
        else:
            rows = convert.record_dicts(req.queries, fields)
            qids = [r.id for r in records_from_dicts(rows, fields)]
        resp = rise_pb2.AttributeResponse(generation=index.generation)
        for qid, groups in zip(qids, merged, strict=True):
            res = resp.results.add(query_id=qid)
            for members in groups:
                res.hits.append(hit(members[0]))
                res.hits[-1].duplicates.extend(hit(c) for c in members[1:])
        for res, g in zip(resp.results, generated or [], strict=False):
            res.prompt, res.generated_text = g["prompt"], g["response"]
        return resp

    def _group(self, request: scorer_pb2.GroupCandidatesRequest, tenant: str, name: str,
               stub: scorer_pb2_grpc.ScorerServiceStub, i: int, n: int
               ) -> scorer_pb2.GroupCandidatesResponse | None:
        """GroupCandidates on the first replica only (any replica reads any shard)."""
        if i != 0:
            return None
        return stub.GroupCandidates(request, timeout=self.d.settings.query_timeout_seconds,
                                    metadata=self._signed(GROUP_CANDIDATES, tenant, name))

    def _candidates(self, tenant: str, name: str, index: Index, qbytes: bytes,
                    scoring: common_pb2.Scoring, top: int
                    ) -> list[list[scorer_pb2.Candidate]]:
        """Per query, the global top ``top`` candidates (with their shard and row), merged
        from every scorer replica's best."""
        replies = self._fan_out(lambda stub, i, n: stub.ScoreShards(scorer_pb2.ScoreShardsRequest(
            shards=self._selector(tenant, name, index, i, n), queries=qbytes,
            scoring=scoring, top=top), timeout=self.d.settings.query_timeout_seconds,
            metadata=self._signed(SCORE_SHARDS, tenant, name)))
        out = []
        for q in range(len(replies[0].queries)):
            by_id = {c.id: c for r in replies for c in r.queries[q].candidates}
            best = merge_topk([[(c.score, c.id) for c in r.queries[q].candidates]
                               for r in replies], top)
            out.append([by_id[i] for i, _ in best])
        return out

    def _collapsed(self, tenant: str, name: str, index: Index, qbytes: bytes,
                   scoring: common_pb2.Scoring, top: int, threshold: float
                   ) -> list[list[list[scorer_pb2.Candidate]]]:
        """Per query, ``top`` groups of near-duplicates (fewer when the pool has fewer
        distinct sources): the replicas' candidates over-fetched and merged, then grouped
        by one scorer (GroupCandidates), which reads their sketches; fetched again, more,
        while a query has fewer than ``top`` groups (``rise.api.attribute_sketched``)."""
        live = index.live_count
        fetch = overfetch(top, live)
        while True:
            cands = self._candidates(tenant, name, index, qbytes, scoring, fetch)
            request = scorer_pb2.GroupCandidatesRequest(
                shards=self._selector(tenant, name, index, 0, 0), scoring=scoring,
                threshold=threshold, top=top,
                queries=[scorer_pb2.QueryCandidates(candidates=c) for c in cands])
            reply = self._fan_out(functools.partial(self._group, request, tenant, name))[0]
            groups = [[list(g.members) for g in qg.groups] for qg in reply.queries]
            if fetch >= min(live, constants.COLLAPSE_MAX_FETCH) \
                    or all(len(g) >= top for g in groups):
                return groups
            fetch = min(fetch * constants.COLLAPSE_OVERFETCH, live, constants.COLLAPSE_MAX_FETCH)

    def _prepare_generated(self, tenant: str, req: rise_pb2.AttributeRequest, spec: ScoreSpec
                           ) -> tuple[Index, str, list[dict[str, Any]]]:
        """The prompts of an AttributeRequest with ``generate``: each record's prompt (or
        its text) is sent to the index's pool, which generates a response to it and
        sketches the response as a prompt/response query."""
        gen = req.generate
        spec_gen = GenerateSpec(max_new_tokens=gen.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                temperature=gen.temperature, seed=gen.seed)
        if not req.queries:
            raise InvalidInput("no prompts")
        if len(req.queries) > self.d.settings.max_queries_per_call:
            raise_exhausted(f"{len(req.queries)} prompts in one call; the limit is "
                            f"{self.d.settings.max_queries_per_call}")
        rows = [({"id": r.id} if r.id else {}) | {"text": r.prompt or r.text}
                for r in req.queries]
        records_from_dicts(rows, FieldMap())  # INVALID_ARGUMENT before any lookup or work
        chat = bool(req.HasField("fields") and req.fields.chat_template)
        entry, store = self._index(tenant, req.index)
        index = open_index(store)
        spec.centered(index.config.sketched, index.live_count)
        if spec_gen.max_new_tokens >= index.config.max_length:
            raise InvalidInput(f"max_new_tokens ({spec_gen.max_new_tokens}) must be below the "
                               f"index's max_length ({index.config.max_length})")
        out = self._ask_pool(taskclient.QUERIES_GENERATE, entry["pool"], [
            tenant, index_prefix(tenant, req.index), rows,
            {"max_new_tokens": spec_gen.max_new_tokens, "temperature": spec_gen.temperature,
             "seed": spec_gen.seed, "chat_template": chat}], "generation")
        if not isinstance(out, dict) or not isinstance(out.get("features"), str):
            raise Unavailable(f"generation failed on the {entry['pool']!r} pool; retry")
        return index, out["features"], list(out["generated"])

    def _ask_pool(self, task: str, pool: str, args: list[Any], what: str) -> Any:
        """Run a query-queue task on a worker of ``pool`` and wait for its answer (at most
        the query timeout); the task's own refusal comes back with its code."""
        queue = f"{self.d.settings.query_queue}.{pool}"
        try:
            res = self.d.send_task(task, queue=queue, args=args)
            out = res.get(timeout=self.d.settings.query_timeout_seconds, propagate=False)
        except Exception as e:  # noqa: BLE001 - broker or worker unreachable
            log.warning("%s on pool %s failed: %s: %s", what, pool, type(e).__name__, e)
            raise Unavailable(f"{what} failed: the {pool!r} pool did not answer "
                              f"({type(e).__name__})") from None
        if isinstance(out, RiseError):
            raise out from None
        if isinstance(out, dict) and "error_code" in out:
            raise error_from(out["error_code"], out["error_message"])
        if isinstance(out, BaseException) or out is None:
            log.warning("%s on pool %s failed: %r", what, pool, out)
            raise Unavailable(f"{what} failed on the {pool!r} pool "
                              f"({type(out).__name__}); retry")
        return out

    @rpc("gateway")
    def Explain(self, req: rise_pb2.ExplainRequest, context) -> rise_pb2.ExplainResponse:
        tenant = self.auth.tenant(context)
        spec = convert.spec_from(req.scoring if req.HasField("scoring") else None)
        if not req.hit_id:
            raise InvalidInput("hit_id is required")
        if req.top > 10_000:
            raise_exhausted("top is limited to 10000")
        if not req.queries:
            raise InvalidInput("no queries")
        if len(req.queries) > self.d.settings.max_queries_per_call:
            raise_exhausted(f"{len(req.queries)} queries in one call; the limit is "
                            f"{self.d.settings.max_queries_per_call}")
        fields = convert.fields_from(req.fields if req.HasField("fields") else None)
        rows = convert.record_dicts(req.queries, fields)
        # INVALID_ARGUMENT before any lookup or work; only the explained query travels.
        recs = records_from_dicts(rows, fields)
        query = pick_query(recs, req.query_id or None)
        row = rows[recs.index(query)]
        entry, store = self._index(tenant, req.index)
        index = open_index(store)
        spec.centered(index.config.sketched, index.live_count)
        out = self._ask_pool(taskclient.QUERIES_EXPLAIN, entry["pool"], [
            tenant, index_prefix(tenant, req.index), [row], fields.to_dict(), query.id,
            req.hit_id, {"channel": spec.channel, "score": spec.score, "lam": spec.lam,
                         "center": spec.center}, req.top or 10], "explanation")
        if not isinstance(out, dict) or "pairs" not in out:
            raise Unavailable(f"explanation failed on the {entry['pool']!r} pool; retry")
        return convert.explanation_to(out, index.generation)

    @rpc("gateway")
    def Value(self, req: rise_pb2.ValueRequest, context) -> rise_pb2.ValueResponse:
        tenant = self.auth.tenant(context)
        spec = convert.spec_from(req.scoring if req.HasField("scoring") else None)
        if req.select_fraction:
            check_fraction(req.select_fraction, "select_fraction")
        target_key = self._selection_key(tenant, req) if req.select_fraction else None
        values_key = self._output_key(tenant, req.values_uri, "values_uri", (".parquet",)) \
            if req.values_uri else None
        index, payload, _ = self._prepare(tenant, req.index, req.targets, req.fields,
                                          req.HasField("fields"), "targets", spec)
        scoring = req.scoring if req.HasField("scoring") else common_pb2.Scoring()
        tbytes = base64.b64decode(payload)
        # Each replica streams its values best first, a page per message; the gateway merges
        # the streams and holds one page of each, never the whole pool (which goes to
        # values_uri when given).
        streams = self._fan_out(lambda stub, i, n: stub.ValueShards(
            scorer_pb2.ValueShardsRequest(shards=self._selector(tenant, req.index, index, i, n),
                                          targets=tbytes, scoring=scoring),
            timeout=self.d.settings.query_timeout_seconds,
            metadata=self._signed(VALUE_SHARDS, tenant, req.index)))
        inline = req.top or (INLINE_WITH_FILE if values_key is not None else 0)
        want = math.ceil(req.select_fraction * index.live_count) if target_key else 0
        shown: list[tuple[str, float]] = []
        chosen: list[str] = []
        summary = rise_pb2.ValueSummary()
        total, size = 0.0, 0
        with tempfile.TemporaryDirectory() as tmp:
            writer = ValuesWriter(os.path.join(tmp, "values.parquet")) \
                if values_key is not None else None
            for neg, rid in heapq.merge(*(self._values_of(s) for s in streams)):
                v = -neg
                summary.count += 1
                total += v
                summary.min = v if summary.count == 1 else min(summary.min, v)
                summary.max = v if summary.count == 1 else max(summary.max, v)
                if writer is not None:
                    writer.add(rid, v, summary.count)
                if not inline or summary.count <= inline:
                    shown.append((rid, v))
                    size += len(rid.encode()) + 16
                    if size > self.d.settings.max_message_bytes - 1024**2:
                        check_values_fit(shown, self.d.settings.max_message_bytes)
                if summary.count <= want:
                    chosen.append(rid)
            if summary.count:
                summary.mean = total / summary.count
            if writer is not None and values_key is not None:
                writer.close()
                with open(writer.path, "rb") as f:
                    self.d.store("").put(values_key, f.read())
        resp = rise_pb2.ValueResponse(examples=summary.count, generation=index.generation,
                                      summary=summary)
        resp.values.extend(rise_pb2.Hit(id=i, score=s) for i, s in shown)
        if values_key is not None:
            resp.values_uri = req.values_uri
        if target_key is not None:
            chosen = chosen[: math.ceil(req.select_fraction * summary.count)]
            raws = top_fraction_records(index, chosen, 1.0, self.d.materialize)
            self._write_selection(target_key, raws)
            resp.selected, resp.selection_uri = len(raws), req.selection_uri
        return resp

    def _values_of(self, responses: Any) -> Iterator[tuple[float, str]]:
        """(-value, id) of one replica's ValueShards stream, in its order (best first,
        ties by id): the key heapq.merge merges on.  Scorer errors as in _fan_out."""
        try:
            for r in responses:
                for c in r.values:
                    yield -c.score, c.id
        except grpc.RpcError as e:
            raise scorer_error(e) from None

    def _output_key(self, tenant: str, uri: str, name: str, suffixes: tuple[str, ...]) -> str:
        """The object key of an output URI in the tenant's area of the deployment's bucket."""
        if not uri.startswith("s3://"):
            raise InvalidInput(f"{name} must be s3://<deployment bucket>/tenants/<tenant>/...")
        bucket, _, key = uri[5:].partition("/")
        if bucket != self.d.settings.s3_bucket or not key.startswith(f"tenants/{tenant}/"):
            raise PermissionDenied(
                f"{name} must be under s3://{self.d.settings.s3_bucket}/tenants/{tenant}/")
        if not key.endswith(suffixes):
            raise InvalidInput(f"{name} must end in {' or '.join(suffixes)}")
        problem = key_problem(key)  # refused here, not by the store after the scoring
        if problem is not None:
            raise InvalidInput(f"invalid object key ({problem}) in {name} {uri!r}")
        return key

    def _selection_key(self, tenant: str, req: rise_pb2.ValueRequest) -> str:
        uri = req.selection_uri
        if not uri.startswith("s3://"):
            raise InvalidInput("selection_uri must be s3://<deployment bucket>/tenants/<tenant>/...")
        bucket, _, key = uri[5:].partition("/")
        if bucket != self.d.settings.s3_bucket or not key.startswith(f"tenants/{tenant}/"):
            raise PermissionDenied(
                f"selection_uri must be under s3://{self.d.settings.s3_bucket}/tenants/{tenant}/")
        if not key.endswith((".jsonl", ".parquet")):
            raise InvalidInput("selection_uri must end in .jsonl or .parquet")
        problem = key_problem(key)  # refused here, not by the store after the scoring
        if problem is not None:
            raise InvalidInput(f"invalid object key ({problem}) in selection_uri {uri!r}")
        return key

    def _write_selection(self, key: str, raws: list[dict[str, Any]]) -> None:
        suffix = ".parquet" if key.endswith(".parquet") else ".jsonl"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "selection" + suffix)
            write_records(path, raws)
            with open(path, "rb") as f:
                self.d.store("").put(key, f.read())


# Values returned inline with a values_uri and no top.
INLINE_WITH_FILE = 10
# Rows per row group of a values file: the gateway's page of values.
VALUES_PAGE = 65536


class ValuesWriter:
    """A Parquet file of (id, value, rank), written a row group at a time: at most one page
    (VALUES_PAGE rows) is held."""

    def __init__(self, path: str) -> None:
        # start-up: pyarrow only for a Value call that writes a file (data.py's note)
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self._pa = pa
        self._schema = pa.schema([("id", pa.string()), ("value", pa.float64()),
                                  ("rank", pa.uint64())])
        self._writer = pq.ParquetWriter(path, self._schema)
        self._ids: list[str] = []
        self._values: list[float] = []
        self._ranks: list[int] = []

    def add(self, rid: str, value: float, rank: int) -> None:
        self._ids.append(rid)
        self._values.append(value)
        self._ranks.append(rank)
        if len(self._ids) >= VALUES_PAGE:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            pa = self._pa
            self._writer.write_table(pa.table(
                [pa.array(self._ids, pa.string()), pa.array(self._values, pa.float64()),
                 pa.array(self._ranks, pa.uint64())], schema=self._schema))
            self._ids, self._values, self._ranks = [], [], []

    def close(self) -> None:
        self._flush()
        self._writer.close()


def scorer_error(e: grpc.RpcError) -> RiseError:
    """The domain error of a failed scorer call (what _fan_out raises)."""
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        log.warning("scorer unavailable: %s: %s", code.name, e.details())
        return Unavailable(f"scorer unavailable ({code.name}); retry")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        log.error("a scorer refused the gateway's signed call: %s", e.details())
        return error_from("INTERNAL", "a scorer refused the gateway's call "
                                      "(internal secret mismatch?)")
    return error_from(code.name, e.details() or "")


def check_values_fit(values: Sequence[tuple[str, float]], max_message_bytes: int) -> None:
    """RESOURCE_EXHAUSTED unless ``values`` fit in one response (1 MiB kept for the rest)."""
    # A Hit on the wire: the id, a double and at most 16 bytes of tags and lengths.
    size = sum(len(i.encode()) + 16 for i, _ in values)
    if size > max_message_bytes - 1024**2:
        raise_exhausted(
            f"{len(values)} values (about {size / 2**20:.1f} MiB) exceed one response "
            f"({max_message_bytes / 2**20:.0f} MiB); set top, and select_fraction with "
            "selection_uri for a selection of any size")


def raise_exhausted(msg: str) -> None:
    raise BudgetExceeded(msg)


def error_from(code: str, message: str) -> RiseError:
    """A domain error carrying a status code name received from a worker or scorer."""
    err = RiseError(message)
    err.grpc_code = code if code in grpc.StatusCode.__members__ else "INTERNAL"
    return err


def check_fits(pool: Any, config: SketchConfig, name: str = "",
               settings: Settings | None = None) -> None:
    """Refuse at submit time a model and sketch configuration (max_length, dims, top-K)
    that the pool's GPUs cannot hold, not halfway through.  The plan reads the model's
    config.json alone, from the pool's model source (``rise.modelsource``: an S3 or hub
    source's config is fetched and cached, never the weights).  The answer names the pool,
    never its model's path; a model config the planner cannot read is the deployment's
    problem, logged with its path."""
    if pool.gpus <= 0:
        return
    try:
        source = model_config(pool.model, settings or Settings.model_construct())
        placement = plan_placement(str(source), gpus=pool.gpus,
                                   gpu_memory_bytes=parse_bytes(pool.gpu_memory),
                                   batch_size=pool.batch_size, max_length=config.max_length,
                                   dtype=pool.dtype, dims=config.dims, topk=config.topk)
    except (NotFound, UnsupportedModel, InvalidInput, Corrupt) as e:  # config is valid
        log.error("pool %s: cannot plan its model: %s", name, e)
        raise Mismatch(f"the model of pool {name!r} cannot be planned (a deployment "
                       "problem; see the gateway log)") from None
    except StorageError as e:  # retryable; its message names the model's source
        log.warning("pool %s: cannot fetch its model's config: %s", name, e)
        raise StorageError(f"the model config of pool {name!r} cannot be fetched now; "
                           "retry") from None
    if not placement.fits:
        placement = dataclasses.replace(placement, model=f"pool {name}")
        detail = " | ".join(line.strip() for line in format_placement(placement).splitlines()
                            if line.strip())
        raise Mismatch(f"model does not fit the pool's {pool.gpus} x {pool.gpu_memory} GPUs: "
                       f"{placement.reason}; plan: {detail}")

