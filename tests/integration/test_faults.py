"""Faults around a real run of the CLI on the tiny Llama: signals at the edges of a run, storage that refuses a
checkpoint (disk full, read-only), a kill during the first cache write, and what a run prints.

The child runs through a small wrapper (HOOK) that patches one function to act at the right moment: send itself
a signal, fill the disk, mount the checkpoints read-only, stall. Disk full is tested twice: on a real 8 MiB tmpfs
(root only: `mount -t tmpfs`), filled before the second save, and by an injected ENOSPC (anywhere). Read-only is
a read-only bind mount of the checkpoints folder (root only; root ignores chmod).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe, write_jsonl
from trainer import checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300

HOOK = r"""
import errno, os, signal, subprocess, sys, time, warnings
from pathlib import Path
what, marker = os.environ["HOOK"], Path(os.environ.get("HOOK_MARKER", "/nonexistent"))

def before(module, name, action):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        action(*args, **kwargs)
        return original(*args, **kwargs)
    setattr(module, name, wrapped)

if what == "sigterm-after-last-step":
    import trainer.train as t
    before(t, "_save_final", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
elif what in ("sigterm-in-cache-write", "stall-in-cache-write"):
    import trainer.data.pipeline as pipeline
    real_write = pipeline.write_rows
    def act(samples, order, starts, path, *a, **k):
        rows = real_write(samples, order, starts, path, *a, **k)  # the temp folder now holds a split
        if ".tmp-" in str(path):
            marker.write_text(str(path))
            if what == "sigterm-in-cache-write":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises at the next bytecode
            else:
                time.sleep(600)
        return rows
    pipeline.write_rows = act
elif what in ("fill-disk", "enospc", "read-only"):
    import trainer.checkpoint as ck
    def act(accelerator, model, run_dir, state, *a, **k):
        if state.step != 4:
            return
        if what == "fill-disk":
            with open(Path(run_dir) / "filler", "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
        elif what == "read-only":
            folder = str(Path(run_dir) / "checkpoints")
            subprocess.run(["mount", "--bind", "-o", "ro", folder, folder], check=True)
            marker.write_text(folder)
    before(ck, "save", act)
    if what == "enospc":
        real = ck.write_manifest
        def write_manifest(folder):
            if folder.name == ".tmp-step-4":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "manifest.json"))
            return real(folder)
        ck.write_manifest = write_manifest
elif what == "warnings":
    import trainer.train as t
    def act(*a, **k):
        import logging
        warnings.warn("a library FutureWarning nobody can act on", FutureWarning)
        warnings.warn("a real problem the user must see", UserWarning)
        logging.getLogger("transformers.modeling_utils").warning("a real transformers warning")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
    before(t, "_setup_data", act)
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def env(**extra) -> dict:
    # without what an in-process test's `trainer.quiet` set in this process (the child decides for itself)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")
    e = {k: v for k, v in os.environ.items() if k not in drop}
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def make_recipe(tmp: Path, model_dir: Path, out: Path, **sections) -> Path:
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"Number {i} is here."} for i in range(40)]
    data = write_jsonl(tmp / "data.jsonl", rows)
    raw = tiny_recipe(model_dir, data, out, **sections)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(args: list, hook: str | None = None, **extra_env) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", HOOK] if hook else [sys.executable, "-m", "trainer"]
    return subprocess.run(
        [*prefix, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env(HOOK=hook or "", **extra_env),
        cwd=ROOT,
    )


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def tmp_folders(cache: Path) -> list[str]:
    data = cache / "data"
    return sorted(p.name for p in data.iterdir() if ".tmp" in p.name) if data.is_dir() else []


# ----------------------------------------------------------------------------------------------- signals
def test_sigterm_after_the_last_step_completes_the_final_save_and_exits_0(tmp_path, tiny_model_dir):
    out_dir = tmp_path / "run"
    recipe = make_recipe(tmp_path, tiny_model_dir, out_dir)
    out = cli(["train", recipe, "--no-progress"], hook="sigterm-after-last-step")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "SIGTERM arrived after the last step: the run had finished and its final save is complete; exiting with code 0"
    )
    assert checkpoint.verify(out_dir / "adapter") is None  # complete, with its manifest
    assert json.loads((out_dir / "run_summary.json").read_text())["steps"] == 4


