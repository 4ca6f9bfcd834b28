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

DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the dtype vocabulary of recipes; trainer/dtypes.py maps it to torch and bytes
TRACKERS = ("tensorboard", "csv", "wandb", "mlflow", "trackio")  # what train.report_to may name (trainer/tracking.py)


@dataclass(frozen=True)
class ModelArgs:
    """The `model:` section: which weights, in which precision, and how the forward pass is run."""

    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """A hub id, a local folder (config.json + weights) or a `.gguf` file (de-quantized to float on load)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute dtype: fp32 | bf16 | fp16 (fp16 needs a GPU). With LoRA the frozen base is stored in it and the
    adapter stays fp32; a full fine-tune keeps fp32 master weights and autocasts to it."""
    quantization: Literal["nf4"] | None = None
    """`nf4`: QLoRA, the frozen base in 4-bit NF4 with double quantization (bitsandbytes); needs `lora`.
    null: no quantization."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant): far less activation memory for about 30% more compute.
    Default on because memory is what stops most runs; small models on CPU are faster with it off."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: `sdpa` everywhere, `flash_attention_2` on a GPU that has it,
    `eager` for architectures without SDPA support."""
    chunked_loss: bool = True
    """Cross-entropy from lm_head's input, on target positions only, a chunk of vocab-size logits at a time:
    the full (tokens x vocab) logits are never built. Same loss and gradients; false: the model's own logits.
    Models that scale or soft-cap logits, and LoRA-wrapped heads, always use the model's logits."""


