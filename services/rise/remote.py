"""``rise remote ...``: the platform's gateway from the command line, over rise.client.

    rise remote --gateway HOST:PORT --token TOKEN list
    rise remote index docs --data s3://rise/tenants/a/data/c.jsonl --pool smollm2 --wait
    rise remote attribute docs --queries q.jsonl --output hits.jsonl --top 5

``--gateway`` defaults to $RISE_GATEWAY (else 127.0.0.1:50051) and ``--token`` to
$RISE_TOKEN; both, ``--json`` and the TLS flags (``--tls``, ``--ca FILE`` for a gateway
certificate the system does not trust, ``--tls-server-name``) may stand before or after
the sub-verb.  ``attribute`` and ``value`` read records with the local CLI's field flags
and write its JSONL formats (``rise.cliutil``).  Errors are one line ``rise: error: ...``
with the exit code of the error class (rise.cli.main, which adds these verbs with
``add_remote_parser``, prints them).
Calls are retried on UNAVAILABLE within ``--timeout`` (rise.client); index, append, delete
and compact send a client request id, ``--request-id`` to reuse one: a script that runs
the same command again after a lost answer gets the first job, never a second one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from google.protobuf.descriptor import FieldDescriptor as F
from tqdm import tqdm

from rise import constants
from rise.client import (
    DEFAULT_TIMEOUT,
    TERMINAL,
    RiseClient,
    error_of_job,
    explanation_dict,
    state_name,
)
from rise.cliutil import (
    add_collapse_arg,
    add_field_args,
    add_scoring_args,
    check_output,
    emit,
    fields_from_args,
    read_ids,
    show_explanation,
    write_jsonl,
)
from rise.config import check_collapse, make_config, parse_dims
from rise.data import FieldMap, read_records
from rise.errors import InvalidInput, Unauthenticated

DEFAULT_GATEWAY = "127.0.0.1:50051"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, naming the full verb
        print(f"rise: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _connection_args(p: argparse.ArgumentParser, group: bool) -> None:
    """--gateway/--token/--json/--timeout/TLS: defaults on the ``remote`` group; on sub-verbs
    they only override what the group parsed (SUPPRESS leaves it in place)."""

    def d(value: Any) -> dict[str, Any]:
        return {"default": value if group else argparse.SUPPRESS}

    p.add_argument("--gateway", metavar="HOST:PORT",
                   help=f"gateway address (default: $RISE_GATEWAY or {DEFAULT_GATEWAY})",
                   **d(os.environ.get("RISE_GATEWAY") or DEFAULT_GATEWAY))
    p.add_argument("--token", help="bearer token of the tenant (default: $RISE_TOKEN)",
                   **d(os.environ.get("RISE_TOKEN", "")))
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout",
                   **d(False))
    p.add_argument("--timeout", type=float,
                   help=f"seconds per call, retries included (default: {DEFAULT_TIMEOUT:g})",
                   **d(DEFAULT_TIMEOUT))
    p.add_argument("--tls", action="store_true",
                   help="speak TLS to the gateway (the system's root certificates)", **d(False))
    p.add_argument("--ca", metavar="FILE",
                   help="PEM root certificate(s) the gateway's certificate must chain to "
                        "(implies --tls)", **d(None))
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name the gateway's certificate must carry, when it is not the "
                        "--gateway host (implies --tls)", **d(None))


def _client(a: argparse.Namespace) -> RiseClient:
    if not a.token:
        raise Unauthenticated("no token: pass --token or set RISE_TOKEN")
    secure = bool(a.tls or a.ca or a.tls_server_name)
    return RiseClient(a.gateway, a.token, timeout=a.timeout, secure=secure,
                      root_certificates=a.ca, server_name=a.tls_server_name)


def _name(a: argparse.Namespace) -> str:
    if a.name and a.index_opt and a.name != a.index_opt:
        raise InvalidInput(f"two index names given: {a.name!r} and {a.index_opt!r}")
    name = a.name or a.index_opt
    if not name:
        raise InvalidInput("the index name is required")
    return name


def to_dict(msg: Any) -> Any:
    """A message as JSON-able plain values: enums by short name, 64-bit ints as numbers."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        v = getattr(msg, f.name)
        repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == F.LABEL_REPEATED
        if f.type == F.TYPE_MESSAGE:
            if repeated:
                out[f.name] = [to_dict(x) for x in v]
            elif msg.HasField(f.name):
                out[f.name] = to_dict(v)
        elif f.type == F.TYPE_ENUM:
            name = f.enum_type.values_by_number[v].name
            out[f.name] = name.split("_STATE_")[-1].split("_KIND_")[-1]
        else:
            out[f.name] = list(v) if repeated else v
    return out


