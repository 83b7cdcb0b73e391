"""What a chaos trial measures: the job followed to its end through the gateway, the index
bytes against an undisturbed reference run, the indexes listed, the objects in the bucket.

Every loop here is bounded by a deadline and every call by a timeout; all traffic goes to
the stack's loopback endpoints.

Byte identity: the committed manifest's shard list (key, sha256, record count, bytes)
equals the reference index's, and every shard object's bytes hash to the reference's.
Manifest fields that are not shards (ingest entries, versions) are compared too, but only
reported (``manifest_equal``): a fix may add per-job fields to a manifest.

Manifests are resolved by ``rise.index.read_manifest`` (a format-3 manifest is a list of
shard lists and delete files), so every format version is measured the same way.

Orphans: in each index folder ``tenants/<tenant>/indexes/<name>/`` the objects under
``shards/`` (and the id files, shard lists and delete files) that no manifest of that
folder uses (``rise.index.generation_keys``).  Manifests and the registry record
(``registry.json``) are never orphans of a live index; anything else is reported as
``unknown``.  In the folder of an index the harness deleted, every object left is an orphan.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any

from rise import errors
from rise.client import TERMINAL, state_name
from rise.constants import SHARD_DIR, parse_manifest_key
from rise.errors import RiseError
from rise.index import IDS_DIR, META_DIR, generation_keys, read_manifest
from rise.jobs import index_prefix
from rise.s3store import S3Store

try:  # the S3 registry record of an index (rise.registry); absent before that fix
    from rise.registry import RECORD_KEY as REGISTRY_KEY
except ImportError:
    REGISTRY_KEY = "registry.json"

BUCKET = "rise"
_INDEX_DIRS = (SHARD_DIR + "/", IDS_DIR + "/", META_DIR + "/")  # what a manifest owns
LIST_LIMIT = 100_000  # objects listed under one prefix at most
S3_RETRY_S = 30.0  # how long a read of the bucket is retried after an outage


def _retry(what: str, call, seconds: float = S3_RETRY_S):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - S3 just restarted: try again, bounded
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {type(e).__name__}: {e}") from None
            time.sleep(0.5)


def list_keys(s3, prefix: str) -> list[str]:
    def go() -> list[str]:
        out = []
        for obj in s3.list_objects(BUCKET, prefix=prefix, recursive=True):
            out.append(obj.object_name)
            if len(out) >= LIST_LIMIT:
                break
        return sorted(out)
    return _retry(f"list {prefix}", go)


def get_bytes(s3, key: str) -> bytes | None:
    """An object's bytes; None if there is no such object."""
    def go() -> bytes | None:
        try:
            r = s3.get_object(BUCKET, key)
        except Exception as e:  # minio.error.S3Error NoSuchKey
            if getattr(e, "code", "") == "NoSuchKey":
                return None
            raise
        try:
            return r.read()
        finally:
            r.close()
            r.release_conn()
    return _retry(f"get {key}", go)


def sha256(data: bytes | None) -> str:
    return "missing" if data is None else hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ indexes


def fingerprint(s3, tenant: str, index: str) -> dict[str, Any] | None:
    """The latest committed manifest of an index and the hashes of its shards' bytes;
    None when the index has no manifest."""
    prefix = index_prefix(tenant, index)
    keys = list_keys(s3, prefix)
    gens = sorted((g, k) for k in keys if (g := parse_manifest_key(k)) is not None)
    if not gens:
        return None
    gen, mkey = gens[-1]
    raw = get_bytes(s3, mkey)
    manifest = json.loads(raw) if raw is not None else {}
    resolved = _retry(f"read {mkey}",
                      lambda: read_manifest(_store(s3, prefix), gen, cached=False))
    shards = [[s.key, s.sha256, s.count, s.bytes] for s in resolved.shards]
    objects = {s[0]: sha256(get_bytes(s3, prefix + s[0])) for s in shards}
    return {"generation": gen, "manifest": manifest, "shards": shards, "objects": objects}


def _store(s3, prefix: str) -> S3Store:
    return S3Store(s3, BUCKET, prefix)


def _keys_or_none(store: S3Store, generation: int) -> set[str]:
    """The keys a generation uses; an empty set for a damaged manifest (it owns nothing)."""
    try:
        return generation_keys(store, generation)
    except RiseError:
        return set()


def compare(ref: dict[str, Any], got: dict[str, Any] | None) -> tuple[bool, str, bool]:
    """(byte-identical, why not, the manifests equal but for their shards' fields)."""
    if got is None:
        return False, "no committed manifest", False
    if not ref["shards"]:  # a comparison of two empty lists would prove nothing
        return False, "the reference index lists no shards", False
    manifest_equal = _strip(got["manifest"]) == _strip(ref["manifest"])
    if got["shards"] != ref["shards"]:
        ref_keys = {s[0]: s for s in ref["shards"]}
        diff = [s[0] for s in got["shards"] if ref_keys.get(s[0]) != s]
        missing = sorted(set(ref_keys) - {s[0] for s in got["shards"]})
        return False, (f"manifest shard list differs ({len(got['shards'])} vs "
                       f"{len(ref['shards'])} shards; differing {diff[:3]}, missing "
                       f"{missing[:3]})"), manifest_equal
    bad = [k for k, h in ref["objects"].items() if got["objects"].get(k) != h]
    if bad:
        return False, f"shard bytes differ: {bad[:3]}", manifest_equal
    unsound = [s[0] for s in got["shards"] if got["objects"][s[0]] != s[1]]
    if unsound:
        return False, f"shard bytes do not match their manifest sha256: {unsound[:3]}", \
            manifest_equal
    return True, "", manifest_equal


