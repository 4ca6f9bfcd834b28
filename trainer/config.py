"""The recipe: frozen dataclasses, YAML + `key.path=value` overrides, one validation pass.

Defaults live here and nowhere else. `load_recipe` reports every problem at once, one line each,
before anything heavy (model, data) is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
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
    attn_implementation: str = "auto"
    """Attention kernel passed to transformers: `auto` (SDPA where the architecture supports it, else eager, as
    transformers decides), `sdpa`, `eager`, `flash_attention_2` on a GPU that has it; also `flash_attention_3`,
    `flash_attention_4`, `flex_attention`, or a hub kernel `org/name`."""
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
    modules_to_save: list[str] | None = None
    """Modules trained fully beside the adapter and saved with it (peft `modules_to_save`), e.g. [lm_head] or
    [embed_tokens, lm_head] for new tokens; null: none."""


@dataclass(frozen=True)
class DataArgs:
    """The `data:` section: where the rows are, how they become token ids and labels, and how they are batched."""

    path: str = ""
    """A data file, a folder of them, or a hub dataset id (this or `datasets` is required). Files: JSON array or
    JSON Lines (.json, .jsonl, .ndjson), CSV/TSV, Parquet, Arrow; .gz/.zst compressed too; a folder may mix them."""
    datasets: list | None = None
    """Several datasets mixed, instead of `path`: a list of {path, name, format, columns, column_types, weight or
    samples, replace, split}. Missing keys take this section's values; `name` (default: the file's stem) labels the
    stats and the per-dataset eval loss `eval/loss/NAME`. `weight` (default 1) scales a dataset's training samples:
    0.5 takes a random half, 2 every sample twice; `samples: N` takes exactly N. Draws are without replacement
    (whole copies first when more than the dataset holds) unless `replace: true`; seeded by `split_seed`."""
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"] = "auto"
    """How a row becomes a conversation: `auto` detects it from the columns; `messages` (chat turns with role and
    content), `sharegpt` (`conversations` of from/value turns), `alpaca` (instruction, optional input, output),
    `prompt_completion` (text, or lists of messages: the prompt is context, the completion is trained), `text`
    (raw text, every token trained)."""
    columns: dict = field(default_factory=dict)
    """Maps our column names to yours, e.g. {messages: conversation} or {prompt: question, completion: answer}.
    Detected without it: instruction+output or +response, question/answer, query/response, input/output."""
    column_types: dict = field(default_factory=dict)
    """Types of columns that are not text, e.g. {messages: json} for a CSV cell holding JSON, {score: float}:
    str | int | float | bool | json. CSV/TSV cells are read as the text written (no type or NA guessing)."""
    num_proc: int | None = None
    """Processes that tokenize (each a share of the rows); null: one per available core, 1 under 2,000 rows.
    The result does not depend on it."""
    wait_timeout: int = 600
    """Seconds a process waiting for another one to prepare the data (other ranks, other nodes on shared storage)
    waits without a sign of progress from it before stopping with a message."""
    max_seq_len: int = 1024
    """Tokens per row (>= 8). Longer samples are truncated (counted in the stats); also the packing capacity."""
    packing: bool = True
    """Several samples per row of max_seq_len (best-fit decreasing), with no attention across sample boundaries
    (position_ids restart at each sample). Fewer, fuller rows: 1.55x faster than one sample per row on Alpaca."""
    group_by_length: bool = True
    """Without packing: rows of similar length share a step (3.6% padding instead of 41% on Alpaca); the order
    of steps stays random. Ignored when packing is on."""
    val_fraction: float = 0.05
    """Share of rows held out for the validation loss, in [0, 1), from each dataset; 0: no validation."""
    test_fraction: float = 0.0
    """Share of rows held out for `trainer eval` (perplexity, exact match), in [0, 1); never trained on."""
    train_on: Literal["completion", "all"] = "completion"
    """`completion`: loss on the assistant replies (and their end-of-turn tokens) only; `all`: every token."""
    chat_template: str | None = None
    """The chat template: null (the model's own; without one, `chatml` when `<|im_start|>`/`<|im_end|>` are tokens
    of the vocabulary, else `plain`, whose replies end with the tokenizer's eos), a built-in name (chatml, qwen,
    qwen3, llama2, llama3, mistral, gemma, phi3, plain) or the path of a Jinja file."""
    add_special_tokens: bool = False
    """Allow a built-in template to add the special tokens it writes that the vocabulary lacks (embeddings
    resized; the new rows are trained and saved with the adapter). false: such a template is refused."""
    rewritten_turns: Literal["as_rendered", "separate"] = "as_rendered"
    """Assistant turns the template renders differently once later turns follow (Qwen3 drops earlier reasoning):
    `as_rendered` trains them as the full conversation shows them, in one sample; `separate` trains each in a
    sample of its own, rendered as the last turn (reasoning kept)."""
    fold_system_turn: bool = False
    """Fold a leading system turn into the first user turn (`system + blank line + user`), for templates without
    a system role (Mistral, Gemma) that refuse such conversations."""
    split_seed: int = 1234
    """Seed of the row permutation that makes the train/val/test split (of each dataset) and of the draws that mix
    `datasets` (independent of train.seed)."""
    hub_split: str = "train"
    """Split read from a hub dataset (`data.path` a hub id; `split` per entry of `datasets`); our own val/test
    split is made from it."""


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
    """The `generation:` section: how `trainer eval`, `trainer chat` and the exported Modelfile generate replies."""

    max_new_tokens: int = 128
    """Most tokens generated per reply (eval, chat unless --max-new-tokens, the Modelfile's num_predict);
    generation also stops at the end-of-turn tokens."""
    temperature: float = 0.7
    """Sampling temperature (> 0) of eval's sampled generations and the Modelfile; greedy replies (exact match,
    `trainer chat` unless --temperature) ignore it."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1] (eval's
    sampled generations, chat, the Modelfile)."""
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

ATTN_IMPLEMENTATIONS = (
    "auto",
    "sdpa",
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
    "paged|eager",
)
"""`model.attn_implementation` values: `auto` (transformers picks: sdpa where supported, else eager) and those
transformers 5 accepts (modeling_utils.AttentionInterface and "eager");
a value with a `/` is a hub kernel repository (`kernels-community/...`), passed through."""

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
"""Recipe files we read (JSON is YAML too)."""

ALIASES = {
    # Hugging Face TrainingArguments / TRL / axolotl / torchtune / litgpt names -> ours
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler",
    "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "train_batch_size": "train.micro_batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_accumulation": "train.grad_accum",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "max_train_steps": "train.max_steps",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "max_grad_norm": "train.max_grad_norm",
    "grad_clip": "train.max_grad_norm",
    "optim": "train.optimizer",
    "adam_beta1": "train.adam_betas",
    "adam_beta2": "train.adam_betas",
    "warmup": "train.warmup_ratio",
    "lora_r": "lora.r",
    "lora_rank": "lora.r",
    "rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "model_name_or_path": "model.name_or_path",
    "base_model": "model.name_or_path",
    "model_name": "model.name_or_path",
    "model_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "load_in_4bit": "model.quantization",
    "attn_implementation": "model.attn_implementation",
    "max_seq_length": "data.max_seq_len",
    "max_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "seq_len": "data.max_seq_len",
    "dataset": "data.path",
    "datasets": "data.path",
    "dataset_path": "data.path",
    "train_file": "data.path",
    "val_set_size": "data.val_fraction",
    "sample_packing": "data.packing",
    "output_path": "output_dir",
    "out_dir": "output_dir",
}
"""Names other tools use for our keys, for the did-you-mean of an unknown key (`learning_rate` -> `train.lr`)."""


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """YAML file (optional) + `a.b=value` overrides -> a validated Recipe, or UserError listing every problem."""
    from trainer.files import read_text

    raw: dict = {}
    where = "command line"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.exists():
            raise UserError(f"{path}: recipe file not found; pass the path of a YAML recipe (see launch/recipes/).")
        if path.suffix.lower() not in RECIPE_SUFFIXES:
            raise UserError(
                f"{path}: a {path.suffix or 'suffix-less'} file is not a recipe; recipes are "
                f"{'/'.join(RECIPE_SUFFIXES)} files (see launch/recipes/)"
            )
        text = read_text(path, "a recipe")
        try:
            raw = yaml.safe_load(text) or {}
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
    """Apply one `key.path=value` (value parsed as YAML) to a raw recipe dict, in place; UserError if malformed."""
    if "=" not in item:
        raise UserError(f"override '{item}': expected key.path=value, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts) or any(p != p.strip() for p in parts):
        raise UserError(f"override '{item}': '{key}' is not a key path; expected key.path=value, e.g. train.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as err:
        raise UserError(f"override '{item}': the value is not valid YAML ({getattr(err, 'problem', err)})") from None
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = parsed


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    """A raw recipe dict -> a validated Recipe. Every problem (unknown key, wrong type, value out of range,
    cross-field conflict) is collected and raised as one UserError, one line each, before anything is loaded."""
    problems: list[str] = []
    bad_keys: set[str] = set()  # keys with a type problem: their range checks would only repeat it
    kwargs = {}
    top_fields = {f.name: f for f in fields(Recipe)}
    top_hints = get_type_hints(Recipe)
    for key, value in raw.items():
        if not isinstance(key, str) or key not in top_fields:
            problems.append(_unknown(where, str(key)))
            continue
        if key in SECTIONS:
            if value is None and key == "lora":
                kwargs["lora"] = None
                continue
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(f"{where}: key '{key}' must be a mapping of {sorted(_names(SECTIONS[key]))}")
                bad_keys.add(key)
                continue
            section, section_problems, section_bad = _build(SECTIONS[key], value, where, key)
            problems += section_problems
            bad_keys |= section_bad
            kwargs[key] = section
        else:
            ok, value, allowed = _coerce(top_hints[key], value)
            if not ok:
                problems.append(f"{where}: {key}={value!r} is not valid; expected {allowed}")
                bad_keys.add(key)
                continue
            kwargs[key] = value
    recipe = Recipe(**kwargs)
    problems += [line for key, line in _problems(recipe, where) if not _covered(key, bad_keys)]
    if problems:
        raise UserError("\n".join(problems))
    return recipe


def _covered(key: str, bad_keys: set[str]) -> bool:
    return any(key == b or key.startswith(b + ".") for b in bad_keys)


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def all_keys() -> list[str]:
    """Every recipe key as a dotted path (`train.lr`, `output_dir`)."""
    keys = [f"{name}.{f}" for name, cls in SECTIONS.items() for f in _names(cls)]
    return keys + [f.name for f in fields(Recipe) if f.name not in SECTIONS]


def suggest(key: str) -> str | None:
    """The recipe key a mistyped or foreign `key` most likely means (`train.learning_rat` -> `train.lr`,
    `model.lr` -> `train.lr`, `lora_r` -> `lora.r`), or None. Matched on the last part of the path, in order: a
    key of another section or an `ALIASES` name, exactly; a close match among the same section's keys; a close
    match among every key and alias."""
    section, _, leaf = key.rpartition(".")
    candidates: dict[str, str] = {k.rpartition(".")[2]: k for k in all_keys()}
    candidates.update(ALIASES if section else {**{s: s for s in SECTIONS}, **ALIASES})
    if leaf in candidates:  # another section's key, or another tool's name for one of ours
        return candidates[leaf]
    if section in SECTIONS:
        own = difflib.get_close_matches(leaf, _names(SECTIONS[section]), n=1, cutoff=0.75)
        if own:
            return f"{section}.{own[0]}"
    close = difflib.get_close_matches(leaf, list(candidates), n=1, cutoff=0.6)
    return candidates[close[0]] if close else None


def _unknown(where: str, key: str) -> str:
    close = suggest(key)
    if close and close != key:
        return f"{where}: unknown key '{key}'; did you mean '{close}'?"
    section = key.rpartition(".")[0]
    valid = _names(SECTIONS[section]) if section in SECTIONS else [f.name for f in fields(Recipe)]
    prefix = f"{section}." if section in SECTIONS else ""
    return f"{where}: unknown key '{key}'; valid keys: {', '.join(prefix + k for k in sorted(valid))}"


def _build(cls, values: dict, where: str, section: str):
    """(section object built from the valid keys, problems, keys with a bad type)."""
    problems, bad = [], set()
    hints = get_type_hints(cls)
    names = _names(cls)
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in names:
            problems.append(_unknown(where, f"{section}.{key}"))
            continue
        ok, value, allowed = _coerce(hints[key], value)
        if not ok:
            problems.append(f"{where}: {section}.{key}={value!r} is not valid; expected {allowed}")
            bad.add(f"{section}.{key}")
            continue
        kwargs[key] = value
    return cls(**kwargs), problems, bad


def _coerce(hint, value):
    """Check `value` against a type hint; returns (ok, value, description of what is allowed). Numbers must be
    finite (NaN and infinities are refused wherever a number is expected)."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return (
            value in args and not isinstance(value, bool),
            value,
            "one of " + "|".join("null" if a is None else str(a) for a in args),
        )
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
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                number = float(value.strip())
            except ValueError:
                return False, value, "a finite number"
        ok = isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
        return ok, float(number) if ok else value, "a finite number"  # a refused value is shown as written
    if hint is str:
        return isinstance(value, str), value, "a string"
    if hint is dict or origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return ok, value, "a mapping of names to names"
    if hint is tuple or origin is tuple:
        ok = isinstance(value, (list, tuple))
        return ok, tuple(value) if ok else value, "a list"
    if origin is list and args == (str,):
        ok = isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
        return ok, list(value) if ok else value, "a list of names"
    if hint is list or origin is list:
        ok = isinstance(value, (list, tuple))
        return ok, list(value) if ok else value, "a list"
    return True, value, "any"


