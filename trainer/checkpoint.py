"""Checkpoints: atomic save (temp folder, manifest, fsync, rename, `latest` last), verify, resume, prune.

Layout of `RUN_DIR/checkpoints/step-N/`:
  accelerate/          accelerator.save_state output: trainable weights (safetensors), optimizer state
                       (under DeepSpeed: its own folder, one optimizer shard per rank)
  adapter/             the consolidated PEFT adapter (LoRA runs), loadable without DeepSpeed
  trainer_state.json   TrainState (step, epoch, cursor, samples/tokens seen, data seed)
  rng/rank-R.json      python, numpy, torch (and CUDA) RNG of every rank, as JSON: nothing pickled
  full_optimizer.safetensors   DeepSpeed runs: the ZeRO state made whole (fp32 master weights, AdamW moments and
                       step of every trainable tensor, by name), what a resume on another number of processes or
                       without DeepSpeed loads (see "Resume on another topology" below)
  config.yaml          the resolved recipe; its hash is in trainer_state.json
  manifest.json        size and sha256 of every file above; written last, before the rename

Everything in a checkpoint is untrusted when read back: manifest paths are confined to the checkpoint folder
(absolute paths, `..` and symlinks leading out are refused), only regular files are read (a manifest naming a
FIFO or /dev/zero never blocks), and trainer_state.json is type-checked field by field. A save that the storage
refuses (disk full, read-only, quota) stops the run with one line naming the path, the free space and the last
complete checkpoint; `latest` names a complete checkpoint at every instant.

Loading never unpickles anything we did not write: tensors are safetensors; accelerate reads optimizer.bin with
torch.load(weights_only=True); a file that the manifest does not list (e.g. a planted *.pkl) makes the checkpoint
fail `verify`. Only DeepSpeed's own loader (ZeRO checkpoints) uses weights_only=False; the manifest's sha256
guards those files against corruption, not against someone who can also rewrite manifest.json.

Resume on another topology
--------------------------
Without DeepSpeed the optimizer state in `accelerate/` is whole (rank 0 writes it; DDP ranks are replicas), so it
loads on any number of processes. DeepSpeed's ZeRO state is cut into one flat partition per rank; DeepSpeed itself
reloads it only at the same world size (its elastic path refills the fp32 masters from the low-precision weights,
and its universal checkpoint needs an offline `ds_to_universal` pass over every rank's files, pickled). Instead
every DeepSpeed save also writes `full_optimizer.safetensors`: each trainable tensor's fp32 master and AdamW
moments, gathered whole with DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param`,
`safe_get_full_optimizer_state`, the same collectives `trainable_state_dict` uses), and the AdamW step. A resume
on another number of processes, or without DeepSpeed, cuts those tensors into the new partitions
(`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`, after creating the flat AdamW state the way
DeepSpeed's own universal loader does) or hands them to torch's AdamW; a non-DeepSpeed checkpoint resumed under
DeepSpeed is read from accelerate's files the same way. Every value is copied, never recomputed: the state
after loading is bit for bit the state that was saved. It is written for `train.optimizer: adamw` (8-bit states
are quantized per block of the flat partition and do not survive a new cut) and at most
`FULL_STATE_MAX_PARAMS` trainable parameters (rank 0 holds the whole state in host memory while writing it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import stat
import time
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from trainer.config import Recipe, dump_yaml, recipe_hash
from trainer.distributed import is_deepspeed
from trainer.errors import UserError
from trainer.files import as_storage_error, disk_error, fsync_dir, read_json, read_yaml_mapping, utf8_problem
from trainer.run_dir import RunDir
from trainer.state import TrainState

if TYPE_CHECKING:
    import torch

PREFIX = "step-"
FULL_OPTIMIZER = "full_optimizer.safetensors"
FULL_STATE_MAX_PARAMS = 500_000_000
"""Largest trainable parameter count whose whole optimizer state a DeepSpeed save writes (12 bytes per parameter:
6 GB at the cap; a 7B LoRA of rank 64 on every linear layer has 160M)."""
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


# ----------------------------------------------------------------------------------------------- save
def save(
    accelerator, model, run_dir: Path, state: TrainState, recipe: Recipe, extra_state: dict | None = None, log=print
) -> Path:
    """Called on every rank. Returns the final checkpoint folder. Under DeepSpeed the whole optimizer state is also
    written (FULL_OPTIMIZER) when `writes_full_state` says so.

    When the storage refuses a write (disk full, read-only, quota) on any rank, every rank raises the same
    UserError (the ranks agree through an all-reduce, so none waits forever at a barrier): the half-written
    temp folder is removed, and the message names the path, the free space, about how much this checkpoint
    needs, and the last complete checkpoint, which is untouched."""
    t0 = time.perf_counter()
    root = checkpoints_dir(run_dir)
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f".tmp-{PREFIX}{state.step}"
    failed = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
        except OSError as err:
            failed = err
    _stop_if_any_failed(accelerator, failed, run_dir, tmp, model)  # also the barrier before every rank writes
    try:
        accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True, **_save_kwargs(accelerator))
        _write_json(tmp / "rng" / f"rank-{accelerator.process_index}.json", rng_state())
    except Exception as err:  # noqa: BLE001 - disk full, read-only, quota: every rank must learn of it (no hang)
        failed = _storage_error(err, tmp)
    adapter = trainable_state_dict(accelerator, model) if is_peft(accelerator, model) else None  # every rank
    full = full_optimizer_state(accelerator, model) if writes_full_state(accelerator, model, recipe) else None
    _stop_if_any_failed(accelerator, failed, run_dir, tmp, model)
    if accelerator.is_main_process:
        try:
            _drop_accelerate_pickles(tmp / "accelerate")
            if adapter is not None:
                save_adapter(accelerator, model, tmp / "adapter", adapter, initial=initial_adapter_of(run_dir))
            if full is not None:
                from safetensors.torch import save_file

                save_file(full, str(tmp / FULL_OPTIMIZER), metadata={"format": "trainer-full-optimizer-1"})
            state_dict = {
                **state.to_dict(),
                "recipe_hash": recipe_hash(recipe),
                "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                **(extra_state or {}),
            }
            _write_json(tmp / "trainer_state.json", state_dict)
            (tmp / "config.yaml").write_text(dump_yaml(recipe))
            write_manifest(tmp)
            _fsync_tree(tmp)
            publish(root, tmp, final)
        except Exception as err:  # noqa: BLE001
            failed = _storage_error(err, tmp)
    _stop_if_any_failed(accelerator, failed, run_dir, tmp, model)
    if accelerator.is_main_process:
        prune(root, recipe.train.keep_last, upto=state.step)
        log(f"checkpoint: {final} ({dir_bytes(final) / 2**20:.1f} MiB, {time.perf_counter() - t0:.2f} s)")
    accelerator.wait_for_everyone()
    return final


def publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final` and point `latest` at it, so that at every instant `latest` names a
    complete checkpoint: when `final` exists already (the same step saved again, e.g. a rerun after the end),
    `latest` first moves to the newest other complete checkpoint (or is removed), then the old folder goes."""
    if final.exists():
        others = [c for c in list_checkpoints(root.parent) if c != final and verify(c) is None]
        if others:
            _write_latest(root, others[0].name)
        else:
            (root / "latest").unlink(missing_ok=True)
        old = root / f".tmp-{final.name}.old"  # a `.tmp-step-*` name: prune removes it if we are killed here
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    _write_latest(root, final.name)


