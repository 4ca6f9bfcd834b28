"""Checkpoints you can trust, proven on the real CLI (`python -m trainer train`) with a tiny Llama on CPU.

One uninterrupted reference run (LoRA dropout 0.1, so the RNG restore matters; 35 packed rows, 4 per step, so
epoch 0 ends on a short step 9 and step 10 is in epoch 1) is compared with runs that are killed (SIGKILL at a
random point, and inside a save at three phases), preempted (SIGTERM), corrupted, changed, and moved between
1 and 2 processes. "Equal" means: final adapter weights within 1e-6 (measured: 0.0, bit-identical), and every
metrics row (loss, lr, grad norm, samples/tokens seen, eval loss) equal, which is what shows the data cursor
continued with the next unseen batch - a repeated or skipped batch changes the loss and the counters.

Saves are made slow or stalled at a chosen phase by running the CLI through a small wrapper (HOOK below) that
patches one function of trainer.checkpoint in the child process; the test kills the child when it gets there.
In process (loop.train): SIGUSR1 preemption, and non-finite steps (skipped, logged, stop after max_bad_steps).
Marked slow: every test that runs the CLI in subprocesses (the reference run, kill/SIGTERM/corrupt/incompatible
resumes) and the 2-process ones (DDP over gloo): world-size change 2 -> 1 and 1 -> 2; NaN on one rank only. The
in-process ones (SIGUSR1, non-finite steps) are fast.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, accelerate_cmd, alpaca_slice, clean_env, run_checked, tiny_recipe, write_recipe
from trainer import checkpoint
from trainer.loop import PREEMPTED_EXIT
from trainer.tracking import CSV_FIELDS

TIMEOUT = 300  # any one CLI process
# Alpaca-shaped rows (tests/datagen.py) -> 35 packed train rows (36 samples, 6 dropped: no target left) and 2 val at
# max_seq_len 64, so epoch 0 is 8 full steps of 4 rows and a short step 9 (43 rows also give 35, but 1 val sample).
SOURCE_ROWS = 44
STEPS, SAVE_EVERY = 10, 2
EXACT = 1e-6

# Run the CLI with one trainer.checkpoint function patched: HOOK_PHASE says which, HOOK_STEP for which save.
#   stall-before-manifest: after accelerate wrote .tmp-step-N/accelerate, before adapter/manifest/rename
#   stall-before-latest:   after the rename to step-N, before `latest` is rewritten and old ones are pruned
#   slow-hash:             every sha256 of the manifest takes 1 s (the test kills as soon as .tmp-step-N appears)
HOOK = r"""
import os, sys, time
from pathlib import Path
import trainer.checkpoint as ck
phase, step, marker = os.environ["HOOK_PHASE"], int(os.environ["HOOK_STEP"]), Path(os.environ["HOOK_MARKER"])
tmp_name, final_name = f".tmp-step-{step}", f"step-{step}"

def patch(name, hit, stall=True):
    orig = getattr(ck, name)
    def wrapped(*args, **kwargs):
        if hit(*args):
            marker.write_text(name)
            time.sleep(600 if stall else 1.0)
        return orig(*args, **kwargs)
    setattr(ck, name, wrapped)

if phase == "stall-before-manifest":
    patch("_drop_accelerate_pickles", lambda folder: folder.parent.name == tmp_name)
elif phase == "stall-before-latest":
    patch("_write_latest", lambda root, name: name == final_name)
elif phase == "slow-hash":
    patch("sha256", lambda path: tmp_name in path.parts, stall=False)
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


