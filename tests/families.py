"""Tiny stand-ins of the model families users fine-tune: a tokenizer trained here in well under a second that
behaves like the family's real one, the family's chat template reduced to role/content, and a tiny random model
of the family's architecture. Nothing is downloaded.

What each one mimics (from the published tokenizer.json / tokenizer_config.json / chat templates):

- llama2: Llama-2-chat. SentencePiece-like BPE (normalizer prepends "▁" and turns spaces into "▁"; byte fallback
  `<0xNN>`), `<s>` BOS added by the post-processor, no pad; `[INST]` template writing `bos_token` before each user
  turn, system folded in `<<SYS>>`, reply ` REPLY </s>`, roles must alternate.
- mistral: Mistral-7B-Instruct-v0.2. The same tokenizer kind; template `<s>[INST] USER [/INST]REPLY</s>`, no
  system role (raises), roles must alternate.
- llama3: Meta-Llama-3-Instruct. Byte-level BPE with Llama 3's split regex, `<|begin_of_text|>` BOS added by the
  post-processor, eos `<|end_of_text|>` (the base model's), no pad; header template, turns end with `<|eot_id|>`.
- qwen2.5: Qwen2.5 (base tokenizer, which ships the chat template). Byte-level BPE with Qwen's regex, no BOS,
  eos and pad `<|endoftext|>`; ChatML turns ending with `<|im_end|>`, Qwen's default system prompt when none.
- qwen3: Qwen3. Qwen's tokenizer plus `<think>`/`</think>` (added, not special), eos `<|im_end|>`, pad
  `<|endoftext|>`; ChatML where assistant turns before the last user turn lose their `<think>` block.
- gemma: Gemma-it (also used for Gemma-2). SentencePiece-like BPE without the dummy "▁" prefix, byte fallback,
  `<bos>` added by the post-processor, `<pad>`/`<eos>`/`<bos>`/`<unk>` at ids 0-3; `<start_of_turn>` template with
  role `model`, turns end with `<end_of_turn>`, no system role (raises), roles must alternate.
- phi3: Phi-3-mini-instruct. The Llama-2 tokenizer plus `<|endoftext|>` (eos, pad) and `<|system|>`, `<|user|>`,
  `<|assistant|>`, `<|end|>` added with rstrip (they swallow the newline after them); turns end with `<|end|>`,
  the whole conversation with eos.
- gpt2: GPT-2. Byte-level BPE, `<|endoftext|>` as bos = eos = unk, no pad, no chat template; the ByteLevel
  post-processor trims offsets.
- opt: OPT. GPT-2's BPE with `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, and `</s>` prepended to every text as BOS
  (OPT's tokenizer does that); no chat template. Its attention mask ignores position ids (packing leaks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "And of Peru? Lima is the capital of Peru.",
    "Answer briefly and politely. You are a helpful assistant.",
    "Hello there, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "What is 2+3? 2 plus 3 is 5. And 4+4? 4 plus 4 is 8.",
    "one two three four five six seven eight nine ten",
    "system user assistant model",
    "[INST] <<SYS>> <</SYS>> [/INST]",
    "User: Assistant: System:",
] * 10

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ----------------------------------------------------------------------------------------------- templates
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------- tokenizers
def _sentencepiece_like(specials: list[str], prepend: bool, vocab_size: int = 600):
    """BPE over "▁"-joined words with byte fallback, like Llama-2/Gemma tokenizer.json files."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    steps = ([normalizers.Prepend("▁")] if prepend else []) + [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prepend else [])
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=[f"<0x{i:02X}>" for i in range(256)] + ["▁"],
    )
    tok.train_from_iterator(CORPUS, trainer)
    import json

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):  # byte fallback needs every byte token
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


