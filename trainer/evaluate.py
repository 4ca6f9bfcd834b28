"""Evaluation: loss and perplexity over a split, gathered across ranks."""
from __future__ import annotations

import math

import torch

from trainer.data import collate
from trainer.model import token_loss_sum


@torch.no_grad()
def dataset_loss(model, rows, *, batch_size: int, pad_id: int, device, rank: int = 0, world: int = 1,
                 reduce=None, max_batches: int | None = None) -> dict:
    """Mean next-token loss over every target token of `rows` (rank r takes rows r, r+world, ...).

    `reduce(tensor)` sums across ranks (accelerator.reduce); perplexity is exp(mean token loss).
    """
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(rows), world))
    if max_batches is not None:
        mine = mine[: max_batches * batch_size]
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(mine), batch_size):
        batch = collate(rows.select(mine[start:start + batch_size]), pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, n = token_loss_sum(model, batch)
        totals += torch.stack([loss_sum.double(), n.double()])
    if reduce is not None:
        totals = reduce(totals)
    model.train(was_training)
    loss_sum, n = totals.tolist()
    loss = loss_sum / n if n else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)) if n else float("nan"), "tokens": int(n)}