# Under `accelerate launch`: NaN loss on rank 1 only, at step 2; every rank prints its sample ids per step.
NAN_ON_ONE_RANK = r"""
import json, os, sys
import trainer.loop as loop
real_loss, real_batches, current = loop.token_loss_stats, loop.micro_batches, {}
def micro_batches(rows, state, *args):
    current["step"] = state.step + 1
    batches, ids = real_batches(rows, state, *args)
    # One file per rank and step: two processes printing to one pipe can interleave their lines.
    with open(os.path.join(os.environ["IDS_DIR"], f"rank{os.environ['RANK']}-step{current['step']}.json"), "w") as f:
        f.write(json.dumps(sorted(ids)))
    return batches, ids
def token_loss_stats(model, batch, chunked=True):
    loss, n, correct = real_loss(model, batch, chunked)
    return (loss * float("nan") if current["step"] == 2 and os.environ["RANK"] == "1" else loss), n, correct
loop.micro_batches, loop.token_loss_stats = micro_batches, token_loss_stats
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ----------------------------------------------------------------------------------------------- helpers
def ddp_cmd(script: list[str], recipe: Path) -> list[str]:
    """2 processes, DDP over gloo; `script`: ["-m", "trainer"] or [path.py]."""
    return accelerate_cmd(
        "accelerate_configs/cpu_gloo_ddp.yaml", *script, "train", str(recipe), "--no-progress", processes=2
    )


def env(**extra) -> dict:
    # Scripts run by path put their own folder first on sys.path: clean_env puts this checkout first on PYTHONPATH.
    return clean_env(cpu_only=False, **extra)


def train_cmd(recipe: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "trainer", "train", str(recipe), "--no-progress", *extra]


def hook_cmd(recipe: Path, *extra) -> list[str]:
    return [sys.executable, "-c", HOOK, "train", str(recipe), "--no-progress", *extra]


def run(cmd: list[str], expect: int | None = 0, **env_extra) -> subprocess.CompletedProcess:
    return run_checked(cmd, expect=expect, timeout=TIMEOUT, env=env(**env_extra))


class Child:
    """A CLI process in the background, output to a file, killed however the test likes."""

    def __init__(self, cmd: list[str], log: Path, **env_extra):
        self.log = log
        self._fh = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env(**env_extra))

    def wait_for(self, what: str, condition, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"process exited (rc={self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill(signal.SIGKILL)
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.02)

    def kill(self, sig=signal.SIGKILL, timeout: float = TIMEOUT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self._fh.close()

    def output(self) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return self.log.read_text()


def train_row_steps(run_dir: Path) -> list[int]:
    """Steps of the complete train rows in metrics.csv (read while the run writes it)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines()[1:]:
        cells = line.split(",")
        if len(cells) == len(CSV_FIELDS) and cells[0].isdigit() and cells[2]:  # a whole train row
            steps.append(int(cells[0]))
    return steps


def metric_rows(
    run_dir: Path, columns=("epoch", "loss", "lr", "grad_norm", "samples_seen", "tokens_seen", "eval_loss", "skipped")
) -> dict[tuple[int, str], dict]:
    """{(step, 'train'|'eval'): the numeric columns} of metrics.csv."""
    with (run_dir / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for r in rows:
        key = (int(r["step"]), "eval" if r["eval_loss"] else "train")
        assert key not in out, f"metrics.csv has step {key} twice"
        out[key] = {c: float(r[c]) for c in columns if r[c] != ""}
    return out


def assert_rows_equal(got: dict, want: dict, keys=None) -> None:
    for key in keys if keys is not None else want:
        assert key in got, f"metrics row {key} missing"
        for col, value in want[key].items():
            assert got[key][col] == pytest.approx(value, abs=EXACT, rel=0), (key, col, got[key][col], value)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).iterdir())


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[-1])


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_run(src: Path, dst: Path, keep_upto: int | None = None) -> Path:
    """A copy of a run folder; `keep_upto`: drop later checkpoints and the final adapter, as if the run had been
    killed right after that checkpoint was written."""
    shutil.copytree(src, dst)
    if keep_upto is not None:
        for c in checkpoint.list_checkpoints(dst):
            if step_of(c) > keep_upto:
                shutil.rmtree(c)
        (checkpoint.checkpoints_dir(dst) / "latest").write_text(f"step-{keep_upto}\n")
        for name in ("adapter", "model", "run_summary.json"):
            p = dst / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return dst


def resumed_from(output: str, run_dir: Path) -> int:
    lines = [ln for ln in output.splitlines() if ln.startswith("resume: from ")]
    assert len(lines) == 1, output[-3000:]
    assert lines[0].startswith(f"resume: from {checkpoint.checkpoints_dir(run_dir)}/step-"), lines[0]
    return int(lines[0].split(" at step ")[1].split()[0])


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return alpaca_slice(tmp_path_factory.mktemp("data") / "alpaca_small.json", SOURCE_ROWS)


