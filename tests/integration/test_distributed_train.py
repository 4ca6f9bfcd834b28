"""The real `trainer train` CLI with 2 CPU processes over gloo: `accelerate launch` with
accelerate_configs/cpu_gloo_ddp.yaml (DDP) and accelerate_configs/cpu_gloo_zero2.yaml (DeepSpeed ZeRO-2).

One launch per configuration, shared by several tests (module-scoped fixtures), on a tiny Llama:

* ddp / zero2: one full epoch (7 steps of a global batch of 8 rows, the last step short), LoRA, fp32, clipping on.
* single: the same recipe in ONE process (`python -m trainer`) with grad_accum doubled: the same global batches.
* zero2_resumed: ZeRO-2 again, from the zero2 run's step-2 checkpoint, to step 4.
* qlora_ddp (fp32) and qlora_zero2 (bf16): 4-bit NF4 base, 2 steps.

What the tests prove: both ranks exist and know it, each sample is trained on exactly once per epoch, only rank 0
writes run files, DDP == ZeRO-2 == one process step for step (losses, grad norms, final adapter), ZeRO-2
partitions the optimizer (one shard per rank, half each) and resumes exactly, its whole optimizer state
(full_optimizer.safetensors, what a resume on another world size loads) equals the shards, and the adapter saved
under bf16 DeepSpeed is the exact fp32 master. Resumes across topologies: tests/integration/test_topology.py.
Plus in-process checks of `loop.micro_batches` (data split) and of the resume-topology rule.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, accelerate_cmd, alpaca_slice, clean_env, run_bounded, tiny_recipe, write_recipe

WORLD = 2
MICRO, ACCUM = 2, 2  # per rank; the global batch is MICRO * ACCUM * WORLD = 8 rows
N_ROWS = 64  # Alpaca-shaped rows (tests/datagen.py) -> 51 train samples (7 dropped: no
#                                      target left) in 50 packed rows at max_seq_len 64: 7 steps, the last one short
LAUNCH_TIMEOUT_S = 300
# Tolerances, from what these runs measure (fp32, lr 1e-2, 7 AdamW steps, clipping active):
# * metrics.csv loss / grad_norm / eval_loss (kept to 6 decimals): 1 vs 2 processes and DDP vs ZeRO-2 differ by at
#   most 5e-7 relative (one rounding quantum); here the losses of consecutive steps differ by 1e-2 or more.
# * adapter weights: lora_B within 3e-7; lora_A within 6e-6 (DDP vs 1 process) and 1.3e-5 (ZeRO-2 vs DDP), reached
#   at step 2 (lora_A's first non-zero gradient: lora_B starts at zero) and constant after: AdamW's g/(sqrt(v)+eps)
#   magnifies last-bit summation-order differences of near-zero gradient entries. One step moves weights by ~lr.
LOSS_RTOL = 5e-6
WEIGHT_ATOL = 1e-4

pytest.importorskip("deepspeed")
slow = pytest.mark.slow  # real multi-process launches


# ----------------------------------------------------------------------------------------------- helpers
def recipe(model_dir: Path, data: Path, out: Path, **sections) -> dict:
    base = dict(
        data={"max_seq_len": 64, "packing": True, "val_fraction": 0.1},
        # constant LR: a run resumed with another max_steps follows the same schedule as an uninterrupted one
        train={
            "epochs": 1,
            "max_steps": None,
            "micro_batch_size": MICRO,
            "grad_accum": ACCUM,
            "lr": 1e-2,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 0.5,
            "log_every": 1,
            "eval_every": 4,
            "save_every": 2,
            "keep_last": 10,
            "seed": 0,
        },
    )
    for name, changes in sections.items():
        base[name] = {**base.get(name, {}), **changes} if isinstance(changes, dict) else changes
    return tiny_recipe(model_dir, data, out, **base)


class Run:
    """A finished CLI run: its folder, exit code and combined output."""

    def __init__(self, run_dir: Path, res: subprocess.CompletedProcess, wall_s: float):
        self.dir, self.rc, self.out, self.wall_s = run_dir, res.returncode, res.stdout, wall_s

    @property
    def summary(self) -> dict:
        return json.loads((self.dir / "run_summary.json").read_text())

    def metrics(self) -> list[dict]:
        from trainer.tracking import read_metrics

        return read_metrics(self.dir / "metrics.csv")

    def train_rows(self) -> list[dict]:
        return [r for r in self.metrics() if r["loss"]]

    def column(self, name: str) -> list[float]:
        return [float(r[name]) for r in self.train_rows()]

    def adapter(self, where: str = "adapter") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.dir / where / "adapter_model.safetensors")


def train_cli(tmp: Path, raw: dict, config: str | None, *extra: str, expect: int = 0) -> Run:
    """`accelerate launch --config_file accelerate_configs/CONFIG -m trainer train ...` (config None: one plain
    process, `python -m trainer train ...`), from the repo root, bounded, killed as a process group on timeout."""
    cli = ["-m", "trainer", "train", str(write_recipe(tmp, raw)), "--no-progress", *extra]
    if config is None:
        cmd = [sys.executable, *cli]
    else:
        cmd = accelerate_cmd(f"accelerate_configs/{config}", *cli)
    t0 = time.perf_counter()
    res = run_bounded(cmd, cwd=ROOT, env=clean_env(), timeout=LAUNCH_TIMEOUT_S)
    run = Run(Path(raw["output_dir"]), res, time.perf_counter() - t0)
    assert run.rc == expect, f"{config or 'single process'}: rc {run.rc}, expected {expect}:\n{run.out[-6000:]}"
    return run


def zero_shards(ckpt: Path) -> list[Path]:
    """DeepSpeed's optimizer partitions, rank order (named bf16_zero_pp_rank_R... under bf16)."""
    files = list((ckpt / "accelerate" / "pytorch_model").glob("*zero_pp_rank_*_optim_states.pt"))
    return sorted(files, key=lambda p: int(p.name.split("zero_pp_rank_")[1].split("_")[0]))


