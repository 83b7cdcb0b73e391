"""A small typed Python client of the RISE gateway (rise.v1 Index, Job and Scoring services).

    from rise.client import RiseClient
    with RiseClient("127.0.0.1:50051", token) as c:
        job = c.wait(c.create_index("docs", "s3://rise/tenants/a/data/c.jsonl", "smollm2").id)
        for qid, hits in c.attribute("docs", ["Which example taught this?"], top=5):
            ...

Every call sends ``authorization: Bearer <token>``, over TLS with ``secure=True`` (the
system's root certificates, or ``root_certificates``: PEM bytes or a file, e.g. a
self-signed gateway certificate); a failed call raises the rise.errors
class of its status code (``translate``), with the server's message, so callers handle
remote and embedded errors alike.

Every call is retried on UNAVAILABLE with exponential backoff (gRPC's retry policy,
``SERVICE_CONFIG``), within its one deadline (``timeout``, by default DEFAULT_TIMEOUT,
above the gateway's own query timeout).  That is safe for the calls that change
something because each sends a fresh client request id (``request_id``; AIP-155): the
gateway answers a retry with the first call's job or index instead of doing the work
twice.  Pass ``request_id=`` yourself to retry across processes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from rise import errors
from rise.v1 import common_pb2, rise_pb2, rise_pb2_grpc

CODE_TO_ERROR: dict[grpc.StatusCode, type[errors.RiseError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.Mismatch,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.BudgetExceeded,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.DATA_LOSS: errors.Corrupt,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
}
TERMINAL = frozenset({rise_pb2.JOB_STATE_SUCCEEDED, rise_pb2.JOB_STATE_FAILED,
                      rise_pb2.JOB_STATE_CANCELLED})

Hit = tuple[str, float, "dict[str, Any] | None"]

DEFAULT_TIMEOUT = 180.0
"""Seconds per call: the gateway's query timeout (``RISE_QUERY_TIMEOUT_SECONDS``, 120 by
default) plus a margin for sketching the queries' answer and merging it, so the client
never gives up on a call the gateway is still working on."""

RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.5s", "maxBackoff": "10s",
                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
SERVICE_CONFIG = {"methodConfig": [{
    "name": [{"service": f"rise.v1.{s}"} for s in ("IndexService", "JobService",
                                                    "ScoringService")],
    "retryPolicy": RETRY_POLICY}]}
"""gRPC's service config of the client's channel: every rise.v1 call is retried on
UNAVAILABLE (gateway restarting, connection refused) with exponential backoff."""


def translate(e: grpc.RpcError) -> errors.RiseError:
    """The rise.errors exception of a failed call; ``.code`` keeps the grpc.StatusCode."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    message = (e.details() if hasattr(e, "details") else None) or str(code.name)
    cls = CODE_TO_ERROR.get(code, errors.RiseError)
    err = cls(message)
    if cls is errors.RiseError:
        err.grpc_code = code.name
    err.code = code  # type: ignore[attr-defined]
    return err


def error_of_job(job: rise_pb2.Job) -> errors.RiseError:
    """The exception a FAILED or CANCELLED job stands for."""
    if job.state == rise_pb2.JOB_STATE_CANCELLED:
        return errors.Cancelled(f"job {job.id} was cancelled")
    code = getattr(grpc.StatusCode, job.error_code or "INTERNAL", grpc.StatusCode.INTERNAL)
    cls = CODE_TO_ERROR.get(code, errors.RiseError)
    return cls(f"job {job.id} failed: {job.error_code or 'INTERNAL'}: {job.error_message}")


def state_name(job: rise_pb2.Job) -> str:
    """'QUEUED', 'RUNNING', 'SUCCEEDED', ..."""
    return rise_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def _fields(fields: Any) -> common_pb2.FieldMap | None:
    """A FieldMap message from a rise.data.FieldMap, a dict of its fields, or a message."""
    if fields is None or isinstance(fields, common_pb2.FieldMap):
        return fields
    d = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    return common_pb2.FieldMap(**{k: v for k, v in d.items() if v is not None})


