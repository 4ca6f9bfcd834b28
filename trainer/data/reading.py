"""Reading rows: local files (JSON, JSON Lines, CSV, Parquet; a file or a folder) or a hub dataset, through
`datasets`; errors name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import DataArgs
from trainer.errors import UserError

LOCAL_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def data_files(path: str) -> list[Path]:
    """The local data files of `path` (a file, or the files of a folder); [] when it does not exist. UserError for
    a file type we do not read, a folder with none we read or with several types, or a non-regular file."""
    from trainer.files import regular_file_problem

    p = Path(path).expanduser()
    kinds = "/".join(LOCAL_LOADERS)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_LOADERS)
        if not files:
            others = sorted(f.name for f in p.iterdir())[:3]
            held = f" (it holds {', '.join(others)})" if others else " (it is empty)"
            raise UserError(f"{p}: folder holds no {kinds} file{held}")
        loaders = {LOCAL_LOADERS[f.suffix] for f in files}
        if len(loaders) > 1:
            raise UserError(f"{p}: folder mixes {' and '.join(sorted(loaders))} files; keep one format per folder")
    elif p.exists():
        if p.suffix not in LOCAL_LOADERS:
            raise UserError(f"{p}: {p.suffix or 'suffix-less'} files are not read; data files are {kinds}")
        files = [p]
    else:
        return []
    for f in files:
        problem = regular_file_problem(f)
        if problem:
            raise UserError(f"{f}: {problem}")
    return files


def source_files(cfg: DataArgs) -> list[Path]:
    """The local files of data.path, checked (exist, a type we read, not empty); [] for a hub dataset id."""
    files = data_files(cfg.path)
    if not files:
        p = Path(cfg.path).expanduser()
        if p.suffix in LOCAL_LOADERS or "/" not in cfg.path or p.is_absolute() or cfg.path.startswith((".", "~")):
            raise UserError(f"data.path: {cfg.path} not found; give a local file/folder or a hub dataset id")
        return []
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{f}: file is empty; give a file with at least one row")
    return files


def read_rows(cfg: DataArgs):
    """The raw rows as a `datasets.Dataset`; a local file or a hub dataset id."""
    import datasets

    from trainer.files import check_utf8_file

    files = source_files(cfg)
    if not files:
        try:
            return datasets.load_dataset(cfg.path, split=cfg.hub_split)
        except Exception as err:  # network or hub errors: one line
            raise UserError(f"data.path: could not load hub dataset '{cfg.path}': {str(err).splitlines()[0]}") from None
    for f in files:
        if f.suffix != ".parquet":
            check_utf8_file(f)  # datasets would fail with an offset-less decode error
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
        with f.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{f}:{lineno}: malformed JSON line ({err.msg}); fix or remove that line") from None
    elif f.suffix == ".json":
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{f}:{err.lineno}: malformed JSON ({err.msg})") from None
