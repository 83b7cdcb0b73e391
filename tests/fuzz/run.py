"""Fuzz run: generated requests for every rise.v1 RPC against the local stack, mixed with
valid control requests, each answer judged by the oracle; a report per run.

From the repository root::

    python -m tests.fuzz.run                 # 1000 requests per RPC (make fuzz)
    python -m tests.fuzz.run --quick         # 20 per RPC (CI: test_fuzz_quick.py)

``make fuzz`` writes the committed report (``tests/benchmarks/reports/fuzz.json`` and
``fuzz.md``); ``--quick`` writes to ``.cache/fuzz-quick/`` unless ``--out`` says otherwise.

The run brings up a stack of its own (``rise.stack``: Redis, S3, gateway, one worker,
scorer, controller) in a temporary folder, with the tests' tiny random Llama
(``conftest.save_tiny_model``) as pool ``tiny``, two tenants (``fuzz``, which is fuzzed,
and ``ctl``, whose control requests must keep working), and always brings it down.

Requests: the RPCs in turn, a batch of ``--batch`` each, every request drawn by Hypothesis
(``@given(st.data())``, generation only, seeded per batch) from the RPC's request
descriptor (``strategies.messages`` with ``hints``): half of them tame (values that pass
the checks, so requests reach the index, the worker and the jobs), half wild (edges and
generic values).  They go as bytes over a generic gRPC call, so unknown fields
(``strategies.unknown_fields``, 10%) and malformed bytes (``strategies.wire_bytes``, 3%)
can go too; 7% carry no or a wrong bearer token.  CreateIndex and AppendToIndex name a
freshly uploaded generated dataset (``strategies.datasets``) 60% of the time.  (Hypothesis
draws its simplest choice often, so the shares are rough; the report counts them.)

Per request: the bucket's keys are listed before and after (a refused request must add
none); the code must be one the oracle allows (``oracle.expect``), and never INTERNAL or
UNKNOWN; an accepted job is followed to its end (8% are cancelled at once), which must be
one the oracle allows, and a FAILED job must have written no shard nor manifest.  After
every ``--control-every`` requests one control request runs, in turn: tenant ``ctl``'s
ListIndexes, Attribute and Value (equal to their first answers) and GetJob, tenant
``fuzz``'s ListIndexes and GetJob or ListJobs, and every tenth round a CreateIndex,
Attribute and DeleteIndex of a new ``ctl`` index; ``base`` is created again whenever the
fuzz deleted it.  Each must succeed.  Every 50 requests and at the end every process of
the stack must still run with the same pids, and the gateway and scorer answer their
health check.

Findings: the bugs this harness found are fixed, each with its regression test (``FIXED``,
listed in the report); their requests go like any other.  An open finding (``KNOWN``, with
a strict-xfail regression test until fixed) would be shown at most ``--known-max`` times
per RPC, its later requests made harmless; ``--exclude-known`` would send none.

Exit status: 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import grpc
import redis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from rise.client import RiseClient, state_name
from rise.stack import Stack, grpc_serving, minio_client
from rise.v1 import rise_pb2

from . import hints as hintmod
from . import oracle
from .oracle import OK, Expect, JobExpect
from .strategies import (
    HINT_PERCENT,
    TAME_HINT_PERCENT,
    Dataset,
    datasets,
    is_repeated,
    messages,
    unknown_fields,
    wire_bytes,
)

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
POOL = "tiny"
TENANT = "fuzz"
CTL = "ctl"
BUCKET = "rise"
CAP = 2**20  # RISE_MAX_RECORD_BYTES's default
AT_CAP_MAX_LENGTH = 65_536
"""A dataset with a record at the size cap goes only with max_length <= this: a million
tokens in one sequence would hold the worker for many minutes on a shared machine."""
WIRE_PERCENT, UNKNOWN_PERCENT, DATASET_PERCENT, CANCEL_PERCENT = 3, 10, 60, 8
WILD_PERCENT = 50
"""Half the requests are wild (a hinted field takes a generic value 25% of the time, and
the hints are edges), half tame (mostly values that pass, so requests reach the index,
the worker and the jobs)."""
REQUEST = {r: getattr(rise_pb2, r + "Request") for r in oracle.RPCS}
VOLATILE = {"job", "beat", "jobprogress", "jobshards", "enqueued"}
"""Redis key kinds (``rise:<kind>:<job id>...``) of one job: not counted for a job the run
already knew before the request."""
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Attribution asks which training examples shaped a prediction.",
         "Sketches compress gradients into a few kilobytes.",
         "Valuation scores candidates before any training run.",
         "A shard is immutable once written; manifests point at shards.",
         "Tokens, logits, residuals and hidden states.",
         "Count sketch maps are drawn from a seed.",
         "Prompt and response records supervise the response only.",
         "The dog sleeps while the fox runs.",
         "Influence functions approximate leave-one-out retraining.",
         "Object stores keep immutable blobs under keys.",
         "Celery workers take shard tasks from a queue."]
GOOD_ROWS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)]
QUERIES = ["A fox jumped over a dog.", "Shards and manifests are immutable."]

FIXED = {
    "F1": ("a request whose bytes do not parse (invalid UTF-8 in a string field, a truncated "
           "or corrupt field) was answered INTERNAL by grpc before any servicer ran",
           "tests/rise/test_grpcutil.py::test_undecodable_request_bytes_are_invalid_argument"),
    "F2": ("a dataset key in the tenant's area with a '.' or '..' segment passed the gateway; "
           "the job failed INTERNAL (the S3 client's ValueError); on a file:// endpoint the "
           "path resolved outside the tenant's area",
           "tests/rise/test_datasets.py::test_a_dataset_key_with_dot_segments_is_invalid_input, "
           "::test_a_dataset_key_cannot_leave_the_tenants_area_on_a_file_endpoint, "
           "tests/rise/gateway/test_service.py::test_a_dataset_or_selection_key_the_store_"
           "would_refuse_is_invalid_argument"),
    "F3": ("a dataset key the S3 server refuses as a bad request (a NUL character, "
           "backslashed '..') was retried as an outage: the job never ended",
           "tests/rise/test_datasets.py::test_a_dataset_key_the_store_refuses_is_the_callers_error"),
    "F4": ("a selection_uri key the S3 server refuses (a NUL character, over 1024 bytes) was "
           "answered UNAVAILABLE after the scoring ran, which clients retry",
           "tests/rise/test_s3store.py::test_a_key_the_server_refuses_is_invalid_input"),
    "F5": ("an error message that echoes a long input (an id, a name) was more than the "
           "16 KiB of status details a gRPC client takes: the caller got RESOURCE_EXHAUSTED "
           "('received metadata size exceeds hard limit') instead of the error's code",
           "tests/rise/test_grpcutil.py::test_an_error_echoing_a_long_input_keeps_its_code"),
    "F6": ("every DeleteExamples and DeleteIndex, refused ones included, left a Redis hash "
           "rise:job:delete-<ns> (or drop-<ns>) holding only the index's fence: a job of "
           "nothing that never expired",
           "tests/rise/test_jobs.py::test_a_lock_without_a_job_leaves_no_job_hash"),
    "F7": ("a ListIndexes or ListJobs page_token of deeply nested JSON (base64, the gateway's "
           "token format) raised RecursionError in the decoder: INTERNAL",
           "tests/rise/gateway/test_paging.py::test_a_token_of_deep_json_is_invalid_not_internal"),
}
"""Bugs this harness found in earlier runs, each fixed, with its regression test; their
requests are sent like any other and must now pass every check."""

KNOWN: dict[str, tuple[str, str]] = {}
"""Open findings (none now): a finding's id, what it is, its regression test (a strict
xfail until fixed).  ``known_finding`` recognizes its requests; a run shows each at most
``--known-max`` times per RPC and makes its later requests harmless; ``--exclude-known``
sends none."""


def known_finding(rpc: str, req: Any | None) -> str | None:
    """The open finding (``KNOWN``) a request would hit, if any (``req`` None: malformed
    bytes)."""
    return None


REGRESSIONS = [
    ("1", "The scorer answers ScoreShards/ValueShards without credentials",
     ["tests/rise/scorer/test_server.py::test_unsigned_expired_forged_and_foreign_calls_are_refused",
      "tests/rise/test_internalauth.py::test_a_signed_call_verifies_and_grants_its_prefix",
      "tests/rise/stack/test_stack.py::test_the_scorer_answers_only_the_gateway"]),
    ("1", "The scorer accepts any prefix, another tenant's included",
     ["tests/rise/test_internalauth.py::test_foreign_prefixes_are_permission_denied",
      "tests/rise/test_internalauth.py::test_the_gateway_signs_the_prefix_of_the_callers_index",
      "tests/rise/stack/test_stack.py::test_the_scorer_answers_only_the_gateway"]),
    ("1", "The chart has no NetworkPolicy",
     ["tests/deploy/test_deploy.py::test_network_policies"]),
    ("1", "The bundled Redis has no password",
     ["tests/deploy/test_deploy.py::test_redis_password_reaches_every_component"]),
    ("1", "Bearer tokens travel over plaintext gRPC",
     ["tests/rise/test_client.py::test_tls_round_trip",
      "tests/rise/test_client.py::test_tls_refuses_plaintext_and_untrusted_certificates",
      "tests/rise/test_client.py::test_remote_cli_speaks_tls",
      "tests/deploy/test_deploy.py::test_gateway_tls_and_auth_mode"]),
    ("2", "20 WatchJob streams hold the gateway's 16 threads; other tenants' calls and the "
     "health check time out",
     ["tests/rise/gateway/test_limits.py::test_streams_are_capped_per_tenant_and_in_all",
      "tests/rise/gateway/test_limits.py::test_health_answers_while_every_admitted_place_is_taken",
      "tests/rise/gateway/test_limits.py::test_unary_calls_get_threads_of_their_own",
      "tests/rise/gateway/test_limits.py::test_a_closed_stream_frees_its_place_and_its_thread_at_once"]),
    ("2", "An Attribute waits behind another tenant's whole shard and fails UNAVAILABLE "
     "after 120 s",
     ["tests/rise/worker/test_tasks.py::test_a_query_is_answered_between_batches_of_a_running_shard"]),
    ("3", "A removed token keeps working until the gateway restarts",
     ["tests/rise/test_tokenfile.py::test_a_removed_token_stops_working_within_the_check_interval",
      "tests/rise/test_tokenfile.py::test_real_time_revocation_takes_about_a_second",
      "tests/rise/stack/test_stack.py::test_a_removed_token_stops_working_within_5_seconds"]),
    ("3", "An unreadable token file answers INVALID_ARGUMENT naming its path",
     ["tests/rise/gateway/test_service.py::test_an_unreadable_token_file_keeps_the_last_good_map_and_is_never_named",
      "tests/rise/test_tokenfile.py::test_a_bad_file_after_a_good_load_keeps_the_last_good_map"]),
    ("3", "Tokens are looked up in a dict (not constant-time by construction)",
     ["tests/rise/test_tokenfile.py::test_lookup_is_by_digest_only",
      "tests/rise/test_tokenfile.py::test_plain_and_hashed_keys_map_to_their_tenants"]),
    ("4", "Temperature 1e-300 builds an index of NaNs that answers [] and nan",
     ["tests/rise/test_config.py::test_temperatures_outside_the_range_are_refused",
      "tests/rise/test_config.py::test_the_range_keeps_the_softmax_finite_in_float32",
      "tests/rise/test_ingest.py::test_a_shard_with_non_finite_features_is_never_written",
      "tests/rise/gateway/test_service.py::test_create_index_validation",
      "tests/rise/stack/test_stack.py::test_bad_input_is_refused_at_the_door_with_its_code"]),
    ("4", "Dims of 2^32-1 are accepted at submit and fail INTERNAL 30 s later",
     ["tests/rise/test_config.py::test_dims_beyond_the_bounds_are_refused",
      "tests/rise/gateway/test_service.py::test_create_index_validation",
      "tests/rise/stack/test_stack.py::test_bad_input_is_refused_at_the_door_with_its_code"]),
    ("4", "A 20 MB record takes 67 s and 3.9 GB",
     ["tests/rise/test_data.py::test_a_record_over_the_size_cap_is_refused_without_reading_it_whole",
      "tests/rise/test_data.py::test_the_size_cap_applies_to_gzip_and_parquet",
      "tests/rise/test_data.py::test_inline_records_over_the_cap_are_refused",
      "tests/rise/test_ingest.py::test_plan_applies_the_record_size_cap",
      "tests/rise/stack/test_stack.py::test_bad_records_fail_their_job_as_invalid_argument_naming_the_uri"]),
    ("4", "A 200k-deep JSON record gives INTERNAL",
     ["tests/rise/test_data.py::test_json_nesting_is_limited",
      "tests/rise/test_data.py::test_deep_objects_are_refused_too",
      "tests/rise/stack/test_stack.py::test_bad_records_fail_their_job_as_invalid_argument_naming_the_uri"]),
    ("4", "A 5,000-digit id gives INTERNAL",
     ["tests/rise/test_data.py::test_integer_ids_are_bounded_like_strings",
      "tests/rise/stack/test_stack.py::test_bad_records_fail_their_job_as_invalid_argument_naming_the_uri"]),
    ("4", "A one-token query comes back UNAVAILABLE (retryable) instead of INVALID_ARGUMENT",
     ["tests/rise/gateway/test_service.py::test_a_query_the_worker_refuses_is_invalid_argument_not_unavailable",
      "tests/rise/test_data.py::test_no_supervised_token",
      "tests/rise/stack/test_stack.py::test_bad_input_is_refused_at_the_door_with_its_code"]),
    ("4", "Index names ending in a newline are accepted (a $ regex used with match)",
     ["tests/rise/test_jobs.py::test_names_are_matched_in_full",
      "tests/rise/gateway/test_service.py::test_create_index_validation",
      "tests/rise/stack/test_stack.py::test_bad_input_is_refused_at_the_door_with_its_code"]),
    ("4", "Job messages name the worker's cache file",
     ["tests/rise/worker/test_work.py::test_dataset_errors_name_the_uri_not_the_cache",
      "tests/rise/test_ingest.py::test_plan_names_the_dataset_uri_not_the_local_copy",
      "tests/rise/stack/test_stack.py::test_bad_records_fail_their_job_as_invalid_argument_naming_the_uri"]),
    ("4", "Storage errors name the S3 host:port",
     ["tests/rise/test_datasets.py::test_an_unreachable_store_is_named_by_bucket_not_by_host",
      "tests/rise/gateway/test_service.py::test_a_lost_worker_or_an_unreachable_broker_is_unavailable_without_its_host",
      "tests/rise/gateway/test_service.py::test_an_unreachable_scorer_is_unavailable_without_its_address"]),
    ("4", "Metrics ports listen on all interfaces",
     ["tests/rise/stack/test_stack.py::test_the_scorer_answers_only_the_gateway",
      "tests/deploy/test_deploy.py::test_metrics_bind_the_pod_ip"]),
]
"""The cases of the issue ("Tried as an attacker would", items 1-4), each with the tests
that keep it (the report's last table; test_fuzz_strategies checks that each exists)."""


T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[fuzz {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 requests per RPC (CI)")
    ap.add_argument("--per-rpc", type=int, help="requests per RPC (default 1000, --quick 20)")
    ap.add_argument("--seed", type=int, default=20260101)
    ap.add_argument("--only", default="", help="comma-separated RPC names")
    ap.add_argument("--out", help="report folder (default: tests/benchmarks/reports, "
                    "--quick: .cache/fuzz-quick)")
    ap.add_argument("--work", help="folder of the stack and model (default: a temporary "
                    "folder, removed at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ap.add_argument("--batch", type=int, default=100,
                    help="requests of one RPC in a row (one Hypothesis run)")
    ap.add_argument("--control-every", type=int, default=8,
                    help="one control request after this many fuzzed ones")
    ap.add_argument("--job-timeout", type=float, default=120.0,
                    help="seconds an accepted job may take to end")
    ap.add_argument("--storage-budget", type=float, default=5.0,
                    help="RISE_STORAGE_RETRY_BUDGET_SECONDS of the services: how long a job "
                    "retries a store error before it fails UNAVAILABLE")
    ap.add_argument("--no-wire", action="store_true", help="send no malformed bytes")
    ap.add_argument("--known-max", type=int, default=5,
                    help="times a known finding (KNOWN) is shown per RPC; after that its "
                    "requests are made harmless (the good dataset or selection, a "
                    "well-formed request instead of malformed bytes)")
    ap.add_argument("--exclude-known", action="store_true",
                    help="send no request of a known finding (--known-max 0, --no-wire)")
    ap.add_argument("--code-label", default="", help="what code ran, for the report")
    opts = ap.parse_args(argv)
    opts.command = " ".join(["python -m tests.fuzz.run",
                             *(sys.argv[1:] if argv is None else argv)])
    if opts.quick and opts.batch == 100:
        opts.batch = 20
    if opts.per_rpc is None:
        opts.per_rpc = 20 if opts.quick else 1000
    if opts.out is None:
        opts.out = str(REPO / (".cache/fuzz-quick" if opts.quick else "tests/benchmarks/reports"))
    if opts.exclude_known:
        opts.known_max, opts.no_wire = 0, True
    opts.rpcs = [r for r in oracle.RPCS if not opts.only or r in opts.only.split(",")]
    if not opts.rpcs:
        raise SystemExit(f"no RPC selected by --only {opts.only!r}")
    return opts


# ------------------------------------------------------------------------------ helpers


def describe(msg: Any, limit: int = 60) -> str:
    """A request on one line: set fields only, long strings cut with their length named."""
    parts = []
    for field, value in msg.ListFields():
        if field.type == field.TYPE_MESSAGE:
            if is_repeated(field):
                shown = [describe(v, limit) for v in value[:3]]
                more = f" +{len(value) - 3}" if len(value) > 3 else ""
                parts.append(f"{field.name}=[{', '.join('{' + s + '}' for s in shown)}{more}]")
            else:
                parts.append(f"{field.name}={{{describe(value, limit)}}}")
        elif is_repeated(field):
            shown = [_short(v, limit) for v in value[:3]]
            more = f" +{len(value) - 3}" if len(value) > 3 else ""
            parts.append(f"{field.name}=[{', '.join(shown)}{more}]")
        else:
            parts.append(f"{field.name}={_short(value, limit)}")
    return " ".join(parts)


def _short(v: Any, limit: int) -> str:
    if isinstance(v, str) and len(v) > limit:
        return f"{v[: limit // 2]!r}...({len(v)} chars)"
    return repr(v)


def end_of(job: rise_pb2.Job) -> str:
    s = state_name(job)
    return f"FAILED:{job.error_code or '?'}" if s == "FAILED" else s


class Wire:
    """Raw calls: request bytes out, (code, response bytes or messages, details) back."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 256 * 1024**2),
            ("grpc.max_receive_message_length", 256 * 1024**2)])

    def call(self, rpc: str, body: bytes, header: str | None, timeout: float
             ) -> tuple[str, Any, str]:
        path = f"/rise.v1.{oracle.SERVICE[rpc]}/{rpc}"
        md = (("authorization", header),) if header is not None else ()
        try:
            if rpc == "WatchJob":
                stream = self.channel.unary_stream(path)(body, metadata=md, timeout=timeout)
                return OK, list(stream), ""
            return OK, self.channel.unary_unary(path)(body, metadata=md, timeout=timeout), ""
        except grpc.RpcError as e:
            return e.code().name, None, e.details() or ""

    def close(self) -> None:
        self.channel.close()


def chance(data: Any, percent: int, label: str) -> bool:
    """True ``percent`` % of the time; the simplest draw is False (the common path)."""
    return data.draw(st.integers(0, 99), label=label) >= 100 - percent


def auths(token: str) -> st.SearchStrategy[tuple[bool, str | None]]:
    good = [(True, f"Bearer {token}"), (True, f"bearer {token}"), (True, f"Bearer  {token}")]
    bad = [(False, None), (False, "Bearer"), (False, "Bearer wrong"), (False, f"Basic {token}"),
           (False, token), (False, f"Bearer {token}x"), (False, f"Bearer {token[:-1]}")]
    # the simplest draw (0) is the common case: Hypothesis starts from it
    return st.integers(0, 99).flatmap(
        lambda k: st.sampled_from(good) if k < 93 else st.sampled_from(bad))


# ------------------------------------------------------------------------------ the run


class Fuzz:
    def __init__(self, opts: argparse.Namespace, stack: Stack, tokens: dict[str, str]) -> None:
        self.opts = opts
        self.stack = stack
        self.tokens = tokens
        self.s3 = minio_client(stack.s3["endpoint"], stack.s3["access_key"],
                               stack.s3["secret_key"])
        self.redis = redis.Redis.from_url(stack.endpoints["redis"], decode_responses=True)
        gw = stack.endpoints["gateway"]
        self.wire = Wire(gw)
        self.me = RiseClient(gw, tokens[TENANT], timeout=60)
        self.ctl = RiseClient(gw, tokens[CTL], timeout=120)
        self.state = oracle.State(tenant=TENANT, pool=POOL, bucket=BUCKET, cap=CAP)
        self.known_ids: dict[str, set[str] | None] = {}
        self.ctl_names: set[str] = set()
        self.ctl_jobs: list[str] = []
        self.ctl_all_jobs: set[str] = set()  # every control job, ended well or not
        self.baseline: dict[str, Any] = {}
        self.n = 0  # requests sent (fuzzed)
        self.uploads = 0
        self.per_rpc: dict[str, dict[str, Any]] = {
            r: {"requests": 0, "scheduled": 0, "codes": Counter(), "refused": 0, "ok": 0, "not_allowed": 0,
                "internal": 0, "objects_written": 0, "redis_written": 0, "wire": 0, "unauthenticated_sent": 0,
                "unknown_fields": 0, "jobs": Counter(), "seconds": []} for r in oracle.RPCS}
        self.classes: dict[str, Counter] = defaultdict(Counter)
        self.dataset_ends: dict[str, Counter] = defaultdict(Counter)
        self.wire_kinds: dict[str, Counter] = defaultdict(Counter)
        self.controls: dict[str, Counter] = defaultdict(Counter)
        self.problems: list[dict[str, Any]] = []
        self.current_known: str | None = None  # the known finding of the request now sent
        self.known_sent: Counter = Counter()
        self.known_hits: Counter = Counter()  # (finding, rpc) -> problems it showed
        self.known_defused: Counter = Counter()
        self.dataset_jobs: list[dict[str, Any]] = []
        self.pids = self.members()
        self.crashes: list[str] = []

    # ------------------------------------------------------------------ bookkeeping

    def keys(self) -> set[str]:
        return {o.object_name for o in self.s3.list_objects(BUCKET, recursive=True)}

    def redis_keys(self) -> set[str]:
        """The job store's keys in Redis (``rise:*``), less those of a job the run already
        knows (its heartbeats, progress, enqueued marks change while it winds down after
        its end) and the controller's lease, plus the sizes of the fuzzed tenant's job list
        and index registry (as ``#size`` entries): a refused request must add none."""
        known = set(self.state.jobs) | set(self.ctl_jobs) | self.ctl_all_jobs
        out = set()
        for key in self.redis.scan_iter("rise:*", count=1000):
            parts = key.split(":")
            if parts[1] == "lease" or (parts[1] in VOLATILE and len(parts) > 2
                                       and parts[2] in known):
                continue
            out.add(key)
        for key in (f"rise:jobs:{TENANT}", f"rise:indexes:{TENANT}"):
            kind = self.redis.type(key)
            size = self.redis.zcard(key) if kind == "zset" else \
                self.redis.hlen(key) if kind == "hash" else 0
            out.add(f"{key}#{size}")
        return out

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(BUCKET, key, io.BytesIO(data), len(data))

    def problem(self, kind: str, rpc: str, detail: str, request: str = "", **extra: Any) -> None:
        self.problems.append({"kind": kind, "rpc": rpc, "detail": detail,
                              "request": request, "known": self.current_known, **extra})
        if self.current_known:
            self.known_hits[self.current_known, rpc] += 1
        tag = f" [{self.current_known}]" if self.current_known else ""
        log(f"PROBLEM{tag} {kind} {rpc}: {detail} | {request[:300]}")

    def members(self) -> dict[str, set[int]]:
        return {p.name: set(p.members()) for p in self.stack.procs}

    def check_processes(self) -> None:
        now = self.members()
        for name, pids in self.pids.items():
            gone = sorted(pids - now.get(name, set()))
            if gone:
                msg = f"{name}: process(es) {gone} gone"
                if msg not in self.crashes:
                    self.crashes.append(msg)
                    self.problem("crash", "-", msg)
        for name in ("gateway", "scorer"):
            try:
                ok = grpc_serving(self.stack.endpoints[name], timeout=10)
            except grpc.RpcError as e:
                ok, detail = False, e.code().name
            else:
                detail = "not SERVING"
            if not ok:
                self.crashes.append(f"{name}: health check failed ({detail})")
                self.problem("crash", "-", f"{name}: health check failed ({detail})")

    def sync(self) -> None:
        """The fuzzed tenant's indexes as ListIndexes shows them (a control: must be OK)."""
        try:
            listed = self.me.list_indexes()
        except Exception as e:  # noqa: BLE001 - a failed control is a finding, not a crash
            self.control("ListIndexes (fuzz)", False, f"{type(e).__name__}: {e}")
            return
        self.control("ListIndexes (fuzz)", True)
        indexes = {}
        for ix in listed:
            indexes[ix.name] = oracle.IndexInfo(
                generation=ix.generation, live=ix.live_count, mode=ix.config.mode or "sketch",
                max_length=ix.config.max_length or 512, ids=self.known_ids.get(ix.name))
        for gone in set(self.known_ids) - set(indexes):
            self.known_ids.pop(gone)
        self.state.indexes = indexes

    def control(self, kind: str, passed: bool, detail: str = "") -> None:
        self.controls[kind]["passed" if passed else "failed"] += 1
        if not passed:
            self.problem("control", kind, detail)

    def wait_job(self, client: RiseClient, job_id: str, timeout: float) -> rise_pb2.Job | None:
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                job = client.get_job(job_id)
                if job.state in (rise_pb2.JOB_STATE_SUCCEEDED, rise_pb2.JOB_STATE_FAILED,
                                 rise_pb2.JOB_STATE_CANCELLED):
                    return job
            time.sleep(0.1)
        return None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        data = "".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode()
        for tenant in (TENANT, CTL):
            self.put(f"tenants/{tenant}/data/good.jsonl", data)
        self.create_base()
        job = self.ctl.create_index("ctl-base", f"s3://{BUCKET}/tenants/{CTL}/data/good.jsonl",
                                    POOL, shard_size=4)
        end = self.wait_job(self.ctl, job.id, self.opts.job_timeout)
        if end is None or state_name(end) != "SUCCEEDED":
            raise RuntimeError(f"the control index did not build: {end}")
        self.ctl_names.add("ctl-base")
        self.ctl_jobs.append(job.id)
        self.baseline["attribute"] = self.ctl.attribute("ctl-base", QUERIES, top=5)
        self.baseline["value"] = self.ctl.value("ctl-base", QUERIES)
        self.sync()

    def create_base(self) -> None:
        """The fuzzed tenant's index ``base`` (12 good records), made again whenever the
        fuzz deleted it: a control CreateIndex that must succeed."""
        try:
            job = self.me.create_index("base", f"s3://{BUCKET}/tenants/{TENANT}/data/good.jsonl",
                                       POOL, shard_size=4)
            end = self.wait_job(self.me, job.id, self.opts.job_timeout)
        except Exception as e:  # noqa: BLE001
            self.control("CreateIndex (fuzz base)", False, f"{type(e).__name__}: {e}")
            return
        self.state.jobs[job.id] = end_of(end) if end else "RUNNING"
        ok = end is not None and state_name(end) == "SUCCEEDED"
        self.control("CreateIndex (fuzz base)", ok, f"ended {end and end_of(end)}")
        if ok:
            self.known_ids["base"] = {r["id"] for r in GOOD_ROWS}
        self.sync()

    # ------------------------------------------------------------------ controls

    def run_control(self, k: int) -> None:
        if "base" not in self.state.indexes:
            self.create_base()
        kind = k % 7
        try:
            if kind == 0:
                names = {i.name for i in self.ctl.list_indexes()}
                self.control("ListIndexes (ctl)", names == self.ctl_names,
                             f"listed {sorted(names)}, want {sorted(self.ctl_names)}")
            elif kind == 1:
                got = self.ctl.attribute("ctl-base", QUERIES, top=5)
                self.control("Attribute (ctl)", got == self.baseline["attribute"],
                             "answer differs from the first one")
            elif kind == 2:
                job = self.ctl.get_job(self.ctl_jobs[0])
                self.control("GetJob (ctl)", state_name(job) == "SUCCEEDED", end_of(job))
            elif kind == 3:
                self.sync()
            elif kind == 4:
                got = self.ctl.value("ctl-base", QUERIES)
                self.control("Value (ctl)", got == self.baseline["value"],
                             "answer differs from the first one")
            elif kind == 5:
                mine = sorted(self.state.jobs)
                if mine:
                    self.me.get_job(mine[-1])
                    self.control("GetJob (fuzz)", True)
                else:
                    self.me.list_jobs()
                    self.control("ListJobs (fuzz)", True)
            elif (k // 7) % 10 == 0:
                self.control_create(k)
            else:
                self.me.list_jobs(limit=5)
                self.control("ListJobs (fuzz)", True)
        except Exception as e:  # noqa: BLE001 - a failed control is a finding
            self.control(f"control {kind}", False, f"{type(e).__name__}: {e}")

    def control_create(self, k: int) -> None:
        name = f"ctl-{k}"
        job = self.ctl.create_index(name, f"s3://{BUCKET}/tenants/{CTL}/data/good.jsonl", POOL,
                                    shard_size=4)
        self.ctl_all_jobs.add(job.id)
        end = self.wait_job(self.ctl, job.id, self.opts.job_timeout)
        ok = end is not None and state_name(end) == "SUCCEEDED"
        self.control("CreateIndex (ctl)", ok, f"ended {end and end_of(end)}")
        if not ok:
            return
        self.ctl_jobs.append(job.id)
        got = self.ctl.attribute(name, QUERIES, top=5)
        self.control("Attribute (ctl, new index)", len(got) == 2 and len(got[0][1]) == 5,
                     f"answer {got}")
        self.ctl.delete_index(name)
        left = [o.object_name for o in self.s3.list_objects(
            BUCKET, prefix=f"tenants/{CTL}/indexes/{name}/", recursive=True)]
        self.control("DeleteIndex (ctl)", not left, f"objects left: {left[:3]}")

    # ------------------------------------------------------------------ one request

    def step(self, rpc: str, data: Any) -> None:
        desc = REQUEST[rpc].DESCRIPTOR
        authed, header = data.draw(auths(self.tokens[TENANT]), label="auth")
        stats = self.per_rpc[rpc]
        dataset: Dataset | None = None
        if rpc in ("CreateIndex", "AppendToIndex") and \
                chance(data, DATASET_PERCENT, "dataset?"):
            dataset = data.draw(datasets(f"g{self.uploads}", CAP), label="dataset")
        cancel = chance(data, CANCEL_PERCENT, "cancel?")  # drawn whatever the answer will be
        # Every draw below happens whatever the run's state: malformed bytes are drawn and
        # a request too, and the state only chooses which goes (Hypothesis checks that the
        # same choices lead to the same draws).
        wire = None
        if chance(data, WIRE_PERCENT, "wire?") and not self.opts.no_wire:
            wire = data.draw(wire_bytes(desc), label="wire")
            dataset = None
        # a generated dataset goes in a tame request: one refused at the door for another
        # reason would never be read
        tame = not chance(data, WILD_PERCENT, "wild?") or dataset is not None
        hints = hintmod.hints(self.state, sorted(self.ctl_names), self.ctl_jobs, tame)
        msg = data.draw(messages(desc, hints, hint_percent=TAME_HINT_PERCENT if tame
                                 else HINT_PERCENT), label="request")
        extra = data.draw(unknown_fields(), label="unknown") \
            if chance(data, UNKNOWN_PERCENT, "unknown?") else b""
        if wire is not None:
            kind, body = wire
            msg = parsed = None
            stats["wire"] += 1
            # the token is checked first (the gateway's interceptors), then the bytes
            exp = Expect(frozenset({oracle.INVALID_ARGUMENT if authed else
                                    oracle.UNAUTHENTICATED}), [f"malformed bytes: {kind}"])
            shown = f"bytes {body[:40]!r} ({kind})"
        else:
            if dataset is not None:
                dataset = self.place(rpc, msg, dataset)
            if rpc == "Attribute" and msg.HasField("generate"):
                self.shorten(msg)
            if rpc == "ImportIndex":  # what could be imported: index folders in the area
                area = f"tenants/{TENANT}/indexes/"
                self.state.stored = {k[len(area):].split("/")[0] for k in self.keys()
                                     if k.startswith(area)}
            found = known_finding(rpc, msg)
            if found is not None:
                if self.known_hits[found, rpc] >= self.opts.known_max:
                    self.defuse(rpc, msg)
                    self.known_defused[found, rpc] += 1
                else:
                    self.known_sent[found, rpc] += 1
            stats["unknown_fields"] += bool(extra)
            body = msg.SerializeToString() + extra
            parsed = REQUEST[rpc].FromString(body)
            exp = oracle.expect(rpc, parsed, self.state, authenticated=authed, size=len(body),
                                dataset=dataset)
            if rpc == "WatchJob" and self.state.jobs.get(parsed.id) in ("QUEUED", "RUNNING"):
                exp = Expect(exp.allowed | {"DEADLINE_EXCEEDED"}, exp.classes)
            shown = describe(parsed) + (f" +{len(extra)} bytes of unknown fields" if extra else "")
            if dataset is not None:
                shown += f" [dataset {dataset.summary()}]"
        self.current_known = known_finding(rpc, parsed)
        for c in exp.classes or ["(well-formed)"]:
            self.classes[f"{rpc}: {c}"]["n"] += 1
        stats["requests"] += 1
        stats["scheduled"] += 1
        stats["unauthenticated_sent"] += not authed
        before = self.keys()
        redis_before = self.redis_keys()
        t0 = time.monotonic()
        timeout = 150.0 if rpc in ("Attribute", "Value", "Explain") else 60.0
        code, resp, details = self.wire.call(rpc, body, header, timeout)
        stats["seconds"].append(time.monotonic() - t0)
        self.n += 1
        stats["codes"][code] += 1
        for c in exp.classes or ["(well-formed)"]:
            self.classes[f"{rpc}: {c}"][code] += 1
        if msg is None:
            self.wire_kinds[rpc][code] += 1
        if code == OK:
            stats["ok"] += 1
        else:
            stats["refused"] += 1
        if code in oracle.NEVER:
            stats["internal"] += 1
            self.problem(code, rpc, f"{code}: {details}", shown, classes=exp.classes)
        elif code not in exp.allowed:
            stats["not_allowed"] += 1
            self.problem("code not allowed", rpc, f"{code} ({details[:200]}); allowed "
                         f"{sorted(exp.allowed)}", shown, classes=exp.classes)
        mutated = False
        if code == OK and msg is not None:
            mutated = self.accepted(rpc, parsed, resp, exp, dataset, before, cancel, shown)
        after = self.keys()
        if code != OK:
            new = sorted(after - before)
            if new:
                stats["objects_written"] += len(new)
                self.problem("objects written on refusal", rpc, f"{code}: {new[:5]}", shown)
            grown = sorted(self.redis_keys() - redis_before)
            if grown:
                stats["redis_written"] += len(grown)
                self.problem("redis keys written on refusal", rpc, f"{code}: {grown[:5]}",
                             shown)
        if mutated:
            self.sync()
        self.current_known = None

    def shorten(self, msg: Any) -> None:
        """A generating Attribute the gateway would accept, made short enough for the CPU
        worker: at most 64 new tokens (the default) for at most 16 prompts.  Values past
        the bounds (over 4096 tokens, over 256 prompts) are left as drawn."""
        n = msg.generate.max_new_tokens or oracle.DEFAULT_NEW_TOKENS
        if oracle.DEFAULT_NEW_TOKENS < n <= oracle.MAX_NEW_TOKENS:
            msg.generate.max_new_tokens = oracle.DEFAULT_NEW_TOKENS
        if 16 < len(msg.queries) <= oracle.MAX_QUERIES:
            del msg.queries[16:]

    def defuse(self, rpc: str, msg: Any) -> None:
        """A request of a known finding made harmless: the good dataset or selection."""
        if rpc == "Value":
            msg.selection_uri = f"s3://{BUCKET}/tenants/{TENANT}/sel/a.jsonl"
        else:
            msg.dataset_uri = oracle.good_uri(self.state)

    def place(self, rpc: str, msg: Any, ds: Dataset) -> Dataset | None:
        """Upload the generated dataset and name it in the request (a record at the size
        cap only where max_length keeps it short: AT_CAP_MAX_LENGTH)."""
        if ds.at_cap:
            if rpc == "CreateIndex":
                if msg.config.max_length > AT_CAP_MAX_LENGTH:
                    msg.config.max_length = AT_CAP_MAX_LENGTH
            else:
                info = self.state.indexes.get(msg.index)
                if info is None or info.max_length > AT_CAP_MAX_LENGTH:
                    return None
        key = f"tenants/{TENANT}/data/gen-{self.uploads:05d}{ds.suffix}"
        self.uploads += 1
        self.put(key, ds.data)
        msg.dataset_uri = f"s3://{BUCKET}/{key}"
        return ds

    def accepted(self, rpc: str, req: Any, resp: Any, exp: Expect, dataset: Dataset | None,
                 before: set[str], cancel: bool, shown: str) -> bool:
        """State after an OK answer; follows a job to its end.  True when the tenant's
        indexes may have changed."""
        if rpc in oracle.REQUEST_ID_RPCS and req.request_id and not exp.replay:
            self.state.request_ids[req.request_id] = oracle.fingerprint(rpc, req)
        if rpc in oracle.JOB_RPCS:
            job = rise_pb2.Job.FromString(resp)
            if exp.replay:
                if job.id not in self.state.jobs:
                    self.problem("replay", rpc, f"a retried request id answered job {job.id}, "
                                 "not one of this tenant's", shown)
                return False
            self.follow(rpc, req, job, exp.job, dataset, before, cancel, shown)
            return True
        if rpc == "DeleteExamples":
            ids = self.known_ids.get(req.index)
            if ids is not None and not exp.replay:
                ids.difference_update(req.ids)
            return True
        if rpc == "DeleteIndex":
            self.known_ids.pop(req.index, None)
            return True
        if rpc == "ImportIndex":
            return True
        if rpc == "CancelJob":
            self.state.jobs[req.id] = end_of(rise_pb2.Job.FromString(resp))
        if rpc in ("ListIndexes", "ListJobs"):  # its next page's token, for later requests
            token = getattr(rise_pb2, rpc + "Response").FromString(resp).next_page_token
            if token:
                self.state.page_tokens[token] = (
                    "indexes", "") if rpc == "ListIndexes" else ("jobs", req.index)
        return False

    def follow(self, rpc: str, req: Any, job: rise_pb2.Job, jexp: JobExpect | None,
               dataset: Dataset | None, before: set[str], cancelled: bool, shown: str) -> None:
        self.state.jobs[job.id] = state_name(job)
        if cancelled:  # a CancelJob of a job that may still run: counted as one
            body = rise_pb2.CancelJobRequest(id=job.id).SerializeToString()
            code, _, details = self.wire.call("CancelJob", body,
                                              f"Bearer {self.tokens[TENANT]}", 60)
            cs = self.per_rpc["CancelJob"]
            cs["requests"] += 1
            cs["codes"][code] += 1
            cs["ok" if code == OK else "refused"] += 1
            self.classes["CancelJob: a job just accepted"][code] += 1
            if code != OK:
                cs["not_allowed"] += 1
                self.problem("code not allowed", "CancelJob", f"{code} ({details}) for a job "
                             "just accepted", f"id={job.id!r}")
        timeout = self.opts.job_timeout
        end = self.wait_job(self.me, job.id, timeout)
        stats = self.per_rpc[rpc]
        if end is None:
            stats["jobs"]["not ended"] += 1
            self.problem("job did not end", rpc, f"job {job.id} not ended after "
                         f"{timeout:g} s", shown)
            with contextlib.suppress(Exception):
                self.me.cancel_job(job.id)
            end = self.wait_job(self.me, job.id, 120)
            self.state.jobs[job.id] = end_of(end) if end else "RUNNING"
            return
        e = end_of(end)
        self.state.jobs[job.id] = e
        stats["jobs"][e] += 1
        if dataset is not None:
            self.dataset_ends[dataset.kind][e] += 1
            self.dataset_jobs.append({
                "dataset": dataset.kind, "rpc": rpc, "end": e,
                "fields": describe(req.fields) if req.HasField("fields") else "-",
                "message": end.error_message[:160]})
        allowed = set(jexp.ends if jexp else ()) | ({"CANCELLED"} if cancelled else set())
        code = e.partition(":")[2]
        if code in oracle.NEVER or code == "UNAVAILABLE":
            self.problem(f"job {e}", rpc, f"{end.error_message[:300]}", shown,
                         allowed=sorted(allowed))
        elif e not in allowed:
            self.problem("job end not allowed", rpc, f"{e}: {end.error_message[:300]}; "
                         f"allowed {sorted(allowed)} ({jexp.why if jexp else '-'})", shown)
        prefix = f"tenants/{TENANT}/indexes/{req.index}/"
        if e.startswith("FAILED"):
            written = sorted(k for k in self.keys() - before if k.startswith(prefix)
                             and ("/shards/" in k or "/manifest-" in k))
            if written:
                stats["failed_job_objects"] = stats.get("failed_job_objects", 0) + len(written)
                self.problem("failed job wrote objects", rpc, f"{e}: {written[:5]}", shown)
        self.track_ids(rpc, req, e, dataset)

    def track_ids(self, rpc: str, req: Any, end: str, dataset: Dataset | None) -> None:
        """Live ids of an index, while every dataset it holds is known."""
        name = req.index
        if rpc == "CompactIndex":
            return  # the same live ids
        if end != "SUCCEEDED":
            if rpc == "CreateIndex":
                self.known_ids.pop(name, None)
            return
        good = req.dataset_uri == f"s3://{BUCKET}/tenants/{TENANT}/data/good.jsonl"
        ids = {r["id"] for r in GOOD_ROWS} if good else (
            set(dataset.ids) if dataset is not None and dataset.ids is not None else None)
        plain = not req.HasField("fields") or oracle.is_default_fields(oracle.field_map(req.fields))
        if rpc == "CreateIndex":
            self.known_ids[name] = ids if plain else None
        elif rpc == "AppendToIndex":
            have = self.known_ids.get(name)
            self.known_ids[name] = have | ids if have is not None and ids is not None \
                and plain else None

    # ------------------------------------------------------------------ the loop

    def example(self, rpc: str, after: Any) -> Any:
        def one(data: Any) -> None:
            self.step(rpc, data)
            after()

        return one

    def fuzz(self) -> None:
        """The RPCs in turn, a batch of ``--batch`` requests each, until each had
        ``per_rpc``.  One Hypothesis run per batch, its RPC fixed: a strategy's shape may
        depend on what was drawn before in the example, never on the run's state (nor may
        an example stop early: Hypothesis replays choices and checks they lead to the same
        draws)."""
        counter = [0]
        total = self.opts.per_rpc * len(self.opts.rpcs)

        def after_each() -> None:
            counter[0] += 1
            i = counter[0]
            if i % self.opts.control_every == 0:
                self.run_control(i // self.opts.control_every)
            if i % 50 == 0:
                self.check_processes()
            if i % 100 == 0:
                bad = sum(s["internal"] + s["not_allowed"] + s["objects_written"]
                          + s["redis_written"] for s in self.per_rpc.values())
                log(f"{i}/{total} requests, {len(self.problems)} problem(s) ({bad} answers), "
                    f"{sum(sum(c.values()) for c in self.controls.values())} controls")

        def sent(rpc: str) -> int:
            return self.per_rpc[rpc]["scheduled"]

        rounds = 0
        while any(sent(r) < self.opts.per_rpc for r in self.opts.rpcs):
            for k, rpc in enumerate(self.opts.rpcs):
                target = min(sent(rpc) + self.opts.batch, self.opts.per_rpc)
                for attempt in range(5):  # examples Hypothesis abandons send nothing
                    if sent(rpc) >= target:
                        break
                    test = seed(self.opts.seed * 1000 + rounds * 100 + k + 10_000 * attempt)(
                        settings(max_examples=target - sent(rpc), database=None,
                                 deadline=None, phases=[Phase.generate], print_blob=False,
                                 suppress_health_check=list(HealthCheck))(
                            given(st.data())(self.example(rpc, after_each))))
                    test()
                if sent(rpc) < target:
                    raise RuntimeError(f"{rpc}: Hypothesis generated {sent(rpc)} of "
                                       f"{target} requests")
            rounds += 1
        self.check_processes()


# ------------------------------------------------------------------------------ run & report


def build_model(folder: Path) -> Path:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    conftest = importlib.import_module("conftest")
    return conftest.save_tiny_model("llama", folder)


def stamp(opts: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    runstamp = importlib.import_module("runstamp")  # tests/runstamp.py
    return {"code": runstamp.code_label(opts.code_label), "command": opts.command,
            **runstamp.machine(),
            "mode": "quick" if opts.quick else "full", "seed": opts.seed,
            "per_rpc": opts.per_rpc, "rpcs": opts.rpcs, "settings": env,
            "mix": {"wire_percent": 0 if opts.no_wire else WIRE_PERCENT,
                    "unknown_fields_percent": UNKNOWN_PERCENT,
                    "dataset_percent": DATASET_PERCENT, "cancel_percent": CANCEL_PERCENT,
                    "wild_percent": WILD_PERCENT,
                    "bad_token_percent": 7, "control_every": opts.control_every,
                    "at_cap_max_length": AT_CAP_MAX_LENGTH, "job_timeout_s": opts.job_timeout},
            "model": "tiny random Llama (conftest.save_tiny_model), byte tokenizer, "
                     "one worker of concurrency 1"}


def log_exceptions(stack: Stack) -> dict[str, dict[str, int]]:
    """Per service log: the exception lines that end its tracebacks, counted."""
    out: dict[str, dict[str, int]] = {}
    for p in stack.procs:
        try:
            lines = Path(p.log).read_text(errors="replace").splitlines()
        except OSError:
            continue
        found: Counter = Counter()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                    j += 1
                if j < len(lines):
                    found[lines[j][:160]] += 1
        if found:
            out[p.name] = dict(found.most_common(20))
    return out


def run(opts: argparse.Namespace) -> dict[str, Any]:
    env = {"RISE_STORAGE_RETRY_BUDGET_SECONDS": f"{opts.storage_budget:g}"}
    report: dict[str, Any] = {"header": stamp(opts, env)}
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="rise-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    scrub_paths = [str(work.resolve()), str(REPO), str(Path.home())]
    t_start = time.monotonic()
    stack = None
    fz: Fuzz | None = None
    ok = False
    try:
        model = build_model(work / "model")
        tokens = {TENANT: "fuzz-" + os.urandom(8).hex(), CTL: "ctl-" + os.urandom(8).hex()}
        stack = Stack.up(work / "stack", pools={POOL: str(model)}, tokens=tokens,
                         gateway_port="auto", scorer_port="auto", metrics_port="auto",
                         die_with_parent=True, env=env)
        log(f"stack up in {stack.start_seconds.get('total')} s")
        fz = Fuzz(opts, stack, tokens)
        fz.setup()
        log(f"set up; {len(opts.rpcs)} RPCs x {opts.per_rpc} requests")
        t_fuzz = time.monotonic()
        fz.fuzz()
        report["header"]["fuzz_s"] = round(time.monotonic() - t_fuzz, 1)
        ok = True
    except BaseException as e:
        report["header"]["aborted"] = f"{type(e).__name__}: {e}"
        log(f"aborted: {type(e).__name__}: {e}")
        raise
    finally:
        if fz is not None:
            report.update(collect(fz))
            fz.wire.close()
            fz.me.close()
            fz.ctl.close()
            fz.redis.close()
        if stack is not None:
            report["log_exceptions"] = log_exceptions(stack)
            stack.down()
        report["header"]["wall_s"] = round(time.monotonic() - t_start, 1)
        report = scrub(report, scrub_paths)
        report["verdict"] = verdict(report)
        if fz is not None and (fz.n or ok):
            write(report, Path(opts.out))
        if opts.work is None and not opts.keep and ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work folder kept: {work}")
    return report


def collect(fz: Fuzz) -> dict[str, Any]:
    per_rpc = {}
    for rpc, s in fz.per_rpc.items():
        if not s["requests"]:
            continue
        secs = s["seconds"] or [0.0]
        per_rpc[rpc] = {
            "requests": s["requests"], "ok": s["ok"], "refused": s["refused"],
            "codes": dict(s["codes"].most_common()), "not_allowed": s["not_allowed"],
            "internal": s["internal"], "objects_written_on_refusal": s["objects_written"],
            "redis_keys_written_on_refusal": s["redis_written"],
            "failed_job_objects": s.get("failed_job_objects", 0),
            "malformed_bytes_sent": s["wire"], "bad_token_sent": s["unauthenticated_sent"],
            "unknown_fields_sent": s["unknown_fields"], "jobs": dict(s["jobs"]),
            "median_ms": round(1000 * statistics.median(secs), 1),
            "max_ms": round(1000 * max(secs), 1)}
    return {
        "per_rpc": per_rpc,
        "classes": {k: dict(v) for k, v in sorted(fz.classes.items())},
        "dataset_ends": {k: dict(v) for k, v in sorted(fz.dataset_ends.items())},
        "dataset_jobs": fz.dataset_jobs,
        "malformed_bytes": {k: dict(v) for k, v in fz.wire_kinds.items()},
        "controls": {k: dict(v) for k, v in sorted(fz.controls.items())},
        "crashes": fz.crashes,
        "fixed_findings": {k: {"what": what, "regression_test": test}
                           for k, (what, test) in FIXED.items()},
        "known_findings": {k: {"what": what, "regression_test": test,
                               "sent": sum(n for (f, _), n in fz.known_sent.items() if f == k),
                               "made_harmless": sum(n for (f, _), n in fz.known_defused.items()
                                                    if f == k),
                               "problems": sum(p.get("known") == k for p in fz.problems)}
                           for k, (what, test) in KNOWN.items()},
        "problems": fz.problems,
        "totals": {
            "requests": sum(p["requests"] for p in per_rpc.values()),
            "internal": sum(p["internal"] for p in per_rpc.values()),
            "not_allowed": sum(p["not_allowed"] for p in per_rpc.values()),
            "objects_written_on_refusal": sum(p["objects_written_on_refusal"]
                                              for p in per_rpc.values()),
            "redis_keys_written_on_refusal": sum(p["redis_keys_written_on_refusal"]
                                                 for p in per_rpc.values()),
            "failed_job_objects": sum(p["failed_job_objects"] for p in per_rpc.values()),
            "jobs": sum(sum(p["jobs"].values()) for p in per_rpc.values()),
            "controls_passed": sum(c.get("passed", 0) for c in fz.controls.values()),
            "controls_failed": sum(c.get("failed", 0) for c in fz.controls.values()),
            "crashes": len(fz.crashes), "datasets_uploaded": fz.uploads},
    }


def scrub(obj: Any, paths: list[str]) -> Any:
    """Machine paths out of every string of the report."""
    if isinstance(obj, str):
        for p, rep in zip(paths, ("<work>", ".", "~"), strict=True):
            if p and p != "/":
                obj = obj.replace(p, rep)
        return obj
    if isinstance(obj, dict):
        return {k: scrub(v, paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v, paths) for v in obj]
    return obj


def problem_groups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Problems grouped by kind, RPC and the first words of their detail, with up to
    three example requests each."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for p in report.get("problems", []):
        head = p["detail"].split(":")[0][:80] if p["kind"] != "code not allowed" else \
            p["detail"].split(" (")[0] + " for " + ", ".join(p.get("classes") or ["well-formed"])
        key = (p["kind"], p["rpc"], head)
        g = groups.setdefault(key, {"kind": p["kind"], "rpc": p["rpc"], "what": head,
                                    "count": 0, "examples": [], "known": set()})
        if p.get("known"):
            g["known"].add(p["known"])
        g["count"] += 1
        if len(g["examples"]) < 3:
            g["examples"].append({"detail": p["detail"], "request": p["request"]})
    return sorted(groups.values(), key=lambda g: -g["count"])


CHECKS = [
    ("answer(s) INTERNAL or UNKNOWN", lambda k: k in oracle.NEVER),
    ("answer(s) with a code the table does not allow", lambda k: k == "code not allowed"),
    ("refused request(s) that wrote objects", lambda k: k == "objects written on refusal"),
    ("refused request(s) that wrote Redis keys",
     lambda k: k == "redis keys written on refusal"),
    ("failed job(s) that wrote shards or manifests", lambda k: k == "failed job wrote objects"),
    ("job(s) that ended as the table does not allow, or not at all",
     lambda k: k.startswith("job")),
    ("crash(es)", lambda k: k == "crash"),
    ("control request(s) that failed", lambda k: k == "control"),
    ("request-id replay(s) that answered another job", lambda k: k == "replay"),
]


def verdict(report: dict[str, Any]) -> list[str]:
    """The checks of the issue that failed (empty: all passed), each with how many of its
    failures are known findings."""
    out = []
    if report["header"].get("aborted"):
        out.append(f"run aborted: {report['header']['aborted']}")
    problems = report.get("problems", [])
    for label, match in CHECKS:
        hits = [p for p in problems if match(p["kind"])]
        if not hits:
            continue
        known = Counter(p["known"] for p in hits if p.get("known"))
        line = f"{len(hits)} {label}"
        if known:
            line += (" (" + ("all" if sum(known.values()) == len(hits) else
                             f"{sum(known.values())}") + " from known findings "
                     + ", ".join(f"{k} {n}" for k, n in sorted(known.items())) + ")")
        out.append(line)
    for rpc in report["header"]["rpcs"]:
        n = report.get("per_rpc", {}).get(rpc, {}).get("requests", 0)
        if n < report["header"]["per_rpc"]:
            out.append(f"{rpc}: {n} requests, fewer than {report['header']['per_rpc']}")
    return out


def markdown(report: dict[str, Any]) -> str:
    h, t = report["header"], report.get("totals", {})
    again = ("`make fuzz` (`python -m tests.fuzz.run`)" if h["mode"] == "full"
             else f"`python -m tests.fuzz.run --quick --seed {h['seed']}`")
    least = min((p["requests"] for p in report.get("per_rpc", {}).values()), default=0)
    title = f"{h['mode']} run"
    if least < h["per_rpc"]:
        title = (f"PARTIAL {h['mode']} run: at least {least} of the {h['per_rpc']} requests "
                 "per RPC asked")
    lines = [
        f"# Fuzz: bad input against every RPC ({title})", "",
        f"Code: {h['code']}; {h['date']}; {h['cpu']}, {h['cpu_count']} cores; python "
        f"{h['python']}; load average at start {h['loadavg_start']}; seed {h['seed']}; "
        f"{h['per_rpc']} requests per RPC; fuzzing {h.get('fuzz_s', '?')} s, whole run "
        f"{h.get('wall_s')} s.", "",
        f"Command: `{h.get('command', '?')}`.", "",
        *([f"Merged from {len(h['runs'])} runs of this code at once, each on its own stack "
           f"with its own seed, all stopped by SIGINT at one moment: when together they "
           f"passed {h['per_rpc']} requests per RPC, or when the time set for them ran out "
           f"(then the title says PARTIAL) (`{h.get('merged_by', '')}`); per run:", ""]
          + [f"- seed {r['seed']}: {r['requests']} requests, started {r['date']}, load "
             f"average at start {r['loadavg_start']}, fuzzing {r.get('fuzz_s') or '-'} s, "
             f"whole run {r['wall_s']} s, {r.get('aborted') or 'ended'}; `{r['command']}`"
             for r in h["runs"]] + [""] if h.get("runs") else []),
        f"Reproduce: {again}; the harness is `tests/fuzz/` (strategies from the request "
        "descriptors, the oracle from `docs/bad-input.md`).", "",
        f"Stack: {h['model']}; tenants `fuzz` (fuzzed) and `ctl` (controls).  Services' "
        "settings: " + ", ".join(f"`{k}={v}`" for k, v in h["settings"].items()) + " (so a "
        "job that keeps failing on the store ends within seconds); everything else default.",
        "",
        "Mix: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in h["mix"].items()) + ".",
        "",
        "## Figures", "",
        f"- requests: {t.get('requests', 0)}; INTERNAL or UNKNOWN: **{t.get('internal', 0)}**; "
        f"codes the table does not allow: **{t.get('not_allowed', 0)}**"
        + (f" (and {t['oracle_errata']} the oracle of the run judged wrongly: see *Oracle "
           "errata*)" if t.get("oracle_errata") else ""),
        f"- objects written by refused requests: **{t.get('objects_written_on_refusal', 0)}** "
        f"in S3, **{t.get('redis_keys_written_on_refusal', 0)}** keys in Redis; "
        f"shards or manifests written by failed jobs: **{t.get('failed_job_objects', 0)}**",
        f"- crashes: **{t.get('crashes', 0)}**; jobs followed to their end: {t.get('jobs', 0)}; "
        f"generated datasets uploaded: {t.get('datasets_uploaded', 0)}",
        f"- control requests: {t.get('controls_passed', 0)} passed, "
        f"**{t.get('controls_failed', 0)}** failed", "",
        "| RPC | requests | OK | refused: codes | not allowed | INTERNAL | objects / Redis keys "
        "on refusal | jobs: ends | median / max ms |",
        "|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for rpc, p in report.get("per_rpc", {}).items():
        codes = ", ".join(f"{c} {n}" for c, n in p["codes"].items() if c != OK)
        jobs = ", ".join(f"{k} {v}" for k, v in sorted(p["jobs"].items())) or "-"
        lines.append(f"| {rpc} | {p['requests']} | {p['ok']} | {codes or '-'} | "
                     f"{p['not_allowed']} | {p['internal']} | {p['objects_written_on_refusal']} / "
                     f"{p['redis_keys_written_on_refusal']} "
                     f"| {jobs} | {p['median_ms']:g} / {p['max_ms']:g} |")
    lines += ["", "Requests with a bad token sent, unknown fields appended, malformed bytes: "
              + "; ".join(f"{rpc} {p['bad_token_sent']}/{p['unknown_fields_sent']}/"
                          f"{p['malformed_bytes_sent']}"
                          for rpc, p in report.get("per_rpc", {}).items()) + ".", ""]
    lines += ["## Controls", "", "| control | passed | failed |", "|---|---:|---:|"]
    for k, v in report.get("controls", {}).items():
        lines.append(f"| {k} | {v.get('passed', 0)} | {v.get('failed', 0)} |")
    lines += ["", "## Generated datasets: job ends", "", "| dataset | ends |", "|---|---|"]
    for k, v in report.get("dataset_ends", {}).items():
        lines.append(f"| {k} | {', '.join(f'{e} {n}' for e, n in sorted(v.items()))} |")
    lines += ["", "## Input classes and their answers", "",
              "A request can fall in several classes (each counted); *(well-formed)* is a "
              "request in none.", "", "| RPC: class | requests | answers |", "|---|---:|---|"]
    for k, v in report.get("classes", {}).items():
        n = v.get("n", 0)
        ans = ", ".join(f"{c} {x}" for c, x in sorted(v.items(), key=lambda kv: -kv[1])
                        if c != "n")
        lines.append(f"| {k} | {n} | {ans} |")
    if report.get("log_exceptions"):
        lines += ["", "## Tracebacks in the services' logs", "",
                  "| service | exception | count |", "|---|---|---:|"]
        for svc, found in report["log_exceptions"].items():
            for exc, n in found.items():
                lines.append(f"| {svc} | `{exc.replace('|', '/')}` | {n} |")
    if report.get("fixed_findings"):
        lines += ["", "## Findings of this harness, fixed", "",
                  "Bugs earlier runs of this fuzz found, each fixed in services/rise with a "
                  "regression test; their requests are sent like any other.", "",
                  "| id | what it was | regression test |", "|---|---|---|"]
        for k, f in report["fixed_findings"].items():
            lines.append(f"| {k} | {f['what']} | `{f['regression_test']}` |")
    if report.get("known_findings"):
        lines += ["", "## Known findings", "",
                  "Bugs this fuzz found, each with a regression test (xfail strict until "
                  "fixed).  A run shows each at most `--known-max` times per RPC; its later "
                  "requests are made harmless (the good dataset or selection, a well-formed "
                  "request instead of malformed bytes), so they neither flood the report nor "
                  "hold the run up.  *sent*: requests of the finding sent (some are refused "
                  "for another reason first).", "",
                  "| id | what | regression test | sent | made harmless | problems |",
                  "|---|---|---|---:|---:|---:|"]
        for k, f in report["known_findings"].items():
            lines.append(f"| {k} | {f['what']} | `{f['regression_test']}` | {f['sent']} | "
                         f"{f['made_harmless']} | {f['problems']} |")
    if report.get("errata") and any(e["count"] for e in report["errata"].values()):
        lines += ["", "## Oracle errata", "",
                  "Answers the run's oracle counted as wrong codes that were right: each "
                  "erratum is a rule the oracle lacked, fixed in `tests/fuzz/oracle.py` since "
                  "(with a test in `test_fuzz_strategies.py`), and matched here by the "
                  "answer's message and the request (`run.ERRATA`).  Their requests are in "
                  "*Problems* below, marked.", "",
                  "| id | RPC | answers | what the oracle got wrong |", "|---|---|---:|---|"]
        for eid, e in report["errata"].items():
            lines.append(f"| {eid} | {e['rpc']} | {e['count']} | {e['why']} |")
    groups = problem_groups(report)
    if groups:
        lines += ["", "## Problems", ""]
        for g in groups:
            known = f" (known: {', '.join(sorted(g['known']))})" if g["known"] else ""
            lines.append(f"- **{g['kind']}**, {g['rpc']}, {g['count']}x{known}: {g['what']}")
            for ex in g["examples"]:
                lines.append(f"  - `{ex['request'][:400]}` -> {ex['detail'][:300]}")
    lines += ["", "## Cases of the issue kept as regression tests", "",
              "Every case the issue reproduced (\"Tried as an attacker would\", items 1-4), "
              "with the tests that keep it.", "",
              "| item | case | tests |", "|---|---|---|"]
    for item, case, tests in REGRESSIONS:
        lines.append(f"| {item} | {case} | " + "<br>".join(f"`{t}`" for t in tests) + " |")
    lines += ["", "## Verdict", ""]
    lines += ([f"- {v}" for v in report["verdict"]] if report["verdict"]
              else ["Every check passed."])
    return "\n".join(lines).replace("\x00", "\\x00") + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "fuzz.md").write_text(markdown(report))
    log(f"report: {out / 'fuzz.md'}")


ERRATA = [
    ("E1", "Attribute", r"^INVALID_ARGUMENT \(seed must be in \[0, 2\^63\)", r"generate=\{",
     "the oracle lacked Generation.seed's bound: below 2^63, as SketchConfig's seed (the "
     "proto does not state it; the gateway refuses it at the door)"),
    ("E2", "Attribute", r"^INVALID_ARGUMENT \((duplicate id|record id|id |record \d|text |"
     r"response |.*over the limit of)", r"generate=\{",
     "with generate, the oracle dropped a record's fault (a duplicate id, say) when the "
     "index was absent or another tenant's, so it allowed only NOT_FOUND; the door may find "
     "the record's fault first"),
]
"""Answers an earlier oracle judged wrongly, each fixed in the oracle since (with a row of
test_fuzz_strategies): (id, RPC, the answer's detail, the request, why).  ``merge`` moves a
"code not allowed" problem that matches one to "oracle erratum": listed in the report with
its count, not in the verdict."""


def apply_errata(report: dict[str, Any]) -> None:
    import re

    for p in report.get("problems", []):
        if p["kind"] != "code not allowed":
            continue
        for eid, rpc, detail, request, _why in ERRATA:
            if p["rpc"] == rpc and re.search(detail, p["detail"]) \
                    and re.search(request, p["request"]):
                p["kind"], p["erratum"] = "oracle erratum", eid
                stats = report["per_rpc"][rpc]
                stats["not_allowed"] -= 1
                stats["oracle_errata"] = stats.get("oracle_errata", 0) + 1
                report["totals"]["not_allowed"] -= 1
                report["totals"]["oracle_errata"] = report["totals"].get("oracle_errata", 0) + 1
                break


def merge(reports: list[dict[str, Any]], per_rpc: int) -> dict[str, Any]:
    """One report of several runs of the same code (run at once on separate stacks, say,
    each with its own seed, each stopped by SIGINT once together they sent ``per_rpc``
    requests per RPC): counts added, problems and crashes joined, the verdict taken again
    over the sums (a stopped run's own "aborted" and "fewer than" lines are not the
    merged run's; each run's stop is kept in ``header.runs``)."""

    def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            if isinstance(v, bool) or k not in out:
                out[k] = v
            elif isinstance(v, int | float) and k not in ("median_ms", "max_ms"):
                out[k] = out[k] + v
            elif k in ("median_ms", "max_ms"):
                out[k] = max(out[k], v)
            elif isinstance(v, dict):
                out[k] = add(out[k], v)
            elif isinstance(v, list):
                out[k] = out[k] + v
        return out

    first = reports[0]
    header = dict(first["header"])
    header.pop("aborted", None)
    header.update(
        mode="full", per_rpc=per_rpc, seed=[r["header"]["seed"] for r in reports],
        fuzz_s=max(r["header"].get("fuzz_s") or r["header"].get("wall_s", 0) for r in reports),
        wall_s=max(r["header"].get("wall_s", 0) for r in reports),
        runs=[{k: r["header"].get(k) for k in ("seed", "command", "date", "wall_s",
                                                 "fuzz_s", "aborted", "loadavg_start")}
              | {"requests": r.get("totals", {}).get("requests", 0)} for r in reports])
    merged: dict[str, Any] = {"header": header}
    for key in ("per_rpc", "classes", "dataset_ends", "malformed_bytes", "controls",
                "known_findings", "totals", "log_exceptions"):
        acc: dict[str, Any] = {}
        for r in reports:
            acc = add(acc, r.get(key, {}))
        merged[key] = acc
    merged["per_rpc"] = {rpc: merged["per_rpc"][rpc] for rpc in header["rpcs"]
                         if rpc in merged["per_rpc"]}
    for key in ("dataset_jobs", "crashes", "problems"):
        merged[key] = [x for r in reports for x in r.get(key, [])]
    merged["fixed_findings"] = first.get("fixed_findings", {})
    apply_errata(merged)
    merged["errata"] = {eid: {"rpc": rpc, "why": why, "count": sum(
        p.get("erratum") == eid for p in merged["problems"])}
        for eid, rpc, _d, _r, why in ERRATA}
    merged["verdict"] = verdict(merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--merge"]:  # --merge A.json B.json ... --out DIR [--per-rpc N]
        ap = argparse.ArgumentParser(prog="python -m tests.fuzz.run --merge")
        ap.add_argument("reports", nargs="+")
        ap.add_argument("--out", required=True)
        ap.add_argument("--per-rpc", type=int, default=1000)
        m = ap.parse_args(args[1:])
        report = merge([json.loads(Path(p).read_text()) for p in m.reports], m.per_rpc)
        report["header"]["merged_by"] = "python -m tests.fuzz.run " + " ".join(args)
        write(report, Path(m.out))
    else:
        report = run(parse_args(argv))
    print(markdown(report))
    return 1 if report["verdict"] else 0


if __name__ == "__main__":
    sys.exit(main())