def load_ds(path: Path) -> dict:
    # DeepSpeed pickles enums and dataclasses next to the tensors: weights_only=True refuses these files.
    return torch.load(path, map_location="cpu", weights_only=False)


def fp32_masters(ckpt: Path) -> dict[str, torch.Tensor]:
    """The ZeRO-2 fp32 master weights by adapter key: the rank partitions concatenated in rank order, then cut in
    the order of the model's param_shapes (as deepspeed's zero_to_fp32 does for stage 2)."""
    shards = [load_ds(p)["optimizer_state_dict"] for p in zero_shards(ckpt)]
    shapes = load_ds(ckpt / "accelerate" / "pytorch_model" / "mp_rank_00_model_states.pt")["param_shapes"]
    out = {}
    for group, group_shapes in enumerate(shapes):
        flat = torch.cat([sd["single_partition_of_fp32_groups"][group] for sd in shards])
        offset = 0
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            out[name.replace(".default", "")] = flat[offset : offset + n].detach().view(shape)
            offset += n
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_close_columns(a: list[float], b: list[float], rtol: float, what: str) -> float:
    assert len(a) == len(b), (what, a, b)
    worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    assert worst <= rtol, f"{what}: max relative difference {worst:.3g} > {rtol}\n{a}\n{b}"
    return worst


# ----------------------------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    return alpaca_slice(tmp_path_factory.mktemp("data") / "alpaca64.json", N_ROWS)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist-train")


@pytest.fixture(scope="module")
def ddp(work, tiny_model_dir, data_path) -> Run:
    return train_cli(work / "ddp", recipe(tiny_model_dir, data_path, work / "ddp" / "run"), "cpu_gloo_ddp.yaml")


@pytest.fixture(scope="module")
def zero2(work, tiny_model_dir, data_path) -> Run:
    return train_cli(work / "zero2", recipe(tiny_model_dir, data_path, work / "zero2" / "run"), "cpu_gloo_zero2.yaml")


@pytest.fixture(scope="module")
def single(work, tiny_model_dir, data_path) -> Run:
    """One process, grad_accum doubled: the same global batch of 8 rows (state.step_rows is one global order)."""
    raw = recipe(tiny_model_dir, data_path, work / "single" / "run", train={"grad_accum": ACCUM * WORLD})
    return train_cli(work / "single", raw, None)


@pytest.fixture(scope="module")
def zero2_resumed(work, zero2, tiny_model_dir, data_path) -> Run:
    """The zero2 run's step-2 checkpoint in a new run folder, rerun with train.max_steps=4: it must resume."""
    run_dir = work / "zero2-resumed" / "run"
    shutil.copytree(zero2.dir / "checkpoints" / "step-2", run_dir / "checkpoints" / "step-2")
    (run_dir / "checkpoints" / "latest").write_text("step-2\n")
    raw = recipe(tiny_model_dir, data_path, run_dir)
    return train_cli(work / "zero2-resumed", raw, "cpu_gloo_zero2.yaml", "train.max_steps=4")


