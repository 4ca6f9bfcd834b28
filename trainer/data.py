"""Data: read through `datasets`, detect the format, render chat, tokenize with label masks, split, pack, cache.

Every tokenized sample carries `input_ids`, `labels` (-100 where no loss), `sample_id` (its row in the
source file, so tests can check each sample is seen once) and its length. Packed rows carry several
samples with `position_ids` restarting at 0 at each sample start: transformers turns restarts into a
block-diagonal causal mask when `attention_mask` is None, so samples never attend across a boundary.
Padding is handled the same way (a block of its own, labels -100): masked by position, never by token id.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.errors import UserError

IGNORE = -100
FORMATS = ("messages", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
LOCAL_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Used when a tokenizer has no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------- reading
def data_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_LOADERS)
        if not files:
            raise UserError(f"{p}: folder holds no .json/.jsonl/.csv/.parquet file")
        return files
    return [p] if p.exists() else []


def read_rows(cfg: DataConfig):
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


# ----------------------------------------------------------------------------------------------- formats
def detect_format(columns: list[str], cfg: DataConfig) -> str:
    names = {**{k: k for k in ("messages", "instruction", "input", "output", "prompt", "completion", "response",
                                "text")}, **cfg.columns}
    have = set(columns)
    if cfg.format != "auto":
        return cfg.format
    if names["messages"] in have:
        return "messages"
    if names["instruction"] in have and names["output"] in have:
        return "alpaca"
    if names["prompt"] in have and (names["completion"] in have or names["response"] in have):
        return "prompt_completion"
    if names["text"] in have:
        return "text"
    raise UserError(f"data.path: cannot tell the format from columns {sorted(have)}; expected 'messages', "
                    "'instruction'+'output', 'prompt'+'completion' or 'text' (or map yours with data.columns)")


def row_to_messages(row: dict, fmt: str, columns: dict, where: str) -> list[dict] | str:
    """One raw row -> a list of chat messages (or a plain string for `text`). Raises UserError naming the row."""
    col = lambda name: columns.get(name, name)  # noqa: E731

    def need(name):
        value = row.get(col(name))
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{where}: missing or empty field '{col(name)}' ({fmt} format)")
        return value

    if fmt == "text":
        return str(need("text"))
    if fmt == "alpaca":
        user = str(need("instruction"))
        extra = row.get(col("input"))
        if extra:
            user = f"{user}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(need("output"))}]
    if fmt == "prompt_completion":
        answer = row.get(col("completion"))
        if answer is None:
            answer = need("response")
        elif not str(answer).strip():
            need("completion")
        return [{"role": "user", "content": str(need("prompt"))}, {"role": "assistant", "content": str(answer)}]
    messages = need("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{col('messages')}' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role '{m['role']}'; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": "" if m["content"] is None else str(m["content"])})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: conversation has no assistant turn to learn from")
    return out


# ----------------------------------------------------------------------------------------------- tokenizing
def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_reply) pieces.

    Each reply is the difference between the conversation rendered up to and including it and the
    conversation up to it with the generation prompt; so the reply's end-of-turn token is in the trained
    piece whatever the template writes.
    """
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError("the tokenizer's chat template does not render conversations as prefixes of each other; "
                            "set data.format: text or use a template without lookahead")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(tokenizer, messages, add_generation_prompt=False)[len(done):]
    if rest:
        pieces.append((rest, False))
    return [p for p in pieces if p[0]]


