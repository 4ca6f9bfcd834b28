"""bench/gpu_check.py's CPU parts: arguments, the recipe it trains, its data and tokenizer, the random model it
writes (on a small config here), and the comparison with `trainer estimate`. The GPU run itself is
bench/gpu_check.sh's job on a CUDA machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

from trainer.config import recipe_from_dict  # noqa: E402
from trainer.estimate import GiB, estimate  # noqa: E402


def test_arguments_and_their_limits(capsys):
    args = gpu_check.parse_args([])
    assert (args.steps, args.seq, args.micro_batch, args.grad_accum) == (20, 2048, 2, 1)
    assert args.model == "meta-llama/Llama-2-7b-hf" and args.optimizer == "paged_adamw_8bit"
    for bad in (["--steps", "0"], ["--model", "gpt2"], ["--attn", "xformers"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(bad)
        assert exc.value.code == 2
    assert "--model gpt2: not one of" in capsys.readouterr().err


def test_the_recipe_is_a_valid_qlora_recipe_of_the_asked_shape(tmp_path):
    args = gpu_check.parse_args(["--steps", "7", "--seq", "1024", "--attn", "sdpa"])
    raw = gpu_check.build_recipe(args, tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "run")
    recipe = recipe_from_dict(raw)  # the trainer's own validation
    assert (recipe.model.quantization, recipe.model.dtype, recipe.model.attn_implementation) == ("nf4", "bf16", "sdpa")
    assert recipe.model.gradient_checkpointing and recipe.lora.r == 16 and recipe.lora.target_modules == "all-linear"
    assert (recipe.train.max_steps, recipe.data.max_seq_len, recipe.train.micro_batch_size) == (7, 1024, 2)
    assert recipe.data.format == "text" and recipe.data.packing and recipe.data.val_fraction == 0.0
    assert recipe.train.optimizer == "paged_adamw_8bit" and recipe.train.save_every > 7


def test_data_and_tokenizer_give_enough_tokens(tmp_path):
    path = tmp_path / "d.jsonl"
    gpu_check.write_text_data(path, 20 * 2 * 2048)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    tok = gpu_check.train_tokenizer(texts)
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.chat_template
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert n_tokens >= 20 * 2 * 2048  # every step sees full packed rows


def test_random_model_is_written_loadable_and_of_the_config(tmp_path):
    config = gpu_check.model_config(
        "meta-llama/Llama-2-7b-hf",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=600,
    )
    tok = gpu_check.train_tokenizer(["alpha beta gamma delta"] * 50)
    gpu_check.make_random_model(config, tmp_path / "m", "cpu", tok)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 600
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and abs(float(w.detach().float().std()) - 0.02) < 0.002
    assert torch.equal(model.model.norm.weight.float(), torch.ones(64))
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_comparison_with_the_estimate_of_the_same_recipe(tmp_path):
    args = gpu_check.parse_args(["--attn", "sdpa"])
    raw = gpu_check.build_recipe(args, Path("model"), Path("d.jsonl"), Path("run"))
    est = estimate(recipe_from_dict(raw), gpu_check.model_config(args.model), gpus=1, gpu_mem_gib=139.8)
    allocator = (est.total - est.cuda_reserve) / GiB
    assert est.fits and 5 < allocator < 20  # a 7B QLoRA at 2 x 2048 with checkpointing
    summary = {
        "peak_mem_gib": allocator * 1.1,
        "tokens_per_s": 9000.0,
        "tflops": 250.0,
        "mfu": 0.253,
        "mfu_peak": "H200 bf16 989 TFLOP/s",
        "steps": 20,
        "final_loss": 6.9,
        "train_wall_s": 9.1,
        "model_load_s": 40.0,
    }
    rows = [{"tokens_per_s": "7000"}, {"tokens_per_s": "9500"}, {"tokens_per_s": "9700"}, {"tokens_per_s": "9600"}]
    fig = gpu_check.compare(summary, est, rows)
    assert fig["estimate_error"] == pytest.approx(-1 / 11, abs=1e-3)  # the estimate is 9.1% under the measurement
    assert fig["tokens_per_s_steady"] == 9600.0  # median after the first (warm-up) window
    lines = gpu_check.report_lines(fig, "NVIDIA H200")
    assert lines[0] == "gpu_check: NVIDIA H200"
    assert "-9.1% vs measured" in lines[2] and "MFU 25.3% of H200 bf16 989 TFLOP/s" in lines[4]


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