@pytest.fixture(scope="module")
def make_raw(tiny_model_dir, data_file):
    def make(out: Path, dropout: float = 0.1, **train) -> dict:
        return tiny_recipe(
            tiny_model_dir,
            data_file,
            out,
            lora={"r": 8, "alpha": 16, "dropout": dropout, "target_modules": "all-linear"},
            data={"max_seq_len": 64, "val_fraction": 0.05},
            train={
                "max_steps": STEPS,
                "micro_batch_size": 2,
                "grad_accum": 2,
                "lr": 1e-3,
                "save_every": SAVE_EVERY,
                "eval_every": 5,
                "log_every": 1,
                "keep_last": 3,
                "seed": 0,
                **train,
            },
        )

    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_raw):
    """The uninterrupted run every other run must match."""
    folder = tmp_path_factory.mktemp("reference")
    run_dir = folder / "run"
    out = run(train_cmd(write_recipe(folder, make_raw(run_dir))))
    assert ckpt_names(run_dir) == ["latest", "step-10", "step-6", "step-8"]
    rows = metric_rows(run_dir)
    assert sorted(k for k in rows if k[1] == "train") == [(s, "train") for s in range(1, STEPS + 1)]
    assert [rows[(s, "train")]["epoch"] for s in (8, 9, 10)] == [0, 1, 1]  # the epoch ends inside the run
    costs = [ln for ln in out.stdout.splitlines() if ln.startswith("checkpoint: ")]
    assert len(costs) == STEPS // SAVE_EVERY, out.stdout
    print(
        "\nreference checkpoint cost:",
        *costs,
        f"bytes: {checkpoint.dir_bytes(run_dir / 'checkpoints/step-10')}",
        sep="\n  ",
    )
    return run_dir


# ----------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_kill9_mid_step_and_inside_saves_then_resume_matches(tmp_path, make_raw, reference):
    """SIGKILL after step 3, then inside the next three saves (before the manifest; while hashing, the moment
    .tmp-step-N appears; after the rename but before `latest`), resuming each time: the last rerun ends equal
    to the uninterrupted run, every metrics row equal, nothing left half-written."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, make_raw(run_dir))
    ckroot = checkpoint.checkpoints_dir(run_dir)

    # 1. SIGKILL right after step 3 was logged: mid-epoch, between checkpoints.
    child = Child(train_cmd(recipe), tmp_path / "leg1.log")
    child.wait_for("step 3", lambda: 3 in train_row_steps(run_dir))
    assert child.kill(signal.SIGKILL) == -signal.SIGKILL
    base = step_of(checkpoint.find_resumable(run_dir))
    assert base in (2, 4) and base <= max(train_row_steps(run_dir))  # 4 only if the kill came late
    assert [c.name for c in checkpoint.list_checkpoints(run_dir)] == [f"step-{s}" for s in range(base, 0, -2)]

    # 2-4. SIGKILL inside a save; each leg first resumes from the newest complete checkpoint and replays.
    legs = [  # phase, step whose save is killed, step the leg resumes from, newest complete step afterwards
        ("stall-before-manifest", base + 2, base, base),
        ("slow-hash", base + 4, base, base + 2),  # replays the save of base + 2 first, whole
        ("stall-before-latest", base + 6, base + 2, base + 6),
    ]
    for leg, (phase, target, start, newest) in enumerate(legs, start=2):
        marker = tmp_path / f"marker{leg}"
        child = Child(
            hook_cmd(recipe),
            tmp_path / f"leg{leg}.log",
            HOOK_PHASE=phase,
            HOOK_STEP=str(target),
            HOOK_MARKER=str(marker),
        )
        tmp_dir, final = ckroot / f".tmp-step-{target}", ckroot / f"step-{target}"
        if phase == "slow-hash":
            child.wait_for(tmp_dir.name, tmp_dir.exists)  # kill the moment it appears
        else:
            child.wait_for(f"{phase} at step {target}", marker.exists)
        assert child.kill(signal.SIGKILL) == -signal.SIGKILL
        assert resumed_from(child.output(), run_dir) == start
        assert checkpoint.find_resumable(run_dir) == ckroot / f"step-{newest}"
        latest = (ckroot / "latest").read_text().strip()
        if phase == "stall-before-latest":
            # Complete and renamed, but `latest` still names the previous one: resume trusts the manifests.
            assert checkpoint.verify(final) is None and latest == f"step-{target - SAVE_EVERY}"
        else:
            assert tmp_dir.is_dir() and not final.exists() and not (tmp_dir / "manifest.json").exists()
            assert latest == f"step-{newest}"

    # 5. Rerun to the end.
    out = run(train_cmd(recipe))
    assert resumed_from(out.stdout, run_dir) == base + 6
    diff = max_diff(adapter(run_dir / "adapter"), adapter(reference / "adapter"))
    print(f"\nkill -9 x4 then resume: max |adapter - reference| = {diff:.3g}")
    assert diff <= EXACT
    assert max_diff(adapter(ckroot / "step-10" / "adapter"), adapter(reference / "adapter")) <= EXACT
    got, want = metric_rows(run_dir), metric_rows(reference)
    assert sorted(got) == sorted(want)  # no repeated, no missing step: replayed rows were rewritten
    assert_rows_equal(got, want)
    assert ckpt_names(run_dir) == ["latest", "step-10", "step-6", "step-8"]  # temp folders cleaned, keep_last 3
    assert (ckroot / "latest").read_text().strip() == "step-10"
    summary = json.loads((run_dir / "run_summary.json").read_text())
    ref_summary = json.loads((reference / "run_summary.json").read_text())
    for key in (
        "steps",
        "epochs_completed",
        "samples_seen",
        "tokens_seen",
        "target_tokens_seen",
        "final_loss",
        "final_eval_loss",
    ):
        assert summary[key] == ref_summary[key], key


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_rerun_with_harmless_changes_matches(tmp_path, make_raw, reference):
    """SIGTERM (scheduler preemption): the step finishes, a checkpoint is written at the step reached, exit 75.
    The rerun changes eval_every and log_every (harmless: accepted and printed) and still ends equal."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path, make_raw(run_dir))
    child = Child(train_cmd(recipe), tmp_path / "leg1.log")
    child.wait_for("step 2", lambda: 2 in train_row_steps(run_dir))
    assert child.kill(signal.SIGTERM) == PREEMPTED_EXIT
    out = child.output()
    reached = max(train_row_steps(run_dir))
    assert 2 <= reached < STEPS
    assert f"preempted (signal {int(signal.SIGTERM)}): checkpoint saved at step {reached}; exiting with code 75" in out
    assert checkpoint.find_resumable(run_dir).name == f"step-{reached}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{reached}"
    assert checkpoint.read_state(run_dir / "checkpoints" / f"step-{reached}")["step"] == reached
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["preempted"] is True and summary["steps"] == reached
    assert not (run_dir / "adapter").exists()  # the final adapter is only written by a finished run

    out = run(train_cmd(recipe, "train.eval_every=3", "train.log_every=2"))
    assert resumed_from(out.stdout, run_dir) == reached
    assert "resume: recipe change accepted: train.eval_every: 5 -> 3" in out.stdout
    assert "resume: recipe change accepted: train.log_every: 1 -> 2" in out.stdout
    diff = max_diff(adapter(run_dir / "adapter"), adapter(reference / "adapter"))
    print(f"\nSIGTERM at step {reached} then resume: max |adapter - reference| = {diff:.3g}")
    assert diff <= EXACT
    got, want = metric_rows(run_dir), metric_rows(reference)
    train_steps = sorted(s for s, kind in got if kind == "train")
    assert train_steps == list(range(1, reached + 1)) + [s for s in range(reached + 1, STEPS + 1) if s % 2 == 0]
    assert_rows_equal(
        got, want, keys=[(s, "train") for s in range(1, reached + 1)] + [(STEPS, "train"), (STEPS, "eval")]
    )
    for s in train_steps:  # rows logged after the change: loss, lr, counters of that very step
        for col in ("loss", "lr", "samples_seen", "tokens_seen"):
            assert got[(s, "train")][col] == pytest.approx(want[(s, "train")][col], abs=EXACT, rel=0)
    evals = {s for s in (5,) if s <= reached} | {s for s in range(reached + 1, STEPS + 1) if s % 3 == 0} | {STEPS}
    assert sorted(s for s, kind in got if kind == "eval") == sorted(evals)


