"""The demo's synthetic task: rows, splits and scoring (no model)."""

import json
import re

import pytest

from trainer.demo_task import (
    iso_date,
    make_rows,
    spell_date,
    write_splits,
)
from trainer.evaluate import exact_match
from trainer.evaluate import normalize_answer as normalize


def _prompts(rows):
    return [r["messages"][0]["content"] for r in rows]


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_are_chat_messages():
    rows = make_rows(20, seed=0)
    assert len(rows) == 20
    for row in rows:
        assert list(row) == ["messages"]
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert "YYYY-MM-DD" in user["content"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", assistant["content"])


def test_deterministic_for_a_seed():
    assert make_rows(50, seed=7) == make_rows(50, seed=7)
    assert make_rows(50, seed=7) != make_rows(50, seed=8)
    # a shorter request is a prefix of a longer one with the same seed
    assert make_rows(10, seed=7) == make_rows(50, seed=7)[:10]


def test_no_duplicate_prompts_or_dates():
    rows = make_rows(2000, seed=3)
    assert len(set(_prompts(rows))) == len(rows)
    assert len({r["messages"][1]["content"] for r in rows}) == len(rows)


def test_answers_match_the_date_in_the_prompt():
    months = {
        m: i
        for i, m in enumerate(
            [
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
            ],
            start=1,
        )
    }
    months.update({m[:3]: i for m, i in list(months.items())})
    for row in make_rows(300, seed=11):
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        year = int(re.search(r"\b(\d{4})\b", prompt).group(1))
        month = next(i for m, i in months.items() if re.search(rf"\b{m}\b", prompt))
        day = int(re.search(r"\b(\d{1,2})(?:st|nd|rd|th)?\b(?!\d)", prompt.replace(str(year), "")).group(1))
        assert answer == f"{year:04d}-{month:02d}-{day:02d}", prompt


@pytest.mark.parametrize(
    "args, text",
    [
        ((2024, 3, 5, 0), "March 5, 2024"),
        ((2024, 3, 5, 1), "5 March 2024"),
        ((2024, 3, 5, 2), "Mar 5, 2024"),
        ((2024, 3, 5, 3), "5 Mar 2024"),
        ((2024, 3, 5, 4), "5th of March 2024"),
        ((1999, 12, 31, 5), "December 31st, 1999"),
        ((2001, 1, 1, 4), "1st of January 2001"),
        ((2002, 2, 2, 5), "February 2nd, 2002"),
        ((2003, 4, 3, 4), "3rd of April 2003"),
        ((2011, 11, 11, 5), "November 11th, 2011"),
        ((2012, 6, 12, 4), "12th of June 2012"),
        ((2013, 7, 13, 5), "July 13th, 2013"),
        ((2021, 8, 21, 4), "21st of August 2021"),
        ((2022, 9, 22, 5), "September 22nd, 2022"),
    ],
)
def test_spell_date(args, text):
    assert spell_date(*args) == text


def test_iso_date_pads():
    assert iso_date(2024, 3, 5) == "2024-03-05"
    assert iso_date(1900, 12, 31) == "1900-12-31"


def test_write_splits_disjoint_and_deterministic(tmp_path):
    paths = write_splits(tmp_path / "a", seed=5, n_train=300, n_val=40, n_test=60)
    assert set(paths) == {"train", "val", "test"}
    assert {p.name for p in paths.values()} == {"train.jsonl", "val.jsonl", "test.jsonl"}
    splits = {k: _read(p) for k, p in paths.items()}
    assert [len(splits[k]) for k in ("train", "val", "test")] == [300, 40, 60]
    prompts = {k: set(_prompts(v)) for k, v in splits.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    answers = {k: {r["messages"][1]["content"] for r in v} for k, v in splits.items()}
    assert not answers["train"] & answers["test"]

    again = write_splits(tmp_path / "b", seed=5, n_train=300, n_val=40, n_test=60)
    for k in paths:
        assert paths[k].read_bytes() == again[k].read_bytes()


def test_normalize():
    assert normalize("  2024-03-05.\n") == "2024-03-05"
    assert normalize("2024-03-05 !") == "2024-03-05"
    assert normalize("Paris") == "Paris"
    assert normalize("") == ""


@pytest.mark.parametrize(
    "prediction, ok",
    [
        ("2024-03-05", True),
        (" 2024-03-05\n", True),
        ("2024-03-05.", True),
        ("2024-03-05<|im_end|>", False),
        ("The date is 2024-03-05.", False),
        ("2024-03-05 (ISO)", False),
        ("2024-3-5", False),
        ("05/03/2024", False),
        ("2024-03-05\n2024-03-05", False),
        ("", False),
    ],
)
def test_exact_match(prediction, ok):
    assert exact_match(prediction, "2024-03-05") is ok


def test_exact_match_is_case_sensitive():
    assert exact_match("paris", "Paris") is False
    assert exact_match("Paris.", "Paris") is True


def test_bad_n():
    with pytest.raises(ValueError):
        make_rows(-1, seed=0)
    assert make_rows(0, seed=0) == []