@dataclass(frozen=True)
class LoraArgs:
    """The `lora:` section (peft LoRA). `lora: null` in a recipe is a full fine-tune (every weight trains, with fp32
    master weights)."""

    r: int = 16
    """Rank of the update B @ A (>= 1); trainable parameters grow linearly with it."""
    alpha: float = 32
    """Scale numerator: the update is multiplied by alpha / r (peft's `lora_alpha`). 2 * r is the usual choice."""
    dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1). Each row's mask is drawn from (train.seed, step, row, module) alone,
    so it is the same on any number of processes and after a resume on another one (trainer/lora_dropout.py)."""
    target_modules: Any = "all-linear"
    """`all-linear` (every Linear but the output head, peft's rule) or a list of module names such as
    [q_proj, v_proj]."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353; peft `use_dora`): the update is split into a trained magnitude
    vector per output feature and a LoRA direction. A few more parameters, slower steps; merges like LoRA."""
    use_rslora: bool = False
    """Rank-stabilized LoRA (Kalajdzievski 2023, arXiv:2312.03732; peft `use_rslora`): the update is scaled by
    alpha / sqrt(r) instead of alpha / r, so high ranks keep learning."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """How A and B start (peft `init_lora_weights`). `default`: peft's default, A Kaiming-uniform (a = sqrt(5)),
    B zero; `gaussian`: A normal with std 1/r, B zero; `pissa` (arXiv:2404.02948): A, B from the top-r singular
    vectors of W and W replaced by the residual; `olora` (arXiv:2406.01775): the same with a QR decomposition;
    `loftq` (arXiv:2310.08659, QLoRA only: model.quantization=nf4): A, B chosen so that NF4(W) + B A is close to
    W (peft `replace_lora_weights_loftq`). With pissa/olora the saved adapter is converted (peft
    `path_initial_model_for_weight_conversion`, rank 2r) so that it applies to the ORIGINAL base."""
    modules_to_save: list | None = None
    """Modules trained fully beside the adapter and saved with it (peft `modules_to_save`), e.g. [lm_head] or
    [embed_tokens, lm_head] for new tokens; null: none."""


@dataclass(frozen=True)
class DataArgs:
    """The `data:` section: where the rows are, how they become token ids and labels, and how they are batched."""

    path: str = ""
    """Required. A local .json/.jsonl/.csv/.parquet file (or a folder of them) or a hub dataset id."""
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = "auto"
    """How a row becomes a conversation: `auto` detects it from the columns; `messages` (chat turns), `alpaca`
    (instruction/input/output), `prompt_completion`, `text` (raw text, every token trained)."""
    columns: dict = field(default_factory=dict)
    """Maps our column names to yours, e.g. {messages: conversation} or {prompt: question, completion: answer}."""
    max_seq_len: int = 1024
    """Tokens per row (>= 8). Longer samples are truncated (counted in the stats); also the packing capacity."""
    packing: bool = True
    """Several samples per row of max_seq_len (best-fit decreasing), with no attention across sample boundaries
    (position_ids restart at each sample). Fewer, fuller rows: 1.55x faster than one sample per row on Alpaca."""
    group_by_length: bool = True
    """Without packing: rows of similar length share a step (3.6% padding instead of 41% on Alpaca); the order
    of steps stays random. Ignored when packing is on."""
    val_fraction: float = 0.05
    """Share of rows held out for the validation loss, in [0, 1); 0: no validation."""
    test_fraction: float = 0.0
    """Share of rows held out for `trainer eval` (perplexity, exact match), in [0, 1); never trained on."""
    train_on: Literal["completion", "all"] = "completion"
    """`completion`: loss on the assistant replies (and their end-of-turn tokens) only; `all`: every token."""
    split_seed: int = 1234
    """Seed of the row permutation that makes the train/val/test split (independent of train.seed)."""
    hub_split: str = "train"
    """Split read from a hub dataset (`data.path` a hub id); our own val/test split is made from it."""


@dataclass(frozen=True)
class TrainArgs:
    """The `train:` section: optimizer, schedule, batch sizes, and the cadence of logging, eval and checkpoints."""

    epochs: int = 1
    """Passes over the training rows (>= 1); ignored when max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs when set (>= 1)."""
    micro_batch_size: int = 4
    """Rows per forward pass per process (>= 1). Memory grows with it; see `global_batch`."""
    grad_accum: int = 4
    """Micro-batches accumulated per optimizer step, per process (>= 1)."""
    lr: float = 2.0e-4
    """Peak learning rate (> 0), reached after warmup."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, down to min_lr_ratio * lr at the last step: cosine | linear | constant."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming up linearly from lr / warmup to lr, in [0, 1)."""
    warmup_steps: int | None = None
    """Warmup in optimizer steps; overrides warmup_ratio when set."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine/linear decay as a fraction of lr, in [0, 1]."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (>= 0); never applied to biases and norm weights (1-D tensors)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (>= 0); 0 disables clipping."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """`adamw` (torch; fused kernel on GPU, foreach on CPU), `adamw_8bit` or `paged_adamw_8bit` (bitsandbytes:
    8-bit states, a quarter of AdamW's optimizer memory)."""
    adam_betas: tuple = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1)."""
    seed: int = 42
    """Seed of model init (LoRA), dropout and the data order of every epoch."""
    eval_every: int = 50
    """Validation loss every this many optimizer steps (and at the last step)."""
    log_every: int = 10
    """A metrics.csv / TensorBoard row every this many optimizer steps (and at the last step)."""
    save_every: int = 200
    """A checkpoint every this many optimizer steps (and at the last step, and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Complete checkpoints kept (>= 1); older ones are deleted only after a newer one is complete."""
    max_bad_steps: int = 3
    """Consecutive non-finite steps (each skipped) before the run stops, keeping the last good checkpoint."""
    eval_batch_size: int = 8
    """Rows per forward pass in evaluation (validation loss, `trainer eval`)."""
    max_eval_batches: int | None = None
    """Cap on validation batches per process at each eval (null: the whole validation split)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B matrices (and 1-D adapter weights) learn at
    lr * ratio, A at lr (peft `create_loraplus_optimizer`'s groups; the paper suggests 16). Needs lora. null: off."""
    report_to: tuple = ("tensorboard", "csv")
    """Where metrics go, any of tensorboard | csv | wandb | mlflow | trackio (csv: RUN_DIR/metrics.csv, which
    `trainer compare` and the plots read; the others through accelerate's trackers; wandb, mlflow and trackio
    need `pip install 'trainer[track]'`). Only rank 0 logs."""

    def global_batch(self, processes: int = 1) -> int:
        """Rows per optimizer step over all processes: micro_batch_size * grad_accum * processes.

        (With packing a row holds several samples.) The one definition of the global batch; litgpt's
        `TrainArgs.batch_size(devices)` plays the same role."""
        return self.micro_batch_size * self.grad_accum * processes


@dataclass(frozen=True)
class GenerationArgs:
    """The `generation:` section: how `trainer eval` and `trainer chat` sample replies."""

    max_new_tokens: int = 128
    """Most tokens generated per reply; generation also stops at the end-of-turn tokens."""
    temperature: float = 0.7
    """Sampling temperature (> 0) of the sampled generations; greedy replies ignore it."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    num_samples: int = 4
    """Test prompts shown with base and tuned replies in the eval report."""


@dataclass(frozen=True)
class Recipe:
    """A whole recipe: one YAML file with these sections. Every default lives in this module."""

    model: ModelArgs = field(default_factory=ModelArgs)
    """See `ModelArgs`."""
    lora: LoraArgs | None = field(default_factory=LoraArgs)
    """LoRA settings; `lora: null` is a full fine-tune (every weight trains, with fp32 master weights)."""
    data: DataArgs = field(default_factory=DataArgs)
    """See `DataArgs`."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """See `TrainArgs`."""
    generation: GenerationArgs = field(default_factory=GenerationArgs)
    """See `GenerationArgs`."""
    output_dir: str = "runs/default"
    """The run folder: config, metrics, checkpoints, the final adapter or model, eval reports."""


SECTIONS = {"model": ModelArgs, "lora": LoraArgs, "data": DataArgs, "train": TrainArgs, "generation": GenerationArgs}


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
    if hint is list or origin is list:
        ok = isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
        return ok, list(value) if ok else value, "a list of names"
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
    for name in (
        "epochs",
        "micro_batch_size",
        "grad_accum",
        "log_every",
        "eval_every",
        "save_every",
        "keep_last",
        "eval_batch_size",
        "max_bad_steps",
    ):
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
        p.append(
            f"{where}: model.quantization=nf4 needs LoRA (a 4-bit base cannot be fully fine-tuned); "
            "set lora: {r: 16} or model.quantization: null"
        )
    if lora is not None:
        if lora.r < 1:
            p.append(f"{where}: lora.r={lora.r} must be at least 1")
        if not 0.0 <= lora.dropout < 1.0:
            p.append(f"{where}: lora.dropout={lora.dropout} must be in [0, 1)")
        tm = lora.target_modules
        if not (tm == "all-linear" or (isinstance(tm, (list, tuple)) and tm and all(isinstance(x, str) for x in tm))):
            p.append(f"{where}: lora.target_modules={tm!r} must be 'all-linear' or a list of module names")
    p += _lora_variant_problems(recipe, where)
    for name in t.report_to:
        if name not in TRACKERS:
            p.append(f"{where}: train.report_to: {name!r} is not a tracker; use any of {', '.join(TRACKERS)}")
    if not recipe.output_dir:
        p.append(f"{where}: output_dir is required")
    return p


def _lora_variant_problems(recipe: Recipe, where: str) -> list[str]:
    """Combinations of LoRA variants that peft cannot train, save or merge correctly: one line each."""
    p, lora, t = [], recipe.lora, recipe.train
    nf4 = recipe.model.quantization == "nf4"
    if lora is None:
        if t.loraplus_lr_ratio is not None:
            p.append(f"{where}: train.loraplus_lr_ratio needs LoRA (lora: null is a full fine-tune); remove it")
        return p
    if t.loraplus_lr_ratio is not None and t.loraplus_lr_ratio <= 0:
        p.append(f"{where}: train.loraplus_lr_ratio={t.loraplus_lr_ratio} must be positive (16 in the LoRA+ paper)")
    if lora.init == "loftq" and not nf4:
        p.append(f"{where}: lora.init=loftq is for QLoRA; set model.quantization: nf4 (or another lora.init)")
    if lora.init in ("pissa", "olora"):
        if nf4:
            p.append(
                f"{where}: lora.init={lora.init} with model.quantization=nf4 would quantize the residual base and "
                "break the conversion to a plain adapter; use lora.init=loftq for QLoRA"
            )
        if lora.use_dora:
            p.append(
                f"{where}: lora.init={lora.init} with lora.use_dora: peft's conversion to a plain adapter drops "
                "DoRA's magnitudes; use one of them"
            )
        if lora.modules_to_save:
            p.append(
                f"{where}: lora.init={lora.init} with lora.modules_to_save: peft's conversion to a plain adapter "
                "drops modules_to_save; use one of them"
            )
    if lora.init == "loftq" and lora.use_dora:
        p.append(f"{where}: lora.init=loftq with lora.use_dora: LoftQ sets A and B only, not DoRA's magnitudes")
    if lora.modules_to_save is not None and not lora.modules_to_save:
        p.append(f"{where}: lora.modules_to_save is an empty list; give module names or null")
    return p


def to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out["train"]["adam_betas"] = list(out["train"]["adam_betas"])
    out["train"]["report_to"] = list(out["train"]["report_to"])
    if isinstance(out["lora"], dict) and isinstance(out["lora"]["target_modules"], tuple):
        out["lora"]["target_modules"] = list(out["lora"]["target_modules"])
    return out


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(to_dict(recipe), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- reference
def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring written under it} for a config dataclass (read from this module's source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _yaml_value(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("\n...").strip()


def reference_markdown() -> str:
    """The README's recipe reference, generated from the dataclasses above: one table per section (key, default,
    meaning). `python -m trainer.config README.md` rewrites it between the README's reference markers."""
    lines = []
    for name, cls in SECTIONS.items():
        lines += [f"#### `{name}:`", "", (cls.__doc__ or "").strip(), ""]
        lines += ["| key | default | meaning |", "| --- | --- | --- |"]
        docs = field_docs(cls)
        instance = cls()
        for f in fields(cls):
            value = _yaml_value(getattr(instance, f.name))
            lines.append(f"| `{name}.{f.name}` | `{value}` | {docs.get(f.name, '').replace('|', '/')} |")
        lines.append("")
    lines += [
        "#### top level",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
        f"| `output_dir` | `{Recipe().output_dir}` | {field_docs(Recipe)['output_dir']} |",
        "",
    ]
    return "\n".join(lines)


REFERENCE_START = "<!-- recipe reference: generated by `python -m trainer.config README.md`; edit trainer/config.py -->"
REFERENCE_END = "<!-- end of recipe reference -->"


def write_reference(readme: Path) -> bool:
    """Replace the README's text between the reference markers with `reference_markdown()`; True if it changed."""
    text = readme.read_text()
    start, end = text.index(REFERENCE_START) + len(REFERENCE_START), text.index(REFERENCE_END)
    new = text[:start] + "\n" + reference_markdown() + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return new != text


def merge_sections(raw: dict, sections: dict) -> dict:
    """Apply `{section: {key: value}}` (or `{section: value}`, e.g. `lora=None`) to a raw recipe dict, in place.

    The one way to change sections of a recipe: `with_sections` and the tests' recipe builders use it."""
    for name, changes in sections.items():
        if isinstance(changes, dict) and isinstance(raw.get(name), dict):
            raw[name].update(changes)
        else:
            raw[name] = changes
    return raw


def with_sections(recipe: Recipe, **sections) -> Recipe:
    """`with_sections(recipe, train={'lr': 1e-4})` -> a new, validated Recipe with those values changed."""
    return recipe_from_dict(merge_sections(to_dict(recipe), sections))


__all__ = [
    "Recipe",
    "ModelArgs",
    "LoraArgs",
    "DataArgs",
    "TrainArgs",
    "GenerationArgs",
    "DTYPE_NAMES",
    "load_recipe",
    "recipe_from_dict",
    "validate",
    "to_dict",
    "dump_yaml",
    "recipe_hash",
    "merge_sections",
    "with_sections",
]


if __name__ == "__main__":
    import sys

    changed = write_reference(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README recipe reference " + ("updated" if changed else "already up to date"))