def _records(items: Sequence[str | Mapping[str, Any]]) -> tuple[list[common_pb2.Record], bool]:
    """Record messages from strings (plain text) or dicts with id/text/prompt/response;
    True when they are prompt/response records."""
    out, pr = [], None
    for i, q in enumerate(items):
        if isinstance(q, str):
            q = {"text": q}
        if not isinstance(q, Mapping):
            raise errors.InvalidInput(f"record {i}: expected a string or a dict")
        is_pr = "prompt" in q or "response" in q
        if pr is not None and is_pr != pr:
            raise errors.InvalidInput("mix of plain-text and prompt/response records")
        pr = is_pr
        out.append(common_pb2.Record(id=str(q.get("id") or ""), text=q.get("text") or "",
                                     prompt=q.get("prompt") or "",
                                     response=q.get("response") or ""))
    return out, bool(pr)


def _scoring(channel: str, score: str, lam: float | None, center: bool | None
             ) -> common_pb2.Scoring:
    s = common_pb2.Scoring(channel=channel, score=score)
    if center is not None:  # unset: the server's default (see Scoring.center)
        s.center = center
    if lam is not None:
        setattr(s, "lambda", lam)
    return s


def _pem(certificates: bytes | str | os.PathLike[str] | None) -> bytes | None:
    """PEM bytes as given, or read from a file."""
    if certificates is None or isinstance(certificates, bytes):
        return certificates
    try:
        return Path(certificates).read_bytes()
    except OSError as e:
        raise errors.InvalidInput(f"cannot read root certificates {certificates}: {e}") from None


