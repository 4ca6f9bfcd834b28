"""Memory planner: will this recipe fit on these GPUs, and if not, what to change.

`estimate(recipe, model_config, gpus=..., gpu_mem_gib=...)` returns an `Estimate` with every component in bytes
per GPU; `format_table(est)` renders it for the CLI and `estimate_to_dict(est)` for JSON. Nothing here touches a
GPU, loads weights or reaches the network: parameters are counted from the config (Llama/Mistral-style decoders:
embed_tokens, per layer q/k/v/o (GQA aware), gate/up/down and two RMSNorms, a final norm, lm_head unless tied).

Precision policy (what trainer.model / trainer.loop / trainer.optim do):

* Plain Accelerate (one GPU or DDP), LoRA: frozen base stored in `model.dtype`, LoRA weights, their gradients
  and AdamW states in fp32, forward under `accelerator.autocast()` (`model.dtype`).
* QLoRA: Linear weights of the decoder layers in NF4; `peft.prepare_model_for_kbit_training` upcasts everything
  else (embeddings, norms, lm_head) to fp32, so the hidden states between layers are fp32 as well.
* Full fine-tune: fp32 weights (the master copy), fp32 gradients, autocast(`model.dtype`).
* DeepSpeed ZeRO-1/2 with bf16/fp16: DeepSpeed casts every floating parameter (LoRA and QLoRA's upcast ones
  included) to the compute dtype and keeps an fp32 master partition of the trainable ones in its optimizer;
  gradients stay in the compute dtype, partitioned; the fp32 gradient partition only exists during `step()`.
  The param groups are trainer.optim's (2-D tensors with weight decay, 1-D without), each flattened separately.
* torch AdamW is `fused=True` on CUDA (no step scratch); bitsandbytes 8-bit AdamW updates in place.

Bytes per GPU (N = trainable numel, P = `zero2_partition_numel(group sizes, dp)`, dp = gpus * nodes):

==================  ==========================================  ==========================================
component           plain Accelerate / DDP                      DeepSpeed ZeRO-2 (ZeRO-1: gradients full)
==================  ==========================================  ==========================================
weights (frozen)    2/4 B per param in model.dtype; QLoRA:      compute dtype (NF4 weights stay NF4)
                    `nf4_bytes` per decoder Linear weight, 4 B
                    for embeddings, norms, lm_head
trainable weights   4 B * N (fp32)                              2 B * N (compute dtype; 4 with fp32)
master weights      0                                           4 B * P (fp32 partition; CPU if offloaded)
gradients           4 B * N (fp32)                              2 B * (numel of params overlapping the
                                                                rank's partition); CPU if offloaded
grad buffers        DDP (dp > 1) bucket copies: 4 B * N         reduce buckets: 2 x 5e7 elements x 2 B
                                                                (ds_configs/zero2.json: overlap_comm);
                                                                offload: + the largest param in 2 B
optimizer states    adamw: 8 B * N; adamw_8bit: 2 B per elem    same rules on the flat partition P
                    + 2 fp32 absmax per 256-block (tensors <     (CPU if offloaded)
                    4096 elements keep 8 B, like bitsandbytes)
step transient      0 (fused AdamW / in-place 8-bit)            fp32 gradient partition 4 B * P
==================  ==========================================  ==========================================

NF4 (bitsandbytes `quantize_4bit`, blocksize 64, double quantization): per weight tensor of n elements,
ceil(n/2) packed bytes + ceil(n/64) uint8 absmax + 4 * ceil(ceil(n/64)/256) fp32 nested absmax + 4 (offset)
+ 1024 (nested 256-entry code) + 64 (16-entry NF4 code) = 0.5 B/param + ~0.127 bit/param + 1092 B per tensor.

Activations (saved for backward), per token per decoder layer, in bytes; e = 2 (bf16/fp16) or 4 (fp32) is the
activation dtype, r = residual-stream bytes (4 for a full fine-tune with fp32 master weights and for QLoRA
without DeepSpeed, else e), h hidden,
I intermediate, q = heads*head_dim, k = kv_heads*head_dim, a = heads. This is Korthikanti et al. (2022, "Reducing
activation recomputation", s*b*h*(34 + 5*a*s/h) for GPT) re-derived op by op for a Llama layer (RMSNorm, rotary,
SwiGLU, no dropout, GQA) and checked against the tensors autograd actually saves (tests/unit/test_estimate.py):

* 2 RMSNorms:      2 * (4h fp32 input copy + 4 rsqrt [+ r*h normalised input when the norm weight trains])
* attention:       e*(2q + 2k) + 4a (SDPA/flash keeps q, k, v, output and an fp32 logsumexp: no a*s^2 term;
                   k -> q when K/V are repeated, i.e. SDPA with a mask). Eager attention adds a*s*(4 + e).
* SwiGLU MLP:      3*e*I (gate output, SiLU output, up output); 3*4*I with QLoRA, whose Linear4bit returns
                   the dtype of its (fp32) input
* frozen Linears save nothing; trainable ones (full FT) save their input: r*h for q/k/v and for gate/up (one
                   shared tensor; 3 and 2 copies of e*h under autocast with an fp32 residual stream), e*I for
                   down (o_proj's input is the saved SDPA output).
* each LoRA module on an input of f features: f*(e + 1 if lora_dropout else e) + r*e (the adapter input copy,
                   the dropout mask at 1 B/element on CUDA, lora_A's output); without autocast e is the LoRA
                   weight dtype, and with no dropout and no dtype cast the input is shared, not copied
* SDPA with a mask (packing, or micro_batch_size > 1 with padding): the bool mask becomes an additive bias of
                   s (padded to 16) elements per token in dtype e, saved per layer; FlashAttention-2 has none.

Head: final norm (as above), lm_head's input when it trains, 8 B/token of labels (and of token ids when the
embeddings train), rotary cos/sin once. Logits (trainer.model.token_loss_sum drops the model's logits once the
loss is built): b*s*V*4 for the fp32 log-softmax cross-entropy keeps, plus b*s*V*8 transient (at the start of
backward the fp32 gradients into and out of log-softmax; in the forward the logits, their shifted copy and the
fp32 cast peak at the same 12 B per token per vocab entry). For small models with big vocabularies these dominate.

Gradient checkpointing (non-reentrant, per decoder layer) keeps r*h per token per layer (the layer inputs) plus
one layer's full activations while it is recomputed.

Autocast weight copies: under torch.autocast every fp32 weight a matmul uses (LoRA A/B; in a full fine-tune all
projections and lm_head; QLoRA's upcast lm_head) is cast to the compute dtype once per forward and the copy is kept until
backward: e bytes per such parameter (about 2 B/param for a full fine-tune without DeepSpeed).

Per-layer terms match, within a few bytes, what autograd saves for a tiny Llama on CPU (torch 2.13 / transformers 5;
tests/unit/test_estimate.py walks the autograd graph); on CUDA only the dropout mask (bool, 1 B) and the SDPA
kernel's choice (flash vs mem-efficient with the mask bias) differ, and both are modelled as stated above.
With LoRA and no checkpointing the first layer saves a little less than modelled (its input needs no grad).

Peak per GPU = weights + trainable + master + gradients + grad buffers + optimizer states
             + max(activations + autocast weight copies + logits + logits gradient, optimizer-step transient)
             + CUDA reserve,
where the CUDA reserve (`CUDA_RESERVE_BYTES` = 1 GiB) covers the CUDA context, cuBLAS/NCCL workspaces and
allocator fragmentation. The model has been checked term by term on CPU, not yet against
`torch.cuda.max_memory_allocated` on a GPU; nvidia-smi reads higher than the allocator's peak (cached blocks).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError

GiB = 1024 ** 3
CUDA_RESERVE_BYTES = 1 * GiB
"""CUDA context (~0.5 GiB), cuBLAS/NCCL workspaces and caching-allocator fragmentation."""

NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_CODE_BYTES = 16 * 4  # the 16-entry NF4 code table (fp32), one per quantized tensor
NF4_NESTED_CODE_BYTES = 256 * 4  # the 256-entry dynamic map of the nested (double) quantization, one per tensor
NF4_OFFSET_BYTES = 4  # fp32 mean subtracted from absmax before nested quantization

BNB_8BIT_BLOCKSIZE = 256
BNB_8BIT_MIN_SIZE = 4096
"""bitsandbytes keeps 32-bit states for tensors with fewer elements than this (`min_8bit_size`)."""

DS_REDUCE_BUCKET_SIZE = 50_000_000
"""`zero_optimization.reduce_bucket_size` in ds_configs/zero2.json (with overlap_comm: two such buffers)."""

DS_NCCL_ALIGNMENT = 2
"""DeepSpeed ZeRO-1/2 pads each flat param group to a multiple of 2 * dp (`nccl_start_alignment_factor`)."""

DROPOUT_MASK_BYTES_CUDA = 1
"""`native_dropout` on CUDA keeps a bool mask; the CPU fallback keeps a float one (the tests measure on CPU)."""

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
DECODER_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
"""What peft's `all-linear` targets in a Llama/Mistral decoder (every nn.Linear except lm_head)."""

