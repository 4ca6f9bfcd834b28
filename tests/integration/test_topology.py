"""Runs that change topology, on the real CLI with a tiny Llama on CPU: DeepSpeed ZeRO-2 over gloo with 2 and 1
processes (`accelerate launch --config_file accelerate_configs/cpu_gloo_zero2.yaml`) and one plain process.

* ZeRO-2 checkpoints resume on another number of processes (2 -> 1, 1 -> 2) and without DeepSpeed, and a
  checkpoint without DeepSpeed resumes under it: each leg is a run stopped after step 3 (its later checkpoints
  removed) and resumed to step 6 on the other topology.
* LoRA dropout 0.1 and a validation split of ONE row: 2 processes give the losses, eval loss and adapter of 1
  process (dropout masks are drawn per row, not per rank; the rank without a validation row still joins the eval).
* A NaN loss on one rank under ZeRO-2: the step is skipped (weights, AdamW moments and step count unchanged);
  with DeepSpeed's bf16 overflow check turned off, the run stops with a one-line message instead of saving.

"Equal" here: every run sees the same rows in every step (global batch 4 rows: 2 x accum 2 on one process, 2 x
accum 1 on two) with the same dropout masks, so the only difference left is the order in which gradients are
summed. Tolerances, from what these runs measure (fp32, lr 1e-3, 6 steps): adapter weights within 1e-6 of the
uninterrupted single-process run (measured: at most 1.5e-8), losses and eval losses within 2e-6 (metrics.csv keeps
6 decimals; measured: equal but for the last digit), the whole optimizer state at the end within 1e-5 of each
tensor's largest entry (measured: 0.0 between ZeRO-2 runs, 6e-7 after a start without DeepSpeed).
Generated data only (no shared files): 80 short Alpaca-style rows written by the test.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import accelerate_cmd, tiny_recipe
from tests.integration.test_distributed_backend import clean_env, run_bounded

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # real multi-process launches, 20-50 s each

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
STEPS, CUT = 6, 3
WEIGHT_ATOL, LOSS_ATOL = 1e-6, 2e-6
WORDS = (
    "alpha beta gamma delta river stone cloud paper green quick slow bright dark tree light sound water fire "
    "earth wind north south east west small large happy"
).split()

# Under `accelerate launch`: NaN loss on rank NAN_RANK at the steps in NAN_STEPS (the test's poisoned step).
NAN_HOOK = r"""
import os, sys
import trainer.loop as loop
real_loss, real_batches, current = loop.token_loss_stats, loop.micro_batches, {}
steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
def micro_batches(rows, state, *args):
    current["step"] = state.step + 1
    return real_batches(rows, state, *args)
def token_loss_stats(model, batch, chunked=True):
    loss, n, correct = real_loss(model, batch, chunked)
    bad = current["step"] in steps and os.environ.get("RANK", "0") == os.environ["NAN_RANK"]
    return (loss * float("nan") if bad else loss), n, correct
loop.micro_batches, loop.token_loss_stats = micro_batches, token_loss_stats
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ----------------------------------------------------------------------------------------------- helpers
def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "instruction": f"Item {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))),
            "input": "",
            "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))),
        }
        for i in range(n)
    ]


class Run:
    def __init__(self, run_dir: Path, rc: int, out: str):
        self.dir, self.rc, self.out = run_dir, rc, out

    def rows(self) -> dict[tuple[int, str], dict]:
        from trainer.tracking import read_metrics

        out = {}
        for r in read_metrics(self.dir / "metrics.csv"):
            kind = "eval" if r["eval_loss"] else "train"
            out[(int(r["step"]), kind)] = r
        return out

    def adapter(self, where: str = "adapter") -> dict[str, torch.Tensor]:
        return load_file(self.dir / where / "adapter_model.safetensors")

    def full_state(self, step: int) -> dict[str, torch.Tensor]:
        return load_file(self.dir / "checkpoints" / f"step-{step}" / "full_optimizer.safetensors")

    @property
    def summary(self) -> dict:
        return json.loads((self.dir / "run_summary.json").read_text())


