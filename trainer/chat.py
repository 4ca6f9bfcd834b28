"""`trainer chat`: talk to a tuned model, compare it with its base, switch adapters without reloading the base.

trainer chat RUN_DIR                          interactive, streaming; /use NAME, /base, /reset, /quit
trainer chat RUN_DIR --prompt "..."           one answer
trainer chat RUN_DIR --compare --prompt "..." base and tuned side by side
trainer chat RUN_DIR --adapter other=runs/x/adapter ...   several adapters on one loaded base
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainer import generate
from trainer.artifacts import Tuned, read_recipe, tokenizer_of, tuned_source
from trainer.dtypes import torch_dtype
from trainer.errors import UserError
from trainer.model import default_device
from trainer.run_dir import RunDir
from trainer.tokenizer import run_tokenizer

BASE = "base"


@dataclass
class ChatModels:
    """One base model in memory with any number of named LoRA adapters on top."""

    model: object  # a PeftModel (or a plain model when there is no adapter)
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


def load_chat_models(
    run_dir: Path | None, extra_adapters: dict[str, Path], model_path: str | None = None, source: Tuned | None = None
):
    """One base model (the run's, or `model_path`) with the run's adapter and `extra_adapters` loaded by name.
    A full fine-tune run's own model is the base. `source`: the run's trained weights (`artifacts.tuned_source`;
    default: the final ones)."""
    from peft import PeftModel

    from trainer.config import ModelArgs
    from trainer.model import _first_line, load_base, load_errors
    from trainer.preflight import check_adapter_folder

    adapters: dict[str, Path] = {}
    if run_dir is not None:
        run = RunDir(run_dir)
        recipe = read_recipe(run)
        source = source or tuned_source(run.root)
        model_args, tokenizer = recipe.model, tokenizer_of(run, recipe)
        if recipe.lora is None:
            model_args = replace(model_args, name_or_path=str(source.model))
        else:
            adapters["tuned"] = source.adapter
    elif model_path:
        model_args = ModelArgs(name_or_path=model_path)
        tokenizer = run_tokenizer(model_path).tokenizer
    else:
        raise UserError("trainer chat needs RUN_DIR or --model PATH")
    for name, folder in extra_adapters.items():
        check_adapter_folder(folder, f"--adapter {name}")
    adapters.update(extra_adapters)
    base = load_base(
        model_args,
        dtype=torch_dtype(model_args.dtype),
        quantize=False,
        device_map={"": default_device()},
        vocab_size=len(tokenizer),
    )
    if not adapters:
        return ChatModels(base.eval(), tokenizer)
    names = list(adapters)
    try:
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    except load_errors() as err:
        raise UserError(
            f"cannot load the adapters {', '.join(map(str, adapters.values()))}: {_first_line(err)}"
        ) from None
    chat = ChatModels(model.eval(), tokenizer, names)
    chat.use(names[0])
    return chat


def reply(chat: ChatModels, messages: list[dict], **gen) -> str:
    """The assistant's next message from the active adapter (or the base); `gen` as `trainer.generate.reply`."""
    with chat.as_active() as model:
        return generate.reply(model, chat.tokenizer, messages, **gen)


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
    console.print(
        f"[bold]trainer chat[/] adapters: {', '.join([BASE, *chat.adapters])}; active: {chat.active}. "
        "Commands: /use NAME, /base, /reset, /quit"
    )
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