@pytest.fixture(scope="module")
def qlora_ddp(work, tiny_model_dir, data_path) -> Run:
    raw = recipe(
        tiny_model_dir, data_path, work / "qlora-ddp" / "run", model={"quantization": "nf4"}, train={"max_steps": 2}
    )
    return train_cli(work / "qlora-ddp", raw, "cpu_gloo_ddp.yaml")


@pytest.fixture(scope="module")
def qlora_zero2(work, tiny_model_dir, data_path) -> Run:
    """QLoRA under ZeRO-2 in bf16 (the GPU setting): DeepSpeed keeps bf16 copies in the module, fp32 masters
    in its partitions."""
    raw = recipe(
        tiny_model_dir,
        data_path,
        work / "qlora-zero2" / "run",
        model={"quantization": "nf4", "dtype": "bf16"},
        train={"max_steps": 2},
    )
    return train_cli(work / "qlora-zero2", raw, "cpu_gloo_zero2.yaml")


LAUNCHES = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED"}


# ----------------------------------------------------------------------------------------------- tests
@slow
@pytest.mark.parametrize("name", LAUNCHES)
def test_both_ranks_run_and_know_the_world(name, request):
    run: Run = request.getfixturevalue(name)
    s = run.summary
    assert (s["world_size"], s["rank"], s["distributed_type"], s["backend"]) == (WORLD, 0, LAUNCHES[name], "gloo")
    assert s["zero_stage"] == (2 if name == "zero2" else 0)
    launch = "DDP (gloo)" if name == "ddp" else "DeepSpeed ZeRO-2 (gloo)"
    assert f"; {WORLD} processes, {launch}, device cpu" in run.out
    for ckpt in sorted((run.dir / "checkpoints").glob("step-*")):
        # Each rank writes rng/rank-{its own process_index}.json: two files = two ranks, each knowing its rank
        # (with the accelerate-on-CPU bug every rank was "process 0 of 1" and wrote rank-0.json).
        assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0.json", "rank-1.json"]
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert (state["world_size"], state["distributed_type"]) == (WORLD, LAUNCHES[name])
    if name == "zero2":  # each rank's own optimizer wrote its partition count and its data-parallel world
        ckpt = run.dir / "checkpoints" / "step-2"
        for shard in zero_shards(ckpt):
            assert load_ds(shard)["optimizer_state_dict"]["partition_count"] == [WORLD]
        model_states = load_ds(ckpt / "accelerate" / "pytorch_model" / "mp_rank_00_model_states.pt")
        assert model_states["dp_world_size"] == WORLD and model_states["global_steps"] == 2


@slow
@pytest.mark.parametrize("name", LAUNCHES)
def test_one_epoch_trains_on_every_sample_once(name, request):
    run: Run = request.getfixturevalue(name)
    s = run.summary
    n_train = s["data"]["train"]["samples"]
    assert s["samples_seen"] == n_train  # summed over ranks; a duplicated or dropped sample would show
    assert s["epochs_completed"] == 1 and s["steps"] == math.ceil(s["data"]["train"]["rows"] / (MICRO * ACCUM * WORLD))
    assert s["target_tokens_seen"] == s["data"]["train"]["target_tokens"]
    assert s["tokens_seen"] == s["data"]["train"]["tokens"]
    assert int(run.train_rows()[-1]["samples_seen"]) == n_train


@slow
@pytest.mark.parametrize("name", LAUNCHES)
def test_only_rank0_writes_run_files(name, request):
    run: Run = request.getfixturevalue(name)
    assert sorted(p.name for p in run.dir.iterdir()) == [
        ".trainer-run",
        "adapter",
        "checkpoints",
        "config.yaml",
        "metrics.csv",
        "run_summary.json",
        "tensorboard",
    ]
    lines = (run.dir / "metrics.csv").read_text().splitlines()
    assert sum(line.startswith("step,") for line in lines) == 1
    steps = run.summary["steps"]
    assert [int(r["step"]) for r in run.train_rows()] == list(range(1, steps + 1))
    assert [int(r["step"]) for r in run.metrics() if r["eval_loss"]] == [4, steps]
    assert len(list((run.dir / "tensorboard").iterdir())) == 1
    saves = [2, 4, 6, steps]
    assert sorted(int(p.name[5:]) for p in (run.dir / "checkpoints").glob("step-*")) == saves
    # rank 0 alone logs: each message once
    assert run.out.count("checkpoint: ") == len(saves) and run.out.count("\ntrain: ") == 1


