"""The data step: mixing several datasets (weights, fixed samples, replacement, per-dataset splits and counts), the
same result whatever the number of processes, and who prepares while the others wait (lock, stale leftovers,
timeouts with a message)."""

import os
import time
from collections import Counter

import numpy as np
import pytest

from tests.conftest import write_jsonl
from trainer.config import DataArgs, recipe_from_dict
from trainer.data import cache_key, describe, prepare_data
from trainer.data.pipeline import DatasetSpec, _host, mix_draw
from trainer.errors import UserError


def write_three(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"A question {i}?", "completion": f"A{i}"} for i in range(10)])
    b = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"messages": [{"role": "user", "content": f"B {i}"}, {"role": "assistant", "content": f"b{i}"}]}
            for i in range(6)
        ],
    )
    c = tmp_path / "c.csv"
    c.write_text("instruction,output\n" + "".join(f"C task {i},0{i}\n" for i in range(4)))
    return a, b, c


def mixed(tmp_path, entries, cache="cache", **kw):
    cfg = DataArgs(datasets=entries, **{"max_seq_len": 64, "val_fraction": 0.2, "packing": False, **kw})
    return prepare_data(cfg, make_tok(), cache_root=tmp_path / cache, log=lambda m: None)


_TOK = {}


def make_tok():
    from tests.conftest import make_tokenizer

    return _TOK.setdefault("t", make_tokenizer())


def test_mix_by_weight_and_samples_with_per_dataset_splits_and_counts(tmp_path):
    a, b, c = write_three(tmp_path)
    entries = [
        {"path": str(a), "weight": 0.5},
        {"path": str(b), "name": "chat", "samples": 9},
        {"path": str(c), "weight": 2},
    ]
    data = mixed(tmp_path, entries)
    per = {d["name"]: d for d in data.stats["datasets"]}
    assert [(d["name"], d["format"], d["rows"]) for d in data.stats["datasets"]] == [
        ("a", "prompt_completion", 10),
        ("chat", "messages", 6),
        ("c", "alpaca", 4),
    ]
    # val: max(1, round(0.2 * rows)) per dataset; train: weight * the rest, or `samples`
    assert [(per[n]["train"]["samples"], per[n]["train"]["drawn"], per[n]["val"]["samples"]) for n in per] == [
        (8, 4, 2),
        (5, 9, 1),
        (3, 6, 1),
    ]
    assert data.stats["train"]["samples"] == len(data.train) == 19
    ids = [s for r in data.train["sample_ids"] for s in r]
    which = {s: d for r in data.train for s, d in zip(r["sample_ids"], r["datasets"])}
    by_dataset = Counter(which[s] for s in ids)
    assert by_dataset == {0: 4, 1: 9, 2: 6}
    counts = Counter(ids)
    assert sorted(counts[s] for s in counts if which[s] == 2) == [2, 2, 2]  # weight 2: every sample twice
    assert sorted(counts[s] for s in counts if which[s] == 1) == [1, 2, 2, 2, 2]  # 9 of 5: one copy, 4 more
    val_ids = {s for r in data.val["sample_ids"] for s in r}
    assert not val_ids & set(ids)  # a validation row is never trained, however often its dataset is drawn
    assert {n: len(v) for n, v in data.val_by_dataset().items()} == {"a": 2, "chat": 1, "c": 1}
    line = describe(data.stats)
    assert "a (prompt_completion): 10 rows, train 4 samples drawn of 8, val 2, test 0" in line
    assert "chat (messages): 6 rows, train 9 samples drawn of 5, val 1, test 0" in line
    # Deterministic from split_seed; another seed draws other rows.
    again = mixed(tmp_path, entries, cache="cache2")
    assert again.train["input_ids"] == data.train["input_ids"] and again.cache_dir.name == data.cache_dir.name
    other = mixed(tmp_path, entries, cache="cache3", split_seed=7)
    assert other.train["sample_ids"] != data.train["sample_ids"]


def test_mix_draw_with_and_without_replacement():
    train = np.arange(10, 20)
    assert mix_draw(train, DatasetSpec("x", "p"), 0) is train
    half = mix_draw(train, DatasetSpec("x", "p", weight=0.5), 0)
    assert len(half) == 5 and len(set(half.tolist())) == 5 and set(half.tolist()) <= set(train.tolist())
    more = mix_draw(train, DatasetSpec("x", "p", samples=25), 0)
    assert sorted(Counter(more.tolist()).values()) == [2] * 5 + [3] * 5
    drawn = mix_draw(train, DatasetSpec("x", "p", samples=25, replace=True), 0)
    assert len(drawn) == 25 and set(drawn.tolist()) <= set(train.tolist())
    assert max(Counter(drawn.tolist()).values()) > 1
    assert np.array_equal(drawn, mix_draw(train, DatasetSpec("x", "p", samples=25, replace=True), 0))


