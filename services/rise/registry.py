"""The index registry: which tenant owns which index name, on which worker pool.

The object store is the source of truth: each index keeps its record as ``registry.json``
beside its manifests (``tenants/<tenant>/indexes/<name>/registry.json``), written when the
name is claimed and deleted last when the index is dropped.  Redis holds a copy for fast
look-ups; a name missing there is looked up in the store and copied back, and after Redis
lost its data (``rebuilt`` is unset) the whole copy is rebuilt from the store.  So losing
Redis loses no index: it holds jobs, locks and queues only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from rise.errors import AlreadyExists, Corrupt, NotFound
from rise.index import manifest_generations
from rise.jobs import JobStore, index_prefix
from rise.store import Store

RECORD_KEY = "registry.json"
"""Key of the registry record inside an index's prefix."""
TENANTS_PREFIX = "tenants/"


class IndexRecord(BaseModel):
    """What the registry knows of an index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    name: str
    pool: str
    model: str = ""
    """The pool's model source when the index was created."""
    created_at: float
    job: str = ""
    """The job that created it: a failed create frees the name only for its own job."""

    def entry(self) -> dict[str, Any]:
        """The Redis copy (the gateway reads ``pool`` from it)."""
        return {"pool": self.pool, "model": self.model, "created_at": self.created_at,
                "job": self.job}

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1).encode()


def parse_record(data: bytes, where: str) -> IndexRecord:
    try:
        return IndexRecord.model_validate_json(data)
    except ValidationError as e:
        raise Corrupt(f"{where} is not a valid registry record: {e.errors()[0]['msg']}") from None


class Registry:
    """Registry records in the store (truth) with their copy in Redis.

    ``store`` maps a prefix to the store of that prefix of the deployment's bucket.
    """

    def __init__(self, jobs: JobStore, store: Callable[[str], Store]) -> None:
        self.jobs = jobs
        self.store = store

    def claim(self, tenant: str, name: str, pool: str, model: str = "") -> IndexRecord:
        """Claim a name: AlreadyExists if the tenant has it (in Redis or in the store)."""
        record = IndexRecord(tenant=tenant, name=name, pool=pool, model=model,
                             created_at=time.time())
        if not self.jobs.register_index(tenant, name, record.entry()):
            raise AlreadyExists(f"index {name!r} already exists")
        try:
            self.store(index_prefix(tenant, name)).put(RECORD_KEY, record.to_json(),
                                                       create_only=True)
        except AlreadyExists:
            # Redis had lost the name: the store still has it.  Restore the copy.
            self.jobs.drop_index(tenant, name)
            self._restore(tenant, name)
            raise AlreadyExists(f"index {name!r} already exists") from None
        except BaseException:
            self.jobs.drop_index(tenant, name)
            raise
        return record

    def set_job(self, tenant: str, name: str, job_id: str) -> None:
        """Remember the job that creates the index (in the Redis copy; the store's record is
        create-only, and a failed create removes it anyway)."""
        entry = self.jobs.index_entry(tenant, name)
        entry["job"] = job_id
        self.jobs.set_index_entry(tenant, name, entry)

    def lookup(self, tenant: str, name: str) -> dict[str, Any]:
        """The Redis entry of a name, restored from the store when Redis lost it."""
        try:
            return self.jobs.index_entry(tenant, name)
        except NotFound:
            if self.jobs.registry_complete():
                raise  # the copy is whole: a miss is a miss
        return self._restore(tenant, name)

    def _restore(self, tenant: str, name: str) -> dict[str, Any]:
        """Copy a name's record from the store back into Redis; NotFound without one."""
        store = self.store(index_prefix(tenant, name))
        try:
            record = parse_record(store.get(RECORD_KEY), f"{name}/{RECORD_KEY}")
        except NotFound:
            raise NotFound(f"index {name!r} not found") from None
        self.jobs.register_index(tenant, name, record.entry())
        return self.jobs.index_entry(tenant, name)

    def names(self, tenant: str) -> list[str]:
        self.ensure_rebuilt()
        return self.jobs.index_names(tenant)

    def drop(self, tenant: str, name: str) -> None:
        """Forget a name: the store's record first (the truth), then the Redis copy."""
        store = self.store(index_prefix(tenant, name))
        store.delete(RECORD_KEY)
        self.jobs.drop_index(tenant, name)

    def records(self) -> list[IndexRecord]:
        """Every registry record in the store."""
        root = self.store("")
        out = []
        for key in root.list(TENANTS_PREFIX):
            if key.endswith("/" + RECORD_KEY):
                try:
                    out.append(parse_record(root.get(key), key))
                except (NotFound, Corrupt):
                    continue  # dropped meanwhile, or damaged: never invent an owner
        return out

    def ensure_rebuilt(self) -> int:
        """Copy every record of the store into Redis once after Redis lost its data (the
        marker key is gone); returns the names restored."""
        if self.jobs.registry_complete():
            return 0
        return self.rebuild()

    def rebuild(self) -> int:
        restored = 0
        for record in self.records():
            restored += self.jobs.register_index(record.tenant, record.name, record.entry())
        self.jobs.mark_registry_complete()
        return restored


def free_failed_create(registry: Registry, job: dict[str, Any]) -> bool:
    """A CREATE_INDEX job that failed before its first commit frees the name it claimed
    (objects it wrote are left to the sweeper).  True when the name was freed."""
    if job.get("kind") != "CREATE_INDEX":
        return False
    tenant, name = job["tenant"], job["index"]
    try:
        entry = registry.jobs.index_entry(tenant, name)
    except NotFound:
        return False
    if entry.get("job") != job["id"]:
        return False
    if manifest_generations(registry.store(index_prefix(tenant, name))):
        return False  # committed: the index exists, whatever happened after
    registry.drop(tenant, name)
    return True
