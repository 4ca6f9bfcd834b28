"""Real multi-process runs of `trainer.distributed.build_accelerator` on CPU:

* `accelerate launch --config_file accelerate_configs/cpu_gloo_zero2.yaml`: DeepSpeed ZeRO-2 over gloo,
* `accelerate launch --config_file accelerate_configs/cpu_gloo_ddp.yaml`: DDP over gloo,

2 processes each, a tiny Llama with a LoRA adapter, AdamW, 3 optimizer steps with gradient accumulation 2,
each rank on different data. Every rank writes a JSON; the tests check ranks, one main process, identical
parameters on both ranks (so gradients really were reduced), the ZeRO-2 optimizer partition (half the
trainable parameters per rank) and that DDP and ZeRO-2 end with the same weights (same loss scaling).
Plus quick in-process checks of how "auto" values in the DeepSpeed json are filled.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, accelerate_cmd, clean_env, run_bounded

TIMEOUT_S = 240
WORLD = 2
GRAD_ACCUM, MICRO_BATCH, STEPS, MAX_GRAD_NORM = 2, 4, 3, 0.5

pytest.importorskip("accelerate")
pytest.importorskip("deepspeed")
pytest.importorskip("peft")

WORKER = r"""
import hashlib, json, os, sys, time
t0 = time.time()
import torch
from trainer.distributed import build_accelerator, is_deepspeed, is_main, main_first, world_info, zero_stage

out_dir, GA, MBS, STEPS, MAX_NORM = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
acc = build_accelerator(grad_accum=GA, mixed_precision="no", micro_batch_size=MBS, max_grad_norm=MAX_NORM)

# main_first: rank 0 writes a marker first, the others must see it when they enter.
marker = os.path.join(out_dir, "main_first.marker")
with main_first(acc):
    saw_marker_on_entry = os.path.exists(marker)
    if acc.is_main_process:
        time.sleep(0.5)
        open(marker, "w").close()

from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
for name, p in model.named_parameters():  # lora_B starts at zero: give both A and B a gradient from step 1
    if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.02)
trainable = [p for p in model.parameters() if p.requires_grad]
n_trainable = sum(p.numel() for p in trainable)
init_sum = float(sum(p.detach().double().sum() for p in trainable))
optimizer = torch.optim.AdamW(trainable, lr=1e-2)
model, optimizer = acc.prepare(model, optimizer)  # no DataLoader: micro batch size comes from build_accelerator

g = torch.Generator().manual_seed(1234)
data = [torch.randint(0, 64, (MBS, 16), generator=g) for _ in range(STEPS * GA * acc.num_processes)]
grad_norms = []
for batch in data[acc.process_index::acc.num_processes]:  # each rank its own shard
    batch = batch.to(acc.device)
    with acc.accumulate(model):
        loss = model(input_ids=batch, labels=batch).loss
        acc.backward(loss)
        if acc.sync_gradients:
            norm = acc.clip_grad_norm_(acc.unwrap_model(model).parameters(), MAX_NORM)
            grad_norms.append(None if norm is None else float(norm))
        optimizer.step()
        optimizer.zero_grad()

params = torch.cat([p.detach().float().reshape(-1).cpu() for p in acc.unwrap_model(model).parameters()
                    if p.requires_grad])
info = dict(world_info(acc), is_main=acc.is_main_process, is_main_fn=is_main(acc), zero=zero_stage(acc),
            deepspeed=is_deepspeed(acc), saw_marker_on_entry=saw_marker_on_entry, n_trainable=n_trainable,
            init_sum=init_sum, param_sum=float(params.double().sum()),
            param_sha=hashlib.sha256(params.numpy().tobytes()).hexdigest(), params=params.tolist(),
            grad_norms=grad_norms, accelerator_grad_accum=acc.gradient_accumulation_steps)
if is_deepspeed(acc):
    engine = model
    info["partition_numel"] = sum(int(t.numel()) for t in engine.optimizer.single_partition_of_fp32_groups)
    info["zero_optimizer"] = type(engine.optimizer).__name__
    info["dp_world_size"] = engine.dp_world_size
    info["global_steps"] = engine.global_steps
    info["ds_config"] = {k: engine.config[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                      "gradient_accumulation_steps", "gradient_clipping")}
    info["ds_bf16"] = engine.bfloat16_enabled()