def _job_line(j: Any) -> str:
    line = (f"job {j.id} {state_name(j)} {j.index}: {j.shards_done}/{j.shards_total} shards, "
            f"{j.examples_done}/{j.examples_total} examples")
    if j.error_code:
        line += f" ({j.error_code}: {j.error_message})"
    return line


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def watch(client: Any, job: Any, desc: str = "job", interval: float = 1.0) -> Any:
    """Follow a job with a progress bar on stderr (shards, examples/s, ETA); raise the
    job's error unless it SUCCEEDED; return the final Job."""
    bar = tqdm(total=job.shards_total or None, desc=desc, unit="shard", dynamic_ncols=True,
               disable=None, file=sys.stderr)
    try:
        for update in client.watch_job(job.id, interval):
            job = update
            if job.shards_total and bar.total != job.shards_total:
                bar.total = job.shards_total
            unknown = job.eta_seconds <= 0 and job.state not in TERMINAL
            eta = "?" if unknown else _eta(job.eta_seconds)
            bar.set_postfix_str(f"{job.examples_done}/{job.examples_total} ex, "
                                f"{job.examples_per_second:,.1f} ex/s, ETA {eta}", refresh=False)
            bar.update(max(job.shards_done - bar.n, 0))
            if job.state in TERMINAL:
                break
    finally:
        bar.close()
    if state_name(job) != "SUCCEEDED":
        raise error_of_job(job)
    return job


def _job_out(a: argparse.Namespace, c: Any, job: Any, desc: str) -> None:
    if getattr(a, "wait", False):
        job = watch(c, job, desc)
    emit(a, to_dict(job), _job_line(job))


def cmd_index(a: argparse.Namespace) -> None:
    cfg = make_config(no_sketch=a.no_sketch, topk=a.topk, temperature=a.temperature,
                      dims=parse_dims(a.dims) if a.dims else None, seed=a.seed,
                      weighting=a.weighting, max_length=a.max_length).to_dict()
    kr, kh, kg = cfg["dims"]
    config = {"mode": cfg["mode"], "topk": cfg["topk"] or 0, "topk_all": cfg["topk"] is None,
              "temperature": cfg["temperature"], "kr": kr, "kh": kh, "kg": kg,
              "seed": cfg["seed"], "weighting": cfg["weighting"], "max_length": cfg["max_length"]}
    with _client(a) as c:
        job = c.create_index(_name(a), a.data, a.pool, fields=fields_from_args(a), config=config,
                             shard_size=a.shard_size, request_id=a.request_id)
        _job_out(a, c, job, "index")


def cmd_append(a: argparse.Namespace) -> None:
    given = a.text_field != "text" or a.id_field != "id" or a.prompt_field or a.chat_template
    with _client(a) as c:
        _job_out(a, c, c.append(_name(a), a.data, fields=fields_from_args(a) if given else None,
                                request_id=a.request_id), "append")


def cmd_delete(a: argparse.Namespace) -> None:
    ids = list(a.id or []) + (read_ids(a.ids) if a.ids else [])
    if not ids:
        raise InvalidInput("no ids: pass --ids FILE or --id ID")
    with _client(a) as c:
        idx = c.delete_examples(_name(a), ids, request_id=a.request_id)
    emit(a, dict(to_dict(idx), deleted=len(ids)),
          f"tombstoned {len(ids)} ids in generation {idx.generation} of {idx.name} "
          "(run rise remote compact to erase them)")


