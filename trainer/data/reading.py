"""Reading rows: local files (JSON, JSON Lines, CSV, Parquet; a file or a folder) or a hub dataset, through
`datasets`; errors name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import DataArgs
from trainer.errors import UserError

LOCAL_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def data_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_LOADERS)
        if not files:
            raise UserError(f"{p}: folder holds no .json/.jsonl/.csv/.parquet file")
        return files
    return [p] if p.exists() else []


def read_rows(cfg: DataArgs):
    """The raw rows as a `datasets.Dataset`; a local file or a hub dataset id."""
    import datasets

    files = data_files(cfg.path)
    if not files:
        if Path(cfg.path).suffix in LOCAL_LOADERS or "/" not in cfg.path:
            raise UserError(f"data.path: {cfg.path} not found; give a local file/folder or a hub dataset id")
        try:
            return datasets.load_dataset(cfg.path, split=cfg.hub_split)
        except Exception as err:  # network or hub errors: one line
            raise UserError(f"data.path: could not load hub dataset '{cfg.path}': {str(err).splitlines()[0]}") from None
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{f}: file is empty; give a file with at least one row")
        _check_json_syntax(f)
    loader = LOCAL_LOADERS[files[0].suffix]
    try:
        ds = datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train")
    except Exception as err:
        raise UserError(f"{files[0]}: could not read as {loader}: {str(err).splitlines()[0]}") from None
    if len(ds) == 0:
        raise UserError(f"{files[0]}: no rows found")
    return ds


def _check_json_syntax(f: Path) -> None:
    """`datasets` reports JSON errors without a line number; find the line ourselves."""
    if f.suffix == ".jsonl":
        with f.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{f}:{lineno}: malformed JSON line ({err.msg}); fix or remove that line") from None
    elif f.suffix == ".json":
        try:
            json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{f}:{err.lineno}: malformed JSON ({err.msg})") from None
