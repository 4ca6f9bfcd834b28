"""Reading rows as users have them: files of the common layouts (or a folder of them, or a hub dataset) become
`datasets.Dataset`s on disk (memory-mapped), and each row a dict holding exactly what the user wrote.

What each layout gives (`read_source` stores it; `decode_row` turns a stored row into the user's row):
- JSON Lines (`.jsonl`, `.ndjson`, or `.json` whose first character is not `[`): read with datasets' `text` loader,
  one row per line, each parsed by `json.loads` when it is tokenized. Not through the `json` loader on purpose: that
  one unifies every row into one Arrow schema, which turns `1` into `1.0` where another row has `1.5`, fills keys
  a row does not have with nulls (a tool call's arguments gain the other rows' keys), and stops on blank lines.
- JSON array (a file whose first character is `[`): split into its elements by the standard `json` decoder, each
  kept as its JSON text with the line it starts on, then the same as JSON Lines.
- CSV / TSV: datasets' `csv` loader with every cell read as the text written (`dtype=str`, no NA guessing:
  `keep_default_na=False`, `na_filter=False`), so `007`, `1.50`, `NA` and `None` stay what they are. An empty cell
  is an absent value. `column_types` declares columns that are not text (`json`, `int`, `float`, `bool`).
- Parquet / Arrow / hub datasets: the types the file declares. Nulls and NaN are absent values.
- `.gz` / `.zst` compressed files of any of the above (datasets decompresses them).

A problem is reported in one line naming the file and, where it has one, the line (`FILE:LINE: `) or row
(`FILE row N: `, counted from 1): the cause found by us, never datasets' "An error occurred while generating the
dataset".
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError

KINDS = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
"""File suffix -> how it is read."""
COMPRESSIONS = (".gz", ".zst")
"""Compressed files: the suffix before these says what is inside (`rows.jsonl.gz`)."""
READABLE = ", ".join(KINDS) + " (also ." + "/.".join(c[1:] for c in COMPRESSIONS) + " compressed)"
TEXT_KINDS = ("json", "json_array")
"""Kinds stored as one JSON text per row (column `json`) and decoded when tokenized."""


@dataclass(frozen=True)
class Source:
    """One file (or hub dataset) of a dataset: where rows come from and how they are read."""

    dataset: int
    """Index of the dataset it belongs to (in `data.datasets`; 0 for `data.path`)."""
    path: str
    """The file, or the hub dataset id."""
    kind: str
    """json | csv | tsv | parquet | arrow | hub (`json` becomes `json_array` once read, for arrays)."""
    split: str = "train"
    """Split of a hub dataset."""

    def where(self, row: int, line: int | None = None) -> str:
        """The location of a row in messages: `FILE:LINE` (JSON layouts) or `FILE row N` (counted from 1)."""
        if line is not None:
            return f"{self.path}:{line}"
        return f"{self.path} row {row + 1}"


def kind_of(path: Path) -> str | None:
    """How a file is read (a value of KINDS), from its name; None if it is not a data file we read."""
    name = path.name.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return KINDS.get(Path(name).suffix)


def compression_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((c for c in COMPRESSIONS if name.endswith(c)), None)


def data_files(path: str, log=None) -> list[Path]:
    """The data files of `path`: the file itself, or the data files of a folder (sorted by name; hidden files and
    files we do not read are skipped, named in `log`). [] when `path` is not on disk (a hub id).

    Raises UserError for a file type we do not read, and for a folder with no data file."""
    p = Path(path).expanduser()
    if p.is_dir():
        files, skipped = [], []
        for f in sorted(p.iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            (files if kind_of(f) else skipped).append(f)
        if skipped and log is not None:
            log(f"data: {p}: skipping {', '.join(f.name for f in skipped)} (not a data file: we read {READABLE})")
        if not files:
            held = ", ".join(f.name for f in skipped[:3]) + (" ..." if len(skipped) > 3 else "") or "nothing"
            raise UserError(f"{p}: folder holds no data file (it holds {held}); we read {READABLE}")
        return files
    if p.is_file():
        if kind_of(p) is None:
            raise UserError(f"{p}: cannot read '{p.suffix or p.name}' files; give one of {READABLE}, a folder of them")
        return [p]
    if p.exists():  # a FIFO, a device: reading it would block or never end
        from trainer.files import regular_file_problem

        raise UserError(f"{p}: {regular_file_problem(p)}")
    return []


def source_files(cfg) -> list[Path]:
    """The local files of every dataset of a recipe's data section, checked before anything heavy loads: they
    exist, are regular files of a type we read, and are not empty. [] when every dataset is a hub id."""
    paths = [cfg.path] if cfg.path else [d.get("path", "") for d in (cfg.datasets or []) if isinstance(d, dict)]
    out = []
    for path in paths:
        files = data_files(path)
        if not files and not is_hub_id(path):
            raise UserError(f"data.path: {path} not found; give a local file/folder or a hub dataset id")
        for f in files:
            if f.stat().st_size == 0:
                raise UserError(f"{f}: file is empty; give a file with at least one row")
        out += files
    return out


def is_hub_id(path: str) -> bool:
    """A string that names a hub dataset (`owner/name`) rather than a missing local file."""
    p = Path(path)
    return "/" in path and not path.startswith((".", "/", "~")) and kind_of(p) is None and len(p.parts) == 2


def sources_of(path: str, dataset: int, split: str, log=None) -> list[Source]:
    """The sources (files, or one hub dataset) of one dataset entry; UserError if there is none."""
    files = data_files(path, log)
    if files:
        return [Source(dataset, str(f), kind_of(f), split) for f in files]
    if is_hub_id(path):
        return [Source(dataset, path, "hub", split)]
    raise UserError(
        f"data.path: {path} not found; give a data file ({READABLE}), a folder of them, or a hub dataset id (owner/name)"
    )


# ----------------------------------------------------------------------------------------------- reading
def read_source(source: Source, cache_dir: Path):
    """A source's rows as a memory-mapped `datasets.Dataset` (its Arrow files under `cache_dir`), and the kind
    they were stored as (`json_array` for a JSON array). Raises UserError naming the file, line and cause."""
    import datasets

    f = Path(source.path)
    if source.kind == "hub":
        try:
            return datasets.load_dataset(source.path, split=source.split), "hub"
        except Exception as err:  # network or hub errors: one line
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"data.path: could not load hub dataset '{source.path}': {first}") from None
    if f.stat().st_size == 0:
        raise UserError(f"{f}: file is empty; give a file with at least one row")
    kind = source.kind
    if kind == "json" and _first_char(f) == "[":
        kind = "json_array"
    try:
        if kind == "json":
            ds = _load("text", f, cache_dir, keep_linebreaks=False).rename_column("text", "json")
        elif kind == "json_array":
            ds = _json_array(f, cache_dir)
        elif kind in ("csv", "tsv"):
            sep = "\t" if kind == "tsv" else ","
            strings = datasets.Features({c: datasets.Value("string") for c in _csv_header(f, sep)})
            ds = _load("csv", f, cache_dir, sep=sep, features=strings, keep_default_na=False, na_filter=False)
        else:
            ds = _load(kind, f, cache_dir)
    except UserError:
        raise
    except Exception as err:
        raise UserError(diagnose(f, kind, err)) from None
    if len(ds) == 0:
        raise UserError(f"{f}: no rows found")
    return ds, kind


def _csv_header(f: Path, sep: str) -> list[str]:
    """The column names of a CSV/TSV file (its first record), so every column can be declared text."""
    import csv

    with open_text(f) as fh:
        header = next(csv.reader(fh, delimiter=sep), None)
    if not header:
        raise UserError(f"{f}: no header line; the first line must name the columns")
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise UserError(f"{f}:1: column {dupes[0]!r} appears twice in the header; give each column its own name")
    return header


def _load(builder: str, f: Path, cache_dir: Path, **kwargs):
    import datasets

    return datasets.load_dataset(builder, data_files=[str(f)], split="train", cache_dir=str(cache_dir), **kwargs)


def open_text(f: Path, errors: str = "strict"):
    """A compressed or plain file opened as UTF-8 text."""
    return codecs.getreader("utf-8")(open_binary(f), errors=errors)


def open_binary(f: Path):
    comp = compression_of(f)
    if comp == ".gz":
        import gzip

        return gzip.open(f, "rb")
    if comp == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{f}: reading .zst files needs the zstandard package (pip install zstandard)") from None
        return zstandard.open(f, "rb")
    return open(f, "rb")


def _first_char(f: Path) -> str:
    with open_text(f, errors="replace") as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped[0]


def _json_array(f: Path, cache_dir: Path):
    """A JSON array file -> rows {json: element as JSON text, line: the line it starts on}. The array is decoded one
    element at a time (the file's text is held, never all rows as Python objects)."""
    import datasets

    features = datasets.Features({"json": datasets.Value("string"), "line": datasets.Value("int64")})
    stat = f.stat()
    try:
        return datasets.Dataset.from_generator(
            _array_elements,
            features=features,
            cache_dir=str(cache_dir),
            gen_kwargs={"path": str(f), "version": f"{stat.st_size}-{stat.st_mtime_ns}"},
        )
    except Exception as err:  # datasets wraps what the generator raised
        cause = _root(err)
        if isinstance(cause, UserError):
            raise cause from None
        raise


def _array_elements(path: str, version: str):
    f = Path(path)
    text = _read_utf8(f)
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    pos, line, last = start, 1 + text.count("\n", 0, start), start
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]":
            rest = _skip_ws(text, pos + 1)
            if rest < len(text):
                raise UserError(f"{f}:{_line_at(text, rest)}: text after the end of the JSON array")
            return
        if pos >= len(text):
            raise UserError(f"{f}:{_line_at(text, pos)}: the JSON array is not closed with ']'")
        line += text.count("\n", last, pos)
        last = pos
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{f}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
        yield {"json": text[pos:end], "line": line}
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            raise UserError(f"{f}:{_line_at(text, pos)}: expected ',' or ']' between array elements")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n\ufeff":
        pos += 1
    return pos