@pytest.mark.slow
def test_corrupt_newest_checkpoints_are_named_skipped_and_the_run_still_matches(tmp_path, make_raw, reference):
    """Flip bytes in step-10's weights, truncate step-8's optimizer state: both reported by name, resume from
    step-6, replay 7..10 and end equal to the uninterrupted run."""
    run_dir = copy_run(reference, tmp_path / "run")
    shutil.rmtree(run_dir / "adapter")
    weights = run_dir / "checkpoints/step-10/accelerate/model.safetensors"
    blob = bytearray(weights.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 16):
        blob[i] ^= 0xFF
    weights.write_bytes(bytes(blob))
    optim = run_dir / "checkpoints/step-8/accelerate/optimizer.bin"
    size = optim.stat().st_size
    with optim.open("r+b") as fh:
        fh.truncate(size // 2)

    recipe = write_recipe(tmp_path, make_raw(run_dir))
    ckroot = checkpoint.checkpoints_dir(run_dir)
    out = run(train_cmd(recipe, "--resume", str(ckroot / "step-10")), expect=2)  # asked for by name: refused
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --resume {ckroot}/step-10: accelerate/model.safetensors "
        f"checksum mismatch; pick another checkpoint from {ckroot}"
    )
    out = run(train_cmd(recipe))
    assert f"checkpoint: skipping {ckroot}/step-10: accelerate/model.safetensors checksum mismatch" in out.stdout
    assert (
        f"checkpoint: skipping {ckroot}/step-8: accelerate/optimizer.bin has {size // 2} bytes, manifest says {size}"
    ) in out.stdout
    assert resumed_from(out.stdout, run_dir) == 6
    diff = max_diff(adapter(run_dir / "adapter"), adapter(reference / "adapter"))
    print(f"\ncorrupt step-10 and step-8, resume from step-6: max |adapter - reference| = {diff:.3g}")
    assert diff <= EXACT
    assert_rows_equal(metric_rows(run_dir), metric_rows(reference))
    for step in (6, 8, 10):  # the broken ones were rewritten, whole
        assert checkpoint.verify(ckroot / f"step-{step}") is None
    assert checkpoint.find_resumable(run_dir) == ckroot / "step-10"


