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
        if lora.init == "loftq":
            loftq_init(model, cfg.name_or_path, log=log)
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


PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
"""`lora.init` -> peft's `init_lora_weights`. loftq starts from peft's default and is then replaced by `loftq_init`
(on the 4-bit model, like peft's `replace_lora_weights_loftq`)."""
CONVERTED_INITS = ("pissa", "olora")
"""Inits that change the base weights: their adapters are saved converted for the original base (`save_adapter`)."""


def lora_config(lora: LoraArgs, trainable_tokens=None):
    """The peft LoraConfig of the recipe's `lora:` section; `trainable_tokens`: peft's `trainable_token_indices`
    (`_trainable_tokens`: rows of tokens the run added)."""
    import peft

    target = lora.target_modules if lora.target_modules == "all-linear" else list(lora.target_modules)
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
        bias="none",
        trainable_token_indices=trainable_tokens,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=PEFT_INIT[lora.init],
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        # a tied lm_head/embed_tokens in modules_to_save stays one trained tensor (else the merged model's saved
        # config ties them again and one of the two trained copies is lost; peft warns about exactly this)
        ensure_weight_tying=bool(lora.modules_to_save),
    )


def apply_lora(model, lora: LoraArgs, new_token_ids: list[int] = ()):
    """The peft model with the recipe's LoRA (variants included), and the rows of `new_token_ids` (tokens the run
    added for its chat template) trained; UserError naming the key when peft refuses."""
    import peft

    try:
        model = peft.get_peft_model(model, lora_config(lora, _trainable_tokens(model, list(new_token_ids))))
    except ValueError as err:
        names = f"lora.target_modules={lora.target_modules!r}"
        if lora.modules_to_save:
            names += f", lora.modules_to_save={lora.modules_to_save!r}"
        raise UserError(f"{names}: {str(err).splitlines()[0]}") from None
    lora_dropout.install(model)  # masks independent of the number of processes (trainer/lora_dropout.py)
    return model


def loftq_init(peft_model, name_or_path: str, log=print) -> int:
    """LoftQ (arXiv:2310.08659) for QLoRA: for every 4-bit LoRA layer, A and B from the top-r SVD of the
    quantization error W - NF4(W), so that NF4(W) + scale * B @ A is close to the original W. Returns the layers set.

    The steps of peft's `replace_lora_weights_loftq` (peft/utils/loftq_utils.py), with its own safetensors reader and
    SVD (`_SafetensorLoader`, `_low_rank_decomposition`), run on the weight's device: peft's function moves the
    weights to CUDA unconditionally. Two details differ, on purpose: B is divided by the LoRA scale (peft assumes a
    scale of 1, exact only when alpha == r), and the original weights must be a local safetensors model.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    folder, extra = source_args(name_or_path)
    weights = Path(folder) / "model.safetensors"
    if extra or not (weights.is_file() or weights.with_suffix(".safetensors.index.json").is_file()):
        raise UserError(
            f"lora.init=loftq reads the original weights from a local safetensors model; {name_or_path} has none "
            "(a hub id or .gguf): download or convert it to a folder first"
        )
    loader = _SafetensorLoader(peft_model, str(weights))
    count = 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            original = loader.get_tensor(name.removeprefix("base_model.model.") + ".weight")
            weight = module.get_base_layer().weight
            original = original.to(weight.device, torch.float32)
            error = original - bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            r = module.r["default"]
            parts = _low_rank_decomposition(error, reduced_rank=r)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_(parts["R"].to(a.dtype))
            b.copy_((parts["L"] / module.scaling["default"]).to(b.dtype))
            count += 1
    if not count:
        raise UserError("lora.init=loftq: no 4-bit LoRA layer found; it needs model.quantization: nf4")
    log(f"model: LoftQ init of {count} LoRA layers from the quantization error of {weights}")
    return count


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
    when the run added tokens).

    A LoftQ adapter (lora.init=loftq) corrects the NF4 quantization error of the base it was trained on, so its
    unquantized base is the de-quantized NF4 weights (transformers' `dequantize()`), not the original ones: the
    original weights + the adapter would count the quantization error twice."""
    from peft import PeftModel

    from trainer.preflight import check_adapter_folder

    check_adapter_folder(adapter)
    dtype = torch_dtype(dtype or recipe.model.dtype)
    loftq = recipe.lora is not None and recipe.lora.init == "loftq"
    base = load_base(
        recipe.model,
        dtype=dtype,
        quantize=quantized or loftq,
        device_map=device_map,
        vocab_size=vocab_size,
    )
    if loftq and not quantized:
        base = base.dequantize(dtype=dtype)
    try:
        return PeftModel.from_pretrained(base, str(adapter)).eval()
    except load_errors() as err:
        raise UserError(load_error_line(err, Path(adapter), "adapter", str(adapter))) from None