def _line_at(text: str, pos: int) -> int:
    return 1 + text.count("\n", 0, pos)


def _read_utf8(f: Path) -> str:
    data = open_binary(f).read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(_not_utf8(f, err.start, data)) from None


def _not_utf8(f: Path, offset: int, data: bytes) -> str:
    line = data.count(b"\n", 0, offset) + 1
    return _utf8_message(f, data[offset], offset, line)


def _utf8_message(f: Path, byte: int, offset: int, line: int) -> str:
    """The one wording of a file that is not UTF-8 (as `trainer.files.utf8_problem`), with the line."""
    where = " of the decompressed text" if compression_of(f) else ""
    return f"{f}: not UTF-8 text (byte 0x{byte:02x} at byte offset {offset}{where}, line {line}); save it as UTF-8"


def _root(err: BaseException) -> BaseException:
    """The first UserError in an exception's chain (ours, raised inside datasets), else the innermost cause."""
    while not isinstance(err, UserError) and (err.__cause__ is not None or err.__context__ is not None):
        err = err.__cause__ or err.__context__
    return err


def diagnose(f: Path, kind: str, err: Exception) -> str:
    """What went wrong reading `f`, in one line with the line or byte where it happened: we look ourselves where
    datasets only says "An error occurred while generating the dataset"."""
    cause = _root(err)
    if isinstance(cause, UserError):
        return str(cause)
    offset = _first_bad_utf8(f) if kind != "parquet" and kind != "arrow" else None
    if offset is not None:
        return offset
    text = " ".join(str(cause).split()) or type(cause).__name__
    if kind in ("csv", "tsv"):
        import re

        fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
        if fields:
            want, line, saw = fields.groups()
            return (
                f"{f}:{line}: {saw} cells where the header has {want}; quote cells that hold the separator "
                f"({'a tab' if kind == 'tsv' else 'a comma'}) or a line break"
            )
        return f"{f}: could not read as {kind.upper()}: {text.split('Failed to read file')[0].strip()[:300]}"
    if kind in ("parquet", "arrow"):
        return f"{f}: could not read as {kind}: {text[:300]}"
    return f"{f}: could not read: {text[:300]}"


