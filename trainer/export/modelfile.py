'''The Ollama `Modelfile` written beside a GGUF, so `ollama create NAME -f Modelfile` works as is.

    FROM ./model-q4_k_m.gguf
    TEMPLATE """<the run's chat template as an Ollama Go template>"""
    PARAMETER stop "<|im_end|>"          # one line per end-of-turn/stop token of the run
    PARAMETER temperature 0.7            # the recipe's generation settings
    PARAMETER top_p 0.9
    PARAMETER num_predict 128

Ollama renders prompts with Go templates, not with the Jinja template the GGUF carries. The Go template is
chosen by behaviour, not by name: each family below (ChatML with or without a default system prompt,
Llama 2 `[INST] <<SYS>>`, Llama 3 headers, Mistral `[INST]`) comes with a Python function that renders a
conversation exactly as its Go template does (Ollama's `.Messages` loop; the BOS token, when the GGUF says
`add_bos_token`, is added by the runtime's tokenizer, not by the template). The run's Jinja template is
rendered on probe conversations (one turn, with a system message, two turns) and the first family whose
rendering is the same string is used. A template that matches none (a custom one, or Llama 3.1's with its
date lines) gets no TEMPLATE line: Ollama then matches the GGUF's embedded Jinja template against its own
list of known templates and falls back to a bare `{{ .Prompt }}` when none fits, which can ramble; the
export says so and the Modelfile carries that note.
'''

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROBES = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a color."},
    ],
]


@dataclass(frozen=True)
class ChatFamily:
    """A chat format Ollama can render: its Go template and a Python rendering of that template."""

    name: str
    template: str  # the Go template (Ollama `TEMPLATE`)
    render: Callable[[list[dict]], str]  # conversation -> the text the Go template produces


