"""The oracle of the fuzz run: for a request, the gRPC codes its answer may have, from
``docs/bad-input.md``'s table, the proto's comments and the README, and what the run knows
of the tenant's indexes and jobs.

``expect(rpc, request, state)`` finds every bad-input class the request falls in (an index
name not 1-63 characters of [a-z0-9._-] from a letter or digit, a temperature outside
[0.05, 100], a dataset outside the tenant's area, an empty query, ...).  When there is one
or more, the answer must be one of their codes: the gateway stops at the first check that
fails, and which one comes first is its business, so any of them is right, and OK is
wrong.  When there is none, the answer must be what the state says: OK, or NOT_FOUND for
an index or job that does not exist, ALREADY_EXISTS for a taken name, FAILED_PRECONDITION
for an index with no committed generation.  INTERNAL and UNKNOWN are never allowed.

A request that starts a job also gets the job ends it may reach (``JobExpect``): a
dataset's own (``strategies.Dataset.expect``), widened where the request makes more
refusals legitimate (a field map other than the default, an append's id clashes, a
no-sketch index's storage budget).  A failed job's code is never INTERNAL or UNKNOWN, and
never UNAVAILABLE while the store and broker are up.

This module re-derives the rules from the documents; it imports nothing of the gateway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any

from rise import constants

from .strategies import INVALID, SUCCEEDED, n_tokens

OK = "OK"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
ALREADY_EXISTS = "ALREADY_EXISTS"
PERMISSION_DENIED = "PERMISSION_DENIED"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
UNAUTHENTICATED = "UNAUTHENTICATED"
NEVER = frozenset({"INTERNAL", "UNKNOWN"})

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_QUERIES = 256  # RISE_MAX_QUERIES_PER_CALL's default
MAX_TOP = 10_000  # Attribute's top
MAX_MESSAGE = 64 * 1024**2  # the gateway's message size limit (RISE_MAX_MESSAGE_BYTES)
DEFAULT_DIMS = constants.DEFAULT_DIMS  # 128, 64, 64 (README)

RPCS = ["CreateIndex", "AppendToIndex", "DeleteExamples", "CompactIndex", "DeleteIndex",
        "ListIndexes", "GetIndex", "ImportIndex", "GetJob", "ListJobs", "WatchJob",
        "CancelJob", "Attribute", "Value", "Explain"]
SERVICE = {**{r: "IndexService" for r in RPCS[:8]}, **{r: "JobService" for r in RPCS[8:12]},
           **{r: "ScoringService" for r in RPCS[12:]}}
JOB_RPCS = {"CreateIndex", "AppendToIndex", "CompactIndex"}
REQUEST_ID_RPCS = {"CreateIndex", "AppendToIndex", "DeleteExamples", "CompactIndex",
                   "ImportIndex"}
MAX_NEW_TOKENS = 4096  # Generation.max_new_tokens (0: 64)
DEFAULT_NEW_TOKENS = 64


# ------------------------------------------------------------------------------ state


@dataclasses.dataclass
class IndexInfo:
    """An index of the fuzzed tenant as ListIndexes last showed it."""

    generation: int
    live: int
    mode: str
    max_length: int
    ids: set[str] | None = None  # live ids, when every dataset it holds is known


@dataclasses.dataclass
class State:
    tenant: str
    pool: str
    bucket: str
    cap: int  # RISE_MAX_RECORD_BYTES
    has_chat_template: bool = False
    indexes: dict[str, IndexInfo] = dataclasses.field(default_factory=dict)
    jobs: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> last state
    request_ids: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> fingerprint
    page_tokens: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    stored: set[str] = dataclasses.field(default_factory=set)
    """Index names with objects in the tenant's area (ImportIndex: what may be imported)."""
    """next_page_token values the gateway gave -> (listing, its index filter)."""
    fresh: int = 0

    def fresh_name(self) -> str:
        """An index name not used yet in the run."""
        self.fresh += 1
        return f"new-{self.fresh}"


@dataclasses.dataclass
class JobExpect:
    ends: frozenset[str]  # "SUCCEEDED", "FAILED:<code>", "CANCELLED"
    why: str