def test_sigterm_during_the_first_cache_write_exits_75_and_leaves_no_temp_folder(tmp_path, tiny_model_dir):
    out_dir, cache, marker = tmp_path / "run", tmp_path / "cache", tmp_path / "marker"
    recipe = make_recipe(tmp_path, tiny_model_dir, out_dir)
    out = cli(
        ["train", recipe, "--no-progress"], hook="sigterm-in-cache-write", TRAINER_CACHE=cache, HOOK_MARKER=marker
    )
    assert marker.exists()  # the signal came while the cache's temp folder was being written
    assert out.returncode == 75, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == (
        "stopped by SIGTERM during setup, before the first step: nothing to save yet; exiting with code 75; "
        "rerun the same command to start"
    )
    assert "Traceback" not in out.stderr
    assert tmp_folders(cache) == [] and not out_dir.exists()


def test_sigkill_during_the_first_cache_write_is_cleaned_by_the_next_run(tmp_path, tiny_model_dir):
    out_dir, cache, marker = tmp_path / "run", tmp_path / "cache", tmp_path / "marker"
    recipe = make_recipe(tmp_path, tiny_model_dir, out_dir)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOOK, "train", str(recipe), "--no-progress"],
        env=env(HOOK="stall-in-cache-write", TRAINER_CACHE=str(cache), HOOK_MARKER=str(marker)),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + TIMEOUT
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    left = tmp_folders(cache)
    assert len(left) == 1 and ".tmp-" in left[0]  # what SIGKILL leaves: no `finally` ran
    out = cli(["train", recipe, "--no-progress"], TRAINER_CACHE=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert tmp_folders(cache) == []


# ----------------------------------------------------------------------------------------------- storage
def _storage_failure(tmp_path: Path, out_dir: Path, tiny_model_dir: Path, hook: str, **extra) -> str:
    recipe = make_recipe(tmp_path, tiny_model_dir, out_dir)
    out = cli(["train", recipe, "--no-progress"], hook=hook, **extra)
    assert out.returncode == 2, out.stderr[-3000:]
    line = one_error_line(out)
    ckpts = out_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-2"]  # no half-written .tmp-step-4
    assert (ckpts / "latest").read_text() == "step-2\n" and checkpoint.verify(ckpts / "step-2") is None
    return line


def test_disk_full_during_a_save_injected_enospc(tmp_path, tiny_model_dir):
    out_dir = tmp_path / "run"
    line = _storage_failure(tmp_path, out_dir, tiny_model_dir, "enospc")
    assert line.startswith(
        f"error: checkpoint: cannot save: {out_dir}/checkpoints/.tmp-step-4/manifest.json: No space left on device; "
    )
    assert line.endswith(
        f"needed; the last complete checkpoint is {out_dir}/checkpoints/step-2. Training stopped; free space (or "
        "make the storage writable) and rerun the same command to resume"
    )
    assert " free, about 3" in line  # about the size of step-2 (0.3 MiB)


def _mount(*args) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_disk_full_during_a_save_on_a_full_tmpfs(tmp_path, tiny_model_dir):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)):
        pytest.skip("needs root and mount -t tmpfs")
    try:
        out_dir = disk / "run"
        line = _storage_failure(tmp_path, out_dir, tiny_model_dir, "fill-disk")
        assert f"{out_dir}/checkpoints/.tmp-step-4" in line and "No space left on device; 0 B free, about " in line
        assert line.endswith(
            f"the last complete checkpoint is {out_dir}/checkpoints/step-2. Training stopped; free space (or make "
            "the storage writable) and rerun the same command to resume"
        )
    finally:
        subprocess.run(["umount", str(disk)])


def test_read_only_storage_during_a_save(tmp_path, tiny_model_dir):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount --bind")
    out_dir, marker = tmp_path / "run", tmp_path / "marker"
    try:
        line = _storage_failure(tmp_path, out_dir, tiny_model_dir, "read-only", HOOK_MARKER=marker)
    finally:
        if marker.exists():
            subprocess.run(["umount", marker.read_text()])
    assert marker.exists(), "the read-only bind mount was not made"
    assert line == (
        f"error: checkpoint: cannot save: {out_dir}/checkpoints/.tmp-step-4: Read-only file system; the last complete "
        f"checkpoint is {out_dir}/checkpoints/step-2. Training stopped; free space (or make the storage writable) "
        "and rerun the same command to resume"
    )


