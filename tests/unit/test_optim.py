import math

import pytest

from trainer.config import TrainArgs
from trainer.optim import lr_at
from trainer.state import epoch_order, step_rows


def test_cosine_with_warmup_known_values():
    cfg = TrainArgs(lr=1.0, scheduler="cosine", warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(0.0)
    assert lr_at(35, cfg, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_linear_constant_floor_and_ratio():
    assert lr_at(55, TrainArgs(lr=2.0, scheduler="linear", warmup_steps=0), 110) == pytest.approx(1.0)
    assert lr_at(99, TrainArgs(lr=2.0, scheduler="constant", warmup_steps=5), 100) == 2.0
    cfg = TrainArgs(lr=1.0, scheduler="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    # warmup_ratio: ceil(0.03 * 100) = 3 warmup steps
    assert lr_at(2, TrainArgs(lr=3.0, warmup_ratio=0.03), 100) == pytest.approx(3.0)
    assert lr_at(0, TrainArgs(lr=3.0, warmup_ratio=0.03), 100) == pytest.approx(1.0)


def test_step_rows_cover_epoch_once_for_any_world_size():
    order = epoch_order(23, data_seed=1, epoch=0)
    for world in (1, 2, 3):
        seen = []
        cursor = 0
        while cursor < 23:
            for rank in range(world):
                for mb in step_rows(order, cursor, 2, 2, world, rank):
                    seen += mb
            cursor += 2 * 2 * world
        assert sorted(seen) == list(range(23))


def padded_slots(order, lengths, rows_per_step, micro):
    """Batch slots when every micro-batch is padded to its longest row."""
    total = 0
    for s in range(0, len(order), rows_per_step):
        for m in range(s, min(s + rows_per_step, len(order)), micro):
            part = lengths[order[m : min(m + micro, s + rows_per_step)]]
            total += len(part) * part.max()
    return total


def test_length_grouping_cuts_padding_keeps_a_random_permutation():
    import numpy as np

    lengths = np.random.default_rng(0).integers(20, 256, size=1000)
    plain = epoch_order(1000, data_seed=3, epoch=0)
    grouped = epoch_order(1000, data_seed=3, epoch=0, lengths=lengths, rows_per_step=8)
    assert sorted(grouped.tolist()) == list(range(1000))  # every row once
    assert (grouped == epoch_order(1000, 3, 0, lengths, 8)).all()  # deterministic: resumes exactly
    assert not (grouped == epoch_order(1000, 3, 1, lengths, 8)).all()  # a new order each epoch
    real = lengths.sum()
    pad_plain = 1 - real / padded_slots(plain, lengths, 8, 8)
    pad_grouped = 1 - real / padded_slots(grouped, lengths, 8, 8)
    assert pad_plain > 0.3 and pad_grouped < 0.05
    # Steps come in random order, not longest first: step means are not sorted within a window.
    means = [lengths[grouped[i : i + 8]].mean() for i in range(0, 400, 8)]
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_plan_builds_each_epochs_order_once_and_a_new_one_per_epoch_and_seed():
    import numpy as np

    from trainer.loop import Plan

    lengths = np.random.default_rng(1).integers(20, 256, size=100)
    plan = Plan(rows=100, rows_per_step=8, steps_per_epoch=13, total_steps=26, lengths=lengths)
    for seed, epoch in [(3, 0), (3, 0), (3, 1), (4, 1), (3, 0)]:
        want = epoch_order(100, seed, epoch, lengths, 8)
        got = plan.epoch_order(seed, epoch)
        assert (got == want).all(), (seed, epoch)
        assert plan.epoch_order(seed, epoch) is got  # cached: not rebuilt on the next step of the same epoch
