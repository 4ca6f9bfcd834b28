"""The recipe: frozen dataclasses, YAML + `key.path=value` overrides, one validation pass.

Defaults live here and nowhere else. `load_recipe` reports every problem at once, one line each,
before anything heavy (model, data) is loaded.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from trainer.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """A hub id, a local folder (config.json + weights) or a `.gguf` file (de-quantized to float on load)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype. With LoRA the frozen base is stored in it; trainable weights stay fp32."""
    quantization: Literal["nf4"] | None = None
    """`nf4`: QLoRA, the frozen base in 4-bit NF4 with double quantization (bitsandbytes)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant): less memory, about 30% more compute."""
    attn_implementation: str = "sdpa"
    """`sdpa` everywhere; `flash_attention_2` on a GPU that has it installed."""
    chunked_loss: bool = True
    """Cross-entropy from lm_head's input, on target positions only, a chunk of vocab-size logits at a time:
    the full (tokens x vocab) logits are never built. Same loss and gradients; false: the model's own logits."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"
    """`all-linear` or a list of module names such as [q_proj, v_proj]."""


@dataclass(frozen=True)
class DataConfig:
    path: str = ""
    """A local .json/.jsonl/.csv/.parquet file (or folder of them) or a hub dataset id."""
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = "auto"
    columns: dict = field(default_factory=dict)
    """Maps our names to yours, e.g. {messages: conversation} or {prompt: question, completion: answer}."""
    max_seq_len: int = 1024
    packing: bool = True
    """Several samples per row of max_seq_len, with no attention across sample boundaries."""
    group_by_length: bool = True
    """Without packing: rows of similar length share a step (less padding); steps still come in random order."""
    val_fraction: float = 0.05
    test_fraction: float = 0.0
    train_on: Literal["completion", "all"] = "completion"
    """`completion`: loss on assistant / completion tokens only; `all`: every token."""
    split_seed: int = 1234
    hub_split: str = "train"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps; overrides epochs when set."""
    micro_batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2.0e-4
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    """Overrides warmup_ratio when set."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine/linear decay as a fraction of lr."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    adam_betas: tuple = (0.9, 0.999)
    seed: int = 42
    eval_every: int = 50
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    max_bad_steps: int = 3
    """Consecutive non-finite steps (skipped) before the run stops."""
    eval_batch_size: int = 8
    max_eval_batches: int | None = None


@dataclass(frozen=True)
class GenerationConfig:
    """Settings for `trainer eval` / `trainer chat` sample generations."""
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    num_samples: int = 4


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """null: full fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    output_dir: str = "runs/default"


SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
            "generation": GenerationConfig}


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """YAML file (optional) + `a.b=value` overrides -> a validated Recipe, or UserError listing every problem."""
    raw: dict = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise UserError(f"{path}: recipe file not found; pass the path of a YAML recipe (see launch/recipes/).")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax.") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a recipe is a YAML mapping of sections (model, lora, data, train, output_dir).")
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, where)


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise UserError(f"override '{item}': expected key.path=value, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = yaml.safe_load(value) if value != "" else None


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    problems: list[str] = []
    kwargs = {}
    top_fields = {f.name: f for f in fields(Recipe)}
    for key, value in raw.items():
        if key not in top_fields:
            problems.append(_unknown(where, key, top_fields))
            continue
        if key in SECTIONS:
            if value is None and key == "lora":
                kwargs["lora"] = None
                continue
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{where}: key '{key}' must be a mapping of {sorted(_names(SECTIONS[key]))}")
                continue
            section, section_problems = _build(SECTIONS[key], value, where, key)
            problems += section_problems
            kwargs[key] = section
        else:
            kwargs[key] = value
    if problems:
        raise UserError("\n".join(problems))
    recipe = Recipe(**kwargs)
    problems = validate(recipe, where)
    if problems:
        raise UserError("\n".join(problems))
    return recipe


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown(where: str, key: str, valid) -> str:
    close = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in valid], n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return f"{where}: unknown key '{key}'{hint}"


def _build(cls, values: dict, where: str, section: str):
    problems = []
    hints = get_type_hints(cls)
    names = _names(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            problems.append(_unknown(where, f"{section}.{key}", [f"{section}.{n}" for n in names]))
            continue
        ok, value, allowed = _coerce(hints[key], value)
        if not ok:
            problems.append(f"{where}: {section}.{key}={value!r} is not valid; expected {allowed}")
            continue
        kwargs[key] = value
    if problems:
        return None, problems
    return cls(**kwargs), []


def _coerce(hint, value):
    """Check `value` against a type hint; returns (ok, value, description of what is allowed)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return value in args, value, "one of " + "|".join("null" if a is None else str(a) for a in args)
    if args and type(None) in args:  # Optional[X] / X | None
        if value is None:
            return True, None, "null"
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            ok, value, allowed = _coerce(inner[0], value)
            return ok, value, f"{allowed} or null"
        return True, value, "any"
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, value, "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    if hint is dict or origin is dict:
        return isinstance(value, dict), value, "a mapping"
    if hint is tuple or origin is tuple:
        ok = isinstance(value, (list, tuple))
        return ok, tuple(value) if ok else value, "a list"
    return True, value, "any"


