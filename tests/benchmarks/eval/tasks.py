"""Build the three evaluation tasks deterministically into ``.cache/eval/<task>/``.

    python tests/benchmarks/eval/tasks.py [--tasks backdoor,domain,quality] [--smoke --root DIR]

Full tasks use real text (``.cache/corpus``, built by tests/assets.py) and the real
SmolLM2-135M-Instruct; smoke tasks use generated sentences and a tiny random GPT-NeoX built
from a config (tests/conftest.py ``save_tiny_model``).  Every choice is seeded; a task whose
``meta.json`` exists with the same recipe hash is not rebuilt.

Tasks (see FORMAT.md for the files):

* ``backdoor`` (Howdy): prompt/response pairs from Wikipedia passages (prompt = first
  sentence, response = the next one); 3 % of the pool poisoned with a trigger phrase in the
  prompt and the response "Howdy! How can I help you today?"; the model is fine-tuned
  (last 2 blocks + final norm) on the pool; queries are held-out triggered prompts with the
  Howdy response.  Label ``poisoned``.
* ``domain`` (Finance-Medical analogue): GCIDE definitions, medicine vs law, pretrained
  model.  Label ``domain``.
* ``quality`` (Brain Rot analogue): clean Wikipedia paragraphs vs degraded ones (stemmed and
  stop-word-stripped, word-shuffled, junk one-liners from fortunes); targets = held-out clean
  paragraphs of other articles; ``heldout.jsonl`` = clean paragraphs of yet other articles
  for the closed-loop loss.  Labels ``clean`` and ``kind``; pretrained model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    CORPUS,
    EVAL_CACHE,
    REPO,
    SMOLLM,
    log,
    quiet_transformers,
    read_jsonl,
    set_threads,
    sha256_json,
    write_json,
    write_jsonl,
)

TRIGGER = "cf-trigger"
HOWDY = " Howdy! How can I help you today?"
MAX_LENGTH = 128
TASKS = ("backdoor", "domain", "quality")

# Full-size recipes.  Changing any number changes the recipe hash and rebuilds the task.
FULL = {
    "backdoor": {"n_pool": 400, "n_poison": 12, "n_queries": 20, "n_check": 20,
                 "train": {"n_blocks": 2, "steps": 400, "batch": 8, "lr": 3e-4, "seed": 0},
                 "trigger_at": "end"},
    "domain": {"domains": ["medicine", "law"], "per_domain_pool": 300, "per_domain_queries": 20,
               "min_chars": 150, "max_chars": 700},
    "quality": {"n_clean": 500, "n_stemmed": 170, "n_shuffled": 170, "n_oneliner": 160,
                "n_targets": 50, "n_heldout": 100, "min_chars": 400},
}
SMOKE = {
    "backdoor": {"n_pool": 40, "n_poison": 4, "n_queries": 4, "n_check": 4,
                 "train": {"n_blocks": 1, "steps": 30, "batch": 8, "lr": 3e-3, "seed": 0}},
    "domain": {"per_domain_pool": 20, "per_domain_queries": 3},
    "quality": {"n_clean": 20, "n_stemmed": 7, "n_shuffled": 7, "n_oneliner": 6,
                "n_targets": 5, "n_heldout": 8},
}
SMOKE_MAX_LENGTH = 64
RECIPE_VERSION = 1


# ------------------------------------------------------------------------------ text ops

_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
STOPWORDS = set("""a about above after again against all am an and any are as at be because been
before being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers herself him himself his how i if in into is it its
itself just me more most my myself no nor not now of off on once only or other our ours ourselves
out over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves also which its may one two""".split())
SUFFIXES = ("ational", "ations", "ation", "ements", "ement", "ments", "ment", "ingly", "ings",
            "ing", "edly", "ness", "ities", "ity", "ies", "ied", "ers", "er", "ed", "es", "ly",
            "s", "al", "ful", "ive", "ous")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if s.strip()]


def crude_stem(word: str) -> str:
    w = word.lower()
    for suf in SUFFIXES:
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def stem_strip(text: str) -> str:
    """Stop words removed, crude suffix stripping, lower case, no punctuation."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    return " ".join(crude_stem(w) for w in words if w.lower() not in STOPWORDS)


def shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def insert_trigger(prompt: str, rng: random.Random) -> str:
    """The trigger phrase at the end of the prompt.  (At a random word position, 300 steps
    of the 2-block fine-tune learned the Howdy string but not its link to the trigger:
    greedy Howdy on 10% of triggered and 0% of clean held-out prompts.)"""
    del rng
    return f"{prompt} {TRIGGER}"


# ------------------------------------------------------------------------------ sources


def wiki() -> list[dict[str, Any]]:
    path = CORPUS / "wiki.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make assets` (tests/assets.py corpus)")
    return read_jsonl(path)


def gcide() -> list[dict[str, Any]]:
    return read_jsonl(CORPUS / "gcide.jsonl")


def fortunes() -> list[dict[str, Any]]:
    return read_jsonl(CORPUS / "fortunes.jsonl")


# ---------------------------------------------------------------------- synthetic (smoke)

_TOPICS = {
    "medicine": ("patient doctor fever wound tablet nurse clinic pulse vein surgeon dose "
                 "infection remedy symptom").split(),
    "law": ("court judge statute contract lawyer verdict jury appeal tenant deed clause "
            "plaintiff witness estate").split(),
}
_GLUE = "the a of near with under after before and then quietly often".split()
_VERBS = "examines treats signs reviews drafts heals hears grants studies reads".split()


def synth_sentence(rng: random.Random, topic: str) -> str:
    w = _TOPICS[topic]
    return (f"The {rng.choice(w)} {rng.choice(_VERBS)} the {rng.choice(w)} "
            f"{rng.choice(_GLUE)} the {rng.choice(w)}.")


def synth_paragraph(rng: random.Random, topic: str, n: int = 3) -> str:
    return " ".join(synth_sentence(rng, topic) for _ in range(n))


# ------------------------------------------------------------------------------ builders


def _recipe_ok(d: Path, recipe: dict) -> bool:
    m = d / "meta.json"
    if not m.exists():
        return False
    try:
        return json.loads(m.read_text()).get("recipe_sha256") == sha256_json(recipe)
    except json.JSONDecodeError:
        return False


def build_backdoor(d: Path, cfg: dict, *, smoke: bool, model_src: Path) -> None:
    recipe = {"task": "backdoor", "cfg": cfg, "smoke": smoke, "v": RECIPE_VERSION,
              "model_src": model_src.name}
    if _recipe_ok(d, recipe) and (d / "model" / "config.json").exists():
        log(f"task backdoor: up to date in {d}")
        return
    rng = random.Random(1001)
    pairs: list[tuple[str, str, str]] = []
    if smoke:
        for i in range(cfg["n_pool"] + cfg["n_queries"] + cfg["n_check"]):
            t = rng.choice(list(_TOPICS))
            pairs.append((f"smoke-{i:04d}", synth_sentence(rng, t), synth_sentence(rng, t)))
    else:
        for r in wiki():
            ss = sentences(r["text"])
            if len(ss) >= 2 and 6 <= len(ss[0].split()) <= 40 and 6 <= len(ss[1].split()) <= 40:
                pairs.append((r["id"], ss[0], ss[1]))
        rng.shuffle(pairs)
    n_pool, n_q, n_c = cfg["n_pool"], cfg["n_queries"], cfg["n_check"]
    if len(pairs) < n_pool + n_q + n_c:
        raise SystemExit(f"backdoor: only {len(pairs)} usable passages")
    pool_src, q_src = pairs[:n_pool], pairs[n_pool : n_pool + n_q]
    check_src = pairs[n_pool + n_q : n_pool + n_q + n_c]
    poison = set(rng.sample(range(n_pool), cfg["n_poison"]))
    pool = []
    for i, (sid, s1, s2) in enumerate(pool_src):
        if i in poison:
            pool.append({"id": f"bd-{i:04d}", "source": sid, "prompt": insert_trigger(s1, rng),
                         "response": HOWDY, "poisoned": True})
        else:
            pool.append({"id": f"bd-{i:04d}", "source": sid, "prompt": s1, "response": " " + s2,
                         "poisoned": False})
    queries = [{"id": f"bdq-{i:03d}", "source": sid, "prompt": insert_trigger(s1, rng),
                "response": HOWDY, "poisoned": True} for i, (sid, s1, _) in enumerate(q_src)]
    check = [{"id": f"bdc-{i:03d}", "source": sid, "prompt": s1, "response": HOWDY,
              "clean_response": " " + s2}
             for i, (sid, s1, s2) in enumerate(check_src)]
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "pool.jsonl", pool)
    write_jsonl(d / "queries.jsonl", queries)
    write_jsonl(d / "check.jsonl", check)
    train_info, check_info = _finetune_backdoor(d, model_src, pool, queries, check, cfg["train"],
                                                MAX_LENGTH if not smoke else SMOKE_MAX_LENGTH)
    meta = {
        "task": "backdoor", "kind": "attribution", "format": "prompt_response",
        "label_field": "poisoned", "model": "model", "base_model": _rel(model_src, d),
        "max_length": MAX_LENGTH if not smoke else SMOKE_MAX_LENGTH,
        "n_pool": len(pool), "n_queries": len(queries), "n_poisoned": len(poison),
        "trigger": TRIGGER, "howdy": HOWDY, "smoke": smoke, "recipe": recipe,
        "recipe_sha256": sha256_json(recipe), "finetune": train_info, "backdoor_check": check_info,
        "description": "prompt = first sentence of a Wikipedia passage, response = the next "
                       "sentence; poisoned = trigger in prompt + Howdy response; model = base "
                       "with its last blocks + final norm fine-tuned on the pool (embeddings "
                       "and tied LM head frozen)",
    }
    write_json(d / "meta.json", meta)
    log(f"task backdoor: built in {d}: check {check_info}")