@slow
def test_ddp_matches_one_process_with_the_same_global_batch(ddp, single):
    s1, s2 = single.summary, ddp.summary
    assert (s1["world_size"], s1["distributed_type"]) == (1, "NO")
    assert s1["steps"] == s2["steps"] and s1["samples_seen"] == s2["samples_seen"]
    assert_close_columns(ddp.column("loss"), single.column("loss"), LOSS_RTOL, "loss")
    assert_close_columns(ddp.column("grad_norm"), single.column("grad_norm"), LOSS_RTOL, "grad_norm")
    ev = lambda run: [float(r["eval_loss"]) for r in run.metrics() if r["eval_loss"]]  # noqa: E731
    assert_close_columns(ev(ddp), ev(single), LOSS_RTOL, "eval_loss")
    # token accuracy: correct-target counts summed over ranks, like the loss (counts: equal, not just close)
    assert ddp.column("token_accuracy") == single.column("token_accuracy")
    acc = lambda run: [r["eval_token_accuracy"] for r in run.metrics() if r["eval_loss"]]  # noqa: E731
    assert acc(ddp) == acc(single) and all(acc(single))
    assert max_abs_diff(ddp.adapter(), single.adapter()) <= WEIGHT_ATOL
    assert max(single.column("grad_norm")) > 0.5  # clipping (max_grad_norm 0.5) was active


@slow
def test_zero2_matches_ddp(ddp, zero2):
    """Same recipe: DeepSpeed's accumulation, gradient averaging and clipping do what the DDP path does."""
    assert_close_columns(zero2.column("loss"), ddp.column("loss"), LOSS_RTOL, "loss")
    assert_close_columns(zero2.column("grad_norm"), ddp.column("grad_norm"), LOSS_RTOL, "grad_norm")
    assert max_abs_diff(zero2.adapter(), ddp.adapter()) <= WEIGHT_ATOL
    for step in (2, 4):  # the checkpoints' adapters too
        where = f"checkpoints/step-{step}/adapter"
        assert max_abs_diff(zero2.adapter(where), ddp.adapter(where)) <= WEIGHT_ATOL


@slow
def test_zero2_partitions_the_optimizer(zero2, ddp):
    ckpt = zero2.dir / "checkpoints" / f"step-{zero2.summary['steps']}"
    shards = zero_shards(ckpt)
    assert [p.name for p in shards] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)]
    adapter = zero2.adapter()
    n_trainable = sum(t.numel() for t in adapter.values())
    owned = []
    for shard in shards:
        sd = load_ds(shard)["optimizer_state_dict"]
        numel = sum(t.numel() for t in sd["single_partition_of_fp32_groups"])
        assert n_trainable / WORLD <= numel <= n_trainable / WORLD + 64, (numel, n_trainable)  # + alignment padding
        owned.append({name for m in sd["param_slice_mappings"] for name in m})
    # Together the shards hold every trainable tensor (a tensor cut at the boundary appears in both).
    assert {n.replace(".default", "") for n in set().union(*owned)} == set(adapter)
    # Exactly the final adapter: the fp32 masters in the shards are what was saved.
    assert max_abs_diff(fp32_masters(ckpt), adapter) == 0.0
    # One rank's shard (fp32 master + 2 Adam moments of half the weights) is smaller than DDP's whole optimizer.bin.
    ddp_optimizer = ddp.dir / "checkpoints" / f"step-{ddp.summary['steps']}" / "accelerate" / "optimizer.bin"
    assert all(p.stat().st_size < ddp_optimizer.stat().st_size for p in shards)