def validate(recipe: Recipe, where: str = "recipe") -> list[str]:
    """Cross-field checks; every problem, one line each."""
    p = []
    m, d, t, lora = recipe.model, recipe.data, recipe.train, recipe.lora
    if not d.path:
        p.append(f"{where}: data.path is required (a .json/.jsonl/.csv/.parquet file or a hub dataset id)")
    if d.max_seq_len < 8:
        p.append(f"{where}: data.max_seq_len={d.max_seq_len} is too small; use at least 8")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(d, name)
        if not 0.0 <= value < 1.0:
            p.append(f"{where}: data.{name}={value} must be in [0, 1)")
    if d.val_fraction + d.test_fraction >= 1.0:
        p.append(f"{where}: data.val_fraction + data.test_fraction must leave rows to train on (< 1)")
    for name in ("epochs", "micro_batch_size", "grad_accum", "log_every", "eval_every", "save_every", "keep_last",
                 "eval_batch_size", "max_bad_steps"):
        if getattr(t, name) < 1:
            p.append(f"{where}: train.{name}={getattr(t, name)} must be at least 1")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"{where}: train.max_steps={t.max_steps} must be at least 1 (or null to use epochs)")
    if t.lr <= 0:
        p.append(f"{where}: train.lr={t.lr} must be positive")
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.append(f"{where}: train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    if t.max_grad_norm < 0:
        p.append(f"{where}: train.max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)")
    if m.quantization == "nf4" and lora is None:
        p.append(f"{where}: model.quantization=nf4 needs LoRA (a 4-bit base cannot be fully fine-tuned); "
                 "set lora: {r: 16} or model.quantization: null")
    if lora is not None:
        if lora.r < 1:
            p.append(f"{where}: lora.r={lora.r} must be at least 1")
        if not 0.0 <= lora.dropout < 1.0:
            p.append(f"{where}: lora.dropout={lora.dropout} must be in [0, 1)")
        tm = lora.target_modules
        if not (tm == "all-linear" or (isinstance(tm, (list, tuple)) and tm and all(isinstance(x, str) for x in tm))):
            p.append(f"{where}: lora.target_modules={tm!r} must be 'all-linear' or a list of module names")
    if not recipe.output_dir:
        p.append(f"{where}: output_dir is required")
    return p


def to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out["train"]["adam_betas"] = list(out["train"]["adam_betas"])
    if isinstance(out["lora"], dict) and isinstance(out["lora"]["target_modules"], tuple):
        out["lora"]["target_modules"] = list(out["lora"]["target_modules"])
    return out


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(to_dict(recipe), sort_keys=True).encode()).hexdigest()[:16]


def replace(recipe: Recipe, **sections) -> Recipe:
    """`replace(recipe, train={'lr': 1e-4})` -> a new Recipe with those fields changed (validated)."""
    raw = to_dict(recipe)
    for name, changes in sections.items():
        if isinstance(changes, dict) and isinstance(raw.get(name), dict):
            raw[name].update(changes)
        else:
            raw[name] = changes
    return recipe_from_dict(raw)


__all__ = ["Recipe", "ModelConfig", "LoraConfig", "DataConfig", "TrainConfig", "GenerationConfig", "load_recipe",
           "recipe_from_dict", "validate", "to_dict", "dump_yaml", "recipe_hash", "replace"]
