"""Model configs without the network: a local folder, a .gguf file's metadata, a built-in table of common hub ids
(`KNOWN_CONFIGS`), or the local Hugging Face cache. The planner never downloads anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import UserError


def _llama(**shape: Any) -> dict[str, Any]:
    """A Llama entry: its shape and RoPE settings plus what every Llama checkpoint in the table shares."""
    return {
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        **shape,
    }


KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "rms_norm_eps": 1e-5,
    },
    "mistralai/Mistral-7B-Instruct-v0.2": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "rms_norm_eps": 1e-5,
    },
    "meta-llama/Llama-2-7b-hf": _llama(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "meta-llama/Llama-2-13b-hf": _llama(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "meta-llama/Meta-Llama-3-8B": _llama(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "meta-llama/Llama-3.2-1B": _llama(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    ),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _llama(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rope_theta=10000.0,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _llama(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        rope_theta=100000.0,
    ),
}
"""Hub id -> the config.json values the planner needs (and transformers' defaults fill the rest)."""
KNOWN_CONFIGS["meta-llama/Meta-Llama-3-8B-Instruct"] = KNOWN_CONFIGS["meta-llama/Meta-Llama-3-8B"]
KNOWN_CONFIGS["meta-llama/Llama-2-7b-chat-hf"] = KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"]
KNOWN_CONFIGS["meta-llama/Llama-3.2-1B-Instruct"] = KNOWN_CONFIGS["meta-llama/Llama-3.2-1B"]
KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M"] = KNOWN_CONFIGS["HuggingFaceTB/SmolLM2-135M-Instruct"]


def _config_from_table(values: dict[str, Any]):
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def load_model_config(name_or_path: str):
    """A `PretrainedConfig` without the network: a local folder's config.json, a `.gguf` file's metadata, a
    built-in table of common hub ids (`KNOWN_CONFIGS`; a missing local path whose last component names one of
    them, such as ~/.cache/trainer/models/SmolLM2-135M-Instruct, uses that entry), or the local HF cache."""
    from transformers import AutoConfig

    path = Path(str(name_or_path)).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
            raise UserError(f"{path}: cannot read the model config from the GGUF metadata ({err})") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path}: folder has no config.json; point model.name_or_path at a model folder or a .gguf file"
            )
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, json.JSONDecodeError) as err:
            raise UserError(f"{path}/config.json: not a usable model config ({err})") from None
    if str(name_or_path) in KNOWN_CONFIGS:
        return _config_from_table(KNOWN_CONFIGS[str(name_or_path)])
    by_name = {key.rsplit("/", 1)[-1].lower(): key for key in KNOWN_CONFIGS}
    if not path.exists() and path.name.lower() in by_name:  # e.g. a not-yet-downloaded local copy of a known model
        return _config_from_table(KNOWN_CONFIGS[by_name[path.name.lower()]])
    try:
        return AutoConfig.from_pretrained(str(name_or_path), local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure here means: not usable from the cache
        known = ", ".join(sorted(KNOWN_CONFIGS))
        raise UserError(
            f"model {name_or_path!r}: no local folder/.gguf of that name, not in the Hugging Face cache "
            f"and not in the planner's offline table ({known}); download it first or pass a local path"
        ) from None
