"""The data step: read every dataset, detect its format, tokenize in parallel, split each dataset, mix, pack, and
cache the result on disk (memory-mapped Arrow), under a key of everything that could change it.

Memory stays a small constant plus one batch whatever the size: rows are read into Arrow files by `datasets`,
tokenized by `datasets.map(batched=True, num_proc=...)` into Arrow files, split and mixed on the small per-sample
columns (numpy), packed on the lengths alone, and the rows written as Arrow a batch at a time.

Cache: `CACHE/data/KEY/{train,val,test}.arrow` + `stats.json` + `index.npy` (source and row of every sample), built
in `KEY.tmp-HOST-PID` and renamed when complete (a killed run leaves a tmp folder that the next one removes).
`KEY.lock` says who prepares; the others wait for the cache, and stop with a message when it shows no progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainer.cache import cache_root as default_cache_root
from trainer.config import DataArgs
from trainer.data.formats import _row_to_sample, resolve
from trainer.data.packing import pack_groups, write_rows
from trainer.data.reading import TEXT_KINDS, Source, decode_row, read_source, sources_of
from trainer.data.tokenize import IGNORE, tokenize_sample
from trainer.errors import UserError

SPLITS = ("train", "val", "test")
SMALL = 2000
"""Rows below which tokenizing uses one process (starting workers costs more than it saves)."""
HEARTBEAT_S = 5.0
"""How often the preparing process touches KEY.lock (the waiting ones read it as a sign of progress)."""


# ----------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the data section: `data.path` alone, or one entry of `data.datasets`."""

    name: str
    path: str
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    column_types: dict = field(default_factory=dict)
    weight: float = 1.0
    samples: int | None = None
    replace: bool = False
    split: str = "train"


def dataset_specs(cfg: DataArgs) -> list[DatasetSpec]:
    """The datasets of the data section, each with its keys filled from the section's."""
    entries = cfg.datasets or [{"path": cfg.path}]
    out = []
    for e in entries:
        out.append(
            DatasetSpec(
                name=str(e.get("name") or Path(e["path"]).name.split(".")[0]),
                path=e["path"],
                format=e.get("format", cfg.format),
                columns=dict(e.get("columns", cfg.columns)),
                column_types=dict(e.get("column_types", cfg.column_types)),
                weight=float(e.get("weight", 1.0)),
                samples=e.get("samples"),
                replace=bool(e.get("replace", False)),
                split=e.get("split", cfg.hub_split),
            )
        )
    return out


def split_indices(n: int, val_fraction: float, test_fraction: float, seed) -> dict[str, list[int]]:
    """A seeded split of n rows: {train, val, test} index lists (each sorted). At least one row in a split whose
    fraction is above 0; UserError when none is left to train on."""
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


def mix_draw(train: np.ndarray, spec: DatasetSpec, seed) -> np.ndarray:
    """The training samples a dataset contributes to the mix (sample indices, sorted; repeats allowed).

    `samples: N` takes N; else `weight` w takes round(w * available). Without replacement: every sample
    floor(N / available) times, plus a seeded subset of the rest; with `replace: true`: N seeded draws."""
    n = len(train)
    want = spec.samples if spec.samples is not None else int(round(spec.weight * n))
    if want == n and not spec.replace:
        return train
    if n == 0:
        return train
    rng = np.random.default_rng(seed)
    if spec.replace:
        picked = rng.choice(train, size=want, replace=True)
    else:
        copies, rest = divmod(want, n)
        picked = np.concatenate([np.tile(train, copies), rng.choice(train, size=rest, replace=False)])
    return np.sort(picked)


