import math

import pytest

from trainer.config import TrainConfig
from trainer.optim import lr_at
from trainer.state import epoch_order, step_rows


def test_cosine_with_warmup_known_values():
    cfg = TrainConfig(lr=1.0, scheduler="cosine", warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(0.0)
    assert lr_at(35, cfg, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_linear_constant_floor_and_ratio():
    assert lr_at(55, TrainConfig(lr=2.0, scheduler="linear", warmup_steps=0), 110) == pytest.approx(1.0)
    assert lr_at(99, TrainConfig(lr=2.0, scheduler="constant", warmup_steps=5), 100) == 2.0
    cfg = TrainConfig(lr=1.0, scheduler="cosine", warmup_steps=0, min_lr_ratio=0.1)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    # warmup_ratio: ceil(0.03 * 100) = 3 warmup steps
    assert lr_at(2, TrainConfig(lr=3.0, warmup_ratio=0.03), 100) == pytest.approx(3.0)
    assert lr_at(0, TrainConfig(lr=3.0, warmup_ratio=0.03), 100) == pytest.approx(1.0)


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
