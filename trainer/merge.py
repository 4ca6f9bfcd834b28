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

from trainer.artifacts import adapter_dir, read_recipe, tokenizer_of
from trainer.errors import UserError
from trainer.generate import render_prompt, stop_token_ids
from trainer.model import default_device, load_tuned
from trainer.run_dir import RunDir
from trainer.tokenizer import save_tokenizer

CHECK_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
]


def check_inputs(tokenizer, device) -> dict:
    texts = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in CHECK_PROMPTS]
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


def merge_run(run_dir: Path, log=print) -> dict:
    """`trainer merge RUN_DIR`: base + adapter merged -> RUN_DIR/merged/ (weights, tokenizer, generation config
    with the stop tokens, merge_report.json with the logits checks). Returns the report."""
    run = RunDir(run_dir)
    recipe = read_recipe(run)
    if recipe.lora is None:
        raise UserError(f"{run.root}: a full fine-tune has nothing to merge; its model is in {run.model}")
    adapter = adapter_dir(run)
    tokenizer = tokenizer_of(run, recipe)
    device = default_device()
    tuned = load_tuned(recipe, adapter, device_map={"": device})
    inputs = check_inputs(tokenizer, device)
    with_adapter = logits_of(tuned, inputs)
    merged = tuned.merge_and_unload()
    merged_logits = logits_of(merged, inputs)
    report = {
        "adapter": str(adapter),
        "dtype": recipe.model.dtype,
        "check_prompts": len(CHECK_PROMPTS),
        "max_abs_diff_merged_vs_adapter": float((merged_logits - with_adapter).abs().max()),
    }
    log(f"merge: max |logits(merged) - logits(base + adapter)| = {report['max_abs_diff_merged_vs_adapter']:.3g}")
    if recipe.lora.init == "loftq":
        report["base"] = "the de-quantized NF4 base (LoftQ: the adapter corrects the NF4 quantization error)"
    if recipe.model.quantization == "nf4":
        q = load_tuned(recipe, adapter, quantized=True, device_map={"": device})
        diff = (logits_of(q, inputs) - merged_logits).abs()
        report["max_abs_diff_merged_vs_4bit_training_model"] = float(diff.max())
        report["mean_abs_diff_merged_vs_4bit_training_model"] = float(diff.mean())
        log(
            f"merge: max |logits(merged) - logits(4-bit base + adapter)| = {float(diff.max()):.3g} "
            "(the NF4 quantization error: the adapter was trained against the 4-bit weights)"
        )
        del q
    out = run.merged
    merged.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)
    stops = stop_token_ids(tokenizer)
    if stops:
        merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.save_pretrained(str(out))
    run.merge_report.write_text(json.dumps(report, indent=1))
    log(f"merge: wrote {out}")
    return report
