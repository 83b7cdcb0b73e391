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
