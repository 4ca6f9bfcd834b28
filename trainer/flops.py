"""Model FLOPs per trained token, achieved TFLOP/s and MFU (model FLOPs utilisation).

Counted per token, as multiply-adds x 2, for the weights' matmuls (every Linear, lm_head included; embedding
lookups and norms are free) and for attention:

    forward                     2 * N                 N: parameters of all matmul weights (LoRA A/B included)
    backward, activation grads  2 * N                 needed through every layer down to the first adapter
    backward, weight grads      2 * N_trainable       only trainable matmul weights get a weight gradient
    attention (fwd + bwd)       12 * L * d_attn * s   QK^T and AV: 2 matmuls * 2 FLOPs * s keys, x3 with backward

    per token = 4 * N + 2 * N_trainable + 12 * L * d_attn * s

Full fine-tune: N_trainable = N, the familiar 6N. LoRA on a frozen base: 4 * N_base + 6 * N_lora (the base needs
no weight gradient, but its activation gradient still runs so the adapters below get theirs). L: decoder
layers; d_attn: heads * head dim; s: the context a token attends, the token-weighted mean sample length
sum(len^2) / sum(len) (a packed row's samples do not attend to each other, so their own lengths count, not the
row's). The attention term is the usual non-causal count (PaLM appendix B): causal attention does about half of it.

These are *model* FLOPs: the forward recomputed by gradient checkpointing is not counted (that would be hardware
FLOPs), so turning checkpointing on lowers MFU, as it lowers useful throughput.

MFU = achieved model FLOP/s / the device's dense peak for the compute dtype. Peaks are known only for a few
NVIDIA GPUs (`GPU_PEAK_TFLOPS`); elsewhere (CPU, other GPUs) MFU is omitted and only TFLOP/s is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer import arch

# Dense (no 2:4 sparsity) peak TFLOP/s per GPU, from NVIDIA's datasheets: bf16/fp16 on tensor cores, tf32 on
# tensor cores (fp32 matmuls with torch.backends.cuda.matmul.allow_tf32), fp32 without tensor cores.
# The first key found in torch.cuda.get_device_name() wins: more specific names come first.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},  # SXM5 (HBM3)
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "H800": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}


@dataclass(frozen=True)
class FlopsModel:
    """What the per-token FLOPs depend on, read once from the model."""

    matmul_params: int  # N: all matmul weights, frozen and trainable (lm_head included, embeddings not)
    trainable_matmul_params: int  # N_trainable
    layers: int  # L
    attn_dim: int  # d_attn = heads * head_dim

    def per_token(self, context: float) -> float:
        """Model FLOPs for one trained token whose sample is `context` tokens long (see the module docstring)."""
        return 4 * self.matmul_params + 2 * self.trainable_matmul_params + 12 * self.layers * self.attn_dim * context

    def for_tokens(self, tokens: float, sum_len_sq: float) -> float:
        """Model FLOPs for `tokens` trained tokens whose samples' squared lengths sum to `sum_len_sq`."""
        return (
            4 * self.matmul_params + 2 * self.trainable_matmul_params
        ) * tokens + 12 * self.layers * self.attn_dim * sum_len_sq


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    return model


def flops_model(model) -> FlopsModel:
    """Count matmul parameters (frozen / trainable) and read the attention shape from the model's config."""
    model = _unwrap(model)
    total = trainable = 0
    seen = set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):  # bitsandbytes' Linear4bit and peft's lora_A/B are Linear too
            continue
        w = module.weight
        key = id(w)
        if key in seen:
            continue
        seen.add(key)
        n = w.numel() * (2 if w.__class__.__name__ == "Params4bit" else 1)  # two 4-bit values per byte
        total += n
        trainable += n if w.requires_grad else 0
    cfg = arch.text_config(model.config)
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = arch.head_dim(cfg) if heads else 0
    return FlopsModel(
        matmul_params=total,
        trainable_matmul_params=trainable,
        layers=getattr(cfg, "num_hidden_layers", 0) or 0,
        attn_dim=heads * head_dim,
    )


def sample_lengths_sq(position_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Sum of squared sample lengths in a batch: samples start where position_ids restart at 0.

    A segment with no target token (right padding, which collate makes a position block of its own, or an
    empty slot) is not a sample and is not counted.
    """
    pos = position_ids.reshape(position_ids.shape[0], -1)
    rows, width = pos.shape
    starts = pos == 0
    seg = starts.cumsum(1) + torch.arange(rows).unsqueeze(1) * (width + 1)  # unique segment ids across rows
    seg = seg.flatten()
    lengths = torch.bincount(seg)
    has_target = torch.bincount(seg, weights=(labels.reshape(-1) != -100).double()) > 0
    return int((lengths[has_target].double() ** 2).sum())


def peak_tflops(dtype: str, device=None, tf32: bool | None = None) -> tuple[str, float] | None:
    """(device name, dense peak TFLOP/s) for the compute dtype (`fp32`/`bf16`/`fp16`), or None where unknown
    (CPU, unlisted GPU)."""
    if not torch.cuda.is_available():
        return None
    if device is not None and getattr(device, "type", str(device)) != "cuda":
        return None
    name = torch.cuda.get_device_name(device if device is not None else 0)
    kind = dtype
    if tf32 is None:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    if dtype == "fp32" and tf32:
        kind = "tf32"
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in name and kind in peaks:
            return name, peaks[kind]
    return None


class FlopsMeter:
    """Model FLOPs of the steps run so far, for the loop's metrics: TFLOP/s always, MFU where the peak is known."""

    def __init__(self, model, dtype: str, device=None, world: int = 1):
        self.model = flops_model(model)
        self.peak = peak_tflops(dtype, device)
        self.world = world
        self.tokens = self.len_sq = self.seconds = 0.0

    @staticmethod
    def batches_len_sq(batches) -> float:
        return float(sum(sample_lengths_sq(b["position_ids"], b["labels"]) for b in batches))

    def add(self, tokens: float, len_sq: float, seconds: float) -> None:
        self.tokens += tokens
        self.len_sq += len_sq
        self.seconds += seconds

    def metrics(self, tokens: float, len_sq: float, seconds: float) -> dict:
        """{'tflops': per-device model TFLOP/s, 'mfu': ... (only with a known peak)} for a window of steps."""
        if seconds <= 0 or tokens <= 0:
            return {}
        flops_per_s = self.model.for_tokens(tokens, len_sq) / seconds
        out = {"tflops": flops_per_s / self.world / 1e12}
        value = mfu(flops_per_s, self.peak[1] if self.peak else None, self.world)
        if value is not None:
            out["mfu"] = value
        return out

    def summary(self) -> dict:
        """Whole-session figures for run_summary.json: flops per token, TFLOP/s per device, MFU and its peak."""
        if self.tokens <= 0:
            return {}
        out = {
            "model_flops_per_token": round(self.model.for_tokens(self.tokens, self.len_sq) / self.tokens),
            **{k: round(v, 6) for k, v in self.metrics(self.tokens, self.len_sq, self.seconds).items()},
        }
        if self.peak:
            out["mfu_peak"] = f"{self.peak[0]}: {self.peak[1]:g} TFLOP/s"
        return out


def mfu(flops_per_s: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved model FLOP/s over all devices / (devices * per-device peak TFLOP/s), or None without a peak."""
    if not peak or devices < 1:
        return None
    return flops_per_s / (devices * peak * 1e12)
