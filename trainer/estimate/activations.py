"""Activation bytes: what autograd keeps for backward, with and without gradient checkpointing.

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
projections and lm_head; QLoRA's upcast lm_head) is cast to the compute dtype once per forward and the copy is kept
until backward: e bytes per such parameter (about 2 B/param for a full fine-tune without DeepSpeed).

Per-layer terms match, within a few bytes, what autograd saves for a tiny Llama on CPU (torch 2.13 / transformers 5;
tests/unit/test_estimate.py walks the autograd graph); on CUDA only the dropout mask (bool, 1 B) and the SDPA
kernel's choice (flash vs mem-efficient with the mask bias) differ, and both are modelled as stated above.
With LoRA and no checkpointing the first layer saves a little less than modelled (its input needs no grad).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.estimate.params import ModelDims, ParamInfo, linear_shapes, model_dims, resolve_lora_targets

DROPOUT_MASK_BYTES_CUDA = 1
"""`native_dropout` on CUDA keeps a bool mask; the CPU fallback keeps a float one (the tests measure on CPU)."""


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


def activation_bytes(
    model_config,
    *,
    batch: int,
    seq: int,
    precision: Precision,
    lora=None,
    attn_implementation: str = "sdpa",
    attention_mask: bool = False,
    dropout_mask_bytes: int = DROPOUT_MASK_BYTES_CUDA,
) -> dict[str, int]:
    """Bytes autograd keeps for one micro-batch (see the module docstring for every term).

    Returns per_layer (one decoder layer, no checkpointing), layer_input (what checkpointing keeps per layer),
    head (final norm, lm_head input when it trains, labels, embedding indices, the shared bool mask),
    logits (the fp32 log-softmax cross-entropy keeps) and logits_grad (transient at the start of backward).
    """
    d = model_dims(model_config)
    p = precision
    tokens = batch * seq
    targets = resolve_lora_targets(lora.target_modules) if lora is not None else ()
    r = int(lora.r) if lora is not None else 0
    dropout = float(getattr(lora, "dropout", 0.0) or 0.0) if lora is not None else 0.0
    eager = attn_implementation == "eager"
    mask = attention_mask and attn_implementation != "flash_attention_2"
    kv_repeated = eager or mask  # transformers repeats K/V unless SDPA runs mask-free with enable_gqa (or FA2)

    per_tok, counted = _norms_and_trainable_inputs(d, p, eager)
    per_tok += _lora_inputs(d, p, targets, r, dropout, counted, dropout_mask_bytes)
    per_tok += _attention_and_mlp(d, p, seq, eager=eager, kv_repeated=kv_repeated)
    mask_bias = p.act * (-(-seq // 16) * 16) * tokens if (mask and not eager) else 0
    return {
        "per_layer": per_tok * tokens + mask_bias,
        "layer_input": p.res * d.hidden * tokens,
        "head": _head_bytes(d, p, targets, r, batch=batch, seq=seq, mask=mask),
        "logits": 4 * d.vocab * tokens,
        "logits_grad": 8 * d.vocab * tokens,
    }


def _norms_and_trainable_inputs(d: ModelDims, p: Precision, eager: bool) -> tuple[int, set[str]]:
    """Per token per layer: the two RMSNorms, and in a full fine-tune the inputs its trainable Linears keep.

    Also returns the groups of Linear inputs already saved (`attn_in`: q/k/v, `o_in`, `mlp_in`: gate/up,
    `down_in`), which a LoRA module on the same input shares instead of copying."""
    h, act, res = d.hidden, p.act, p.res
    norm = 4 * h + 4 + (res * h if p.base_trainable else 0)
    per_tok = 2 * norm
    cast_copies = p.autocast and res != act
    counted = {"o_in"} if not eager else set()  # the SDPA output doubles as o_proj's input
    if p.base_trainable:
        per_tok += 3 * act * h if cast_copies else res * h  # q/k/v input
        per_tok += 2 * act * h if cast_copies else res * h  # gate/up input
        per_tok += act * d.intermediate  # down_proj input (SiLU(gate) * up)
        counted |= {"attn_in", "mlp_in", "down_in"}
        if eager:
            per_tok += act * d.q_dim
            counted.add("o_in")
    return per_tok, counted


def _lora_inputs(
    d: ModelDims,
    p: Precision,
    targets: Sequence[str],
    r: int,
    dropout: float,
    counted: set[str],
    dropout_mask_bytes: int,
) -> int:
    """Per token per layer: what each LoRA module of a decoder layer keeps (its input copy, the dropout mask,
    lora_A's output). Adds to `counted` the input groups it saves uncopied."""
    act, res = p.act, p.res
    in_feats = {name: in_f for name, (_, in_f) in linear_shapes(d).items()}
    src_bytes = {
        "q_proj": res,
        "k_proj": res,
        "v_proj": res,
        "o_proj": act,
        "gate_proj": res,
        "up_proj": res,
        "down_proj": act,
    }
    group_of = {
        "q_proj": "attn_in",
        "k_proj": "attn_in",
        "v_proj": "attn_in",
        "o_proj": "o_in",
        "gate_proj": "mlp_in",
        "up_proj": "mlp_in",
        "down_proj": "down_in",
    }
    per_tok = 0
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
    return per_tok


def _attention_and_mlp(d: ModelDims, p: Precision, seq: int, *, eager: bool, kv_repeated: bool) -> int:
    """Per token per layer: attention's saved q, k, v, output and logsumexp (plus eager's probabilities) and the
    SwiGLU intermediates."""
    act, q, a = p.act, d.q_dim, d.heads
    kv_saved = q if kv_repeated else d.kv_dim
    per_tok = act * (2 * q + 2 * kv_saved) + 4 * a  # SDPA/flash: q, k, v, out, fp32 logsumexp
    if eager:
        per_tok += a * seq * (4 + act)  # fp32 softmax output + probabilities in compute dtype
    per_tok += 3 * (p.mlp or act) * d.intermediate  # SwiGLU: gate out, SiLU out, up out
    return per_tok


def _head_bytes(d: ModelDims, p: Precision, targets: Sequence[str], r: int, *, batch: int, seq: int, mask: bool) -> int:
    """Outside the decoder layers, for the micro-batch: final norm, labels, lm_head's input when it trains (full
    fine-tune or a LoRA on lm_head), embedding indices, and once for all layers rotary cos/sin and the bool mask."""
    h, act, res = d.hidden, p.act, p.res
    cast_copies = p.autocast and res != act
    head_tok = 4 * h + 4 + 8  # final norm, labels
    if p.base_trainable:
        head_tok += res * h + (act if cast_copies else res) * h + 8  # norm weight, lm_head input, embedding indices
    elif "lm_head" in targets:
        head_tok += (act if p.autocast else p.lora) * h + (act if p.autocast else p.lora) * r
    shared = 2 * seq * d.head_dim * res  # rotary cos/sin, in the hidden-state dtype, shared by all layers
    shared += batch * seq * seq if mask else 0  # the bool attention mask
    return head_tok * batch * seq + shared


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