@dataclasses.dataclass
class Expect:
    allowed: frozenset[str]
    classes: list[str]  # the bad-input classes found (empty: a well-formed request)
    job: JobExpect | None = None
    replay: bool = False  # a retry of an earlier call's request id

    @property
    def refused(self) -> bool:
        return OK not in self.allowed


def fingerprint(rpc: str, request: Any) -> str:
    """What a retry with the same request id must repeat (the request without its id)."""
    bare = type(request)()
    bare.CopyFrom(request)
    bare.ClearField("request_id")
    return hashlib.sha256(rpc.encode() + b"\0" + bare.SerializeToString(deterministic=True)
                          ).hexdigest()


# ------------------------------------------------------------------------------ checks


class Found:
    """The bad-input classes of one request, each with its code."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, cls: str, code: str) -> None:
        self.items.append((cls, code))

    def codes(self) -> frozenset[str]:
        return frozenset(c for _, c in self.items)

    def names(self) -> list[str]:
        return [n for n, _ in self.items]


def check_name(name: str, found: Found) -> bool:
    if NAME.fullmatch(name):
        return True
    found.add("index name", INVALID_ARGUMENT)
    return False


def field_map(msg: Any | None) -> dict[str, Any] | None:
    """The field map a FieldMap message stands for (empty strings take the defaults), or
    None when it is inconsistent (README: prompt and response together, distinct; a chat
    template only for prompt/response records)."""
    if msg is None:
        return {"text": "text", "id": "id", "prompt": None, "response": None, "chat": False}
    fm = {"text": msg.text_field or "text", "id": msg.id_field or "id",
          "prompt": msg.prompt_field or None, "response": msg.response_field or None,
          "chat": msg.chat_template}
    pr = fm["prompt"] is not None and fm["response"] is not None
    if (fm["prompt"] is None) != (fm["response"] is None):
        return None
    if pr and fm["prompt"] == fm["response"]:
        return None
    if fm["chat"] and not pr:
        return None
    return fm


def is_default_fields(fm: dict[str, Any] | None) -> bool:
    return fm is not None and fm["text"] == "text" and fm["id"] == "id" \
        and fm["prompt"] is None and not fm["chat"]


def check_config(cfg: Any, found: Found) -> str:
    """The SketchConfig rows of the table; returns the mode."""
    mode = cfg.mode or "sketch"
    if mode not in ("sketch", "nosketch"):  # exact mode is the embedded CLI's only
        found.add("sketch mode", INVALID_ARGUMENT)
    t = cfg.temperature or constants.DEFAULT_TEMPERATURE
    if not 0.05 <= t <= 100:  # NaN and infinities fail too
        found.add("temperature", INVALID_ARGUMENT)
    kr, kh, kg = (cfg.kr or DEFAULT_DIMS[0], cfg.kh or DEFAULT_DIMS[1], cfg.kg or DEFAULT_DIMS[2])
    if max(kr, kh, kg) > 2**16 or (kr + kg) * kh > 2**20:
        found.add("sketch dims", INVALID_ARGUMENT)
    if (cfg.weighting or "mean") not in ("mean", "sum"):
        found.add("weighting", INVALID_ARGUMENT)
    if (cfg.max_length or constants.DEFAULT_MAX_LENGTH) < 2:
        found.add("max_length", INVALID_ARGUMENT)
    if cfg.seed >= 2**63:
        found.add("seed", INVALID_ARGUMENT)
    return mode


def bad_key(key: str) -> bool:
    """An object key the table refuses: over 1024 UTF-8 bytes (S3's limit), a control
    character, a backslash, or an empty, '.' or '..' segment."""
    return (len(key.encode()) > 1024 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in key)
            or "\\" in key or any(seg in ("", ".", "..") for seg in key.split("/")))


def dataset_scope(uri: str, tenant: str, bucket: str, found: Found) -> str:
    """The README's dataset rule: s3://<bucket>/tenants/<tenant>/ (no allowed buckets or
    folders are configured in the run), and a valid object key.  Returns "s3" for a URI
    in the tenant's area."""
    if not uri:
        found.add("dataset_uri empty", INVALID_ARGUMENT)
        return "bad"
    if uri.startswith("s3://"):
        b, _, key = uri[5:].partition("/")
        if not key or key.endswith("/"):
            found.add("dataset_uri names no object", INVALID_ARGUMENT)
            return "bad"
        if bad_key(key):
            found.add("dataset key invalid", INVALID_ARGUMENT)
            return "bad"
        if b != bucket or not key.startswith(f"tenants/{tenant}/"):
            found.add("dataset outside the tenant's area", PERMISSION_DENIED)
            return "bad"
        return "s3"
    if "://" in uri:
        found.add("dataset_uri scheme", INVALID_ARGUMENT)
        return "bad"
    found.add("dataset path outside the allowed roots", PERMISSION_DENIED)
    return "bad"


