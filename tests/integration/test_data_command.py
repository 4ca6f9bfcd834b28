"""`trainer data RECIPE [key=value ...] [--show N] [--jsonl FILE]` through the real CLI: stats, highlighted
samples, the JSONL of every train sample (equal to tokenize_sample's output), the cache shared with `train`,
one-line errors with exit 2."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import write_jsonl
from trainer.config import DataArgs
from trainer.data import tokenize_sample
from trainer.tokenizer import run_tokenizer

ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{2 * i}."},
            {"role": "user", "content": "And times two?"},
            {"role": "assistant", "content": f"{4 * i}."},
        ]
    }
    for i in range(12)
]


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=600, env=env
    )


def recipe_file(tmp_path, model_dir, data_path, **data):
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": str(data_path), "max_seq_len": 128, "val_fraction": 0.25, **data},
        "output_dir": str(tmp_path / "run"),
    }
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.mark.slow
def test_data_verb_stats_show_and_jsonl(tmp_path, tiny_model_dir):
    data_path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    recipe = recipe_file(tmp_path, tiny_model_dir, data_path)
    out = cli("data", str(recipe), "data.max_seq_len=96", "--show", "1", "--jsonl", str(tmp_path / "s.jsonl"))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(ln.startswith("tokenizer: chat template model; a reply ends with ['<|im_end|>']") for ln in lines)
    stats = next(ln for ln in lines if ln.startswith("data: format=messages rows=12; train: 9 samples in "))
    assert "0 truncated, 0 dropped (no target left), fill " in stats and "val: 3 samples" in stats
    assert sum(ln.startswith("--- sample ") for ln in lines) == 1
    assert "<|im_start|>assistant\n" in out.stdout  # the rendered sample is printed
    samples = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [s["sample_id"] for s in samples] == sorted(s["sample_id"] for s in samples) and len(samples) == 9
    # Each sample is exactly what tokenize_sample gives its source row (unpacked from the packed rows).
    tok = run_tokenizer(str(tiny_model_dir)).tokenizer
    for s in samples:
        [(ids, labels)] = tokenize_sample(tok, ROWS[s["row"]]["messages"], DataArgs(path="x"))
        assert (s["input_ids"], s["labels"]) == (ids, labels)
    assert f"data: wrote 9 train samples to {tmp_path / 's.jsonl'}" in out.stdout

    # The same cache as train: a second `data` (and `train`) reads it.
    again = cli("data", str(recipe), "data.max_seq_len=96", "--show", "0")
    assert "data: cached tokenized dataset" in again.stdout

    # An existing JSONL is never overwritten.
    refused = cli("data", str(recipe), "--jsonl", str(tmp_path / "s.jsonl"))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "exists; remove it or give another file name" in refused.stderr


@pytest.mark.slow
def test_data_verb_errors_are_one_line_exit_2(tmp_path, tiny_model_dir):
    data_path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    recipe = recipe_file(tmp_path, tiny_model_dir, data_path, chat_template="mistral")
    out = cli("data", str(recipe))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith(f"error: {data_path}:1: the chat template refused this conversation")
    assert "'Conversation roles must alternate user/assistant/user/assistant/...'" in out.stderr
    ok = cli("data", str(recipe), "data.fold_system_turn=true", "--show", "0")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "tokenizer: chat template builtin:mistral" in ok.stdout
