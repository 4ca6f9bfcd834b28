"""LoRA variants (trainer/model.py: `lora_config`, `loftq_init`; LoRA+ in trainer/optim.py), each trained on a tiny
Llama on CPU through `trainer.train.run` and checked for:

* training: the loss falls and the adapter moves away from its initial values;
* saving: the adapter folder says which variant it is and holds its extra weights;
* resume: a copy of the run cut back to its step-2 checkpoint (what a kill right after that save leaves) and
  resumed ends bit-identical to the uninterrupted run (adapter and every metrics row);
* merge: `trainer merge`'s model, read back from disk, gives the logits of base + adapter within 1e-4; for PiSSA
  and OLoRA (which change the base weights at init) the adapter merged into the ORIGINAL base gives the logits of
  the model that was trained (residual base + trained adapter), and for LoftQ the adapter merged into the
  de-quantized NF4 base gives the logits of the 4-bit model it was trained on.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_recipe, write_jsonl
from trainer import checkpoint
from trainer.config import LoraArgs, TrainArgs, recipe_from_dict
from trainer.errors import UserError

MERGE_TOL = 1e-4
TIMING = {"tokens_per_s", "target_tokens_per_s", "mem_gib", "elapsed_s", "tflops", "mfu"}

VARIANTS = {
    "dora": ({"use_dora": True}, {}),
    "rslora": ({"use_rslora": True}, {}),
    "gaussian": ({"init": "gaussian"}, {}),
    "pissa": ({"init": "pissa"}, {}),
    "olora": ({"init": "olora"}, {}),
    "loftq": ({"init": "loftq"}, {"model": {"quantization": "nf4"}}),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, {}),
    "loraplus": ({}, {"train": {"loraplus_lr_ratio": 16.0}}),
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Add {a} and {b}."}, {"role": "assistant", "content": str(a + b)}]}
        for a, b in zip(range(1, 90, 3), range(70, 0, -2))
    ]
    return write_jsonl(tmp_path_factory.mktemp("data") / "sums.jsonl", rows)


def make_recipe(model_dir, data_file, out: Path, lora: dict, extra: dict):
    sections = {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", **lora},
        "data": {"max_seq_len": 64, "val_fraction": 0.1},
        "train": {"max_steps": 6, "save_every": 2, "eval_every": 3, "log_every": 1, "lr": 5e-3, "keep_last": 5},
    }
    for name, values in extra.items():
        sections[name] = {**sections.get(name, {}), **values}
    return recipe_from_dict(tiny_recipe(model_dir, data_file, out, **sections))


def train(recipe) -> dict:
    from trainer import train as train_module
    from trainer.sweep import reset_accelerate_state

    reset_accelerate_state()
    return train_module.run(recipe, show_progress=False)


def metric_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]


def cut_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of a finished run as a kill right after the step-`step` checkpoint leaves it."""
    shutil.copytree(src, dst)
    for c in checkpoint.list_checkpoints(dst):
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)
    (dst / "checkpoints" / "latest").write_text(f"step-{step}\n")
    for name in ("adapter", "run_summary.json"):
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


def check_logits(run_dir: Path, recipe):
    """(logits of the merged model read back from RUN_DIR/merged, of base + adapter, check inputs)."""
    from trainer.artifacts import tokenizer_of
    from trainer.merge import check_inputs, logits_of
    from trainer.model import load_base, load_tuned
    from trainer.run_dir import RunDir

    run = RunDir(run_dir)
    inputs = check_inputs(tokenizer_of(run, recipe), "cpu")
    merged = load_base(
        type(recipe.model)(name_or_path=str(run.merged), dtype="fp32"), dtype=torch.float32, quantize=False
    ).eval()
    tuned = load_tuned(recipe, run.adapter, device_map={"": "cpu"})
    return logits_of(merged, inputs), logits_of(tuned, inputs), inputs