def validate(recipe: Recipe, where: str = "recipe") -> list[str]:
    """Range and cross-field checks; every problem, one line each."""
    return [line for _, line in _problems(recipe, where)]


SEED_MAX = 2**63 - 1  # torch.manual_seed takes up to 2**64 - 1, numpy's default_rng any non-negative int


def _problems(recipe: Recipe, where: str) -> list[tuple[str, str]]:
    """[(key, line)]: every range and cross-field problem of a recipe whose values have the right types."""
    p: list[tuple[str, str]] = []

    def bad(key: str, message: str) -> None:
        p.append((key, f"{where}: {message}"))

    m, d, t, g, lora = recipe.model, recipe.data, recipe.train, recipe.generation, recipe.lora
    if not m.name_or_path.strip():
        bad("model.name_or_path", "model.name_or_path is empty; give a model folder, a .gguf file or a hub id")
    if m.attn_implementation not in ATTN_IMPLEMENTATIONS and "/" not in m.attn_implementation:
        bad(
            "model.attn_implementation",
            f"model.attn_implementation={m.attn_implementation!r} is not valid; expected one of "
            + "|".join(ATTN_IMPLEMENTATIONS)
            + " or a hub kernel org/name",
        )
    if not d.path and not d.datasets:
        bad(
            "data.path",
            "data.path is required (a data file, a folder of them or a hub dataset id), or data.datasets "
            "(a list of {path: ...} to mix)",
        )
    elif d.path and d.datasets:
        bad(
            "data.path",
            "give data.path or data.datasets, not both (put the path in data.datasets as a {path: ...})",
        )
    p.extend(("data.datasets", line) for line in validate_datasets(d, where))
    if d.num_proc is not None and d.num_proc < 1:
        bad("data.num_proc", f"data.num_proc={d.num_proc} must be at least 1 (or null: one per core)")
    if d.wait_timeout < 1:
        bad("data.wait_timeout", f"data.wait_timeout={d.wait_timeout} must be at least 1 (seconds)")
    if d.chat_template is not None and not d.chat_template.strip():
        bad(
            "data.chat_template",
            "data.chat_template is empty; use null (the model's own), a built-in name or a Jinja file",
        )
    if d.max_seq_len < 8:
        bad("data.max_seq_len", f"data.max_seq_len={d.max_seq_len} is too small; use at least 8")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(d, name)
        if not 0.0 <= value < 1.0:
            bad(f"data.{name}", f"data.{name}={value} must be in [0, 1)")
    if d.val_fraction + d.test_fraction >= 1.0 and 0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1:
        bad("data.val_fraction", "data.val_fraction + data.test_fraction must leave rows to train on (< 1)")
    if not 0 <= d.split_seed <= SEED_MAX:
        bad("data.split_seed", f"data.split_seed={d.split_seed} must be in [0, 2**63)")
    if not d.hub_split.strip():
        bad("data.hub_split", "data.hub_split is empty; name a split such as train")
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
            bad(f"train.{name}", f"train.{name}={getattr(t, name)} must be at least 1")
    if t.max_steps is not None and t.max_steps < 1:
        bad("train.max_steps", f"train.max_steps={t.max_steps} must be at least 1 (or null to use epochs)")
    if t.max_eval_batches is not None and t.max_eval_batches < 1:
        bad("train.max_eval_batches", f"train.max_eval_batches={t.max_eval_batches} must be at least 1 (or null)")
    if t.lr <= 0:
        bad("train.lr", f"train.lr={t.lr} must be positive")
    if not 0.0 <= t.warmup_ratio < 1.0:
        bad("train.warmup_ratio", f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        bad("train.warmup_steps", f"train.warmup_steps={t.warmup_steps} must be >= 0 (or null to use warmup_ratio)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        bad("train.min_lr_ratio", f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if t.weight_decay < 0:
        bad("train.weight_decay", f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.max_grad_norm < 0:
        bad("train.max_grad_norm", f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)")
    betas = t.adam_betas
    if not (
        len(betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    ):
        bad("train.adam_betas", f"train.adam_betas={list(betas)!r} must be two numbers, each in [0, 1)")
    if not 0 <= t.seed <= SEED_MAX:
        bad("train.seed", f"train.seed={t.seed} must be in [0, 2**63)")
    if g.max_new_tokens < 1:
        bad("generation.max_new_tokens", f"generation.max_new_tokens={g.max_new_tokens} must be at least 1")
    if g.temperature <= 0:
        bad("generation.temperature", f"generation.temperature={g.temperature} must be > 0 (greedy ignores it)")
    if not 0.0 < g.top_p <= 1.0:
        bad("generation.top_p", f"generation.top_p={g.top_p} must be in (0, 1]")
    if g.num_samples < 0:
        bad("generation.num_samples", f"generation.num_samples={g.num_samples} must be >= 0")
    if nf4_without_lora(recipe):
        bad("model.quantization", nf4_without_lora(recipe))
    if lora is not None:
        if lora.r < 1:
            bad("lora.r", f"lora.r={lora.r} must be at least 1")
        if lora.alpha <= 0:
            bad("lora.alpha", f"lora.alpha={lora.alpha} must be > 0")
        if not 0.0 <= lora.dropout < 1.0:
            bad("lora.dropout", f"lora.dropout={lora.dropout} must be in [0, 1)")
        tm = lora.target_modules
        if not (
            tm == "all-linear" or (isinstance(tm, (list, tuple)) and tm and all(isinstance(x, str) and x for x in tm))
        ):
            bad("lora.target_modules", f"lora.target_modules={tm!r} must be 'all-linear' or a list of module names")
    for line in _lora_variant_problems(recipe, where):
        p.append(("lora", line))
    for name in t.report_to:
        if name not in TRACKERS:
            bad("train.report_to", f"train.report_to: {name!r} is not a tracker; use any of {', '.join(TRACKERS)}")
    if not recipe.output_dir.strip():
        bad("output_dir", "output_dir is required")
    return p


DATASET_KEYS = ("path", "name", "format", "columns", "column_types", "weight", "samples", "replace", "split")
"""Keys of one entry of `data.datasets`."""
COLUMN_TYPES = ("str", "int", "float", "bool", "json")
"""Values of `data.column_types` (and of a dataset's `column_types`)."""


def validate_datasets(d: DataArgs, where: str) -> list[str]:
    """Problems with `data.datasets` and `data.column_types`, one line each."""
    p = []
    formats = get_args(get_type_hints(DataArgs)["format"])

    def check_types(key: str, types) -> None:
        if not isinstance(types, dict):
            p.append(f"{where}: {key} must be a mapping of column: type ({'|'.join(COLUMN_TYPES)})")
            return
        for col, kind in types.items():
            if kind not in COLUMN_TYPES:
                p.append(f"{where}: {key}.{col}={kind!r} is not a column type; use one of {'|'.join(COLUMN_TYPES)}")

    check_types("data.column_types", d.column_types)
    if d.datasets is None:
        return p
    if not isinstance(d.datasets, list) or not d.datasets:
        return p + [f"{where}: data.datasets must be a non-empty list of {{path: ...}} entries"]
    names = []
    for i, entry in enumerate(d.datasets):
        key = f"data.datasets[{i}]"
        if not isinstance(entry, dict):
            p.append(f"{where}: {key} must be a mapping such as {{path: data.jsonl, weight: 1}}")
            continue
        for k in entry:
            if k not in DATASET_KEYS:
                close = difflib.get_close_matches(str(k), DATASET_KEYS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(DATASET_KEYS)}"
                p.append(f"{where}: unknown key '{key}.{k}'; {hint}")
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            p.append(f"{where}: {key}.path is required (a data file, folder or hub dataset id)")
        names.append(entry.get("name") or (Path(path).name.split(".")[0] if isinstance(path, str) else None))
        if entry.get("format", "auto") not in formats:
            p.append(f"{where}: {key}.format={entry['format']!r} is not valid; expected one of {'|'.join(formats)}")
        if not isinstance(entry.get("columns", {}), dict):
            p.append(f"{where}: {key}.columns must be a mapping, e.g. {{prompt: question, completion: answer}}")
        check_types(f"{key}.column_types", entry.get("column_types", {}))
        if "weight" in entry and "samples" in entry:
            p.append(f"{where}: {key}: give weight or samples, not both")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
            p.append(f"{where}: {key}.weight={weight!r} must be a positive number")
        samples = entry.get("samples", 1)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            p.append(f"{where}: {key}.samples={samples!r} must be a whole number >= 1")
        if not isinstance(entry.get("replace", False), bool):
            p.append(f"{where}: {key}.replace={entry['replace']!r} must be true or false")
        if not isinstance(entry.get("split", "train"), str):
            p.append(f"{where}: {key}.split={entry['split']!r} must be a split name such as train")
    dupes = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dupes:
        p.append(f"{where}: data.datasets: name {dupes[0]!r} is used twice; give each entry its own name")
    return p


def nf4_without_lora(recipe: Recipe) -> str | None:
    """The one rule "a 4-bit base trains only through LoRA": the message when `recipe` breaks it, else None
    (used by validation and by the memory estimator, which takes recipes built in code)."""
    if recipe.model.quantization == "nf4" and recipe.lora is None:
        return (
            "model.quantization=nf4 needs LoRA (a 4-bit base cannot be fully fine-tuned); "
            "set lora: {r: 16} or model.quantization: null"
        )
    return None


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


PIPE = "\\|"
"""A `|` inside a markdown table cell (GitHub's tables split cells on a bare `|`, code spans included)."""


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
            meaning = docs.get(f.name, "").replace("|", PIPE)
            lines.append(f"| `{name}.{f.name}` | `{value}` | {meaning} |")
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
