"""`trainer chat`: talk to a tuned model, compare it with its base, switch adapters without reloading the base.

trainer chat RUN_DIR                          interactive, streaming; /use NAME, /base, /reset, /quit
trainer chat RUN_DIR --prompt "..."           one answer
trainer chat RUN_DIR --compare --prompt "..." base and tuned side by side
trainer chat RUN_DIR --prompts FILE [--compare] every prompt of FILE -> RUN_DIR/eval/prompts.{md,jsonl}
trainer chat RUN_DIR --adapter other=runs/x/adapter ...   several adapters on one loaded base
"""

from __future__ import annotations

import contextlib
import json
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
    """One base model in memory with any number of named LoRA adapters on top, and whole models by name beside it
    (a full fine-tune's own model is "tuned"; its original base is loaded only when asked for)."""

    model: object  # a PeftModel, a plain model when there is no adapter, or None (a full fine-tune without its base)
    tokenizer: object
    adapters: list[str] = field(default_factory=list)
    active: str = BASE
    whole: dict = field(default_factory=dict)  # name -> a model used as it is

    def names(self) -> list[str]:
        """Every model that can answer: the base (when loaded), the adapters, the whole models."""
        return [*([BASE] if self.model is not None else []), *self.adapters, *self.whole]

    def use(self, name: str) -> None:
        if name not in self.names():
            what = (
                "the original base is not loaded (--compare loads it)" if name == BASE else f"no model named '{name}'"
            )
            raise UserError(f"{what}; loaded: {', '.join(self.names())}")
        if name in self.adapters:
            self.model.set_adapter(name)
        self.active = name

    @contextlib.contextmanager
    def as_active(self):
        if self.active in self.whole:
            yield self.whole[self.active]
        elif self.active == BASE and self.adapters:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model


def load_chat_models(
    run_dir: Path | None,
    extra_adapters: dict[str, Path],
    model_path: str | None = None,
    source: Tuned | None = None,
    with_base: bool = False,
):
    """One base model (the run's, or `model_path`) with the run's adapter and `extra_adapters` loaded by name.
    `source`: the run's trained weights (`artifacts.tuned_source`; default: the final ones).

    A full fine-tune run: its own model is "tuned" (active); its original base (the recipe's model) is loaded too
    when `with_base` (side-by-side comparison) or when extra adapters need a base to sit on."""
    from peft import PeftModel

    from trainer.config import ModelArgs
    from trainer.model import _first_line, load_base, load_errors
    from trainer.preflight import check_adapter_folder

    def load(args):
        device_map = {"": default_device()}
        return load_base(
            args, dtype=torch_dtype(args.dtype), quantize=False, device_map=device_map, vocab_size=len(tokenizer)
        ).eval()

    adapters: dict[str, Path] = {}
    whole = {}
    if run_dir is not None:
        run = RunDir(run_dir)
        recipe = read_recipe(run)
        source = source or tuned_source(run.root)
        model_args, tokenizer = recipe.model, tokenizer_of(run, recipe)
        if recipe.lora is None:
            whole["tuned"] = load(replace(model_args, name_or_path=str(source.model)))
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
    base = load(model_args) if (not whole or with_base or adapters) else None
    if not adapters:
        chat = ChatModels(base, tokenizer, whole=whole)
        chat.use("tuned" if whole else BASE)
        return chat
    names = list(adapters)
    try:
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    except load_errors() as err:
        raise UserError(
            f"cannot load the adapters {', '.join(map(str, adapters.values()))}: {_first_line(err)}"
        ) from None
    chat = ChatModels(model.eval(), tokenizer, names, whole=whole)
    chat.use("tuned" if whole else names[0])
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
        f"[bold]trainer chat[/] models: {', '.join(chat.names())}; active: {chat.active}. "
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


# ----------------------------------------------------------------------------------------------- predefined prompts
def read_prompts(path: Path) -> list[dict]:
    """[{"prompt": str, "reference": str | None}] from FILE: JSONL (a `.jsonl` file, or one whose first line starts
    with `{`) with a `prompt` and an optional `reference` per line, else one prompt per non-empty line (as written,
    trailing whitespace removed). UserError naming the file and line."""
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((line for line in lines if line.strip()), "")
    out = []
    if path.suffix == ".jsonl" or first.lstrip().startswith("{"):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{n}: not valid JSON ({err.msg}); one object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise UserError(f'{path}:{n}: expected {{"prompt": "...", "reference": "..." (optional)}}')
            ref = row.get("reference")
            if ref is not None and not isinstance(ref, str):
                raise UserError(f"{path}:{n}: reference must be a string (got {type(ref).__name__})")
            out.append({"prompt": row["prompt"], "reference": ref})
    else:
        out = [{"prompt": line.rstrip(), "reference": None} for line in lines if line.strip()]
    if not out:
        raise UserError(f"--prompts {path}: no prompts in the file")
    return out


def prompts_dir(run_dir: Path | None) -> Path:
    """Where `--prompts` writes prompts.md / prompts.jsonl: RUN_DIR/eval, or ./eval without a run folder."""
    return RunDir(run_dir).eval if run_dir is not None else Path("eval")


def run_prompts(chat: ChatModels, prompts: list[dict], names: list[str], out_dir: Path, **gen) -> list[dict]:
    """Every prompt answered by each model of `names` (BASE and/or adapter names; batched, with the run's chat
    template and stop tokens; greedy when temperature is 0), printed side by side and written to
    `out_dir/prompts.md` and `out_dir/prompts.jsonl` (one object per prompt: prompt, reference, replies by name)."""
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    sampling = {"do_sample": gen["temperature"] > 0, "temperature": gen["temperature"] or 1.0, "top_p": gen["top_p"]}
    replies: dict[str, list[str]] = {}
    active = chat.active
    for name in names:
        chat.use(name)
        with chat.as_active() as model:
            replies[name] = generate.generate(
                model, chat.tokenizer, conversations, max_new_tokens=gen["max_new_tokens"], **sampling
            )
    chat.use(active)
    rows = [
        {"prompt": p["prompt"], "reference": p["reference"], "replies": {n: replies[n][i] for n in names}}
        for i, p in enumerate(prompts)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "prompts.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "prompts.md").write_text(prompts_markdown(rows, names), encoding="utf-8")
    print_prompts_table(rows, names)
    print(f"chat: wrote {out_dir / 'prompts.md'} and {out_dir / 'prompts.jsonl'}")
    return rows


def _md_cell(text: str | None) -> str:
    return "-" if text is None else text.replace("|", "\\|").replace("\n", "<br>")


def prompts_markdown(rows: list[dict], names: list[str]) -> str:
    """A markdown table: prompt, reference (when any prompt has one), then one column per model."""
    refs = any(r["reference"] is not None for r in rows)
    header = ["prompt", *(["reference"] if refs else []), *names]
    lines = ["# Replies to the predefined prompts", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r["prompt"], *([r["reference"]] if refs else []), *(r["replies"][n] for n in names)]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def print_prompts_table(rows: list[dict], names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    refs = any(r["reference"] is not None for r in rows)
    table = Table(show_lines=True)
    for col in ["prompt", *(["reference"] if refs else []), *names]:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["prompt"], *([r["reference"] or ""] if refs else []), *(r["replies"][n] for n in names))
    Console().print(table)
