"""The plan: per-GPU bytes of one recipe on one cluster shape, the verdict, what to change, the table.

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

NF4 bytes and the optimizer/ZeRO rules: `trainer.estimate.storage`; activations and autocast weight copies:
`trainer.estimate.activations`.

Peak per GPU = weights + trainable + master + gradients + grad buffers + optimizer states
             + max(activations + autocast weight copies + logits + logits gradient, optimizer-step transient)
             + CUDA reserve,
where the CUDA reserve (`CUDA_RESERVE_BYTES` = 1 GiB) covers the CUDA context, cuBLAS/NCCL workspaces and
allocator fragmentation. The model has been checked term by term on CPU, not yet against
`torch.cuda.max_memory_allocated` on a GPU; nvidia-smi reads higher than the allocator's peak (cached blocks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainer.arch import trainable_share
from trainer.config import nf4_without_lora
from trainer.dtypes import BYTES
from trainer.errors import UserError
from trainer.estimate.activations import Precision, activation_bytes, autocast_weight_bytes
from trainer.estimate.params import ParamInfo, model_dims, parameter_table
from trainer.estimate.storage import (
    DS_REDUCE_BUCKET_SIZE,
    adam_state_bytes,
    nf4_bytes,
    zero2_grad_partition_numel,
    zero2_partition_numel,
)

GiB = 1024**3
CUDA_RESERVE_BYTES = 1 * GiB
"""CUDA context (~0.5 GiB), cuBLAS/NCCL workspaces and caching-allocator fragmentation."""


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
    """Parameters of the base model (LoRA adapters not included; tied weights once)."""
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
    lora_params: int = 0
    """LoRA adapter parameters (0 for a full fine-tune); the model being trained has total_params + lora_params."""

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all data-parallel ranks (`TrainArgs.global_batch`, the one definition)."""
        from trainer.config import TrainArgs

        return TrainArgs(micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum).global_batch(self.dp)

    @property
    def trainable_share(self) -> float:
        """Percent of the trained model's parameters (base + adapters) that train, as training logs it."""
        return trainable_share(self.trainable_params, self.total_params + self.lora_params)

    def components(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) rows in table order."""
        offload = " (CPU: offloaded)" if self.offload_optimizer else ""
        part = f" / {self.dp} ranks" if self.zero_stage >= 1 else ""
        ckpt = "checkpointing on" if self.gradient_checkpointing else "checkpointing off"
        other = self.activations_no_checkpointing if self.gradient_checkpointing else self.activations_checkpointing
        return [
            ("weights (frozen)", self.weights, "NF4 + constants" if self.mode == "qlora" else self.dtype),
            ("trainable weights", self.trainable_weights, f"{self.trainable_params:,} params"),
            (
                "fp32 master weights",
                self.master_weights,
                (f"ZeRO-{self.zero_stage}{part}{offload}" if self.zero_stage else "none (not DeepSpeed)"),
            ),
            ("gradients", self.gradients, f"ZeRO-{self.zero_stage}{part}" if self.zero_stage >= 2 else "full"),
            (
                "gradient buffers",
                self.grad_buffers,
                ("DeepSpeed reduce bucket" if self.zero_stage else ("DDP buckets" if self.dp > 1 else "none")),
            ),
            ("optimizer states", self.optimizer_states, f"{self.optimizer}{part}{offload}"),
            ("activations", self.activations, f"{ckpt}; other setting: {_gib(other)} GiB"),
            (
                "autocast weight copies",
                self.autocast_weights,
                (f"{self.dtype} casts of fp32 trainable weights" if self.autocast_weights else "none"),
            ),
            ("logits", self.logits, "fp32 log-softmax kept for backward"),
            ("logits gradient", self.logits_grad, "transient, start of backward"),
            (
                "optimizer step scratch",
                self.optimizer_step_transient,
                (
                    "transient, activations freed by then"
                    if self.optimizer_step_transient
                    else "none (fused / in-place optimizer)"
                ),
            ),
            ("CUDA context/fragmentation", self.cuda_reserve, "fixed allowance"),
        ]


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


# --------------------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StateBytes:
    """Per-GPU bytes of what the optimizer side keeps: master weights, gradients, their buffers, states."""

    master: int
    gradients: int
    grad_buffers: int
    optimizer_states: int
    step_transient: int
    cpu_rank: int = 0
    """Host RAM per rank under DeepSpeed optimizer offload."""
    note: str | None = None


@dataclass(frozen=True)
class _ActivationBytes:
    """Per-GPU bytes of the forward/backward phase."""

    attention_mask: bool
    """Whether an attention mask is assumed (packing or padded micro-batches, without FlashAttention-2)."""
    activations: int
    no_checkpointing: int
    checkpointing: int
    autocast_weights: int
    logits: int
    logits_grad: int


def _check_cluster(
    gpus: int, gpu_mem_gib: float, nodes: int, zero_stage: int | None, offload_optimizer: bool
) -> tuple[int, bool]:
    """Validate the cluster shape; return the ZeRO stage to plan (0: one GPU or DDP) and whether optimizer
    offload implied it (offload only exists in DeepSpeed: a stage-0 request is planned as the ZeRO-2 launch)."""
    if gpus < 1 or nodes < 1:
        raise UserError(f"gpus={gpus}, nodes={nodes}: both must be at least 1")
    if gpu_mem_gib <= 0:
        raise UserError(f"gpu_mem_gib={gpu_mem_gib} must be positive")
    stage = 0 if zero_stage is None else int(zero_stage)
    if stage not in (0, 1, 2):
        raise UserError(
            f"zero_stage={zero_stage}: the trainer runs DDP (0) or DeepSpeed ZeRO-1/2; ZeRO-3 is not supported"
        )
    implied = offload_optimizer and stage == 0
    return (2 if implied else stage), implied


def _ddp_state_bytes(numels: list[int], dp: int, optimizer: str) -> _StateBytes:
    """One GPU or DDP: fp32 gradients, DDP bucket copies, whole optimizer states."""
    n_train = sum(numels)
    return _StateBytes(
        master=0,
        gradients=4 * n_train,
        grad_buffers=4 * n_train if dp > 1 else 0,  # DDP bucket views (gradient_as_bucket_view=False)
        optimizer_states=adam_state_bytes(numels, optimizer),
        step_transient=0,
    )  # fused AdamW on CUDA (trainer.optim) and bitsandbytes update in place


def _zero_state_bytes(
    trainable: list[ParamInfo],
    *,
    dp: int,
    stage: int,
    e: int,
    optimizer: str,
    grad_accum: int,
    offload: bool,
    reduce_bucket_size: int | None,
    overlap_comm: bool,
) -> _StateBytes:
    """DeepSpeed ZeRO-1/2 (`e`: compute-dtype bytes): fp32 master and optimizer states of this rank's partition,
    compute-dtype gradients (partitioned under ZeRO-2), reduce buckets; with offload, what moves to host RAM."""
    numels = [p.numel for p in trainable]
    n_train = sum(numels)
    # trainer.optim.param_groups: 2-D tensors (weight decay) and 1-D ones (none), each its own flat group
    groups = [[p.numel for p in trainable if len(p.shape) >= 2], [p.numel for p in trainable if len(p.shape) < 2]]
    groups = [g for g in groups if g]
    part = zero2_partition_numel([sum(g) for g in groups], dp)
    master = 4 * part
    optimizer_states = sum(adam_state_bytes([zero2_partition_numel(sum(g), dp)], optimizer) for g in groups)
    bucket = int(reduce_bucket_size) if reduce_bucket_size else DS_REDUCE_BUCKET_SIZE
    grad_buffers = e * bucket * (2 if overlap_comm else 1)
    if stage >= 2:
        gradients = e * sum(zero2_grad_partition_numel(g, dp) for g in groups)
    else:
        gradients = e * n_train
    note = (
        f"DeepSpeed: {len(groups)} flat param group(s), {n_train:,} trainable params -> {part:,} per "
        f"rank; reduce bucket {bucket:,} elements{' x2 (overlap_comm)' if overlap_comm else ''}"
    )
    if not offload:
        return _StateBytes(
            master=master,
            gradients=gradients,
            grad_buffers=grad_buffers,
            optimizer_states=optimizer_states,
            step_transient=4 * part,  # fp32 grads built in step()
            note=note,
        )
    largest = max(numels) if numels else 0
    cpu_rank = (
        master + optimizer_states + 4 * part + e * part + e * largest + (e * sum(numels) // dp if grad_accum > 1 else 0)
    )
    return _StateBytes(
        master=0,
        gradients=0 if stage >= 2 else gradients,
        grad_buffers=grad_buffers + e * largest,
        optimizer_states=0,
        step_transient=0,
        cpu_rank=cpu_rank,
        note=note,
    )


def _forward_backward_bytes(
    recipe, model_config, precision: Precision, table: list[ParamInfo], layers: int, upcast: bool
) -> _ActivationBytes:
    """Activations (with and without checkpointing), autocast weight copies and the logits of one micro-batch."""
    m, t = recipe.model, recipe.train
    mask = m.attn_implementation != "flash_attention_2" and (recipe.data.packing or t.micro_batch_size > 1)
    acts = activation_bytes(
        model_config,
        batch=t.micro_batch_size,
        seq=recipe.data.max_seq_len,
        precision=precision,
        lora=recipe.lora,
        attn_implementation=m.attn_implementation,
        attention_mask=mask,
    )
    no_ckpt = layers * acts["per_layer"] + acts["head"]
    with_ckpt = layers * acts["layer_input"] + acts["per_layer"] + acts["head"]
    return _ActivationBytes(
        attention_mask=mask,
        activations=with_ckpt if m.gradient_checkpointing else no_ckpt,
        no_checkpointing=no_ckpt,
        checkpointing=with_ckpt,
        autocast_weights=autocast_weight_bytes(table, precision, frozen_fp32=upcast),
        logits=acts["logits"],
        logits_grad=acts["logits_grad"],
    )


def _notes(recipe, states: _StateBytes, acts: _ActivationBytes, *, implied: bool, upcast: bool) -> list[str]:
    notes = [states.note] if states.note else []
    if acts.attention_mask:
        notes.append(
            "attention mask assumed (packing or padded micro-batches with SDPA): K/V repeated and an "
            "additive mask saved per layer; flash_attention_2 avoids both"
        )
    if implied:
        notes.append("optimizer offload implies DeepSpeed ZeRO-2 (launch with ds_configs/zero2_offload.json)")
    if upcast:
        notes.append(
            "QLoRA: embeddings, norms and lm_head in fp32 (peft.prepare_model_for_kbit_training upcasts "
            "them), so the hidden states between layers are fp32 too"
        )
    if recipe.train.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer states counted on the GPU; under pressure they page out to CPU RAM")
    return notes


def _estimate_core(
    recipe,
    model_config,
    *,
    gpus: int,
    gpu_mem_gib: float,
    nodes: int,
    zero_stage: int | None,
    offload_optimizer: bool,
    reduce_bucket_size: int | None,
    overlap_comm: bool,
) -> Estimate:
    """One plan, without suggestions (the arguments are `estimate`'s)."""
    m, t, lora = recipe.model, recipe.train, recipe.lora
    stage, implied = _check_cluster(gpus, gpu_mem_gib, nodes, zero_stage, offload_optimizer)
    if nf4_without_lora(recipe):
        raise UserError(nf4_without_lora(recipe))
    dp, deepspeed, e = gpus * nodes, stage > 0, BYTES[m.dtype]
    full = lora is None
    mode = "full" if full else ("qlora" if m.quantization == "nf4" else "lora")
    table = parameter_table(model_config, lora, quantization=m.quantization)
    trainable = [p for p in table if p.trainable]
    n_train = sum(p.numel for p in trainable)

    # QLoRA: trainer.model.build_model calls peft.prepare_model_for_kbit_training, which upcasts every
    # non-quantized bf16/fp16 parameter (embeddings, norms, lm_head) to fp32; DeepSpeed casts them back.
    upcast = mode == "qlora" and not deepspeed
    frozen_bytes = 4 if upcast else e
    weights = sum(nf4_bytes(p.numel) if p.quantized else frozen_bytes * p.numel for p in table if not p.trainable)
    # DeepSpeed casts every floating parameter to the compute dtype; else LoRA weights / full-FT masters in fp32
    w_bytes = e if deepspeed else 4
    precision = Precision(
        act=e,
        res=e if (deepspeed or not (full or upcast)) else 4,
        autocast=(not deepspeed and e != 4),
        lora=w_bytes,
        base_trainable=full,
        mlp=4 if upcast else None,
    )
    if deepspeed:
        states = _zero_state_bytes(
            trainable,
            dp=dp,
            stage=stage,
            e=e,
            optimizer=t.optimizer,
            grad_accum=t.grad_accum,
            offload=offload_optimizer,
            reduce_bucket_size=reduce_bucket_size,
            overlap_comm=overlap_comm,
        )
    else:
        states = _ddp_state_bytes([p.numel for p in trainable], dp, t.optimizer)
    acts = _forward_backward_bytes(
        recipe, model_config, precision, table, layers=model_dims(model_config).layers, upcast=upcast
    )

    static = (
        weights
        + w_bytes * n_train
        + states.master
        + states.gradients
        + states.grad_buffers
        + states.optimizer_states
        + CUDA_RESERVE_BYTES
    )
    fwd_bwd = acts.activations + acts.autocast_weights + acts.logits + acts.logits_grad
    total = static + max(fwd_bwd, states.step_transient)
    capacity = int(gpu_mem_gib * GiB)
    return Estimate(
        model=str(getattr(m, "name_or_path", "")),
        mode=mode,
        gpus=gpus,
        nodes=nodes,
        dp=dp,
        zero_stage=stage,
        offload_optimizer=offload_optimizer,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
        max_seq_len=recipe.data.max_seq_len,
        gradient_checkpointing=m.gradient_checkpointing,
        optimizer=t.optimizer,
        dtype=m.dtype,
        total_params=sum(p.numel for p in table if not p.lora),
        trainable_params=n_train,
        lora_params=sum(p.numel for p in table if p.lora),
        quantized_params=sum(p.numel for p in table if p.quantized),
        gpu_mem_bytes=capacity,
        weights=weights,
        trainable_weights=w_bytes * n_train,
        master_weights=states.master,
        gradients=states.gradients,
        grad_buffers=states.grad_buffers,
        optimizer_states=states.optimizer_states,
        activations=acts.activations,
        activations_no_checkpointing=acts.no_checkpointing,
        activations_checkpointing=acts.checkpointing,
        autocast_weights=acts.autocast_weights,
        logits=acts.logits,
        logits_grad=acts.logits_grad,
        optimizer_step_transient=states.step_transient,
        cuda_reserve=CUDA_RESERVE_BYTES,
        total=total,
        headroom=capacity - total,
        fits=total <= capacity,
        peak_phase="forward/backward" if fwd_bwd >= states.step_transient else "optimizer step",
        cpu_ram_per_rank=states.cpu_rank,
        cpu_ram_per_node=states.cpu_rank * gpus,
        notes=_notes(recipe, states, acts, implied=implied, upcast=upcast),
    )


def estimate(
    recipe,
    model_config,
    *,
    gpus: int,
    gpu_mem_gib: float,
    nodes: int = 1,
    zero_stage: int | None = None,
    offload_optimizer: bool = False,
    reduce_bucket_size: int | None = None,
    overlap_comm: bool = True,
) -> Estimate:
    """Peak GPU memory per device for `recipe` on `nodes` x `gpus` GPUs of `gpu_mem_gib` each.

    `zero_stage`: None/0 plain DDP (or one GPU), 1 or 2 DeepSpeed ZeRO; `offload_optimizer`: DeepSpeed CPU
    offload of optimizer states, fp32 master weights and gradients (reported as CPU RAM). `reduce_bucket_size`
    (elements) and `overlap_comm` (two buckets) default to ds_configs/zero2.json: 5e7 and true.
    `gpus` is per node; the data-parallel degree is gpus * nodes.
    """
    kwargs = {
        "gpus": gpus,
        "gpu_mem_gib": gpu_mem_gib,
        "nodes": nodes,
        "zero_stage": zero_stage,
        "offload_optimizer": offload_optimizer,
        "reduce_bucket_size": reduce_bucket_size,
        "overlap_comm": overlap_comm,
    }
    est = _estimate_core(recipe, model_config, **kwargs)
    if not est.fits:
        est.suggestions = _suggestions(recipe, model_config, est, kwargs)
    elif est.headroom < 0.05 * est.gpu_mem_bytes:
        est.notes.append(
            "fits with under 5% headroom: expect allocator retries; consider the next smaller micro_batch_size"
        )
    return est


# --------------------------------------------------------------------------------------------------------------
# Suggestions
# --------------------------------------------------------------------------------------------------------------


def _with(recipe, **sections):
    """The recipe with those sections changed (`config.with_sections`, the one way to do it)."""
    from trainer.config import LoraArgs, with_sections

    if isinstance(sections.get("lora"), LoraArgs):
        sections["lora"] = dataclasses.asdict(sections["lora"])
    return with_sections(recipe, **sections)


def _verdict(e: Estimate) -> str:
    if e.fits:
        return f"-> {_gib(e.total)} GiB per GPU, fits ({_gib(e.headroom)} GiB free)"
    return f"-> {_gib(e.total)} GiB per GPU, still {_gib(-e.headroom)} GiB over"


@dataclass
class _Search:
    """The suggestion search so far: the recipe and cluster (estimate's keyword arguments) the next step builds
    on, the lowest peak reached, and the lines written."""

    model_config: Any
    first: Estimate
    """The estimate that did not fit."""
    recipe: Any
    kw: dict
    best: int
    lines: list[str] = field(default_factory=list)

    def run(self, recipe, kw: dict) -> Estimate:
        return _estimate_core(recipe, self.model_config, **kw)

    def helps(self, e: Estimate) -> bool:
        """A step is worth a line when it saves more than 1 MiB over the best so far."""
        return e.total < self.best - 2**20

    def carry(self, line: str, e: Estimate, *, recipe=None, kw: dict | None = None) -> bool:
        """Write the step's line and build the next steps on it; True when it fits (the search ends)."""
        self.recipe = recipe if recipe is not None else self.recipe
        self.kw = kw if kw is not None else self.kw
        self.best = e.total
        self.lines.append(f"{line} {_verdict(e)}")
        return e.fits


def _try_checkpointing(s: _Search) -> bool:
    if s.recipe.model.gradient_checkpointing:
        return False
    trial = _with(s.recipe, model={"gradient_checkpointing": True})
    e = s.run(trial, s.kw)
    return s.helps(e) and s.carry(
        "turn on gradient checkpointing (model.gradient_checkpointing=true, ~30% slower)", e, recipe=trial
    )


def _try_smaller_micro_batches(s: _Search) -> bool:
    """The largest smaller micro-batch that fits (else micro-batch 1), same global batch."""
    mb, ga = s.recipe.train.micro_batch_size, s.recipe.train.grad_accum
    if mb <= 1:
        return False
    target = mb * ga
    for c in sorted({c for c in (mb // 2, mb // 4, mb // 8, 2, 1) if 1 <= c < mb}, reverse=True):
        new_ga = -(-target // c)
        trial = _with(s.recipe, train={"micro_batch_size": c, "grad_accum": new_ga})
        e = s.run(trial, s.kw)
        if e.fits:
            break
    if not s.helps(e):
        return False
    return s.carry(
        f"lower train.micro_batch_size to {c} and raise train.grad_accum to {new_ga} (global batch "
        f"{trial.train.global_batch(s.first.dp)}, was {s.first.global_batch})",
        e,
        recipe=trial,
    )


def _try_nf4(s: _Search) -> bool:
    """LoRA: quantize the base. Full fine-tune: show QLoRA as an alternative, not carried into later steps."""
    if s.recipe.lora is not None and s.recipe.model.quantization != "nf4":
        trial = _with(s.recipe, model={"quantization": "nf4"})
        e = s.run(trial, s.kw)
        return s.helps(e) and s.carry(
            "quantize the frozen base to 4 bit (model.quantization=nf4, QLoRA)", e, recipe=trial
        )
    if s.recipe.lora is None:
        from trainer.config import LoraArgs

        e = s.run(_with(s.recipe, lora=LoraArgs(), model={"quantization": "nf4"}), s.kw)
        if s.helps(e):
            s.lines.append(
                f"alternative to a full fine-tune: QLoRA (lora: {{r: 16, target_modules: all-linear}}, "
                f"model.quantization=nf4; not carried into the next lines) {_verdict(e)}"
            )
    return False


def _try_zero2(s: _Search) -> bool:
    """ZeRO-2 over 2, 4, ... 64 GPUs: the first size that fits, else 8 GPUs (one node) or the largest tried."""
    now = s.kw["gpus"] * s.kw["nodes"]
    if now >= 64:
        return False
    first = now * 2 if s.kw["zero_stage"] == 2 else max(2, now)
    options = []
    for dp in (d for d in (2, 4, 8, 16, 32, 64) if d >= first):
        trial_kw = dict(s.kw, gpus=min(dp, 8), nodes=max(1, dp // 8), zero_stage=2)
        options.append((trial_kw, s.run(s.recipe, trial_kw)))
        if options[-1][1].fits:
            break
    if not options:
        return False
    trial_kw, e = (
        options[-1]
        if options[-1][1].fits
        else next((o for o in options if o[0]["gpus"] * o[0]["nodes"] >= 8), options[-1])
    )
    if not s.helps(e):
        return False
    where = (
        f"{trial_kw['nodes']} nodes x {trial_kw['gpus']} GPUs" if trial_kw["nodes"] > 1 else f"{trial_kw['gpus']} GPUs"
    )
    return s.carry(
        f"DeepSpeed ZeRO-2 across {where} (partitions gradients and optimizer states; weights stay whole on every GPU)",
        e,
        kw=trial_kw,
    )


def _try_offload(s: _Search) -> bool:
    if s.kw.get("offload_optimizer"):
        return False
    trial_kw = dict(s.kw, offload_optimizer=True, zero_stage=2)
    e = s.run(s.recipe, trial_kw)
    return s.helps(e) and s.carry(
        f"ZeRO-2 with optimizer offload to CPU (needs {_gib(e.cpu_ram_per_node)} GiB host RAM per node, slower steps)",
        e,
        kw=trial_kw,
    )


def _try_shorter_sequences(s: _Search) -> bool:
    """Halve data.max_seq_len (not below 256) until it fits."""
    seq, e = s.recipe.data.max_seq_len, None
    while seq > 256:
        seq //= 2
        trial = _with(s.recipe, data={"max_seq_len": seq})
        e = s.run(trial, s.kw)
        if e.fits:
            break
    if e is None or not s.helps(e):
        return False
    return s.carry(f"shorten data.max_seq_len to {seq} (longer samples get truncated or split)", e, recipe=trial)


_STEPS = (_try_checkpointing, _try_smaller_micro_batches, _try_nf4, _try_zero2, _try_offload, _try_shorter_sequences)


def _suggestions(recipe, model_config, est: Estimate, kwargs: dict) -> list[str]:
    """Changes in order of preference: gradient checkpointing, smaller micro-batches (same global batch), NF4,
    ZeRO-2 over more GPUs, optimizer offload, shorter sequences. Each is applied on top of the ones listed before
    it (switching a full fine-tune to QLoRA is shown as an alternative and not carried), steps that save nothing
    are left out, and the list stops at the first combination that fits."""
    search = _Search(model_config=model_config, first=est, recipe=recipe, kw=dict(kwargs), best=est.total)
    for step in _STEPS:
        if step(search):
            return search.lines
    search.lines.append(
        "no combination above fits: use a smaller model or GPUs with more memory (the weights stay "
        "whole on every GPU; ZeRO-3/FSDP weight sharding is not supported)"
    )
    return search.lines


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
        f"trainable   {est.trainable_params:,} params ({est.trainable_share:.2f}%)",
        f"cluster     {where} GPU(s) of {_gib(est.gpu_mem_bytes)} GiB, {engine}",
        (
            f"batch       micro {est.micro_batch_size} x seq {est.max_seq_len} x accum {est.grad_accum} x dp {est.dp} "
            f"= {est.global_batch} sequences/step; optimizer {est.optimizer}"
        ),
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
        lines.append(
            f"{'CPU RAM per rank':<{width}}{_gib(est.cpu_ram_per_rank):>9}  "
            f"x {est.gpus} ranks = {_gib(est.cpu_ram_per_node)} GiB per node (pinned)"
        )
    verdict = [
        "",
        (
            f"verdict: {'FITS' if est.fits else 'DOES NOT FIT'} "
            f"({_gib(abs(est.headroom))} GiB {'free' if est.fits else 'over'})"
        ),
    ]
    if est.suggestions:
        verdict.append("suggestions, in order (each on top of the previous):")
        verdict += [f"  {i}. {s}" for i, s in enumerate(est.suggestions, 1)]
    if est.notes:
        verdict.append("notes:")
        verdict += [f"  - {n}" for n in est.notes]
    return "\n".join(head + lines + verdict)


def estimate_to_dict(est: Estimate) -> dict[str, Any]:
    """JSON-ready: every field (bytes as ints), plus `global_batch`, `trainable_share` (percent) and each component
    in GiB."""
    out = dataclasses.asdict(est)
    out["global_batch"] = est.global_batch
    out["trainable_share"] = est.trainable_share
    out["gib"] = {label: round(n / GiB, 2) for label, n, _ in est.components()}
    out["gib"]["total"] = round(est.total / GiB, 2)
    return out
