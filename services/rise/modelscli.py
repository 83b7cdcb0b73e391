"""``rise models ...``: put a model folder into S3 for the worker pools, check it, list them.

    rise models push ./pythia-1.4b s3://rise-models/models/pythia-1.4b/
    rise models verify s3://rise-models/models/pythia-1.4b/ [--deep]
    rise models ls s3://rise-models/models/

S3 is reached as the services reach it: ``$RISE_S3_ENDPOINT`` (host:port or a URL),
``$RISE_S3_ACCESS_KEY``/``$RISE_S3_SECRET_KEY`` (else the provider chain: AWS_* variables,
a web identity, the instance's role), ``$RISE_S3_SECURE``, ``$RISE_S3_REGION``; the
bucket is the URI's.  ``push`` uploads every file, then ``rise-model.json`` (sizes and
sha256 of them all) last, so a prefix without a manifest is never taken for a model.
Errors are one line ``rise: error: ...`` with the error class's exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rise.cliutil import emit
from rise.errors import InvalidInput
from rise.modelsource import S3Models, Source, parse_source
from rise.settings import Settings


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _s3(uri: str) -> Source:
    src = parse_source(uri)
    if src.kind != "s3":
        raise InvalidInput(f"{uri!r}: models live under s3://bucket/prefix/")
    return src


def cmd_push(a: argparse.Namespace) -> None:
    src = _s3(a.uri)
    manifest = S3Models(Settings()).push(a.folder, src)
    emit(a, {"uri": src.uri, "files": len(manifest.files), "bytes": manifest.total_bytes},
         f"pushed {len(manifest.files)} files ({format_bytes(manifest.total_bytes)}) to "
         f"{src.uri}")


def cmd_verify(a: argparse.Namespace) -> None:
    src = _s3(a.uri)
    manifest = S3Models(Settings()).verify(src, deep=a.deep)
    how = "sizes and sha256" if a.deep else "sizes"
    emit(a, {"uri": src.uri, "files": len(manifest.files), "bytes": manifest.total_bytes,
             "checked": how},
         f"{src.uri}: {len(manifest.files)} files ({format_bytes(manifest.total_bytes)}) "
         f"match rise-model.json ({how})")


def cmd_ls(a: argparse.Namespace) -> None:
    src = _s3(a.uri)
    rows = S3Models(Settings()).list(src)
    emit(a, [{"uri": u, "files": n, "bytes": b} for u, n, b in rows],
         "\n".join(f"{u}  {n} files  {format_bytes(b)}" for u, n, b in rows)
         or f"no models under {src.uri}")


def add_models_parser(sub: Any) -> None:
    """``rise models push|verify|ls`` on the main parser's sub-parsers."""
    p = sub.add_parser("models", help="put model folders into S3 for the worker pools",
                       description="Put model folders into S3 for the worker pools (every "
                       "file, then rise-model.json: sizes and sha256), check them, list them.")
    verbs = p.add_subparsers(dest="models_verb", required=True, parser_class=type(p))

    def verb(name: str, fn: Callable[[argparse.Namespace], None],
             help: str) -> argparse.ArgumentParser:
        sp = verbs.add_parser(name, help=help, description=help)
        sp.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
        sp.set_defaults(fn=fn)
        return sp

    sp = verb("push", cmd_push, "upload a model folder and its manifest (rise-model.json)")
    sp.add_argument("folder", help="model folder (config.json, safetensors, tokenizer)")
    sp.add_argument("uri", help="s3://bucket/prefix/ of the model")
    sp = verb("verify", cmd_verify, "check a model in S3 against its manifest")
    sp.add_argument("uri", help="s3://bucket/prefix/ of the model")
    sp.add_argument("--deep", action="store_true",
                    help="download every file and check its sha256 (default: sizes only)")
    sp = verb("ls", cmd_ls, "list the models (prefixes with a manifest) under a prefix")
    sp.add_argument("uri", help="s3://bucket/prefix/")