@slow
def test_zero2_checkpoint_resumes_under_zero2(zero2_resumed, zero2):
    assert f"resume: from {zero2_resumed.dir / 'checkpoints' / 'step-2'} at step 2" in zero2_resumed.out
    s = zero2_resumed.summary
    assert s["steps"] == 4 and s["steps_this_session"] == 2 and s["distributed_type"] == "DEEPSPEED"
    # Steps 3 and 4 and the final weights equal those of the uninterrupted run.
    assert [int(r["step"]) for r in zero2_resumed.train_rows()] == [3, 4]
    assert_close_columns(zero2_resumed.column("loss"), zero2.column("loss")[2:4], LOSS_RTOL, "loss")
    assert_close_columns(zero2_resumed.column("grad_norm"), zero2.column("grad_norm")[2:4], LOSS_RTOL, "grad_norm")
    # Measured: bit-identical (same world size, same reduction order); the bound is the one asked for.
    assert max_abs_diff(zero2_resumed.adapter(), zero2.adapter("checkpoints/step-4/adapter")) <= 1e-6
    assert (
        max_abs_diff(
            fp32_masters(zero2_resumed.dir / "checkpoints" / "step-4"),
            fp32_masters(zero2.dir / "checkpoints" / "step-4"),
        )
        <= 1e-6
    )


@slow
def test_zero2_whole_optimizer_state_equals_the_shards(zero2):
    """full_optimizer.safetensors (written by rank 0 from DeepSpeed's gathered fragments) holds exactly the fp32
    masters of the shards, and the AdamW moments and step of the partitions, by parameter name."""
    from safetensors.torch import load_file

    ckpt = zero2.dir / "checkpoints" / "step-4"
    full = load_file(ckpt / "full_optimizer.safetensors")
    masters = fp32_masters(ckpt)
    assert {k.split("/", 1)[1].replace(".default", "") for k in full} == set(masters)
    for name, value in masters.items():
        key = [k for k in full if k.startswith("master/") and k[7:].replace(".default", "") == name][0]
        assert torch.equal(full[key], value), name
    shards = [load_ds(p)["optimizer_state_dict"] for p in zero_shards(ckpt)]
    shapes = load_ds(ckpt / "accelerate" / "pytorch_model" / "mp_rank_00_model_states.pt")["param_shapes"]
    for moment in ("exp_avg", "exp_avg_sq"):
        for group, group_shapes in enumerate(shapes):
            flat = torch.cat([sd["base_optimizer_state"]["state"][group][moment] for sd in shards])
            offset = 0
            for name, shape in group_shapes.items():
                n = math.prod(shape)
                assert torch.equal(full[f"{moment}/{name}"], flat[offset : offset + n].view(shape)), (moment, name)
                offset += n
    assert {float(v) for k, v in full.items() if k.startswith("step/")} == {4.0}


@slow
def test_qlora_under_ddp(qlora_ddp):
    s = qlora_ddp.summary
    assert (s["world_size"], s["distributed_type"], s["steps"]) == (WORLD, "MULTI_CPU", 2)
    assert "4-bit NF4 base" in qlora_ddp.out
    assert all(math.isfinite(x) for x in qlora_ddp.column("loss")) and math.isfinite(s["final_loss"])
    assert qlora_ddp.adapter()


@slow
def test_qlora_under_zero2_bf16_saves_the_exact_fp32_adapter(qlora_zero2):
    s = qlora_zero2.summary
    assert (s["world_size"], s["distributed_type"], s["zero_stage"], s["steps"]) == (WORLD, "DEEPSPEED", 2, 2)
    assert "4-bit NF4 base" in qlora_zero2.out
    assert all(math.isfinite(x) for x in qlora_zero2.column("loss"))
    ckpt = qlora_zero2.dir / "checkpoints" / "step-2"
    assert [p.name for p in zero_shards(ckpt)] == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(WORLD)
    ]
    masters = fp32_masters(ckpt)
    for where in ("adapter", "checkpoints/step-2/adapter"):
        adapter = qlora_zero2.adapter(where)
        assert {t.dtype for t in adapter.values()} == {torch.float32}
        assert max_abs_diff(adapter, masters) == 0.0
    # ... and not the module's bf16 copies (what saving the unwrapped model wrote before).
    adapter = qlora_zero2.adapter()
    assert any(not torch.equal(t, t.bfloat16().float()) for t in adapter.values())


