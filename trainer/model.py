"""Model: base weights (hub id / folder / GGUF; fp32/bf16/fp16/NF4), gradient checkpointing, peft LoRA."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.arch import trainable_share
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
    """A GGUF-loaded Llama is plain float weights (transformers de-quantizes on load) but keeps its
    GgufHfQuantizer, which makes save_pretrained refuse; the quantizer is bookkeeping only: drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        quantizer.remove_quantization_config(model)
        model.is_quantized = False


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
    log(f"model: {trainable:,} trainable of {total:,} parameters ({trainable_share(trainable, total):.3f}%)"
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


def token_loss_sum(model, batch: dict, chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens) for one batch.

    A sum, not a mean: the loop divides by the target tokens of the whole optimizer step, so the loss and
    gradient do not depend on how samples are split into micro-batches, accumulation steps or ranks.
    attention_mask stays None on purpose: position_ids restarts give the block-diagonal causal mask.
    """
    import torch.nn.functional as F

    targets = batch["labels"][:, 1:]
    head = plain_lm_head(model) if chunked else None
    with lm_head_input(head) as captured:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    if captured:  # the model's logits were never built: cross-entropy from lm_head's input, in chunks
        mask = targets != -100
        hidden = captured[0][:, :-1][mask]
        loss = ChunkedCrossEntropy.apply(hidden, head.weight, targets[mask], torch.is_grad_enabled())
        return loss, mask.sum()
    logits = out.logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


# ----------------------------------------------------------------------------------------------- chunked loss
# The (tokens x vocab) logits of small models with big vocabularies dominate training memory (SmolLM2: 49,152
# entries per token, 400 MB for 8 rows of 256 in fp32, about four such tensors alive around the loss). Instead the
# loss reads lm_head's input, keeps only the target positions (prompt tokens need no logits at all), and runs the
# vocabulary projection a chunk of rows at a time, computing each chunk's gradient right away: peak memory for the
# loss is one chunk of logits, and no FLOP is added (the softmax gradient is the usual one, just computed early).
# Recipe key model.chunked_loss: false turns it off (the model's own logits and F.cross_entropy).
CE_CHUNK_BYTES = 64 * 2**20  # fp32 logits alive at a time in the chunked cross-entropy
LOGIT_SCALING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                      "lm_head_multiplier", "attn_logit_softcapping_final")


def plain_lm_head(model):
    """The model's output layer when it is a plain Linear applied as-is (logits = lm_head(hidden)), else None.

    None (the full-logits path) for a LoRA-wrapped or quantized head, a head with a bias, or a model that scales or
    soft-caps its logits after the head (Gemma 2, Cohere, Granite, ...).
    """
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in LOGIT_SCALING_KEYS):
        return None
    return head


class lm_head_input:  # noqa: N801 - used as a context manager, like torch's
    """While active, lm_head(hidden) stores `hidden` and returns empty logits (its input cut to 0 positions).

    A pre-hook rather than calling the backbone ourselves: the model is still called through its wrappers
    (DDP's forward prepares gradient reduction), so only the logits change. Yields the list the input lands in;
    it stays empty when there is no head or the model never calls it as a module.
    """

    def __init__(self, head):
        self.head, self.captured, self.handle = head, [], None

    def _hook(self, module, args):
        self.captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    def __enter__(self):
        if self.head is not None:
            self.handle = self.head.register_forward_pre_hook(self._hook)
        return self.captured

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        if len(self.captured) > 1:  # called more than once: not the plain forward this expects
            raise RuntimeError("lm_head ran more than once in one forward; set model.chunked_loss=false")
        return False


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) over (T, d) hidden rows, a chunk of rows at a time.

    The loss is a sum, so d(loss)/d(logits) = softmax - onehot is known in the forward: each chunk's gradients
    into hidden (and into weight when it trains) are computed there and only scaled by the incoming gradient
    in backward. Matmuls run in the ambient autocast dtype, log-softmax in fp32, like F.cross_entropy on
    `logits.float()`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, grad_enabled: bool):
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        rows = max(1, CE_CHUNK_BYTES // (4 * weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = torch.matmul(h, weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                if need_h:
                    grad_h[start:start + rows] = torch.matmul(probs.to(weight.dtype), weight).to(grad_h.dtype)
                if need_w:
                    grad_w += torch.matmul(probs.t().to(h.dtype), h).float()
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_h = None
        if ctx.has[0]:
            g = saved.pop(0)
            grad_h = (g * grad_out).to(g.dtype)
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None