def cmd_compact(a: argparse.Namespace) -> None:
    with _client(a) as c:
        _job_out(a, c, c.compact(_name(a), request_id=a.request_id), "compact")


def cmd_import(a: argparse.Namespace) -> None:
    with _client(a) as c:
        idx = c.import_index(_name(a), a.pool, request_id=a.request_id)
    emit(a, to_dict(idx), f"imported {idx.name} for pool {idx.pool}: generation "
                          f"{idx.generation}, {idx.live_count} live examples, every shard "
                          "verified")


def cmd_drop(a: argparse.Namespace) -> None:
    with _client(a) as c:
        n = c.delete_index(_name(a))
    emit(a, {"index": _name(a), "objects_deleted": n}, f"deleted {_name(a)} ({n} objects)")


def _index_line(i: Any) -> str:
    return (f"{i.name}\tpool={i.pool}\tgeneration={i.generation}\tlive={i.live_count}\t"
            f"tombstones={i.tombstones}\tshards={i.shards}\tbytes={i.bytes}")


def cmd_list(a: argparse.Namespace) -> None:
    with _client(a) as c:
        idxs = c.list_indexes(a.page_size)
    emit(a, {"indexes": [to_dict(i) for i in idxs]},
          "\n".join(_index_line(i) for i in idxs) or "no indexes")


def cmd_show(a: argparse.Namespace) -> None:
    with _client(a) as c:
        i = c.get_index(_name(a))
    cf, m = i.config, i.model
    emit(a, to_dict(i), "\n".join([
        _index_line(i),
        f"model {m.name} (head {m.head_sha256[:12]}"
        + (f", adapter {m.adapter_sha256[:12]})" if m.adapter_sha256 else ")"),
        f"config mode={cf.mode} topk={'all' if cf.topk_all else cf.topk} tau={cf.temperature} "
        f"dims={[cf.kr, cf.kh, cf.kg]} seed={cf.seed} weighting={cf.weighting} "
        f"max_length={cf.max_length}",
    ] + [f"ingest {g.generation}: {g.records} records from {g.dataset_uri}" for g in i.ingests]))


def cmd_jobs(a: argparse.Namespace) -> None:
    with _client(a) as c:
        jobs = c.list_jobs(a.index_opt or "", a.limit, a.page_size)
    emit(a, {"jobs": [to_dict(j) for j in jobs]},
          "\n".join(_job_line(j) for j in jobs) or "no jobs")


def cmd_job(a: argparse.Namespace) -> None:
    with _client(a) as c:
        j = c.get_job(a.job_id)
    emit(a, to_dict(j), _job_line(j))


def cmd_watch(a: argparse.Namespace) -> None:
    with _client(a) as c:
        j = watch(c, c.get_job(a.job_id), "job", a.interval)
    emit(a, to_dict(j), _job_line(j))


def cmd_cancel(a: argparse.Namespace) -> None:
    with _client(a) as c:
        j = c.cancel_job(a.job_id)
    emit(a, to_dict(j), _job_line(j))


def _read(a: argparse.Namespace, path: str) -> list[dict[str, Any]]:
    """Records of a data file, validated and id-resolved exactly as the local CLI does."""
    fields = fields_from_args(a)
    out = []
    for r in read_records(path, fields):
        out.append({"id": r.id, "prompt": r.prompt, "response": r.response}
                   if fields.is_prompt_response else {"id": r.id, "text": r.text})
    return out


def _scoring(a: argparse.Namespace) -> dict[str, Any]:
    return {"channel": a.channel, "score": a.score, "lam": a.lam, "center": a.center,
            "chat_template": a.chat_template}


