"""What the local verbs (``rise.cli``) and the remote ones (``rise.remote``) share: the
record-field and scoring flags, id files, JSONL output and the summary line.

Both command modules import this one; neither imports the other's helpers.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

from rise import constants
from rise.data import FieldMap
from rise.errors import InvalidInput, NotFound
from rise.explainview import render_html


def add_field_args(p: argparse.ArgumentParser) -> None:
    """The flags that say which fields of a record hold its id and text."""
    g = p.add_argument_group("record fields")
    g.add_argument("--text-field", default="text", help="field holding plain text (default: text)")
    g.add_argument("--id-field", default="id", help="field holding the id (default: id)")
    g.add_argument("--prompt-field", help="prompt field of prompt/response records")
    g.add_argument("--response-field", help="response field (supervised tokens)")
    g.add_argument("--chat-template", action="store_true",
                   help="render prompts with the tokenizer's chat template")


def fields_from_args(a: argparse.Namespace) -> FieldMap:
    """The FieldMap of the flags ``add_field_args`` added."""
    return FieldMap(text_field=a.text_field, id_field=a.id_field, prompt_field=a.prompt_field,
                    response_field=a.response_field, chat_template=a.chat_template)


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The flags of a ScoreSpec: channel, raw or cosine, lambda, pool-mean centering."""
    g = p.add_argument_group("scoring")
    g.add_argument("--channel", choices=["rh", "gh", "both"], default="both")
    g.add_argument("--score", choices=["raw", "cosine"], default="cosine")
    g.add_argument("--lambda", dest="lam", type=float, default=constants.DEFAULT_LAMBDA,
                   help="weight of RH in the combined cosine score (default: 0.5)")
    g.add_argument("--center", action=argparse.BooleanOptionalAction, default=None,
                   help="center sketches by the pool mean before cosine (default: on for "
                        "cosine scores of a sketched index with live examples, off for raw "
                        "scores and exact/no-sketch indexes)")


def add_collapse_arg(p: argparse.ArgumentParser) -> None:
    """``--collapse [THRESHOLD]``: near-duplicate hits shown once, with their duplicates."""
    p.add_argument("--collapse", nargs="?", type=float, const=constants.DEFAULT_COLLAPSE,
                   default=None, metavar="THRESHOLD",
                   help="group hits whose sketches have a combined cosine of at least "
                        f"THRESHOLD (default {constants.DEFAULT_COLLAPSE}) into one result with "
                        "its duplicates, so the top N are N distinct sources")


def read_ids(path: str) -> list[str]:
    """Ids from a file: one per line, or JSONL lines with an ``id``; blank lines skipped."""
    if not os.path.exists(path):
        raise NotFound(f"ids file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    v = json.loads(line)["id"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InvalidInput(f"{path} line {n}: expected an id or {{\"id\": ...}}") from None
                out.append(str(v))
            else:
                out.append(line)
    if not out:
        raise InvalidInput(f"{path}: no ids")
    return out


def check_output(path: str) -> None:
    """Fail before any work when the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise NotFound(f"output folder {folder!r} does not exist")


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Atomic: a crash leaves the old file or none, never half of one."""
    check_output(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def emit(a: argparse.Namespace, summary: Any, text: str) -> None:
    """The verb's result on stdout: ``summary`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(summary, sort_keys=True) if a.json else text)


def write_text(path: str, text: str) -> None:
    """Atomic, like ``write_jsonl``."""
    check_output(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def show_explanation(a: argparse.Namespace, d: dict[str, Any]) -> None:
    """What ``rise explain`` and ``rise remote explain`` print: the page with ``--html``,
    then the explanation as JSON with ``--json``, else as text."""
    if a.html:
        write_text(a.html, render_html(d))
    if a.json:
        print(json.dumps(d, ensure_ascii=False, sort_keys=True))
        return
    print(format_explanation(d, a.top))
    if a.html:
        print(f"wrote {a.html}")


def format_explanation(d: dict[str, Any], top: int) -> str:
    """The text form of an explanation (``Explanation.to_dict()``, local or remote): the
    score's lines, the top tokens of each side and the top pairs."""
    q = {t["position"]: t for t in d["query_tokens"]}
    x = {t["position"]: t for t in d["hit_tokens"]}
    sc = d["scoring"]
    out = [f"query {d['query_id']!r} -> hit {d['hit_id']!r}: score {d['score']:.6f} "
           f"({sc['score']}, channel {sc['channel']}, lambda {sc['lambda']:g}"
           f"{', centered' if sc['center'] else ''})",
           f"  token pairs      {d['pair_total']:+.6f}",
           f"  centering        {d['centering']:+.6f}  (pool mean; not a token pair)",
           f"  sketched score   {d['sketched_score']:.6f}  (what attribution reports)"]
    for c in d["channels"]:
        out.append(f"  {c['channel'].upper()} x {c['weight']:g}: {c['value']:+.6f} = pairs "
                   f"{c['pairs']:+.6f} + centering {c['centering']:+.6f}")
    for name, pos, toks in (("query", d["top_query_tokens"], q), ("hit", d["top_hit_tokens"], x)):
        out.append(f"top {name} tokens:")
        out += [f"  {p:4d} {toks[p]['text']!r:>16} {toks[p]['contribution']:+.6f}"
                for p in pos[:top]]
    out.append(f"top {len(d['top_pairs'])} pairs ({100 * d['top_pairs_share']:.1f}% of the "
               f"pair score, {100 * d['top_pairs_abs_share']:.1f}% of its absolute mass):")
    out += [f"  {q[p['query']]['text']!r:>14} ({p['query']:3d}) x "
            f"{x[p['hit']]['text']!r:<14} ({p['hit']:3d}) {p['contribution']:+.6f}"
            for p in d["top_pairs"]]
    return "\n".join(out)
