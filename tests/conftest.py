"""Shared fixtures: tiny random Hugging Face models built from a config, saved to disk.

Every architecture family the readout must handle (GPT-NeoX, Llama, GPT-2 with tied
embeddings) gets a model small enough for float64 autograd checks on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|pad|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


VOCAB = 258 + 6  # byte tokens + specials, rounded up: the head has a few unused rows


def tiny_config(arch: str):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=256, pad_token_id=257)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=256,
                             tie_word_embeddings=False, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64,
                           max_position_embeddings=256, tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256,
                          tie_word_embeddings=True, **common)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path, dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    # Random init leaves the residual nearly uniform; a larger head makes p peaked so
    # Top-K truncation and the target slot are exercised for real.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {a: save_tiny_model(a, root / a) for a in ("gpt_neox", "llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> Path:
    return tiny_models["gpt_neox"]


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attribution asks which training examples shaped a prediction.",
    "Sketches compress gradients into a few kilobytes.",
    "Valuation scores candidates before any training run.",
    "A shard is immutable once written; manifests point at shards.",
    "Tokens, logits, residuals and hidden states.",
    "Count sketch maps are drawn from a seed.",
    "Prompt and response records supervise the response only.",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl",
                       [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)])