def _storage_error(err: Exception, tmp: Path) -> OSError:
    """The storage failure behind `err` (`trainer.files.as_storage_error`); anything else is re-raised."""
    storage = as_storage_error(err, tmp if tmp.exists() else tmp.parent)
    if storage is None:
        raise err
    return storage


def _stop_if_any_failed(accelerator, failed: OSError | None, run_dir: Path, tmp: Path, model) -> None:
    """All ranks agree whether any rank's part of the save failed (one all-reduce, which is also a barrier); if so
    every rank raises the same UserError and rank 0 removes the temp folder. Without a failure: a barrier."""
    import torch

    flag = torch.tensor([0.0 if failed is None else 1.0], device=accelerator.device)
    any_failed = accelerator.reduce(flag, reduction="sum").item() > 0 if accelerator.num_processes > 1 else failed
    if not any_failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    last = find_resumable(run_dir, log=lambda m: None)
    needed = dir_bytes(last) if last is not None else 16 * _trainable_numel(accelerator, model)
    what = disk_error(failed, tmp, needed) if failed is not None else f"{tmp}: another rank could not write its part"
    kept = f"the last complete checkpoint is {last}" if last is not None else "no complete checkpoint was saved yet"
    raise UserError(
        f"checkpoint: cannot save: {what}; {kept}. Training stopped; free space (or make the storage writable) "
        "and rerun the same command to resume"
    )