def tokenize_sample(tokenizer, sample, train_on: str) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels). Pieces are tokenized separately so a label boundary is a token boundary."""
    if isinstance(sample, str):
        pieces = [(sample + (tokenizer.eos_token or ""), True)]
    else:
        pieces = chat_segments(tokenizer, sample)
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (trained or train_on == "all") else [IGNORE] * len(piece)
    return ids, labels


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    samples: int = 0
    tokens: int = 0
    trainable_tokens: int = 0


def tokenize_rows(ds, tokenizer, cfg: DataConfig, fmt: str, source: str):
    """Raw rows -> tokenized samples (truncated to max_seq_len, samples with no target dropped)."""
    jsonl = source.endswith(".jsonl")

    def one(row, idx):
        where = f"{source}:{idx + 1}" if jsonl else f"{source} row {idx}"
        sample = row_to_messages(row, fmt, cfg.columns, where)
        ids, labels = tokenize_sample(tokenizer, sample, cfg.train_on)
        truncated = len(ids) > cfg.max_seq_len
        ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        # The first token of a sample is never a target: nothing in the sample precedes it. Masking it also
        # stops a packed row's previous sample from "predicting" it across the boundary.
        labels[0] = IGNORE
        return {"input_ids": ids, "labels": labels, "sample_id": idx, "length": len(ids),
                "n_target": sum(1 for x in labels if x != IGNORE), "truncated": truncated}

    out = ds.map(one, with_indices=True, remove_columns=ds.column_names, desc="tokenizing")
    return out


# ----------------------------------------------------------------------------------------------- split
def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise UserError(f"data: {n} rows leave none to train on after val/test split; lower the fractions")
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


# ----------------------------------------------------------------------------------------------- packing
def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices per row, each row's lengths summing to at most `capacity`.

    Deterministic; rows come out ordered by their first (longest) sample. Typical padding waste is a
    few percent, against tens of percent for one sample per row.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # free[c] = rows with exactly c tokens free; look for the tightest fit first.
    free: dict[int, list[int]] = {}
    for i in order:
        need = lengths[i]
        fit = next((c for c in range(need, capacity + 1) if free.get(c)), None)
        if fit is None:
            rows.append([i])
            r, left = len(rows) - 1, capacity - need
        else:
            r = free[fit].pop()
            rows[r].append(i)
            left = fit - need
        free.setdefault(left, []).append(r)
    return rows


def pack(samples, max_seq_len: int):
    """Tokenized samples -> packed rows (lists of samples concatenated, position ids restarting)."""
    import datasets

    lengths = samples["length"]
    groups = pack_lengths(lengths, max_seq_len)
    cols = {k: samples[k] for k in ("input_ids", "labels", "sample_id")}
    rows = {"input_ids": [], "labels": [], "position_ids": [], "sample_ids": [], "length": [], "n_target": []}
    for group in groups:
        ids, labels, pos, sids = [], [], [], []
        for i in group:
            ids += cols["input_ids"][i]
            labels += cols["labels"][i]
            pos += list(range(len(cols["input_ids"][i])))
            sids.append(cols["sample_id"][i])
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(pos)
        rows["sample_ids"].append(sids)
        rows["length"].append(len(ids))
        rows["n_target"].append(sum(1 for x in labels if x != IGNORE))
    return datasets.Dataset.from_dict(rows)


def as_rows(samples):
    """Unpacked: one sample per row, same columns as packed rows."""
    return samples.map(lambda s: {"position_ids": list(range(s["length"])), "sample_ids": [s["sample_id"]]},
                       remove_columns=["sample_id", "truncated"])


# ----------------------------------------------------------------------------------------------- batching
def collate(rows: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest (or `pad_to`). Padding is its own position block with labels -100."""
    width = pad_to or max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        pos[b, :n] = torch.tensor(r["position_ids"])
        pos[b, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos,
            "n_rows": torch.tensor(len(rows)), "n_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}


def count_targets(labels: torch.Tensor) -> int:
    """Trainable tokens of a batch: labels that are targets after the causal shift."""
    return int((labels[:, 1:] != IGNORE).sum())


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass
class PreparedData:
    train: object  # datasets.Dataset of rows
    val: object | None
    test: object | None
    stats: dict
    cache_dir: Path | None
    format: str


CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(str(tokenizer.eos_token).encode())
    return h.hexdigest()[:16]


def cache_key(cfg: DataConfig, tokenizer) -> str:
    h = hashlib.sha256()
    files = data_files(cfg.path)
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if not files:  # hub dataset: its id and split (the hub's own revision handling applies)
        h.update(f"{cfg.path}:{cfg.hub_split}".encode())
    h.update(json.dumps(to_dict_data(cfg), sort_keys=True).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(CODE_VERSION.encode())
    return h.hexdigest()[:20]


def to_dict_data(cfg: DataConfig) -> dict:
    from dataclasses import asdict
    return asdict(cfg)


def default_cache_root() -> Path:
    import os
    return Path(os.environ.get("TRAINER_CACHE", Path.home() / ".cache" / "trainer"))


def prepare_data(cfg: DataConfig, tokenizer, cache_root: Path | None = None, log=print) -> PreparedData:
    """The whole data step: cached on disk under a key of everything that could change the result."""
    import datasets

    datasets.disable_progress_bars()  # our own one-line summary says what happened
    ensure_chat_template(tokenizer)
    key = cache_key(cfg, tokenizer)
    cache_dir = (cache_root or default_cache_root()) / "data" / key
    if (cache_dir / "stats.json").exists():
        stats = json.loads((cache_dir / "stats.json").read_text())
        splits = {s: datasets.load_from_disk(str(cache_dir / s)) if (cache_dir / s).exists() else None
                  for s in ("train", "val", "test")}
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
        rows = pack(keep, cfg.max_seq_len) if cfg.packing and name == "train" else as_rows(keep)
        real = int(sum(rows["length"]))
        capacity = len(rows) * cfg.max_seq_len if cfg.packing and name == "train" else real
        stats[name] = {"samples": len(keep), "rows": len(rows), "truncated": truncated, "dropped_no_target": dropped,
                       "tokens": real, "target_tokens": int(sum(rows["n_target"])),
                       "pack_fill": round(real / capacity, 4) if capacity else 1.0}
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
            parts.append(f"{name}: {s['samples']} samples in {s['rows']} rows, {s['tokens']} tokens "
                         f"({s['target_tokens']} trained), {s['truncated']} truncated, "
                         f"{s['dropped_no_target']} dropped (no target left), fill {s['pack_fill']:.1%}")
    return "; ".join(parts)


__all__ = ["prepare_data", "collate", "count_targets", "pack_lengths", "tokenize_sample", "chat_segments",
           "row_to_messages", "detect_format", "split_indices", "IGNORE", "CHATML_TEMPLATE", "describe"]
