"""The synthetic task of `trainer demo`: rewrite a date written in words as ISO 8601 (YYYY-MM-DD).

    user:      Convert 5th of March 2024 to YYYY-MM-DD.
    assistant: 2024-03-05

The date comes in one of several spellings (full or abbreviated month name, day before or after the
month, ordinal day) inside one of several phrasings of the request; the answer is exactly the ISO
date and nothing else. It suits a CPU demo:

* exact answers, computed by our code, checked by plain string equality;
* short: prompt + answer is ~60 tokens with SmolLM2's chat template (its default system prompt
  included), so a training step is cheap;
* SmolLM2-135M-Instruct gets it almost always wrong out of the box (it echoes the date, talks about
  calendars or answers in a sentence -- exact match ~0 on 50 test prompts), while a LoRA learns it in
  well under a hundred steps: month name -> number, zero padding, reordering.

Every row has a different calendar date, so no test date is ever seen in training.
"""

from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

# Spelled out rather than `calendar.month_name`, which follows the process locale.
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
MONTHS_SHORT = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

YEAR_MIN, YEAR_MAX = 1900, 2099
_N_DATES = sum(366 if calendar.isleap(y) else 365 for y in range(YEAR_MIN, YEAR_MAX + 1))

_PHRASINGS = [
    "Convert {date} to YYYY-MM-DD.",
    "Write {date} in ISO format (YYYY-MM-DD).",
    "What is {date} in YYYY-MM-DD format?",
    "Rewrite the date {date} as YYYY-MM-DD.",
]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def spell_date(year: int, month: int, day: int, style: int) -> str:
    """The date in words, in one of 6 styles (0..5)."""
    full, short = MONTHS[month - 1], MONTHS_SHORT[month - 1]
    return [
        f"{full} {day}, {year}",  # March 5, 2024
        f"{day} {full} {year}",  # 5 March 2024
        f"{short} {day}, {year}",  # Mar 5, 2024
        f"{day} {short} {year}",  # 5 Mar 2024
        f"{_ordinal(day)} of {full} {year}",  # 5th of March 2024
        f"{full} {_ordinal(day)}, {year}",  # March 5th, 2024
    ][style]


N_STYLES = 6


def iso_date(year: int, month: int, day: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}"


def make_rows(n: int, seed: int) -> list[dict]:
    """`n` chat rows `{"messages": [user, assistant]}`, the same for the same `seed`.

    No two rows share a calendar date (so no two share a prompt or an answer).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > _N_DATES // 2:  # rejection sampling slows down as the calendar fills up
        raise ValueError(f"at most {_N_DATES // 2} rows, got n={n}")
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    rows = []
    while len(rows) < n:
        year = rng.randint(YEAR_MIN, YEAR_MAX)
        month = rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        style = rng.randrange(N_STYLES)
        phrasing = rng.choice(_PHRASINGS)
        if (year, month, day) in seen:
            continue
        seen.add((year, month, day))
        prompt = phrasing.format(date=spell_date(year, month, day, style))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": iso_date(year, month, day)},
                ]
            }
        )
    return rows


def write_splits(out_dir: Path, seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, Path]:
    """Write `train.jsonl`, `val.jsonl`, `test.jsonl` under `out_dir`; no date (hence no prompt) is in two splits.

    Returns {"train": path, "val": path, "test": path}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_train + n_val + n_test, seed)
    parts = {
        "train": rows[:n_train],
        "val": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val :],
    }
    paths = {}
    for split, split_rows in parts.items():
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        paths[split] = path
    return paths
