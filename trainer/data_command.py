"""`trainer data RECIPE [key=value ...] [--show N] [--jsonl FILE]`: see the masks before spending GPU hours.

Prepares the data exactly as `trainer train` does (the same tokenizer decision, the same code, the same cache:
a following `train` starts from the cache this fills), prints the statistics (rows, samples, truncated, dropped,
trained tokens, pack fill), the first N training samples with their trained tokens highlighted, and with
`--jsonl FILE` writes every train-split sample, unpacked, in sample order, one JSON object per line:
`{"sample_id": int, "row": int, "input_ids": [...], "labels": [...]}` (labels -100 where there is no loss).

Packing here is what the recipe asks for; `train` may still fall back to one sample per row after checking the
model (`trainer/packing_check.py`), which changes the rows, never the samples.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data import IGNORE, describe, prepare_data, unpack
from trainer.errors import UserError
from trainer.tokenizer import run_tokenizer


def _runs(ids: list[int], labels: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, trained) runs of consecutive positions with the same trained state."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or (labels[k] != IGNORE) != (labels[start] != IGNORE):
            out.append((start, k, labels[start] != IGNORE))
            start = k
    return out


TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
"""Where no colour shows (output not a terminal: a pipe, a log file), trained text is written [[like this]]."""


def sample_text(tokenizer, ids: list[int], labels: list[int], colour: bool = True):
    """A rich Text of the sample's decoded tokens (special tokens shown), trained runs highlighted in colour, or
    (colour=False) between TRAINED_OPEN and TRAINED_CLOSE."""
    from rich.text import Text

    text = Text()
    done = ""
    for start, end, trained in _runs(ids, labels):
        upto = tokenizer.decode(ids[:end], skip_special_tokens=False)
        piece = upto[len(done) :] if upto.startswith(done) else tokenizer.decode(ids[start:end])
        done = upto
        if trained and not colour:
            piece = f"{TRAINED_OPEN}{piece}{TRAINED_CLOSE}"
        text.append(piece, style="bold black on green" if trained else "dim")
    return text


def write_jsonl(samples: list[dict], path: Path) -> None:
    """One JSON object per sample; the file is written whole under a temporary name, then renamed."""
    if path.exists():
        raise UserError(f"--jsonl {path}: exists; remove it or give another file name (nothing is overwritten)")
    if not path.parent.is_dir():
        raise UserError(f"--jsonl {path}: folder {path.parent} does not exist")
    from trainer.files import temp_beside

    tmp = temp_beside(path)  # never a name the user may own, such as FILE.tmp
    with tmp.open("x") as fh:
        for s in samples:
            fh.write(json.dumps(s) + "\n")
    tmp.rename(path)


def data_command(recipe, *, show: int = 0, jsonl: Path | None = None, console=None) -> dict:
    """`trainer data`: prepare (or read from the cache) the recipe's data, print stats and `show` samples, write
    `jsonl`. Returns the stats."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if jsonl is not None and Path(jsonl).exists():  # before the work, not after
        raise UserError(f"--jsonl {jsonl}: exists; remove it or give another file name (nothing is overwritten)")
    chat = run_tokenizer(recipe.model.name_or_path, recipe.data)
    tok = chat.tokenizer
    data = prepare_data(recipe.data, tok, log=lambda m: console.print(m, markup=False, soft_wrap=True))
    s = data.stats
    console.print(
        f"tokenizer: chat template {chat.template}; a reply ends with {tok.convert_ids_to_tokens(chat.end_of_turn)}; "
        f"generation stops on ids {chat.stop_ids}; BOS {'added' if chat.summary()['bos_added'] else 'not added'}",
        markup=False,
        soft_wrap=True,
    )
    console.print(f"data: {describe(s)}", markup=False, soft_wrap=True)
    samples = unpack(data.train)
    for sample, row in zip(samples, data.source_rows([x["sample_id"] for x in samples])):
        sample["row"] = row
    for sample in samples[: max(show, 0)]:
        n_target = sum(1 for x in sample["labels"] if x != IGNORE)
        colour = console.is_terminal
        how = "highlighted" if colour else f"between {TRAINED_OPEN} {TRAINED_CLOSE}"
        console.print(
            f"--- sample {sample['sample_id']} (row {sample['row']}): {len(sample['input_ids'])} tokens, "
            f"{n_target} trained ({how})",
            markup=False,
            soft_wrap=True,
        )
        console.print(sample_text(tok, sample["input_ids"], sample["labels"], colour), soft_wrap=True)
    if jsonl is not None:
        write_jsonl(samples, Path(jsonl))
        console.print(f"data: wrote {len(samples)} train samples to {jsonl}", markup=False, soft_wrap=True)
    return s