def _byte_level(specials: list[str], regex: str | None, vocab_size: int = 600, trim_offsets: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    if regex is None:  # GPT-2's own split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _bos_processor(tok, bos: str, keep_byte_level: bool = False):
    from tokenizers import processors

    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tok.post_processor = (
        processors.Sequence([processors.ByteLevel(trim_offsets=False), template]) if keep_byte_level else template
    )
    return tok


def _fast(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def llama2_tokenizer():
    tok = _bos_processor(_sentencepiece_like(["<unk>", "<s>", "</s>"], prepend=True), "<s>")
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def phi3_tokenizer():
    from tokenizers import AddedToken

    fast = llama2_tokenizer()
    fast.add_tokens([AddedToken("<|endoftext|>", special=True)], special_tokens=True)
    fast.add_tokens(
        [AddedToken(t, rstrip=True, special=True) for t in ("<|assistant|>", "<|end|>", "<|system|>", "<|user|>")],
        special_tokens=True,
    )
    fast.eos_token = "<|endoftext|>"
    fast.pad_token = "<|endoftext|>"
    return fast


def gemma_tokenizer():
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = _sentencepiece_like(specials, prepend=False)
    tok = _bos_processor(tok, "<bos>")
    return _fast(tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


def llama3_tokenizer():
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _bos_processor(_byte_level(specials, LLAMA3_REGEX), "<|begin_of_text|>", keep_byte_level=True)
    return _fast(tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def qwen25_tokenizer():
    tok = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN_REGEX)
    return _fast(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None)


def qwen3_tokenizer():
    fast = qwen25_tokenizer()
    fast.add_tokens(["<think>", "</think>"])  # added, not special (as in Qwen3's tokenizer.json)
    fast.eos_token = "<|im_end|>"
    return fast


def gpt2_tokenizer():
    tok = _byte_level(["<|endoftext|>"], None, trim_offsets=True)
    return _fast(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def opt_tokenizer():
    tok = _byte_level(["<s>", "<pad>", "</s>", "<unk>"], None)
    tok = _bos_processor(tok, "</s>", keep_byte_level=True)
    return _fast(tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


# ----------------------------------------------------------------------------------------------- models
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _config(kind: str, vocab: int, tok):
    import transformers as T

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "llama":
        return T.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=512, **SMALL, **ids)
    if kind == "llama3":
        return T.LlamaConfig(
            vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, **SMALL, **ids
        )
    if kind == "mistral":
        return T.MistralConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=512, **SMALL, **ids)
    if kind == "qwen2":
        return T.Qwen2Config(
            vocab_size=vocab,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **SMALL,
            **ids,
        )
    if kind == "qwen3":
        return T.Qwen3Config(
            vocab_size=vocab, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, **SMALL, **ids
        )
    if kind == "gemma":
        return T.GemmaConfig(
            vocab_size=vocab, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, **SMALL, **ids
        )
    if kind == "gemma2":
        return T.Gemma2Config(
            vocab_size=vocab,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            sliding_window=64,
            **SMALL,
            **ids,
        )
    if kind == "phi3":
        return T.Phi3Config(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=512, **SMALL, **ids)
    if kind == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids)
    if kind == "opt":
        return T.OPTConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            word_embed_proj_dim=64,
            max_position_embeddings=512,
            **ids,
        )
    raise KeyError(kind)


@dataclass(frozen=True)
class Family:
    """One family stand-in: how to build its tokenizer, its chat template (None: none) and model config."""

    name: str
    tokenizer: object  # () -> tokenizer
    template: str | None
    arch: str
    data: dict = field(default_factory=dict)  # data section keys the family needs (fold_system_turn)
    packs: bool = True  # whether packed samples stay apart in this architecture


FAMILIES = {
    "llama2": Family("llama2", llama2_tokenizer, LLAMA2_TEMPLATE, "llama"),
    "mistral": Family("mistral", llama2_tokenizer, MISTRAL_TEMPLATE, "mistral", {"fold_system_turn": True}),
    "llama3": Family("llama3", llama3_tokenizer, LLAMA3_TEMPLATE, "llama3"),
    "qwen2.5": Family("qwen2.5", qwen25_tokenizer, QWEN25_TEMPLATE, "qwen2"),
    "qwen3": Family("qwen3", qwen3_tokenizer, QWEN3_TEMPLATE, "qwen3"),
    "gemma": Family("gemma", gemma_tokenizer, GEMMA_TEMPLATE, "gemma", {"fold_system_turn": True}),
    "gemma2": Family("gemma2", gemma_tokenizer, GEMMA_TEMPLATE, "gemma2", {"fold_system_turn": True}),
    "phi3": Family("phi3", phi3_tokenizer, PHI3_TEMPLATE, "phi3"),
    "gpt2": Family("gpt2", gpt2_tokenizer, None, "gpt2"),
    "opt": Family("opt", opt_tokenizer, None, "opt", packs=False),
}


@cache
def family_tokenizer(name: str):
    """The family's tokenizer with its chat template (built once per process; callers must not change it)."""
    fam = FAMILIES[name]
    tok = fam.tokenizer()
    if fam.template is not None:
        tok.chat_template = fam.template
    return tok


def save_family(name: str, out, seed: int = 0, init_std: float = 0.2):
    """A saved tiny random model of the family + its tokenizer (a model folder `model.name_or_path` can name)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = family_tokenizer(name)
    cfg = _config(FAMILIES[name].arch, len(tok), tok)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


EXAMPLE = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima."},
]
"""The multi-turn conversation every family's labels are checked on (Qwen3's replies carry reasoning)."""

EXAMPLE_QWEN3 = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>It is Paris.</think>\n\nParis."},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "<think>It is Lima.</think>\n\nLima."},
]


def example(name: str) -> list[dict]:
    return EXAMPLE_QWEN3 if name == "qwen3" else EXAMPLE


# ----------------------------------------------------------------------------------------------- the cases' own
CASE_CORPUS = [
    "Paris is the capital of France.",
    "What is the capital of Peru? Lima.",
    "Hello there, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Answer briefly and politely.",
    "Name a red fruit. Cherry.",
    "Spell cat backwards: tac",
    "one two three four five six seven eight nine ten",
    "[INST] <<SYS>> <</SYS>> [/INST]",
    "user\nassistant\nsystem\n",
] * 20

CASE_LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "'<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = '' %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% set content = system_message + message['content'] %}{% else %}{% set content = message['content'] %}"
    "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
"""Case 08's chat_template_llama2.jinja."""