@pytest.mark.slow
def test_incompatible_change_refused_with_one_line_and_nothing_lost_then_longer_run_continues(
    tmp_path, make_raw, reference
):
    run_dir = copy_run(reference, tmp_path / "run")
    recipe = write_recipe(tmp_path, make_raw(run_dir))
    before = tree_digest(run_dir)

    out = run(train_cmd(recipe, "lora.r=4", "data.max_seq_len=96"), expect=2)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert errors[0] == (
        f"error: {run_dir}/checkpoints/step-10: cannot resume, the recipe changed in ways this "
        "checkpoint cannot follow: data.max_seq_len: 64 -> 96; lora.r: 8 -> 4. Restore those values, "
        "or start over with --fresh."
    )
    assert "Traceback" not in out.stderr
    assert tree_digest(run_dir) == before  # nothing on disk touched

    # train.max_steps larger is harmless: the run goes on from step 10 to 12, and says what changed.
    out = run(train_cmd(recipe, "train.max_steps=12"))
    assert resumed_from(out.stdout, run_dir) == STEPS
    assert "resume: recipe change accepted: train.max_steps: 10 -> 12" in out.stdout
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == 12 and summary["steps_this_session"] == 2
    rows = metric_rows(run_dir)
    assert sorted(s for s, kind in rows if kind == "train") == list(range(1, 13))
    assert_rows_equal(rows, metric_rows(reference))  # steps 1..10 untouched
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-12"
    assert yaml.safe_load((run_dir / "checkpoints/step-12/config.yaml").read_text())["train"]["max_steps"] == 12


@pytest.mark.slow
def test_world_size_change_2_to_1_and_1_to_2_processes(tmp_path, make_raw):
    """DDP over gloo. Same 4 rows per step on both sides (1 process: 2 x accum 2; 2 processes: 2 x accum 1, the
    very same micro-batches), LoRA dropout 0.1 (masks drawn per row, not per rank: trainer/lora_dropout.py). A run
    stopped after step 6 (its later checkpoints removed) resumes on the other world size; both end within 1e-5
    of the uninterrupted single-process run (the reduction order differs). ZeRO-2: test_topology.py."""
    tol = 1e-5

    def ddp(recipe: Path, log: str) -> str:
        out = run(ddp_cmd(["-m", "trainer"], recipe))
        (tmp_path / log).write_text(out.stdout + out.stderr)
        assert "2 processes, DDP (gloo)" in out.stdout, out.stdout[-3000:]
        return out.stdout

    single = tmp_path / "single"
    run(train_cmd(write_recipe(tmp_path, make_raw(single, dropout=0.1), "single.yaml")))
    two = tmp_path / "two"
    ddp(write_recipe(tmp_path, make_raw(two, dropout=0.1, grad_accum=1), "two.yaml"), "two.log")
    ckpt = two / "checkpoints/step-6"
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0.json", "rank-1.json"]
    assert checkpoint.read_state(ckpt)["world_size"] == 2
    # The optimizer state is whole (rank 0 wrote it; DDP ranks are replicas), under unwrapped names.
    opt = torch.load(ckpt / "accelerate/optimizer.bin", weights_only=True)
    n_trainable = len(load_file(ckpt / "accelerate/model.safetensors"))
    assert len(opt["state"]) == n_trainable and not any(
        k.startswith("module.") for k in load_file(ckpt / "accelerate/model.safetensors")
    )
    diffs = {"2 procs vs 1": max_diff(adapter(two / "adapter"), adapter(single / "adapter"))}

    # 2 -> 1
    two_to_one = copy_run(two, tmp_path / "two_to_one", keep_upto=6)
    out = run(train_cmd(write_recipe(tmp_path, make_raw(two_to_one, dropout=0.1), "2to1.yaml")))
    assert resumed_from(out.stdout, two_to_one) == 6
    assert "resume: recipe change accepted: train.grad_accum: 1 -> 2" in out.stdout
    diffs["2 -> 1 vs 1"] = max_diff(adapter(two_to_one / "adapter"), adapter(single / "adapter"))

    # 1 -> 2
    one_to_two = copy_run(single, tmp_path / "one_to_two", keep_upto=6)
    stdout = ddp(write_recipe(tmp_path, make_raw(one_to_two, dropout=0.1, grad_accum=1), "1to2.yaml"), "1to2.log")
    assert resumed_from(stdout, one_to_two) == 6
    diffs["1 -> 2 vs 1"] = max_diff(adapter(one_to_two / "adapter"), adapter(single / "adapter"))
    for run_dir in (two, two_to_one, one_to_two):
        got, want = metric_rows(run_dir), metric_rows(single)
        assert sorted(got) == sorted(want)
        for key in want:  # the same data in every step: identical counters and lr, losses within float noise
            for col in ("epoch", "samples_seen", "tokens_seen", "lr", "skipped"):
                assert got[key].get(col) == want[key].get(col), (run_dir.name, key, col)
            for col in ("loss", "eval_loss"):
                assert got[key].get(col, 0.0) == pytest.approx(want[key].get(col, 0.0), abs=tol), (run_dir.name, key)
    print("\nworld-size change, max |adapter - single-process reference|:", diffs)
    assert all(d <= tol for d in diffs.values()), diffs


