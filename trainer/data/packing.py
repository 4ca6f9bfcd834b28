"""Packing several samples into rows of max_seq_len (best-fit decreasing), and the unpacked layout."""

from __future__ import annotations

from trainer.data.tokenize import IGNORE


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices per row, each row's lengths summing to at most `capacity`.

    Deterministic; rows come out ordered by their first (longest) sample. Typical padding waste is a
    few percent, against tens of percent for one sample per row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # free[c] = rows with exactly c tokens free; look for the tightest fit first.
    free: dict[int, list[int]] = {}
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


def pack(samples, max_seq_len: int):
    """Tokenized samples -> packed rows (lists of samples concatenated, position ids restarting)."""
    import datasets

    lengths = samples["length"]
    groups = pack_lengths(lengths, max_seq_len)
    cols = {k: samples[k] for k in ("input_ids", "labels", "sample_id", "row")}
    rows = {k: [] for k in ("input_ids", "labels", "position_ids", "sample_ids", "sample_rows", "length", "n_target")}
    for group in groups:
        ids, labels, pos, sids, srows = [], [], [], [], []
        for i in group:
            ids += cols["input_ids"][i]
            labels += cols["labels"][i]
            pos += list(range(len(cols["input_ids"][i])))
            sids.append(cols["sample_id"][i])
            srows.append(cols["row"][i])
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
        rows["sample_ids"].append(sids)
        rows["sample_rows"].append(srows)
        rows["length"].append(len(ids))
        rows["n_target"].append(sum(1 for x in labels if x != IGNORE))
    return datasets.Dataset.from_dict(rows)


def as_rows(samples):
    """Unpacked: one sample per row, same columns as packed rows."""
    return samples.map(
        lambda s: {
            "position_ids": list(range(s["length"])),
            "sample_ids": [s["sample_id"]],
            "sample_rows": [s["row"]],
        },
        remove_columns=["sample_id", "row", "truncated"],
    )


def unpack(rows) -> list[dict]:
    """Packed (or unpacked) rows -> their samples, in sample_id order: {sample_id, row, input_ids, labels}.
    A sample starts where position_ids restart at 0."""
    out = []
    for r in rows:
        starts = [k for k, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for n, (a, b) in enumerate(zip(starts, starts[1:])):
            out.append(
                {
                    "sample_id": r["sample_ids"][n],
                    "row": r["sample_rows"][n],
                    "input_ids": r["input_ids"][a:b],
                    "labels": r["labels"][a:b],
                }
            )
    return sorted(out, key=lambda s: s["sample_id"])
