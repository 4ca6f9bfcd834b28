"""Reading every common layout as the user wrote it: JSON Lines whatever the extension, JSON arrays, CSV/TSV as text,
Parquet, Arrow, compressed files, folders of mixed files; errors name the file and line/row/byte."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_jsonl
from trainer.config import DataArgs
from trainer.data import IGNORE, prepare_data
from trainer.errors import UserError

ALPACA_ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Add 4 and 4.", "input": "", "output": "8"},
]


def prep(tmp_path, tokenizer, path, **kw):
    cfg = DataArgs(path=str(path), **{"max_seq_len": 128, "val_fraction": 0.0, "packing": False, **kw})
    return prepare_data(cfg, tokenizer, cache_root=tmp_path / "cache", log=lambda m: None)


def trained(tokenizer, data) -> list[str]:
    """The trained text of every row, in row order."""
    return [tokenizer.decode([t for t, x in zip(r["input_ids"], r["labels"]) if x != IGNORE]) for r in data.train]


def test_case03_json_lines_in_a_dot_json_file_loads_both_rows(tmp_path, tokenizer):
    """Case 03: what Dataset.to_json writes (JSON Lines) in a .json file."""
    f = tmp_path / "c_lines.json"
    f.write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    data = prep(tmp_path, tokenizer, f)
    assert (data.stats["format"], data.stats["rows"]) == ("alpaca", 2)
    assert trained(tokenizer, data) == ["5<|im_end|>\n", "8<|im_end|>\n"]


@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl", "rows.ndjson"])
def test_json_array_and_lines_whatever_the_extension(tmp_path, tokenizer, name):
    as_array = tmp_path / "array" / name
    as_array.parent.mkdir()
    as_array.write_text(json.dumps(ALPACA_ROWS, indent=2))
    as_lines = tmp_path / "lines" / name
    as_lines.parent.mkdir()
    write_jsonl(as_lines, ALPACA_ROWS)
    for f in (as_array, as_lines):
        assert trained(tokenizer, prep(tmp_path / f.parent.name, tokenizer, f)) == ["5<|im_end|>\n", "8<|im_end|>\n"]


def test_blank_lines_are_skipped_and_errors_name_the_real_line(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ALPACA_ROWS[0]) + "\n\n   \n" + '{"instruction": "x", "output": 7}\n')
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value) == (
        f"{f}:4: column 'output' holds a number (7), not text; write it as text in the file (e.g. \"7\") "
        "or map another column"
    )
    f.write_text(json.dumps(ALPACA_ROWS[0]) + "\n\n" + json.dumps(ALPACA_ROWS[1]) + "\n\n")
    data = prep(tmp_path, tokenizer, f)
    assert data.stats["rows"] == 2 and data.fingerprint[0]["rows"] == 2


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', ":2: malformed JSON line (Expecting"),
        ('{"instruction": "a", "output": "b"}\n["a", "b"]\n', ":2: a row must be a JSON object ({...}), not a list"),
        ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]', ":3: malformed JSON"),
        ('[\n {"instruction": "a", "output": "b"}\n', ":3: the JSON array is not closed with ']'"),
        ('{"instruction": ["a"], "output": "b"}\n', ":1: column 'instruction' holds a list, not text"),
        ('{"instruction": "a", "output": null}\n', ":1: missing or empty field 'output' (alpaca format)"),
    ],
)
def test_bad_json_names_file_and_line(tmp_path, tokenizer, text, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value).startswith(f"{f}{message}"), str(err.value)
    assert "\n" not in str(err.value) and "An error occurred" not in str(err.value)


def test_case04_csv_cells_are_the_text_written(tmp_path, tokenizer):
    """Case 04: no type inference (007 stays 007), no NA guessing (NA and None are answers)."""
    f = tmp_path / "d_quirks.csv"
    f.write_text(
        "instruction,input,output\nGive the ISO code of Namibia.,,NA\nPad 7 to three digits.,,007\n"
        "Write one point five with two decimals.,,1.50\nZip code of Boston Back Bay?,,02116\n"
        "What does print(None) show?,,None\n"
    )
    data = prep(tmp_path, tokenizer, f)
    assert [t.removesuffix("<|im_end|>\n") for t in trained(tokenizer, data)] == ["NA", "007", "1.50", "02116", "None"]
    # The empty `input` cells are absent: the user turn is the instruction alone.
    first = tokenizer.decode(data.train[0]["input_ids"])
    assert "<|im_start|>user\nGive the ISO code of Namibia.<|im_end|>" in first


def test_csv_empty_required_cell_names_the_row_tsv_reads_tabs(tmp_path, tokenizer):
    f = tmp_path / "d.csv"
    f.write_text('instruction,output\n"a, with comma",x\nb,\n')
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value) == f"{f} row 2: missing or empty field 'output' (alpaca format)"
    t = tmp_path / "d.tsv"
    t.write_text("question\tanswer\nWhat is 0.10?\t0.10\n")
    assert trained(tokenizer, prep(tmp_path, tokenizer, t)) == ["0.10<|im_end|>\n"]


def test_csv_row_with_too_many_cells_names_the_line(tmp_path, tokenizer):
    f = tmp_path / "bad.csv"
    f.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value) == (
        f"{f}:3: 3 cells where the header has 2; quote cells that hold the separator (a comma) or a line break"
    )


def test_column_types_json_cell_and_bad_declared_type(tmp_path, tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    f = tmp_path / "m.csv"
    f.write_text('messages,score\n"' + json.dumps(msgs).replace('"', '""') + '",0.5\n')
    with pytest.raises(UserError, match=r"m.csv row 1: column 'messages' must be a non-empty list .* not str; .*json"):
        prep(tmp_path, tokenizer, f)
    assert trained(tokenizer, prep(tmp_path, tokenizer, f, column_types={"messages": "json"})) == ["Yo<|im_end|>\n"]
    f.write_text('messages,score\n"' + json.dumps(msgs).replace('"', '""') + '",high\n')
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f, column_types={"messages": "json", "score": "float"})
    assert str(err.value).startswith(f"{f} row 1: column 'score' = 'high' is not float as column_types says")


def test_parquet_nulls_and_nan_are_absent_numbers_are_refused(tmp_path, tokenizer):
    f = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"instruction": ["a", "b"], "input": [None, "extra"], "output": ["x", "y"], "w": [float("nan"), 1]}),
        f,
    )
    data = prep(tmp_path, tokenizer, f)
    assert trained(tokenizer, data) == ["x<|im_end|>\n", "y<|im_end|>\n"]
    assert "<|im_start|>user\na<|im_end|>" in tokenizer.decode(data.train[0]["input_ids"])
    assert "<|im_start|>user\nb\n\nextra<|im_end|>" in tokenizer.decode(data.train[1]["input_ids"])
    g = tmp_path / "n.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1.5, float("nan")]}), g)
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, g)
    assert str(err.value).startswith(f"{g} row 1: column 'completion' holds a number (1.5), not text")


def test_arrow_gz_zst_and_a_folder_of_mixed_files(tmp_path, tokenizer):
    folder = tmp_path / "mixed"
    folder.mkdir()
    with gzip.open(folder / "a.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "A"}]}))
    (folder / "b.csv").write_text("question,answer\nq2,B\n")
    pq.write_table(pa.table({"prompt": ["q3"], "completion": ["C"]}), folder / "c.parquet")
    table = pa.table({"text": ["D plain text"]})
    with pa.OSFile(str(folder / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    import zstandard

    (folder / "e.json.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps([ALPACA_ROWS[0]]).encode()))
    (folder / "README.md").write_text("not data")
    logs = []
    data = prepare_data(
        DataArgs(path=str(folder), max_seq_len=128, val_fraction=0.0, packing=False),
        tokenizer,
        cache_root=tmp_path / "cache",
        log=logs.append,
    )
    texts = trained(tokenizer, data)
    assert texts[:3] + texts[4:] == ["A<|im_end|>\n", "B<|im_end|>\n", "C<|im_end|>\n", "5<|im_end|>\n"]
    assert tokenizer.decode(data.train[3]["input_ids"]).startswith("D plain text")  # the text layout, from Arrow
    assert data.stats["datasets"][0]["format"] == "alpaca+messages+prompt_completion+text"
    assert any("skipping README.md" in m for m in logs)


def test_file_types_we_do_not_read_empty_and_missing_files(tmp_path, tokenizer):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value).startswith(f"{f}: cannot read '.txt' files; give one of .json, .jsonl, .ndjson, .csv, .tsv")
    e = tmp_path / "empty.jsonl"
    e.write_text("")
    with pytest.raises(UserError, match="file is empty"):
        prep(tmp_path, tokenizer, e)
    with pytest.raises(UserError, match="not found; give a data file"):
        prep(tmp_path, tokenizer, tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.json", "bad.csv", "bad.jsonl.gz"])
def test_text_that_is_not_utf8_names_the_byte(tmp_path, tokenizer, name):
    good = '{"prompt": "caf\u00e9", "completion": "ok"}\n'.encode()
    bad = good + b'{"prompt": "caf\xe9", "completion": "ok"}\n'
    if name.endswith(".csv"):
        good = "prompt,completion\ncaf\u00e9,ok\n".encode()
        bad = good + b"caf\xe9,ok\n"
    f = tmp_path / name
    f.write_bytes(gzip.compress(bad) if name.endswith(".gz") else bad)
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    offset = len(good) + bad[len(good) :].index(b"\xe9")
    where = " of the decompressed text" if name.endswith(".gz") else ""
    line = 3 if name.endswith(".csv") else 2
    assert str(err.value) == (
        f"{f}: not UTF-8 text (byte 0xe9 at byte offset {offset}{where}, line {line}); save it as UTF-8"
    )


@pytest.mark.slow  # ~20 s: keeps the fast loop under a minute
def test_hub_id_that_cannot_be_loaded_is_one_line(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, "nobody-here/no-such-dataset")
    assert str(err.value).startswith("data.path: could not load hub dataset 'nobody-here/no-such-dataset': ")
    assert "\n" not in str(err.value)