# ----------------------------------------------------------------------------------------------- non-finite, in process
class RecordingTracker:
    def __init__(self, model):
        self.model, self.rows, self.printed, self.weights = model, {}, [], {}

    def log(self, step, metrics):
        if "loss" in metrics:
            self.rows[step] = metrics
            self.weights[step] = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def print(self, message):
        self.printed.append(message)

    def advance(self, step):
        pass

    def close(self):
        pass


@pytest.fixture
def in_process(tmp_path, make_raw, monkeypatch):
    """loop.train in this process on the tiny model; `hook(step, batch)` runs inside every micro-batch's loss
    and may return a factor for the loss (NaN to poison the step). Returns (train(), tracker, ids_of, run_dir)."""
    from accelerate.state import AcceleratorState

    from trainer import loop
    from trainer.config import recipe_from_dict
    from trainer.data import prepare_data
    from trainer.distributed import build_accelerator
    from trainer.model import build_model
    from trainer.optim import build_optimizer
    from trainer.run_dir import RunDir
    from trainer.state import TrainState
    from trainer.tokenizer import load_tokenizer

    def setup(hook, **train):
        run_dir = tmp_path / "run"
        recipe = recipe_from_dict(make_raw(run_dir, **{"eval_every": 100, **train}))
        AcceleratorState._reset_state(True)
        acc = build_accelerator(grad_accum=2, mixed_precision="no", micro_batch_size=2, max_grad_norm=1.0)
        tok = load_tokenizer(recipe.model.name_or_path)
        data = prepare_data(recipe.data, tok, log=lambda m: None)
        torch.manual_seed(0)
        model = build_model(recipe.model, recipe.lora, log=lambda m: None)
        model, opt = acc.prepare(model, build_optimizer(model, recipe.train))
        checkpoint.install_trainable_only_hook(acc)
        plan = loop.make_plan(len(data.train), recipe, 1)
        current, ids_of = {}, {}
        real_batches, real_loss = loop.micro_batches, loop.token_loss_stats

        def micro_batches(rows, state, *args):
            batches, ids = real_batches(rows, state, *args)
            current["step"] = state.step + 1
            ids_of[state.step + 1] = ids
            return batches, ids

        def token_loss_stats(model, batch, chunked=True):
            loss, n, correct = real_loss(model, batch, chunked)
            return loss * hook(current["step"]), n, correct

        monkeypatch.setattr(loop, "micro_batches", micro_batches)
        monkeypatch.setattr(loop, "token_loss_stats", token_loss_stats)
        tracker = RecordingTracker(model)

        def train():
            return loop.train(
                recipe, acc, model, opt, data, TrainState(data_seed=0), plan, tracker, RunDir(run_dir), tok.pad_token_id
            )

        return train, tracker, ids_of, run_dir

    yield setup
    AcceleratorState._reset_state(True)