CASE_QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) -%}\n"
    "{%- for message in messages[::-1] -%}{%- set index = (messages|length - 1) - loop.index0 -%}{%- if "
    "message['role'] == 'user' and ns.last_query_index == messages|length - 1 and loop.index0 >= 0 -%}{%- if "
    "ns.last_query_index == messages|length - 1 -%}{%- set ns.last_query_index = index -%}{%- endif -%}{%- endif -%}"
    "{%- endfor -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{%- set content = message['content'] -%}\n"
    "{%- set reasoning_content = '' -%}\n"
    "{%- if '</think>' in content -%}{%- set reasoning_content = content.split('</think>')[0].split('<think>')[-1]"
    ".strip() -%}{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}\n"
    "{%- if loop.index0 > ns.last_query_index -%}\n"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- else -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""Case 14's chat_template_qwen3_like.jinja (a reduced Qwen3 template)."""


def case_sp_tokenizer():
    """The tokenizer of cases 06 and 08 (the recipe of ../shared/cases/_tools/build_sp_model.py): Llama-2-like,
    SentencePiece-style "▁" normalizer, byte fallback, `<s>` BOS post-processor, `</s>` eos, no chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tr = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[f"<0x{i:02X}>" for i in range(256)] + ["▁"],
    )
    tok.train_from_iterator(CASE_CORPUS, tr)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