def check_scoring(msg: Any | None, found: Found) -> dict[str, Any]:
    if msg is None:
        return {"score": "cosine", "center": None}
    channel, score = msg.channel or "both", msg.score or "cosine"
    bad = channel not in ("rh", "gh", "both") or score not in ("raw", "cosine") \
        or (score == "raw" and channel == "both")
    if msg.HasField("lambda"):
        lam = getattr(msg, "lambda")
        bad = bad or not 0.0 <= lam <= 1.0
    center = msg.center if msg.HasField("center") else None
    bad = bad or (center is True and score == "raw")
    if bad:
        found.add("scoring", INVALID_ARGUMENT)
    return {"score": score, "center": center}


def inline_rows(records: Any, fm: dict[str, Any]) -> list[dict[str, Any]]:
    """Inline records as the record objects they stand for under the field map (an empty
    id takes the record's position)."""
    rows = []
    for r in records:
        d: dict[str, Any] = {}
        if r.id:
            d[fm["id"]] = r.id
        if fm["prompt"] is not None:
            d[fm["prompt"]] = r.prompt
            d[fm["response"]] = r.response
        else:
            d[fm["text"]] = r.text
        rows.append(d)
    return rows


def check_records(rows: list[dict[str, Any]], fm: dict[str, Any], cap: int, found: Found) -> None:
    """The record rows of the table for inline queries and targets: size cap, id of 1-256
    UTF-8 bytes and unique, a text (or response) not empty nor whitespace-only."""
    seen: set[str] = set()
    for i, row in enumerate(rows):
        size = sum(len(k.encode()) + (len(v.encode()) if isinstance(v, str) else 0)
                   for k, v in row.items())
        if size > cap:
            found.add("record over the size cap", INVALID_ARGUMENT)
            continue
        ident = row.get(fm["id"])
        ident = str(i) if ident is None else ident
        if not 0 < len(ident.encode()) <= 256:
            found.add("record id size", INVALID_ARGUMENT)
        if ident in seen:
            found.add("duplicate record id", INVALID_ARGUMENT)
        seen.add(ident)
        if fm["prompt"] is not None:
            if not row[fm["response"]].strip():
                found.add("empty response", INVALID_ARGUMENT)
        elif not row[fm["text"]].strip():
            found.add("empty text", INVALID_ARGUMENT)


def check_supervised(rows: list[dict[str, Any]], fm: dict[str, Any], max_length: int,
                     chat_ok: bool, found: Found) -> None:
    """The worker's rows (only it has the tokenizer): a query with no supervised position,
    a response over max_length, a chat template the tokenizer lacks."""
    for row in rows:
        if fm["prompt"] is None:
            if n_tokens(row[fm["text"]]) < 2:
                found.add("no supervised position", INVALID_ARGUMENT)
            continue
        if fm["chat"] and not chat_ok:
            found.add("no chat template", INVALID_ARGUMENT)
            continue
        r, p = n_tokens(row[fm["response"]]), n_tokens(row[fm["prompt"]])
        if r > max_length:
            found.add("response over max_length", INVALID_ARGUMENT)
            continue
        kept = min(p, max_length - r)
        if kept + r - max(kept, 1) < 1:
            found.add("no supervised position", INVALID_ARGUMENT)


