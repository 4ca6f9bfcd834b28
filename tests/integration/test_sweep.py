"""`trainer sweep` through the real CLI on a tiny Llama: `lora.r=4,8 lora=null` (two LoRA ranks and a full
fine-tune), killed with SIGKILL in the middle of the second point and rerun, gives exactly the results of an
uninterrupted sweep (adapters and the full model bit-identical, every metrics row equal) and writes the comparison.

The kill lands at a known place: the CLI runs through a small wrapper (STALL) that stops inside the second point
right after its step-2 checkpoint is complete; the test kills the process there. The rerun must skip the finished
first point, resume the second from step 2 and train the third.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import accelerate_cmd, clean_env, run_cli, tiny_recipe, write_jsonl
from trainer.loop import PREEMPTED_EXIT

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300
AXES = ["lora.r=4,8", "lora=null"]
POINTS = ["lora.r=4", "lora.r=8", "lora=null"]
TIMING = {"tokens_per_s", "target_tokens_per_s", "mem_gib", "elapsed_s", "tflops", "mfu"}

STALL = r"""
import os, sys, time
from pathlib import Path
import trainer.checkpoint as ck
orig = ck.save
def save(accelerator, model, run_dir, state, *args, **kwargs):
    out = orig(accelerator, model, run_dir, state, *args, **kwargs)
    if Path(run_dir).name == os.environ["STALL_RUN"] and state.step == int(os.environ["STALL_STEP"]):
        Path(os.environ["STALL_MARKER"]).write_text("stalled")
        time.sleep(600)
    return out
ck.save = save
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def sweep_args(recipe: Path, runs: Path) -> list[str]:
    return ["sweep", str(recipe), *AXES, "--runs-root", str(runs), "--no-progress"]


def sweep_cli(args: list[str]) -> str:
    out = run_cli(*args)
    return out.stdout + out.stderr


def rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = run_dir / ("adapter" if (run_dir / "adapter").is_dir() else "model")
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def recipe(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sweep")
    data = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": str(a + b)},
            ]
        }
        for a, b in zip(range(0, 60, 3), range(40, 0, -2))
    ]
    path = write_jsonl(folder / "sums.jsonl", data)
    raw = tiny_recipe(
        tiny_model_dir,
        path,
        folder / "unused",
        lora={"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},  # dropout: RNG restore matters
        data={"max_seq_len": 64, "val_fraction": 0.1},
        train={"max_steps": 4, "save_every": 2, "eval_every": 2, "log_every": 1, "lr": 1e-3},
    )
    out = folder / "sums.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("ref")
    sweep_cli(sweep_args(recipe, runs))
    return runs / "sums"


@pytest.mark.slow
def test_sweep_killed_mid_point_and_rerun_equals_an_uninterrupted_sweep(recipe, reference, tmp_path):
    runs = tmp_path / "runs"
    marker = tmp_path / "stalled"
    log = tmp_path / "first.log"
    with log.open("w") as fh:
        child = subprocess.Popen(
            [sys.executable, "-c", STALL, *sweep_args(recipe, runs)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=clean_env(STALL_RUN="lora.r=8", STALL_STEP="2", STALL_MARKER=str(marker)),
        )
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert child.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    sweep = runs / "sums"
    # what the kill left: point 1 finished, point 2 stopped after its step-2 checkpoint, point 3 never started
    assert (sweep / "lora.r=4" / "run_summary.json").is_file()
    assert not (sweep / "lora.r=8" / "run_summary.json").exists() and (sweep / "lora.r=8/checkpoints/step-2").is_dir()
    assert not (sweep / "lora=null").exists() and not (sweep / "compare").exists()

    out = sweep_cli(sweep_args(recipe, runs))
    assert "sweep: [1/3] lora.r=4: finished before, skipped" in out
    assert f"resume: from {sweep / 'lora.r=8' / 'checkpoints' / 'step-2'} at step 2" in out
    assert out.count("resume: from ") == 1

    for name in POINTS:
        got, want = weights(sweep / name), weights(reference / name)
        assert sorted(got) == sorted(want) and got
        for key in want:
            assert torch.equal(got[key], want[key]), (name, key)  # bit-identical
        assert rows(sweep / name) == rows(reference / name), name  # every step's loss, accuracy, lr, counts

    record = json.loads((sweep / "sweep.json").read_text())
    assert [(p["name"], p["status"]) for p in record["points"]] == [
        ("lora.r=4", "done"),
        ("lora.r=8", "trained"),
        ("lora=null", "trained"),
    ]
    # the comparison: one row per point, numbers from the runs, equal to the uninterrupted sweep's
    with (sweep / "compare" / "compare.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    with (reference / "compare" / "compare.csv").open(newline="") as fh:
        ref_table = list(csv.DictReader(fh))
    assert [r["run"] for r in table] == POINTS
    assert [r["method"] for r in table] == ["LoRA", "LoRA", "full"]
    assert [r["steps"] for r in table] == ["4", "4", "4"]
    for got, want in zip(table, ref_table):
        for col in ("final_train_loss", "final_eval_loss", "final_eval_ppl", "eval_token_accuracy", "trainable_params"):
            assert got[col] == want[col] and got[col] != "", col
    summaries = {n: json.loads((sweep / n / "run_summary.json").read_text()) for n in POINTS}
    for r in table:
        s = summaries[r["run"]]
        assert float(r["final_train_loss"]) == pytest.approx(float(rows(sweep / r["run"])[-2]["loss"]), abs=0)
        assert int(r["trainable_params"]) == s["trainable_params"]
        folder = sweep / r["run"] / ("model" if r["method"] == "full" else "adapter")
        assert int(r["weights_bytes"]) == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert int(table[0]["trainable_params"]) * 2 == int(table[1]["trainable_params"])  # r=8 has twice r=4's
    assert float(table[2]["trainable_share"]) == 100.0
    for png in ("eval_ppl.png", "train_loss.png"):
        assert (sweep / "compare" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (sweep / "compare" / "compare.md").read_text()
    assert md.count("\n| lora") == 3 and "![eval perplexity](eval_ppl.png)" in md
    # the same command once more: everything finished, nothing trains (in process: no training can start)
    from trainer import sweep as sweep_module

    lines = []
    sweep_module.run_sweep(recipe, AXES, runs_root=runs, log=lines.append)
    assert sum("finished before, skipped" in line for line in lines) == 3


def test_sweep_screens_points_with_the_estimator_before_training(recipe, tmp_path, monkeypatch):
    """--gpus/--gpu-mem: every point that does not fit is listed and skipped before any training (here: all)."""
    from trainer import sweep, train

    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("nothing fits: nothing may train"))
    lines = []
    record = sweep.run_sweep(recipe, AXES, runs_root=tmp_path, gpus=1, gpu_mem_gib=0.5, log=lines.append)
    for name in POINTS:
        assert f"sweep: {name}: SKIPPED, does not fit on 1 x 0.5 GiB" in "\n".join(lines)
    assert [p["status"] for p in record["points"]] == ["skipped"] * 3
    assert sorted(p.name for p in (tmp_path / "sums").iterdir()) == [".trainer-sweep", "sweep.json"]


def test_screen_skips_only_the_points_that_do_not_fit(recipe, tmp_path):
    from trainer.estimate import estimate, load_model_config
    from trainer.sweep import plan_sweep, screen

    _, points = plan_sweep(recipe, AXES, runs_root=tmp_path)
    config = load_model_config(points[0].recipe.model.name_or_path)
    need = [estimate(p.recipe, config, gpus=1, gpu_mem_gib=80).total / 2**30 for p in points]
    assert need[2] > need[1] > need[0]  # full fine-tune: fp32 master weights, gradients and AdamW states for all
    lines = []
    screen(points, gpus=1, gpu_mem_gib=(need[1] + need[2]) / 2, log=lines.append)
    assert [p.status for p in points] == ["pending", "pending", "skipped"]
    assert lines[2].startswith("sweep: lora=null: SKIPPED, does not fit on 1 x ")


def test_preemption_stops_the_sweep_with_the_trainer_exit_code(recipe, tmp_path, monkeypatch):
    """A preempted point (SIGTERM/SIGUSR1 -> checkpoint, exit 75) stops the sweep with the same code: the job is
    requeued and the rerun continues; the next points do not start under a scheduler that is taking the node."""
    from trainer import sweep, train

    calls = []

    def preempted(recipe, show_progress=True):
        calls.append(recipe.output_dir)
        raise SystemExit(PREEMPTED_EXIT)

    monkeypatch.setattr(train, "run", preempted)
    with pytest.raises(SystemExit) as err:
        sweep.run_sweep(recipe, AXES, runs_root=tmp_path, log=lambda m: None)
    assert err.value.code == PREEMPTED_EXIT and calls == [str(tmp_path / "sums" / "lora.r=4")]


def test_a_failed_point_is_recorded_and_the_others_still_run(recipe, tmp_path, monkeypatch):
    """A point that fails with a user error (e.g. its loss diverged) does not stop the sweep; the sweep ends with
    one line naming it (exit 2 through the CLI), and sweep.json says what happened to every point."""
    from trainer import compare, sweep, train
    from trainer.errors import UserError

    def fake_run(recipe, show_progress=True):
        if recipe.output_dir.endswith("lora.r=8"):
            raise UserError("3 non-finite steps in a row at step 3; stopping")
        Path(recipe.output_dir).mkdir(parents=True)
        (Path(recipe.output_dir) / "run_summary.json").write_text(json.dumps({"steps": 4, "preempted": False}))

    compared = []
    monkeypatch.setattr(train, "run", fake_run)
    monkeypatch.setattr(compare, "compare_runs", lambda dirs, out, log: compared.append((dirs, out)))
    with pytest.raises(UserError) as err:
        sweep.run_sweep(recipe, AXES, runs_root=tmp_path, log=lambda m: None)
    assert str(err.value) == (
        "sweep: 1 point(s) failed: lora.r=8: 3 non-finite steps in a row at step 3; stopping; "
        "fix them and rerun the same command (finished points are skipped)"
    )
    folder = tmp_path / "sums"
    assert compared == [([folder / "lora.r=4", folder / "lora=null"], folder / "compare")]
    record = json.loads((folder / "sweep.json").read_text())
    assert [(p["name"], p["status"]) for p in record["points"]] == [
        ("lora.r=4", "trained"),
        ("lora.r=8", "failed"),
        ("lora=null", "trained"),
    ]


@pytest.mark.slow
def test_a_sweep_under_accelerate_launch_runs_every_point_under_it(recipe, tmp_path):
    """2 processes, DDP over gloo: both points train with world_size 2 (accelerate's state is reset between points,
    its process group kept), rank 0 alone logs, writes the record and the comparison."""
    cmd = accelerate_cmd(
        "accelerate_configs/cpu_gloo_ddp.yaml",
        "-m",
        "trainer",
        "sweep",
        str(recipe),
        "lora.r=4,8",
        "--runs-root",
        str(tmp_path),
        "--no-progress",
        processes=2,
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=clean_env())
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    text = out.stdout + out.stderr
    for name in ("lora.r=4", "lora.r=8"):
        summary = json.loads((tmp_path / "sums" / name / "run_summary.json").read_text())
        assert (summary["world_size"], summary["distributed_type"], summary["steps"]) == (2, "MULTI_CPU", 4)
        assert text.count(f"] {name}: ") == 1  # one log line per point: rank 0's
    assert text.count("compare: wrote") == 1
    with (tmp_path / "sums" / "compare" / "compare.csv").open(newline="") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == ["lora.r=4", "lora.r=8"]
