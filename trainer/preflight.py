"""The sources a recipe names (data files, model folder, adapters, hub ids), checked before anything heavy is
imported or loaded, each problem one UserError line naming the file.

A local model folder must hold a readable config.json and complete weights (each .safetensors header checked
against the file size: a truncated download is named, not a traceback deep in the loader); an adapter folder an
adapter_config.json and complete weights. A hub id that is not cached, while the hub cannot be reached, fails in
seconds (one short connection probe) instead of after a minute of retries; when it is cached, it loads from the
cache without asking the hub.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from trainer.errors import UserError
from trainer.files import read_json, regular_file_problem, safetensors_problem

HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds the hub reachability probe (DNS + TCP connect) may take before the hub counts as unreachable."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
"""Weight files transformers and peft read from a folder (.bin/.pt through torch.load with weights_only=True)."""


def check_sources(recipe) -> None:
    """`trainer train`'s data and model sources; UserError listing every problem, one line each."""
    problems = []
    for check in (lambda: check_data(recipe.data), lambda: check_model(recipe.model.name_or_path)):
        try:
            check()
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise UserError("\n".join(problems))


def check_data(cfg) -> None:
    """data.path: a local file or folder of a type we read, not empty, a regular file; or a hub dataset id that can
    be reached (or HF_HUB_OFFLINE set to use the local datasets cache)."""
    from trainer.data.reading import source_files

    if source_files(cfg):
        return
    if not _offline() and hub_unreachable() is not None:
        raise UserError(
            f"data.path: '{cfg.path}' is not a local file or folder, and the Hugging Face hub cannot be reached "
            f"({hub_unreachable()}); give a local file, or set HF_HUB_OFFLINE=1 to use the local datasets cache"
        )


def is_local(name_or_path: str) -> bool:
    """Whether a model name is a local path (it exists, or is written as one) rather than a hub id."""
    p = Path(name_or_path).expanduser()
    return p.exists() or p.is_absolute() or name_or_path.startswith((".", "~")) or p.suffix == ".gguf"


def check_model(name_or_path: str, what: str = "model.name_or_path", tokenizer_only: bool = False) -> None:
    """A local model folder (config.json + complete weights) or .gguf file, or a hub id that is cached or
    reachable; UserError naming the file otherwise. `tokenizer_only`: the folder needs only a tokenizer."""
    p = Path(name_or_path).expanduser()
    if not is_local(name_or_path):
        hub_kwargs(name_or_path, what)
        return
    if not p.exists():
        raise UserError(f"{what}: {p} not found; give a model folder, a .gguf file or a hub id")
    if p.is_file() or not p.is_dir():
        if p.suffix == ".gguf":
            problem = regular_file_problem(p)
            if problem:
                raise UserError(f"{what}: {p} {problem}")
            return
        raise UserError(
            f"{what}: {p} is a {p.suffix or 'suffix-less'} file; give a model folder (config.json + weights), a "
            ".gguf file or a hub id"
        )
    if tokenizer_only:
        check_tokenizer_folder(p, what)
    else:
        check_model_folder(p, what)


def check_model_folder(folder: Path, what: str = "model.name_or_path") -> None:
    """config.json readable (UTF-8 JSON object) and every weight file complete."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.exists():
        raise UserError(f"{what}: {folder} is not a model folder (no config.json)")
    if not isinstance(read_json(config, "the model's config"), dict):
        raise UserError(f"{config}: not a JSON object (the model's config)")
    for name in ("tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        if (folder / name).exists():
            read_json(folder / name, "the model's tokenizer" if "token" in name else "the generation config")
    _check_weights(folder, what, "model")


def check_tokenizer_folder(folder: Path, what: str = "tokenizer") -> None:
    """A folder with a tokenizer: tokenizer_config.json or tokenizer.json, each readable UTF-8 JSON."""
    folder = Path(folder)
    names = [n for n in ("tokenizer_config.json", "tokenizer.json") if (folder / n).exists()]
    if not names:
        raise UserError(f"{what}: {folder} holds no tokenizer (tokenizer_config.json / tokenizer.json)")
    for name in names:
        read_json(folder / name, "a tokenizer file")


def check_adapter_folder(folder: Path, what: str = "adapter") -> None:
    """A PEFT adapter folder: adapter_config.json (UTF-8 JSON object) and complete weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such adapter folder")
    config = folder / "adapter_config.json"
    if not config.exists():
        raise UserError(f"{config}: missing; {folder} is not a PEFT adapter folder")
    if not isinstance(read_json(config, "the adapter's config"), dict):
        raise UserError(f"{config}: not a JSON object (the adapter's config)")
    _check_weights(folder, what, "adapter")


def _check_weights(folder: Path, what: str, kind: str) -> None:
    weights = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise UserError(f"{what}: {folder} holds no {kind} weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    for f in weights:
        problem = safetensors_problem(f) if f.suffix == ".safetensors" else regular_file_problem(f)
        if problem:
            raise UserError(f"{f}: {problem}; the {kind} in {folder} is incomplete or damaged")


# ----------------------------------------------------------------------------------------------- hub
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """None if a TCP connection to the hub endpoint opens within HUB_PROBE_TIMEOUT_S, else why not. DNS has no
    timeout of its own, so the probe runs in a thread that is abandoned when it takes too long."""
    url = urlparse(_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            result.append(None)
        except OSError as err:
            result.append(f"{host}: {err.strerror or err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1)
    return result[0] if result else f"{host}: no answer within {HUB_PROBE_TIMEOUT_S:g} s"


def hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether `filename` of `repo_id` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def hub_kwargs(repo_id: str, what: str = "model.name_or_path") -> dict:
    """Extra from_pretrained kwargs for a hub id: {} when the hub answers (or HF_HUB_OFFLINE is set: the libraries
    then read only the cache); {"local_files_only": True} when the hub cannot be reached but the model is cached;
    UserError, in seconds, when it can be neither downloaded nor found in the cache."""
    if _offline() or hub_unreachable() is None:
        return {}
    if hub_cached(repo_id):
        return {"local_files_only": True}
    raise UserError(
        f"{what}: '{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached "
        f"({hub_unreachable()}); download it on a machine with network, or give a local model folder"
    )