def _trainable_numel(accelerator, model) -> int:
    """Trainable parameters: a checkpoint holds them in fp32 with two AdamW moments and the adapter copy (~16 B
    each), used to say how much space a first checkpoint needs."""
    return sum(p.numel() for p in accelerator.unwrap_model(model).parameters() if p.requires_grad)


def save_adapter(accelerator, model, out: Path, state_dict: dict | None = None, initial: Path | None = None) -> None:
    """The consolidated adapter, written by the caller's rank (rank 0). `state_dict`: from `trainable_state_dict`
    (exact under DeepSpeed); None saves the unwrapped module's own weights (exact only without DeepSpeed).

    `initial`: the PiSSA/OLoRA adapter as initialised (`save_initial_adapter`); the adapter is then converted by peft
    (`path_initial_model_for_weight_conversion`: A' = [A; A0], B' = [B, -B0], rank 2r) into one that applies to the
    ORIGINAL base weights. peft computes it from the module's weights (the state_dict cannot carry the initial
    adapter), which are the fp32 masters without DeepSpeed; PiSSA/OLoRA are refused under DeepSpeed (train.py)."""
    unwrapped = accelerator.unwrap_model(model)
    if initial is None:
        unwrapped.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
        return
    import warnings

    was_training = unwrapped.training
    with warnings.catch_warnings():  # peft loads the initial adapter beside the trained one to convert, and warns
        # that PiSSA/OLoRA "should not be used with other adapters" and should be converted: what this does
        warnings.filterwarnings("ignore", message=r"(PiSSA|OLoRA) changes the base weights")
        unwrapped.save_pretrained(
            str(out), safe_serialization=True, path_initial_model_for_weight_conversion=str(initial)
        )
    unwrapped.train(was_training)


def save_initial_adapter(model, folder: Path) -> None:
    """Write the just-initialised PiSSA/OLoRA adapter to `folder` (peft's recipe: saved with init_lora_weights=True,
    so that loading it later does not decompose the residual base again)."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def initial_adapter_of(run_dir: Path) -> Path | None:
    """RUN_DIR/initial_adapter when the run has one (PiSSA/OLoRA), else None."""
    folder = RunDir(run_dir).initial_adapter
    return folder if (folder / "adapter_config.json").is_file() else None


def is_peft(accelerator, model) -> bool:
    return hasattr(accelerator.unwrap_model(model), "peft_config")


def trainable_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, fp32, on CPU, by parameter name: on rank 0; {} on the other ranks.

    Call it on EVERY rank. Under DeepSpeed the exact weights are the fp32 masters in the ZeRO optimizer
    partitions (with bf16/fp16 the module holds only rounded low-precision copies): each one is assembled with
    `deepspeed.utils.safe_get_full_fp32_param`, a collective over the data-parallel group. Without DeepSpeed the
    module's own (fp32) weights are the masters.
    """
    import torch

    deepspeed = is_deepspeed(accelerator)
    if deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    # remove_duplicate=False: a tied trainable weight (lm_head/embed_tokens in modules_to_save) under each of its
    # names, as peft's adapter saving looks up both
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param) if deepspeed else None
        if accelerator.is_main_process:
            out[name] = (param if full is None else full).detach().to("cpu", torch.float32, copy=True)
    return out


def writes_full_state(accelerator, model, recipe: Recipe) -> bool:
    """Whether a save writes FULL_OPTIMIZER: under DeepSpeed, with torch AdamW, up to FULL_STATE_MAX_PARAMS
    trainable parameters (the same answer on every rank)."""
    if not is_deepspeed(accelerator) or recipe.train.optimizer != "adamw":
        return False
    unwrapped = accelerator.unwrap_model(model)
    return sum(p.numel() for p in unwrapped.parameters() if p.requires_grad) <= FULL_STATE_MAX_PARAMS


