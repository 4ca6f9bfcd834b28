"""Formats, chat rendering, label masks token by token, packing, splits, bad input."""

import json

import pytest
import torch

from tests.conftest import ALPACA, CHAT_SINGLE, make_model, make_tokenizer, write_jsonl
from trainer.config import DataArgs
from trainer.data import (
    IGNORE,
    chat_segments,
    collate,
    detect_format,
    pack_lengths,
    prepare_data,
    row_to_messages,
    split_indices,
    tokenize_sample,
)
from trainer.errors import UserError
from trainer.loss import token_loss_sum


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_labels_token_by_token(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    input_ids, labels = tokenize_sample(tokenizer, msgs, "completion")
    expected_ids, expected_labels = [], []
    for text, trained in [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hello<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("Goodbye<|im_end|>\n", True),
    ]:
        piece = ids(tokenizer, text)
        expected_ids += piece
        expected_labels += piece if trained else [IGNORE] * len(piece)
    assert input_ids == expected_ids
    assert labels == expected_labels
    # The end-of-turn token after each reply is trained although it is also the pad token.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tokenizer.pad_token_id
    trained = [t for t in labels if t != IGNORE]
    assert trained.count(im_end) == 2


def test_train_on_all_labels_everything(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    input_ids, labels = tokenize_sample(tokenizer, msgs, "all")
    assert labels == input_ids


def test_default_chatml_when_tokenizer_has_none():
    tok = make_tokenizer(chat_template=None)
    from trainer.tokenizer import ensure_chat_template

    ensure_chat_template(tok)
    segs = chat_segments(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert segs == [("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False), ("b<|im_end|>\n", True)]


def test_text_format_appends_eos_and_trains_all(tokenizer):
    input_ids, labels = tokenize_sample(tokenizer, "plain text", "completion")
    assert input_ids == ids(tokenizer, "plain text<|im_end|>")
    assert labels == input_ids


@pytest.mark.parametrize(
    "columns,expected",
    [
        (["messages"], "messages"),
        (["instruction", "input", "output"], "alpaca"),
        (["prompt", "completion"], "prompt_completion"),
        (["prompt", "response"], "prompt_completion"),
        (["text", "meta"], "text"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns, DataArgs(path="x")) == expected


def test_columns_mapping():
    cfg = DataArgs(path="x", columns={"prompt": "question", "completion": "answer"})
    assert detect_format(["question", "answer"], cfg) == "prompt_completion"
    msgs = row_to_messages({"question": "Q?", "answer": "A."}, "prompt_completion", cfg.columns, "f row 0")
    assert msgs == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


def test_alpaca_row_joins_input():
    msgs = row_to_messages({"instruction": "Translate", "input": "hola", "output": "hello"}, "alpaca", {}, "w")
    assert msgs[0]["content"] == "Translate\n\nhola" and msgs[1]["content"] == "hello"


def prepared(tmp_path, tokenizer, path, **kw):
    cfg = DataArgs(path=str(path), **{"max_seq_len": 64, "val_fraction": 0.0, **kw})
    return prepare_data(cfg, tokenizer, cache_root=tmp_path / "cache", log=lambda m: None)


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{"messages": [\n',
            ":2: malformed JSON line",
        ),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}\n',
            "unknown role 'robot'",
        ),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "no assistant turn"),
        ('{"instruction": "x", "output": ""}\n', "missing or empty field 'output'"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, tokenizer, bad, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(bad)
    with pytest.raises(UserError, match=message) as err:
        prepared(tmp_path, tokenizer, f)
    assert str(f) in str(err.value)


def test_empty_file(tmp_path, tokenizer):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(UserError, match="file is empty"):
        prepared(tmp_path, tokenizer, f)


def test_truncation_and_dropped_counts(tmp_path, tokenizer):
    rows = [
        {"prompt": "word " * 80, "completion": "answer"},  # prompt fills max_seq_len: no target left
        {"prompt": "short", "completion": "long answer " * 40},  # truncated but keeps targets
        {"prompt": "ok", "completion": "fine"},
    ]
    data = prepared(tmp_path, tokenizer, write_jsonl(tmp_path / "d.jsonl", rows), packing=False)
    s = data.stats["train"]
    assert s["truncated"] == 2 and s["dropped_no_target"] == 1 and s["samples"] == 2
    assert max(data.train["length"]) == 64


def test_split_is_seeded_and_disjoint():
    a = split_indices(100, 0.1, 0.2, seed=7)
    assert a == split_indices(100, 0.1, 0.2, seed=7)
    assert a != split_indices(100, 0.1, 0.2, seed=8)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (70, 10, 20)
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(100))


def test_pack_lengths_fits_and_keeps_every_sample():
    import random

    rnd = random.Random(0)
    lengths = [rnd.randint(1, 100) for _ in range(500)]
    rows = pack_lengths(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    fill = sum(lengths) / (len(rows) * 128)
    assert fill > 0.95, fill


@pytest.mark.slow
def test_alpaca_packing_fill_and_cache(tmp_path, tokenizer):
    cfg = DataArgs(path=str(ALPACA), max_seq_len=256, val_fraction=0.05)
    msgs = []
    data = prepare_data(cfg, tokenizer, cache_root=tmp_path, log=msgs.append)
    assert data.stats["train"]["samples"] + data.stats["val"]["samples"] == 1000
    assert data.stats["train"]["pack_fill"] > 0.95  # measured on tests/datagen.py's 1000 rows: 0.992
    sample_ids = [s for row in data.train["sample_ids"] for s in row] + [
        s for row in data.val["sample_ids"] for s in row
    ]
    assert sorted(sample_ids) == list(range(1000))
    again = prepare_data(cfg, tokenizer, cache_root=tmp_path, log=msgs.append)
    assert any("cached" in m for m in msgs)
    assert again.train["input_ids"] == data.train["input_ids"]
    # A changed data section is a different key: never served stale.
    other = prepare_data(
        DataArgs(path=str(ALPACA), max_seq_len=128, val_fraction=0.05), tokenizer, cache_root=tmp_path, log=msgs.append
    )
    assert other.cache_dir != data.cache_dir


def test_cache_key_follows_file_content(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    first = prepared(tmp_path, tokenizer, f)
    write_jsonl(f, [{"prompt": "a", "completion": "c"}] * 4)
    second = prepared(tmp_path, tokenizer, f)
    assert first.cache_dir != second.cache_dir


def test_packed_batch_equals_samples_one_by_one(tmp_path, tokenizer):
    """Per-sample loss in a packed row equals the loss of the sample run alone: no attention across samples."""
    model = make_model(len(tokenizer), init_std=0.3).eval()  # peaky attention: leaks would show
    lines = [json.loads(x) for x in CHAT_SINGLE.read_text().splitlines()][:8]
    data = prepared(tmp_path, tokenizer, write_jsonl(tmp_path / "c.jsonl", lines), max_seq_len=2048)
    samples = []
    for m in lines:
        i, lab = tokenize_sample(tokenizer, m["messages"], "completion")
        lab[0] = IGNORE
        samples.append({"input_ids": i, "labels": lab, "position_ids": list(range(len(i)))})
    with torch.no_grad():
        alone = [token_loss_sum(model, collate([s], tokenizer.pad_token_id)) for s in samples]
        total_alone = sum(x[0] for x in alone) / sum(x[1] for x in alone)
        packed = collate(list(data.train), tokenizer.pad_token_id, pad_to=2048)
        assert packed["input_ids"].shape[0] < len(samples)  # really packed
        loss, n = token_loss_sum(model, packed)
    assert int(n) == int(sum(x[1] for x in alone))
    torch.testing.assert_close(loss / n, total_alone, atol=1e-4, rtol=1e-5)
    # Without the position-id restarts the samples would see each other and the loss would differ.
    with torch.no_grad():
        leaky = dict(packed, position_ids=torch.arange(2048).expand_as(packed["input_ids"]))
        leak_loss, _ = token_loss_sum(model, leaky)
    assert abs(float(leak_loss / n - total_alone)) > 1e-2