# ----------------------------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("n_rows,micro,accum", [(51, 2, 2), (64, 2, 2), (13, 4, 1), (5, 1, 3)])
def test_micro_batches_split_one_global_order_by_rank(n_rows, micro, accum):
    """Over an epoch at world 2, every sample is on exactly one rank exactly once, and each step's samples are those
    of one process with grad_accum * 2 (the same global batch). Packed rows hold several samples each."""
    import datasets

    from trainer.config import recipe_from_dict
    from trainer.loop import advance, make_plan, micro_batches
    from trainer.state import TrainState

    sids = [[3 * i, 3 * i + 1] if i % 3 else [3 * i] for i in range(n_rows)]  # 1 or 2 samples per row
    rows = datasets.Dataset.from_dict(
        {
            "input_ids": [[5] * (1 + i % 7) for i in range(n_rows)],
            "labels": [[5] * (1 + i % 7) for i in range(n_rows)],
            "position_ids": [list(range(1 + i % 7)) for i in range(n_rows)],
            "sample_ids": sids,
        }
    )
    every = sorted(s for row in sids for s in row)

    def epoch(world: int, grad_accum: int) -> list[list[list[int]]]:
        r = recipe_from_dict(
            tiny_recipe(
                Path("m"),
                Path("d.json"),
                Path("o"),
                train={"micro_batch_size": micro, "grad_accum": grad_accum, "max_steps": None, "seed": 7},
            )
        )
        plan = make_plan(n_rows, r, world)
        state, steps = TrainState(data_seed=7), []
        while state.epoch == 0:
            per_rank = [micro_batches(rows, state, plan, r, world, rank, pad_id=0)[1] for rank in range(world)]
            steps.append(per_rank)
            advance(state, plan, samples=0, tokens=0, targets=0)
        return steps

    two, one = epoch(WORLD, accum), epoch(1, accum * WORLD)
    assert len(two) == len(one) == math.ceil(n_rows / (micro * accum * WORLD))
    seen = [s for step in two for ids in step for s in ids]
    assert sorted(seen) == every  # each sample once, none dropped
    for (r0, r1), (alone,) in zip(two, one):
        assert not set(r0) & set(r1)
        assert sorted(r0 + r1) == sorted(alone)


def test_resume_topology_rule():
    from trainer.train import resume_topology_problem

    def now(kind, n):
        return {"distributed_type": kind, "world_size": n}

    ds2 = {"distributed_type": "DEEPSPEED", "world_size": 2}
    ddp2 = {"distributed_type": "MULTI_CPU", "world_size": 2}
    assert resume_topology_problem(ds2, now("DEEPSPEED", 2)) is None
    assert resume_topology_problem(ddp2, now("NO", 1)) is None  # whole optimizer state: any world size
    assert resume_topology_problem(ddp2, now("MULTI_GPU", 8)) is None
    assert resume_topology_problem({"step": 3}, now("DEEPSPEED", 4)) is None  # old checkpoint: no record
    for other in (now("DEEPSPEED", 4), now("NO", 1), now("MULTI_CPU", 2)):
        assert resume_topology_problem(ds2, other, full_state=True) is None  # whole state: any layout
        msg = resume_topology_problem(ds2, other)  # only the ZeRO shards
        assert msg and "\n" not in msg and "--num_processes 2" in msg and "no full_optimizer.safetensors" in msg
    assert resume_topology_problem(ddp2, now("DEEPSPEED", 2)) is None  # AdamW from accelerate's files
    msg = resume_topology_problem(ddp2, now("DEEPSPEED", 2), optimizer="adamw_8bit")
    assert msg and "without DeepSpeed" in msg and "8-bit" in msg


@slow
def test_estimator_bytes_match_the_real_zero2_run(zero2, tiny_model_dir):
    """`trainer estimate`'s parameter, gradient and optimizer counts equal what the 2-process ZeRO-2 run allocated."""
    from trainer.config import load_recipe
    from trainer.estimate import estimate, load_model_config, zero2_partition_numel

    ckpt = zero2.dir / "checkpoints" / f"step-{zero2.summary['steps']}"
    adapter = zero2.adapter()
    n_trainable = sum(t.numel() for t in adapter.values())
    recipe = load_recipe(zero2.dir / "config.yaml")
    est = estimate(recipe, load_model_config(str(tiny_model_dir)), gpus=WORLD, gpu_mem_gib=1.0, zero_stage=2)
    assert est.trainable_weights == n_trainable * 4  # LoRA weights in fp32, whole on every rank
    for shard in zero_shards(ckpt):
        sd = load_ds(shard)["optimizer_state_dict"]
        numel = sum(t.numel() for t in sd["single_partition_of_fp32_groups"])
        assert numel == zero2_partition_numel(n_trainable, WORLD)
        state = sd["base_optimizer_state"]["state"]
        adam_bytes = sum(
            t.numel() * t.element_size() for s in state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")
        )
        assert adam_bytes == est.optimizer_states  # 2 fp32 moments of this rank's partition
