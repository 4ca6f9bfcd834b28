"""Batching rows into tensors: right padding as a position block of its own, labels -100 there."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.data.tokenize import IGNORE

if TYPE_CHECKING:  # torch is imported where tensors are made: `import trainer.data` stays light (recipe checks)
    import torch


def collate(rows: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest (or `pad_to`). Padding is its own position block with labels -100."""
    import torch

    width = pad_to or max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        pos[b, :n] = torch.tensor(r["position_ids"])
        pos[b, n:] = torch.arange(width - n)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "n_rows": torch.tensor(len(rows)),
        "n_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows)),
    }


def count_targets(labels: torch.Tensor) -> int:
    """Trainable tokens of a batch: labels that are targets after the causal shift."""
    return int((labels[:, 1:] != IGNORE).sum())
