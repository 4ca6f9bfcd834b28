"""Packing several samples into rows of max_seq_len (best-fit decreasing) on the lengths alone, and writing rows
(packed or one sample per row) as Arrow, a batch of rows at a time: memory stays a constant plus one batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.data.tokenize import IGNORE

ROW_BATCH = 2048
"""Rows built and written at a time."""


def pack_lengths(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices per row, each row's lengths summing to at most `capacity`.

    Deterministic; rows come out ordered by their first (longest) sample. Typical padding waste is a few percent,
    against tens of percent for one sample per row. See `pack_groups` for the flat form used on large data."""
    order, starts = pack_groups(np.asarray(lengths, dtype=np.int64), capacity)
    return [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def pack_groups(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing on a lengths array -> (sample indices row after row, row starts into it, plus the end).

    Samples are placed longest first (ties: lower index first), each into the row whose free space is the smallest
    that still fits it, else into a new row. Finding that row: rows are bucketed by free space (0..capacity) and a
    bitmask (a Python int, bit c set when some row has c tokens free) gives the smallest fitting bucket with two
    word-parallel operations, so a sample costs O(capacity / 64) machine words, not O(capacity) Python steps; the
    sort is O(n log n). Within a bucket the row filled last is used first (a stack)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"sample lengths must be in [1, {capacity}]")
    order = np.lexsort((np.arange(n), -lengths))  # longest first, then by index
    row_of = np.empty(n, dtype=np.int64)
    free: list[list[int]] = [[] for _ in range(capacity + 1)]
    mask = 0
    n_rows = 0
    for i, need in zip(order.tolist(), lengths[order].tolist()):
        above = mask >> need
        if above:
            fit = need + ((above & -above).bit_length() - 1)
            bucket = free[fit]
            r = bucket.pop()
            if not bucket:
                mask ^= 1 << fit
            left = fit - need
        else:
            r, n_rows = n_rows, n_rows + 1
            left = capacity - need
        row_of[i] = r
        if not free[left]:
            mask |= 1 << left
        free[left].append(r)
    # Samples grouped by row, rows in creation order, samples within a row in placement order.
    placed = order[np.argsort(row_of[order], kind="stable")]
    counts = np.bincount(row_of, minlength=n_rows) if n else np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return placed, starts


def row_features():
    """Columns of a row, packed or not: ids, labels (-100 where no loss), position ids restarting at 0 at each
    sample, the sample ids it holds, the dataset of each, its length and target count."""
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    return datasets.Features(
        {
            "input_ids": ints,
            "labels": ints,
            "position_ids": ints,
            "sample_ids": datasets.List(datasets.Value("int64")),
            "datasets": datasets.List(datasets.Value("int16")),
            "length": datasets.Value("int32"),
            "n_target": datasets.Value("int32"),
        }
    )


def write_rows(samples, order: np.ndarray, starts: np.ndarray, path: Path, sample_ids: np.ndarray | None = None):
    """Write rows made of `samples` (a datasets.Dataset with input_ids, labels, length, n_target, dataset) to an
    Arrow file and return it memory-mapped. Row k holds samples order[starts[k]:starts[k+1]], concatenated.
    `sample_ids[i]`: the id recorded for sample i (default: i). Reads and writes ROW_BATCH rows at a time."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    features = row_features()
    path.parent.mkdir(parents=True, exist_ok=True)
    # pyarrow's take on the memory-mapped table: a batch's samples are copied once, and nothing stays behind
    # (datasets' row indexing builds one slice per sample and holds on to memory that grows with the data).
    table = samples.data.table
    mapping = samples._indices.column(0).to_numpy() if samples._indices is not None else None
    with ArrowWriter(features=features, path=str(path)) as writer:
        for k0 in range(0, len(starts) - 1, ROW_BATCH):
            k1 = min(k0 + ROW_BATCH, len(starts) - 1)
            idx = order[starts[k0] : starts[k1]]
            rows = idx if mapping is None else mapping[idx]
            part = table.take(pa.array(rows, type=pa.int64()))
            writer.write_table(_rows_table(part, idx, starts[k0 : k1 + 1] - starts[k0], sample_ids, features))
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def _rows_table(part, idx, row_starts, sample_ids, features):
    import pyarrow as pa

    lengths = _np(part["length"]).astype(np.int64)
    ids = _flat(part["input_ids"])
    labels = _flat(part["labels"])
    tok_ends = np.cumsum(lengths)
    sample_tok_start = tok_ends - lengths
    # position ids: 0.. within each sample
    pos = np.arange(len(ids), dtype=np.int64) - np.repeat(sample_tok_start, lengths)
    row_tok = np.concatenate([[0], tok_ends])[row_starts]  # token offset of each row start
    n_target = _np(part["n_target"]).astype(np.int64)
    row_targets = np.add.reduceat(n_target, row_starts[:-1]) if len(n_target) else np.zeros(0, np.int64)
    row_len = np.diff(row_tok)
    sids = idx if sample_ids is None else sample_ids[idx]
    offs_tok = pa.array(row_tok.astype(np.int32))
    offs_s = pa.array(row_starts.astype(np.int32))
    arrays = {
        "input_ids": pa.ListArray.from_arrays(offs_tok, pa.array(ids.astype(np.int32))),
        "labels": pa.ListArray.from_arrays(offs_tok, pa.array(labels.astype(np.int32))),
        "position_ids": pa.ListArray.from_arrays(offs_tok, pa.array(pos.astype(np.int32))),
        "sample_ids": pa.ListArray.from_arrays(offs_s, pa.array(np.asarray(sids, dtype=np.int64))),
        "datasets": pa.ListArray.from_arrays(offs_s, pa.array(_np(part["dataset"]).astype(np.int16))),
        "length": pa.array(row_len.astype(np.int32)),
        "n_target": pa.array(row_targets.astype(np.int32)),
    }
    return pa.Table.from_pydict(arrays, schema=features.arrow_schema)


def _np(column) -> np.ndarray:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy(zero_copy_only=False)


def _flat(column) -> np.ndarray:
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)


def pack(samples, max_seq_len: int, path: Path):
    """Tokenized samples -> packed rows written to `path` (memory-mapped), by best-fit decreasing on the lengths."""
    order, starts = pack_groups(np.asarray(samples.with_format("numpy")["length"]), max_seq_len)
    return write_rows(samples, order, starts, path)


def as_rows(samples, path: Path):
    """Unpacked: one sample per row, same columns as packed rows."""
    n = len(samples)
    return write_rows(samples, np.arange(n), np.arange(n + 1), path)


def unpack(rows) -> list[dict]:
    """Packed (or unpacked) rows -> their samples in sample_id order: {sample_id, input_ids, labels}. A sample
    starts where position_ids restart at 0."""
    out = []
    for r in rows:
        starts = [k for k, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for n, (a, b) in enumerate(zip(starts, starts[1:])):
            out.append({"sample_id": r["sample_ids"][n], "input_ids": r["input_ids"][a:b], "labels": r["labels"][a:b]})
    return sorted(out, key=lambda s: s["sample_id"])


__all__ = ["pack_lengths", "pack_groups", "pack", "as_rows", "write_rows", "row_features", "unpack", "IGNORE"]