# ----------------------------------------------------------------------------------------------- result
@dataclass
class PreparedData:
    train: object  # datasets.Dataset of rows
    val: object | None
    test: object | None
    stats: dict
    cache_dir: Path | None
    format: str

    @property
    def names(self) -> list[str]:
        """Dataset names, in `data.datasets` order (one for `data.path`)."""
        return [d["name"] for d in self.stats["datasets"]]

    @property
    def fingerprint(self) -> list[dict]:
        """What the data was: per dataset its name, path, content hash (sha256 of the files) and row count."""
        return self.stats["fingerprint"]

    def sources(self, sample_ids) -> list[tuple[int, int]]:
        """(source file number, row in it from 0) each sample was made from (`index.npy` of the cache)."""
        index = np.load(self.cache_dir / "index.npy")
        return [(int(index[s][0]), int(index[s][1])) for s in sample_ids]

    def source_rows(self, sample_ids) -> list[int]:
        """The row (in its source file, from 0) each sample was made from."""
        return [row for _, row in self.sources(sample_ids)]

    def val_by_dataset(self) -> dict[str, object]:
        """{dataset name: its validation rows} (rows are unpacked: one sample, one dataset each)."""
        if self.val is None:
            return {}
        which = np.asarray([d[0] for d in self.val["datasets"]])
        return {
            name: self.val.select(np.nonzero(which == i)[0]) for i, name in enumerate(self.names) if (which == i).any()
        }


# ----------------------------------------------------------------------------------------------- cache key
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