ckpt = os.path.join(out_dir, "state")
acc.save_state(ckpt, **({"exclude_frozen_parameters": True} if is_deepspeed(acc) else {}))
acc.wait_for_everyone()
info["state_files"] = sorted(os.path.relpath(os.path.join(r, f), ckpt) for r, _, fs in os.walk(ckpt) for f in fs)
info["wall_s"] = round(time.time() - t0, 2)
with open(os.path.join(out_dir, f"rank{acc.process_index}.json"), "w") as f:
    json.dump(info, f)
acc.end_training()
"""


def launch(config: str, tmp: Path) -> list[dict]:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    out = tmp / "out"
    out.mkdir()
    args = [script, out, GRAD_ACCUM, MICRO_BATCH, STEPS, MAX_GRAD_NORM]
    cmd = accelerate_cmd(f"accelerate_configs/{config}", *map(str, args))
    t0 = time.perf_counter()
    # CWD = repo root: the yaml's json path is relative
    res = run_bounded(cmd, cwd=ROOT, env=clean_env(), timeout=TIMEOUT_S)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, f"{config} failed (rc {res.returncode}):\n{res.stdout[-6000:]}"
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda d: d["rank"])
    assert len(ranks) == WORLD, f"expected {WORLD} rank files, got {len(ranks)}:\n{res.stdout[-4000:]}"
    for r in ranks:
        r["launch_wall_s"] = round(wall, 1)
    return ranks


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> list[dict]:
    return launch("cpu_gloo_zero2.yaml", tmp_path_factory.mktemp("zero2"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> list[dict]:
    return launch("cpu_gloo_ddp.yaml", tmp_path_factory.mktemp("ddp"))


def check_common(ranks: list[dict], distributed_type: str) -> None:
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]
    assert {r["rank"] for r in ranks} == {0, 1}
    assert {r["local_rank"] for r in ranks} == {0, 1}
    assert [r["is_main"] for r in ranks] == [True, False]  # exactly one writer: rank 0
    assert [r["is_main_fn"] for r in ranks] == [True, False]
    assert {r["distributed_type"] for r in ranks} == {distributed_type}
    assert {r["backend"] for r in ranks} == {"gloo"}
    assert all(r["num_nodes"] == 1 for r in ranks)
    assert all(r["accelerator_grad_accum"] == GRAD_ACCUM for r in ranks)
    assert ranks[1]["saw_marker_on_entry"] and not ranks[0]["saw_marker_on_entry"]  # main_first ordering
    # Same weights on both ranks after training on different data: gradients were reduced.
    assert ranks[0]["param_sha"] == ranks[1]["param_sha"]
    assert ranks[0]["param_sum"] != pytest.approx(ranks[0]["init_sum"], abs=1e-6)  # and training moved them
    assert len(ranks[0]["grad_norms"]) == STEPS and ranks[0]["grad_norms"] == ranks[1]["grad_norms"]
    assert all(n is not None and n > 0 for n in ranks[0]["grad_norms"])


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu_over_gloo(zero2_run):
    ranks = zero2_run
    check_common(ranks, "DEEPSPEED")
    for r in ranks:
        assert r["deepspeed"] and r["zero"] == 2 and r["zero_stage"] == 2
        assert r["zero_optimizer"] == "DeepSpeedZeroOptimizer"
        assert r["dp_world_size"] == WORLD
        assert r["global_steps"] == STEPS
        # "auto" values filled from build_accelerator's arguments, train_batch_size with the true world size.
        assert r["ds_config"] == {
            "train_batch_size": MICRO_BATCH * GRAD_ACCUM * WORLD,
            "train_micro_batch_size_per_gpu": MICRO_BATCH,
            "gradient_accumulation_steps": GRAD_ACCUM,
            "gradient_clipping": MAX_GRAD_NORM,
        }
        assert r["ds_bf16"] is False
        # ZeRO-2: this rank's fp32 optimizer partition is half the trainable parameters (plus alignment padding).
        n = r["n_trainable"]
        assert n / WORLD <= r["partition_numel"] <= n / WORLD + 32, (r["partition_numel"], n)
        # save_state: one model file, one optimizer shard per rank.
        files = r["state_files"]
        assert "pytorch_model/mp_rank_00_model_states.pt" in files
        assert {f"pytorch_model/zero_pp_rank_{i}_mp_rank_00_optim_states.pt" for i in range(WORLD)} <= set(files)
    assert sum(r["partition_numel"] for r in ranks) >= ranks[0]["n_trainable"]


@pytest.mark.slow
def test_ddp_on_cpu_over_gloo(ddp_run):
    ranks = ddp_run
    check_common(ranks, "MULTI_CPU")
    for r in ranks:
        assert not r["deepspeed"] and r["zero"] == 0
        assert "model.safetensors" in r["state_files"] and "optimizer.bin" in r["state_files"]


@pytest.mark.slow
def test_ddp_and_zero2_reach_the_same_weights(ddp_run, zero2_run):
    """Same model, data, optimizer: DeepSpeed's 1/grad_accum loss scaling + ZeRO-2 gradient averaging and
    clipping match accelerate's DDP path, step for step."""
    assert ddp_run[0]["grad_norms"] == pytest.approx(zero2_run[0]["grad_norms"], rel=1e-5)
    assert ddp_run[0]["params"] == pytest.approx(zero2_run[0]["params"], abs=1e-6)


