"""Model: base weights (hub id / folder / GGUF; fp32/bf16/fp16/NF4), gradient checkpointing, peft LoRA.

The loss lives in `trainer/loss.py`, the tokenizer in `trainer/tokenizer.py`."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer import lora_dropout
from trainer.arch import trainable_share
from trainer.config import LoraArgs, ModelArgs
from trainer.dtypes import torch_dtype
from trainer.errors import UserError


def default_device() -> str:
    """The device a single-process command (merge, eval, chat, export checks) runs on: `cuda` when there is a GPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def source_args(name_or_path: str, tokenizer_only: bool = False) -> tuple[str, dict]:
    """(path for from_pretrained, extra kwargs): a `.gguf` file loads from its folder with `gguf_file=`; a local
    folder is checked first (`trainer.preflight.check_model`: config.json, complete weights; only the tokenizer
    files with `tokenizer_only`); a hub id gets `local_files_only` when the hub cannot be reached but the model is
    cached (UserError at once when not)."""
    from trainer.preflight import check_model, hub_kwargs, is_local

    p = Path(name_or_path).expanduser()
    if not is_local(name_or_path):
        return name_or_path, hub_kwargs(name_or_path)
    check_model(name_or_path, tokenizer_only=tokenizer_only)
    if p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    return str(p), {}


LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, UnicodeDecodeError)
"""What transformers / peft / safetensors / torch.load raise for a file they cannot read (safetensors'
SafetensorError and pickle's UnpicklingError are subclasses of these or added where imported)."""


def load_errors() -> tuple:
    """LOAD_ERRORS plus the loaders' own exception types."""
    import pickle

    extra = [pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        extra.append(SafetensorError)
    except ImportError:  # older safetensors: it raises a plain exception subclass
        pass
    return (*LOAD_ERRORS, *extra)


def load_base(cfg: ModelArgs, *, dtype: torch.dtype, quantize: bool, device_map=None, vocab_size: int | None = None):
    """The pretrained model, in `dtype` (or NF4 Linear weights with `dtype` compute). `vocab_size`: the run's
    tokenizer length; the embeddings are resized to it when the tokenizer has more tokens than the model has rows
    (special tokens added for the chat template, `data.add_special_tokens`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, extra = source_args(cfg.name_or_path)
    attn = None if cfg.attn_implementation == "auto" else cfg.attn_implementation  # None: sdpa, else eager
    kwargs = dict(dtype=dtype, attn_implementation=attn, **extra)
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = device_map if device_map is not None else {"": "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (*load_errors(), ImportError) as err:
        text = str(err)
        if isinstance(err, ValueError | ImportError) and ("attn" in text.lower() or "attention" in text.lower()):
            first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
            raise UserError(
                f"model.attn_implementation={cfg.attn_implementation}: {first}; use auto (sdpa where supported, "
                "else eager) or eager"
            ) from None
        raise UserError(load_error_line(err, Path(path), "model.name_or_path", cfg.name_or_path)) from None
    detach_gguf_quantizer(model)
    model.config.use_cache = False
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size is not None and vocab_size > rows:
        model.resize_token_embeddings(vocab_size)  # new rows: the mean of the old ones (transformers' default)
    return model


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load_error_line(err: BaseException, folder: Path, what: str, name: str) -> str:
    """One line for a loader's exception, naming the weight file when the folder has one: a pickle that
    torch.load(weights_only=True) refuses is said to be one (it would run code), not a stack of torch advice."""
    import pickle

    from trainer.preflight import WEIGHT_SUFFIXES

    files = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    pickles = [f for f in files if f.suffix != ".safetensors"]
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        where = pickles[0] if len(pickles) == 1 else folder
        return (
            f"{what}: {where}: refused: a pickle that would run code when loaded (torch.load weights_only=True "
            "rejects it); use .safetensors weights from a source you trust"
        )
    where = f"{files[0]}" if len(files) == 1 else f"'{name}'"
    return f"{what}: cannot load {where}: {_first_line(err)}"


def detach_gguf_quantizer(model) -> None:
    """A GGUF-loaded Llama is plain float weights (transformers de-quantizes on load) but keeps its
    GgufHfQuantizer, which makes save_pretrained refuse; the quantizer is bookkeeping only: drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        quantizer.remove_quantization_config(model)
        model.is_quantized = False


def build_model(
    cfg: ModelArgs,
    lora: LoraArgs | None,
    device_map=None,
    log=print,
    vocab_size: int | None = None,
    new_token_ids: list[int] = (),
):
    """The model to train. Full fine-tuning keeps fp32 master weights (mixed precision autocasts);
    LoRA stores the frozen base in the compute dtype and the adapter in fp32.

    `vocab_size` / `new_token_ids`: the run's tokenizer length and the ids of special tokens the run added to it
    (`trainer.tokenizer.RunTokenizer`): embeddings are resized, and under LoRA those rows of the input embedding
    (and of an untied output layer) train as peft trainable tokens, saved with the adapter."""
    compute = torch_dtype(cfg.dtype)
    quantize = cfg.quantization == "nf4"
    model = load_base(
        cfg,
        dtype=compute if lora is not None else torch.float32,
        quantize=quantize,
        device_map=device_map,
        vocab_size=vocab_size,
    )
    ckpt_kwargs = {"use_reentrant": False}
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if lora is not None:
        model = apply_lora(model, lora, new_token_ids)
    trainable, total = count_parameters(model)
    log(
        f"model: {trainable:,} trainable of {total:,} parameters ({trainable_share(trainable, total):.3f}%)"
        f"{', 4-bit NF4 base' if quantize else ''}{', full fine-tune' if lora is None else ''}"
    )
    return model


def _trainable_tokens(model, ids: list[int]):
    """peft's `trainable_token_indices` for new token rows: the input embedding's, and the output layer's too when
    it is not tied to it (a tied one follows the embedding), so the model learns to read and to emit them."""
    if not ids:
        return None
    ids = sorted(set(int(i) for i in ids))
    names = {m: n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is emb.weight
    if tied:
        return ids
    return {names[emb].split(".")[-1]: ids, names[head].split(".")[-1]: ids}


def apply_lora(model, lora: LoraArgs, new_token_ids: list[int] = ()):
    import peft

    target = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
        bias="none",
        trainable_token_indices=_trainable_tokens(model, list(new_token_ids)),
    )
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"lora.target_modules={lora.target_modules!r}: {str(err).splitlines()[0]}") from None
    lora_dropout.install(model)  # masks independent of the number of processes (trainer/lora_dropout.py)
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # packed two 4-bit values per byte
            n *= 2
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_tuned(
    recipe,
    adapter: Path,
    *,
    quantized: bool = False,
    device_map=None,
    vocab_size: int | None = None,
    dtype: str | None = None,
):
    """The recipe's base (unquantized, in the compute dtype or `dtype` ("fp32"/"bf16"/"fp16"), unless `quantized`)
    + the PEFT adapter in `adapter`, in eval mode. `vocab_size`: the run's tokenizer length (embeddings resized
    when the run added tokens)."""
    from peft import PeftModel

    from trainer.preflight import check_adapter_folder

    check_adapter_folder(adapter)
    base = load_base(
        recipe.model,
        dtype=torch_dtype(dtype or recipe.model.dtype),
        quantize=quantized,
        device_map=device_map,
        vocab_size=vocab_size,
    )
    try:
        return PeftModel.from_pretrained(base, str(adapter)).eval()
    except load_errors() as err:
        raise UserError(load_error_line(err, Path(adapter), "adapter", str(adapter))) from None