KNOWN_OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


# --------------------------------------------------------------------------------------------------------------
# Model shape and parameter counting
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
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
    """The shape of a Llama/Mistral-like decoder from a `PretrainedConfig` (or anything with the same attributes)."""
    cfg = model_config
    text = getattr(cfg, "text_config", None)
    if getattr(cfg, "hidden_size", None) is None and text is not None:
        cfg = text
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if getattr(cfg, k, None) is None]
    if missing:
        raise UserError(f"model config ({getattr(cfg, 'model_type', type(cfg).__name__)}) lacks {', '.join(missing)}; "
                        "the memory planner understands Llama/Mistral-style decoders only")
    heads = int(cfg.num_attention_heads)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    model_type = getattr(cfg, "model_type", "")
    tied = getattr(cfg, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(model_config, "tie_word_embeddings", False)
    return ModelDims(
        hidden=int(cfg.hidden_size), intermediate=int(cfg.intermediate_size), layers=int(cfg.num_hidden_layers),
        heads=heads, kv_heads=int(kv_heads), head_dim=int(head_dim), vocab=int(cfg.vocab_size), tied=bool(tied),
        attention_bias=bool(getattr(cfg, "attention_bias", False)), qkv_bias=model_type == "qwen2",
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)))


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


def _linear_shapes(d: ModelDims) -> dict[str, tuple[int, int]]:
    """nn.Linear (out_features, in_features) per decoder projection."""
    return {"q_proj": (d.q_dim, d.hidden), "k_proj": (d.kv_dim, d.hidden), "v_proj": (d.kv_dim, d.hidden),
            "o_proj": (d.hidden, d.q_dim), "gate_proj": (d.intermediate, d.hidden),
            "up_proj": (d.intermediate, d.hidden), "down_proj": (d.hidden, d.intermediate)}


def _has_bias(d: ModelDims, name: str) -> bool:
    if name in MLP_LINEARS:
        return d.mlp_bias
    if d.attention_bias:
        return True
    return d.qkv_bias and name in ("q_proj", "k_proj", "v_proj")


def resolve_lora_targets(target_modules) -> tuple[str, ...]:
    """`all-linear` or a list of module names -> the decoder projections (and `lm_head`) peft will wrap."""
    if target_modules is None or target_modules == "all-linear":
        return DECODER_LINEARS
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    known = DECODER_LINEARS + ("lm_head",)
    out, unknown = [], []
    for name in target_modules:
        key = str(name).rsplit(".", 1)[-1]
        if key in known:
            if key not in out:
                out.append(key)
        else:
            unknown.append(name)
    if unknown:
        raise UserError(f"lora.target_modules: {', '.join(map(str, unknown))} match no Linear of a Llama-style model; "
                        f"use 'all-linear' or names from {', '.join(known)}")
    return tuple(k for k in known if k in out)


