"""Between rise.v1 protobuf messages and the core's types: the one place the gateway and
the scorer decode requests (``spec_from`` is used by both) and build responses."""

from __future__ import annotations

import time
from typing import Any, cast

from rise import constants
from rise.config import SketchConfig, sketch_config
from rise.data import FieldMap
from rise.errors import InvalidInput
from rise.manifest import Manifest
from rise.score import Channel, ScoreKind, ScoreSpec
from rise.v1 import common_pb2, rise_pb2


def fields_from(msg: common_pb2.FieldMap | None) -> FieldMap:
    if msg is None:
        return FieldMap()
    return FieldMap(text_field=msg.text_field or "text", id_field=msg.id_field or "id",
                    prompt_field=msg.prompt_field or None,
                    response_field=msg.response_field or None,
                    chat_template=msg.chat_template)


def config_from(msg: common_pb2.SketchConfig) -> SketchConfig:
    mode = msg.mode or "sketch"
    if mode == "exact":
        raise InvalidInput("exact mode is for validation with the embedded CLI; use sketch")
    kw: dict[str, Any] = {"mode": mode, "seed": msg.seed, "weighting": msg.weighting or "mean",
                          "max_length": msg.max_length or constants.DEFAULT_MAX_LENGTH,
                          "temperature": msg.temperature or constants.DEFAULT_TEMPERATURE}
    if msg.topk_all:
        kw["topk"] = None
    elif msg.topk:
        kw["topk"] = msg.topk
    d = constants.DEFAULT_DIMS
    kw["dims"] = (msg.kr or d[0], msg.kh or d[1], msg.kg or d[2])
    return sketch_config(**kw)


def config_to(cfg: dict[str, Any]) -> common_pb2.SketchConfig:
    kr, kh, kg = cfg["dims"]
    return common_pb2.SketchConfig(
        mode=cfg["mode"], topk=cfg["topk"] or 0, topk_all=cfg["topk"] is None,
        temperature=cfg["temperature"], kr=kr, kh=kh, kg=kg, seed=cfg["seed"],
        weighting=cfg["weighting"], max_length=cfg["max_length"])


def spec_from(msg: common_pb2.Scoring | None) -> ScoreSpec:
    """The ScoreSpec of a Scoring message; unset fields take the defaults (both channels,
    cosine, lambda 0.5, ScoreSpec's centering default).  InvalidInput on bad combinations."""
    if msg is None:
        return ScoreSpec()
    lam = getattr(msg, "lambda") if msg.HasField("lambda") else constants.DEFAULT_LAMBDA
    # Any other string is refused by ScoreSpec itself (InvalidInput), hence the casts.
    return ScoreSpec(channel=cast(Channel, msg.channel or "both"),
                     score=cast(ScoreKind, msg.score or "cosine"), lam=lam,
                     center=msg.center if msg.HasField("center") else None)


def record_dicts(records: Any, fields: FieldMap) -> list[dict[str, Any]]:
    """Inline records as the dicts the data layer validates (empty id -> position)."""
    out = []
    for r in records:
        d: dict[str, Any] = {}
        if r.id:
            d[fields.id_field] = r.id
        if fields.prompt_field is not None and fields.response_field is not None:
            d[fields.prompt_field] = r.prompt
            d[fields.response_field] = r.response
        else:
            d[fields.text_field] = r.text
        out.append(d)
    return out


def job_to(job: dict[str, Any]) -> rise_pb2.Job:
    started = job["started_at"]
    end = job["finished_at"] or time.time()
    elapsed = max(end - started, 1e-9) if started else 0.0
    ex_rate = job["examples_done"] / elapsed if elapsed else 0.0
    tok_rate = job["tokens_done"] / elapsed if elapsed else 0.0
    left = max(job["examples_total"] - job["examples_done"], 0)
    eta = left / ex_rate if ex_rate > 0 and not job["finished_at"] else 0.0
    return rise_pb2.Job(
        id=job["id"], kind="JOB_KIND_" + job["kind"], state="JOB_STATE_" + job["state"],
        index=job["index"],
        shards_total=job["shards_total"], shards_done=job["shards_done"],
        examples_total=job["examples_total"], examples_done=job["examples_done"],
        tokens_done=job["tokens_done"], examples_per_second=ex_rate,
        tokens_per_second=tok_rate, eta_seconds=eta, created_at=job["created_at"],
        started_at=job["started_at"], finished_at=job["finished_at"],
        generation=job["generation"], error_code=job.get("error_code", ""),
        error_message=job.get("error_message", ""))


def index_to(name: str, pool: str, manifest: Manifest | None) -> rise_pb2.Index:
    if manifest is None:
        return rise_pb2.Index(name=name, pool=pool)
    m = manifest.model
    return rise_pb2.Index(
        name=name, pool=pool, generation=manifest.generation,
        live_count=manifest.live_count, tombstones=len(manifest.tombstones),
        shards=len(manifest.shards), bytes=manifest.total_bytes,
        model=rise_pb2.ModelIdentity(name=m.name, config_sha256=m.config_sha256,
                                     head_sha256=m.head_sha256,
                                     tokenizer_sha256=m.tokenizer_sha256,
                                     adapter_sha256=m.adapter_sha256 or ""),
        config=config_to(manifest.config.to_dict()),
        ingests=[rise_pb2.Ingest(generation=i.generation, dataset_uri=i.dataset_uri,
                                 dataset_sha256=i.dataset_sha256, records=i.records,
                                 truncated=i.truncated) for i in manifest.ingests])


def explanation_to(d: dict[str, Any], generation: int) -> rise_pb2.ExplainResponse:
    """An explanation's JSON form (``rise.explain.Explanation.to_dict``) as a message."""
    def tokens(ts: list[dict[str, Any]]) -> list[rise_pb2.ExplainToken]:
        return [rise_pb2.ExplainToken(position=t["position"], token_id=t["token_id"],
                                      text=t["text"], supervised=t["supervised"],
                                      contribution=t["contribution"]) for t in ts]

    sc = d["scoring"]
    return rise_pb2.ExplainResponse(
        query_id=d["query_id"], hit_id=d["hit_id"], score=d["score"],
        pair_total=d["pair_total"], centering=d["centering"],
        sketched_score=d["sketched_score"], channel=sc["channel"], score_kind=sc["score"],
        centered=sc["center"], channels=[rise_pb2.ExplainChannel(**c) for c in d["channels"]],
        query_tokens=tokens(d["query_tokens"]), hit_tokens=tokens(d["hit_tokens"]),
        pair_rows=d["pair_rows"], pair_cols=d["pair_cols"],
        pairs=[x for row in d["pairs"] for x in row],
        top_pairs=[rise_pb2.ExplainPair(query_position=p["query"], hit_position=p["hit"],
                                        contribution=p["contribution"])
                   for p in d["top_pairs"]],
        top_pairs_share=d["top_pairs_share"], top_pairs_abs_share=d["top_pairs_abs_share"],
        top_query_tokens=d["top_query_tokens"], top_hit_tokens=d["top_hit_tokens"],
        generation=generation, **{"lambda": sc["lambda"]})