def launch(tmp: Path, raw: dict, where: str, *, script: Path | None = None, config: str | None = None, expect=0, **env):
    """`where`: "single" (python -m trainer), "ds1" / "ds2" (accelerate launch, ZeRO-2, 1 / 2 processes)."""
    tmp.mkdir(parents=True, exist_ok=True)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    program = [str(script)] if script else ["-m", "trainer"]
    cli = [*program, "train", str(recipe), "--no-progress"]
    if where == "single":
        cmd = [sys.executable, *cli]
    else:
        cmd = accelerate_cmd(config or "accelerate_configs/cpu_gloo_zero2.yaml", *cli, processes=where[-1])
    res = run_bounded(cmd, cwd=ROOT, env={**clean_env(), **env}, timeout=TIMEOUT_S)
    (tmp / "log.txt").write_text(res.stdout)
    if expect is not None:
        assert res.returncode == expect, f"{where}: rc {res.returncode}\n{res.stdout[-5000:]}"
    return Run(Path(raw["output_dir"]), res.returncode, res.stdout)


def cut_copy(src: Run, dst: Path) -> Path:
    """The run as if it had been stopped right after step CUT's checkpoint."""
    shutil.copytree(src.dir, dst)
    for c in (dst / "checkpoints").glob("step-*"):
        if int(c.name[5:]) > CUT:
            shutil.rmtree(c)
    (dst / "checkpoints" / "latest").write_text(f"step-{CUT}\n")
    for name in ("adapter", "run_summary.json"):
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return dst


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_same_metrics(got: Run, want: Run, steps=range(1, STEPS + 1)) -> float:
    """Counters and lr identical, losses / grad norms / eval losses within LOSS_ATOL; returns the largest gap."""
    g, w = got.rows(), want.rows()
    worst = 0.0
    for key in [(s, k) for s in steps for k in ("train", "eval") if (s, k) in w]:
        assert key in g, f"{got.dir}: metrics row {key} missing"
        for col in ("epoch", "samples_seen", "tokens_seen", "lr", "skipped"):
            if w[key][col]:
                assert g[key][col] == w[key][col], (got.dir.name, key, col)
        for col in ("loss", "grad_norm", "eval_loss"):
            if w[key][col]:
                gap = abs(float(g[key][col]) - float(w[key][col]))
                assert gap <= LOSS_ATOL, (got.dir.name, key, col, g[key][col], w[key][col])
                worst = max(worst, gap)
    return worst


# ----------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("topology")