# ------------------------------------------------------------------------------ per RPC


def expect(rpc: str, req: Any, state: State, *, authenticated: bool = True,
           size: int = 0, dataset: Any = None) -> Expect:
    """The codes allowed for ``req`` (see the module).  ``size``: the request's bytes on
    the wire; ``dataset``: the generated Dataset its dataset_uri names, if any."""
    if not authenticated:
        return Expect(frozenset({UNAUTHENTICATED}), ["no or unknown bearer token"])
    if size > MAX_MESSAGE:
        return Expect(frozenset({RESOURCE_EXHAUSTED}), ["message over the size limit"])
    if rpc in REQUEST_ID_RPCS and req.request_id:
        if not REQUEST_ID.fullmatch(req.request_id):
            return Expect(frozenset({INVALID_ARGUMENT}), ["request_id"])
        held = state.request_ids.get(req.request_id)
        if held is not None:
            if held != fingerprint(rpc, req):
                return Expect(frozenset({INVALID_ARGUMENT}), ["request_id reused"])
            # the first call's answer again: its job as it is now, or the index now
            allowed = {OK, NOT_FOUND} if rpc == "DeleteExamples" else {OK}
            return Expect(frozenset(allowed), [], replay=True)
    return globals()["_" + rpc](req, state, Found(), dataset)


def _finish(found: Found, ok: set[str] | frozenset[str], job: JobExpect | None = None
            ) -> Expect:
    if found.items:
        return Expect(found.codes(), found.names())
    return Expect(frozenset(ok), [], job)


def _existing(name: str, state: State, found: Found, committed: bool = True
              ) -> IndexInfo | None:
    """The index ``name`` of the tenant, or the classes its absence makes."""
    if not check_name(name, found):
        return None
    info = state.indexes.get(name)
    if info is None:
        found.add("no such index", NOT_FOUND)
        return None
    if committed and info.generation == 0:
        found.add("no committed generation", FAILED_PRECONDITION)
        return None
    return info


def good_uri(state: State) -> str:
    """The dataset of twelve good records the run uploads for the tenant."""
    return f"s3://{state.bucket}/tenants/{state.tenant}/data/good.jsonl"


def _job_ends(dataset: Any, good: bool, uri: str, fm_default: bool, mode: str,
              append: bool) -> JobExpect:
    """The job ends of an ingest of ``uri`` (``dataset``: the generated one it names)."""
    if dataset is None:
        ends = {"FAILED:" + NOT_FOUND, INVALID}  # no such object, or not a data file name
        why = "a key the run never wrote"
        if good:
            ends, why = {SUCCEEDED}, "the good dataset"
    else:
        ends, why = set(dataset.expect), f"dataset {dataset.kind}"
    if not fm_default or append:  # (an append reads with the index's first field map)
        ends.add(INVALID)  # other fields may be absent; an append's ids may clash
        if dataset is not None and not dataset.structural:
            ends.add(SUCCEEDED)  # ...and the faulty field may be one the map does not read
    if mode == "nosketch":
        ends.add("FAILED:" + RESOURCE_EXHAUSTED)  # the no-sketch storage budget
    return JobExpect(frozenset(ends), why)


