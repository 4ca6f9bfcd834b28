"""Shared fixtures: a tiny random Llama and a byte-level BPE tokenizer trained here in about a second.

Nothing is downloaded. The tokenizer mimics SmolLM2's: ChatML template, pad == eos == <|im_end|>.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca_1k.json"
CHAT_SINGLE = SHARED_DATA / "chat_single_turn.jsonl"
CHAT_MULTI = SHARED_DATA / "chat_multi_turn.jsonl"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def pytest_configure(config):
    # Keep the tokenized-data cache of tests away from the user's.
    import tempfile

    os.environ.setdefault("TRAINER_CACHE", tempfile.mkdtemp(prefix="trainer-test-cache-"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def corpus_lines() -> list[str]:
    rows = json.loads(ALPACA.read_text())
    lines = []
    for r in rows:
        lines += [r["instruction"], r["input"], r["output"]]
    for f in (CHAT_SINGLE, CHAT_MULTI):
        for line in f.read_text().splitlines():
            lines += [m["content"] for m in json.loads(line)["messages"]]
    lines += ["user", "assistant", "system"]
    return [x for x in lines if x]


def make_tokenizer(vocab_size: int = 1024, chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_model(vocab_size: int, tie: bool = True, seed: int = 0, init_std: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        initializer_range=init_std,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama + tokenizer: what `model.name_or_path` points at in tests."""
    out = tmp_path_factory.mktemp("tiny-llama")
    # init 0.2, not 0.02: with a final RMSNorm and 64-d tied embeddings, 0.02 leaves logits almost flat and
    # a LoRA cannot move them within a few steps; 0.2 gives a base whose loss visibly falls in 30 steps.
    make_model(len(tokenizer), init_std=0.2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_recipe(model_dir: Path, data_path: Path, out: Path, **sections) -> dict:
    """A recipe dict for fast CPU tests; `sections` override per section, e.g. train={'max_steps': 3}."""
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "fp32", "gradient_checkpointing": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(data_path), "max_seq_len": 128, "packing": True, "val_fraction": 0.05},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "eval_every": 2,
            "save_every": 2,
            "seed": 0,
        },
        "output_dir": str(out),
    }
    for name, changes in sections.items():
        if isinstance(changes, dict) and isinstance(raw.get(name), dict):
            raw[name].update(changes)
        else:
            raw[name] = changes
    return raw