def trained_model_logits(run_dir: Path, recipe, inputs) -> torch.Tensor:
    """The model as it was trained: the recipe's model built again (PiSSA/OLoRA residual base, LoftQ 4-bit base)
    with the trainable weights of the final checkpoint."""
    from trainer.merge import logits_of
    from trainer.model import build_model

    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, recipe.lora, log=lambda m: None)
    ckpt = checkpoint.list_checkpoints(run_dir)[0]
    state = load_file(ckpt / "accelerate" / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(not p.requires_grad for n, p in model.named_parameters() if n in missing)
    return logits_of(model.eval(), inputs)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_saves_resumes_and_merges(variant, tiny_model_dir, data_file, tmp_path):
    from trainer.merge import merge_run

    lora, extra = VARIANTS[variant]
    recipe = make_recipe(tiny_model_dir, data_file, tmp_path / "ref", lora, extra)
    summary = train(recipe)
    ref = tmp_path / "ref"
    rows = metric_rows(ref)
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses

    # saving: the adapter says what it is and holds the variant's weights
    config = json.loads((ref / "adapter" / "adapter_config.json").read_text())
    weights = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert summary["adapter_bytes"] == (ref / "adapter" / "adapter_model.safetensors").stat().st_size
    if variant == "dora":
        assert config["use_dora"] and any("lora_magnitude_vector" in k for k in weights)
    if variant == "rslora":
        assert config["use_rslora"]
    if variant in ("pissa", "olora"):  # converted for the original base: rank 2r, init flag reset
        assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
        assert all(v.shape[0] == 8 for k, v in weights.items() if "lora_A" in k)
        assert (ref / "initial_adapter" / "adapter_config.json").is_file()
    if variant == "modules_to_save":
        assert config["modules_to_save"] and any("embed_tokens" in k or "lm_head" in k for k in weights)
    if variant == "loraplus":
        assert "loraplus" not in json.dumps(config)  # an optimizer setting: the adapter is a plain LoRA

    # resume: cut back to step 2 and train on; bit-identical to the uninterrupted run
    cut = cut_back(ref, tmp_path / "cut", 2)
    train(make_recipe(tiny_model_dir, data_file, cut, lora, extra))
    got, want = load_file(cut / "adapter" / "adapter_model.safetensors"), weights
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert metric_rows(cut) == rows

    # merge: read back from disk, equal to base + adapter
    report = merge_run(ref, log=lambda m: None)
    assert report["max_abs_diff_merged_vs_adapter"] < MERGE_TOL
    merged, tuned, inputs = check_logits(ref, recipe)
    assert float((merged - tuned).abs().max()) < MERGE_TOL
    if variant in ("pissa", "olora"):
        trained = trained_model_logits(ref, recipe, inputs)
        assert float((merged - trained).abs().max()) < MERGE_TOL
    if variant == "loftq":
        # bitsandbytes' CPU 4-bit matmul rounds like bf16 (measured: ~0.5% of a layer's output), so the 4-bit model
        # that was trained differs from ANY float model by that much. The merge into the de-quantized base is within
        # that kernel error of it (measured on the base alone), and far closer than a merge into the original base,
        # which would count the quantization error twice.
        from trainer.merge import logits_of
        from trainer.model import load_base

        trained = trained_model_logits(ref, recipe, inputs)
        q = logits_of(load_base(recipe.model, dtype=torch.float32, quantize=True).eval(), inputs)
        deq = logits_of(
            load_base(recipe.model, dtype=torch.float32, quantize=True).dequantize(dtype=torch.float32).eval(), inputs
        )
        kernel = float((q - deq).abs().max())
        naive = float((naive_merge_logits(ref, recipe, inputs) - trained).abs().max())
        got = float((merged - trained).abs().max())
        assert got <= 2 * kernel and got < naive / 5, (got, kernel, naive)


def naive_merge_logits(run_dir: Path, recipe, inputs) -> torch.Tensor:
    """The LoftQ adapter on the ORIGINAL (not de-quantized) base: what a merge that ignored LoftQ would ship."""
    from peft import PeftModel

    from trainer.merge import logits_of
    from trainer.model import load_base

    base = load_base(recipe.model, dtype=torch.float32, quantize=False)
    return logits_of(PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval(), inputs)


# ----------------------------------------------------------------------------------------------- fast checks
def test_variants_reach_peft(tiny_model_dir):
    """Each recipe key lands in peft's config and model: rsLoRA's scale, DoRA's magnitudes, Gaussian A's std."""
    from trainer.config import ModelArgs
    from trainer.model import apply_lora, load_base

    def build(**lora):
        base = load_base(ModelArgs(name_or_path=str(tiny_model_dir)), dtype=torch.float32, quantize=False)
        torch.manual_seed(0)
        return apply_lora(base, LoraArgs(r=16, alpha=8, dropout=0.0, **lora))

    q = lambda m: m.base_model.model.model.layers[0].self_attn.q_proj  # noqa: E731
    assert q(build()).scaling["default"] == pytest.approx(8 / 16)
    assert q(build(use_rslora=True)).scaling["default"] == pytest.approx(8 / 16**0.5)
    assert "default" in q(build(use_dora=True)).lora_magnitude_vector
    a = q(build(init="gaussian")).lora_A["default"].weight
    assert float(a.detach().std()) == pytest.approx(1 / 16, rel=0.1)  # peft: A ~ N(0, 1/r)
    a = q(build()).lora_A["default"].weight  # default: Kaiming-uniform with a=sqrt(5): bound 1/sqrt(fan_in)
    a = a.detach()
    assert float(a.abs().max()) <= 1 / 64**0.5 and float(a.std()) == pytest.approx(1 / (3 * 64) ** 0.5, rel=0.1)
    pissa = build(init="pissa")
    w = q(pissa).get_base_layer().weight
    original = load_base(ModelArgs(name_or_path=str(tiny_model_dir)), dtype=torch.float32, quantize=False)
    w0 = original.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(w + q(pissa).get_delta_weight("default"), w0, atol=1e-5, rtol=0)  # W = W_res + BA


def test_loftq_init_shrinks_the_quantization_error(tiny_model_dir):
    import bitsandbytes as bnb

    from trainer.config import ModelArgs
    from trainer.model import apply_lora, load_base, loftq_init

    base = load_base(ModelArgs(name_or_path=str(tiny_model_dir)), dtype=torch.float32, quantize=True)
    model = apply_lora(base, LoraArgs(r=8, alpha=32, dropout=0.0, init="loftq"))  # scale 4: B is divided by it
    assert loftq_init(model, str(tiny_model_dir), log=lambda m: None) == 14
    original = load_file(tiny_model_dir / "model.safetensors")
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and name.endswith("q_proj"):
            w = module.get_base_layer().weight
            nf4 = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
            w0 = original[name.removeprefix("base_model.model.") + ".weight"].float()
            before, after = (w0 - nf4).norm(), (w0 - nf4 - module.get_delta_weight("default")).norm()
            assert after < 0.95 * before, (name, float(before), float(after))


def test_loraplus_groups_follow_the_schedule(tiny_model_dir):
    """B matrices at lr * ratio, A at lr, at every step of the schedule (set_lr keeps each group's ratio)."""
    from trainer.config import ModelArgs
    from trainer.model import apply_lora, load_base
    from trainer.optim import build_optimizer, set_lr

    model = apply_lora(
        load_base(ModelArgs(name_or_path=str(tiny_model_dir)), dtype=torch.float32, quantize=False),
        LoraArgs(r=4, dropout=0.0),
    )
    opt = build_optimizer(model, TrainArgs(lr=1e-3, loraplus_lr_ratio=16.0))
    names = {id(p): n for n, p in model.named_parameters()}
    for lr in (1e-3, 2.5e-4):
        set_lr(opt, lr)
        for group in opt.param_groups:
            for p in group["params"]:
                want = lr * (16.0 if "lora_B" in names[id(p)] else 1.0)
                assert group["lr"] == pytest.approx(want, rel=1e-12), names[id(p)]
    assert {n for g in opt.param_groups for n in (names[id(p)] for p in g["params"])} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    plain = build_optimizer(model, TrainArgs(lr=1e-3))
    set_lr(plain, 5e-4)
    assert all(g["lr"] == 5e-4 for g in plain.param_groups)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"lora": {"init": "loftq"}}, "lora.init=loftq is for QLoRA; set model.quantization: nf4"),
        ({"lora": {"init": "pissa", "use_dora": True}}, "lora.init=pissa with lora.use_dora"),
        ({"lora": {"init": "olora", "modules_to_save": ["lm_head"]}}, "lora.init=olora with lora.modules_to_save"),
        ({"lora": {"init": "pissa"}, "model": {"quantization": "nf4"}}, "lora.init=pissa with model.quantization=nf4"),
        ({"lora": {"init": "loftq", "use_dora": True}, "model": {"quantization": "nf4"}}, "lora.init=loftq with"),
        ({"lora": None, "train": {"loraplus_lr_ratio": 16}}, "train.loraplus_lr_ratio needs LoRA"),
        ({"lora": {"init": "kaiming"}}, "lora.init='kaiming' is not valid; expected one of default|gaussian"),
        ({"lora": {"modules_to_save": []}}, "lora.modules_to_save is an empty list"),
    ],
)
def test_unsupported_combinations_are_refused_in_one_line(tiny_model_dir, data_file, tmp_path, sections, message):
    raw = tiny_recipe(tiny_model_dir, data_file, tmp_path / "x")
    for name, values in sections.items():
        raw[name] = None if values is None else {**(raw.get(name) or {}), **values}
    with pytest.raises(UserError) as err:
        recipe_from_dict(raw, "r.yaml")
    assert len(str(err.value).splitlines()) == 1 and message in str(err.value)
