"""The data step: read, detect the format, tokenize, split, pack, and cache the result on disk."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainer.cache import cache_root as default_cache_root
from trainer.config import DataArgs
from trainer.data.formats import detect_format
from trainer.data.packing import as_rows, pack
from trainer.data.reading import data_files, read_rows
from trainer.data.tokenize import tokenize_rows
from trainer.errors import UserError


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise UserError(f"data: {n} rows leave none to train on after val/test split; lower the fractions")
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }


@dataclass
class PreparedData:
    train: object  # datasets.Dataset of rows
    val: object | None
    test: object | None
    stats: dict
    cache_dir: Path | None
    format: str


def _code_version() -> str:
    """Hash of the code that turns rows into tokens (this package and the tokenizer/template module): a change
    to it never serves a stale cache."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for f in sorted(here.glob("*.py")) + [here.parent / "tokenizer.py"]:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


CODE_VERSION = _code_version()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(str(tokenizer.eos_token).encode())
    return h.hexdigest()[:16]


def cache_key(cfg: DataArgs, tokenizer) -> str:
    h = hashlib.sha256()
    files = data_files(cfg.path)
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if not files:  # hub dataset: its id and split (the hub's own revision handling applies)
        h.update(f"{cfg.path}:{cfg.hub_split}".encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(CODE_VERSION.encode())
    return h.hexdigest()[:20]


def prepare_data(cfg: DataArgs, tokenizer, cache_root: Path | None = None, log=print) -> PreparedData:
    """The whole data step: cached on disk under a key of everything that could change the result.

    `tokenizer` is the run's tokenizer as `trainer.tokenizer.run_tokenizer` decided it (pad token, chat template);
    this step reads it and never changes it."""
    import datasets

    datasets.disable_progress_bars()  # our own one-line summary says what happened
    key = cache_key(cfg, tokenizer)
    cache_dir = (cache_root or default_cache_root()) / "data" / key
    remove_stale_temp_folders(cache_dir.parent)
    stats = _cached_stats(cache_dir)
    if stats is not None:
        splits = {
            s: datasets.load_from_disk(str(cache_dir / s)) if (cache_dir / s).exists() else None
            for s in ("train", "val", "test")
        }
        log(f"data: cached tokenized dataset {cache_dir}")
        return PreparedData(splits["train"], splits["val"], splits["test"], stats, cache_dir, stats["format"])

    raw = read_rows(cfg)
    fmt = detect_format(raw.column_names, cfg)
    source = str(data_files(cfg.path)[0]) if data_files(cfg.path) else cfg.path
    samples = tokenize_rows(raw, tokenizer, cfg, fmt, source)
    idx = split_indices(len(samples), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    stats = {"format": fmt, "rows": len(raw), "cache_key": key}
    splits = {}
    for name, ids in idx.items():
        if not ids:
            splits[name] = None
            continue
        part = samples.select(ids)
        truncated = int(sum(part["truncated"]))
        keep = part.filter(lambda s: s["n_target"] > 0)
        dropped = len(part) - len(keep)
        if name == "train" and len(keep) == 0:  # nothing to train on: say why, and cache nothing
            raise UserError(
                f"data: all {len(part)} training samples of {source} lost every target token ({truncated} "
                f"truncated at data.max_seq_len={cfg.max_seq_len}, longest {max(part['length'], default=0)} "
                "tokens after truncation); raise data.max_seq_len or shorten the prompts"
            )
        if len(keep) == 0:
            splits[name] = None
            continue
        rows = pack(keep, cfg.max_seq_len) if cfg.packing and name == "train" else as_rows(keep)
        real = int(sum(rows["length"]))
        capacity = len(rows) * cfg.max_seq_len if cfg.packing and name == "train" else real
        stats[name] = {
            "samples": len(keep),
            "rows": len(rows),
            "truncated": truncated,
            "dropped_no_target": dropped,
            "tokens": real,
            "target_tokens": int(sum(rows["n_target"])),
            "pack_fill": round(real / capacity, 4) if capacity else 1.0,
        }
        splits[name] = rows
    tmp = cache_dir.with_name(
        f"{cache_dir.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{random.randrange(1 << 30)}"
    )
    try:
        for name, rows in splits.items():
            if rows is not None:
                rows.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        if cache_dir.exists() and _cached_stats(cache_dir) is None:  # an unusable entry of an earlier version
            import shutil

            shutil.rmtree(cache_dir, ignore_errors=True)
        if not cache_dir.exists():
            tmp.rename(cache_dir)
    except OSError as err:  # a read-only cache is no reason to stop training
        log(f"data: could not write cache {cache_dir} ({err}); continuing without it")
        cache_dir = None
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if cache_dir is not None:  # serve from disk (memory-mapped) like a cache hit would
        splits = {s: datasets.load_from_disk(str(cache_dir / s)) if (cache_dir / s).exists() else None for s in splits}
    return PreparedData(splits["train"], splits.get("val"), splits.get("test"), stats, cache_dir, fmt)


TMP_MARK = ".tmp-"
"""A cache entry is written to `KEY.tmp-HOST-PID-N/` and renamed to `KEY/` when complete."""

STALE_AFTER_S = 24 * 3600
"""A temp folder of another host (whose process we cannot ask about) is stale after this long."""


def remove_stale_temp_folders(root: Path) -> list[Path]:
    """Remove the temp folders of cache writes that were killed (SIGKILL, power loss: no `finally` ran): those of
    this host whose process is gone, those of other hosts older than STALE_AFTER_S, and the `KEY.tmpNNN` ones of
    earlier versions older than an hour. A write in progress (its process alive) is never touched."""
    import shutil

    removed = []
    if not root.is_dir():
        return removed
    host = socket.gethostname()
    for folder in root.iterdir():
        name = folder.name
        if TMP_MARK in name:
            tail = name.split(TMP_MARK, 1)[1]
            owner_host, _, rest = tail.rpartition("-")[0].rpartition("-")
            pid = int(rest) if rest.isdigit() else -1
            if owner_host == host:
                stale = pid > 0 and not _alive(pid)
            else:
                stale = _age(folder) > STALE_AFTER_S
        elif ".tmp" in name and name.split(".tmp", 1)[1].isdigit():
            stale = _age(folder) > 3600
        else:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _age(folder: Path) -> float:
    import time

    try:
        return time.time() - folder.stat().st_mtime
    except OSError:
        return 0.0


def _cached_stats(cache_dir: Path) -> dict | None:
    """The stats of a complete cache entry with training rows, else None (rebuilt: an entry with an empty train
    split was written by earlier versions, and every run would fail on it)."""
    try:
        stats = json.loads((cache_dir / "stats.json").read_text())
    except (OSError, ValueError):
        return None
    train = stats.get("train") if isinstance(stats, dict) else None
    if not isinstance(train, dict) or not train.get("samples") or not (cache_dir / "train").is_dir():
        return None
    return stats


def describe(stats: dict) -> str:
    parts = [f"format={stats['format']} rows={stats['rows']}"]
    for name in ("train", "val", "test"):
        s = stats.get(name)
        if s:
            parts.append(
                f"{name}: {s['samples']} samples in {s['rows']} rows, {s['tokens']} tokens "
                f"({s['target_tokens']} trained), {s['truncated']} truncated, "
                f"{s['dropped_no_target']} dropped (no target left), fill {s['pack_fill']:.1%}"
            )
    return "; ".join(parts)
