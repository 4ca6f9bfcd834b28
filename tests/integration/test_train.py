"""The real `trainer train` on a tiny Llama: exact files written, loss falls, QLoRA, full fine-tune,
adapter reload, gradient-accumulation invariance."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ALPACA, alpaca_slice, run_train, tiny_recipe
from trainer.config import recipe_from_dict
from trainer.tracking import read_metrics

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.slow
def test_lora_run_on_alpaca_loss_falls_and_writes_layout(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    raw = tiny_recipe(
        tiny_model_dir,
        ALPACA,
        run_dir,
        data={"max_seq_len": 128, "val_fraction": 0.05},
        train={
            "max_steps": 30,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 3e-2,
            "eval_every": 10,
            "save_every": 10,
            "keep_last": 2,
            "log_every": 1,
        },
    )
    run_train(raw, tmp_path)
    # Exact layout
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".trainer-run",
        "adapter",
        "checkpoints",
        "config.yaml",
        "metrics.csv",
        "run_summary.json",
        "tensorboard",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-20", "step-30"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-30"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = run_dir / "checkpoints" / "step-30"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert "accelerate/model.safetensors" in manifest and "trainer_state.json" in manifest
    # LoRA checkpoints hold only the trainable tensors, not the frozen base.
    saved = load_file(ckpt / "accelerate" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    # Metrics: one train row per step, eval rows at 10/20/30; the loss fell.
    rows = read_metrics(run_dir / "metrics.csv")
    train_rows = [r for r in rows if r["loss"]]
    eval_rows = [r for r in rows if r["eval_loss"]]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 31))
    assert [int(r["step"]) for r in eval_rows] == [10, 20, 30]
    losses = [float(r["loss"]) for r in train_rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)  # measured on tests/datagen.py's rows: 7.952 -> 7.003
    assert float(eval_rows[-1]["eval_loss"]) < float(eval_rows[0]["eval_loss"])
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == 30 and summary["world_size"] == 1 and summary["samples_seen"] > 0
    assert summary["final_loss"] == pytest.approx(losses[-1], abs=1e-5)
    for key in ("distributed_type", "tokens_seen", "train_wall_s", "tokens_per_s", "peak_mem_gib"):
        assert key in summary
    # The adapter reloads with peft and gives the same logits as the trained weights in the checkpoint.
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    x = torch.randint(3, 500, (2, 24))
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter"
    ).eval()
    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    missing = trained.load_state_dict(saved, strict=False)
    assert not missing.unexpected_keys
    with torch.no_grad():
        a, b = reloaded(x).logits, trained.eval()(x).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(x).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - base).abs().max() > 1e-3  # and training did change the model


@pytest.mark.slow
def test_qlora_nf4_runs_on_cpu(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "qlora"
    raw = tiny_recipe(
        tiny_model_dir,
        ALPACA,
        run_dir,
        model={"quantization": "nf4", "gradient_checkpointing": True},
        train={"max_steps": 3, "save_every": 3, "eval_every": 3},
    )
    out = run_train(raw, tmp_path)
    assert "4-bit NF4 base" in out.stdout
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_full_finetune_changes_all_weights(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "full"
    raw = tiny_recipe(
        tiny_model_dir, ALPACA, run_dir, lora=None, train={"max_steps": 3, "save_every": 3, "eval_every": 3, "lr": 1e-3}
    )
    out = run_train(raw, tmp_path)
    assert "full fine-tune" in out.stdout
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), set(before) - set(changed)


def _one_step(model_dir, data_path, micro, accum, tmp_path):
    """Weights after one SGD step (lr=1: the update is the gradient) and the step loss."""
    from accelerate.state import AcceleratorState

    from trainer.data import prepare_data
    from trainer.distributed import build_accelerator
    from trainer.loop import make_plan, micro_batches, train_step
    from trainer.model import build_model
    from trainer.state import TrainState
    from trainer.tokenizer import load_tokenizer

    AcceleratorState._reset_state(True)
    recipe = recipe_from_dict(
        tiny_recipe(
            model_dir,
            data_path,
            tmp_path / "x",
            data={"val_fraction": 0.0, "packing": False},
            train={"micro_batch_size": micro, "grad_accum": accum},
        )
    )
    acc = build_accelerator(grad_accum=accum, mixed_precision="no", micro_batch_size=micro, max_grad_norm=0)
    tok = load_tokenizer(str(model_dir))
    data = prepare_data(recipe.data, tok, cache_root=tmp_path / "cache", log=lambda m: None)
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.lora, log=lambda m: None)
    for n, p in model.named_parameters():  # B starts at zero; give it values so every LoRA weight gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model, opt = acc.prepare(model, opt)
    plan = make_plan(len(data.train), recipe, 1)
    batches, ids = micro_batches(data.train, TrainState(data_seed=0), plan, recipe, 1, 0, tok.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = train_step(acc, model, opt, batches, max_grad_norm=0)
    grads = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, sorted(ids)


def test_accumulation_split_does_not_change_loss_or_gradient(tmp_path, tiny_model_dir):
    a_out, a_grads, a_ids = _one_step(tiny_model_dir, ALPACA, micro=1, accum=4, tmp_path=tmp_path)
    b_out, b_grads, b_ids = _one_step(tiny_model_dir, ALPACA, micro=4, accum=1, tmp_path=tmp_path)
    assert a_ids == b_ids and len(a_ids) == 4  # the same four samples
    assert a_out["loss"] == pytest.approx(b_out["loss"], rel=1e-6)
    assert a_out["grad_norm"] == pytest.approx(b_out["grad_norm"], rel=1e-5)
    for name in a_grads:
        torch.testing.assert_close(a_grads[name], b_grads[name], atol=1e-7, rtol=1e-4)


@pytest.mark.slow
def test_packing_off_groups_rows_by_length(tmp_path, tiny_model_dir):
    """Packing off: length grouping (the default) pads far less than a plain shuffle; the same rows train."""
    padding, seen = {}, {}
    for grouped in (True, False):
        run_dir = tmp_path / f"grouped-{grouped}"
        raw = tiny_recipe(
            tiny_model_dir,
            ALPACA,
            run_dir,
            model={"gradient_checkpointing": False},
            data={"max_seq_len": 256, "val_fraction": 0.0, "packing": False, "group_by_length": grouped},
            train={
                "epochs": 1,
                "max_steps": None,
                "micro_batch_size": 8,
                "grad_accum": 1,
                "log_every": 1000,
                "eval_every": 1000,
                "save_every": 1000,
            },
        )
        raw["data"]["path"] = str(alpaca_slice(tmp_path / "rows.json", 160))
        run_train(raw, tmp_path)
        [row] = [r for r in read_metrics(run_dir / "metrics.csv") if r["loss"]]  # one log row: the last step
        padding[grouped] = float(row["padding_frac"])
        summary = json.loads((run_dir / "run_summary.json").read_text())
        seen[grouped] = (summary["steps"], summary["tokens_seen"], summary["target_tokens_seen"])
    assert seen[True] == seen[False] and seen[True][0] == 20
    # Measured on the first 160 of tests/datagen.py's rows (~20 to 256+ tokens): 49.8% padding shuffled, 4.1%
    # grouped (the README's SmolLM2 run on Alpaca: 41% and 3.6%); the bounds leave room for other data or seeds.
    assert padding[False] > 0.3 and padding[True] < 0.1, padding


def test_summary_counts_parameters_and_bytes_and_metrics_carry_token_accuracy(tmp_path, tiny_model_dir):
    """run_summary.json: trainable/total parameters and share (the model's own count), the adapter's bytes on disk;
    metrics.csv: token accuracy per train row, and at eval the accuracy of the model as it is then (recomputed
    here from the saved adapter at the last step)."""
    from peft import PeftModel

    from tests.conftest import write_jsonl
    from trainer import train
    from trainer.data import prepare_data
    from trainer.loss import dataset_loss
    from trainer.model import count_parameters, load_base
    from trainer.tokenizer import load_tokenizer

    rows = [
        {"messages": [{"role": "user", "content": f"Add {a} and {b}."}, {"role": "assistant", "content": str(a + b)}]}
        for a, b in zip(range(40), range(40, 0, -1))
    ]
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    run_dir = tmp_path / "run"
    recipe = recipe_from_dict(
        tiny_recipe(tiny_model_dir, data, run_dir, data={"max_seq_len": 64, "val_fraction": 0.2}, train={"lr": 5e-3})
    )
    summary = train.run(recipe, show_progress=False)
    base = load_base(recipe.model, dtype=torch.float32, quantize=False)
    total = count_parameters(base)[0]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora = sum(t.numel() for t in adapter.values())
    assert (summary["trainable_params"], summary["total_params"]) == (lora, total + lora)
    assert summary["trainable_share"] == 100.0 * lora / (total + lora)  # percent, as the log line and the estimator
    assert summary["adapter_bytes"] == (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert summary["model_bytes"] is None
    on_disk = json.loads((run_dir / "run_summary.json").read_text())
    assert on_disk["trainable_params"] == lora and on_disk["adapter_bytes"] == summary["adapter_bytes"]

    metrics = read_metrics(run_dir / "metrics.csv")
    train_rows = [r for r in metrics if r["loss"]]
    assert len(train_rows) == 4 and all(0.0 <= float(r["token_accuracy"]) <= 1.0 for r in train_rows)
    last_eval = [r for r in metrics if r["eval_loss"]][-1]
    tok = load_tokenizer(str(run_dir / "adapter"))
    val = prepare_data(recipe.data, tok, log=lambda m: None).val
    tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    ev = dataset_loss(tuned, val, batch_size=recipe.train.eval_batch_size, pad_id=tok.pad_token_id, device="cpu")
    assert float(last_eval["eval_token_accuracy"]) == pytest.approx(ev["token_accuracy"], abs=1e-6)
    assert float(last_eval["eval_loss"]) == pytest.approx(ev["loss"], abs=1e-5)
    assert summary["final_eval_token_accuracy"] == pytest.approx(ev["token_accuracy"], abs=1e-12)
    assert summary["final_token_accuracy"] == pytest.approx(float(train_rows[-1]["token_accuracy"]), abs=1e-6)