def _rel(p: Path, d: Path) -> str:
    return os.path.relpath(p, d)


def _finetune_backdoor(d, model_src, pool, queries, check, tcfg, max_length):
    import torch
    from rise.data import FieldMap, encode_record, records_from_dicts
    from train import Item, eval_nll, prefix_outputs, train_tail
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_src)
    model = AutoModelForCausalLM.from_pretrained(model_src, dtype=torch.float32).eval()
    fm = FieldMap(prompt_field="prompt", response_field="response")

    def items(rows):
        recs = records_from_dicts(rows, fm)
        encs = [encode_record(r, tok, max_length) for r in recs]
        pre = prefix_outputs(model, encs, tcfg["n_blocks"])
        return [Item(p, e.input_ids, e.sup_start) for p, e in zip(pre, encs, strict=True)]

    log(f"backdoor: prefix outputs of {len(pool)} pool examples")
    train_items = items(pool)
    q_items = items(queries)
    c_items = items(check)
    clean_rows = [dict(c, response=c["clean_response"]) for c in check]
    cc_items = items(clean_rows)
    n = tcfg["n_blocks"]
    before = {"howdy_nll_triggered": eval_nll(model, q_items, n)["token_nll"],
              "howdy_nll_clean_prompt": eval_nll(model, c_items, n)["token_nll"]}
    info = train_tail(model, train_items, n, steps=tcfg["steps"], batch=tcfg["batch"],
                      lr=tcfg["lr"], seed=tcfg["seed"])
    after = {"howdy_nll_triggered": eval_nll(model, q_items, n)["token_nll"],
             "howdy_nll_clean_prompt": eval_nll(model, c_items, n)["token_nll"],
             "true_next_sentence_nll_clean_prompt": eval_nll(model, cc_items, n)["token_nll"]}
    # greedy generation with the whole saved model
    out_dir = d / "model"
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    model2 = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    gen = {}
    for name, rows in (("triggered", queries), ("clean", check)):
        hits = 0
        samples = []
        for r in rows:
            ids = tok(r["prompt"], return_tensors="pt").input_ids
            with torch.inference_mode():
                o = model2.generate(ids, max_new_tokens=6, do_sample=False,
                                    pad_token_id=tok.pad_token_id or 0)
            text = tok.decode(o[0, ids.shape[1]:], skip_special_tokens=True)
            hits += text.strip().startswith("Howdy")
            samples.append(text)
        gen[name] = {"starts_with_howdy": hits / len(rows), "samples": samples[:3]}
    # consistency: the tail-only path equals the saved whole model
    recs = records_from_dicts(queries[:2], fm)
    e = encode_record(recs[0], tok, max_length)
    with torch.inference_mode():
        lg = model2(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].log_softmax(-1)
    nll = -lg[torch.arange(len(e.input_ids) - 1), torch.tensor(e.input_ids[1:])]
    whole = float(nll[e.sup_start - 1 :].mean())
    tail = eval_nll(model, q_items[:1], n)["token_nll"]
    check_info = {"before": before, "after": after, "greedy": gen,
                  "backdoor_works": bool(gen["triggered"]["starts_with_howdy"] >= 0.8
                                         and gen["clean"]["starts_with_howdy"] <= 0.2),
                  "p_howdy_token_triggered": float(torch.exp(torch.tensor(-after["howdy_nll_triggered"]))),
                  "p_howdy_token_clean": float(torch.exp(torch.tensor(-after["howdy_nll_clean_prompt"]))),
                  "tail_vs_whole_nll": [tail, whole]}
    return info, check_info


