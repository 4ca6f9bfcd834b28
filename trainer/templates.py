"""Built-in chat templates (`data.chat_template: NAME`), written to render like the families they are named after.

Each is a Jinja template in the Hugging Face chat-template dialect (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`), so the tokenizer saved with a run carries it and any engine that
reads `chat_template` from the tokenizer renders the same text. They render `role` and `content` (a string, or
a list of `{"type": "text", "text": ...}` parts); tool calls need the model's own template or a Jinja file.

| name | turns | an assistant turn ends with | BOS | system role |
| --- | --- | --- | --- | --- |
| `chatml` | `<|im_start|>ROLE\\n...<|im_end|>\\n` | `<|im_end|>` | as the tokenizer adds it | yes |
| `qwen` | ChatML, Qwen2.5's default system prompt when none is given | `<|im_end|>` | as the tokenizer adds it | yes |
| `qwen3` | ChatML; `<think>` blocks of assistant turns before the last user turn are dropped (Qwen3) | `<|im_end|>` | as the tokenizer adds it | yes |
| `llama2` | `<s>[INST] <<SYS>>...<</SYS>> USER [/INST] REPLY </s>` | eos | one per user turn | folded into the first user turn |
| `llama3` | `<|start_header_id|>ROLE<|end_header_id|>\\n\\n...<|eot_id|>` | `<|eot_id|>` | once | yes |
| `mistral` | `<s>[INST] USER [/INST]REPLY</s>` (v0.2) | eos | once | no (raises; `data.fold_system_turn`) |
| `gemma` | `<start_of_turn>user\\n...<end_of_turn>\\n`, assistant as `model` | `<end_of_turn>` | once | no (raises; `data.fold_system_turn`) |
| `phi3` | `<|user|>\\n...<|end|>\\n`, the conversation closed with eos | `<|end|>` | once | yes |
| `plain` | `User: ...` / `Assistant: REPLY</s>`, blank line between turns | eos | as the tokenizer adds it | yes |

`plain` is the fallback for a model without a template whose vocabulary lacks ChatML's tokens: it needs nothing
but the tokenizer's own eos, so the model learns to end a reply with the token its pre-training already ends
documents with. The strings mimic the families' published templates (Llama-2-chat, Meta-Llama-3-Instruct,
Mistral-7B-Instruct-v0.2, gemma-*-it, Phi-3-mini-instruct, Qwen2.5-Instruct, Qwen3), reduced to role/content.
"""

from __future__ import annotations

# Renders a message's content: a string, None (nothing), or a list of parts of which the text ones are joined.
_TEXT = (
    "{%- macro text(c) -%}{%- if c is none -%}{%- elif c is string -%}{{ c }}{%- else -%}"
    "{%- for p in c -%}{%- if p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}\n"
)
_ALTERNATE = (
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
)
_BOS = "{{- bos_token if bos_token is defined and bos_token else '' -}}"

_CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_QWEN = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}" + _CHATML
)

_QWEN3 = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = text(message['content']) -%}"
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA2 = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- set system_message = '<<SYS>>\\n' + text(messages[0]['content']) + '\\n<</SYS>>\\n\\n' -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- set system_message = '' -%}{%- endif -%}"
    "{%- for message in loop_messages -%}" + _ALTERNATE + "{%- if loop.index0 == 0 -%}"
    "{%- set content = system_message + text(message['content']) -%}"
    "{%- else -%}{%- set content = text(message['content']) -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + content.strip() + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_LLAMA3 = (
    "{%- for message in messages -%}"
    "{%- if loop.index0 == 0 -%}" + _BOS + "{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + text(message['content']) | trim"
    " + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_MISTRAL = (
    _BOS + "{%- for message in messages -%}" + _ALTERNATE + "{%- if message['role'] == 'user' -%}"
    "{{- '[INST] ' + text(message['content']) + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- text(message['content']) + eos_token -}}"
    "{%- else -%}{{- raise_exception('Only user and assistant roles are supported!') -}}{%- endif -%}"
    "{%- endfor -%}"
)

_GEMMA = (
    _BOS + "{%- if messages[0]['role'] == 'system' -%}{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- for message in messages -%}"
    + _ALTERNATE
    + "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + text(message['content']) | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

_PHI3 = (
    _BOS + "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + text(message['content']) + '<|end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
)

_PLAIN = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- 'Assistant: ' + text(message['content']) + eos_token -}}"
    "{%- else -%}{{- message['role'] | capitalize + ': ' + text(message['content']) -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n\\nAssistant:' -}}{%- endif -%}"
)

# name -> (template body, writes BOS itself whatever the tokenizer does, special tokens the vocabulary needs)
_BUILTINS: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "chatml": (_CHATML, False, ("<|im_start|>", "<|im_end|>")),
    "qwen": (_QWEN, False, ("<|im_start|>", "<|im_end|>")),
    "qwen3": (_QWEN3, False, ("<|im_start|>", "<|im_end|>")),
    "llama2": (_LLAMA2, True, ()),
    "llama3": (_LLAMA3, True, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": (_MISTRAL, True, ()),
    "gemma": (_GEMMA, True, ("<start_of_turn>", "<end_of_turn>")),
    "phi3": (_PHI3, True, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "plain": (_PLAIN, False, ()),
}

BUILTIN_NAMES = tuple(_BUILTINS)
"""Names accepted by `data.chat_template`."""


def builtin_template(name: str, bos: bool) -> str:
    """The Jinja text of built-in template `name`. `bos`: whether the tokenizer adds a BOS token to plain text;
    templates whose family writes BOS itself (llama2/3, mistral, gemma, phi3) always render `bos_token`; the others
    (chatml, qwen, qwen3, plain) render it first exactly when `bos` is true, so the template's own text (what
    `apply_chat_template` and serving engines feed) starts with the BOS the tokenizer would add.
    KeyError for an unknown name."""
    body, writes_bos, _ = _BUILTINS[name]
    prefix = _BOS if (bos and not writes_bos) else ""
    return _TEXT + prefix + body


def required_tokens(name: str) -> tuple[str, ...]:
    """Special tokens built-in template `name` writes that must be single tokens of the vocabulary (besides the
    tokenizer's own bos/eos). KeyError for an unknown name."""
    return _BUILTINS[name][2]
