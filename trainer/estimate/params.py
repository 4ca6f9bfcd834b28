"""Parameter counts from a transformers config, without building the model.

Llama/Mistral-style decoders (Qwen2 with its q/k/v biases, explicit `head_dim`, GQA): embed_tokens, per layer
q/k/v/o and gate/up/down projections and two RMSNorms, a final norm, lm_head unless tied. With LoRA, the tensors
peft adds (lora_A: r x in, lora_B: out x r per wrapped Linear) and the names it gives the wrapped ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer import arch
from trainer.errors import UserError

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
DECODER_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
"""What peft's `all-linear` targets in a Llama/Mistral decoder (every nn.Linear except lm_head)."""

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelDims:
    """The shape of a Llama-style decoder, in elements (features, heads, layers, vocabulary entries)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    """q/k/v/o biases (Llama `attention_bias`)."""
    qkv_bias: bool = False
    """q/k/v biases only (Qwen2)."""
    mlp_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_dims(model_config) -> ModelDims:
    """The shape of a Llama/Mistral-like decoder from a `PretrainedConfig` (or anything with the same attributes).

    Raises UserError when the (text) config lacks one of hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, vocab_size.
    """
    cfg = arch.text_config(model_config)
    missing = [k for k in _REQUIRED if getattr(cfg, k, None) is None]
    if missing:
        raise UserError(
            f"model config ({getattr(cfg, 'model_type', type(cfg).__name__)}) lacks {', '.join(missing)}; "
            "the memory planner understands Llama/Mistral-style decoders only"
        )
    return ModelDims(
        hidden=int(cfg.hidden_size),
        intermediate=int(cfg.intermediate_size),
        layers=int(cfg.num_hidden_layers),
        heads=int(cfg.num_attention_heads),
        kv_heads=arch.num_kv_heads(cfg),
        head_dim=arch.head_dim(cfg),
        vocab=int(cfg.vocab_size),
        tied=arch.tied_embeddings(model_config),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        qkv_bias=arch.qkv_bias(cfg),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
    )


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor as transformers (+ peft) names it."""

    name: str
    shape: tuple
    trainable: bool
    quantized: bool = False
    """Stored as NF4 (a Linear weight of a decoder layer under `model.quantization: nf4`)."""
    lora: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def linear_shapes(d: ModelDims) -> dict[str, tuple[int, int]]:
    """nn.Linear (out_features, in_features) per decoder projection."""
    return {
        "q_proj": (d.q_dim, d.hidden),
        "k_proj": (d.kv_dim, d.hidden),
        "v_proj": (d.kv_dim, d.hidden),
        "o_proj": (d.hidden, d.q_dim),
        "gate_proj": (d.intermediate, d.hidden),
        "up_proj": (d.intermediate, d.hidden),
        "down_proj": (d.hidden, d.intermediate),
    }


def _has_bias(d: ModelDims, name: str) -> bool:
    if name in MLP_LINEARS:
        return d.mlp_bias
    if d.attention_bias:
        return True
    return d.qkv_bias and name in ("q_proj", "k_proj", "v_proj")


def resolve_lora_targets(target_modules) -> tuple[str, ...]:
    """`all-linear` or a list of module names -> the decoder projections (and `lm_head`) peft will wrap.

    Raises UserError for a name that matches none of them."""
    if target_modules is None or target_modules == "all-linear":
        return DECODER_LINEARS
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    known = (*DECODER_LINEARS, "lm_head")
    out, unknown = [], []
    for name in target_modules:
        key = str(name).rsplit(".", 1)[-1]
        if key in known:
            if key not in out:
                out.append(key)
        else:
            unknown.append(name)
    if unknown:
        raise UserError(
            f"lora.target_modules: {', '.join(map(str, unknown))} match no Linear of a Llama-style model; "
            f"use 'all-linear' or names from {', '.join(known)}"
        )
    return tuple(k for k in known if k in out)