def _CreateIndex(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    name_ok = check_name(req.index, found)
    if not req.pool or req.pool != state.pool:
        found.add("pool", INVALID_ARGUMENT)
    fm = field_map(req.fields if req.HasField("fields") else None)
    if fm is None:
        found.add("field map", INVALID_ARGUMENT)
    mode = check_config(req.config, found)
    dataset_scope(req.dataset_uri, state.tenant, state.bucket, found)
    if name_ok and req.index in state.indexes:
        found.add("index name taken", ALREADY_EXISTS)
    job = _job_ends(dataset, req.dataset_uri == good_uri(state), req.dataset_uri,
                    is_default_fields(fm), mode, False)
    return _finish(found, {OK}, job)


def _AppendToIndex(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    info = _existing(req.index, state, found)
    dataset_scope(req.dataset_uri, state.tenant, state.bucket, found)
    fm = field_map(req.fields) if req.HasField("fields") else None
    if req.HasField("fields") and fm is None:
        found.add("field map", INVALID_ARGUMENT)
    default = not req.HasField("fields") or is_default_fields(fm)
    job = _job_ends(dataset, req.dataset_uri == good_uri(state), req.dataset_uri, default,
                    info.mode if info else "sketch", True)
    return _finish(found, {OK}, job)


def _DeleteExamples(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    info = _existing(req.index, state, found, committed=False)
    ids = list(req.ids)
    if info is not None and not ids:
        found.add("no ids", INVALID_ARGUMENT)
    if info is not None and ids:
        if len(set(ids)) != len(ids):
            found.add("an id named twice", INVALID_ARGUMENT)
        if info.generation == 0:
            found.add("no committed generation", NOT_FOUND)
        elif info.ids is not None:
            if any(i not in info.ids for i in ids):
                found.add("ids not live", NOT_FOUND)
        elif found.items:  # which ids are live is not known: they may not be
            found.add("ids perhaps not live", NOT_FOUND)
        else:
            return _finish(found, {OK, NOT_FOUND})
    return _finish(found, {OK})


def _CompactIndex(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    _existing(req.index, state, found)
    return _finish(found, {OK}, JobExpect(frozenset({SUCCEEDED}), "compaction"))


def _DeleteIndex(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    _existing(req.index, state, found, committed=False)
    return _finish(found, {OK})


def _page(token: str, listing: tuple[str, str], state: State) -> Expect | None:
    """The proto's paging rule: a page_token is the next_page_token of the previous page
    of the same listing (same filters), or empty.  One the gateway gave for another
    listing is INVALID_ARGUMENT; one it never gave is opaque to the oracle: refused, or
    read as a cursor when it happens to be one (never INTERNAL).  page_size any: 0 is the
    default and sizes over 1000 are 1000."""
    if not token or state.page_tokens.get(token) == listing:
        return None
    if token in state.page_tokens:
        return Expect(frozenset({INVALID_ARGUMENT}), ["page_token of another listing"])
    return Expect(frozenset({OK, INVALID_ARGUMENT}), ["page_token never given"])


def _ListIndexes(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    return _page(req.page_token, ("indexes", ""), state) or _finish(found, {OK})


def _GetIndex(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    _existing(req.index, state, found, committed=False)
    return _finish(found, {OK})


def _job(job_id: str, state: State, found: Found) -> None:
    if job_id not in state.jobs:  # another tenant's job is NOT_FOUND too
        found.add("no such job", NOT_FOUND)


def _GetJob(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    _job(req.id, state, found)
    return _finish(found, {OK})


def _ListJobs(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    return _page(req.page_token, ("jobs", req.index), state) or _finish(found, {OK})


def _WatchJob(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    interval = req.interval_seconds or 1.0
    if not 0.05 <= interval <= 60:
        found.add("interval_seconds", INVALID_ARGUMENT)
    _job(req.id, state, found)
    return _finish(found, {OK})


def _CancelJob(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    _job(req.id, state, found)
    return _finish(found, {OK})


def _scoring_call(req: Any, records: Any, state: State, found: Found,
                  soft: Found | None = None) -> None:
    """The checks of Attribute, Value and Explain; ``soft``: where the record rows go when
    the records are prompts the model answers (Attribute's generate), whose rules the
    table does not state: then they may pass or be INVALID_ARGUMENT."""
    rows_found = found if soft is None else soft
    spec = check_scoring(req.scoring if req.HasField("scoring") else None, found)
    if not records:
        found.add("no queries", INVALID_ARGUMENT)
    elif len(records) > MAX_QUERIES:
        found.add("too many queries", RESOURCE_EXHAUSTED)
    fm = field_map(req.fields if req.HasField("fields") else None)
    if fm is None:
        found.add("field map", INVALID_ARGUMENT)
    rows = inline_rows(records, fm) if fm is not None and records else []
    if rows and len(records) <= MAX_QUERIES:
        check_records(rows, fm, state.cap, rows_found)
    info = _existing(req.index, state, found, committed=False)
    if info is None:
        return
    if info.generation == 0:
        found.add("no committed generation", NOT_FOUND)
        return
    if spec["center"] and (info.mode != "sketch" or info.live == 0):
        found.add("centering without a pool mean", INVALID_ARGUMENT)
    if rows and fm is not None:
        check_supervised(rows, fm, info.max_length, state.has_chat_template, rows_found)
    if soft is not None and req.HasField("generate"):
        n = req.generate.max_new_tokens or DEFAULT_NEW_TOKENS
        if n >= info.max_length:
            found.add("max_new_tokens not below the index's max_length", INVALID_ARGUMENT)


def check_generation(gen: Any, found: Found) -> None:
    """Generation's rows (the proto): max_new_tokens at most 4096 (0: 64), temperature 0
    (greedy) or in [0.001, 100]."""
    if (gen.max_new_tokens or DEFAULT_NEW_TOKENS) > MAX_NEW_TOKENS:
        found.add("max_new_tokens over 4096", INVALID_ARGUMENT)
    t = gen.temperature
    if not (t == 0 or 0.001 <= t <= 100):  # NaN fails both
        found.add("generation temperature", INVALID_ARGUMENT)
    if gen.seed >= 2**63:  # as SketchConfig's seed (torch's generator takes an int64)
        found.add("generation seed", INVALID_ARGUMENT)


def check_collapse(req: Any, state: State, found: Found) -> bool:
    """Attribute's collapse (the proto): collapse_threshold a cosine in (0, 1] (0: the
    default), and only with collapse.  Returns whether the answer may also be refused for
    the index (collapsing reads sketches: a no-sketch index may refuse it)."""
    t = req.collapse_threshold
    if req.collapse:
        if t and not 0.0 < t <= 1.0:  # NaN fails too
            found.add("collapse_threshold", INVALID_ARGUMENT)
        info = state.indexes.get(req.index)
        return info is not None and info.mode != "sketch"
    if t != 0:
        found.add("collapse_threshold without collapse", INVALID_ARGUMENT)
    return False


def _Attribute(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    if req.top > MAX_TOP:
        found.add("top over 10000", RESOURCE_EXHAUSTED)
    lenient = getattr(req, "collapse", None) is not None and check_collapse(req, state, found)
    if lenient and not req.HasField("generate"):
        _scoring_call(req, req.queries, state, found)
        if not found.items:
            return Expect(frozenset({OK, INVALID_ARGUMENT, FAILED_PRECONDITION}),
                          ["collapse on a no-sketch index"])
        return _finish(found, {OK})
    if not req.HasField("generate"):
        _scoring_call(req, req.queries, state, found)
        return _finish(found, {OK})
    check_generation(req.generate, found)
    soft = Found()
    _scoring_call(req, req.queries, state, found, soft)
    if found.items:  # a record's fault may be found first, at the door
        return Expect(found.codes() | ({INVALID_ARGUMENT} if soft.items else set()),
                      found.names() + soft.names())
    if not soft.items:
        return _finish(found, {OK, INVALID_ARGUMENT})  # what the prompts yield: unstated
    return Expect(frozenset({OK, INVALID_ARGUMENT}), ["prompt records: " + soft.names()[0]])


def _Value(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    f = req.select_fraction
    if f:  # 0 (unset) writes no selection
        if math.isnan(f) or not 0 < f <= 1:
            found.add("select_fraction", INVALID_ARGUMENT)
        uri = req.selection_uri
        if not uri.startswith("s3://"):
            found.add("selection_uri scheme", INVALID_ARGUMENT)
        else:
            b, _, key = uri[5:].partition("/")
            if b != state.bucket or not key.startswith(f"tenants/{state.tenant}/"):
                found.add("selection outside the tenant's area", PERMISSION_DENIED)
            elif not key.endswith((".jsonl", ".parquet")):
                found.add("selection_uri extension", INVALID_ARGUMENT)
            elif bad_key(key):
                found.add("selection key invalid", INVALID_ARGUMENT)
    if req.values_uri:
        check_output_uri(req.values_uri, (".parquet",), "values_uri", state, found)
    _scoring_call(req, req.targets, state, found)
    return _finish(found, {OK})


def check_output_uri(uri: str, suffixes: tuple[str, ...], name: str, state: State,
                     found: Found) -> None:
    """An output object of the tenant (the proto: s3://<deployment bucket>/tenants/<tenant>/
    ...<suffix>), a valid key."""
    if not uri.startswith("s3://"):
        found.add(f"{name} scheme", INVALID_ARGUMENT)
        return
    b, _, key = uri[5:].partition("/")
    if b != state.bucket or not key.startswith(f"tenants/{state.tenant}/"):
        found.add(f"{name} outside the tenant's area", PERMISSION_DENIED)
    elif not key.endswith(suffixes):
        found.add(f"{name} extension", INVALID_ARGUMENT)
    elif bad_key(key):
        found.add(f"{name} key invalid", INVALID_ARGUMENT)


def _ImportIndex(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    """The proto: a copied index in the tenant's area, registered with a pool whose model
    built it; a registered name is taken, an area without one is NOT_FOUND."""
    name_ok = check_name(req.index, found)
    if not req.pool or req.pool != state.pool:
        found.add("pool", INVALID_ARGUMENT)
    if name_ok:
        if req.index in state.indexes:
            found.add("index name taken", ALREADY_EXISTS)
        elif req.index not in state.stored:
            found.add("no index to import", NOT_FOUND)
        elif not found.items:  # objects there: whether they verify is their business
            return Expect(frozenset({OK, NOT_FOUND, FAILED_PRECONDITION, "DATA_LOSS"}),
                          ["objects of an unregistered index"])
    return _finish(found, {OK})


def _Explain(req: Any, state: State, found: Found, dataset: Any) -> Expect:
    """The proto: one query (query_id among several), hit_id a live example (NOT_FOUND
    otherwise), top at most 10000, the records' and the scoring's rows as for Attribute."""
    if not req.hit_id:
        found.add("hit_id empty", INVALID_ARGUMENT)
    if req.top > MAX_TOP:
        found.add("top over 10000", RESOURCE_EXHAUSTED)
    records = list(req.queries)
    fm = field_map(req.fields if req.HasField("fields") else None)
    chosen = None
    if fm is not None and records and len(records) <= MAX_QUERIES:
        rows = inline_rows(records, fm)
        rec = Found()
        check_records(rows, fm, state.cap, rec)
        found.items.extend(rec.items)  # every query is read at the door
        if not rec.items:
            ids = [r.id or str(i) for i, r in enumerate(records)]
            if req.query_id:
                if req.query_id in ids:
                    chosen = ids.index(req.query_id)
                else:
                    found.add("query_id not among the queries", INVALID_ARGUMENT)
            elif len(records) > 1:
                found.add("several queries, no query_id", INVALID_ARGUMENT)
            else:
                chosen = 0
    single = _Found_with(req, records, chosen)
    _scoring_call(single, single.queries, state, found)
    info = state.indexes.get(req.index)
    if info is None or info.generation == 0 or not req.hit_id:
        return _finish(found, {OK})
    if info.ids is None:  # which ids are live is not known: the hit may not be
        if not found.items:
            return Expect(frozenset({OK, NOT_FOUND}), ["hit_id perhaps not live"])
        found.add("hit_id perhaps not live", NOT_FOUND)
    elif req.hit_id not in info.ids:  # the worker may find it before the query's faults
        found.add("hit_id not live", NOT_FOUND)
    return _finish(found, {OK})


def _Found_with(req: Any, records: list[Any], chosen: int | None) -> Any:
    """``req`` as the scoring checks see it: every query for the door's rows, only the
    chosen one (when there is one) for the worker's."""
    out = type(req)()
    out.CopyFrom(req)
    if chosen is not None:
        del out.queries[:]
        out.queries.add().CopyFrom(records[chosen])
        if not out.queries[0].id:
            out.queries[0].id = req.query_id or "0"
    return out