def cmd_attribute(a: argparse.Namespace) -> None:
    if a.collapse is not None and (a.generate or a.prompts):
        raise InvalidInput("--collapse applies to --queries, not to --generate")
    if a.generate or a.prompts:
        return _attribute_generated(a)
    given = [f for f, v in (("--max-new-tokens", a.max_new_tokens),
                            ("--temperature", a.temperature), ("--seed", a.seed)) if v is not None]
    if given:
        raise InvalidInput(f"{given[0]} needs --generate")
    if not a.queries:
        raise InvalidInput("--queries is required (or --generate --prompts FILE)")
    queries = _read(a, a.queries)

    def one(i: str, s: float, rec: Any) -> dict[str, Any]:
        return {"id": i, "score": s, **({"record": rec} if a.return_texts else {})}

    with _client(a) as c:
        if a.collapse is not None:
            grouped = c.attribute_collapsed(_name(a), queries, top=a.top,
                                            threshold=check_collapse(a.collapse),
                                            return_texts=a.return_texts, **_scoring(a))
            rows = [{"query_id": q, "results": [
                dict(one(*h), duplicates=[one(*d) for d in dups]) for h, dups in groups]}
                for q, groups in grouped]
        else:
            res = c.attribute(_name(a), queries, top=a.top, return_texts=a.return_texts,
                              **_scoring(a))
            rows = [{"query_id": q, "results": [one(*h) for h in hits]} for q, hits in res]
    write_jsonl(a.output, rows)
    emit(a, {"queries": len(rows), "output": a.output, "top": a.top},
          f"wrote top-{a.top} attributions of {len(rows)} queries to {a.output}")


def _attribute_generated(a: argparse.Namespace) -> None:
    if not (a.generate and a.prompts) or a.queries:
        raise InvalidInput("--generate attributes the model's responses to --prompts FILE "
                           "(and takes no --queries)")
    # A prompt is the text field, or the prompt field when one is named.
    prompts = [{"id": r.id, "text": r.text} for r in read_records(
        a.prompts, FieldMap(text_field=a.prompt_field or a.text_field, id_field=a.id_field))]
    with _client(a) as c:
        res = c.attribute_generated(
            _name(a), prompts, max_new_tokens=a.max_new_tokens or 0,
            temperature=a.temperature or 0.0, seed=a.seed or 0, top=a.top,
            return_texts=a.return_texts, **_scoring(a))
    rows = [{"query_id": q, "prompt": p, "generated": g, "results": [
        {"id": i, "score": s, **({"record": rec} if a.return_texts else {})}
        for i, s, rec in hits]} for q, p, g, hits in res]
    write_jsonl(a.output, rows)
    emit(a, {"queries": len(rows), "output": a.output, "top": a.top, "generated": True},
         f"generated responses to {len(rows)} prompts and wrote their top-{a.top} "
         f"attributions to {a.output}")


def cmd_explain(a: argparse.Namespace) -> None:
    if a.html:
        check_output(a.html)
    queries = _read(a, a.queries)
    with _client(a) as c:
        resp = c.explain(_name(a), queries, a.hit, query_id=a.query or "", top=a.top,
                         **_scoring(a))
    d = explanation_dict(resp)
    show_explanation(a, d)


