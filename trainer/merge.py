"""`trainer merge RUN_DIR`: the adapter merged into the UNquantized base, on one device, checked by logits.

Whatever topology trained the adapter (one GPU, DDP, ZeRO-2), `RUN_DIR/adapter/` is a plain PEFT
adapter, so merging needs neither DeepSpeed nor the launch config. A QLoRA adapter was trained against
4-bit weights; merging into the bf16/fp32 base is what users ship, and the logits difference to the 4-bit
training model (the quantization error) is measured and reported, not hidden.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.config import Recipe, load_recipe
from trainer.errors import UserError
from trainer.model import DTYPES, load_base, load_tokenizer

CHECK_PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
                 "Write a haiku about the sea."]


def run_recipe(run_dir: Path) -> Recipe:
    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml); pass the output_dir of a `trainer train` run")
    return load_recipe(cfg)


def adapter_dir(run_dir: Path) -> Path:
    """The final adapter, else the newest checkpoint's consolidated adapter (a run that was stopped)."""
    from trainer.checkpoint import find_resumable

    final = Path(run_dir) / "adapter"
    if (final / "adapter_config.json").is_file():
        return final
    ckpt = find_resumable(Path(run_dir), log=lambda m: None)
    if ckpt is not None and (ckpt / "adapter" / "adapter_config.json").is_file():
        return ckpt / "adapter"
    raise UserError(f"{run_dir}: no adapter/ and no checkpoint with an adapter; was it a LoRA run that saved?")


def run_tokenizer(run_dir: Path, recipe: Recipe):
    """The tokenizer and chat template exactly as used in training (saved beside the adapter)."""
    for folder in (Path(run_dir) / "adapter", Path(run_dir) / "model"):
        if (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(str(folder))
    from trainer.data import ensure_chat_template
    tok = load_tokenizer(recipe.model.name_or_path)
    ensure_chat_template(tok)
    return tok


def check_inputs(tokenizer, device) -> dict:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in CHECK_PROMPTS]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    # Left-pad with a real token and mask it: compare only positions every model sees identically.
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def logits_of(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs).logits.float()
    return out[inputs["attention_mask"].bool()]


def load_tuned(recipe: Recipe, adapter: Path, *, quantized: bool = False, device_map=None, dtype=None):
    """Base (unquantized in the compute dtype, or `dtype`, unless `quantized`) + adapter, eval mode."""
    from peft import PeftModel

    dtype = dtype if dtype is not None else DTYPES[recipe.model.dtype]
    base = load_base(recipe.model, dtype=dtype, quantize=quantized, device_map=device_map)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def base_storage_dtype(name_or_path: str) -> str:
    """The base checkpoint's own storage dtype ("fp32", "bf16", "fp16") from its config's `dtype` (or the older
    `torch_dtype`); "fp32" when the config names none."""
    from transformers import AutoConfig

    from trainer.model import source_args

    path, extra = source_args(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError):
        return "fp32"
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return _CONFIG_DTYPES.get(str(value).replace("torch.", ""), "fp32")


def merge_run(run_dir: Path, log=print, dtype: str = "auto") -> dict:
    """Merge RUN_DIR's adapter into the base in float32, check the logits in float32, save in `dtype`
    ("auto": the base checkpoint's storage dtype, see `base_storage_dtype`; or fp32/bf16/fp16)."""
    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    if recipe.lora is None:
        raise UserError(f"{run_dir}: a full fine-tune has nothing to merge; its model is in {run_dir / 'model'}")
    if dtype not in SAVE_DTYPES:
        raise UserError(f"merge --dtype {dtype!r}: use one of {', '.join(SAVE_DTYPES)}")
    save_dtype = base_storage_dtype(recipe.model.name_or_path) if dtype == "auto" else dtype
    adapter = adapter_dir(run_dir)
    tokenizer = run_tokenizer(run_dir, recipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tuned = load_tuned(recipe, adapter, device_map={"": device}, dtype=torch.float32)
    inputs = check_inputs(tokenizer, device)
    with_adapter = logits_of(tuned, inputs)
    merged = tuned.merge_and_unload()
    merged_logits = logits_of(merged, inputs)
    report = {"adapter": str(adapter), "dtype": recipe.model.dtype, "check_dtype": "fp32", "saved_dtype": save_dtype,
              "check_prompts": len(CHECK_PROMPTS),
              "max_abs_diff_merged_vs_adapter": float((merged_logits - with_adapter).abs().max())}
    log(f"merge: max |logits(merged) - logits(base + adapter)| = {report['max_abs_diff_merged_vs_adapter']:.3g}")
    if recipe.model.quantization == "nf4":
        q = load_tuned(recipe, adapter, quantized=True, device_map={"": device})
        diff = (logits_of(q, inputs) - merged_logits).abs()
        report["max_abs_diff_merged_vs_4bit_training_model"] = float(diff.max())
        report["mean_abs_diff_merged_vs_4bit_training_model"] = float(diff.mean())
        log(f"merge: max |logits(merged) - logits(4-bit base + adapter)| = {float(diff.max()):.3g} "
            "(the NF4 quantization error: the adapter was trained against the 4-bit weights)")
        del q
    if save_dtype != "fp32":  # storage rounding, measured in fp32 on the rounded weights
        merged = merged.to(DTYPES[save_dtype])
        rounded = logits_of(merged.float(), inputs)
        report["max_abs_diff_saved_dtype_vs_fp32"] = float((rounded - merged_logits).abs().max())
        merged = merged.to(DTYPES[save_dtype])
        log(f"merge: saved in {save_dtype}: max |logits({save_dtype} weights) - logits(fp32)| = "
            f"{report['max_abs_diff_saved_dtype_vs_fp32']:.3g}")
    out = run_dir / "merged"
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if tokenizer.eos_token_id is not None:
        merged.generation_config.eos_token_id = tokenizer.eos_token_id
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.save_pretrained(str(out))
    (out / "merge_report.json").write_text(json.dumps(report, indent=1))
    log(f"merge: wrote {out}")
    return report
