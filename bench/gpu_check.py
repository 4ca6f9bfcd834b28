"""The GPU check's training run: a 7B-shaped Llama with random weights, QLoRA, 20 steps of 2 x 2048 tokens on one
CUDA GPU, through the real `trainer train` CLI; prints peak memory against `trainer estimate` for the same recipe,
tokens/s and MFU, and writes them to OUT/gpu_check.json. Run by bench/gpu_check.sh (which first runs the `gpu`
tests); on its own: `python bench/gpu_check.py --out runs/gpu_check`.

Nothing is downloaded: the model is the config of `--model` (trainer.estimate.KNOWN_CONFIGS, default
meta-llama/Llama-2-7b-hf) built on the meta device, materialised on the GPU in bf16, filled with N(0, 0.02) and
written as safetensors (13.5 GB for 7B), so the trainer loads and quantizes it exactly as it would a downloaded
model; the tokenizer is a byte-level BPE trained here on the generated text; the data is generated text (format
`text`, every token trained), enough for every step to see full packed rows.

What is compared: `torch.cuda.max_memory_allocated` over the training process (run_summary.json's peak_mem_gib)
against the estimate's peak minus its fixed CUDA allowance (context, workspaces and fragmentation are outside
the allocator's count); tokens/s over the whole session and over the logged windows after the first (warm-up and
the first NF4 kernels excluded); MFU against the GPU's dense bf16 peak (trainer/flops.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the of and to in is was for on that with as by at from his her an are were which this be or had not "
    "river stone cloud paper green quick slow bright dark tree light sound water fire earth wind north south east "
    "west small large happy model train token layer weight value number system process result method data time"
).split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad = eos = <|im_end|>
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def parse_args(argv=None) -> argparse.Namespace:
    """The options (`--help`); exits 2 with a message for a non-positive size or a model config we do not have."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="work folder (model, data, run, json)")
    p.add_argument("--model", default="meta-llama/Llama-2-7b-hf", help="a config of trainer.estimate.KNOWN_CONFIGS")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq", type=int, default=2048, help="data.max_seq_len (packed rows of this many tokens)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--optimizer", default="paged_adamw_8bit", choices=["adamw", "adamw_8bit", "paged_adamw_8bit"])
    p.add_argument(
        "--attn",
        default="auto",
        choices=["auto", "sdpa", "flash_attention_2", "eager"],
        help="auto: flash_attention_2 when flash-attn is installed, else sdpa",
    )
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB for the estimate's verdict (default: the GPU's)")
    p.add_argument("--keep-model", action="store_true", help="reuse OUT/model if it is there")
    args = p.parse_args(argv)
    for name in ("steps", "seq", "micro_batch", "grad_accum"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    from trainer.estimate import KNOWN_CONFIGS

    if args.model not in KNOWN_CONFIGS:
        p.error(f"--model {args.model}: not one of {', '.join(sorted(KNOWN_CONFIGS))}")
    return args


def attention(choice: str) -> str:
    """The attention implementation for `--attn`: `auto` is FlashAttention-2 when flash-attn is installed."""
    if choice != "auto":
        return choice
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def build_recipe(args: argparse.Namespace, model_dir: Path, data_path: Path, run_dir: Path) -> dict:
    """The recipe of the check run: launch/recipes/mistral7b_qlora_1gpu.yaml's settings (NF4, bf16, r16 on every
    linear layer, checkpointing, paged 8-bit AdamW) at --steps x --micro-batch x --seq tokens, no evaluation and
    one save (the last step): what is timed is training."""
    return {
        "model": {
            "name_or_path": str(model_dir),
            "dtype": "bf16",
            "quantization": "nf4",
            "gradient_checkpointing": True,
            "attn_implementation": attention(args.attn),
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {
            "path": str(data_path),
            "format": "text",
            "max_seq_len": args.seq,
            "packing": True,
            "val_fraction": 0.0,
        },
        "train": {
            "max_steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "grad_accum": args.grad_accum,
            "lr": 2e-4,
            "scheduler": "cosine",
            "warmup_ratio": 0.0,
            "optimizer": args.optimizer,
            "log_every": max(1, args.steps // 4),
            "eval_every": 10**9,
            "save_every": 10**9,
            "seed": 0,
        },
        "output_dir": str(run_dir),
    }


def write_text_data(path: Path, tokens_needed: int, seed: int = 0) -> int:
    """JSONL of {"text": ...} documents of 200-600 random words, about 1.3 x `tokens_needed` words in all (the BPE
    trained on them gives about one token per word). Returns the word count."""
    rng = random.Random(seed)
    words, lines = 0, []
    while words < 1.3 * tokens_needed:
        n = rng.randint(200, 600)
        lines.append(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n)) + "."}))
        words += n
    path.write_text("\n".join(lines) + "\n")
    return words