def full_optimizer_state(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole ZeRO optimizer state of the trainable tensors, fp32, on CPU, on rank 0 ({} elsewhere): for each
    parameter name N, `master/N` (fp32 master weight), `exp_avg/N`, `exp_avg_sq/N` (AdamW moments) and `step/N`
    (AdamW step count, shape [1]). Call it on EVERY rank of a DeepSpeed ZeRO-1/2 run: each tensor is one
    all-reduce over the data-parallel group. Before the first optimizer step the moments are zeros, step 0."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = model.optimizer  # the engine's DeepSpeedZeroOptimizer
    stepped = len(zero.optimizer.state) > 0  # AdamW creates its state at the first step, on every rank at once
    step_of = {}
    for group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        step = zero.optimizer.state[flat]["step"] if stepped else 0.0
        step_of.update({id(p): float(step) for p in group})
    out = {}
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        master = safe_get_full_fp32_param(param)
        moments = [safe_get_full_optimizer_state(param, k) if stepped else torch.zeros_like(master) for k in ADAM_KEYS]
        if accelerator.is_main_process:
            out[f"master/{name}"] = master.detach().to("cpu", torch.float32, copy=True)
            for key, value in zip(ADAM_KEYS, moments):
                out[f"{key}/{name}"] = value.detach().to("cpu", torch.float32, copy=True)
            out[f"step/{name}"] = torch.tensor([step_of[id(param)]], dtype=torch.float32)
    return out


def _save_kwargs(accelerator) -> dict:
    if is_deepspeed(accelerator):
        return {"exclude_frozen_parameters": True}  # LoRA: never copy the frozen base into a checkpoint
    return {}


def install_trainable_only_hook(accelerator) -> None:
    """accelerate saves `model.state_dict()` (the frozen base too); keep only trainable tensors.

    On load, accelerate uses strict=False (the frozen base is not in the file), which would also accept a file
    whose names match nothing and silently train on from fresh weights: check the names first."""

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights):
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in names]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)
    accelerator.register_load_state_pre_hook(check_weight_names)


def check_weight_names(models, input_dir) -> None:
    """Every trainable parameter must be in the checkpoint, and nothing the model does not have."""
    from safetensors import safe_open

    for i, model in enumerate(models):
        f = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        if not f.is_file():
            raise UserError(f"{f}: missing; this checkpoint was not written by a non-DeepSpeed run of this trainer")
        with safe_open(str(f), framework="pt") as fh:
            saved = set(fh.keys())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing, unknown = sorted(trainable - saved), sorted(saved - set(model.state_dict()))
        if missing or unknown:
            raise UserError(
                f"{f}: does not match the model: {len(missing)} trainable tensor(s) missing "
                f"{missing[:3]}, {len(unknown)} unknown {unknown[:3]}"
            )


def _drop_accelerate_pickles(folder: Path) -> None:
    # accelerate also pickles RNG states; ours are JSON (rng/), and we never unpickle on resume.
    for f in folder.glob("random_states_*.pkl"):
        f.unlink()


def rng_state() -> dict:
    import numpy as np
    import torch

    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(d: dict) -> None:
    import numpy as np
    import torch

    random.setstate((d["python"][0], tuple(d["python"][1]), d["python"][2]))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(d["torch"], dtype=torch.uint8))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in d["cuda"]])


# ----------------------------------------------------------------------------------------------- manifest
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder) != Path("manifest.json"))
    manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    _write_json(folder / "manifest.json", {"files": manifest})