@pytest.mark.slow
def test_plain_single_process(tmp_path):
    """`python script.py`: no launcher, one process, no process group."""
    code = (
        "from trainer.distributed import build_accelerator, world_info, is_main, main_first\n"
        "import json\n"
        "a = build_accelerator(grad_accum=2, mixed_precision='no', micro_batch_size=4, max_grad_norm=1.0)\n"
        "with main_first(a):\n"
        "    pass\n"
        "print(json.dumps({**world_info(a), 'is_main': is_main(a), 'ga': a.gradient_accumulation_steps}))\n"
    )
    res = run_bounded([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), timeout=120)
    assert res.returncode == 0, res.stdout[-4000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["world_size"] == 1 and info["rank"] == 0 and info["is_main"] and info["ga"] == 2
    assert info["distributed_type"] == "NO" and info["zero_stage"] == 0 and info["num_nodes"] == 1


# ------------------------------------------------------------------------------------- "auto" filling (in-process)
def zero2_json() -> dict:
    return json.loads((ROOT / "ds_configs" / "zero2.json").read_text())


def test_fill_deepspeed_config_fills_every_auto():
    from trainer.distributed import fill_deepspeed_config

    for name in ("zero2.json", "zero2_offload.json"):
        cfg = json.loads((ROOT / "ds_configs" / name).read_text())
        fill_deepspeed_config(
            cfg, grad_accum=4, mixed_precision="bf16", micro_batch_size=2, max_grad_norm=1.0, world_size=16
        )
        assert "auto" not in json.dumps(cfg), name
        assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 4
        assert cfg["train_batch_size"] == 2 * 4 * 16 and cfg["gradient_clipping"] == 1.0
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
        assert cfg["zero_optimization"]["stage"] == 2


def test_fill_deepspeed_config_refuses_disagreement():
    from trainer.distributed import fill_deepspeed_config
    from trainer.errors import UserError

    cfg = zero2_json()
    cfg["gradient_accumulation_steps"] = 8
    cfg["bf16"]["enabled"] = True
    with pytest.raises(UserError) as err:
        fill_deepspeed_config(
            cfg, grad_accum=4, mixed_precision="no", micro_batch_size=2, max_grad_norm=1.0, world_size=2
        )
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "gradient_accumulation_steps=8" in lines[0] and "bf16.enabled" in lines[1]
    # Explicit values that agree are fine; missing keys are added.
    cfg = {"zero_optimization": {"stage": 2}, "gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": 2}
    fill_deepspeed_config(
        cfg, grad_accum=1, mixed_precision="fp16", micro_batch_size=2, max_grad_norm=0.0, world_size=1
    )
    assert cfg["fp16"] == {"enabled": True} and cfg["bf16"] == {"enabled": False} and cfg["train_batch_size"] == 2


def test_accelerate_configs_point_at_existing_ds_json():
    import yaml

    for path in sorted((ROOT / "accelerate_configs").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        ds = cfg.get("deepspeed_config") or {}
        if cfg["distributed_type"] == "DEEPSPEED":
            assert (ROOT / ds["deepspeed_config_file"]).is_file(), path.name
            # With deepspeed_config_file, accelerate raises on these (DeepSpeedPlugin._deepspeed_config_checks).
            banned = {
                "gradient_accumulation_steps",
                "gradient_clipping",
                "zero_stage",
                "offload_optimizer_device",
                "offload_param_device",
                "zero3_save_16bit_model",
            }
            assert not banned & set(ds) and "mixed_precision" not in cfg, path.name