def test_sigusr1_finishes_the_step_saves_and_reports_preempted(in_process):
    from trainer import loop

    def hook(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives mid-step, during the forward
        return 1.0

    before = signal.getsignal(signal.SIGUSR1)
    train, tracker, _, run_dir = in_process(hook, save_every=5)
    last = train()
    assert last["preempted"] is True and sorted(tracker.rows) == [1, 2, 3]
    assert tracker.printed[-1] == (
        f"preempted (signal {int(signal.SIGUSR1)}): checkpoint saved at step 3; exiting "
        f"with code {loop.PREEMPTED_EXIT}; rerun the same command to resume"
    )
    assert ckpt_names(run_dir) == ["latest", "step-3"] and checkpoint.verify(run_dir / "checkpoints/step-3") is None
    assert checkpoint.read_state(run_dir / "checkpoints/step-3")["step"] == 3
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored


def test_non_finite_steps_are_skipped_logged_with_sample_ids_and_stop_the_run(in_process):
    """NaN loss at steps 2, 4, 5, 6 (max_bad_steps 3): step 2 is skipped and the run goes on; 4, 5, 6 in a row
    stop it at step 6 with nothing saved for it. Skipped steps leave weights and optimizer untouched; each is
    logged with its sample ids; the checkpoints kept (keep_last 2: step-4, step-5) hold the last good weights."""
    from trainer import loop

    train, tracker, ids_of, run_dir = in_process(
        lambda step: float("nan") if step in (2, 4, 5, 6) else 1.0,
        max_steps=8,
        save_every=1,
        keep_last=2,
        max_bad_steps=3,
    )
    with pytest.raises(loop.NonFiniteLoss, match="^3 non-finite steps in a row at step 6; stopping"):
        train()

    assert [m for m in tracker.printed if "non-finite" in m] == [
        f"step {s}: non-finite loss/grad norm (nan, nan); step skipped; samples {sorted(ids_of[s])[:20]}"
        for s in (2, 4, 5, 6)
    ]
    assert all(len(ids_of[s]) == 4 for s in (2, 4, 5, 6))
    assert sorted(tracker.rows) == [1, 2, 3, 4, 5]  # step 6 stopped the run before it was logged
    assert [tracker.rows[s]["skipped"] for s in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 3]
    w = tracker.weights

    def same(a, b):
        return max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0

    assert same(w[2], w[1]) and not same(w[3], w[2]) and same(w[4], w[3]) and same(w[5], w[3])
    ckroot = checkpoint.checkpoints_dir(run_dir)
    assert ckpt_names(run_dir) == ["latest", "step-4", "step-5"] and (ckroot / "latest").read_text().strip() == "step-5"
    for step in (4, 5):
        saved = load_file(ckroot / f"step-{step}" / "accelerate" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in saved.values())
        assert all(torch.equal(saved[k], w[3][k]) for k in saved)  # the last good weights
        state = checkpoint.read_state(ckroot / f"step-{step}")
        assert (state["step"], state["skipped_steps"], state["bad_steps_in_row"]) == (step, step - 2, step - 3)
    opt4, opt5 = (torch.load(ckroot / f"step-{s}" / "accelerate" / "optimizer.bin", weights_only=True) for s in (4, 5))
    assert all(torch.equal(opt4["state"][i]["exp_avg"], opt5["state"][i]["exp_avg"]) for i in opt4["state"])


@pytest.mark.slow
def test_non_finite_on_one_rank_is_skipped_by_all_ranks_and_logged_with_every_ranks_samples(tmp_path, make_raw):
    """DDP, NaN loss on rank 1 only at step 2: the flag comes from the all-reduced loss and grad norm, so both
    ranks skip (a disagreement would hang the next collective or split the weights); rank 0 logs the sample ids
    of both ranks; the run goes on and finishes."""
    run_dir = tmp_path / "run"
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(NAN_ON_ONE_RANK)
    ids_dir = tmp_path / "ids"
    ids_dir.mkdir()
    out = run(
        ddp_cmd([str(script)], write_recipe(tmp_path, make_raw(run_dir, max_steps=3, grad_accum=1))),
        IDS_DIR=str(ids_dir),
    )
    ids = {}
    for f in ids_dir.glob("rank*-step*.json"):
        rank, step = f.stem.removeprefix("rank").split("-step")
        ids[(int(rank), int(step))] = json.loads(f.read_text())
    assert sorted(ids) == [(r, s) for r in (0, 1) for s in (1, 2, 3)]
    assert (
        f"step 2: non-finite loss/grad norm (nan, nan); step skipped; samples {sorted(ids[(0, 2)] + ids[(1, 2)])}"
        in out.stdout.splitlines()
    )
    rows = metric_rows(run_dir)
    assert [rows[(s, "train")]["skipped"] for s in (1, 2, 3)] == [0, 1, 1]
    assert rows[(2, "train")]["loss"] != rows[(2, "train")]["loss"]  # NaN, logged as such
    assert json.loads((run_dir / "run_summary.json").read_text())["skipped_steps"] == 1


# ----------------------------------------------------------------------------------------------- data changes, mixes
@pytest.mark.slow  # ~20 s: keeps the fast loop under a minute
def test_case13_resume_after_the_data_changed_is_refused_then_restored_data_resumes(tmp_path, tiny_model_dir):
    """Case 13: the data file edited in place between runs: refused in one line naming what changed, exit 2, the
    checkpoint untouched; with the old file back the same command resumes."""
    data = tmp_path / "h_data.jsonl"
    v1 = "".join(json.dumps({"prompt": f"Say the number {i}.", "completion": str(i)}) + "\n" for i in range(8))
    v2 = "".join(
        json.dumps({"prompt": f"Translate {w} to French.", "completion": f}) + "\n"
        for w, f in (("cat", "chat"), ("dog", "chien"), ("house", "maison"))
    )
    data.write_text(v1)
    raw = tiny_recipe(
        tiny_model_dir,
        data,
        tmp_path / "run",
        data={"max_seq_len": 128, "val_fraction": 0.0},
        train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "save_every": 1},
    )
    recipe = write_recipe(tmp_path, raw)
    run(train_cmd(recipe))
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["data_fingerprint"]
    assert [(d["name"], d["rows"]) for d in saved] == [("h_data", 8)]
    before = tree_digest(tmp_path / "run")
    data.write_text(v2)
    out = run(train_cmd(recipe, "train.max_steps=4"), expect=2)
    assert out.stderr.strip() == (
        f"error: {ckpt}: cannot resume, the data changed since this checkpoint (h_data.jsonl: 8 -> 3 rows, content "
        "hash differs); restore the data it was trained on, or start over with --fresh"
    )
    assert tree_digest(tmp_path / "run") == before
    data.write_text(v1)
    out = run(train_cmd(recipe, "train.max_steps=4"))
    assert resumed_from(out.stdout, tmp_path / "run") == 2
    assert step_of(checkpoint.find_resumable(tmp_path / "run")) == 4