@pytest.fixture(scope="module")
def make_raw(work, tiny_model_dir):
    data = work / "alpaca80.json"
    data.write_text(json.dumps(alpaca_rows(80)))

    def make(name: str, processes: int, **train) -> dict:
        return tiny_recipe(
            tiny_model_dir,
            data,
            work / name / "run",
            lora={"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
            data={"max_seq_len": 64, "val_fraction": 0.01},  # 80 rows -> ONE validation row
            train={
                "max_steps": STEPS,
                "micro_batch_size": 2,
                "grad_accum": 2 // processes,  # 4 rows per step on 1 and on 2 processes
                "lr": 1e-3,
                "scheduler": "constant",  # a run cut short with max_steps follows the same schedule
                "warmup_ratio": 0.0,
                "save_every": CUT,
                "eval_every": CUT,
                "log_every": 1,
                "keep_last": 5,
                "seed": 0,
                **train,
            },
        )

    return make


@pytest.fixture(scope="module")
def single(work, make_raw) -> Run:
    return launch(work / "single", make_raw("single", 1), "single")


@pytest.fixture(scope="module")
def ds2(work, make_raw) -> Run:
    return launch(work / "ds2", make_raw("ds2", 2), "ds2")


def resumed(work: Path, make_raw, source: Run, name: str, where: str) -> Run:
    cut_copy(source, work / name / "run")
    return launch(work / name, make_raw(name, 2 if where == "ds2" else 1), where)


# ----------------------------------------------------------------------------------------------- tests
def test_two_processes_equal_one_with_lora_dropout_and_a_single_validation_row(single, ds2):
    """ZeRO-2 on 2 processes vs one plain process: same losses, grad norms, eval losses and adapter, with LoRA
    dropout 0.1 (before: 0.016 apart) and a validation split of one row (rank 1 has none: it still joins)."""
    assert "2 processes, DeepSpeed ZeRO-2 (gloo)" in ds2.out and "1 process, no distribution" in single.out
    assert ds2.summary["data"]["val"]["rows"] == 1
    gap = assert_same_metrics(ds2, single)
    diff = max_diff(ds2.adapter(), single.adapter())
    print(f"\n2 processes (ZeRO-2) vs 1, dropout 0.1: max |adapter diff| {diff:.3g}, max metric gap {gap:.3g}")
    assert diff <= WEIGHT_ATOL
    evals = [k for k in single.rows() if k[1] == "eval"]
    assert evals == [(CUT, "eval"), (STEPS, "eval")]


@pytest.mark.parametrize(
    "leg,source_kind,where",
    [
        ("ds2_to_ds1", "ds2", "ds1"),  # ZeRO-2, 2 -> 1 process
        ("ds1_to_ds2", "ds1", "ds2"),  # ZeRO-2, 1 -> 2 processes
        ("ds2_to_single", "ds2", "single"),  # DeepSpeed -> no DeepSpeed
        ("single_to_ds2", "single", "ds2"),  # no DeepSpeed -> DeepSpeed
    ],
)
def test_resume_on_another_topology_continues_the_run(leg, source_kind, where, work, make_raw, single, ds2):
    if source_kind == "ds1":  # a ZeRO-2 run on one process, stopped at step CUT (constant LR: same steps 1..3)
        source = launch(work / "ds1", make_raw("ds1", 1, max_steps=CUT), "ds1")
        assert (source.dir / "checkpoints" / f"step-{CUT}" / "full_optimizer.safetensors").is_file()
    else:
        source = {"ds2": ds2, "single": single}[source_kind]
    run = resumed(work, make_raw, source, leg, where)
    assert f"resume: from {run.dir / 'checkpoints' / f'step-{CUT}'} at step {CUT}" in run.out
    state = json.loads((run.dir / "checkpoints" / f"step-{STEPS}" / "trainer_state.json").read_text())
    assert (state["world_size"], state["distributed_type"]) == (
        {"ds1": (1, "DEEPSPEED"), "ds2": (2, "DEEPSPEED"), "single": (1, "NO")}[where]
    )
    gap = assert_same_metrics(run, single)
    diffs = {"adapter vs 1 process": max_diff(run.adapter(), single.adapter())}
    if where != "single":  # the whole optimizer state at the end: masters, moments, step, as in the 2-process run
        got, want = run.full_state(STEPS), ds2.full_state(STEPS)
        assert sorted(got) == sorted(want)
        for key in got:  # float noise of the gradient sums only: 1e-5 of each tensor's largest entry
            scale = float(want[key].abs().max())
            assert float((got[key] - want[key]).abs().max()) <= 1e-5 * scale + 1e-12, key
        diffs["optimizer state vs 2 processes"] = max_diff(got, want)
        assert all(float(v) == STEPS for k, v in got.items() if k.startswith("step/"))
    print(f"\n{leg}: {diffs}, max metric gap {gap:.3g}")
    assert diffs["adapter vs 1 process"] <= WEIGHT_ATOL


def test_zero2_checkpoint_without_the_whole_state_is_refused_elsewhere(work, make_raw, ds2):
    """A ZeRO checkpoint written before full_optimizer.safetensors existed: refused in one line on another
    world size, before the model is loaded, with what to do."""
    from trainer import checkpoint

    run_dir = cut_copy(ds2, work / "old_ckpt" / "run")
    ckpt = run_dir / "checkpoints" / f"step-{CUT}"
    (ckpt / "full_optimizer.safetensors").unlink()
    checkpoint.write_manifest(ckpt)
    run = launch(work / "old_ckpt", make_raw("old_ckpt", 1), "single", expect=2)
    errors = [line for line in run.out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in run.out, run.out[-3000:]
    assert errors[0].startswith(f"error: {ckpt}: saved by DeepSpeed with 2 processes, but this launch is a single")
    assert "has no full_optimizer.safetensors" in errors[0] and "--num_processes 2" in errors[0]
    assert "model: " not in run.out


def test_nan_on_one_rank_under_zero2_is_skipped_with_weights_and_optimizer_unchanged(work, make_raw):
    """NaN loss on rank 1 at step 2 (grad_accum 2: the first micro-batch poisons the accumulated gradient).
    accelerate has already run engine.step() inside backward; DeepSpeed's own check skipped it, and the loop
    reports it: the whole state saved after step 2 equals the one after step 1, bit for bit; step 3 trains."""
    script = work / "nan_hook.py"
    script.write_text(NAN_HOOK)
    raw = make_raw("nan", 2, max_steps=3, save_every=1, grad_accum=2)
    run = launch(work / "nan", raw, "ds2", script=script, NAN_STEPS="2", NAN_RANK="1")
    lines = [ln for ln in run.out.splitlines() if ln.startswith("step ") and "non-finite" in ln]
    assert (
        len(lines) == 1
        and lines[0].startswith("step 2: non-finite loss/grad norm (nan, ")
        and "step skipped" in lines[0]
    )
    rows = run.rows()
    assert [rows[(s, "train")]["skipped"] for s in (1, 2, 3)] == ["0", "1", "1"]
    s1, s2, s3 = (run.full_state(s) for s in (1, 2, 3))
    assert max_diff(s1, s2) == 0.0  # masters, exp_avg, exp_avg_sq and step untouched by the poisoned step
    assert max_diff(s2, s3) > 0.0
    steps = (
        {float(v) for k, v in s2.items() if k.startswith("step/")},
        {float(v) for k, v in s3.items() if k.startswith("step/")},
    )
    assert steps == ({1.0}, {2.0})  # AdamW took 2 steps in 3
    assert run.summary["skipped_steps"] == 1 and run.summary["steps"] == 3


def test_nan_under_zero2_bf16_with_the_overflow_check_off_stops_without_saving(work, make_raw):
    """bf16 with `check_grad_overflow: false`: DeepSpeed applies the poisoned step inside backward; the loop sees
    it applied a non-finite step and stops with one line, saving nothing after step 1."""
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds["bf16"] = {"enabled": "auto", "check_grad_overflow": False}
    (work / "zero2_nocheck.json").write_text(json.dumps(ds))
    acc = yaml.safe_load((ROOT / "accelerate_configs" / "cpu_gloo_zero2.yaml").read_text())
    acc["deepspeed_config"]["deepspeed_config_file"] = str(work / "zero2_nocheck.json")
    (work / "acc_nocheck.yaml").write_text(yaml.safe_dump(acc))
    script = work / "nan_hook.py"
    script.write_text(NAN_HOOK)
    raw = make_raw("nan_bf16", 2, max_steps=3, save_every=1, grad_accum=2)
    raw["model"]["dtype"] = "bf16"
    run = launch(
        work / "nan_bf16",
        raw,
        "ds2",
        script=script,
        config=str(work / "acc_nocheck.yaml"),
        expect=None,
        NAN_STEPS="2",
        NAN_RANK="1",
    )
    assert run.rc != 0
    errors = [ln for ln in run.out.splitlines() if ln.startswith("error: ")]
    assert errors and errors[0].startswith("error: step 2: non-finite loss/grad norm (nan, ")
    assert "DeepSpeed applied the optimizer step anyway" in errors[0]
    assert sorted(p.name for p in (run.dir / "checkpoints").iterdir()) == ["latest", "step-1"]