def verify(folder: Path) -> str | None:
    """None if the checkpoint (or any folder with a manifest.json: the final adapter/, model/, merged/) is complete
    and intact, else what is wrong. Every path the manifest names must stay inside the folder and be a regular
    file; symlinks leading out of the folder and files the manifest does not list are refused; a
    trainer_state.json and config.yaml, when listed, must read back (types and ranges of every state field)."""
    folder = Path(folder)
    if folder.is_symlink():
        return f"is a symlink to {folder.resolve()} (checkpoints are never followed out of the run)"
    base = folder.resolve()
    mf = folder / "manifest.json"
    if not mf.exists() and not mf.is_symlink():
        return "no manifest.json (incomplete save)"
    problem = _entry_problem(folder, base, "manifest.json")
    if problem:
        return problem
    raw = mf.read_bytes()
    if utf8_problem(raw):
        return f"manifest.json: {utf8_problem(raw)}"
    try:
        files = json.loads(raw.decode("utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "manifest.json is unreadable"
    if not isinstance(files, dict) or not all(_meta_ok(m) for m in files.values()):
        return "manifest.json is unreadable (an entry without an integer size and a sha256)"
    for rel, meta in files.items():
        problem = _manifest_path_problem(rel)
        if problem:
            return f"manifest.json names {rel!r}, {problem} (never read)"
        p = folder / rel
        if not p.exists() and not p.is_symlink():
            return f"{rel} is missing"
        problem = _entry_problem(folder, base, rel)
        if problem:
            return problem
        if p.stat().st_size != meta["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}"
        if sha256(p) != meta["sha256"]:
            return f"{rel} checksum mismatch"
    for dirpath, dirnames, filenames in os.walk(folder):  # never follows symlinked folders
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                problem = _entry_problem(folder, base, rel, must_be_file=False)
                if problem:
                    return problem
            if name in filenames and rel != "manifest.json" and rel not in files:
                return f"{rel} is not in manifest.json (not written by this save; never loaded)"
    if "trainer_state.json" in files:
        raw = (folder / "trainer_state.json").read_bytes()
        if utf8_problem(raw):
            return f"trainer_state.json: {utf8_problem(raw)}"
        try:
            state = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as err:
            return f"trainer_state.json:{err.lineno}: not valid JSON ({err.msg})"
        problem = state_problem(state)
        if problem:
            return f"trainer_state.json: {problem}"
    return None


def _meta_ok(meta) -> bool:
    return (
        isinstance(meta, dict)
        and isinstance(meta.get("bytes"), int)
        and not isinstance(meta.get("bytes"), bool)
        and isinstance(meta.get("sha256"), str)
    )


def _manifest_path_problem(rel) -> str | None:
    """Why a path named by a manifest is not a plain relative path inside the folder, or None."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return "not a relative path"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return "an absolute path outside the checkpoint folder"
    if any(part in ("..", ".") for part in p.parts) or rel.endswith("/"):
        return "a path that leaves the checkpoint folder"
    return None


def _entry_problem(folder: Path, base: Path, rel: str, must_be_file: bool = True) -> str | None:
    """Why an entry of the folder must not be read, or None: a symlink (itself or a parent folder) leading out of
    the folder, or, when `must_be_file`, anything but a regular file (FIFO, device, socket, folder)."""
    p = folder / rel
    target = p.resolve()
    if target != base and base not in target.parents:
        return f"{rel} is a symlink to {target}, outside the checkpoint folder (never followed)"
    if not must_be_file:
        return None
    try:
        mode = p.stat().st_mode
    except OSError as err:
        return f"{rel} cannot be read ({err.strerror})"
    if not stat.S_ISREG(mode):
        return f"{rel} is not a regular file (never read)"
    return None


STATE_EXTRA = {"recipe_hash": str, "distributed_type": str, "world_size": int, "total_steps": int}
"""Keys `save` writes beside TrainState's fields, and their types (each int >= 1)."""


def state_problem(state) -> str | None:
    """What is wrong with a trainer_state.json's content (first problem, naming the field), or None. TrainState's
    integer fields must be integers >= 0, wall_time a finite number >= 0; keys we do not know are ignored (a
    newer trainer may add some)."""
    if not isinstance(state, dict):
        return f"expected a JSON object, found {type(state).__name__}"
    for f in fields(TrainState):
        if f.name not in state:
            continue
        value = state[f.name]
        if f.type in ("int", int):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return f"field {f.name}={value!r} must be an integer >= 0"
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            return f"field {f.name}={value!r} must be a finite number >= 0"
    for name, kind in STATE_EXTRA.items():
        if name not in state:
            continue
        value = state[name]
        if kind is str and not isinstance(value, str):
            return f"field {name}={value!r} must be a string"
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return f"field {name}={value!r} must be an integer >= 1"
    return None


# ----------------------------------------------------------------------------------------------- find / prune
def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders, newest first (temp folders are never listed)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def find_resumable(run_dir: Path, log=print) -> Path | None:
    """The newest checkpoint that verifies against its manifest; broken ones are reported by name."""
    for ckpt in list_checkpoints(run_dir):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log(f"checkpoint: skipping {ckpt}: {problem}")
    return None


def prune(root: Path, keep_last: int, upto: int | None = None) -> None:
    """Keep the `keep_last` newest checkpoints at or below step `upto` (the one just saved); remove temp folders.

    Checkpoints above `upto` are left alone: they are what a resume skipped (broken) or stepped back from
    (--resume of an older one), and are replaced when the run gets there. Counting them would let a broken
    step-10 push out the step-8 just written (keep_last=1) and leave nothing to resume from."""
    kept = [c for c in list_checkpoints(root.parent) if upto is None or int(c.name[len(PREFIX) :]) <= upto]
    for old in kept[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    with tmp.open("w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / "latest")
    fsync_dir(root)


def point_latest_at(ckpt: Path) -> None:
    """Make `latest` name `ckpt` (the complete checkpoint a run resumes from) if it names anything else: a
    kill between a save's rename and its `latest` update, or a newer checkpoint that no longer verifies, leaves
    it behind. Rank 0 only."""
    root = ckpt.parent
    try:
        current = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != ckpt.name:
        _write_latest(root, ckpt.name)


def set_aside_newer(ckpt: Path, log=print) -> list[Path]:
    """`--resume` of an older checkpoint: the complete checkpoints above it belong to the run being stepped back
    from. They are renamed `superseded-step-N-DATE` (kept, never listed or resumed), so that neither a later
    plain rerun nor `latest` jumps back to them. Rank 0 only. Returns the new paths."""
    step = int(ckpt.name[len(PREFIX) :])
    moved = []
    for other in list_checkpoints(ckpt.parent.parent):
        if int(other.name[len(PREFIX) :]) > step and verify(other) is None:
            aside = other.with_name(f"superseded-{other.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(other, aside)
            moved.append(aside)
    if moved:
        log(
            f"resume: from {ckpt.name}; newer checkpoints of the run stepped back from are kept as "
            f"{', '.join(p.name for p in moved)} (never resumed)"
        )
    return moved


# ----------------------------------------------------------------------------------------------- resume
def load(accelerator, ckpt: Path, model=None, optimizer=None) -> TrainState:
    """Restore model/optimizer, this rank's RNG, and the trainer state. Every rank calls it.

    Same layout (`same_layout`): accelerate's own loader. DDP checkpoints hold the whole optimizer state (rank 0
    writes it, ranks are replicas) and weights under unwrapped names, so they load on any number of processes.
    Another layout (ZeRO on another world size, DeepSpeed <-> not): the whole state by name (`read_full_state`),
    cut into this launch's layout (`load_full_state`); `model` and `optimizer` (the prepared ones) are needed
    then. Whether that is possible was decided before anything was loaded (train.resume_topology_problem). The
    data cursor is global (state.py) in every case."""
    saved = read_state(ckpt)
    if same_layout(saved, accelerator):
        kwargs = {"load_module_strict": False} if is_deepspeed(accelerator) else {"strict": False}
        accelerator.load_state(str(ckpt / "accelerate"), **kwargs)
    else:
        if model is None or optimizer is None:
            raise ValueError("load: a checkpoint of another layout needs the prepared model and optimizer")
        load_full_state(accelerator, model, optimizer, read_full_state(ckpt, accelerator.unwrap_model(model)))
    rng_file = ckpt / "rng" / f"rank-{accelerator.process_index}.json"
    if rng_file.exists():
        try:
            set_rng_state(read_json(rng_file, "an RNG state"))
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(
                f"{rng_file}: not an RNG state written by trainer ({err}); resume another checkpoint"
            ) from None
    return TrainState.from_dict(saved)


def read_state(ckpt: Path) -> dict:
    """trainer_state.json, type-checked (`state_problem`); UserError naming the file and the field."""
    path = ckpt / "trainer_state.json"
    state = read_json(path, "a checkpoint's trainer state")
    problem = state_problem(state)
    if problem:
        raise UserError(f"{path}: {problem}; resume another checkpoint")
    return state


def same_layout(saved: dict, accelerator) -> bool:
    """Whether accelerate's own loader can restore this checkpoint (its trainer_state.json) on this launch: both
    without DeepSpeed (any world sizes), or both DeepSpeed on the same number of processes. Checkpoints written
    before these keys existed are left to accelerate."""
    if "distributed_type" not in saved:
        return True
    was_ds, now_ds = saved["distributed_type"] == "DEEPSPEED", is_deepspeed(accelerator)
    return was_ds == now_ds and (not was_ds or saved.get("world_size") == accelerator.num_processes)


def read_full_state(ckpt: Path, unwrapped) -> dict[str, torch.Tensor]:
    """The whole optimizer state of `ckpt` by parameter name, in `full_optimizer_state`'s keys: from
    FULL_OPTIMIZER (DeepSpeed checkpoints) or from accelerate's model.safetensors + optimizer.bin (without
    DeepSpeed: torch AdamW numbers its state by position in the param groups, which are trainer.optim's, rebuilt
    here from the same model). UserError when the names or shapes do not match `unwrapped`'s trainable tensors."""
    import torch
    from safetensors.torch import load_file

    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    if (ckpt / FULL_OPTIMIZER).is_file():
        where = ckpt / FULL_OPTIMIZER
        full = load_file(str(where))
    else:
        from trainer.optim import param_groups

        where = ckpt / "accelerate" / "optimizer.bin"
        weights = load_file(str(ckpt / "accelerate" / "model.safetensors"))
        saved = torch.load(where, map_location="cpu", weights_only=True)
        name_of = {id(p): n for n, p in trainable.items()}
        groups = [[name_of[id(p)] for p in g["params"]] for g in param_groups(unwrapped, 0.0)]
        if [len(g["params"]) for g in saved["param_groups"]] != [len(g) for g in groups]:
            raise UserError(f"{where}: its parameter groups do not match the model's; cannot resume from it")
        full = {}
        for saved_group, names in zip(saved["param_groups"], groups):
            for index, name in zip(saved_group["params"], names):
                if name not in weights:
                    raise UserError(f"{ckpt / 'accelerate' / 'model.safetensors'}: no tensor {name}")
                state = saved["state"].get(index, {})
                full[f"master/{name}"] = weights[name].float()
                for key in ADAM_KEYS:
                    full[f"{key}/{name}"] = state[key].float() if key in state else torch.zeros_like(weights[name])
                full[f"step/{name}"] = torch.tensor([float(state.get("step", 0.0))], dtype=torch.float32)
    names = {k.split("/", 1)[1] for k in full if k.startswith("master/")}
    missing, unknown = sorted(set(trainable) - names), sorted(names - set(trainable))
    if missing or unknown:
        raise UserError(
            f"{where}: does not match the model: {len(missing)} trainable tensor(s) missing {missing[:3]}, "
            f"{len(unknown)} unknown {unknown[:3]}"
        )
    for name, param in trainable.items():
        for key in ("master", *ADAM_KEYS):
            t = full.get(f"{key}/{name}")
            if t is None or tuple(t.shape) != tuple(param.shape):
                raise UserError(
                    f"{where}: {key}/{name} is missing or has shape {None if t is None else tuple(t.shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
    return full


def _adam_step(value: float, group: dict, device) -> torch.Tensor:
    # torch AdamW keeps `step` as a float scalar tensor: on CPU, or on the parameter's device when fused/capturable.
    import torch

    on_device = bool(group.get("fused") or group.get("capturable"))
    return torch.tensor(float(value), dtype=torch.float32, device=device if on_device else "cpu")


def load_full_state(accelerator, model, optimizer, full: dict[str, torch.Tensor]) -> None:
    """Put a whole optimizer state (`read_full_state`) into this launch's model and optimizer, on every rank.

    DeepSpeed ZeRO-1/2: each flat fp32 partition gets AdamW state tensors (zeros, then the step), DeepSpeed links
    its per-parameter fragments to them (as its universal-checkpoint loader does), and `safe_set_full_*` copies
    this rank's slice of every master weight and moment; the module's (low-precision) weights are the masters cast
    to their dtype, which is what DeepSpeed's own step leaves them at. Without DeepSpeed: the module's weights are
    the masters and torch AdamW's per-parameter state is set."""
    import torch

    unwrapped = accelerator.unwrap_model(model)
    trainable = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    with torch.no_grad():
        if is_deepspeed(accelerator):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            zero = model.optimizer
            name_of = {id(p): n for n, p in trainable}
            for i, (group, flat) in enumerate(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups)):
                steps = {float(full[f"step/{name_of[id(p)]}"]) for p in group}
                if len(steps) != 1:
                    raise UserError(f"{FULL_OPTIMIZER}: the tensors of parameter group {i} have different step counts")
                state = zero.optimizer.state[flat]
                for key in ADAM_KEYS:
                    state[key] = torch.zeros_like(flat)
                state["step"] = _adam_step(steps.pop(), zero.optimizer.param_groups[i], flat.device)
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
            for name, param in trainable:
                master = full[f"master/{name}"]
                safe_set_full_fp32_param(param, master)
                for key in ADAM_KEYS:
                    safe_set_full_optimizer_state(param, full[f"{key}/{name}"], key)
                param.data.copy_(master.to(param.dtype))
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer -> torch AdamW
        group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
        for name, param in trainable:
            param.data.copy_(full[f"master/{name}"].to(param.dtype))
            state = {k: full[f"{k}/{name}"].to(param.device, param.dtype).clone() for k in ADAM_KEYS}
            state["step"] = _adam_step(float(full[f"step/{name}"]), group_of[id(param)], param.device)
            inner.state[param] = state


# Changing these would make the saved weights, optimizer state or data position meaningless.
BREAKING = [
    "model.name_or_path",
    "model.quantization",
    "lora",
    "data.path",
    "data.datasets",
    "data.format",
    "data.columns",
    "data.column_types",
    "data.max_seq_len",
    "data.packing",
    "data.group_by_length",
    "data.train_on",
    "data.chat_template",
    "data.add_special_tokens",
    "data.rewritten_turns",
    "data.fold_system_turn",
    "data.val_fraction",
    "data.test_fraction",
    "data.split_seed",
    "data.hub_split",
    "train.optimizer",
    "train.loraplus_lr_ratio",  # the optimizer's param groups and their learning-rate ratios are in its state
]


def recipe_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(breaking, harmless) differences between the checkpoint's recipe and this one, as 'key: a -> b'."""

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict) and k != "columns":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    if (old.get("lora") is None) != (new.get("lora") is None):  # LoRA <-> full fine-tune: one line, not one per key
        a = {k: v for k, v in a.items() if not k.startswith("lora.")}
        b = {k: v for k, v in b.items() if not k.startswith("lora.")}
        a["lora"], b["lora"] = old.get("lora"), new.get("lora")
    breaking, harmless = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or key == "output_dir":
            continue
        line = f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        (breaking if any(key == k or key.startswith(k + ".") for k in BREAKING) else harmless).append(line)
    return breaking, harmless


def with_defaults(raw: dict) -> dict:
    """A checkpoint's recipe with the keys it lacks (added to the recipe after it was written) at their defaults,
    which is what they were when it was written."""
    from trainer.config import to_dict

    defaults = to_dict(Recipe())
    out = dict(raw)
    for section, values in defaults.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            out[section] = {**values, **raw[section]}
    return out


def check_compatible(ckpt: Path, recipe: Recipe) -> list[str]:
    """Raise UserError if the recipe changed in a way the checkpoint cannot follow; return harmless changes."""
    from trainer.config import to_dict

    old = with_defaults(read_yaml_mapping(ckpt / "config.yaml", "the checkpoint's recipe"))
    breaking, harmless = recipe_differences(old, to_dict(recipe))
    if breaking:
        raise UserError(
            f"{ckpt}: cannot resume, the recipe changed in ways this checkpoint cannot follow: "
            + "; ".join(breaking)
            + ". Restore those values, or start over with --fresh."
        )
    return harmless


def data_changes(saved: list[dict] | None, now: list[dict]) -> list[str]:
    """What changed between the data fingerprint a checkpoint saved and the data now, one phrase per dataset, e.g.
    'h_data.jsonl: 8 -> 3 rows, content hash differs'. [] when nothing did (or the checkpoint has no fingerprint)."""
    if not saved:
        return []
    old = {d["name"]: d for d in saved}
    changes = []
    for d in now:
        before = old.pop(d["name"], None)
        label = Path(d["path"]).name or d["name"]
        if before is None:
            changes.append(f"{label}: not in the checkpoint's data")
            continue
        if before["rows"] == d["rows"] and before["sha256"] == d["sha256"]:
            continue
        rows = f"{before['rows']} -> {d['rows']} rows" if before["rows"] != d["rows"] else f"{d['rows']} rows"
        changes.append(f"{label}: {rows}" + (", content hash differs" if before["sha256"] != d["sha256"] else ""))
    changes += [f"{Path(d['path']).name or d['name']}: no longer in the data" for d in old.values()]
    return changes


def check_data(ckpt: Path, fingerprint: list[dict]) -> None:
    """Refuse (UserError) to resume from `ckpt` when the data's content changed since it was saved."""
    changes = data_changes(read_state(ckpt).get("data_fingerprint"), fingerprint)
    if changes:
        raise UserError(
            f"{ckpt}: cannot resume, the data changed since this checkpoint ({'; '.join(changes)}); restore the "
            "data it was trained on, or start over with --fresh"
        )


# ----------------------------------------------------------------------------------------------- helpers
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fsync_dir(d)


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