def write_mix_data(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sums = folder / "sums.jsonl"
    sums.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} plus {i % 7}?", "completion": str(i + i % 7)}) + "\n" for i in range(24)
        )
    )
    chat = folder / "chat.csv"
    chat.write_text("question,answer\n" + "".join(f"Name the colour number {i}.,Colour {i:03d}\n" for i in range(16)))
    return sums, chat


@pytest.mark.slow
def test_mixed_datasets_kill9_and_resume_ends_bit_identical_with_eval_loss_per_dataset(tmp_path, tiny_model_dir):
    """data.datasets (weight 2 and a fixed 10 samples, JSON Lines and CSV): a run killed with SIGKILL mid-way and
    resumed ends with the same adapter and metrics as an uninterrupted one; metrics.csv has eval/loss/NAME."""
    sums, chat = write_mix_data(tmp_path / "data")

    def raw(out: Path) -> dict:
        return tiny_recipe(
            tiny_model_dir,
            sums,
            out,
            lora={"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
            data={
                "path": "",
                "datasets": [{"path": str(sums), "weight": 2}, {"path": str(chat), "name": "colours", "samples": 10}],
                "max_seq_len": 64,
                "val_fraction": 0.2,
            },
            train={"max_steps": 8, "save_every": 2, "eval_every": 4, "log_every": 1, "keep_last": 5},
        )

    ref_dir = tmp_path / "ref"
    out = run(train_cmd(write_recipe(tmp_path / "r1", raw(ref_dir))))
    assert "sums (prompt_completion): 24 rows, train 38 samples drawn of 19, val 5, test 0" in out.stdout
    assert "colours (prompt_completion): 16 rows, train 10 samples drawn of 13, val 3, test 0" in out.stdout
    with (ref_dir / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    evals = [r for r in rows if r["eval_loss"]]
    assert [int(r["step"]) for r in evals] == [4, 8]
    for r in evals:
        per = [float(r["eval/loss/sums"]), float(r["eval/loss/colours"])]
        assert min(per) <= float(r["eval_loss"]) <= max(per) and per[0] != per[1]

    killed_dir = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "r2", raw(killed_dir))
    child = Child(train_cmd(recipe), tmp_path / "killed.log")
    child.wait_for(
        "step 5",
        lambda: "\n5," in (killed_dir / "metrics.csv").read_text() if (killed_dir / "metrics.csv").exists() else False,
    )
    assert child.kill(signal.SIGKILL) == -signal.SIGKILL
    out = run(train_cmd(recipe))
    assert resumed_from(out.stdout, killed_dir) in (4, 6)
    assert max_diff(adapter(killed_dir / "adapter"), adapter(ref_dir / "adapter")) == 0.0
    cols = (
        "loss",
        "lr",
        "grad_norm",
        "samples_seen",
        "tokens_seen",
        "eval_loss",
        "eval/loss/sums",
        "eval/loss/colours",
    )
    assert_rows_equal(metric_rows(killed_dir, cols), metric_rows(ref_dir, cols))