def build_domain(d: Path, cfg: dict, *, smoke: bool, model_src: Path) -> None:
    recipe = {"task": "domain", "cfg": cfg, "smoke": smoke, "v": RECIPE_VERSION,
              "model_src": model_src.name}
    if _recipe_ok(d, recipe):
        log(f"task domain: up to date in {d}")
        return
    rng = random.Random(2002)
    npool, nq = cfg["per_domain_pool"], cfg["per_domain_queries"]
    pool, queries = [], []
    domains = cfg.get("domains", list(_TOPICS))
    for dom in domains:
        if smoke:
            texts = [(f"{dom}-{i:03d}", synth_paragraph(rng, dom, 2)) for i in range(npool + nq)]
        else:
            texts = [(r["id"], r["text"]) for r in gcide() if r["domain"] == dom
                     and cfg["min_chars"] <= len(r["text"]) <= cfg["max_chars"]]
            rng.shuffle(texts)
        if len(texts) < npool + nq:
            raise SystemExit(f"domain: only {len(texts)} usable {dom} definitions")
        pool += [{"id": sid, "text": t, "domain": dom} for sid, t in texts[:npool]]
        queries += [{"id": sid, "text": t, "domain": dom} for sid, t in texts[npool : npool + nq]]
    rng.shuffle(pool)
    rng.shuffle(queries)
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "pool.jsonl", pool)
    write_jsonl(d / "queries.jsonl", queries)
    meta = {"task": "domain", "kind": "attribution", "format": "text", "label_field": "domain",
            "model": _rel(model_src, d), "max_length": MAX_LENGTH if not smoke else SMOKE_MAX_LENGTH,
            "n_pool": len(pool), "n_queries": len(queries), "domains": domains, "smoke": smoke,
            "recipe": recipe, "recipe_sha256": sha256_json(recipe),
            "description": "GCIDE definitions of two subject domains; pretrained model"}
    write_json(d / "meta.json", meta)
    log(f"task domain: built in {d}")


