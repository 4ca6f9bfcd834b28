"""Model: base weights (hub id / folder / GGUF; fp32/bf16/fp16/NF4), gradient checkpointing, peft LoRA."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import LoraConfig, ModelConfig
from trainer.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def source_args(name_or_path: str) -> tuple[str, dict]:
    """(path for from_pretrained, extra kwargs): a `.gguf` file loads from its folder with `gguf_file=`."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.name_or_path: {p} not found")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        return str(p), {}
    if p.is_absolute() or name_or_path.startswith((".", "~")):
        raise UserError(f"model.name_or_path: {p} not found; give a model folder, a .gguf file or a hub id")
    return name_or_path, {}


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path, extra = source_args(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
    except OSError as err:
        raise UserError(f"model.name_or_path: cannot load a tokenizer from '{name_or_path}': "
                        f"{str(err).splitlines()[0]}") from None
    if tok.pad_token is None:  # only an id to fill with; padding is masked by position, not by this id
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, *, dtype: torch.dtype, quantize: bool, device_map=None):
    """The pretrained model, in `dtype` (or NF4 Linear weights with `dtype` compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, extra = source_args(cfg.name_or_path)
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation, **extra)
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
        kwargs["device_map"] = device_map if device_map is not None else {"": "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise UserError(f"model.name_or_path: cannot load '{cfg.name_or_path}': {str(err).splitlines()[0]}") from None
    detach_gguf_quantizer(model)
    model.config.use_cache = False
    return model


def detach_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is plain float weights but remembers its quantizer and refuses save_pretrained."""
    if getattr(model, "hf_quantizer", None) is not None and "gguf" in type(model.hf_quantizer).__name__.lower():
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def build_model(cfg: ModelConfig, lora: LoraConfig | None, device_map=None, log=print):
    """The model to train. Full fine-tuning keeps fp32 master weights (mixed precision autocasts);
    LoRA stores the frozen base in the compute dtype and the adapter in fp32."""
    compute = DTYPES[cfg.dtype]
    quantize = cfg.quantization == "nf4"
    model = load_base(cfg, dtype=compute if lora is not None else torch.float32, quantize=quantize,
                      device_map=device_map)
    ckpt_kwargs = {"use_reentrant": False}
    if quantize:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if lora is not None:
        model = apply_lora(model, lora)
    trainable, total = count_parameters(model)
    log(f"model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
        f"{', 4-bit NF4 base' if quantize else ''}{', full fine-tune' if lora is None else ''}")
    return model


def apply_lora(model, lora: LoraConfig):
    import peft

    target = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                             task_type="CAUSAL_LM", bias="none")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"lora.target_modules={lora.target_modules!r}: {str(err).splitlines()[0]}") from None


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # packed two 4-bit values per byte
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens) for one batch.

    A sum, not a mean: the loop divides by the target tokens of the whole optimizer step, so the loss and
    gradient do not depend on how samples are split into micro-batches, accumulation steps or ranks.
    attention_mask stays None on purpose: position_ids restarts give the block-diagonal causal mask.
    """
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()