def parameter_table(model_config, lora=None, *, quantization: str | None = None) -> list[ParamInfo]:
    """Every parameter in `model.named_parameters()` order (tied lm_head omitted, as torch does).

    With `lora` (a `trainer.config.LoraArgs` or anything with `r` and `target_modules`) the names are peft's
    (`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`, ...) minus the `base_model.model.` prefix,
    and only LoRA tensors are trainable; without it everything is trainable (full fine-tune).
    """
    d = model_dims(model_config)
    targets = set(resolve_lora_targets(lora.target_modules)) if lora is not None else set()
    r = int(lora.r) if lora is not None else 0
    full = lora is None
    nf4 = quantization == "nf4"
    out: list[ParamInfo] = [ParamInfo("model.embed_tokens.weight", (d.vocab, d.hidden), full)]

    def linear(prefix: str, name: str, out_f: int, in_f: int, quantizable: bool) -> None:
        wrapped = name in targets
        base = f"{prefix}.{name}.base_layer" if wrapped else f"{prefix}.{name}"
        out.append(ParamInfo(f"{base}.weight", (out_f, in_f), full, quantized=nf4 and quantizable))
        if prefix != "" and _has_bias(d, name):
            out.append(ParamInfo(f"{base}.bias", (out_f,), full))
        if wrapped:
            out.append(ParamInfo(f"{prefix}.{name}.lora_A.default.weight", (r, in_f), True, lora=True))
            out.append(ParamInfo(f"{prefix}.{name}.lora_B.default.weight", (out_f, r), True, lora=True))

    shapes = _linear_shapes(d)
    for i in range(d.layers):
        for name in ATTENTION_LINEARS:
            linear(f"model.layers.{i}.self_attn", name, *shapes[name], quantizable=True)
        for name in MLP_LINEARS:
            linear(f"model.layers.{i}.mlp", name, *shapes[name], quantizable=True)
        out.append(ParamInfo(f"model.layers.{i}.input_layernorm.weight", (d.hidden,), full))
        out.append(ParamInfo(f"model.layers.{i}.post_attention_layernorm.weight", (d.hidden,), full))
    out.append(ParamInfo("model.norm.weight", (d.hidden,), full))
    if not d.tied:
        if "lm_head" in targets:
            out.append(ParamInfo("lm_head.base_layer.weight", (d.vocab, d.hidden), full))
            out.append(ParamInfo("lm_head.lora_A.default.weight", (r, d.hidden), True, lora=True))
            out.append(ParamInfo("lm_head.lora_B.default.weight", (d.vocab, r), True, lora=True))
        else:
            out.append(ParamInfo("lm_head.weight", (d.vocab, d.hidden), full))
    elif "lm_head" in targets:  # tied: the lm_head module still exists and gets an adapter
        out.append(ParamInfo("lm_head.lora_A.default.weight", (r, d.hidden), True, lora=True))
        out.append(ParamInfo("lm_head.lora_B.default.weight", (d.vocab, r), True, lora=True))
    return out


def count_parameters(model_config, lora=None) -> dict[str, int]:
    """{'base': params of the model itself, 'lora': adapter params, 'trainable': what the optimizer sees}."""
    table = parameter_table(model_config, lora)
    base = sum(p.numel for p in table if not p.lora)
    lora_n = sum(p.numel for p in table if p.lora)
    return {"base": base, "lora": lora_n, "trainable": sum(p.numel for p in table if p.trainable),
            "total": base + lora_n}


def lora_parameter_count(model_config, r: int, target_modules="all-linear") -> int:
    """r * (in + out) per wrapped Linear, as peft creates them."""
    d = model_dims(model_config)
    shapes = dict(_linear_shapes(d), lm_head=(d.vocab, d.hidden))
    per_layer = sum(r * sum(shapes[n]) for n in resolve_lora_targets(target_modules) if n != "lm_head")
    head = r * sum(shapes["lm_head"]) if "lm_head" in resolve_lora_targets(target_modules) else 0
    return per_layer * d.layers + head


# --------------------------------------------------------------------------------------------------------------
# Storage rules (bitsandbytes NF4, 8-bit optimizers, DeepSpeed ZeRO-2 partitioning)
# --------------------------------------------------------------------------------------------------------------