def test_recipe_checks_of_data_datasets():
    ok = recipe_from_dict({"data": {"datasets": [{"path": "a.jsonl", "weight": 2}, {"path": "b.csv", "samples": 5}]}})
    assert len(ok.data.datasets) == 2
    with pytest.raises(UserError) as err:
        recipe_from_dict(
            {
                "data": {
                    "path": "x",
                    "datasets": [{"path": "a.jsonl", "weight": -1, "samples": 2, "wieght": 1}, {"path": "a.jsonl"}],
                    "column_types": {"score": "decimal"},
                }
            }
        )
    lines = str(err.value).splitlines()
    assert "recipe: give data.path or data.datasets, not both (put the path in data.datasets as a {path: ...})" in lines
    assert "recipe: unknown key 'data.datasets[0].wieght'; did you mean 'weight'?" in lines
    assert "recipe: data.datasets[0]: give weight or samples, not both" in lines
    assert "recipe: data.datasets[0].weight=-1 must be a positive number" in lines
    assert "recipe: data.datasets: name 'a' is used twice; give each entry its own name" in lines
    assert "recipe: data.column_types.score='decimal' is not a column type; use one of str|int|float|bool|json" in lines


@pytest.mark.slow
def test_same_rows_whatever_the_number_of_processes(tmp_path, tokenizer):
    rows = [{"prompt": f"Question number {i} " * (i % 7 + 1), "completion": f"Answer {i}."} for i in range(2500)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    out = []
    for n in (1, 2):
        cfg = DataArgs(path=str(f), max_seq_len=128, num_proc=n)
        out.append(prepare_data(cfg, tokenizer, cache_root=tmp_path / f"cache{n}", log=lambda m: None))
    assert out[0].cache_dir.name == out[1].cache_dir.name  # num_proc is not part of the key
    for split in ("train", "val"):
        a, b = getattr(out[0], split), getattr(out[1], split)
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] and a["sample_ids"] == b["sample_ids"]


def test_leftovers_of_a_killed_run_are_removed_and_its_lock_taken_over(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    cfg = DataArgs(path=str(f), max_seq_len=64, val_fraction=0.0)
    root = tmp_path / "cache" / "data"
    key = cache_key(cfg, tokenizer)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for name in (f"{key}.tmp-{_host()}-{dead}", f"otherkey.tmp-{_host()}-{dead}", f"{key}.tmp123"):
        (root / name / "train").mkdir(parents=True)
    (root / f"{key}.lock").write_text(f"{_host()} {dead}\n")
    data = prepare_data(cfg, tokenizer, cache_root=tmp_path / "cache", log=lambda m: None)
    assert sorted(p.name for p in root.iterdir()) == [key]
    assert data.stats["train"]["samples"] == 3


def test_waiting_processes_stop_with_a_message_instead_of_hanging(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    cfg = DataArgs(path=str(f), max_seq_len=64, val_fraction=0.0, wait_timeout=1)
    root = tmp_path / "cache" / "data"
    root.mkdir(parents=True)
    key = cache_key(cfg, tokenizer)
    # Another process (alive: this one) holds the lock but has not touched it for 100 s.
    lock = root / f"{key}.lock"
    lock.write_text(f"{_host()} {os.getpid()}\n")
    os.utime(lock, (time.time() - 100, time.time() - 100))
    with pytest.raises(
        UserError, match=rf"shows no progress for \d+ s \(data.wait_timeout=1\); if it is gone, delete {lock}"
    ):
        prepare_data(cfg, tokenizer, cache_root=tmp_path / "cache", log=lambda m: None)
    lock.unlink()
    # Waiting (another rank of the node prepares) and nobody starts.
    with pytest.raises(UserError, match=r"and none started \(data.wait_timeout=1\)"):
        prepare_data(cfg, tokenizer, cache_root=tmp_path / "cache", log=lambda m: None, wait=True)
    # The preparing process failed: the waiting ones stop with its message.
    (root / f"{key}.failed").write_text("d.jsonl:3: something the user must fix")
    with pytest.raises(UserError, match="^d.jsonl:3: something the user must fix$"):
        prepare_data(cfg, tokenizer, cache_root=tmp_path / "cache", log=lambda m: None, wait=True)