# ----------------------------------------------------------------------------------------------- what a run prints
def test_a_run_without_a_terminal_prints_a_line_per_step_and_eval_and_a_summary_and_no_noise(tmp_path, tiny_model_dir):
    out_dir = tmp_path / "run"
    recipe = make_recipe(tmp_path, tiny_model_dir, out_dir)
    out = cli(["train", recipe], hook="warnings")  # no --no-progress: stdout is a pipe, not a terminal
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    start = next(x for x in lines if x.startswith("train: "))
    assert start == "train: 4 steps of 4 rows (2 per epoch); 1 process, no distribution, device cpu"
    steps = [x for x in lines if x.startswith("step ")]
    assert [x.split(":")[0] for x in steps] == [
        "step 1/4", "step 2/4", "step 2/4", "step 3/4", "step 4/4", "step 4/4",
    ]  # fmt: skip
    assert all(" tok/s, ETA " in x for x in steps if ": loss " in x) and sum(": eval loss " in x for x in steps) == 2
    summary = json.loads((out_dir / "run_summary.json").read_text())
    assert lines[-1] == (
        f"done: 4 steps in {lines[-1].split(' in ')[1].split(';')[0]}; final loss {summary['final_loss']:.4f}; "
        f"eval loss {summary['final_eval_loss']:.4f} (ppl {summary['final_eval_ppl']:.2f}); adapter in {out_dir}/adapter"
    )
    # known noise silenced, real warnings kept
    assert "a real problem the user must see" in out.stderr and "a real transformers warning" in out.stderr
    for noise in (
        "FutureWarning",
        "kernels-community",
        "Loading weights",
        "Writing model shards",
        "Setting accelerator",
    ):
        assert noise not in out.stderr + out.stdout, noise


def test_verbose_shows_the_known_noise(tmp_path, tiny_model_dir):
    out_dir = tmp_path / "run"
    recipe = make_recipe(tmp_path, tiny_model_dir, out_dir, train={"max_steps": 1, "save_every": 1})
    out = cli(["-v", "train", recipe, "--no-progress"], hook="warnings")
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in ("a library FutureWarning nobody can act on", "kernels-community", "Loading weights"):
        assert noise in out.stderr, noise


# ----------------------------------------------------------------------------------------------- post-training
def test_post_training_commands_say_which_weights_they_use_and_refuse_a_damaged_adapter(tmp_path, tiny_model_dir):
    out_dir = tmp_path / "run"
    recipe = make_recipe(tmp_path, tiny_model_dir, out_dir)
    assert cli(["train", recipe, "--no-progress"]).returncode == 0
    # a run that has not finished (its final adapter and the last checkpoint gone): the newest checkpoint, said so
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out_dir, unfinished)
    for gone in ("adapter", "run_summary.json", "checkpoints/step-4"):
        shutil.rmtree(unfinished / gone) if (unfinished / gone).is_dir() else (unfinished / gone).unlink()
    out = cli(["merge", unfinished])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        out.stdout.splitlines()[0] == f"{unfinished}: the run has not finished; using checkpoint step-2 (step 2 of 4)"
    )
    assert checkpoint.verify(unfinished / "merged-step-2") is None and not (unfinished / "merged").exists()
    # a damaged final adapter: refused, naming the verified checkpoint to use; --checkpoint uses it
    adapter = out_dir / "adapter" / "adapter_model.safetensors"
    whole = adapter.read_bytes()
    adapter.write_bytes(whole[:-10])
    out = cli(["merge", out_dir])
    assert out.returncode == 2
    assert one_error_line(out) == (
        f"error: {out_dir}/adapter: adapter_model.safetensors has {len(whole) - 10} bytes, manifest says "
        f"{len(whole)}; the final adapter is damaged, the newest verified checkpoint is {out_dir}/checkpoints/step-4 "
        f"(step 4 of 4): pass --checkpoint {out_dir}/checkpoints/step-4"
    )
    out = cli(["merge", out_dir, "--checkpoint", out_dir / "checkpoints/step-4"])
    assert out.returncode == 0 and "using checkpoint step-4 (step 4 of 4)" in out.stdout, out.stderr[-3000:]
    adapter.write_bytes(whole)
    # export merges the final adapter into merged/ (it is verified first), and again when the adapter changed
    assert cli(["export", out_dir]).returncode == 0 and checkpoint.verify(out_dir / "merged") is None
    shutil.rmtree(out_dir / "checkpoints" / "step-4")
    assert cli(["train", recipe, "--no-progress", "train.max_steps=6"]).returncode == 0  # the adapter moves on
    out = cli(["export", out_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (
        out.stdout.splitlines()[0]
        == f"{out_dir}/merged was merged from an earlier adapter than adapter/; merging again"
    )
