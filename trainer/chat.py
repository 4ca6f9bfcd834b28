"""`trainer chat`: talk to a tuned model, compare it with its base, switch adapters without reloading the base.

    trainer chat RUN_DIR                          interactive, streaming; /use NAME, /base, /reset, /quit
    trainer chat RUN_DIR --prompt "..."           one answer
    trainer chat RUN_DIR --compare --prompt "..." base and tuned side by side
    trainer chat RUN_DIR --adapter other=runs/x/adapter ...   several adapters on one loaded base
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.errors import UserError

BASE = "base"


@dataclass
class ChatModels:
    """One base model in memory with any number of named LoRA adapters on top."""
    model: object           # a PeftModel (or a plain model when there is no adapter)
    tokenizer: object
    adapters: list[str] = field(default_factory=list)
    active: str = BASE

    def use(self, name: str) -> None:
        if name != BASE and name not in self.adapters:
            raise UserError(f"no adapter named '{name}'; loaded: {', '.join([BASE, *self.adapters])}")
        if name != BASE:
            self.model.set_adapter(name)
        self.active = name

    @contextlib.contextmanager
    def as_active(self):
        if self.active == BASE and self.adapters:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model


def load_chat_models(run_dir: Path | None, extra_adapters: dict[str, Path], model_path: str | None = None):
    from peft import PeftModel

    from trainer.merge import adapter_dir, run_recipe, run_tokenizer
    from trainer.model import DTYPES, load_base, load_tokenizer
    from trainer.config import ModelConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    adapters: dict[str, Path] = {}
    if run_dir is not None:
        recipe = run_recipe(run_dir)
        model_cfg, tokenizer = recipe.model, run_tokenizer(run_dir, recipe)
        if recipe.lora is not None:
            adapters["tuned"] = adapter_dir(run_dir)
    elif model_path:
        model_cfg, tokenizer = ModelConfig(name_or_path=model_path), load_tokenizer(model_path)
    else:
        raise UserError("trainer chat needs RUN_DIR or --model PATH")
    adapters.update(extra_adapters)
    base = load_base(model_cfg, dtype=DTYPES[model_cfg.dtype], quantize=False, device_map={"": device})
    if run_dir is not None and recipe.lora is None:
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(str(Path(run_dir) / "model")).to(device)
    if not adapters:
        return ChatModels(base.eval(), tokenizer)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    chat = ChatModels(model.eval(), tokenizer, names)
    chat.use(names[0])
    return chat


def reply(chat: ChatModels, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
          top_p: float = 1.0, on_text=None) -> str:
    """Generate the assistant's next message with the active adapter; `on_text(piece)` streams it."""
    from transformers import TextIteratorStreamer

    tok = chat.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with chat.as_active() as model:
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            kwargs.update(do_sample=False)
        if on_text is None:
            out = model.generate(**enc, **kwargs)
            return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=model.generate, kwargs={**enc, **kwargs, "streamer": streamer})
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            on_text(piece)
        worker.join()
    return "".join(pieces).strip()


def compare(chat: ChatModels, prompt: str, names: list[str], **gen) -> dict[str, str]:
    answers = {}
    active = chat.active
    for name in names:
        chat.use(name)
        answers[name] = reply(chat, [{"role": "user", "content": prompt}], **gen)
    chat.use(active)
    return answers


def interactive(chat: ChatModels, **gen) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]trainer chat[/] adapters: {', '.join([BASE, *chat.adapters])}; active: {chat.active}. "
                  "Commands: /use NAME, /base, /reset, /quit")
    history: list[dict] = []
    while True:
        try:
            line = console.input(f"[bold green]{chat.active}> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            continue
        if line == "/base" or line.startswith("/use "):
            try:
                chat.use(BASE if line == "/base" else line.split(maxsplit=1)[1])
                console.print(f"active: {chat.active}")
            except UserError as err:
                console.print(f"[red]{err}")
            continue
        history.append({"role": "user", "content": line})
        answer = reply(chat, history, on_text=lambda piece: console.print(piece, end="", soft_wrap=True), **gen)
        console.print()
        history.append({"role": "assistant", "content": answer})


def print_side_by_side(answers: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True)
    for name in answers:
        table.add_column(name)
    table.add_row(*answers.values())
    Console().print(table)