def nf4_bytes(numel: int, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> int:
    """GPU bytes of one weight tensor after `bitsandbytes.functional.quantize_4bit(..., quant_type='nf4')`."""
    blocks = -(-numel // blocksize)
    packed = -(-numel // 2)  # two 4-bit codes per uint8
    if not double_quant:
        return packed + 4 * blocks + NF4_CODE_BYTES
    nested_blocks = -(-blocks // NF4_NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested_blocks + NF4_OFFSET_BYTES + NF4_NESTED_CODE_BYTES + NF4_CODE_BYTES


def adam_state_bytes(numels: Iterable[int], optimizer: str = "adamw", state_bytes: int = 4) -> int:
    """Bytes of the two AdamW moments (exp_avg + exp_avg_sq, not the scalar step) for tensors of these sizes.

    `adamw` (torch): 2 * state_bytes per element (fp32 params -> 8 B). `adamw_8bit` / `paged_adamw_8bit`
    (bitsandbytes): 2 uint8 states + 2 fp32 absmax per 256-element block, and fp32 states for tensors under
    4096 elements, exactly as `Optimizer2State.init_state` allocates them, plus the two 256-entry fp32 quantization
    maps the optimizer shares between all 8-bit tensors.
    """
    if optimizer not in KNOWN_OPTIMIZERS:
        raise UserError(f"train.optimizer={optimizer!r}: the planner knows {', '.join(KNOWN_OPTIMIZERS)}")
    total, any_8bit = 0, False
    for n in numels:
        if optimizer == "adamw" or n < BNB_8BIT_MIN_SIZE:
            total += 2 * n * (state_bytes if optimizer == "adamw" else 4)
        else:
            total += 2 * n + 2 * 4 * -(-n // BNB_8BIT_BLOCKSIZE)
            any_8bit = True
    return total + (2 * 256 * 4 if any_8bit else 0)


def _as_groups(trainable_numel: int | Sequence[int]) -> list[int]:
    if isinstance(trainable_numel, int):
        return [trainable_numel]
    return [int(n) for n in trainable_numel]


def zero2_partition_numel(trainable_numel: int | Sequence[int], dp: int) -> int:
    """Elements of the flat fp32 partition each rank owns under DeepSpeed ZeRO-1/2.

    Mirrors `DeepSpeedZeroOptimizer.__init__` (deepspeed/runtime/zero/stage_1_and_2.py, 0.19.x): every param
    group is flattened, padded to a multiple of `nccl_start_alignment_factor * dp` = 2 * dp (`align_dense_tensors`)
    and split into dp equal slices (`get_data_parallel_partitions`). Pass one int for one param group or a list of
    group sizes; the result is the sum over groups of ceil(numel / (2 dp)) * 2.
    """
    if dp < 1:
        raise ValueError(f"dp={dp} must be at least 1")
    align = DS_NCCL_ALIGNMENT * dp
    return sum((-(-n // align) * align) // dp for n in _as_groups(trainable_numel))


def zero2_grad_partition_numel(param_numels: Sequence[int], dp: int) -> int:
    """Largest `grads_in_partition` over ranks: ZeRO-2 sizes it by the FULL numel of every param that overlaps the
    rank's slice of the flat group (params straddling a boundary count whole), one param group in order."""
    partition = zero2_partition_numel(sum(param_numels), dp)
    worst = 0
    for rank in range(dp):
        lo, hi = rank * partition, (rank + 1) * partition
        start, total = 0, 0
        for n in param_numels:
            end = start + n
            if start < hi and end > lo:
                total += n
            start = end
        worst = max(worst, total)
    return worst


# --------------------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """Dtypes that decide what autograd saves (bytes per element)."""
    act: int
    """Matmul outputs / attention tensors (the compute dtype)."""
    res: int
    """Hidden states between layers: fp32 when a full fine-tune keeps fp32 weights under autocast, or with QLoRA's
    fp32 embeddings; else the compute dtype."""
    autocast: bool
    """Forward under torch.autocast(compute dtype): every Linear casts its input (a saved copy per module)."""
    lora: int
    """LoRA weight dtype (peft casts the adapter input to it)."""
    base_trainable: bool
    """Full fine-tune: Linears, norms, embeddings and lm_head keep what they need for weight gradients."""
    mlp: int | None = None
    """Bytes of the SwiGLU intermediates when they differ from `act`: bitsandbytes' Linear4bit returns its
    input's dtype, so with QLoRA's fp32 hidden states gate/up outputs, SiLU and the product are fp32."""


def activation_bytes(model_config, *, batch: int, seq: int, precision: Precision, lora=None,
                     attn_implementation: str = "sdpa", attention_mask: bool = False,
                     dropout_mask_bytes: int = DROPOUT_MASK_BYTES_CUDA) -> dict[str, int]:
    """Bytes autograd keeps for one micro-batch (see the module docstring for every term).

    Returns per_layer (one decoder layer, no checkpointing), layer_input (what checkpointing keeps per layer),
    head (final norm, lm_head input when it trains, labels, embedding indices, the shared bool mask),
    logits (the fp32 log-softmax cross-entropy keeps) and logits_grad (transient at the start of backward).
    """
    d = model_dims(model_config)
    p = precision
    tokens = batch * seq
    h, inter, q, kv, a = d.hidden, d.intermediate, d.q_dim, d.kv_dim, d.heads
    act, res = p.act, p.res
    targets = resolve_lora_targets(lora.target_modules) if lora is not None else ()
    r = int(lora.r) if lora is not None else 0
    dropout = float(getattr(lora, "dropout", 0.0) or 0.0) if lora is not None else 0.0
    flash2 = attn_implementation == "flash_attention_2"
    eager = attn_implementation == "eager"
    mask = attention_mask and not flash2
    kv_repeated = eager or mask  # transformers repeats K/V unless SDPA runs mask-free with enable_gqa (or FA2)

    norm = 4 * h + 4 + (res * h if p.base_trainable else 0)
    per_tok = 2 * norm
    cast_copies = p.autocast and res != act
    in_feats = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": inter}
    src_bytes = {"q_proj": res, "k_proj": res, "v_proj": res, "o_proj": act, "gate_proj": res, "up_proj": res,
                 "down_proj": act}
    group_of = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
    counted = {"o_in"} if not eager else set()  # the SDPA output doubles as o_proj's input
    if p.base_trainable:
        per_tok += (3 * act * h if cast_copies else res * h)  # q/k/v input
        per_tok += (2 * act * h if cast_copies else res * h)  # gate/up input
        per_tok += act * inter  # down_proj input (SiLU(gate) * up)
        counted |= {"attn_in", "mlp_in", "down_in"}
        if eager:
            per_tok += act * q
            counted.add("o_in")
    for name in targets:
        if name == "lm_head":
            continue
        f = in_feats[name]
        if p.autocast:
            saved = act * f  # lora_A's input, cast back to the compute dtype by autocast (a new tensor)
            a_out = act * r
        else:
            a_out = p.lora * r
            if dropout > 0 or src_bytes[name] != p.lora:
                saved = p.lora * f  # dropout output / peft's dtype cast
            elif group_of[name] in counted:
                saved = 0  # lora_A keeps the very tensor the base layer already keeps
            else:
                saved = p.lora * f
                counted.add(group_of[name])
        if dropout > 0:
            saved += dropout_mask_bytes * f
        per_tok += saved + a_out
    kv_saved = q if kv_repeated else kv
    per_tok += act * (2 * q + 2 * kv_saved) + 4 * a  # SDPA/flash: q, k, v, out, fp32 logsumexp
    if eager:
        per_tok += a * seq * (4 + act)  # fp32 softmax output + probabilities in compute dtype
    per_tok += 3 * (p.mlp or act) * inter  # SwiGLU: gate out, SiLU out, up out
    mask_bias = act * (-(-seq // 16) * 16) * tokens if (mask and not eager) else 0

    head_tok = 4 * h + 4 + 8  # final norm, labels
    if p.base_trainable:
        head_tok += res * h + (act if cast_copies else res) * h + 8  # norm weight, lm_head input, embedding indices
    elif "lm_head" in targets:
        head_tok += (act if p.autocast else p.lora) * h + (act if p.autocast else p.lora) * r
    shared = 2 * seq * d.head_dim * res  # rotary cos/sin, in the hidden-state dtype, shared by all layers
    shared += batch * seq * seq if mask else 0  # the bool attention mask
    return {
        "per_layer": per_tok * tokens + mask_bias,
        "layer_input": res * h * tokens,
        "head": head_tok * tokens + shared,
        "logits": 4 * d.vocab * tokens,
        "logits_grad": 8 * d.vocab * tokens,
    }


def autocast_weight_bytes(table: Sequence[ParamInfo], precision: Precision, *, frozen_fp32: bool = False) -> int:
    """torch.autocast casts each fp32 weight a matmul uses to the compute dtype during the forward and autograd
    keeps the copy until backward: every trainable Linear weight (LoRA A/B, or all projections + lm_head in a full
    fine-tune) in `precision.act` bytes, and with `frozen_fp32` (QLoRA's upcast lm_head) the frozen lm_head too.
    Embedding lookups, norm weights and NF4 weights are not cast by autocast."""
    if not precision.autocast:
        return 0
    total = 0
    for p in table:
        if len(p.shape) != 2 or p.quantized or p.name.startswith("model.embed_tokens"):
            continue
        if (p.trainable and precision.lora != precision.act) or (not p.trainable and frozen_fp32):
            total += precision.act * p.numel
    tied = not any(p.name.startswith("lm_head") and not p.lora for p in table)
    if tied and ((precision.base_trainable and precision.lora != precision.act) or frozen_fp32):
        vocab, hidden = table[0].shape  # tied lm_head: the embedding matrix is cast for the output projection
        total += precision.act * vocab * hidden
    return total


# --------------------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """Peak memory per GPU (bytes) for one recipe on one cluster shape, with a verdict and what to change."""
    model: str
    mode: str
    """`qlora`, `lora` or `full`."""
    gpus: int
    nodes: int
    dp: int
    zero_stage: int
    offload_optimizer: bool
    micro_batch_size: int
    grad_accum: int
    max_seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    dtype: str
    total_params: int
    trainable_params: int
    quantized_params: int
    gpu_mem_bytes: int
    # per-GPU components
    weights: int
    trainable_weights: int
    master_weights: int
    gradients: int
    grad_buffers: int
    optimizer_states: int
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    autocast_weights: int
    """Compute-dtype copies of fp32 weights used by matmuls (trainable ones; QLoRA's fp32 lm_head) that autocast
    makes and autograd keeps until backward."""
    logits: int
    logits_grad: int
    optimizer_step_transient: int
    cuda_reserve: int
    total: int
    headroom: int
    fits: bool
    peak_phase: str
    """`forward/backward` or `optimizer step`: which of the two phases sets the peak."""
    # host memory for DeepSpeed optimizer offload
    cpu_ram_per_rank: int = 0
    cpu_ram_per_node: int = 0
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp

    def components(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) rows in table order."""
        offload = " (CPU: offloaded)" if self.offload_optimizer else ""
        part = f" / {self.dp} ranks" if self.zero_stage >= 1 else ""
        ckpt = "checkpointing on" if self.gradient_checkpointing else "checkpointing off"
        return [
            ("weights (frozen)", self.weights, "NF4 + constants" if self.mode == "qlora" else self.dtype),
            ("trainable weights", self.trainable_weights, f"{self.trainable_params:,} params"),
            ("fp32 master weights", self.master_weights, (f"ZeRO-{self.zero_stage}{part}{offload}"
                                                          if self.zero_stage else "none (not DeepSpeed)")),
            ("gradients", self.gradients, f"ZeRO-{self.zero_stage}{part}" if self.zero_stage >= 2 else "full"),
            ("gradient buffers", self.grad_buffers, "DeepSpeed reduce bucket" if self.zero_stage else
             ("DDP buckets" if self.dp > 1 else "none")),
            ("optimizer states", self.optimizer_states, f"{self.optimizer}{part}{offload}"),
            ("activations", self.activations, f"{ckpt}; other setting: "
             f"{_gib(self.activations_no_checkpointing if self.gradient_checkpointing else self.activations_checkpointing)} GiB"),
            ("autocast weight copies", self.autocast_weights, f"{self.dtype} casts of fp32 trainable weights"
             if self.autocast_weights else "none"),
            ("logits", self.logits, "fp32 log-softmax kept for backward"),
            ("logits gradient", self.logits_grad, "transient, start of backward"),
            ("optimizer step scratch", self.optimizer_step_transient, "transient, activations freed by then"
             if self.optimizer_step_transient else "none (fused / in-place optimizer)"),
            ("CUDA context/fragmentation", self.cuda_reserve, "fixed allowance"),
        ]


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def _bytes_of(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def _estimate_core(recipe, model_config, *, gpus: int, gpu_mem_gib: float, nodes: int, zero_stage: int | None,
                   offload_optimizer: bool, reduce_bucket_size: int | None, overlap_comm: bool) -> Estimate:
    m, t, data, lora = recipe.model, recipe.train, recipe.data, recipe.lora
    if gpus < 1 or nodes < 1:
        raise UserError(f"gpus={gpus}, nodes={nodes}: both must be at least 1")
    if gpu_mem_gib <= 0:
        raise UserError(f"gpu_mem_gib={gpu_mem_gib} must be positive")
    dp = gpus * nodes
    stage = 0 if zero_stage is None else int(zero_stage)
    if stage not in (0, 1, 2):
        raise UserError(f"zero_stage={zero_stage}: the trainer runs DDP (0) or DeepSpeed ZeRO-1/2; ZeRO-3 is not "
                        "supported")
    implied = offload_optimizer and stage == 0
    if implied:  # optimizer offload only exists in DeepSpeed: plan the ZeRO-2 launch it implies
        stage = 2
    if m.quantization == "nf4" and lora is None:
        raise UserError("model.quantization=nf4 needs LoRA (a 4-bit base cannot be fully fine-tuned)")
    deepspeed = stage > 0
    e = _bytes_of(m.dtype)
    full = lora is None
    mode = "full" if full else ("qlora" if m.quantization == "nf4" else "lora")
    d = model_dims(model_config)
    table = parameter_table(model_config, lora, quantization=m.quantization)

    # weights ---------------------------------------------------------------------------------------------------
    frozen = [p for p in table if not p.trainable]
    trainable = [p for p in table if p.trainable]
    n_train = sum(p.numel for p in trainable)
    # QLoRA: trainer.model.build_model calls peft.prepare_model_for_kbit_training, which upcasts every
    # non-quantized bf16/fp16 parameter (embeddings, norms, lm_head) to fp32; DeepSpeed casts them back.
    upcast = mode == "qlora" and not deepspeed
    frozen_bytes = 4 if upcast else e
    weights = sum(nf4_bytes(p.numel) if p.quantized else frozen_bytes * p.numel for p in frozen)
    if deepspeed:
        w_bytes = e  # DeepSpeed casts every floating parameter to the compute dtype
    else:
        w_bytes = 4  # LoRA weights / full-FT master weights in fp32
    trainable_weights = w_bytes * n_train
    precision = Precision(act=e, res=e if (deepspeed or not (full or upcast)) else 4,
                          autocast=(not deepspeed and e != 4), lora=w_bytes, base_trainable=full,
                          mlp=4 if upcast else None)

    # gradients, optimizer ------------------------------------------------------------------------------------
    numels = [p.numel for p in trainable]
    notes: list[str] = []
    cpu_rank = 0
    if not deepspeed:
        master = 0
        gradients = 4 * n_train
        grad_buffers = 4 * n_train if dp > 1 else 0  # DDP bucket views (gradient_as_bucket_view=False)
        optimizer_states = adam_state_bytes(numels, t.optimizer)
        step_transient = 0  # fused AdamW on CUDA (trainer.optim) and bitsandbytes update in place
    else:
        # trainer.optim.param_groups: 2-D tensors (weight decay) and 1-D ones (none), each its own flat group
        groups = [[p.numel for p in trainable if len(p.shape) >= 2], [p.numel for p in trainable if len(p.shape) < 2]]
        groups = [g for g in groups if g]
        part = zero2_partition_numel([sum(g) for g in groups], dp)
        master = 4 * part
        optimizer_states = sum(adam_state_bytes([zero2_partition_numel(sum(g), dp)], t.optimizer) for g in groups)
        bucket = int(reduce_bucket_size) if reduce_bucket_size else DS_REDUCE_BUCKET_SIZE
        grad_buffers = e * bucket * (2 if overlap_comm else 1)
        if stage >= 2:
            gradients = e * sum(zero2_grad_partition_numel(g, dp) for g in groups)
        else:
            gradients = e * n_train
        step_transient = 4 * part  # fp32 gradient partition built in step()
        notes.append(f"DeepSpeed: {len(groups)} flat param group(s), {n_train:,} trainable params -> {part:,} per "
                     f"rank; reduce bucket {bucket:,} elements{' x2 (overlap_comm)' if overlap_comm else ''}")
        if offload_optimizer:
            largest = max(numels) if numels else 0
            cpu_rank = (master + optimizer_states + 4 * part + e * part + e * largest
                        + (e * sum(numels) // dp if t.grad_accum > 1 else 0))
            master = optimizer_states = 0
            gradients = 0 if stage >= 2 else gradients
            grad_buffers += e * largest
            step_transient = 0

    # activations -----------------------------------------------------------------------------------------------
    mask = m.attn_implementation != "flash_attention_2" and (data.packing or t.micro_batch_size > 1)
    acts = activation_bytes(model_config, batch=t.micro_batch_size, seq=data.max_seq_len, precision=precision,
                            lora=lora, attn_implementation=m.attn_implementation, attention_mask=mask)
    no_ckpt = d.layers * acts["per_layer"] + acts["head"]
    with_ckpt = d.layers * acts["layer_input"] + acts["per_layer"] + acts["head"]
    activations = with_ckpt if m.gradient_checkpointing else no_ckpt
    logits, logits_grad = acts["logits"], acts["logits_grad"]
    autocast_w = autocast_weight_bytes(table, precision, frozen_fp32=upcast)

    static = weights + trainable_weights + master + gradients + grad_buffers + optimizer_states + CUDA_RESERVE_BYTES
    fwd_bwd = activations + autocast_w + logits + logits_grad
    total = static + max(fwd_bwd, step_transient)
    capacity = int(gpu_mem_gib * GiB)
    if mask:
        notes.append("attention mask assumed (packing or padded micro-batches with SDPA): K/V repeated and an "
                     "additive mask saved per layer; flash_attention_2 avoids both")
    if implied:
        notes.append("optimizer offload implies DeepSpeed ZeRO-2 (launch with ds_configs/zero2_offload.json)")
    if upcast:
        notes.append("QLoRA: embeddings, norms and lm_head in fp32 (peft.prepare_model_for_kbit_training upcasts "
                     "them), so the hidden states between layers are fp32 too")
    if t.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer states counted on the GPU; under pressure they page out to CPU RAM")
    return Estimate(
        model=str(getattr(m, "name_or_path", "")), mode=mode, gpus=gpus, nodes=nodes, dp=dp, zero_stage=stage,
        offload_optimizer=offload_optimizer, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
        max_seq_len=data.max_seq_len, gradient_checkpointing=m.gradient_checkpointing, optimizer=t.optimizer,
        dtype=m.dtype, total_params=sum(p.numel for p in table if not p.lora), trainable_params=n_train,
        quantized_params=sum(p.numel for p in table if p.quantized), gpu_mem_bytes=capacity,
        weights=weights, trainable_weights=trainable_weights, master_weights=master, gradients=gradients,
        grad_buffers=grad_buffers, optimizer_states=optimizer_states, activations=activations,
        activations_no_checkpointing=no_ckpt, activations_checkpointing=with_ckpt, autocast_weights=autocast_w,
        logits=logits,
        logits_grad=logits_grad, optimizer_step_transient=step_transient, cuda_reserve=CUDA_RESERVE_BYTES,
        total=total, headroom=capacity - total, fits=total <= capacity,
        peak_phase="forward/backward" if fwd_bwd >= step_transient else "optimizer step",
        cpu_ram_per_rank=cpu_rank, cpu_ram_per_node=cpu_rank * gpus, notes=notes)


def estimate(recipe, model_config, *, gpus: int, gpu_mem_gib: float, nodes: int = 1, zero_stage: int | None = None,
             offload_optimizer: bool = False, reduce_bucket_size: int | None = None,
             overlap_comm: bool = True) -> Estimate:
    """Peak GPU memory per device for `recipe` on `nodes` x `gpus` GPUs of `gpu_mem_gib` each.

    `zero_stage`: None/0 plain DDP (or one GPU), 1 or 2 DeepSpeed ZeRO; `offload_optimizer`: DeepSpeed CPU
    offload of optimizer states, fp32 master weights and gradients (reported as CPU RAM). `reduce_bucket_size`
    (elements) and `overlap_comm` (two buckets) default to ds_configs/zero2.json: 5e7 and true.
    `gpus` is per node; the data-parallel degree is gpus * nodes.
    """
    kwargs = dict(gpus=gpus, gpu_mem_gib=gpu_mem_gib, nodes=nodes, zero_stage=zero_stage,
                  offload_optimizer=offload_optimizer, reduce_bucket_size=reduce_bucket_size, overlap_comm=overlap_comm)
    est = _estimate_core(recipe, model_config, **kwargs)
    if not est.fits:
        est.suggestions = _suggestions(recipe, model_config, est, kwargs)
    elif est.headroom < 0.05 * est.gpu_mem_bytes:
        est.notes.append("fits with under 5% headroom: expect allocator retries; consider the next smaller "
                         "micro_batch_size")
    return est


# --------------------------------------------------------------------------------------------------------------
# Suggestions
# --------------------------------------------------------------------------------------------------------------

def _with(recipe, **sections):
    """dataclasses.replace on sections of a frozen Recipe (no validation: the planner only reads it)."""
    changes = {}
    for name, values in sections.items():
        if values is None or not isinstance(values, dict):
            changes[name] = values
        else:
            changes[name] = dataclasses.replace(getattr(recipe, name), **values)
    return dataclasses.replace(recipe, **changes)


def _suggestions(recipe, model_config, est: Estimate, kwargs: dict) -> list[str]:
    """Changes in order of preference: gradient checkpointing, smaller micro-batches (same global batch), NF4,
    ZeRO-2 over more GPUs, optimizer offload, shorter sequences. Each is applied on top of the ones listed before
    it (switching a full fine-tune to QLoRA is shown as an alternative and not carried), steps that save nothing
    are left out, and the list stops at the first combination that fits."""
    out: list[str] = []
    cur, kw, best = recipe, dict(kwargs), est.total

    def run(r, k) -> Estimate:
        return _estimate_core(r, model_config, **k)

    def verdict(e: Estimate) -> str:
        if e.fits:
            return f"-> {_gib(e.total)} GiB per GPU, fits ({_gib(e.headroom)} GiB free)"
        return f"-> {_gib(e.total)} GiB per GPU, still {_gib(-e.headroom)} GiB over"

    def helps(e: Estimate) -> bool:
        return e.total < best - 2 ** 20

    # 1. gradient checkpointing
    if not cur.model.gradient_checkpointing:
        trial = _with(cur, model={"gradient_checkpointing": True})
        e = run(trial, kw)
        if helps(e):
            cur, best = trial, e.total
            out.append(f"turn on gradient checkpointing (model.gradient_checkpointing=true, ~30% slower) {verdict(e)}")
            if e.fits:
                return out
    # 2. smaller micro-batches, same global batch
    mb, ga = cur.train.micro_batch_size, cur.train.grad_accum
    if mb > 1:
        target = mb * ga
        chosen = None
        for c in sorted({c for c in (mb // 2, mb // 4, mb // 8, 2, 1) if 1 <= c < mb}, reverse=True):
            trial = _with(cur, train={"micro_batch_size": c, "grad_accum": -(-target // c)})
            chosen = (c, trial, run(trial, kw))
            if chosen[2].fits:
                break
        c, trial, e = chosen
        if helps(e):
            cur, best = trial, e.total
            new_ga = -(-target // c)
            out.append(f"lower train.micro_batch_size to {c} and raise train.grad_accum to {new_ga} (global batch "
                       f"{c * new_ga * est.dp}, was {est.global_batch}) {verdict(e)}")
            if e.fits:
                return out
    # 3. 4-bit base (QLoRA)
    if cur.lora is not None and cur.model.quantization != "nf4":
        trial = _with(cur, model={"quantization": "nf4"})
        e = run(trial, kw)
        if helps(e):
            cur, best = trial, e.total
            out.append(f"quantize the frozen base to 4 bit (model.quantization=nf4, QLoRA) {verdict(e)}")
            if e.fits:
                return out
    elif cur.lora is None:
        from trainer.config import LoraArgs as _Lora
        e = run(_with(cur, lora=_Lora(), model={"quantization": "nf4"}), kw)
        if helps(e):
            out.append(f"alternative to a full fine-tune: QLoRA (lora: {{r: 16, target_modules: all-linear}}, "
                       f"model.quantization=nf4; not carried into the next lines) {verdict(e)}")
    # 4. ZeRO-2 over more GPUs
    now = kw["gpus"] * kw["nodes"]
    if now < 64:
        first = now * 2 if kw["zero_stage"] == 2 else max(2, now)
        options = []
        for dp in (2, 4, 8, 16, 32, 64):
            if dp >= first:
                trial_kw = dict(kw, gpus=min(dp, 8), nodes=max(1, dp // 8), zero_stage=2)
                options.append((trial_kw, run(cur, trial_kw)))
                if options[-1][1].fits:
                    break
        if options:
            trial_kw, e = options[-1] if options[-1][1].fits else next(
                (o for o in options if o[0]["gpus"] * o[0]["nodes"] >= 8), options[-1])
            if helps(e):
                kw, best = trial_kw, e.total
                where = (f"{kw['nodes']} nodes x {kw['gpus']} GPUs" if kw["nodes"] > 1 else f"{kw['gpus']} GPUs")
                out.append(f"DeepSpeed ZeRO-2 across {where} (partitions gradients and optimizer states; "
                           f"weights stay whole on every GPU) {verdict(e)}")
                if e.fits:
                    return out
    # 5. optimizer offload
    if not kw.get("offload_optimizer"):
        trial_kw = dict(kw, offload_optimizer=True, zero_stage=2)
        e = run(cur, trial_kw)
        if helps(e):
            kw, best = trial_kw, e.total
            out.append(f"ZeRO-2 with optimizer offload to CPU (needs {_gib(e.cpu_ram_per_node)} GiB host RAM per "
                       f"node, slower steps) {verdict(e)}")
            if e.fits:
                return out
    # 6. shorter sequences
    seq, e = cur.data.max_seq_len, None
    while seq > 256:
        seq //= 2
        e = run(_with(cur, data={"max_seq_len": seq}), kw)
        if e.fits:
            break
    if e is not None and helps(e):
        out.append(f"shorten data.max_seq_len to {seq} (longer samples get truncated or split) {verdict(e)}")
        if e.fits:
            return out
    out.append("no combination above fits: use a smaller model or GPUs with more memory (the weights stay whole on "
               "every GPU; ZeRO-3/FSDP weight sharding is not supported)")
    return out


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------

def format_table(est: Estimate) -> str:
    """A plain-text report (GiB, 2 decimals) for the CLI."""
    where = f"{est.nodes} x {est.gpus}" if est.nodes > 1 else f"{est.gpus}"
    engine = f"DeepSpeed ZeRO-{est.zero_stage}" if est.zero_stage else ("DDP" if est.dp > 1 else "single GPU")
    if est.offload_optimizer:
        engine += " + optimizer offload"
    head = [
        f"model       {est.model}  ({est.total_params / 1e9:.2f} B params, {est.mode}, {est.dtype})",
        f"trainable   {est.trainable_params:,} params ({100 * est.trainable_params / max(est.total_params, 1):.2f}%)",
        f"cluster     {where} GPU(s) of {_gib(est.gpu_mem_bytes)} GiB, {engine}",
        f"batch       micro {est.micro_batch_size} x seq {est.max_seq_len} x accum {est.grad_accum} x dp {est.dp} "
        f"= {est.global_batch} sequences/step; optimizer {est.optimizer}",
        "",
    ]
    rows = est.components()
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'component':<{width}}{'GiB':>9}  note", "-" * (width + 40)]
    for label, n, note in rows:
        lines.append(f"{label:<{width}}{_gib(n):>9}  {note}")
    lines.append("-" * (width + 40))
    lines.append(f"{'peak per GPU':<{width}}{_gib(est.total):>9}  peak during {est.peak_phase}")
    lines.append(f"{'GPU memory':<{width}}{_gib(est.gpu_mem_bytes):>9}")
    lines.append(f"{'headroom':<{width}}{_gib(est.headroom):>9}")
    if est.offload_optimizer:
        lines.append(f"{'CPU RAM per rank':<{width}}{_gib(est.cpu_ram_per_rank):>9}  "
                     f"x {est.gpus} ranks = {_gib(est.cpu_ram_per_node)} GiB per node (pinned)")
    verdict = ["", f"verdict: {'FITS' if est.fits else 'DOES NOT FIT'} "
                   f"({_gib(abs(est.headroom))} GiB {'free' if est.fits else 'over'})"]
    if est.suggestions:
        verdict.append("suggestions, in order (each on top of the previous):")
        verdict += [f"  {i}. {s}" for i, s in enumerate(est.suggestions, 1)]
    if est.notes:
        verdict.append("notes:")
        verdict += [f"  - {n}" for n in est.notes]
    return "\n".join(head + lines + verdict)


def estimate_to_dict(est: Estimate) -> dict[str, Any]:
    """JSON-ready: every field (bytes as ints), plus `global_batch` and each component in GiB."""
    out = dataclasses.asdict(est)
    out["global_batch"] = est.global_batch
    out["gib"] = {label: round(n / GiB, 2) for label, n, _ in est.components()}
    out["gib"]["total"] = round(est.total / GiB, 2)
    return out


# --------------------------------------------------------------------------------------------------------------
# Model configs without the network
# --------------------------------------------------------------------------------------------------------------

_LLAMA_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096, rms_norm_eps=1e-5),
    "mistralai/Mistral-7B-Instruct-v0.2": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None, rms_norm_eps=1e-5),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
        rope_theta=10000.0, **dict(_LLAMA_DEFAULTS, rms_norm_eps=1e-5)),
    "meta-llama/Llama-2-13b-hf": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
        rope_theta=10000.0, **_LLAMA_DEFAULTS),
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
        rope_theta=500000.0, **_LLAMA_DEFAULTS),
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0, **_LLAMA_DEFAULTS),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
        rope_theta=10000.0, **_LLAMA_DEFAULTS),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_theta=100000.0, **_LLAMA_DEFAULTS),
}
KNOWN_CONFIGS["meta-llama/Meta-Llama-3-8B-Instruct"] = KNOWN_CONFIGS["meta-llama/Meta-Llama-3-8B"]
KNOWN_CONFIGS["meta-llama/Llama-2-7b-chat-hf"] = KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"]
KNOWN_CONFIGS["meta-llama/Llama-3.2-1B-Instruct"] = KNOWN_CONFIGS["meta-llama/Llama-3.2-1B"]
KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"] = KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]


def _config_from_table(values: dict[str, Any]):
    from transformers import AutoConfig
    values = dict(values)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def load_model_config(name_or_path: str):
    """A `PretrainedConfig` without the network: a local folder's config.json, a `.gguf` file's metadata, a
    built-in table of common hub ids (`KNOWN_CONFIGS`; a missing local path whose last component names one of
    them, such as ~/.cache/trainer/models/SmolLM2-135M-Instruct, uses that entry), or the local HF cache."""
    from transformers import AutoConfig
    path = Path(str(name_or_path)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
            raise UserError(f"{path}: cannot read the model config from the GGUF metadata ({err})") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: folder has no config.json; point model.name_or_path at a model folder or "
                            "a .gguf file")
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise UserError(f"{path}/config.json: not a usable model config ({err})") from None
    if str(name_or_path) in KNOWN_CONFIGS:
        return _config_from_table(KNOWN_CONFIGS[str(name_or_path)])
    by_name = {key.rsplit("/", 1)[-1].lower(): key for key in KNOWN_CONFIGS}
    if not path.exists() and path.name.lower() in by_name:  # e.g. a not-yet-downloaded local copy of a known model
        return _config_from_table(KNOWN_CONFIGS[by_name[path.name.lower()]])
    try:
        return AutoConfig.from_pretrained(str(name_or_path), local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: fall through to the message below
        pass
    known = ", ".join(sorted(KNOWN_CONFIGS))
    raise UserError(f"model {name_or_path!r}: no local folder/.gguf of that name, not in the Hugging Face cache and "
                    f"not in the planner's offline table ({known}); download it first or pass a local path")


__all__ = ["Estimate", "estimate", "format_table", "estimate_to_dict", "load_model_config", "parameter_table",
           "count_parameters", "lora_parameter_count", "zero2_partition_numel", "zero2_grad_partition_numel",
           "nf4_bytes", "adam_state_bytes", "activation_bytes", "autocast_weight_bytes", "Precision", "ModelDims", "model_dims", "ParamInfo",
           "KNOWN_CONFIGS", "CUDA_RESERVE_BYTES", "GiB"]
