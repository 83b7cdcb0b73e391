"""The model's own responses to prompts, as prompt/response records to attribute.

``rise attribute --generate`` asks: what in the training data made the model say *this*?
Each prompt is tokenized exactly as a prompt/response record's prompt is
(``rise.data.encode_record``: special tokens, or the chat template on request), the model
continues it (greedy by default; sampled at a temperature with a seed), and the generated
text becomes the record's response, so only the response's tokens are supervised when the
record is featurised.  The response is decoded to text and tokenized again like any
response: where a tokenizer does not round-trip, the attributed tokens are the re-encoded
ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rise.data import Record
from rise.errors import InvalidInput
from rise.model import LoadedModel

DEFAULT_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class GenerateSpec:
    """How responses are generated: at most ``max_new_tokens`` tokens, greedy when
    ``temperature`` is 0, else sampled from softmax(logits / temperature) (no top-k or
    top-p cut) with ``seed`` (prompt i uses seed + i, so one prompt's response does not
    depend on the others)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidInput(f"max new tokens must be in [1, {MAX_NEW_TOKENS}], "
                               f"got {self.max_new_tokens}")
        if not (self.temperature == 0.0 or 1e-3 <= self.temperature <= 100.0):
            raise InvalidInput("generation temperature must be 0 (greedy) or in [0.001, 100], "
                               f"got {self.temperature}")
        if not 0 <= self.seed < 2**63:
            raise InvalidInput(f"seed must be in [0, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def prompt_text(rec: Record) -> str:
    """The prompt of a record: its prompt field, or its whole text."""
    if rec.prompt is not None:
        return rec.prompt
    if rec.text is None:
        raise InvalidInput(f"record id {rec.id!r} has no prompt")
    return rec.text


def prompt_ids(lm: LoadedModel, prompt: str, chat_template: bool) -> list[int]:
    """Token ids of a prompt, as ``rise.data.encode_record`` tokenizes one."""
    tok = lm.tokenizer
    if chat_template:
        if not getattr(tok, "chat_template", None):
            raise InvalidInput("the tokenizer has no chat template; drop --chat-template")
        rendered = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=False)
        return list(tok.encode(rendered, add_special_tokens=False))
    return list(tok.encode(prompt, add_special_tokens=True))


def generate_responses(lm: LoadedModel, prompts: Sequence[Record], spec: GenerateSpec, *,
                       chat_template: bool = False, max_length: int | None = None,
                       ) -> list[Record]:
    """Prompt/response records: each prompt with the model's response to it.

    ``max_length``: the prompt is cut from the left so that prompt + response fits it (as
    the index's records are cut).  A prompt to which the model answers nothing (an end
    token first) is InvalidInput naming it: there would be no token to attribute.
    """
    tok = lm.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if max_length is not None and spec.max_new_tokens >= max_length:
        raise InvalidInput(f"max new tokens ({spec.max_new_tokens}) must be below the index's "
                           f"max_length ({max_length}), which holds prompt and response")
    out: list[Record] = []
    dev = lm.input_device
    for i, rec in enumerate(prompts):
        text = prompt_text(rec)
        ids = prompt_ids(lm, text, chat_template)
        if max_length is not None:
            ids = ids[max(0, len(ids) - (max_length - spec.max_new_tokens)):]
        if not ids:
            raise InvalidInput(f"prompt id {rec.id!r} has no token")
        x = torch.tensor([ids], device=dev)
        kw: dict = dict(max_new_tokens=spec.max_new_tokens, pad_token_id=pad,
                        eos_token_id=eos, attention_mask=torch.ones_like(x))
        if spec.greedy:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kw.update(do_sample=True, temperature=spec.temperature, top_k=0, top_p=1.0)
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(spec.seed + i)
            seq = lm.model.generate(x, **kw)[0, len(ids):].tolist()
        if eos is not None and eos in seq:
            seq = seq[: seq.index(eos)]
        response = tok.decode(seq, skip_special_tokens=True)
        if not seq or not tok.encode(response, add_special_tokens=False):
            raise InvalidInput(f"prompt id {rec.id!r}: the model generated no response "
                               "(an end token first), so nothing can be attributed")
        out.append(Record(id=rec.id, number=rec.number, text=None, prompt=text,
                          response=response, raw={"id": rec.id, "prompt": text,
                                                  "response": response}))
    return out
