"""What a run trained, read back for the post-training commands (merge, eval, chat, export): its recipe, its
final adapter or model (or a verified checkpoint's adapter, when the run has not finished or the user names one),
and its tokenizer.

Everything is verified before it is loaded: a final adapter/, model/ or merged/ carries a manifest.json (the
checkpoints' format) and must match it; a damaged one is refused with the verified checkpoint to use instead
(`--checkpoint`). Which weights a command uses is always said: the final adapter, or `checkpoint step-N (step N
of M)`. All of this runs before torch is imported, so a wrong path costs no model load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.run_dir import RunDir


@dataclass(frozen=True)
class Tuned:
    """The trained weights a post-training command loads.

    adapter: the PEFT adapter folder (LoRA runs), else None.
    model: the full fine-tune's model folder, else None.
    label: what it is, for messages (`adapter/` or `checkpoint step-4 (step 4 of 10)`).
    merged: where `trainer merge` writes base + this adapter (RUN_DIR/merged for the final adapter,
        RUN_DIR/merged-step-N for a checkpoint's)."""

    adapter: Path | None
    model: Path | None
    label: str
    merged: Path


def read_recipe(run: RunDir):
    """The run's resolved recipe (`config.yaml`); UserError when the folder does not exist or is not a run."""
    from trainer.config import load_recipe

    if not run.root.exists():
        raise UserError(f"{run.root}: no such folder; pass the output_dir of a `trainer train` run")
    if not run.root.is_dir():
        raise UserError(f"{run.root}: is a file; pass the output_dir of a `trainer train` run (a folder)")
    if not run.exists_as_run() or not run.is_run_folder():
        raise UserError(
            f"{run.root}: not a run folder (no {run.marker.name} and config.yaml); pass the output_dir of a "
            "`trainer train` run"
        )
    return _paths_from_training_cwd(load_recipe(run.config), run)


def _paths_from_training_cwd(recipe, run: RunDir):
    """The recipe with its relative local paths (model, data files, a Jinja chat template) made absolute against
    the folder training ran in, when they are not found from here: post-training commands work from any folder.
    Paths found from here, absolute paths and hub ids are kept as written."""
    import dataclasses

    cwd = run.training_cwd()
    if cwd is None:
        return recipe

    def fix(value):
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute() or Path(value).exists():
            return value
        there = cwd / value
        return str(there) if there.exists() else value

    m, d = recipe.model, recipe.data
    datasets = [{**e, "path": fix(e.get("path"))} for e in d.datasets] if d.datasets else d.datasets
    return dataclasses.replace(
        recipe,
        model=dataclasses.replace(m, name_or_path=fix(m.name_or_path)),
        data=dataclasses.replace(d, path=fix(d.path), datasets=datasets, chat_template=fix(d.chat_template)),
    )


def tuned_source(run_dir, checkpoint: str | Path | None = None, log=print) -> Tuned:
    """The weights merge/eval/chat/export use for `run_dir`: `checkpoint` when given (a checkpoint folder, or an
    adapter folder), else the final adapter/ (LoRA) or model/ (full fine-tune), else, for a run that has not
    finished, its newest verified checkpoint. Logs which one unless it is the final result. UserError, one line,
    when there is nothing usable: the run has not saved yet, the final result is damaged (naming the verified
    checkpoint to pass as --checkpoint), or the named checkpoint does not verify."""
    from trainer.checkpoint import verify

    run = RunDir(run_dir)
    recipe = read_recipe(run)
    lora = recipe.lora is not None
    if checkpoint is not None:
        return _named_checkpoint(run, Path(checkpoint), lora, log)
    final = run.adapter if lora else run.model
    if final.exists():
        problem = _final_problem(run, final)
        if problem is None:
            return Tuned(final if lora else None, None if lora else final, f"{final.name}/", run.merged)
        ckpt = _newest_verified(run)
        hint = (
            f"the newest verified checkpoint is {ckpt} ({_progress(ckpt, recipe)}): pass --checkpoint {ckpt}"
            if ckpt is not None and (not lora or (ckpt / "adapter").is_dir())
            else "no verified checkpoint to use instead; train again with --fresh"
        )
        raise UserError(f"{final}: {problem}; the final {final.name} is damaged, {hint}")
    if not lora:
        ckpt = _newest_verified(run)
        done = f" (newest checkpoint {ckpt.name}, {_progress(ckpt, recipe)})" if ckpt is not None else ""
        raise UserError(
            f"{run.root}: the run has not finished{done}; a full fine-tune's model/ is written at the end of the "
            "run: resume the run (rerun the same `trainer train` command) to finish it"
        )
    ckpts = _checkpoints(run)
    if not ckpts:
        raise UserError(
            f"{run.root}: the run has not saved yet (no adapter/ and no checkpoint; the first checkpoint comes at "
            f"step {recipe.train.save_every}); wait for it or let the run finish"
        )
    for ckpt in ckpts:
        problem = verify(ckpt)
        if problem is None and (ckpt / "adapter").is_dir():
            label = f"checkpoint {ckpt.name} ({_progress(ckpt, recipe)})"
            log(f"{run.root}: the run has not finished; using {label}")
            return Tuned(ckpt / "adapter", None, label, run.merged_from(ckpt.name))
        log(f"checkpoint: skipping {ckpt}: {problem or 'no adapter/'}")
    raise UserError(
        f"{run.root}: the run has not finished and none of its {len(ckpts)} checkpoint(s) verifies "
        f"(newest {ckpts[0].name}: {verify(ckpts[0])}); resume the run to write a new one"
    )


def merged_source(run_dir, checkpoint: str | Path | None = None, log=print) -> tuple[Path | None, Tuned | None]:
    """For `trainer export`: (a verified merged model folder, None), or (None, the weights to merge first).
    A full fine-tune's model/ is its merged model."""
    from trainer.preflight import check_model_folder

    run = RunDir(run_dir)
    recipe = read_recipe(run)
    if recipe.lora is None:
        tuned = tuned_source(run_dir, checkpoint, log)
        return tuned.model, None
    tuned = tuned_source(run_dir, checkpoint, log)
    folder = tuned.merged
    if not (folder / "config.json").exists():
        return None, tuned
    problem = _final_problem(run, folder, legacy_ok=True)
    if problem:
        raise UserError(f"{folder}: {problem}; the merged model is damaged: run `trainer merge {run.root}` again")
    check_model_folder(folder, "merged model")
    if _merged_from_another_adapter(folder, tuned):
        log(f"{folder} was merged from an earlier adapter than {tuned.label}; merging again")
        return None, tuned
    return folder, None


def adapter_fingerprint(adapter: Path) -> str | None:
    """sha256 of the manifest that covers an adapter (its own manifest.json, or its checkpoint's), or None: it
    names the sha256 of every adapter file, and merge_report.json records it, so that a merged/ made from an
    earlier adapter (the run was resumed and trained further) is recognised."""
    from trainer.checkpoint import sha256

    for manifest in (Path(adapter) / "manifest.json", Path(adapter).parent / "manifest.json"):
        if manifest.is_file():
            return sha256(manifest)
    return None


def _merged_from_another_adapter(folder: Path, tuned: Tuned) -> bool:
    """Whether merge_report.json says the merge was made from an adapter other than `tuned`'s current one."""
    import json

    try:
        recorded = json.loads((folder / "merge_report.json").read_text(encoding="utf-8")).get("adapter_manifest_sha256")
    except (OSError, ValueError, AttributeError):
        return False
    if recorded is None or tuned.adapter is None:
        return False
    return recorded != adapter_fingerprint(tuned.adapter)


def _named_checkpoint(run: RunDir, ckpt: Path, lora: bool, log) -> Tuned:
    from trainer.checkpoint import verify
    from trainer.preflight import check_adapter_folder

    if not ckpt.is_dir():
        raise UserError(f"--checkpoint {ckpt}: no such folder")
    if (ckpt / "adapter_config.json").is_file():  # an adapter folder itself
        if (ckpt / "manifest.json").exists():
            problem = verify(ckpt)
            if problem:
                raise UserError(f"--checkpoint {ckpt}: {problem}")
        check_adapter_folder(ckpt, "--checkpoint")
        log(f"using the adapter in {ckpt}")
        return Tuned(ckpt, None, str(ckpt), run.merged_from(ckpt.name))
    if not (ckpt / "manifest.json").exists():
        raise UserError(
            f"--checkpoint {ckpt}: neither a checkpoint (no manifest.json) nor an adapter folder (no "
            "adapter_config.json); pass RUN_DIR/checkpoints/step-N"
        )
    if ckpt.resolve().parent != run.checkpoints.resolve():
        raise UserError(
            f"--checkpoint {ckpt}: not a checkpoint of {run.root} (its checkpoints are in {run.checkpoints}); pass "
            "one of them, or give that checkpoint's own run folder as RUN_DIR"
        )
    problem = verify(ckpt)
    if problem:
        raise UserError(f"--checkpoint {ckpt}: {problem}; pick another checkpoint")
    if not lora:
        raise UserError(
            f"--checkpoint {ckpt}: a full fine-tune's checkpoint holds training state, not a model folder; resume "
            "the run to write model/"
        )
    if not (ckpt / "adapter").is_dir():
        raise UserError(f"--checkpoint {ckpt}: holds no adapter/ (not a LoRA checkpoint)")
    label = f"checkpoint {ckpt.name}"
    try:
        from trainer.checkpoint import read_state

        state = read_state(ckpt)
        total = state.get("total_steps")
        label += f" (step {state['step']}" + (f" of {total})" if total else ")")
    except (UserError, KeyError):
        pass
    log(f"using {label}")
    return Tuned(ckpt / "adapter", None, label, run.merged_from(ckpt.name))


def _final_problem(run: RunDir, folder: Path, legacy_ok: bool = False) -> str | None:
    """What is wrong with a final adapter/, model/ or merged/, or None. It must match its manifest.json; without
    one it is a torn write (the manifest comes last), unless the run finished before manifests existed (its
    run_summary.json is there and the folder's files are complete)."""
    from trainer.checkpoint import verify
    from trainer.preflight import check_adapter_folder, check_model_folder

    if (folder / "manifest.json").exists() or folder.is_symlink():
        return verify(folder)
    if not (legacy_ok or run.summary.is_file()):
        return "no manifest.json (its write was interrupted)"
    try:
        if (folder / "adapter_config.json").exists():
            check_adapter_folder(folder, folder.name)
        else:
            check_model_folder(folder, folder.name)
    except UserError as err:
        return str(err)
    return None


def _checkpoints(run: RunDir) -> list[Path]:
    from trainer.checkpoint import list_checkpoints

    return list_checkpoints(run.root)


def _newest_verified(run: RunDir) -> Path | None:
    from trainer.checkpoint import find_resumable

    return find_resumable(run.root, log=lambda m: None)


def _progress(ckpt: Path, recipe) -> str:
    """`step N of M` for a checkpoint (M from its trainer_state.json, else the recipe's max_steps)."""
    from trainer.checkpoint import read_state

    try:
        state = read_state(ckpt)
    except UserError:
        return "step ?"
    total = state.get("total_steps") or recipe.train.max_steps
    return f"step {state.get('step', '?')}" + (f" of {total}" if total else "")


def adapter_dir(run: RunDir) -> Path:
    """The adapter a LoRA run's post-training commands load (`tuned_source`, quietly)."""
    tuned = tuned_source(run.root, log=lambda m: None)
    if tuned.adapter is None:
        raise UserError(f"{run.root}: a full fine-tune has no adapter; its model is in {run.model}")
    return tuned.adapter


def tokenizer_of(run: RunDir, recipe):
    """The tokenizer and chat template exactly as used in training: saved beside the adapter / model, else decided
    again from the recipe the same way training decided it (`trainer.tokenizer.run_tokenizer`)."""
    from trainer.tokenizer import load_tokenizer, run_tokenizer

    for folder in (run.adapter, run.model):
        if (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(str(folder))
    return run_tokenizer(recipe.model.name_or_path, recipe.data).tokenizer
