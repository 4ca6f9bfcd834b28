"""Bytes rules of the libraries that store weights and optimizer states: bitsandbytes NF4 and 8-bit AdamW, torch
AdamW, DeepSpeed ZeRO-1/2 partitioning.

NF4 (bitsandbytes `quantize_4bit`, blocksize 64, double quantization): per weight tensor of n elements,
ceil(n/2) packed bytes + ceil(n/64) uint8 absmax + 4 * ceil(ceil(n/64)/256) fp32 nested absmax + 4 (offset)
+ 1024 (nested 256-entry code) + 64 (16-entry NF4 code) = 0.5 B/param + ~0.127 bit/param + 1092 B per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from trainer.errors import UserError

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

KNOWN_OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


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
    maps the optimizer shares between all 8-bit tensors. Raises UserError for another optimizer name.
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
    group sizes; the result is the sum over groups of ceil(numel / (2 dp)) * 2. Raises ValueError for dp < 1.
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