def _first_bad_utf8(f: Path) -> str | None:
    """None if the (decompressed) file is UTF-8 text, else the message naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done, newlines = 0, 0
    with open_binary(f) as fh:
        while True:
            chunk = fh.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.start counts from the bytes the decoder held back plus this chunk
                held = len(err.object) - len(chunk)
                pos = done - held + err.start
                before = err.object[: err.start]
                line = newlines + before.count(b"\n") - (err.object[:held].count(b"\n") if held else 0) + 1
                return _utf8_message(f, err.object[err.start], pos, line)
            if not chunk:
                return None
            done += len(chunk)
            newlines += chunk.count(b"\n")


# ----------------------------------------------------------------------------------------------- rows
def decode_row(
    source: Source, kind: str, stored: dict, index: int, column_types: dict, keep_absent: bool = False
) -> tuple[dict | None, str]:
    """A stored row -> (the user's row as a dict, or None for a blank JSON Lines line; its location for messages).

    JSON layouts: the row's JSON text parsed (an object is required). Tabular layouts: the row as stored. Then
    `column_types` applied, and absent values (null, NaN, empty CSV cell) removed. Raises UserError naming the
    location."""
    line = None
    if kind == "json":
        line = index + 1
    elif kind == "json_array":
        line = stored["line"]
    where = source.where(index, line)
    if kind in TEXT_KINDS:
        text = stored["json"]
        if not text.strip():
            if kind == "json":
                return None, where
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where}: malformed JSON line ({err.msg}, column {err.colno}); fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object ({{...}}), not {_json_kind(row)}")
    else:
        row = dict(stored)
    if keep_absent:  # the columns a row names, null or not (format detection)
        return row, where
    for col, kind_name in column_types.items():
        if col in row:
            row[col] = _convert(row[col], kind_name, where, col)
    return {k: v for k, v in row.items() if not is_absent(v, tabular=kind not in TEXT_KINDS)}, where


def is_absent(value, tabular: bool = True) -> bool:
    """A missing value: null, NaN, or (in a table) an empty cell."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return tabular and isinstance(value, str) and value == ""


def _json_kind(value) -> str:
    return {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(type(value), "a number")


def _convert(value, kind: str, where: str, col: str):
    if value is None or (isinstance(value, str) and value == ""):
        return None
    try:
        if kind == "json":
            return json.loads(value) if isinstance(value, str) else value
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError("not text")
            return value
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError("not true/false")
    except (ValueError, TypeError) as err:
        shown = value if len(str(value)) < 60 else str(value)[:57] + "..."
        raise UserError(f"{where}: column '{col}' = {shown!r} is not {kind} as column_types says ({err})") from None
    raise UserError(f"{where}: column '{col}': unknown column type {kind!r}")
