"""Optimizer and learning-rate schedule. The schedule is a pure function of the step: nothing to save."""

from __future__ import annotations

import math

import torch

from trainer.config import TrainArgs


def warmup_steps(cfg: TrainArgs, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_at(step: int, cfg: TrainArgs, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to cfg.lr, then cosine/linear/constant decay."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.scheduler == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model, cfg: TrainArgs):
    """AdamW (torch or bitsandbytes 8-bit) over the trainable parameters. With `train.loraplus_lr_ratio` the groups
    are LoRA+'s (peft's `create_loraplus_optimizer`: B matrices and 1-D adapter weights at lr * ratio); every group
    keeps its `lr_ratio` to the recipe's lr, which `set_lr` applies at each step of the schedule."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas))
    if cfg.optimizer == "adamw":
        on_cuda = all(p.is_cuda for p in model.parameters() if p.requires_grad)
        # fused runs one kernel for all parameters on GPU; foreach is the fast path on CPU
        cls, kwargs = torch.optim.AdamW, {**kwargs, "fused": on_cuda or None, "foreach": None if on_cuda else True}
    else:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    if cfg.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(
            model, cls, loraplus_lr_ratio=cfg.loraplus_lr_ratio, loraplus_weight_decay=cfg.weight_decay, **kwargs
        )
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    else:
        optimizer = cls(param_groups(model, cfg.weight_decay), **kwargs)
    for group in optimizer.param_groups:
        group["lr_ratio"] = group["lr"] / cfg.lr
    return optimizer


def set_lr(optimizer, lr: float) -> None:
    """Every group's learning rate for this step: `lr` times the group's `lr_ratio` (1 but for LoRA+ groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
