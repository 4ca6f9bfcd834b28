"""Checkpoints: atomic save (temp folder, manifest, fsync, rename, `latest` last), verify, resume, prune.

Layout of `RUN_DIR/checkpoints/step-N/`:
  accelerate/          accelerator.save_state output: trainable weights (safetensors), optimizer state
                       (under DeepSpeed: its own folder, one optimizer shard per rank)
  adapter/             the consolidated PEFT adapter (LoRA runs), loadable without DeepSpeed
  trainer_state.json   TrainState (step, epoch, cursor, samples/tokens seen, data seed)
  rng/rank-R.json      python, numpy, torch (and CUDA) RNG of every rank, as JSON: nothing pickled
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


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


# ----------------------------------------------------------------------------------------------- save
def save(
    accelerator, model, run_dir: Path, state: TrainState, recipe: Recipe, extra_state: dict | None = None, log=print
) -> Path:
    """Called on every rank. Returns the final checkpoint folder.

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
    _stop_if_any_failed(accelerator, failed, run_dir, tmp, model)
    if accelerator.is_main_process:
        try:
            _drop_accelerate_pickles(tmp / "accelerate")
            if adapter is not None:
                save_adapter(accelerator, model, tmp / "adapter", adapter)
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


def save_adapter(accelerator, model, out: Path, state_dict: dict | None = None) -> None:
    """The consolidated adapter, written by the caller's rank (rank 0). `state_dict`: from `trainable_state_dict`
    (exact under DeepSpeed); None saves the unwrapped module's own weights (exact only without DeepSpeed)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)


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
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param) if deepspeed else None
        if accelerator.is_main_process:
            out[name] = (param if full is None else full).detach().to("cpu", torch.float32, copy=True)
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
def load(accelerator, ckpt: Path) -> TrainState:
    """Restore model/optimizer (accelerate), this rank's RNG, and the trainer state. Every rank calls it.

    DDP checkpoints hold the whole optimizer state (rank 0 writes it, ranks are replicas) and weights under
    unwrapped names, so they load on any number of processes; the data cursor is global (state.py)."""
    saved = read_state(ckpt)  # DeepSpeed <-> not, and ZeRO world-size changes: refused by train._setup_resume
    kwargs = {"load_module_strict": False} if is_deepspeed(accelerator) else {"strict": False}
    accelerator.load_state(str(ckpt / "accelerate"), **kwargs)
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


# Changing these would make the saved weights, optimizer state or data position meaningless.
BREAKING = [
    "model.name_or_path",
    "model.quantization",
    "lora",
    "data.path",
    "data.format",
    "data.columns",
    "data.max_seq_len",
    "data.packing",
    "data.group_by_length",
    "data.train_on",
    "data.val_fraction",
    "data.test_fraction",
    "data.split_seed",
    "data.hub_split",
    "train.optimizer",
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


def check_compatible(ckpt: Path, recipe: Recipe) -> list[str]:
    """Raise UserError if the recipe changed in a way the checkpoint cannot follow; return harmless changes."""
    from trainer.config import to_dict

    old = read_yaml_mapping(ckpt / "config.yaml", "the checkpoint's recipe")
    breaking, harmless = recipe_differences(old, to_dict(recipe))
    if breaking:
        raise UserError(
            f"{ckpt}: cannot resume, the recipe changed in ways this checkpoint cannot follow: "
            + "; ".join(breaking)
            + ". Restore those values, or start over with --fresh."
        )
    return harmless


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