class RiseClient:
    """One channel to a gateway; every method is one RPC (``watch_job`` a stream).

    ``secure=True`` speaks TLS, checking the gateway's certificate against
    ``root_certificates`` (PEM bytes or a file; default: the system's roots) or the
    given ``credentials``; ``server_name`` overrides the name the certificate must carry
    (a port-forward to 127.0.0.1, say)."""

    def __init__(self, address: str, token: str, *, timeout: float = DEFAULT_TIMEOUT,
                 secure: bool = False, credentials: grpc.ChannelCredentials | None = None,
                 root_certificates: bytes | str | os.PathLike[str] | None = None,
                 server_name: str | None = None,
                 max_message_bytes: int = 64 * 1024**2) -> None:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(SERVICE_CONFIG))]
        self.address, self.timeout = address, timeout
        if secure:
            if server_name:
                opts.append(("grpc.ssl_target_name_override", server_name))
            creds = credentials or grpc.ssl_channel_credentials(
                root_certificates=_pem(root_certificates))
            self.channel = grpc.secure_channel(address, creds, options=opts)
        elif root_certificates is not None or server_name or credentials is not None:
            raise errors.InvalidInput("root_certificates, server_name and credentials need "
                                      "secure=True")
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._index = rise_pb2_grpc.IndexServiceStub(self.channel)
        self._jobs = rise_pb2_grpc.JobServiceStub(self.channel)
        self._scoring = rise_pb2_grpc.ScoringServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RiseClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise translate(e) from None

    # ---------------------------------------------------------------- indexes

    # The calls that change something carry a client request id (a fresh uuid4 unless
    # given): a retry with the same id gets the first call's answer, never a second job.

    def create_index(self, index: str, dataset_uri: str, pool: str, *, fields: Any = None,
                     config: Mapping[str, Any] | common_pb2.SketchConfig | None = None,
                     shard_size: int = 0, request_id: str | None = None) -> rise_pb2.Job:
        """Start sketching a dataset into a new index; ``config`` takes SketchConfig fields."""
        if config is not None and not isinstance(config, common_pb2.SketchConfig):
            config = common_pb2.SketchConfig(**dict(config))
        return self._call(self._index.CreateIndex, rise_pb2.CreateIndexRequest(
            index=index, dataset_uri=dataset_uri, pool=pool, fields=_fields(fields),
            config=config, shard_size=shard_size, request_id=_request_id(request_id)))

    def append(self, index: str, dataset_uri: str, *, fields: Any = None,
               request_id: str | None = None) -> rise_pb2.Job:
        return self._call(self._index.AppendToIndex, rise_pb2.AppendToIndexRequest(
            index=index, dataset_uri=dataset_uri, fields=_fields(fields),
            request_id=_request_id(request_id)))

    def delete_examples(self, index: str, ids: Sequence[str], *,
                        request_id: str | None = None) -> rise_pb2.Index:
        return self._call(self._index.DeleteExamples, rise_pb2.DeleteExamplesRequest(
            index=index, ids=list(ids), request_id=_request_id(request_id)))

    def compact(self, index: str, *, request_id: str | None = None) -> rise_pb2.Job:
        return self._call(self._index.CompactIndex, rise_pb2.CompactIndexRequest(
            index=index, request_id=_request_id(request_id)))

    def import_index(self, index: str, pool: str, *,
                     request_id: str | None = None) -> rise_pb2.Index:
        """Register an index copied to ``s3://<bucket>/tenants/<tenant>/indexes/<index>/``
        (``rise copy``) with ``pool``, whose model must be the index's."""
        return self._call(self._index.ImportIndex, rise_pb2.ImportIndexRequest(
            index=index, pool=pool, request_id=_request_id(request_id)))

    def delete_index(self, index: str) -> int:
        """Delete an index; returns the number of objects removed."""
        return self._call(self._index.DeleteIndex,
                          rise_pb2.DeleteIndexRequest(index=index)).objects_deleted

    def iter_indexes(self, page_size: int = 0) -> Iterator[rise_pb2.Index]:
        """Every index of the tenant, by name, a page (``page_size``, 0: the gateway's
        default) per call, following the page tokens."""
        token = ""
        while True:
            resp = self._call(self._index.ListIndexes, rise_pb2.ListIndexesRequest(
                page_size=page_size, page_token=token))
            yield from resp.indexes
            token = resp.next_page_token
            if not token:
                return

    def list_indexes(self, page_size: int = 0) -> list[rise_pb2.Index]:
        return list(self.iter_indexes(page_size))

    def get_index(self, index: str) -> rise_pb2.Index:
        return self._call(self._index.GetIndex, rise_pb2.GetIndexRequest(index=index))

    # ------------------------------------------------------------------- jobs

    def get_job(self, job_id: str) -> rise_pb2.Job:
        return self._call(self._jobs.GetJob, rise_pb2.GetJobRequest(id=job_id))

    def iter_jobs(self, index: str = "", page_size: int = 0) -> Iterator[rise_pb2.Job]:
        """Every job of the tenant (of ``index`` if given), newest first, a page per call,
        following the page tokens."""
        token = ""
        while True:
            resp = self._call(self._jobs.ListJobs, rise_pb2.ListJobsRequest(
                index=index, page_size=page_size, page_token=token))
            yield from resp.jobs
            token = resp.next_page_token
            if not token:
                return

    def list_jobs(self, index: str = "", limit: int = 0, page_size: int = 0
                  ) -> list[rise_pb2.Job]:
        """The newest ``limit`` jobs (0: 100), in pages of ``page_size``."""
        out: list[rise_pb2.Job] = []
        for job in self.iter_jobs(index, page_size or min(limit or 100, 1000)):
            out.append(job)
            if len(out) >= (limit or 100):
                break
        return out

    def watch_job(self, job_id: str, interval: float = 1.0,
                  timeout: float | None = None) -> Iterator[rise_pb2.Job]:
        """Progress updates until the job ends (the last one is terminal)."""
        stream = self._jobs.WatchJob(
            rise_pb2.WatchJobRequest(id=job_id, interval_seconds=interval),
            metadata=self.metadata, timeout=timeout)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise translate(e) from None
        finally:
            stream.cancel()

    def cancel_job(self, job_id: str) -> rise_pb2.Job:
        return self._call(self._jobs.CancelJob, rise_pb2.CancelJobRequest(id=job_id))

    def wait(self, job_id: str, timeout: float | None = None, interval: float = 0.5
             ) -> rise_pb2.Job:
        """Watch a job to its end and return the final Job (whatever its state);
        Unavailable when it is still running after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = None
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                state = state_name(job) if job is not None else "unknown"
                raise errors.Unavailable(f"job {job_id} still {state} after {timeout:g}s")
            try:
                for job in self.watch_job(job_id, interval, timeout=left):
                    if job.state in TERMINAL:
                        return job
            except errors.RiseError as e:
                if getattr(e, "code", None) != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise

    # ---------------------------------------------------------------- scoring

    def attribute(self, index: str, queries: Sequence[str | Mapping[str, Any]], top: int = 10,
                  channel: str = "both", score: str = "cosine", lam: float | None = None,
                  center: bool | None = None, return_texts: bool = False,
                  chat_template: bool = False) -> list[tuple[str, list[Hit]]]:
        """(query id, [(id, score, record or None)]) per query, best first, ties by id."""
        recs, pr = _records(queries)
        resp = self._call(self._scoring.Attribute, rise_pb2.AttributeRequest(
            index=index, queries=recs, fields=_record_fields(pr, chat_template), top=top,
            scoring=_scoring(channel, score, lam, center), return_texts=return_texts))
        return [(r.query_id, [(h.id, h.score, _json(h.record_json)) for h in r.hits])
                for r in resp.results]

    def attribute_collapsed(self, index: str, queries: Sequence[str | Mapping[str, Any]],
                            top: int = 10, threshold: float = 0.0, channel: str = "both",
                            score: str = "cosine", lam: float | None = None,
                            center: bool | None = None, return_texts: bool = False,
                            chat_template: bool = False,
                            ) -> list[tuple[str, list[tuple[Hit, list[Hit]]]]]:
        """``attribute`` with near-duplicates collapsed: per query, ``top`` distinct
        sources, each (hit, its near-duplicates), best first; ``threshold`` is the sketch
        cosine at which two hits are one source (0: the gateway's default)."""
        recs, pr = _records(queries)
        resp = self._call(self._scoring.Attribute, rise_pb2.AttributeRequest(
            index=index, queries=recs, fields=_record_fields(pr, chat_template), top=top,
            scoring=_scoring(channel, score, lam, center), return_texts=return_texts,
            collapse=True, collapse_threshold=threshold))
        return [(r.query_id, [((h.id, h.score, _json(h.record_json)),
                               [(d.id, d.score, _json(d.record_json)) for d in h.duplicates])
                              for h in r.hits]) for r in resp.results]

    def attribute_generated(self, index: str, prompts: Sequence[str | Mapping[str, Any]], *,
                            max_new_tokens: int = 0, temperature: float = 0.0, seed: int = 0,
                            top: int = 10, channel: str = "both", score: str = "cosine",
                            lam: float | None = None, center: bool | None = None,
                            return_texts: bool = False, chat_template: bool = False,
                            ) -> list[tuple[str, str, str, list[Hit]]]:
        """Attribute the model's own responses: the index's pool generates a response to
        each prompt (a string, or a dict with id and text or prompt), greedy unless
        ``temperature`` > 0 (then sampled, prompt i with seed + i), and attributes it with
        the response alone supervised.  (prompt id, prompt, generated text, hits) each."""
        recs = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                p = {"text": p}
            if not isinstance(p, Mapping):
                raise errors.InvalidInput(f"prompt {i}: expected a string or a dict")
            recs.append(common_pb2.Record(id=str(p.get("id") or ""),
                                          text=p.get("prompt") or p.get("text") or ""))
        resp = self._call(self._scoring.Attribute, rise_pb2.AttributeRequest(
            index=index, queries=recs, top=top,
            fields=common_pb2.FieldMap(chat_template=chat_template) if chat_template else None,
            scoring=_scoring(channel, score, lam, center), return_texts=return_texts,
            generate=rise_pb2.Generation(max_new_tokens=max_new_tokens,
                                         temperature=temperature, seed=seed)))
        return [(r.query_id, r.prompt, r.generated_text,
                 [(h.id, h.score, _json(h.record_json)) for h in r.hits]) for r in resp.results]

    def explain(self, index: str, queries: Sequence[str | Mapping[str, Any]], hit_id: str, *,
                query_id: str = "", top: int = 10, channel: str = "both", score: str = "cosine",
                lam: float | None = None, center: bool | None = None,
                chat_template: bool = False) -> rise_pb2.ExplainResponse:
        """Why ``hit_id`` is a hit for the query ``query_id`` of ``queries`` (or the only
        one): the score as a sum over (query token, training token) pairs, the pool-mean
        centering as its own line (``explanation_dict`` gives the JSON form
        ``rise explain`` prints)."""
        recs, pr = _records(queries)
        return self._call(self._scoring.Explain, rise_pb2.ExplainRequest(
            index=index, queries=recs, query_id=query_id, hit_id=hit_id, top=top,
            fields=_record_fields(pr, chat_template),
            scoring=_scoring(channel, score, lam, center)))

    def value(self, index: str, targets: Sequence[str | Mapping[str, Any]], *, top: int = 0,
              channel: str = "both", score: str = "cosine", lam: float | None = None,
              center: bool | None = None, select_fraction: float = 0, selection_uri: str = "",
              chat_template: bool = False) -> tuple[list[tuple[str, float]], int]:
        """([(id, value)] best first, records written to selection_uri)."""
        resp = self.value_response(index, targets, top=top, channel=channel, score=score,
                                   lam=lam, center=center, select_fraction=select_fraction,
                                   selection_uri=selection_uri, chat_template=chat_template)
        return [(h.id, h.score) for h in resp.values], resp.selected

    def value_response(self, index: str, targets: Sequence[str | Mapping[str, Any]], *,
                       top: int = 0, channel: str = "both", score: str = "cosine",
                       lam: float | None = None, center: bool | None = None,
                       select_fraction: float = 0, selection_uri: str = "",
                       values_uri: str = "", chat_template: bool = False
                       ) -> rise_pb2.ValueResponse:
        """The whole ValueResponse.  With ``values_uri`` (s3://<bucket>/tenants/<tenant>/
        ....parquet) every value is written there (id, value, rank) and the response holds
        its location, the summary (count, min, max, mean) and the best ``top`` (0: 10):
        the call for pools too large to answer inline."""
        recs, pr = _records(targets)
        return self._call(self._scoring.Value, rise_pb2.ValueRequest(
            index=index, targets=recs, fields=_record_fields(pr, chat_template),
            scoring=_scoring(channel, score, lam, center), top=top,
            select_fraction=select_fraction, selection_uri=selection_uri,
            values_uri=values_uri))


def _record_fields(prompt_response: bool, chat_template: bool) -> common_pb2.FieldMap:
    """The field map of Record messages: only the kind of record matters."""
    if prompt_response:
        return common_pb2.FieldMap(prompt_field="prompt", response_field="response",
                                   chat_template=chat_template)
    return common_pb2.FieldMap()


def _request_id(given: str | None) -> str:
    """The caller's request id, or a fresh one (a uuid4)."""
    return given or str(uuid.uuid4())


def _json(s: str) -> dict[str, Any] | None:
    return json.loads(s) if s else None


def explanation_dict(msg: rise_pb2.ExplainResponse) -> dict[str, Any]:
    """The JSON form of an ExplainResponse: what ``rise remote explain`` prints and draws
    (the same keys as ``Explanation.to_dict``)."""
    def tokens(ts: Any) -> list[dict[str, Any]]:
        return [{"position": t.position, "token_id": t.token_id, "text": t.text,
                 "supervised": t.supervised, "contribution": t.contribution} for t in ts]

    cols = len(msg.pair_cols)
    flat = list(msg.pairs)
    return {
        "query_id": msg.query_id, "hit_id": msg.hit_id,
        "scoring": {"channel": msg.channel, "score": msg.score_kind,
                    "lambda": getattr(msg, "lambda"), "center": msg.centered},
        "score": msg.score, "pair_total": msg.pair_total, "centering": msg.centering,
        "sketched_score": msg.sketched_score,
        "channels": [{"channel": c.channel, "weight": c.weight, "value": c.value,
                      "pairs": c.pairs, "centering": c.centering, "query_norm": c.query_norm,
                      "hit_norm": c.hit_norm} for c in msg.channels],
        "query_tokens": tokens(msg.query_tokens), "hit_tokens": tokens(msg.hit_tokens),
        "pair_rows": list(msg.pair_rows), "pair_cols": list(msg.pair_cols),
        "pairs": [flat[i * cols:(i + 1) * cols] for i in range(len(msg.pair_rows))],
        "top_query_tokens": list(msg.top_query_tokens),
        "top_hit_tokens": list(msg.top_hit_tokens),
        "top_pairs": [{"query": p.query_position, "hit": p.hit_position,
                       "contribution": p.contribution} for p in msg.top_pairs],
        "top_pairs_share": msg.top_pairs_share, "top_pairs_abs_share": msg.top_pairs_abs_share,
        "generation": msg.generation,
    }
