"""Packing on the lengths alone: the same rows as the reference best-fit decreasing, and rows written as Arrow."""

import random

import datasets
import numpy as np

from trainer.data.packing import pack_groups, pack_lengths, write_rows


def reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The O(n * capacity) best-fit decreasing this replaces (tightest bucket by scanning, LIFO within a bucket)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows, free = [], {}
    for i in order:
        need = lengths[i]
        fit = next((c for c in range(need, capacity + 1) if free.get(c)), None)
        if fit is None:
            rows.append([i])
            r, left = len(rows) - 1, capacity - need
        else:
            r = free[fit].pop()
            rows[r].append(i)
            left = fit - need
        free.setdefault(left, []).append(r)
    return rows


def test_pack_lengths_equals_reference_fits_and_keeps_every_sample():
    rnd = random.Random(0)
    for capacity, hi in ((128, 100), (64, 64), (1024, 700)):
        lengths = [rnd.randint(1, hi) for _ in range(3000)]
        rows = pack_lengths(lengths, capacity)
        assert rows == reference_bfd(lengths, capacity)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    lengths = [rnd.randint(1, 100) for _ in range(500)]
    assert sum(lengths) / (len(pack_lengths(lengths, 128)) * 128) > 0.95


def test_pack_groups_flat_form_and_edge_cases():
    order, starts = pack_groups(np.array([5, 3, 5, 2]), 8)
    assert [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])] == [
        [0, 3],
        [2, 1],
    ]  # LIFO within a bucket, as before
    order, starts = pack_groups(np.array([], dtype=np.int64), 8)
    assert len(order) == 0 and starts.tolist() == [0]


def test_write_rows_concatenates_samples_with_restarting_positions(tmp_path):
    samples = datasets.Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3], [4, 5], [6]],
            "labels": [[-100, 2, 3], [-100, 5], [-100]],
            "length": [3, 2, 1],
            "n_target": [2, 1, 0],
            "dataset": [0, 1, 1],
        }
    )
    rows = write_rows(samples, np.array([2, 0, 1]), np.array([0, 2, 3]), tmp_path / "rows.arrow")
    assert rows[0] == {
        "input_ids": [6, 1, 2, 3],
        "labels": [-100, -100, 2, 3],
        "position_ids": [0, 0, 1, 2],
        "sample_ids": [2, 0],
        "datasets": [1, 0],
        "length": 4,
        "n_target": 2,
    }
    assert rows[1]["input_ids"] == [4, 5] and rows[1]["position_ids"] == [0, 1] and rows[1]["sample_ids"] == [1]
