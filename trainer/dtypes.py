"""The dtype vocabulary of recipes (`fp32`, `bf16`, `fp16`), defined once: torch dtype, bytes per element, and
the name accelerate's `mixed_precision` uses for it."""

from __future__ import annotations

from trainer.config import DTYPE_NAMES
from trainer.errors import UserError

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of each recipe dtype."""
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
"""accelerate's `mixed_precision` value for each recipe dtype (fp32: no autocast)."""


def torch_dtype(name: str):
    """`fp32` -> torch.float32, `bf16` -> torch.bfloat16, `fp16` -> torch.float16; UserError for anything else."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"dtype {name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def name_of(dtype) -> str | None:
    """The recipe name of a torch dtype or of a config's dtype string (`bfloat16`, `torch.float16`, ...), or None."""
    text = str(dtype).replace("torch.", "")
    return {
        "float32": "fp32",
        "float": "fp32",
        "bfloat16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        **{n: n for n in DTYPE_NAMES},
    }.get(text)