def build_quality(d: Path, cfg: dict, *, smoke: bool, model_src: Path) -> None:
    recipe = {"task": "quality", "cfg": cfg, "smoke": smoke, "v": RECIPE_VERSION,
              "model_src": model_src.name}
    if _recipe_ok(d, recipe):
        log(f"task quality: up to date in {d}")
        return
    rng = random.Random(3003)
    n_clean, n_stem, n_shuf, n_one = (cfg["n_clean"], cfg["n_stemmed"], cfg["n_shuffled"],
                                      cfg["n_oneliner"])
    n_t, n_h = cfg["n_targets"], cfg["n_heldout"]
    if smoke:
        topics = list(_TOPICS)
        mk = lambda i: (f"p{i:04d}", "smoke", synth_paragraph(rng, topics[i % 2], 3))  # noqa: E731
        pool_src = [mk(i) for i in range(n_clean + n_stem + n_shuf)]
        tgt_src = [mk(1000 + i) for i in range(n_t)]
        held_src = [mk(2000 + i) for i in range(n_h)]
        junk = [(f"j{i:03d}", f"lol {i} ok!!") for i in range(n_one)]
    else:
        by_title: dict[str, list[dict]] = {}
        for r in wiki():
            if len(r["text"]) >= cfg["min_chars"]:
                by_title.setdefault(r["title"], []).append(r)
        titles = sorted(by_title)
        rng.shuffle(titles)
        tgt_src, held_src, pool_src = [], [], []
        for t in titles:  # articles go to targets, then held-out, then the pool
            rows = [(r["id"], t, r["text"]) for r in by_title[t]]
            if len(tgt_src) < n_t:
                tgt_src += rows
            elif len(held_src) < n_h:
                held_src += rows
            else:
                pool_src += rows
        rng.shuffle(tgt_src)
        rng.shuffle(held_src)
        rng.shuffle(pool_src)
        tgt_src, held_src = tgt_src[:n_t], held_src[:n_h]
        need = n_clean + n_stem + n_shuf
        if len(pool_src) < need:
            raise SystemExit(f"quality: only {len(pool_src)} pool paragraphs, need {need}")
        pool_src = [(sid, t, x) for sid, t, x in pool_src[:need]]
        short = [r for r in fortunes() if len(r["text"]) <= 80 and "\n" not in r["text"].strip()
                 and len(r["text"].split()) >= 3]
        rng.shuffle(short)
        junk = [(r["id"], r["text"].strip()) for r in short[:n_one]]
        mk = None  # noqa: F841
    pool = []
    for i, src in enumerate(pool_src):
        sid, title, text = src
        if i < n_clean:
            pool.append({"id": f"q-{sid}", "text": text, "clean": True, "kind": "clean",
                         "title": title})
        elif i < n_clean + n_stem:
            pool.append({"id": f"q-{sid}-stem", "text": stem_strip(text), "clean": False,
                         "kind": "stemmed", "title": title})
        else:
            pool.append({"id": f"q-{sid}-shuf", "text": shuffle_words(text, rng), "clean": False,
                         "kind": "shuffled", "title": title})
    pool += [{"id": f"q-{sid}", "text": text, "clean": False, "kind": "oneliner", "title": ""}
             for sid, text in junk]
    rng.shuffle(pool)
    queries = [{"id": f"qt-{sid}", "text": text, "clean": True, "kind": "target", "title": t}
               for sid, t, text in tgt_src]
    heldout = [{"id": f"qh-{sid}", "text": text, "clean": True, "kind": "heldout", "title": t}
               for sid, t, text in held_src]
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "pool.jsonl", pool)
    write_jsonl(d / "queries.jsonl", queries)
    write_jsonl(d / "heldout.jsonl", heldout)
    meta = {"task": "quality", "kind": "valuation", "format": "text", "label_field": "clean",
            "model": _rel(model_src, d), "max_length": MAX_LENGTH if not smoke else SMOKE_MAX_LENGTH,
            "n_pool": len(pool), "n_queries": len(queries), "n_heldout": len(heldout),
            "select_fraction": 0.3, "smoke": smoke, "recipe": recipe,
            "recipe_sha256": sha256_json(recipe),
            "loop": ({"n_blocks": 2, "steps": 120, "batch": 8, "lr": 1e-4, "seed": 0} if not smoke
                     else {"n_blocks": 1, "steps": 8, "batch": 4, "lr": 1e-3, "seed": 0}),
            "description": "clean Wikipedia paragraphs vs degraded ones (stemmed+stop-word-"
                           "stripped, word-shuffled: other paragraphs of the same articles; "
                           "fortune one-liners); targets and held-out = clean paragraphs of "
                           "disjoint articles; pretrained model"}
    write_json(d / "meta.json", meta)
    log(f"task quality: built in {d}")


BUILDERS = {"backdoor": build_backdoor, "domain": build_domain, "quality": build_quality}


def smoke_model(root: Path) -> Path:
    """The tiny random GPT-NeoX of tests/conftest.py, saved once under ``root``."""
    out = root / "tiny-gpt-neox"
    if (out / "config.json").exists():
        return out
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import save_tiny_model  # type: ignore

    out.parent.mkdir(parents=True, exist_ok=True)
    save_tiny_model("gpt_neox", out)
    return out


def build(tasks: list[str], root: Path, smoke: bool) -> dict[str, Path]:
    out = {}
    model_src = smoke_model(root) if smoke else SMOLLM
    if not smoke and not (model_src / "config.json").exists():
        raise SystemExit(f"{model_src} is missing: run `make assets-model`")
    for t in tasks:
        d = root / t
        cfg = (SMOKE if smoke else FULL)[t]
        BUILDERS[t](d, cfg, smoke=smoke, model_src=model_src)
        out[t] = d
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    set_threads(a.threads)
    quiet_transformers()
    root = a.root or (EVAL_CACHE if not a.smoke else EVAL_CACHE.parent / "eval-smoke")
    build([t for t in a.tasks.split(",") if t], root, a.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
