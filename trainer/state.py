"""TrainState: where the run is. A global cursor into one permutation per epoch makes data order
independent of the number of processes, which is what lets a run resume exactly, even on another world size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    cursor: int = 0  # rows of this epoch's permutation consumed, over all ranks
    samples_seen: int = 0
    tokens_seen: int = 0  # real (non-padding) tokens
    target_tokens_seen: int = 0
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    data_seed: int = 0
    wall_time: float = 0.0  # seconds of training over all sessions of this run

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


GROUP_STEPS = 50  # length grouping sorts windows of this many global batches (HF's LengthGroupedSampler: 50)


def epoch_order(
    n_rows: int, data_seed: int, epoch: int, lengths: np.ndarray | None = None, rows_per_step: int = 1
) -> np.ndarray:
    """This epoch's row order: a seeded permutation. With `lengths` (length grouping, packing off) each window of
    GROUP_STEPS global batches is sorted by length, cut into global batches, and those batches shuffled: a step's
    rows have similar lengths (little padding) while the order of steps stays random."""
    rng = np.random.default_rng([data_seed, epoch])
    order = rng.permutation(n_rows)
    if lengths is None:
        return order
    lengths = np.asarray(lengths)
    window = GROUP_STEPS * rows_per_step
    out = []
    for start in range(0, n_rows, window):
        part = order[start : start + window]
        part = part[np.argsort(-lengths[part], kind="stable")]
        steps = [part[i : i + rows_per_step] for i in range(0, len(part), rows_per_step)]
        out += [steps[i] for i in rng.permutation(len(steps))]
    return np.concatenate(out)


def step_rows(
    order: np.ndarray, cursor: int, micro_batch: int, grad_accum: int, world: int, rank: int
) -> list[list[int]]:
    """Row indices of this rank's `grad_accum` micro-batches for the step starting at `cursor`.

    The global batch is order[cursor : cursor + micro*accum*world]; micro-batch j of rank r is the
    slice at (j * world + r) * micro. At the end of an epoch some slices are short or empty: every rank
    still runs every micro-batch (collectives stay in step) and the loss is normalised by target tokens.
    """
    batch = order[cursor : cursor + micro_batch * grad_accum * world].tolist()
    return [batch[(j * world + rank) * micro_batch : (j * world + rank + 1) * micro_batch] for j in range(grad_accum)]
