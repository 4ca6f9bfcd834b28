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

from trainer.artifacts import Tuned, adapter_fingerprint, read_recipe, tokenizer_of, tuned_source
from trainer.checkpoint import write_manifest
from trainer.dtypes import name_of, torch_dtype
from trainer.errors import UserError
from trainer.generate import left_padded, prompt_ids
from trainer.model import default_device, load_tuned
from trainer.run_dir import RunDir
from trainer.tokenizer import save_tokenizer

CHECK_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
]


def check_inputs(tokenizer, device) -> dict:
    """The check prompts encoded as generation encodes them, left-padded with a real token that is masked:
    compare only positions every model sees identically."""
    ids = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in CHECK_PROMPTS]
    return left_padded(ids, tokenizer.pad_token_id, device)


@torch.no_grad()
def logits_of(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs).logits.float()
    return out[inputs["attention_mask"].bool()]


SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")
"""Allowed `trainer merge --dtype` values; "auto" is the base checkpoint's own storage dtype."""


def base_storage_dtype(name_or_path: str) -> str:
    """The base checkpoint's own storage dtype ("fp32", "bf16", "fp16") from its config's `dtype` (or the older
    `torch_dtype`); "fp32" when the config names none or cannot be read."""
    from transformers import AutoConfig

    from trainer.model import source_args

    path, extra = source_args(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, **extra)
    except (OSError, ValueError):
        return "fp32"
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return name_of(value) or "fp32"


def merge_run(run_dir: Path, log=print, source: Tuned | None = None, dtype: str = "auto") -> dict:
    """`trainer merge RUN_DIR`: base + adapter merged in float32 and checked by logits in float32, saved in `dtype`
    ("auto": the base checkpoint's storage dtype, see `base_storage_dtype`; or fp32/bf16/fp16) to RUN_DIR/merged/
    (weights, tokenizer, generation config with the stop tokens, merge_report.json with the logits checks,
    manifest.json last). `source`: which adapter (`artifacts.tuned_source`; default the final one, or the newest
    verified checkpoint's of an unfinished run, whose merge goes to RUN_DIR/merged-step-N/). Returns the report.
    Raises UserError for a full fine-tune, an unknown `dtype`, or an adapter that does not load."""
    run = RunDir(run_dir)
    recipe = read_recipe(run)
    if recipe.lora is None:
        raise UserError(f"{run.root}: a full fine-tune has nothing to merge; its model is in {run.model}")
    if dtype not in SAVE_DTYPES:
        raise UserError(f"merge --dtype {dtype!r}: use one of {', '.join(SAVE_DTYPES)}")
    save_dtype = base_storage_dtype(recipe.model.name_or_path) if dtype == "auto" else dtype
    source = source or tuned_source(run.root, log=log)
    adapter = source.adapter
    tokenizer = tokenizer_of(run, recipe)
    device = default_device()
    tuned = load_tuned(recipe, adapter, device_map={"": device}, vocab_size=len(tokenizer), dtype="fp32")
    inputs = check_inputs(tokenizer, device)
    with_adapter = logits_of(tuned, inputs)
    merged = tuned.merge_and_unload()
    merged_logits = logits_of(merged, inputs)
    report = {
        "adapter": str(adapter),
        "source": source.label,
        "adapter_manifest_sha256": adapter_fingerprint(adapter),
        "dtype": recipe.model.dtype,
        "check_dtype": "fp32",
        "saved_dtype": save_dtype,
        "check_prompts": len(CHECK_PROMPTS),
        "max_abs_diff_merged_vs_adapter": float((merged_logits - with_adapter).abs().max()),
    }
    log(f"merge: max |logits(merged) - logits(base + adapter)| = {report['max_abs_diff_merged_vs_adapter']:.3g}")
    if recipe.lora.init == "loftq":
        report["base"] = "the de-quantized NF4 base (LoftQ: the adapter corrects the NF4 quantization error)"
    if recipe.model.quantization == "nf4":
        q = load_tuned(recipe, adapter, quantized=True, device_map={"": device}, vocab_size=len(tokenizer))
        diff = (logits_of(q, inputs) - merged_logits).abs()
        report["max_abs_diff_merged_vs_4bit_training_model"] = float(diff.max())
        report["mean_abs_diff_merged_vs_4bit_training_model"] = float(diff.mean())
        log(
            f"merge: max |logits(merged) - logits(4-bit base + adapter)| = {float(diff.max()):.3g} "
            "(the NF4 quantization error: the adapter was trained against the 4-bit weights)"
        )
        del q
    if save_dtype != "fp32":  # storage rounding, measured in fp32 on the rounded weights
        merged = merged.to(torch_dtype(save_dtype)).float()
        rounded = logits_of(merged, inputs)
        report["max_abs_diff_saved_dtype_vs_fp32"] = float((rounded - merged_logits).abs().max())
        merged = merged.to(torch_dtype(save_dtype))  # exact: the weights already hold save_dtype values
        log(
            f"merge: saved in {save_dtype}: max |logits({save_dtype} weights) - logits(fp32)| = "
            f"{report['max_abs_diff_saved_dtype_vs_fp32']:.3g}"
        )
    out = source.merged
    (out / "manifest.json").unlink(missing_ok=True)  # incomplete until the new manifest is written, last
    merged.save_pretrained(str(out), safe_serialization=True)
    # tokenizer + generation_config.json whose eos_token_id is the list of stop ids (end-of-turn tokens, eos)
    save_tokenizer(tokenizer, out, generation_config=merged.generation_config)
    (out / run.merge_report.name).write_text(json.dumps(report, indent=1))
    write_manifest(out)
    log(f"merge: wrote {out} (from {source.label})")
    return report