def cmd_value(a: argparse.Namespace) -> None:
    if (a.select_fraction is None) != (a.select_output is None):
        raise InvalidInput("--select-fraction and --select-output go together")
    if a.output is None and a.values_uri is None:
        raise InvalidInput("give --output (values inline) or --values-uri (a Parquet file "
                           "in the store), or both")
    targets = _read(a, a.target)
    with _client(a) as c:
        resp = c.value_response(_name(a), targets, top=a.top,
                                select_fraction=a.select_fraction or 0,
                                selection_uri=a.select_output or "",
                                values_uri=a.values_uri or "", **_scoring(a))
    values, selected = [(h.id, h.score) for h in resp.values], resp.selected
    if a.values_uri is not None:
        sm = resp.summary
        out: dict[str, Any] = {"examples": resp.examples, "values_uri": resp.values_uri,
                               "summary": {"count": sm.count, "min": sm.min, "max": sm.max,
                                           "mean": sm.mean},
                               "top": [{"id": i, "value": v} for i, v in values]}
        if a.output is not None:
            write_jsonl(a.output, [{"id": i, "value": v} for i, v in values])
            out["output"] = a.output
        if a.select_fraction is not None:
            out.update(selected=selected, select_output=a.select_output)
        emit(a, out, f"valued {resp.examples} examples (min {sm.min:.4g}, max {sm.max:.4g}, "
                     f"mean {sm.mean:.4g}) -> {resp.values_uri}"
                     + (f"; selected {selected} -> {a.select_output}" if "selected" in out
                        else ""))
        return
    write_jsonl(a.output, [{"id": i, "value": v} for i, v in values])
    out = {"examples": len(values), "output": a.output}
    if a.select_fraction is not None:
        out.update(selected=selected, select_output=a.select_output)
    emit(a, out, f"valued {len(values)} examples against {len(targets)} targets -> {a.output}"
                  + (f"; selected {selected} -> {a.select_output}" if "selected" in out else ""))