def train_tokenizer(lines, vocab_size: int = 512):
    """A byte-level BPE with ChatML specials (pad = eos = <|im_end|>, id 2), trained on `lines` in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def model_config(name: str, **overrides):
    """The transformers config of a KNOWN_CONFIGS id (with `overrides`), its special ids those of `train_tokenizer`."""
    from trainer.estimate import KNOWN_CONFIGS, _config_from_table

    config = _config_from_table({**KNOWN_CONFIGS[name], **overrides})
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    return config


def make_random_model(config, folder: Path, device: str, tokenizer) -> float:
    """Build `config` on the meta device, materialise it on `device` in bf16, fill it (matrices N(0, 0.02), norms
    1), save it with `tokenizer` to `folder`. Returns the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(str(folder))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def compare(summary: dict, est, metrics_rows: list[dict]) -> dict:
    """The check's figures: measured peak vs the estimate (GiB), tokens/s (session, steady), TFLOP/s and MFU."""
    gib = 2**30
    allocator_est = (est.total - est.cuda_reserve) / gib
    measured = float(summary["peak_mem_gib"])
    steady = [float(r["tokens_per_s"]) for r in metrics_rows if r.get("tokens_per_s")][1:]
    return {
        "peak_allocated_gib": round(measured, 2),
        "estimate_gib": round(est.total / gib, 2),
        "estimate_without_cuda_reserve_gib": round(allocator_est, 2),
        "estimate_error": round((allocator_est - measured) / measured, 4) if measured else None,
        "estimate_fits": est.fits,
        "tokens_per_s": summary.get("tokens_per_s"),
        "tokens_per_s_steady": round(statistics.median(steady), 1) if steady else None,
        "tflops": summary.get("tflops"),
        "mfu": summary.get("mfu"),
        "mfu_peak": summary.get("mfu_peak"),
        "steps": summary.get("steps"),
        "final_loss": summary.get("final_loss"),
        "train_wall_s": summary.get("train_wall_s"),
        "model_load_s": summary.get("model_load_s"),
    }


def report_lines(fig: dict, gpu: str) -> list[str]:
    """The printed summary of `compare`'s figures."""
    mfu = f"{fig['mfu']:.1%} of {fig['mfu_peak']}" if fig.get("mfu") is not None else "n/a (peak unknown)"
    err = fig["estimate_error"]
    return [
        f"gpu_check: {gpu}",
        f"  peak memory   {fig['peak_allocated_gib']:.2f} GiB allocated (torch.cuda.max_memory_allocated)",
        f"  estimate      {fig['estimate_without_cuda_reserve_gib']:.2f} GiB without the CUDA allowance "
        f"({fig['estimate_gib']:.2f} GiB with it), "
        + (f"{err:+.1%} vs measured" if err is not None else "no measurement"),
        f"  tokens/s      {fig['tokens_per_s']} over the session, {fig['tokens_per_s_steady']} steady",
        f"  model TFLOP/s {fig['tflops']}, MFU {mfu}",
        f"  steps         {fig['steps']} in {fig['train_wall_s']} s (model load {fig['model_load_s']} s), "
        f"final loss {fig['final_loss']}",
    ]


def main(argv=None) -> int:
    """Model, data, estimate, `trainer train`, comparison; 0 when all steps ran with a finite loss, 2 without a GPU."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; nothing to measure", file=sys.stderr)
        return 2
    from trainer.config import recipe_from_dict
    from trainer.estimate import estimate, format_table
    from trainer.tracking import read_metrics

    t_start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_path, model_dir, run_dir = out / "data.jsonl", out / "model", out / "run"
    write_text_data(data_path, args.steps * args.micro_batch * args.grad_accum * args.seq)
    tokenizer = train_tokenizer(json.loads(line)["text"] for line in data_path.read_text().splitlines())
    config = model_config(args.model)
    if not (args.keep_model and (model_dir / "config.json").is_file()):
        seconds = make_random_model(config, model_dir, "cuda", tokenizer)
        print(f"gpu_check: random {args.model}-shaped model written to {model_dir} in {seconds:.1f} s", flush=True)
    raw = build_recipe(args, model_dir, data_path, run_dir)
    recipe_file = out / "recipe.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(raw))
    gpu_gib = args.gpu_mem or torch.cuda.get_device_properties(0).total_memory / 2**30
    est = estimate(recipe_from_dict(raw), config, gpus=1, gpu_mem_gib=gpu_gib)
    print(format_table(est), flush=True)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    cmd = [sys.executable, "-m", "trainer", "train", str(recipe_file), "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, env=env)
    if res.returncode != 0:
        print(f"gpu_check: trainer train exited {res.returncode}", file=sys.stderr)
        return res.returncode
    summary = json.loads((run_dir / "run_summary.json").read_text())
    figures = compare(summary, est, [r for r in read_metrics(run_dir / "metrics.csv") if r.get("loss")])
    gpu = torch.cuda.get_device_name(0)
    figures.update(
        gpu=gpu,
        model=args.model,
        attn=raw["model"]["attn_implementation"],
        torch=torch.__version__,
        total_s=round(time.perf_counter() - t_start, 1),
    )
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    print("\n".join(report_lines(figures, gpu)), flush=True)
    ok = math.isfinite(float(figures["final_loss"])) and figures["steps"] == args.steps
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