def parameter_table(model_config, lora=None, *, quantization: str | None = None) -> list[ParamInfo]:
    """Every parameter in `model.named_parameters()` order (tied lm_head omitted, as torch does).

    With `lora` (a `trainer.config.LoraConfig` or anything with `r` and `target_modules`) the names are peft's
    (`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`, ...) minus the `base_model.model.` prefix,
    and only LoRA tensors are trainable; without it everything is trainable (full fine-tune).
    """
    d = model_dims(model_config)
    targets = set(resolve_lora_targets(lora.target_modules)) if lora is not None else set()
    r = int(lora.r) if lora is not None else 0
    full = lora is None
    nf4 = quantization == "nf4"
    out: list[ParamInfo] = [ParamInfo("model.embed_tokens.weight", (d.vocab, d.hidden), full)]

    def adapter(prefix: str, out_f: int, in_f: int) -> None:
        out.append(ParamInfo(f"{prefix}.lora_A.default.weight", (r, in_f), True, lora=True))
        out.append(ParamInfo(f"{prefix}.lora_B.default.weight", (out_f, r), True, lora=True))

    def linear(prefix: str, name: str, out_f: int, in_f: int) -> None:
        wrapped = name in targets
        base = f"{prefix}.{name}.base_layer" if wrapped else f"{prefix}.{name}"
        out.append(ParamInfo(f"{base}.weight", (out_f, in_f), full, quantized=nf4))
        if _has_bias(d, name):
            out.append(ParamInfo(f"{base}.bias", (out_f,), full))
        if wrapped:
            adapter(f"{prefix}.{name}", out_f, in_f)

    shapes = linear_shapes(d)
    for i in range(d.layers):
        for name in ATTENTION_LINEARS:
            linear(f"model.layers.{i}.self_attn", name, *shapes[name])
        for name in MLP_LINEARS:
            linear(f"model.layers.{i}.mlp", name, *shapes[name])
        out.append(ParamInfo(f"model.layers.{i}.input_layernorm.weight", (d.hidden,), full))
        out.append(ParamInfo(f"model.layers.{i}.post_attention_layernorm.weight", (d.hidden,), full))
    out.append(ParamInfo("model.norm.weight", (d.hidden,), full))
    if not d.tied:  # a tied lm_head is the embedding matrix: torch lists it once, as embed_tokens
        out.append(
            ParamInfo(
                "lm_head.base_layer.weight" if "lm_head" in targets else "lm_head.weight", (d.vocab, d.hidden), full
            )
        )
    if "lm_head" in targets:  # tied or not, the lm_head module exists and gets an adapter
        adapter("lm_head", d.vocab, d.hidden)
    return out


def count_parameters(model_config, lora=None) -> dict[str, int]:
    """{'base': params of the model itself, 'lora': adapter params, 'trainable': what the optimizer sees,
    'total': base + lora, every parameter of the model being trained (tied weights once)}.

    `trainer.arch.trainable_share(counts['trainable'], counts['total'])` is the share training logs."""
    table = parameter_table(model_config, lora)
    base = sum(p.numel for p in table if not p.lora)
    lora_n = sum(p.numel for p in table if p.lora)
    return {
        "base": base,
        "lora": lora_n,
        "trainable": sum(p.numel for p in table if p.trainable),
        "total": base + lora_n,
    }


def lora_parameter_count(model_config, r: int, target_modules="all-linear") -> int:
    """r * (in + out) per wrapped Linear, as peft creates them."""
    d = model_dims(model_config)
    shapes = dict(linear_shapes(d), lm_head=(d.vocab, d.hidden))
    targets = resolve_lora_targets(target_modules)
    per_layer = sum(r * sum(shapes[n]) for n in targets if n != "lm_head")
    head = r * sum(shapes["lm_head"]) if "lm_head" in targets else 0
    return per_layer * d.layers + head
