"""What a run trained, read back for the post-training commands (merge, eval, chat, export): its recipe, its
final adapter or model (or the newest verified checkpoint's, when the run was stopped), and its tokenizer."""

from __future__ import annotations

from pathlib import Path

from trainer.errors import UserError
from trainer.run_dir import RunDir


def read_recipe(run: RunDir):
    """The run's resolved recipe (`config.yaml`); UserError when the folder is not a run."""
    from trainer.config import load_recipe

    if not run.root.exists():
        raise UserError(f"{run.root}: no such folder; pass the output_dir of a `trainer train` run")
    if not run.exists_as_run():
        raise UserError(f"{run.root}: not a run folder (no config.yaml); pass the output_dir of a `trainer train` run")
    return load_recipe(run.config)


def adapter_dir(run: RunDir) -> Path:
    """The final adapter, else the newest verified checkpoint's consolidated adapter (a run that was stopped)."""
    from trainer.checkpoint import find_resumable

    if (run.adapter / "adapter_config.json").is_file():
        return run.adapter
    ckpt = find_resumable(run.root, log=lambda m: None)
    if ckpt is not None and (ckpt / "adapter" / "adapter_config.json").is_file():
        return ckpt / "adapter"
    raise UserError(f"{run.root}: no adapter/ and no checkpoint with an adapter; was it a LoRA run that saved?")


def tokenizer_of(run: RunDir, recipe):
    """The tokenizer and chat template exactly as used in training: saved beside the adapter / model, else decided
    again from the recipe the same way training decided it (`trainer.tokenizer.run_tokenizer`)."""
    from trainer.tokenizer import load_tokenizer, run_tokenizer

    for folder in (run.adapter, run.model):
        if (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(str(folder))
    return run_tokenizer(recipe.model.name_or_path, recipe.data).tokenizer