def content_hash(sources: list[Source]) -> str:
    """sha256 over the names and bytes of a dataset's files (a hub dataset: its id and split)."""
    h = hashlib.sha256()
    for s in sources:
        if s.kind == "hub":
            h.update(f"{s.path}:{s.split}".encode())
            continue
        h.update(Path(s.path).name.encode())
        with open(s.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _key(cfg: DataArgs, hashes: list[str], tokenizer) -> str:
    h = hashlib.sha256()
    for x in hashes:
        h.update(x.encode())
    section = asdict(cfg)
    for k in ("num_proc", "wait_timeout"):  # how the result is made, not what it is
        section.pop(k, None)
    h.update(json.dumps(section, sort_keys=True, default=str).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(CODE_VERSION.encode())
    return h.hexdigest()[:20]


def cache_key(cfg: DataArgs, tokenizer) -> str:
    """The cache key of a data section with this tokenizer (hashes every data file)."""
    specs = dataset_specs(cfg)
    return _key(cfg, [content_hash(sources_of(s.path, i, s.split)) for i, s in enumerate(specs)], tokenizer)


# ----------------------------------------------------------------------------------------------- the step
def prepare_data(
    cfg: DataArgs,
    tokenizer,
    cache_root: Path | None = None,
    log=print,
    check=None,
    wait: bool = False,
) -> PreparedData:
    """The whole data step, cached on disk under a key of everything that could change the result.

    `tokenizer`: the run's tokenizer as `trainer.tokenizer.run_tokenizer` decided it (read, never changed).
    `check(fingerprint)`: called with `PreparedData.fingerprint` before any tokenizing (or on a cache hit), e.g. to
    refuse a resume whose data changed. `wait=True`: never prepare, wait for another process to fill the cache
    (the other ranks of a node); otherwise prepare unless another process holds `KEY.lock` (then wait for it).
    Raises UserError (bad data, or a wait that timed out)."""
    import datasets

    datasets.disable_progress_bars()  # our own one-line summary says what happened
    specs = dataset_specs(cfg)
    sources = [sources_of(s.path, i, s.split, log) for i, s in enumerate(specs)]
    hashes = [content_hash(src) for src in sources]
    key = _key(cfg, hashes, tokenizer)
    root = (cache_root or default_cache_root()) / "data"
    cache_dir = root / key
    started = time.time()
    while True:
        if (cache_dir / "stats.json").exists():
            data = _load(cache_dir)
            if check is not None:
                check(data.fingerprint)
            log(f"data: cached tokenized dataset {cache_dir}")
            return data
        if not wait:
            try:
                lock = _Lock.acquire(root, key)
            except OSError as err:  # a read-only cache is no reason to stop: prepare in a temporary folder
                import tempfile

                fallback = Path(tempfile.mkdtemp(prefix="trainer-data-"))
                log(f"data: cannot write the data cache {root} ({err.strerror}); preparing in {fallback} instead")
                return prepare_data(cfg, tokenizer, fallback, log, check, wait)
            if lock is not None:
                break
        _wait_step(root, key, cfg.wait_timeout, started, log)
    try:
        with lock:
            if (cache_dir / "stats.json").exists():  # filled while we waited for the lock
                lock.release()
                return prepare_data(cfg, tokenizer, cache_root, log, check, wait)
            return _prepare(cfg, specs, sources, hashes, key, tokenizer, root, log, check)
    except UserError as err:
        _write_failed(root, key, str(err))
        raise


def _prepare(cfg, specs, sources, hashes, key, tokenizer, root: Path, log, check) -> PreparedData:
    import datasets

    _remove_stale_tmp(root, key)
    tmp = root / f"{key}.tmp-{_host()}-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        # 1. read every source, detect its format, count its rows
        read = []
        for spec, srcs in zip(specs, sources):
            for src in srcs:
                ds, kind = read_source(src, tmp / "read")
                fmt, colmap = resolve_source(ds, kind, spec, src)
                read.append((src, ds, kind, fmt, colmap))
        fingerprint = []
        for d, spec in enumerate(specs):
            rows = sum(_count_rows(ds, kind) for src, ds, kind, _, _ in read if src.dataset == d)
            fingerprint.append({"name": spec.name, "path": spec.path, "sha256": hashes[d], "rows": rows})
        if check is not None:
            check(fingerprint)
        # 2. tokenize (parallel over processes), one source at a time, into Arrow files
        parts = []
        for s, (src, ds, kind, fmt, colmap) in enumerate(read):
            parts.append(_tokenize(ds, src, s, kind, fmt, colmap, specs[src.dataset], tokenizer, cfg, tmp))
        samples = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        # 3. split each dataset (by row), drop samples with nothing to learn, mix the training part
        meta = samples.select_columns(["source", "row", "dataset", "length", "n_target", "truncated"])
        meta = {k: np.asarray(v) for k, v in meta.with_format("numpy")[:].items()}
        picked, stats = _split_and_mix(cfg, specs, read, meta, fingerprint)
        stats.update(cache_key=key, fingerprint=fingerprint)
        # 4. rows (packed for training when asked), written as Arrow
        for name in SPLITS:
            idx = picked[name]
            if name != "train" and len(idx) == 0:
                continue
            if name == "train" and cfg.packing:
                order, starts = pack_groups(meta["length"][idx], cfg.max_seq_len)
                order = idx[order]
            else:
                order, starts = idx, np.arange(len(idx) + 1)
            rows = write_rows(samples, order, starts, tmp / f"{name}.arrow")
            real = int(np.sum(meta["length"][order]))
            capacity = (len(starts) - 1) * cfg.max_seq_len if name == "train" and cfg.packing else real
            stats[name].update(
                rows=len(rows),
                tokens=real,
                target_tokens=int(np.sum(meta["n_target"][order])),
                pack_fill=round(real / capacity, 4) if capacity else 1.0,
            )
            del rows
        np.save(tmp / "index.npy", np.stack([meta["source"], meta["row"]], axis=1).astype(np.int64))
        del samples, parts, read
        shutil.rmtree(tmp / "read", ignore_errors=True)
        for f in tmp.glob("tok-*.arrow"):
            f.unlink()
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        cache_dir = root / key
        if not cache_dir.exists():
            os.replace(tmp, cache_dir)
    except OSError as err:  # a read-only or full cache is reported with what to do
        raise UserError(
            f"data: could not write the data cache {root / key} ({err}); free space there or set TRAINER_CACHE "
            "to a writable folder"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _load(root / key)


def resolve_source(ds, kind: str, spec: DatasetSpec, src: Source) -> tuple[str, dict]:
    """(format, {field: column}) of one source; JSON rows are peeked at to learn their keys."""
    if kind in TEXT_KINDS:
        seen: dict[str, None] = {}  # in the order the rows name them
        for i, stored in enumerate(ds.select(range(min(len(ds), 200)))):
            row, _ = decode_row(src, kind, stored, i, {}, keep_absent=True)
            if row is not None:
                seen.update(dict.fromkeys(row))
        columns = list(seen)
    else:
        columns = list(ds.column_names)
    try:
        return resolve(columns, spec.format, spec.columns)
    except UserError as err:
        raise UserError(f"{src.path}: {err}") from None


def _count_rows(ds, kind: str) -> int:
    """Rows of a source; blank lines of JSON Lines do not count."""
    if kind != "json":
        return len(ds)
    import pyarrow as pa
    import pyarrow.compute as pc

    def blanks(column) -> int:
        return pc.sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)).as_py() or 0

    files = [f["filename"] for f in ds.cache_files]
    if not files:
        return len(ds) - sum(blanks(chunk) for chunk in ds.data.table.column("json").chunks)
    blank = 0
    for name in files:  # read a batch at a time, not memory-mapped: the raw text never stays in this process
        with pa.OSFile(name) as fh:
            for batch in pa.ipc.open_stream(fh):
                blank += blanks(batch.column(0))
    return len(ds) - blank


def _tokenize(ds, src: Source, s: int, kind: str, fmt: str, colmap: dict, spec, tokenizer, cfg, tmp: Path):
    import datasets

    ints = datasets.List(datasets.Value("int32"))
    features = datasets.Features(
        {
            "input_ids": ints,
            "labels": ints,
            "length": datasets.Value("int32"),
            "n_target": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "row": datasets.Value("int64"),
            "source": datasets.Value("int32"),
            "dataset": datasets.Value("int16"),
        }
    )
    procs = cfg.num_proc or default_num_proc()
    procs = max(1, min(procs, len(ds) // 100 or 1)) if cfg.num_proc else (1 if len(ds) < SMALL else procs)
    fn_kwargs = dict(
        src=src,
        s=s,
        kind=kind,
        fmt=fmt,
        colmap=colmap,
        column_types=spec.column_types,
        tokenizer=tokenizer,
        cfg=cfg,
    )
    return ds.map(
        tokenize_batch,
        batched=True,
        batch_size=256,
        with_indices=True,
        remove_columns=ds.column_names,
        features=features,
        num_proc=procs if procs > 1 else None,
        fn_kwargs=fn_kwargs,
        cache_file_name=str(tmp / f"tok-{s}.arrow"),
        new_fingerprint=f"tok-{s}-{tmp.name}",
        load_from_cache_file=False,
        desc="tokenizing",
    )


def default_num_proc() -> int:
    """One tokenizing process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def tokenize_batch(batch, indices, *, src, s, kind, fmt, colmap, column_types, tokenizer, cfg) -> dict:
    """A batch of stored rows -> tokenized samples (one or more per row; none for a blank JSON Lines line),
    truncated to max_seq_len, the first label of each sample masked. Errors name the file and line or row."""
    out = {k: [] for k in ("input_ids", "labels", "length", "n_target", "truncated", "row", "source", "dataset")}
    columns = list(batch)
    for j, index in enumerate(indices):
        row, where = decode_row(src, kind, {c: batch[c][j] for c in columns}, index, column_types)
        if row is None:
            continue
        try:
            pieces = tokenize_sample(tokenizer, _row_to_sample(row, fmt, colmap), cfg)
        except UserError as err:
            raise UserError(f"{where}: {err}") from None
        for ids, labels in pieces:
            truncated = len(ids) > cfg.max_seq_len
            ids, labels = list(ids[: cfg.max_seq_len]), list(labels[: cfg.max_seq_len])
            if not ids:
                raise UserError(f"{where}: renders to no tokens at all")
            # The first token of a sample is never a target: nothing in the sample precedes it. Masking it also
            # stops a packed row's previous sample from "predicting" it across the boundary.
            labels[0] = IGNORE
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["n_target"].append(sum(1 for x in labels if x != IGNORE))
            out["truncated"].append(truncated)
            out["row"].append(index)
            out["source"].append(s)
            out["dataset"].append(src.dataset)
    return out


def _split_and_mix(cfg: DataArgs, specs, read, meta: dict, fingerprint) -> tuple[dict, dict]:
    """Split every dataset by row (samples of one row stay together), drop samples with no target, draw each
    dataset's training share. -> ({split: sample indices}, stats)."""
    picked = {name: [] for name in SPLITS}
    per = []
    totals = {name: {"samples": 0, "truncated": 0, "dropped_no_target": 0} for name in SPLITS}
    for d, spec in enumerate(specs):
        mine = np.nonzero(meta["dataset"] == d)[0]
        keys = meta["source"][mine].astype(np.int64) << 40 | meta["row"][mine].astype(np.int64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        seed = cfg.split_seed if d == 0 else [cfg.split_seed, d]
        try:
            split = split_indices(len(uniq), cfg.val_fraction, cfg.test_fraction, seed)
        except UserError as err:
            raise UserError(f"data: dataset '{spec.name}': {str(err).removeprefix('data: ')}") from None
        label = np.zeros(len(uniq), dtype=np.int8)
        label[split["val"]], label[split["test"]] = 1, 2
        sample_split = label[inverse]
        formats = sorted({fmt for src, _, _, fmt, _ in read if src.dataset == d})
        info = {"name": spec.name, "format": "+".join(formats), "rows": fingerprint[d]["rows"], "samples": len(mine)}
        for k, name in enumerate(SPLITS):
            part = mine[sample_split == k]
            keep = part[meta["n_target"][part] > 0]
            counts = {
                "samples": len(keep),
                "truncated": int(np.sum(meta["truncated"][part])),
                "dropped_no_target": len(part) - len(keep),
            }
            if name == "train":
                drawn = mix_draw(keep, spec, [cfg.split_seed, d, 1])
                counts["drawn"] = len(drawn)
                keep = drawn
            info[name] = counts
            picked[name].append(keep)
            for c in ("truncated", "dropped_no_target"):
                totals[name][c] += counts[c]
            totals[name]["samples"] += len(keep)
        per.append(info)
    picked = {k: np.concatenate(v).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in picked.items()}
    if len(picked["train"]) == 0:  # nothing to train on: say why (nothing is cached)
        t = totals["train"]
        lost = t["dropped_no_target"]
        longest = int(np.max(meta["length"], initial=0))
        raise UserError(
            f"data: all {lost} training samples of {', '.join(s.path for s in specs)} lost every target token "
            f"({t['truncated']} truncated at data.max_seq_len={cfg.max_seq_len}, longest {longest} tokens after "
            "truncation); raise data.max_seq_len or shorten the prompts"
            if lost
            else "data: no row is left to train on after the val/test split; lower data.val_fraction/test_fraction"
        )
    formats = sorted({p["format"] for p in per})
    stats = {
        "format": formats[0] if len(formats) == 1 else "mixed",
        "rows": sum(p["rows"] for p in per),
        "samples": sum(p["samples"] for p in per),  # a row can give several samples (data.rewritten_turns)
        "datasets": per,
        **{name: dict(totals[name]) for name in SPLITS if len(picked[name]) or name == "train"},
    }
    return picked, stats


def _load(cache_dir: Path) -> PreparedData:
    import datasets

    stats = json.loads((cache_dir / "stats.json").read_text())
    splits = {
        s: datasets.Dataset.from_file(str(cache_dir / f"{s}.arrow")) if (cache_dir / f"{s}.arrow").exists() else None
        for s in SPLITS
    }
    return PreparedData(splits["train"], splits["val"], splits["test"], stats, cache_dir, stats["format"])


# ----------------------------------------------------------------------------------------------- who prepares
def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(root: Path, key: str) -> None:
    """Remove this key's tmp folders (we hold its lock) and other keys' tmp folders whose process on this host is
    gone (a run killed while preparing)."""
    for tmp in root.glob("*.tmp*"):
        name, _, owner = tmp.name.partition(".tmp")
        if name == key:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        host, _, pid = owner.lstrip("-").rpartition("-")
        if host == _host() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


class _Lock:
    """`KEY.lock`, created exclusively by the process that prepares a key; it holds `host pid` and is touched every
    HEARTBEAT_S seconds while the work goes on. A lock whose process is gone (same host) is taken over."""

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    @classmethod
    def acquire(cls, root: Path, key: str):
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{key}.lock"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _lock_owner(path)
                if owner and owner[0] == _host() and not _pid_alive(owner[1]):
                    path.unlink(missing_ok=True)  # left by a killed run on this host
                    continue
                return None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{_host()} {os.getpid()}\n")
            (root / f"{key}.failed").unlink(missing_ok=True)
            lock = cls(path)
            lock._thread.start()
            return lock
        return None

    def _beat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self):
        self._stop.set()
        self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _lock_owner(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _write_failed(root: Path, key: str, message: str) -> None:
    try:
        (root / f"{key}.failed").write_text(message)
    except OSError:
        pass


_IMPORTED = time.time()


def _process_start() -> float:
    """When this process started (Linux: /proc/self/stat starttime after boot); else when this module was imported."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def _wait_step(root: Path, key: str, timeout: int, started: float, log) -> None:
    """One poll of a process waiting for another to fill the cache: raises when the preparing process failed, is
    gone, or showed no progress for `timeout` seconds; logs once a minute."""
    lock, failed = root / f"{key}.lock", root / f"{key}.failed"
    now = time.time()
    if failed.exists() and failed.stat().st_mtime >= _process_start() - 30:
        raise UserError(failed.read_text().strip())
    if lock.exists():
        owner = _lock_owner(lock)
        try:
            idle = now - lock.stat().st_mtime
        except FileNotFoundError:
            idle = 0.0
        if owner and owner[0] == _host() and not _pid_alive(owner[1]):
            raise UserError(
                f"data: the process that was preparing the data (pid {owner[1]}) is gone without finishing; "
                "rerun the command"
            )
        if idle > timeout:
            who = f"host {owner[0]} pid {owner[1]}" if owner else "another process"
            raise UserError(
                f"data: waited {int(now - started)} s for {who} to prepare the data ({root / key}); it shows no "
                f"progress for {int(idle)} s (data.wait_timeout={timeout}); if it is gone, delete {lock} and rerun"
            )
    elif now - started > timeout:
        raise UserError(
            f"data: waited {int(now - started)} s for another process to prepare the data ({root / key}) and none "
            f"started (data.wait_timeout={timeout}); check that the first process of this node is running"
        )
    if int(now - started) // 60 != int(now - started - 1) // 60 and now - started > 1:
        log(f"data: waiting for the data cache {root / key} ({int(now - started)} s)")
    time.sleep(1.0)


# ----------------------------------------------------------------------------------------------- reports
def describe(stats: dict) -> str:
    """One line: format and rows, each split's samples/rows/tokens, and per-dataset counts when several."""
    parts = [f"format={stats['format']} rows={stats['rows']}"]
    for name in SPLITS:
        s = stats.get(name)
        if s and "rows" in s:
            parts.append(
                f"{name}: {s['samples']} samples in {s['rows']} rows, {s['tokens']} tokens "
                f"({s['target_tokens']} trained), {s['truncated']} truncated, "
                f"{s['dropped_no_target']} dropped (no target left), fill {s['pack_fill']:.1%}"
            )
    if len(stats.get("datasets", [])) > 1:
        for d in stats["datasets"]:
            parts.append(
                f"{d['name']} ({d['format']}): {d['rows']} rows, train {d['train']['drawn']} samples drawn of "
                f"{d['train']['samples']}, val {d['val']['samples']}, test {d['test']['samples']}"
            )
    return "; ".join(parts)


def sample_conversations(cfg: DataArgs, data: PreparedData, sample_ids: list[int]) -> list:
    """The conversation (messages, or text) each sample was made from, read again from its source row."""
    import tempfile

    index = np.load(data.cache_dir / "index.npy")
    specs = dataset_specs(cfg)
    sources = [src for i, s in enumerate(specs) for src in sources_of(s.path, i, s.split)]
    out: list = [None] * len(sample_ids)
    wanted: dict[int, list[tuple[int, int]]] = {}
    for k, sid in enumerate(sample_ids):
        s, row = index[sid]
        wanted.setdefault(int(s), []).append((k, int(row)))
    with tempfile.TemporaryDirectory() as tmp:
        for s, items in wanted.items():
            src = sources[s]
            ds, kind = read_source(src, Path(tmp))
            fmt, colmap = resolve_source(ds, kind, specs[src.dataset], src)
            for k, row in items:
                decoded, where = decode_row(src, kind, ds[row], row, specs[src.dataset].column_types)
                out[k] = _row_to_sample(decoded, fmt, colmap)
    return out
