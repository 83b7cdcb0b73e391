"""The scorer's gRPC servicer: thin adapters from rise.v1.ScorerService to rise.api.

A call names an index (store prefix), a manifest generation and a replica selector; the
scorer reads that manifest, scores the selected shards (in parallel, through the shard
cache) and returns per query the replica's top ``top`` candidates, or every live
example's value.  Merging the replicas' answers with ``rise.score.merge_topk`` (or
``rank_values``) gives exactly the single-process ``attribute_sketched`` /
``value_sketched`` answer: each replica returns its best ``top`` under the same total
order (score descending, then id), which contains every member of the global top that
lives in its shards.  The centering mean is always taken over every shard of the
generation, so all replicas use the same one.

Every call must carry the gateway's signature for the index it reads
(``rise.internalauth``): UNAUTHENTICATED without a valid one, PERMISSION_DENIED for a
prefix other than the signed one or outside the signed tenant's ``tenants/<tenant>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from rise import api
from rise.datasets import open_store
from rise.errors import Cancelled, InvalidInput, Mismatch, RiseError
from rise.grpcutil import rpc
from rise.index import Index, read_manifest
from rise.internalauth import (
    GROUP_CANDIDATES,
    SCORE_SHARDS,
    VALUE_SHARDS,
    Verifier,
    authorize,
)
from rise.manifest import Manifest, ShardEntry
from rise.metrics import Metrics, for_service
from rise.score import (
    PoolMean,
    QuerySet,
    ScoreSpec,
    merge_topk,
    queryset_from_bytes,
    rank_values,
)
from rise.scorer.cache import ShardCache, StoreFactory
from rise.settings import Settings
from rise.shard import ShardData
from rise.v1 import scorer_pb2 as pb
from rise.v1 import scorer_pb2_grpc as pb_grpc
from rise.v1convert import spec_from

log = logging.getLogger("rise.scorer")

SERVICE_NAME = "rise.v1.ScorerService"
DEFAULT_TOP = 10
# Values per ValueShards message: 65536 ids and doubles are ~2-3 MB, far below the 64 MiB
# message limit whatever the index size.
VALUE_CHUNK = 65536
# Shard groups per scoring thread: more groups than threads balances cached and uncached
# shards across threads; each group's candidates are merged afterwards.
GROUPS_PER_THREAD = 4
# Pool means kept, one per (index, generation content).
MAX_MEANS = 64

T = TypeVar("T")


def default_store_factory(settings: Settings) -> StoreFactory:
    """``rise.datasets.open_store`` bound to ``settings``."""

    def factory(prefix: str):
        return open_store(settings, prefix)

    return factory


# ------------------------------------------------------------------ request decoding


def check_prefix(prefix: str) -> str:
    """A store prefix: non-empty '/'-separated names, no '.' or '..' parts."""
    parts = prefix.strip("/").split("/")
    if not prefix.strip("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(f"shards.prefix {prefix!r} is not an index prefix")
    return prefix


def decode_queries(data: bytes, index: Index, what: str = "queries") -> QuerySet:
    """Decode a serialised query set and check it fits the index (mode and sketch widths)."""
    try:
        qs = queryset_from_bytes(data)
    except RiseError:
        raise
    except Exception as e:  # noqa: BLE001 - a payload missing tensors is a bad payload
        raise InvalidInput(f"malformed {what}: {type(e).__name__}: {e}") from None
    n = len(qs)
    if tuple(qs.norms.shape) != (n, 2):
        raise InvalidInput(f"malformed {what}: norms have shape {tuple(qs.norms.shape)} "
                           f"for {n} ids")
    config = index.config
    if config.sketched:
        if qs.rh is None or qs.gh is None:
            raise Mismatch(f"{what} hold exact factors but the index is sketched")
        for c, t in (("rh", qs.rh), ("gh", qs.gh)):
            want = (n, config.channel_dim(c))
            if tuple(t.shape) != want:
                raise Mismatch(f"{what} {c} sketches have shape {tuple(t.shape)}, the "
                               f"index's are {want[1]} wide (different sketch config?)")
    else:
        if qs.factors is None:
            raise Mismatch(f"{what} are sketches but the index is {config.mode} mode")
        hidden = index.manifest.model.hidden
        for f in qs.factors:
            if hidden is not None and (f.h.shape[-1] != hidden or f.g.shape[-1] != hidden):
                raise Mismatch(f"{what} factors are {f.h.shape[-1]} wide; the model's hidden "
                               f"size is {hidden}")
    return qs


def _mean_key(prefix: str, manifest: Manifest) -> tuple[str, str]:
    """What the pool mean depends on: the shards (by content) and the tombstones."""
    what = {"shards": [[s.key, s.sha256] for s in manifest.shards],
            "tombstones": sorted(manifest.tombstones)}
    return prefix, hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


class _Prefetch:
    """A loader for an in-order sweep over ``entries``: keeps ``ahead`` loads in flight on
    ``pool`` and hands them out in order (any other entry is loaded directly)."""

    def __init__(self, pool: ThreadPoolExecutor, load: Callable[[ShardEntry], ShardData],
                 entries: Sequence[ShardEntry], ahead: int) -> None:
        self._pool, self._load = pool, load
        self._it = iter(entries)
        self._pending: deque[tuple[ShardEntry, Future[ShardData]]] = deque()
        for _ in range(max(1, ahead)):
            self._submit()

    def _submit(self) -> None:
        e = next(self._it, None)
        if e is not None:
            self._pending.append((e, self._pool.submit(self._load, e)))

    def __call__(self, entry: ShardEntry) -> ShardData:
        if self._pending and self._pending[0][0] is entry:
            _, fut = self._pending.popleft()
            self._submit()
            return fut.result()
        return self._load(entry)

    def cancel(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()


def _while_active(context: Any, load: Callable[[ShardEntry], ShardData]
                  ) -> Callable[[ShardEntry], ShardData]:
    """``load`` that raises Cancelled once the call is over (the client cancelled or its
    deadline passed), so an abandoned scan stops at the next shard instead of running on."""
    is_active = getattr(context, "is_active", None)
    if is_active is None:
        return load

    def checked(entry: ShardEntry) -> ShardData:
        if not is_active():
            raise Cancelled("the call was cancelled or its deadline passed; scan stopped")
        return load(entry)

    return checked


# ---------------------------------------------------------------------- the servicer


class Scorer(pb_grpc.ScorerServiceServicer):
    """rise.v1.ScorerService over a shard cache.

    ``store_factory(prefix)`` opens the store of an index (default
    ``rise.datasets.open_store`` with ``settings``); ``cache`` may be shared or injected
    (default: one of ``settings.scorer_cache_bytes``).  Methods are wrapped with
    ``rise.grpcutil.rpc("scorer")``, which counts and times them on ``self.metrics``.
    ``verifier`` checks the gateway's signatures (default: from the settings' internal
    secret; InvalidInput without one unless ``internal_auth`` is off).
    """

    def __init__(self, settings: Settings | None = None, metrics: Metrics | None = None, *,
                 store_factory: StoreFactory | None = None, cache: ShardCache | None = None,
                 threads: int | None = None, value_chunk: int = VALUE_CHUNK,
                 verifier: Verifier | None = None) -> None:
        self.settings = settings if settings is not None else Settings()
        self.verifier = verifier or Verifier.from_settings(self.settings)
        self.metrics = metrics if metrics is not None else for_service("scorer")
        factory = store_factory or default_store_factory(self.settings)
        self._own_cache = cache is None
        self.cache = cache or ShardCache(factory, self.settings.scorer_cache_bytes,
                                         self.metrics, directory=self.settings.scorer_cache_dir)
        self.threads = max(1, threads if threads is not None else self.settings.scorer_threads)
        self.value_chunk = max(1, value_chunk)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rise-scorer")
        # index_mean's answer per generation content (None: it does not center)
        self._means: OrderedDict[tuple[str, str], PoolMean | None] = OrderedDict()
        self._means_lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._own_cache:
            self.cache.close()

    # ------------------------------------------------------------------------ RPCs

    @rpc("scorer")
    def ScoreShards(self, request: pb.ScoreShardsRequest, context: Any) -> pb.ScoreShardsResponse:
        prefix, index, entries = self._select(request.shards, context, SCORE_SHARDS)
        spec = spec_from(request.scoring if request.HasField("scoring") else None)
        qs = decode_queries(request.queries, index, "queries")
        top = request.top or DEFAULT_TOP
        mean = self._mean(prefix, index, spec, entries)
        load = _while_active(context, self.cache.loader(prefix, scan=True))
        groups = self._groups(entries)
        located: dict[int, api.Located] = {id(g): {} for g in groups}
        parts = self._map(
            lambda group: api.score_candidates(index, qs, spec, top, entries=group, load=load,
                                               mean=mean, locate=located[id(group)]),
            groups)
        where = {rid: loc for part in located.values() for rid, loc in part.items()}
        position = {e.key: i for i, e in enumerate(index.manifest.shards)}
        resp = pb.ScoreShardsResponse(shards_scored=len(entries))
        for q in range(len(qs)):
            best = merge_topk((p[q] for p in parts), top)
            resp.queries.add().candidates.extend(
                pb.Candidate(id=rid, score=score, shard=position[where[rid][0].key],
                             row=where[rid][1]) for rid, score in best)
        return resp

    @rpc("scorer")
    def GroupCandidates(self, request: pb.GroupCandidatesRequest, context: Any
                        ) -> pb.GroupCandidatesResponse:
        """Each query's candidates (merged over the replicas, best first) grouped into
        near-duplicates (``rise.api.collapse_ranked``), their sketches read from any shard
        of the generation; the pool mean is the one ScoreShards centered with."""
        prefix, index, _ = self._select(request.shards, context, GROUP_CANDIDATES)
        spec = spec_from(request.scoring if request.HasField("scoring") else None)
        top = request.top or DEFAULT_TOP
        shards = index.manifest.shards
        located: api.Located = {}
        ranked = []
        for qc in request.queries:
            hits = []
            for c in qc.candidates:
                if c.shard >= len(shards):
                    raise InvalidInput(f"candidate {c.id!r}: shard {c.shard} is not in "
                                       f"generation {index.generation}")
                located[c.id] = (shards[c.shard], c.row)
                hits.append((c.id, c.score))
            ranked.append(hits)
        mean = self._mean(prefix, index, spec, [])
        load = _while_active(context, self.cache.loader(prefix))
        grouped = api.collapse_ranked(index, ranked, located, spec, request.threshold, top,
                                      load=load, mean=mean)
        resp = pb.GroupCandidatesResponse()
        for q, groups in enumerate(grouped):
            by_id = {c.id: c for c in request.queries[q].candidates}
            out = resp.queries.add()
            for g in groups:
                out.groups.add().members.extend(by_id[rid] for rid, _ in g)
        return resp

    @rpc("scorer")
    def ValueShards(self, request: pb.ValueShardsRequest, context: Any
                    ) -> Iterator[pb.ValueShardsResponse]:
        prefix, index, entries = self._select(request.shards, context, VALUE_SHARDS)
        spec = spec_from(request.scoring if request.HasField("scoring") else None)
        targets = decode_queries(request.targets, index, "targets")
        if len(targets) == 0:
            raise InvalidInput("the target set is empty")
        mean = self._mean(prefix, index, spec, entries)
        load = _while_active(context, self.cache.loader(prefix, scan=True))
        parts = self._map(
            lambda group: api.value_candidates(index, targets, spec, entries=group, load=load,
                                               mean=mean),
            self._groups(entries))
        ranked = rank_values(v for p in parts for v in p)
        for lo in range(0, max(len(ranked), 1), self.value_chunk):
            yield pb.ValueShardsResponse(
                values=[pb.Candidate(id=rid, score=v) for rid, v in ranked[lo:lo + self.value_chunk]],
                shards_scored=len(entries))

    # --------------------------------------------------------------------- helpers

    def _select(self, sel: pb.ShardSelector, context: Any, method: str
                ) -> tuple[str, Index, list[ShardEntry]]:
        """(prefix, opened generation, this call's shard entries), once the call's signature
        allows reading that prefix."""
        metadata = context.invocation_metadata() if self.verifier.enabled else ()
        grant = self.verifier.verify(method, metadata)
        prefix = check_prefix(sel.prefix)
        authorize(grant, prefix)
        if sel.generation == 0:
            raise InvalidInput("shards.generation is required (manifest generations start at 1)")
        if sel.replicas == 0 and sel.replica != 0:
            raise InvalidInput("shards.replica must be 0 when shards.replicas is 0 (all shards)")
        store = self.cache.store(prefix)
        manifest = read_manifest(store, sel.generation)
        index = Index(store, manifest)
        return prefix, index, api.replica_shards(manifest, sel.replica, sel.replicas)

    def _groups(self, entries: list[ShardEntry]) -> list[list[ShardEntry]]:
        k = min(len(entries), self.threads * GROUPS_PER_THREAD)
        return [entries[i::k] for i in range(k)]

    def _map(self, fn: Callable[[list[ShardEntry]], T], groups: list[list[ShardEntry]]) -> list[T]:
        """``fn`` over the groups on the scoring pool (inline for a single group)."""
        if len(groups) <= 1 or self.threads == 1:
            return [fn(g) for g in groups]
        futures = [self._pool.submit(fn, g) for g in groups]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _mean(self, prefix: str, index: Index, spec: ScoreSpec,
              mine: list[ShardEntry]) -> PoolMean | None:
        """The pool mean over every shard of the generation (None without centering),
        computed once per generation content; shards of other replicas are read without
        being cached."""
        if not spec.centered(index.config.sketched, index.live_count):
            return None
        key = _mean_key(prefix, index.manifest)
        with self._means_lock:
            if key in self._means:
                self._means.move_to_end(key)
                return self._means[key]
        own = {e.key for e in mine}

        def load(entry: ShardEntry) -> ShardData:
            return self.cache.load(prefix, entry, keep=entry.key in own)

        prefetch = _Prefetch(self._pool, load, index.manifest.shards, self.threads)
        try:
            mean = api.index_mean(index, spec, load=prefetch)
        finally:
            prefetch.cancel()
        with self._means_lock:
            self._means[key] = mean
            while len(self._means) > MAX_MEANS:
                self._means.popitem(last=False)
        return mean


def add_to_server(scorer: Scorer, server: Any) -> None:
    pb_grpc.add_ScorerServiceServicer_to_server(scorer, server)
