"""LoRA dropout whose masks do not depend on the number of processes.

peft's `lora_dropout` is a plain `nn.Dropout`: each rank draws its masks from its own torch RNG stream, in the
order its micro-batches arrive, so the same row gets another mask on 1 process than on 2 (a 2-process run
differed from a 1-process run by 0.016 in the loss with dropout 0.1), and a resume on another world size cannot
continue the same masks.

`RowDropout` replaces it (`install`). The mask of a training row is drawn from a generator seeded with
(train.seed, optimizer step, row index in the train split, LoRA module index) only: the element at (token t,
feature f) of row i is the same whatever process, micro-batch, position in the micro-batch, or padding the row
gets. The loop says which rows a micro-batch holds (`rows`); without that context (a forward outside the
training loop) it is a plain dropout on the torch RNG, like peft's. Same distribution as `nn.Dropout`: each
element kept with probability 1 - p and scaled by 1 / (1 - p).

Cost: the same count of random numbers as `nn.Dropout` (one per element of the row's real tokens) plus one
generator reseed per row and module. Memory: the mask saved for backward is bool (1 byte per element), as
`native_dropout` keeps on CUDA. A forward recomputed by gradient checkpointing draws the identical mask (it is a
function of the seed, not of the RNG's position), so no RNG state needs restoring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def row_seed(seed: int, step: int, row: int, module: int) -> int:
    """A 63-bit generator seed from (seed, step, row, module): splitmix64 over the four values, so nearby inputs
    give unrelated seeds (Steele et al. 2014, "Fast splittable pseudorandom number generators")."""
    h = 0x9E3779B97F4A7C15
    for value in (seed, step, row, module):
        h = (h + (value & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


@dataclass(frozen=True)
class Rows:
    """Which training rows the current micro-batch holds, in batch order: `ids` (row index in the train split; -1
    for an empty end-of-epoch slot) and `lengths` (real tokens of each row; positions past it are padding)."""

    seed: int
    step: int
    ids: tuple[int, ...]
    lengths: tuple[int, ...]


_GENERATORS: dict[torch.device, torch.Generator] = {}
_current: Rows | None = None  # a module global, not thread-local: CUDA runs backward (and the checkpointed
# forward it recomputes) on autograd's own thread


@contextlib.contextmanager
def rows(seed: int, step: int, ids: Sequence[int], lengths: Sequence[int]) -> Iterator[None]:
    """Within the block (the forward and backward of one micro-batch), RowDropout draws the masks of these rows."""
    global _current
    previous = _current
    _current = Rows(int(seed), int(step), tuple(int(i) for i in ids), tuple(int(n) for n in lengths))
    try:
        yield
    finally:
        _current = previous


class _Masked(torch.autograd.Function):
    """x * mask * scale, saving the bool mask (1 byte per element) rather than a float copy."""

    @staticmethod
    def forward(ctx, x, mask, scale: float):
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * mask * scale

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None, None


class RowDropout(torch.nn.Module):
    """Inverted dropout with per-row masks (module doc). `key`: this module's index among the model's LoRA
    dropouts (the same on every rank: the model is built the same way everywhere)."""

    def __init__(self, p: float, key: int):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p, self.key = float(p), int(key)

    def extra_repr(self) -> str:
        return f"p={self.p}, key={self.key}"

    @staticmethod
    def _generator(device: torch.device) -> torch.Generator:
        g = _GENERATORS.get(device)  # one per device, reseeded for every row: nothing stored in the module
        if g is None:
            g = _GENERATORS[device] = torch.Generator(device=device)
        return g

    def mask(self, shape: tuple[int, ...], device, context: Rows) -> torch.Tensor:
        """The bool keep-mask of a (rows, tokens, features...) input under `context`."""
        n_rows, width, features = shape[0], shape[1], shape[2:]
        if n_rows != len(context.ids):
            raise RuntimeError(
                f"LoRA dropout got {n_rows} rows but the loop declared {len(context.ids)}: "
                "the input is not (rows, tokens, features)"
            )
        keep = torch.ones(shape, dtype=torch.bool, device=device)
        g = self._generator(torch.device(device))
        for b, (row, length) in enumerate(zip(context.ids, context.lengths)):
            n = min(int(length), width)
            if n <= 0 or row < 0:
                continue
            g.manual_seed(row_seed(context.seed, context.step, row, self.key))
            # Drawn for the row's own length, never the padded width: on CUDA the values a given element gets
            # depend on the size of the draw.
            keep[b, :n] = torch.rand((n, *features), generator=g, device=device) >= self.p
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        context = _current
        if context is None or x.dim() < 3:
            return torch.nn.functional.dropout(x, self.p, training=True)
        return _Masked.apply(x, self.mask(tuple(x.shape), x.device, context), 1.0 / (1.0 - self.p))


def install(model) -> int:
    """Replace every peft LoRA `nn.Dropout` in `model` by a RowDropout of the same p; returns how many. Keys are
    assigned in `named_modules` order, which is the same on every rank."""
    key = 0
    for _, module in model.named_modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for adapter, layer in list(dropouts.items()):
            if isinstance(layer, torch.nn.Dropout) and layer.p > 0:
                dropouts[adapter] = RowDropout(layer.p, key)
                key += 1
    return key