def chatml(default_system: str | None) -> ChatFamily:
    """ChatML (`<|im_start|>role\\n...<|im_end|>\\n`), with the system block a template adds when the
    conversation has none (SmolLM2's "You are a helpful AI assistant named SmolLM, ...") or without."""
    if default_system is None:
        template = (
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        )
    else:
        template = (
            "{{- range $i, $m := .Messages }}"
            '{{- if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
            + default_system
            + "<|im_end|>\n{{ end }}"
            "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        )

    def render(messages: list[dict]) -> str:
        out = ""
        if default_system is not None and messages and messages[0]["role"] != "system":
            out += f"<|im_start|>system\n{default_system}<|im_end|>\n"
        for m in messages:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + "<|im_start|>assistant\n"

    return ChatFamily("chatml" if default_system is None else "chatml+default-system", template, render)


def llama2(bos: str, eos: str, bos_added: bool) -> ChatFamily:
    """Llama 2 chat: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply} </s><s>[INST] ...`."""
    first_bos = "" if bos_added else bos
    template = (
        "{{- $first := true }}{{- range .Messages }}"
        '{{- if eq .Role "user" }}{{ if $first }}' + first_bos + "{{ else }}" + bos + "{{ end }}[INST] "
        "{{ if and $first $.System }}<<SYS>>\n{{ $.System }}\n<</SYS>>\n\n{{ end }}"
        "{{ .Content }} [/INST]{{ $first = false }}"
        '{{- else if eq .Role "assistant" }} {{ .Content }} ' + eos + "{{ end }}{{ end }}"
    )

    def render(messages: list[dict]) -> str:
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        out, first = "", True
        for m in messages:
            if m["role"] == "user":
                out += (first_bos if first else bos) + "[INST] "
                if first and system:
                    out += f"<<SYS>>\n{system}\n<</SYS>>\n\n"
                out += m["content"] + " [/INST]"
                first = False
            elif m["role"] == "assistant":
                out += f" {m['content']} {eos}"
        return out

    return ChatFamily("llama2", template, render)


def llama3(bos: str, bos_added: bool) -> ChatFamily:
    """Llama 3 (3.0 style): `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`."""
    first_bos = "" if bos_added else bos
    template = (
        first_bos + "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    )

    def render(messages: list[dict]) -> str:
        out = first_bos
        for m in messages:
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
        return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"

    return ChatFamily("llama3", template, render)


def mistral(bos: str, eos: str, bos_added: bool) -> ChatFamily:
    """Mistral Instruct v0.1/v0.2: `<s>[INST] {user} [/INST]{reply}</s>[INST] ...` (no system role)."""
    first_bos = "" if bos_added else bos
    template = (
        first_bos + "{{- range .Messages }}"
        '{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{- else if eq .Role "assistant" }}{{ .Content }}' + eos + "{{ end }}{{ end }}"
    )

    def render(messages: list[dict]) -> str:
        out = first_bos
        for m in messages:
            if m["role"] == "user":
                out += f"[INST] {m['content']} [/INST]"
            elif m["role"] == "assistant":
                out += m["content"] + eos
        return out

    return ChatFamily("mistral", template, render)


def candidate_families(tokenizer, bos_added: bool) -> list[ChatFamily]:
    """The families to try for this tokenizer (bos/eos strings from it; ChatML's default system prompt
    read off the template's rendering of a conversation without one)."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    default_system = None
    try:
        text = tokenizer.apply_chat_template(PROBES[0], tokenize=False, add_generation_prompt=True)
        head = "<|im_start|>system\n"
        if text.startswith(head) and "<|im_end|>\n" in text:
            default_system = text[len(head) : text.index("<|im_end|>\n")]
    except Exception:  # noqa: BLE001, S110 - a template that refuses the probe matches no family
        pass
    families = [chatml(None)]
    if default_system is not None and "{{" not in default_system and '"""' not in default_system:
        families.append(chatml(default_system))
    return families + [llama2(bos, eos, bos_added), llama3(bos, bos_added), mistral(bos, eos, bos_added)]


def match_family(tokenizer, bos_added: bool) -> ChatFamily | None:
    """The family whose Go template renders every probe the run's Jinja template accepts exactly as it does,
    with the BOS the runtime adds (when `bos_added`) in front; None when none does."""
    bos = (tokenizer.bos_token or "") if bos_added else ""
    renders = []
    for probe in PROBES:
        try:
            renders.append((probe, tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)))
        except Exception:  # noqa: BLE001, S112 - e.g. Mistral's template refuses a system message
            continue
    if not renders:
        return None
    for family in candidate_families(tokenizer, bos_added):
        if all(text == bos + family.render(probe) for probe, text in renders):
            return family
    return None


def modelfile_text(
    gguf_name: str,
    family: ChatFamily | None,
    stop_tokens: list[str],
    temperature: float,
    top_p: float,
    num_predict: int,
) -> str:
    """The Modelfile's content (see the module docstring)."""
    lines = [f"FROM ./{gguf_name}"]
    if family is not None:
        lines.append(f'TEMPLATE """{family.template}"""')
    else:
        lines += [
            "# No TEMPLATE: the run's chat template is none of ChatML, Llama 2, Llama 3, Mistral. Ollama will",
            "# pick a template by matching the GGUF's embedded chat template (tokenizer.chat_template) against",
            "# its known ones, else use {{ .Prompt }}; check replies with `ollama run` before shipping.",
        ]
    for token in stop_tokens:
        lines.append(f"PARAMETER stop {_quote(token)}")
    lines += [
        f"PARAMETER temperature {_number(temperature)}",
        f"PARAMETER top_p {_number(top_p)}",
        f"PARAMETER num_predict {int(num_predict)}",
    ]
    return "\n".join(lines) + "\n"


def write_modelfile(
    gguf_path: Path, tokenizer, add_bos_token: bool, stop_tokens: list[str], generation, out: Path | None = None
) -> dict:
    """Write `Modelfile` beside `gguf_path` (or at `out`). `generation` has temperature, top_p and
    max_new_tokens (the recipe's `generation` section). Returns `{"path", "family"}` (family None: no
    TEMPLATE was written)."""
    gguf_path = Path(gguf_path)
    family = match_family(tokenizer, add_bos_token)
    text = modelfile_text(
        gguf_path.name, family, stop_tokens, generation.temperature, generation.top_p, generation.max_new_tokens
    )
    path = Path(out) if out is not None else gguf_path.parent / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return {"path": str(path), "family": family.name if family else None}


def _quote(token: str) -> str:
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(value: float) -> str:
    return f"{float(value):g}"