# Manifest fields a run may legitimately change (none today; a per-job fencing token or a
# commit time would be one): compared for the report only, never for byte identity.
_VOLATILE = frozenset({"created_at", "committed_at", "job", "job_id", "fence", "writer",
                       "request_id"})


def _strip(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k not in _VOLATILE and k != "shards"}


def census(s3, tenant: str, deleted: set[str]) -> dict[str, dict[str, Any]]:
    """Per index folder of the tenant: manifests, referenced shards, registry records,
    orphans and unknown objects (see the module docstring)."""
    root = f"tenants/{tenant}/indexes/"
    by_index: dict[str, list[str]] = {}
    for key in list_keys(s3, root):
        name, _, rest = key[len(root):].partition("/")
        by_index.setdefault(name, []).append(rest)
    out = {}
    for name, rels in sorted(by_index.items()):
        manifests = [r for r in rels if parse_manifest_key(r) is not None]
        referenced: set[str] = set()
        store = _store(s3, root + name + "/")
        for m in manifests:
            gen = parse_manifest_key(m)
            assert gen is not None
            try:
                referenced |= _retry(f"read {m}", lambda g=gen, st=store: _keys_or_none(st, g))
            except RuntimeError:
                pass  # an unreadable manifest references nothing
        shards = [r for r in rels if r.startswith(_INDEX_DIRS)]
        if name in deleted:
            orphans = list(rels)
        else:
            orphans = [r for r in shards if r not in referenced]
        unknown = [r for r in rels if r not in manifests and r != REGISTRY_KEY
                   and r not in shards]
        out[name] = {"objects": len(rels), "manifests": len(manifests),
                     "referenced": len(referenced & set(shards)),
                     "registry": int(REGISTRY_KEY in rels), "orphans": sorted(orphans),
                     "unknown": sorted(unknown)}
    return out


def listed(client, seconds: float = 30.0) -> dict[str, int] | None:
    """Name -> committed generation (0: none yet) of every index ListIndexes returns
    (retried for ``seconds``); None if it never answered."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return {i.name: i.generation for i in client.list_indexes()}
        except errors.RiseError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.5)


def committed(names: dict[str, int] | None) -> set[str]:
    """The indexes with a committed generation: a name claimed by a create that failed or
    still runs is not an index that can be lost."""
    return {n for n, g in (names or {}).items() if g > 0}


def lost(client, names: set[str], seconds: float) -> set[str]:
    """Those of ``names`` that neither ListIndexes nor GetIndex shows with a committed
    generation, after up to ``seconds`` of asking again: a rebuilt registry may take a
    moment."""
    missing = set(names)
    deadline = time.monotonic() + seconds
    while missing:
        missing -= committed(listed(client, 5.0))
        for name in sorted(missing):
            try:
                if client.get_index(name).generation > 0:
                    missing.discard(name)
            except errors.RiseError:
                pass
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    return missing


# ------------------------------------------------------------------------------ jobs


class JobWatch:
    """A job followed through GetJob: its states over time, the errors the gateway gave,
    and when it was first seen in a terminal state."""

    def __init__(self, client, job_id: str, submitted: float) -> None:
        self.client, self.job_id, self.submitted = client, job_id, submitted
        self.job = None  # the last Job message seen
        self.timeline: list[list[Any]] = []  # [s since submit, state, shards_done]
        self.errors: Counter[str] = Counter()
        self.error_messages: dict[str, str] = {}  # the last message of each error class
        self.last_outcome = ""  # the last poll's state, or its error
        self.ended_seen_at: float | None = None  # wall time
        self.last_poll = float("-inf")

    @property
    def ended(self) -> bool:
        return self.job is not None and self.job.state in TERMINAL

    def poll(self):
        self.last_poll = time.monotonic()
        try:
            job = self.client.get_job(self.job_id)
        except errors.RiseError as e:
            kind = type(e).__name__
            self.errors[kind] += 1
            self.error_messages[kind] = str(e)[:200]
            self.last_outcome = f"{kind}: {str(e)[:200]}"
            return None
        now = time.time()
        self.last_outcome = state_name(job)
        point = [round(now - self.submitted, 2), state_name(job), job.shards_done]
        if not self.timeline or self.timeline[-1][1:] != point[1:]:
            self.timeline.append(point)
        self.job = job
        if job.state in TERMINAL and self.ended_seen_at is None:
            self.ended_seen_at = now
        return job

    def tick(self, every: float = 1.0) -> None:
        """A poll at most every ``every`` seconds (while a fault runs)."""
        if not self.ended and time.monotonic() - self.last_poll >= every:
            self.poll()

    def wait(self, until, deadline: float, interval: float) -> bool:
        """Poll until ``until(job)`` or the job ends, or the monotonic ``deadline``."""
        while True:
            job = self.poll()
            if job is not None and (job.state in TERMINAL or until(job)):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)

    def wait_end(self, deadline: float, interval: float = 0.5) -> bool:
        return self.wait(lambda j: False, deadline, interval)

    def end_time(self) -> float | None:
        """When the job ended: its finished_at, else when this watch first saw it ended."""
        if not self.ended:
            return None
        return self.job.finished_at or self.ended_seen_at
