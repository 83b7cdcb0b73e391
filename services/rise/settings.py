"""Typed settings of the services, from ``RISE_*`` environment variables.

Unknown keys are rejected so a typo in a deployment fails loudly at start-up.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from rise.errors import InvalidInput


class Pool(BaseModel):
    """A GPU worker pool: one model, one Celery queue, the GPUs each worker owns."""

    model_config = ConfigDict(extra="forbid")

    model: str
    """Model folder or .gguf file, readable by the pool's workers (and its config.json by
    the gateway, which plans memory from it without loading weights)."""
    queue: str = ""
    """Celery queue for shard tasks; empty means ``rise.pool.<name>``."""
    gpus: int = 0
    """GPUs per worker process; 0 runs on the CPU."""
    gpu_memory: str = "80GiB"
    """Memory budget per GPU, e.g. 80GiB."""
    dtype: str = "bfloat16"
    """Weights' dtype on GPUs (float32 on the CPU)."""
    batch_size: int = 8
    """Records per forward pass."""
    adapter: str = ""
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) merged into the
    model, from the same kinds of source as the model (``rise.modelsource``: an S3 prefix, a
    mounted path, a hub id); empty: the base model.  Indexes built by the pool record the
    adapter's hash, and queries must come with the same one."""


class Settings(BaseSettings):
    """Every service reads the same settings; each uses what it needs."""

    model_config = SettingsConfigDict(env_prefix="RISE_", extra="forbid")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Celery broker, result backend and job store; ``rediss://`` speaks TLS, checking the
    server's certificate (against redis_ca_file, else the system's roots)."""
    redis_ca_file: str = ""
    """PEM CA bundle that signs the Redis server's certificate (``rediss://`` only; a
    mounted Secret); empty: the system's roots."""
    redis_cert_file: str = ""
    """PEM client certificate for a Redis that asks for one (``rediss://``, mutual TLS)."""
    redis_key_file: str = ""
    """PEM private key of redis_cert_file."""
    s3_endpoint: str = "127.0.0.1:8333"
    """S3/MinIO endpoint host:port."""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    """Use TLS to reach the S3 endpoint."""
    s3_region: str | None = None
    s3_bucket: str = "rise"
    """Bucket of this deployment; tenants and indexes are prefixes inside it."""
    gateway_host: str = "0.0.0.0"
    gateway_port: int = 50051
    scorer_host: str = "0.0.0.0"
    scorer_port: int = 50052
    scorer_addresses: str = "127.0.0.1:50052"
    """Comma-separated host:port of every scorer replica, for the gateway."""
    scorer_replica: int = 0
    """This scorer's replica index (0-based) and the replica count."""
    scorer_replicas: int = 1
    scorer_cache_bytes: int = 4 * 1024**3
    """Shard bytes a scorer keeps in its node-local cache folder (LRU over files; the
    shards are memory-mapped from there, so memory holds what the page cache keeps)."""
    scorer_cache_dir: str = ""
    """Node-local folder of the scorer's shard files (an emptyDir); empty: a private
    temporary folder, removed when the scorer stops.  Emptied at start."""
    scorer_threads: int = 4
    """Shards scored in parallel by one scorer."""
    metrics_port: int = 9464
    """Port of /metrics for this process (worker processes share one in multiprocess mode)."""
    metrics_host: str = "127.0.0.1"
    """Address /metrics binds: loopback unless a scraper must reach it (the chart binds the
    pod IP, ``status.podIP``); never needed on every interface."""
    auth_tokens_file: str = ""
    """JSON file mapping bearer token -> tenant. Empty: every call is UNAUTHENTICATED."""
    auth_mode: Literal["tokens", "off"] = "tokens"
    """How the gateway finds a caller's tenant: ``tokens`` (bearer token -> tenant, from
    auth_tokens_file) or ``off`` (no credentials: every caller is default_tenant; for a
    private network only)."""
    default_tenant: str = "default"
    """The one tenant of every caller when auth_mode is ``off`` (its data lives under
    tenants/<default_tenant>/ like any tenant's)."""
    internal_auth: Literal["on", "off"] = "on"
    """``on``: the gateway signs each scorer call (HMAC-SHA256 with the internal secret over
    method, tenant, index prefix and expiry) and the scorer refuses any other call; the
    gateway and the scorer refuse to start without a secret.  ``off`` (RISE_INTERNAL_AUTH=off):
    the scorer answers anyone for any index; only where nothing else can reach it."""
    internal_secret: SecretStr = SecretStr("")
    """Key of the gateway's signatures on scorer calls (at least 32 characters), shared by
    the gateway and every scorer; or internal_secret_file."""
    internal_secret_file: str = ""
    """File holding the internal secret (a mounted Secret); read at start-up."""
    tls_cert_file: str = ""
    """PEM certificate chain the gateway serves TLS with (with tls_key_file); empty: the
    gateway serves plaintext gRPC."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    health_port: int = 0
    """A plaintext port of the gateway serving only grpc.health.v1, for probes of a TLS
    gateway (Kubernetes' gRPC probes cannot speak TLS); 0: none."""
    pools: dict[str, Pool] = Field(default_factory=dict)
    """Worker pools by name (JSON in RISE_POOLS)."""
    worker_pool: str = ""
    """The pool this worker process serves (workers only)."""
    query_queue: str = "rise.queries"
    """High-priority queue for query sketching, consumed by every worker of a pool as
    ``<query_queue>.<pool>``."""
    control_queue: str = "rise.control"
    """Queue of model-free tasks (planning checks, compaction)."""
    max_message_bytes: int = 64 * 1024**2
    """Largest gRPC message accepted or sent."""
    max_queries_per_call: int = 256
    """Queries (or targets) per Attribute/Value call."""
    query_timeout_seconds: float = 120.0
    """How long the gateway waits for query sketches from a worker."""
    gateway_threads: int = Field(default=128, ge=4)
    """Threads of the gateway's gRPC server.  Every call in progress holds one (a WatchJob
    stream for as long as it is open), so admission control (``rise.gateway.limits``)
    keeps ``gateway_reserved_threads`` of them out of reach of admitted calls."""
    gateway_reserved_threads: int = Field(default=8, ge=1)
    """Threads no admitted call may hold: the health check, which is never limited, and
    the refusals of calls over a limit always find one.  Unary calls may hold at most
    ``gateway_threads - gateway_reserved_threads - max_streams`` at once."""
    max_streams: int = Field(default=32, ge=1)
    """Server streams (WatchJob, health Watch, reflection) open at once over all tenants;
    one more is UNAVAILABLE (retried by clients)."""
    max_streams_per_tenant: int = Field(default=8, ge=1)
    """Streams one tenant may hold open; one more is RESOURCE_EXHAUSTED.  Unauthenticated
    streams (health Watch, reflection) share one such allowance."""
    max_calls_per_tenant: int = Field(default=64, ge=1)
    """Unary calls of one tenant in progress at once; one more is RESOURCE_EXHAUSTED."""
    max_active_jobs_per_tenant: int = Field(default=16, ge=1)
    """Jobs of one tenant not yet ended (queued or running); CreateIndex, AppendToIndex and
    CompactIndex beyond it are RESOURCE_EXHAUSTED."""
    task_time_limit_seconds: int = 3600
    """Hard limit of one shard task; the broker's visibility timeout is set above it."""
    dataset_roots: list[str] = Field(default_factory=list)
    """Local folders (shared volumes) the workers may read datasets from; a path outside
    them is refused.  Empty: datasets must be s3:// URIs."""
    dataset_buckets: list[str] = Field(default_factory=list)
    """Buckets besides the deployment's that datasets may come from (read with the
    deployment's credentials).  In the deployment's bucket a tenant reads only its own
    area, tenants/<tenant>/."""
    index_lock_seconds: int = 7 * 86400
    """Lifetime of an index's writer lock; jobs release it when they end, the expiry only
    frees an index whose worker vanished for good."""
    cache_dir: str = ""
    """Local cache of datasets and converted models; empty: ~/.cache/rise (see
    ``rise.constants.cache_dir``)."""
    controller_interval_seconds: float = Field(default=5.0, gt=0)
    """How often the job controller (``python -m rise.controller``) looks at every job."""
    controller_lease_seconds: float = Field(default=30.0, gt=0)
    """The controller's leadership lease in Redis: a second controller takes over this long
    after the first stops renewing it."""
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    """How often a running ingest task renews its heartbeat (which lives 3x as long)."""
    shard_stall_seconds: float = Field(default=60.0, gt=0)
    """A shard task enqueued this long ago that is neither waiting in its queue nor
    heartbeating is lost: the controller enqueues it again.  Long shards are unaffected
    (they heartbeat); the broker's visibility timeout stays above the task time limit."""
    shard_attempts: int = Field(default=5, ge=1)
    """Times the controller re-enqueues one lost shard (or a lost prepare) before the job
    fails (UNAVAILABLE)."""
    job_deadline_seconds: float = Field(default=7 * 86400, gt=0)
    """A job not ended this long after it was submitted fails with DEADLINE_EXCEEDED."""
    storage_retry_budget_seconds: float = Field(default=300.0, ge=0)
    """How long an ingest task waits out an unreachable store or broker (exponential
    backoff with jitter) before its job fails with UNAVAILABLE."""
    sweep_grace_seconds: float = Field(default=3600.0, ge=0)
    """Objects younger than this are never swept: the sweeper deletes only objects that no
    committed manifest, registry record or live job owns and that are older."""
    sweep_interval_seconds: float = Field(default=300.0, gt=0)
    """How often the controller sweeps the bucket for orphan objects."""
    job_ttl_seconds: int = Field(default=7 * 86400, ge=60)
    """A job's hash in Redis (state, counters) expires this long after the job ended, once
    the controller wrote the end to the job's record in the store
    (``jobs/<tenant>/<id>.json``, ``rise.jobrecords``); after that ListJobs no longer lists
    it and GetJob answers from the record.  Read by the controller."""

    def tokens(self) -> dict[str, str]:
        """Bearer token -> tenant, from auth_tokens_file."""
        if not self.auth_tokens_file:
            return {}
        try:
            data = json.loads(Path(self.auth_tokens_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidInput(f"cannot read auth tokens file {self.auth_tokens_file}: {e}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()
        ):
            raise InvalidInput("auth tokens file must map token strings to tenant strings")
        return data

    def redis_tls(self) -> dict[str, Any]:
        """TLS options of every Redis connection (redis-py's ``ssl_*`` keywords, which
        kombu's ``broker_use_ssl`` and Celery's ``redis_backend_use_ssl`` take too); empty
        for ``redis://``.  The certificate is always checked: Celery's result backend
        refuses a ``rediss://`` URL that does not say how."""
        if not self.redis_url.startswith("rediss://"):
            return {}
        opts: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        for key, path in (("ssl_ca_certs", self.redis_ca_file),
                          ("ssl_certfile", self.redis_cert_file),
                          ("ssl_keyfile", self.redis_key_file)):
            if path:
                opts[key] = path
        return opts

    def pool(self, name: str) -> Pool:
        if name not in self.pools:
            raise InvalidInput(f"unknown pool {name!r}; pools: {', '.join(sorted(self.pools)) or 'none'}")
        return self.pools[name]

    def queue_of(self, name: str) -> str:
        return self.pool(name).queue or f"rise.pool.{name}"