def add_remote_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``rise remote`` and its sub-verbs to the CLI's subparsers."""
    rp = sub.add_parser("remote", help="talk to a RISE gateway (indexes, jobs, scoring)",
                        description=__doc__.split("\n\n")[0])
    _connection_args(rp, group=True)
    vs = rp.add_subparsers(dest="remote_verb", required=True, parser_class=_Parser)

    def verb(name: str, fn: Callable, help: str, index: str | None = "required"
             ) -> argparse.ArgumentParser:
        sp = vs.add_parser(name, help=help, description=help)
        _connection_args(sp, group=False)
        sp.set_defaults(fn=fn)
        if index == "required":
            sp.add_argument("name", nargs="?", metavar="INDEX", help="index name")
        if index is not None:
            sp.add_argument("--index", dest="index_opt", metavar="INDEX",
                            help="index name (instead of the positional one)")
        if name in ("index", "append", "delete", "compact", "import"):
            sp.add_argument("--request-id", metavar="ID",
                            help="client request id (up to 128 of [A-Za-z0-9._:-]; default: a "
                                 "fresh uuid4): running the same command again with the same "
                                 "id within 24 h returns the first run's job or index instead "
                                 "of doing it twice")
        return sp

    sp = verb("index", cmd_index, "start a job that sketches a dataset into a new index")
    sp.add_argument("--data", required=True, help="s3://bucket/key (or a path the workers read)")
    sp.add_argument("--pool", required=True, help="worker pool (model) that sketches")
    add_field_args(sp)
    sp.add_argument("--shard-size", type=int, default=0, help="records per shard (default: 1024)")
    sp.add_argument("--max-length", type=int, default=constants.DEFAULT_MAX_LENGTH)
    sp.add_argument("--topk", help=f"residual entries kept, or 'all' (default: {constants.DEFAULT_TOPK})")
    sp.add_argument("--temperature", type=float,
                    help=f"softmax temperature (default: {constants.DEFAULT_TEMPERATURE:g})")
    sp.add_argument("--dims", help="sketch widths KR,KH,KG")
    sp.add_argument("--seed", type=int, help="CountSketch seed (default: 0)")
    sp.add_argument("--weighting", choices=["mean", "sum"], default="mean")
    sp.add_argument("--no-sketch", action="store_true", help="store per-token factors")
    sp.add_argument("--wait", action="store_true", help="follow the job to its end")

    sp = verb("append", cmd_append, "start a job that adds a dataset to an index")
    sp.add_argument("--data", required=True)
    add_field_args(sp)
    sp.add_argument("--wait", action="store_true", help="follow the job to its end")

    sp = verb("delete", cmd_delete, "tombstone ids (one per line, or JSONL with id)")
    sp.add_argument("--ids", help="file of ids")
    sp.add_argument("--id", action="append", help="an id (repeatable)")

    sp = verb("compact", cmd_compact, "start a job that erases deleted examples")
    sp.add_argument("--wait", action="store_true", help="follow the job to its end")
    sp = verb("import", cmd_import, "register an index copied into the tenant's area "
              "(rise copy INDEX s3://<bucket>/tenants/<tenant>/indexes/<name>/) with a pool")
    sp.add_argument("--pool", required=True, help="worker pool whose model built the index")
    verb("drop", cmd_drop, "delete an index and all its objects")
    sp = verb("list", cmd_list, "the tenant's indexes", index=None)
    sp.add_argument("--page-size", type=int, default=0,
                    help="indexes per call (follows page tokens; default: the gateway's)")
    verb("show", cmd_show, "one index: generation, size, model, configuration")
    sp = verb("jobs", cmd_jobs, "the tenant's jobs, newest first", index="optional")
    sp.add_argument("--limit", type=int, default=0, help="at most this many (default: 100)")
    sp.add_argument("--page-size", type=int, default=0,
                    help="jobs per call (follows page tokens; default: the gateway's)")
    for name, fn, help in (("job", cmd_job, "one job's state and progress"),
                           ("watch", cmd_watch, "follow a job to its end"),
                           ("cancel", cmd_cancel, "ask a job to stop")):
        sp = verb(name, fn, help, index=None)
        sp.add_argument("job_id", metavar="JOB")
        if name == "watch":
            sp.add_argument("--interval", type=float, default=1.0, help="seconds per update")

    sp = verb("attribute", cmd_attribute, "top training examples for each query")
    sp.add_argument("--queries", help="JSONL or Parquet records")
    g = sp.add_argument_group("attribute a generation")
    g.add_argument("--generate", action="store_true",
                   help="the index's pool answers each prompt of --prompts, and its response "
                        "is attributed (response tokens supervised)")
    g.add_argument("--prompts", help="data file of prompts: the text field, or --prompt-field")
    g.add_argument("--max-new-tokens", type=int, help="longest response in tokens (default: 64)")
    g.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")
    g.add_argument("--seed", type=int, help="sampling seed; prompt i uses seed + i (default: 0)")
    sp.add_argument("--output", required=True, help="JSONL, one line per query")
    sp.add_argument("--top", type=int, default=10)
    sp.add_argument("--return-texts", action="store_true",
                    help="add each hit's original record to the output")
    add_collapse_arg(sp)
    add_field_args(sp)
    add_scoring_args(sp)

    sp = verb("explain", cmd_explain, "why an indexed example is a hit for a query: its score "
              "as a sum over (query token, training token) pairs")
    sp.add_argument("--queries", required=True, help="JSONL or Parquet records")
    sp.add_argument("--query", help="the query's id in the file (needed when it holds several)")
    sp.add_argument("--hit", required=True, help="id of the indexed example to explain")
    sp.add_argument("--top", type=int, default=10,
                    help="top tokens of each side and top pairs reported (default: 10)")
    sp.add_argument("--html", help="also write a self-contained HTML view to this file")
    add_field_args(sp)
    add_scoring_args(sp)

    sp = verb("value", cmd_value, "value every live example of an index for a target set")
    sp.add_argument("--target", required=True, help="JSONL or Parquet records")
    sp.add_argument("--output", help="JSONL, one line per live example (with --values-uri: "
                    "the best --top)")
    sp.add_argument("--values-uri", help="s3://<bucket>/tenants/<tenant>/....parquet: write every "
                    "value there (id, value, rank) and print the summary (large pools)")
    sp.add_argument("--top", type=int, default=0, help="only the best N (default: all)")
    sp.add_argument("--select-fraction", type=float, help="fraction of the pool to select")
    sp.add_argument("--select-output", help="s3://<bucket>/tenants/<tenant>/....jsonl")
    add_field_args(sp)
    add_scoring_args(sp)
    return rp
