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
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas))
    if cfg.optimizer == "adamw":
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        # fused runs one kernel for all parameters on GPU; foreach is the fast path on CPU
        return torch.optim.AdamW(groups, fused=on_cuda or None, foreach=None if on_cuda else True, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kwargs)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
