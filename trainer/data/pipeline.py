"""The data step: read, detect the format, tokenize, split, pack, and cache the result on disk."""

from __future__ import annotations

import hashlib
import json
import random
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
    for f in sorted(here.glob("*.py")) + [here.parent / "tokenizer.py", here.parent / "templates.py"]:
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
    if (cache_dir / "stats.json").exists():
        stats = json.loads((cache_dir / "stats.json").read_text())
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
    idx = split_indices(len(raw), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)  # by row: a row's samples
    sample_rows = samples["row"]  # stay in one split
    stats = {"format": fmt, "rows": len(raw), "samples": len(samples), "cache_key": key}
    splits = {}
    for name, ids in idx.items():
        if not ids:
            splits[name] = None
            continue
        wanted = set(ids)
        part = samples.select([k for k, r in enumerate(sample_rows) if r in wanted])
        truncated = int(sum(part["truncated"]))
        keep = part.filter(lambda s: s["n_target"] > 0)
        dropped = len(part) - len(keep)
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
    tmp = cache_dir.with_name(cache_dir.name + f".tmp{random.randrange(1 << 30)}")
    try:
        for name, rows in splits.items():
            if rows is not None:
                rows.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
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
