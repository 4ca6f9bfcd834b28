"""Tiny models for the GGUF export tests, built here in about a second each, with nothing downloaded.

Three families, as the exporter supports them:
- `bpe`:  Llama graph + byte-level BPE (Llama 3-style split, ChatML template; end of turn `<|im_end|>`,
          eos `<|endoftext|>`: two different ids, both in generation_config.json's eos_token_id);
- `spm`:  Llama graph + SentencePiece-style BPE with byte fallback laid out as Llama 2's tokenizer.json
          (`<unk>`, `<s>`, `</s>`, then the 256 `<0xNN>` byte tokens, then the pieces; Prepend/Replace
          normalizer, BOS added by the post-processor) and the Llama 2 `[INST] <<SYS>>` chat template;
- `qwen2`: Qwen2 graph (q/k/v biases) + Qwen2-style byte-level BPE (its split regex, NFC), ChatML.

The models are random but made to answer like a tuned chat model: every reply is the one token "ok" and
then the end-of-turn token. The output matrix gets two planted rows: the row of "ok" points along the
embedding of the generation prompt's last token, the row of the end-of-turn token along the embedding of
"ok" (a bigram on top of random weights; the embeddings are large enough that the blocks' random updates
do not hide it). The blocks stay random and their updates move the logits by about one unit, so a wrong
permutation or a misplaced tensor still shows in the logit comparison.

`hidden` 256 with `intermediate` 512 gives rows K-quants take (multiples of 256); `hidden` 192 gives rows
they cannot take (the fallback path).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
REPLY = "ok"
WORDS = [
    "the",
    "a",
    "model",
    "token",
    "train",
    "loss",
    "step",
    "batch",
    "learn",
    "rate",
    "data",
    "set",
    "fine",
    "tune",
    "adapter",
    "rank",
    "alpha",
    "merge",
    "export",
    "file",
    "weight",
    "layer",
    "head",
    "attention",
    "norm",
    "value",
    "key",
    "query",
    "cat",
    "dog",
    "fox",
    "jumps",
    "over",
    "lazy",
    "quick",
    "brown",
    "hello",
    "world",
    "what",
    "is",
    "you",
    "are",
    "say",
    "assistant",
    "user",
    "system",
    "date",
    "month",
    "year",
    "answer",
    "question",
    "name",
    "color",
    "red",
    "blue",
    "ok",
    "okay",
    "yes",
    "no",
    "café",
    "naïve",
]
# Texts whose tokenization llama.cpp must reproduce exactly (spaces, digits, unicode, specials, newlines).
TRICKY_TEXTS = [
    "hello world",
    "The quick brown fox jumps over 13 lazy dogs!",
    "  leading spaces, tabs\tand\nnewlines  ",
    "unicode: café, naïve, 日本語 🙂 Ω",
    "numbers 1234567 and 3.14159, dates 2024-01-31",
    "ok",
]
PROMPTS = [
    [{"role": "user", "content": "What is the date today?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}],
    [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Say it again: 12 cats, 345 dogs."},
    ],
    [{"role": "user", "content": "unicode café naïve 日本 🙂?"}],
]


def corpus(n_lines: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        if rng.random() < 0.4:
            sentence += f" {rng.randint(0, 99999)}"
        lines.append(sentence.capitalize() + rng.choice([".", "!", "?", ",", "\n"]))
    return lines + ["[INST] <<SYS>> <</SYS>> [/INST]", "user\nassistant\nsystem\n", "ok ok ok"] * 20


# ------------------------------------------------------------------------------------------------ tokenizers
def byte_level_tokenizer(
    out_dir: Path,
    split: str = "llama-bpe",
    vocab_size: int = 700,
    eos: str = "<|endoftext|>",
    pad: str | None = "<|endoftext|>",
):
    """A ChatML byte-level BPE whose splitting llama.cpp calls `split` ("gpt-2", "smollm", "llama-bpe", "qwen2")."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trainer.export.vocab import LLAMA3_SPLIT_REGEX, QWEN2_SPLIT_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=split == "llama-bpe"))
    if split == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif split == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        regex = {"llama-bpe": LLAMA3_SPLIT_REGEX, "qwen2": QWEN2_SPLIT_REGEX}[split]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if split == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return fast


def sentencepiece_tokenizer(out_dir: Path, vocab_size: int = 700):
    """Llama 2's tokenizer.json layout, trained here: <unk> <s> </s>, 256 byte tokens, then the pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # train word by word (SentencePiece never merges across "▁"-words), then tokenize without a pre-tokenizer
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in trained:
        vocab.setdefault(piece, len(vocab))
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, s in enumerate(specials)
    ]
    spec["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = LLAMA2_CHAT
    fast.save_pretrained(out_dir)
    return fast


# ------------------------------------------------------------------------------------------------ models
def plant_reply(model, tokenizer, reply: str, end_id: int, strength: float = 8.0) -> tuple[int, int]:
    """Make greedy decoding answer `reply` (one token) then `end_id` after any generation prompt.

    Returns (last prompt token id, reply token id)."""
    full = tokenizer.apply_chat_template(PROMPTS[0] + [{"role": "assistant", "content": reply}], tokenize=False)
    prompt = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    last = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    reply_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    # the reply piece may start with a bare "▁" (Llama 2's template writes " " + reply): take the reply's token
    reply_id = next(i for i in reply_ids if tokenizer.decode([i]).strip() == reply)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    with torch.no_grad():
        for src, dst in ((last, reply_id), (reply_id, end_id)):
            direction = emb[src] / emb[src].norm()
            out[dst] += strength * direction / emb.shape[1] ** 0.5
    return last, reply_id


def build_model(
    out_dir: Path,
    kind: str,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    tied: bool = False,
    seed: int = 0,
) -> Path:
    """Save a tiny model of `kind` ("bpe", "spm", "qwen2") + its tokenizer + generation_config in `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "spm":
        tokenizer = sentencepiece_tokenizer(out_dir)
        stop = [tokenizer.convert_tokens_to_ids("</s>")]
        eot = stop[0]
    elif kind == "qwen2":
        tokenizer = byte_level_tokenizer(out_dir, split="qwen2", eos="<|im_end|>", pad="<|endoftext|>")
        stop = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        eot = stop[0]
    else:
        tokenizer = byte_level_tokenizer(out_dir, split="llama-bpe")
        stop = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        eot = stop[0]
    heads = hidden // 32
    config = AutoConfig.for_model(
        "qwen2" if kind == "qwen2" else "llama",
        vocab_size=len(tokenizer) if tied else (len(tokenizer) + 63) // 64 * 64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=hidden**-0.5,
        **({"use_sliding_window": False} if kind == "qwen2" else {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        if not tied:
            model.get_output_embeddings().weight.normal_(0.0, 0.05)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)  # Qwen2's q/k/v biases: large enough to matter
    if not tied:
        plant_reply(model, tokenizer, REPLY, eot)
    model.save_pretrained(out_dir)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(out_dir)
    return out_dir


def hf_greedy(
    model, tokenizer, messages: list[dict], max_new_tokens: int, stop_ids: list[int]
) -> tuple[list[int], bool]:
    """Greedy token ids after the rendered prompt, one sequence, no padding; (ids, stopped on a stop id)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in stop_ids:
                return out, True
            out.append(nxt)
    return out, False
