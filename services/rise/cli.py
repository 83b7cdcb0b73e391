"""The ``rise`` command line: the main job on one machine, a local folder as the store.

Every verb has ``--help`` and ``--json`` (a machine-readable summary on stdout); long work
shows a progress bar with examples/s and tokens/s on stderr.  Bad input prints one line
``rise: error: ...`` and exits non-zero (the code of the error class, see rise.errors).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tqdm import tqdm

from rise import __version__, constants
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
from rise.errors import InvalidInput, NotFound, RiseError
from rise.modelscli import add_models_parser
from rise.remote import add_remote_parser
from rise.store import LocalStore

# rise.api, rise.index, rise.ingest, rise.model, rise.score and rise.placement import torch:
# `import rise.api` takes ~1.6 s against ~0.25 s for everything above (measured wall time),
# so the verbs import them when they run and `rise --help` or `rise remote ...` never do.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        print(f"rise: error: {message} (see rise {self.prog.split()[-1]} --help)"
              if " " in self.prog else f"rise: error: {message}", file=sys.stderr)
        sys.exit(2)


class Progress:
    """tqdm bar counting examples, with tokens/s in the postfix; silent when not a TTY."""

    def __init__(self, total: int | None, desc: str) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, disable=None,
                        file=sys.stderr)
        self.tokens = 0
        self.examples = 0
        self.start = time.perf_counter()

    def __call__(self, examples: int, tokens: int) -> None:
        self.tokens += tokens
        self.examples += examples
        dt = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / dt:,.0f} tok/s", refresh=False)
        self.bar.update(examples)

    def close(self) -> dict[str, float]:
        self.bar.close()
        dt = max(time.perf_counter() - self.start, 1e-9)
        return {"seconds": round(dt, 3), "examples_per_s": round(self.examples / dt, 2),
                "tokens_per_s": round(self.tokens / dt, 1)}


def _add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required,
                   help="model folder (config.json + safetensors) or .gguf file")
    g.add_argument("--revision", help="model revision (hub cache only)")
    g.add_argument("--adapter", help="PEFT LoRA folder (adapter_config.json + "
                   "adapter_model.safetensors) merged into the model; an index built with "
                   "one is queried with the same one")
    g.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "bfloat16", "float16"],
                   help="weight dtype; head math runs in float32 or wider (default: float32)")
    g.add_argument("--device-map", default=None,
                   help="transformers device map, e.g. auto, cpu, cuda:0 (default: cpu)")
    g.add_argument("--batch-size", type=int, default=constants.DEFAULT_BATCH_SIZE,
                   help=f"records per forward pass (default: {constants.DEFAULT_BATCH_SIZE})")


def _load(a: argparse.Namespace):
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.model import load_model

    return load_model(a.model, revision=a.revision, dtype=a.dtype, device_map=a.device_map,
                      adapter=a.adapter)


def _open(path: str):
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.index import open_index

    if not os.path.isdir(path):
        raise NotFound(f"index {path!r} does not exist")
    return open_index(LocalStore(path))


def _spec(a: argparse.Namespace):
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.score import ScoreSpec

    return ScoreSpec(channel=a.channel, score=a.score, lam=a.lam, center=a.center)


def cmd_index(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.ingest import create_index

    cfg = make_config(exact=a.exact, no_sketch=a.no_sketch, topk=a.topk,
                      temperature=a.temperature, dims=parse_dims(a.dims) if a.dims else None,
                      seed=a.seed, weighting=a.weighting, max_length=a.max_length)
    fields = fields_from_args(a)
    if not os.path.exists(a.data):
        raise NotFound(f"data file {a.data!r} does not exist")
    lm = _load(a)
    bar: dict[str, Progress] = {}

    def on_plan(plan, summary) -> None:
        if summary.exact_bytes_estimate is not None:
            print(f"rise: {cfg.mode} mode stores ~{summary.exact_bytes_estimate / 2**20:.1f} MiB "
                  "of per-token factors", file=sys.stderr)
        bar["p"] = Progress(plan.n_records, "index")

    s = create_index(LocalStore(a.out), lm, a.data, fields, cfg, shard_size=a.shard_size,
                     batch_size=a.batch_size, exact_budget=int(a.exact_budget * 2**20),
                     progress=lambda e, t: bar["p"](e, t), on_plan=on_plan)
    speed = bar["p"].close()
    out = dict(s.__dict__, index=a.out, config=cfg.to_dict(), **speed)
    emit(a, out, f"indexed {s.records} records ({s.tokens} tokens, {s.truncated} truncated) "
                  f"into {a.out}: {s.shards_written} shards written, {s.shards_skipped} reused, "
                  f"{speed['examples_per_s']} ex/s, {speed['tokens_per_s']} tok/s")


def cmd_append(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.ingest import append

    idx = _open(a.index)
    fields = fields_from_args(a) if a.text_field != "text" or a.prompt_field else None
    lm = _load(a)
    bar: dict[str, Progress] = {}

    def on_plan(plan, _) -> None:
        bar["p"] = Progress(plan.n_records, "append")

    s = append(idx.store, lm, a.data, fields, batch_size=a.batch_size, on_plan=on_plan,
               progress=lambda e, t: bar["p"](e, t))
    speed = bar["p"].close()
    emit(a, dict(s.__dict__, **speed),
          f"appended {s.records} records as generation {s.generation} of {a.index}")


def cmd_delete(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.index import delete

    idx = _open(a.index)
    ids = read_ids(a.ids)
    gen = delete(idx.store, ids)
    emit(a, {"generation": gen, "deleted": len(ids)},
          f"tombstoned {len(ids)} ids in generation {gen} (run rise compact to erase them)")


def cmd_compact(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.api import compact

    idx = _open(a.index)
    gen = compact(idx.store)
    emit(a, {"generation": gen or idx.generation, "compacted": gen is not None},
          f"compacted into generation {gen}" if gen else "nothing to compact")


def cmd_ann(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.api import build_ann

    idx = _open(a.index)
    t0 = time.perf_counter()
    meta = build_ann(idx, kind=a.kind, lists=a.lists, pq_m=a.pq_m)
    emit(a, {"kind": meta.kind, "generation": meta.generation, "lists": meta.lists,
              "rows": meta.rows, "bytes": meta.faiss_bytes, "key": meta.faiss_key,
              "seconds": round(time.perf_counter() - t0, 3)},
          f"built {meta.kind} over {meta.rows} rows in {meta.lists} lists: "
          f"{meta.faiss_key} ({meta.faiss_bytes / 2**20:.1f} MiB)")


def cmd_verify(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.index import verify

    if not os.path.isdir(a.index):
        raise NotFound(f"index {a.index!r} does not exist")
    r = verify(LocalStore(a.index))
    lines = [f"generation {g}: {why}" for g, why in sorted(r.generations.items())]
    if not r.ok:
        lines.append(f"newest generation {r.latest} does not verify")
    emit(a, {"ok": r.ok, "current": r.current, "shards_checked": r.shards_checked,
              "generations": {str(g): w for g, w in r.generations.items()}},
          "\n".join(lines + [f"current generation: {r.current}"]))
    if not r.ok:
        sys.exit(7)


def cmd_inspect(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.api import inspect

    info = inspect(_open(a.index))
    c = info["config"]
    emit(a, info, "\n".join([
        f"index {a.index}: generation {info['generation']}, {info['live_count']} live examples, "
        f"{info['tombstones']} tombstoned, {info['shards']} shards, {info['bytes']:,} bytes",
        f"model {info['model']['name']} (head {info['model']['head_sha256'][:12]}, "
        + (f"adapter {info['model']['adapter_sha256'][:12]}, "
           if info["model"].get("adapter_sha256") else "") +
        f"vocab {info['model']['vocab']}, hidden {info['model']['hidden']})",
        f"config mode={c['mode']} topk={c['topk']} tau={c['temperature']} dims={c['dims']} "
        f"seed={c['seed']} weighting={c['weighting']} max_length={c['max_length']}",
    ] + [f"ingest {i['generation']}: {i['records']} records from {i['dataset_uri']}"
         for i in info["ingests"]]))


def cmd_attribute(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.api import attribute_approximate, attribute_sketched, sketch_queries

    spec = _spec(a)
    gen = _generate_spec(a)
    check_output(a.output)
    if a.collapse is not None:
        check_collapse(a.collapse)
        if gen is not None:
            raise InvalidInput("--collapse applies to --queries, not to --generate")
    if gen is not None:
        return _attribute_generated(a, spec, gen)
    idx = _open(a.index)
    fields = fields_from_args(a)
    records = read_records(a.queries, fields)
    lm = _load(a)
    p = Progress(len(records), "queries")
    qs = sketch_queries(idx, lm, records, fields, batch_size=a.batch_size, progress=p)
    speed = p.close()
    t0 = time.perf_counter()
    if a.approximate:  # the index's ANN index (rise.ann), hits reranked exactly
        if getattr(a, "collapse", None) is not None:
            raise InvalidInput("--approximate does not combine with --collapse")
        hits = attribute_approximate(idx, qs, spec, a.top, nprobe=a.nprobe)
    else:
        hits = attribute_sketched(idx, qs, spec, a.top, collapse=a.collapse)
    rows = [{"query_id": q, "results": [
        {"id": h.id, "score": h.score, **({"duplicates": [
            {"id": d.id, "score": d.score} for d in h.duplicates]} if a.collapse else {})}
        for h in hs]} for q, hs in zip(qs.ids, hits, strict=True)]
    write_jsonl(a.output, rows)
    emit(a, {"queries": len(rows), "output": a.output, "top": a.top,
              "score_seconds": round(time.perf_counter() - t0, 3), **speed},
          f"wrote top-{a.top} attributions of {len(rows)} queries to {a.output}")


def _generate_spec(a: argparse.Namespace):
    """The generation flags of ``rise attribute`` checked together; None without
    --generate."""
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.generate import DEFAULT_MAX_NEW_TOKENS, GenerateSpec

    given = [f for f, v in (("--max-new-tokens", a.max_new_tokens),
                            ("--temperature", a.temperature), ("--seed", a.seed))
             if v is not None]
    if not a.generate:
        if a.prompts or given:
            raise InvalidInput(f"{a.prompts and '--prompts' or given[0]} needs --generate")
        if not a.queries:
            raise InvalidInput("--queries is required (or --generate --prompts FILE)")
        return None
    if a.queries or not a.prompts:
        raise InvalidInput("--generate attributes the model's responses to --prompts FILE; "
                           "drop --queries")
    return GenerateSpec(max_new_tokens=DEFAULT_MAX_NEW_TOKENS if a.max_new_tokens is None
                        else a.max_new_tokens,
                        temperature=a.temperature or 0.0, seed=a.seed or 0)


def _attribute_generated(a: argparse.Namespace, spec, gen) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.api import attribute_generated

    idx = _open(a.index)
    # A prompt is the text field, or the prompt field when one is named (no response
    # needed: the model writes it).
    prompts = read_records(a.prompts, FieldMap(text_field=a.prompt_field or a.text_field,
                                               id_field=a.id_field))
    lm = _load(a)
    t0 = time.perf_counter()
    out = attribute_generated(idx, lm, prompts, gen, chat_template=a.chat_template, spec=spec,
                              top=a.top, batch_size=a.batch_size)
    rows = [{"query_id": r.id, "prompt": r.prompt, "generated": r.response,
             "results": [{"id": h.id, "score": h.score} for h in hs]} for r, hs in out]
    write_jsonl(a.output, rows)
    emit(a, {"queries": len(rows), "output": a.output, "top": a.top, "generated": True,
             "seconds": round(time.perf_counter() - t0, 3)},
         f"generated responses to {len(rows)} prompts and wrote their top-{a.top} "
         f"attributions to {a.output}")


def cmd_value(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.api import check_fraction, select_top_fraction, sketch_queries, value_sketched

    spec = _spec(a)
    if (a.select_fraction is None) != (a.select_output is None):
        raise InvalidInput("--select-fraction and --select-output go together")
    check_output(a.output)
    if a.select_output:
        check_fraction(a.select_fraction, "--select-fraction")
        check_output(a.select_output)
    idx = _open(a.index)
    fields = fields_from_args(a)
    records = read_records(a.target, fields)
    lm = _load(a)
    p = Progress(len(records), "targets")
    qs = sketch_queries(idx, lm, records, fields, batch_size=a.batch_size, progress=p)
    speed = p.close()
    values = value_sketched(idx, qs, spec)
    write_jsonl(a.output, [{"id": h.id, "value": h.score} for h in values])
    out: dict[str, Any] = {"examples": len(values), "output": a.output, **speed}
    if a.select_fraction is not None:
        out["selected"] = select_top_fraction(idx, values, a.select_fraction, a.select_output)
        out["select_output"] = a.select_output
    emit(a, out, f"valued {len(values)} examples against {len(records)} targets -> {a.output}"
                  + (f"; selected {out['selected']} -> {a.select_output}"
                     if "selected" in out else ""))


def cmd_explain(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.api import explain, pick_query

    spec = _spec(a)
    if a.html:
        check_output(a.html)
    if a.top < 1:
        raise InvalidInput("--top must be >= 1")
    idx = _open(a.index)
    fields = fields_from_args(a)
    query = pick_query(read_records(a.queries, fields), a.query)
    lm = _load(a)
    e = explain(idx, lm, query, a.hit, fields=fields, spec=spec, top=a.top,
                batch_size=a.batch_size)
    d = e.to_dict()
    show_explanation(a, d)


def cmd_copy(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.datasets import store_at
    from rise.index import copy_index, verify
    from rise.settings import Settings

    settings = Settings()
    src, dst = store_at(a.src, settings), store_at(a.dst, settings)
    if isinstance(src, LocalStore) and not src.root.is_dir():
        raise NotFound(f"index {a.src!r} does not exist")
    bar = tqdm(desc="copy", unit="shard", dynamic_ncols=True, disable=None, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    r = copy_index(src, dst, progress=progress)
    bar.close()
    check = verify(dst)
    if check.current != r.generation:
        raise RiseError(f"the copy at {a.dst} does not verify: "
                        f"{check.generations.get(r.generation)}")
    emit(a, {"source": a.src, "destination": a.dst, "generation": r.generation,
             "shards": r.shards, "copied": r.copied, "bytes": r.bytes, "verified": True,
             "seconds": round(time.perf_counter() - t0, 3)},
         f"copied generation {r.generation} ({r.shards} shards, {r.copied} written, "
         f"{r.bytes:,} bytes) from {a.src} to {a.dst}; every shard verified by sha256")


def cmd_plan(a: argparse.Namespace) -> None:
    # start-up: torch only in the verbs that need it (note at the top)
    from rise.placement import format_placement, parse_bytes, plan_placement

    placement = plan_placement(
        a.model, gpus=a.gpus, gpu_memory_bytes=parse_bytes(a.gpu_memory),
        batch_size=a.batch_size, max_length=a.max_length, dtype=a.dtype,
        dims=parse_dims(a.dims) if a.dims else constants.DEFAULT_DIMS)
    emit(a, placement.to_dict(), format_placement(placement))
    if not placement.fits:
        sys.exit(9)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rise", description="Readout Influence Sketching Estimator: attribution "
                "and valuation of training data from the LM head.")
    p.add_argument("--version", action="version", version=f"rise {__version__}")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    def verb(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
        sp.set_defaults(fn=fn)
        return sp

    sp = verb("index", cmd_index, "sketch a data file into a new index folder")
    _add_model(sp)
    sp.add_argument("--data", required=True, help="JSONL or Parquet records")
    sp.add_argument("--out", required=True, help="index folder (created)")
    add_field_args(sp)
    sp.add_argument("--max-length", type=int, default=constants.DEFAULT_MAX_LENGTH)
    sp.add_argument("--topk", help=f"residual entries kept, or 'all' (default: {constants.DEFAULT_TOPK})")
    sp.add_argument("--temperature", type=float,
                    help=f"softmax temperature (default: {constants.DEFAULT_TEMPERATURE:g})")
    sp.add_argument("--dims", help="sketch widths KR,KH,KG (default: "
                    f"{','.join(map(str, constants.DEFAULT_DIMS))})")
    sp.add_argument("--seed", type=int, help="CountSketch seed (default: 0)")
    sp.add_argument("--weighting", choices=["mean", "sum"], default="mean")
    mode = sp.add_mutually_exclusive_group()
    mode.add_argument("--exact", action="store_true",
                      help="K = V, tau = 1, no sketch: exact head-gradient inner products")
    mode.add_argument("--no-sketch", action="store_true",
                      help="keep K and tau but store per-token factors: the sketch's ceiling")
    sp.add_argument("--exact-budget", type=float, default=constants.DEFAULT_EXACT_BUDGET_BYTES / 2**20,
                    help="MiB of per-token factors exact/no-sketch mode may store (default: 2048)")
    sp.add_argument("--shard-size", type=int, default=constants.DEFAULT_SHARD_SIZE)

    sp = verb("attribute", cmd_attribute, "top training examples for each query")
    sp.add_argument("--index", required=True)
    _add_model(sp)
    sp.add_argument("--queries", help="data file of queries (text or prompt/response records)")
    g = sp.add_argument_group("attribute a generation")
    g.add_argument("--generate", action="store_true",
                   help="the model answers each prompt of --prompts, and its response is "
                        "attributed (response tokens supervised)")
    g.add_argument("--prompts", help="data file of prompts: the text field, or the prompt "
                   "field with --prompt-field/--response-field")
    g.add_argument("--max-new-tokens", type=int,
                   help="longest response in tokens (default: 64)")
    g.add_argument("--temperature", type=float,
                   help="sample at this temperature (default: greedy)")
    g.add_argument("--seed", type=int, help="sampling seed; prompt i uses seed + i (default: 0)")
    add_collapse_arg(sp)
    sp.add_argument("--output", required=True, help="JSONL, one line per query")
    sp.add_argument("--top", type=int, default=10)
    add_field_args(sp)
    add_scoring_args(sp)
    sp.add_argument("--approximate", action="store_true",
                    help="search the index's ANN index (rise ann build) instead of scanning "
                    "every shard; hits are reranked exactly")
    sp.add_argument("--nprobe", type=int,
                    help="with --approximate: inverted lists probed (default: all, which "
                    "gives the exact answer with ivf-flat)")

    sp = verb("value", cmd_value, "value every indexed example for a target set")
    sp.add_argument("--index", required=True)
    _add_model(sp)
    sp.add_argument("--target", required=True)
    sp.add_argument("--output", required=True, help="JSONL, one line per live example")
    sp.add_argument("--select-fraction", type=float, help="fraction of the pool to select")
    sp.add_argument("--select-output", help="data file of the selected original records")
    add_field_args(sp)
    add_scoring_args(sp)

    sp = verb("append", cmd_append, "add a data file to an index as a new generation")
    sp.add_argument("--index", required=True)
    _add_model(sp)
    sp.add_argument("--data", required=True)
    add_field_args(sp)

    sp = verb("delete", cmd_delete, "tombstone ids (one per line, or JSONL with id)")
    sp.add_argument("--index", required=True)
    sp.add_argument("--ids", required=True)

    sp = verb("compact", cmd_compact, "rewrite shards to erase deleted examples")
    sp.add_argument("index")
    sp = verb("ann", cmd_ann, "approximate search: build an ANN index (FAISS IVF) of the "
              "index's current shards beside them (needs rise[ann])")
    sp.add_argument("action", choices=["build"])
    sp.add_argument("index")
    sp.add_argument("--kind", choices=["ivf-flat", "ivf-pq"], default="ivf-flat")
    sp.add_argument("--lists", type=int, help="inverted lists (default: about sqrt(rows))")
    sp.add_argument("--pq-m", type=int, default=64, help="ivf-pq: bytes per row")
    sp = verb("verify", cmd_verify, "check every shard of every generation")
    sp.add_argument("index")
    sp = verb("inspect", cmd_inspect, "summarise an index")
    sp.add_argument("index")

    sp = verb("explain", cmd_explain, "why a training example is a hit for a query: its score "
              "as a sum over (query token, training token) pairs")
    sp.add_argument("--index", required=True)
    _add_model(sp)
    sp.add_argument("--queries", required=True, help="data file holding the query")
    sp.add_argument("--query", help="the query's id in the file (needed when it holds several)")
    sp.add_argument("--hit", required=True, help="id of the indexed example to explain")
    sp.add_argument("--top", type=int, default=10,
                    help="top tokens of each side and top pairs reported (default: 10)")
    sp.add_argument("--html", help="also write a self-contained HTML view to this file")
    add_field_args(sp)
    add_scoring_args(sp)

    sp = verb("copy", cmd_copy, "copy an index between a folder and S3 (either way), "
              "verified by sha256; the manifest is written last")
    sp.add_argument("src", help="index folder, or s3://bucket/prefix/ (RISE_S3_ENDPOINT, "
                    "RISE_S3_ACCESS_KEY, RISE_S3_SECRET_KEY)")
    sp.add_argument("dst", help="an empty place: folder or s3://bucket/prefix/")

    sp = verb("plan", cmd_plan, "will a model fit these GPUs? placement, memory and storage")
    sp.add_argument("--model", required=True, help="model folder or config.json")
    sp.add_argument("--gpus", type=int, default=1)
    sp.add_argument("--gpu-memory", default="80GiB")
    sp.add_argument("--batch-size", type=int, default=constants.DEFAULT_BATCH_SIZE)
    sp.add_argument("--max-length", type=int, default=constants.DEFAULT_MAX_LENGTH)
    sp.add_argument("--dtype", default="bfloat16")
    sp.add_argument("--dims", help="sketch widths KR,KH,KG")

    add_models_parser(sub)
    add_remote_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args.fn(args)
    except RiseError as e:
        print(f"rise: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("rise: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
