"""Write a merged Hugging Face model folder as one GGUF file, as llama.cpp's `convert_hf_to_gguf.py` would.

Produced with the `gguf` package's `GGUFWriter`, so nothing from llama.cpp has to be installed:

- architectures: `llama` (config `model_type` llama, and mistral without a sliding window, which is the
  same graph) and `qwen2` (biases on q/k/v, NEOX rotary: no permutation);
- metadata under llama.cpp's key names (`llama.context_length`, `qwen2.attention.head_count_kv`, ...);
- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`); for
  `llama`, `q_proj`/`k_proj` rows (and biases) are permuted the way llama.cpp's converter does (its rotary
  embedding pairs adjacent dimensions, Hugging Face's pairs the two halves of each head);
- no `output.weight` when the embeddings are tied (llama.cpp reads a missing `output.weight` as tied);
- the tokenizer (see `trainer.export.vocab`): byte-level BPE or SentencePiece-style, special ids
  including the end-of-turn token, add-BOS/EOS flags and the chat template.

`outtype` here is `f32`, `f16`, `bf16` (2-D matrices stored in that type) or `q8_0` (2-D matrices
quantized with `gguf.quants`, the same Q8_0 rounding as llama.cpp's reference quantizer). Norms, biases
and other 1-D tensors stay float32, as llama.cpp's converter keeps them. A Q8_0 matrix whose rows are not
a multiple of the block (32) falls back to float16, as the converter does. K-quants are not written here:
`trainer.export.quantize` hands an f16/bf16/f32 file to llama.cpp's own quantizer.

Tensors are streamed: each is read from the safetensors files, converted and written before the next
is read, so writing needs about one tensor's worth of memory on top of the mapped files.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import UserError
from trainer.export.vocab import Vocab, add_to_writer, read_vocab

logger = logging.getLogger(__name__)

# config.model_type -> llama.cpp architecture. Mistral is the Llama graph under another name (as long as it
# has no sliding window), which is also how llama.cpp converts it.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
WRITTEN_OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Hugging Face tensors llama.cpp's converter drops: buffers recomputed at load time.
_SKIPPED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def export_gguf(model_dir: Path, out_path: Path, outtype: str = "f16") -> dict:
    """Write the merged model in `model_dir` to `out_path` as a single GGUF file of type `outtype`.

    `model_dir` is a folder written by `save_pretrained` (config.json, *.safetensors, tokenizer.json and the
    other tokenizer files, generation_config.json). `outtype` is one of `WRITTEN_OUTTYPES`; K-quants go
    through `trainer.export.quantize.export_quantized`. Returns facts about the written file:
    `{"path", "bytes", "tensor_count", "outtype", "architecture", "gguf_architecture",
    "tie_word_embeddings", "vocab_size", "tokenizer", "pre_tokenizer", "stop_token_ids", "eot_token_id",
    "not_stopping_llama_cpp", "f16_fallback"}` where `f16_fallback` lists the q8_0 matrices that could not
    be quantized (rows not a multiple of 32) and were written as float16.

    The file appears at `out_path` only when whole (written as `*.partial`, then renamed). Raises
    `UserError` for a folder that is not a supported architecture, a tokenizer llama.cpp would not
    reproduce, an unknown `outtype`, or missing files.
    """
    import gguf

    model_dir = Path(model_dir)
    out_path = Path(out_path)
    outtype = str(outtype).lower()
    if outtype not in WRITTEN_OUTTYPES:
        raise UserError(
            f"GGUF export: outtype {outtype!r} is not written directly; use one of: {', '.join(WRITTEN_OUTTYPES)}."
        )
    if not model_dir.is_dir():
        raise UserError(f"GGUF export: model folder {model_dir} does not exist.")

    params = model_params(model_dir)
    vocab = read_vocab(model_dir, params.vocab_size)
    plans = _plan_tensors(model_dir, params, outtype)

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp_path, params.gguf_arch)
    try:
        _add_model_metadata(writer, params, file_type, name=_general_name(model_dir))
        add_to_writer(writer, vocab)
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in plans:
            data = plan.load()
            writer.write_tensor_data(_encode(data, plan.qtype))
            del data
        writer.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise

    facts = {
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
        "tensor_count": len(plans),
        "outtype": outtype,
        "architecture": params.model_type,
        "gguf_architecture": params.gguf_arch,
        "tie_word_embeddings": params.tie_word_embeddings,
        "vocab_size": params.vocab_size,
        **vocab_facts(vocab),
        "f16_fallback": [p.name for p in plans if outtype == "q8_0" and p.qtype == gguf.GGMLQuantizationType.F16],
    }
    logger.info("wrote %s (%d bytes, %d tensors, %s)", out_path, facts["bytes"], len(plans), outtype)
    return facts


def vocab_facts(vocab: Vocab) -> dict:
    """The tokenizer facts an export reports (ids and their token strings)."""
    return {
        "tokenizer": vocab.model,
        "pre_tokenizer": vocab.pre,
        "stop_token_ids": list(vocab.stop_token_ids),
        "stop_tokens": [vocab.token(i) for i in vocab.stop_token_ids],
        "eos_token_id": vocab.eos_token_id,
        "eot_token_id": vocab.eot_token_id,
        "eom_token_id": vocab.eom_token_id,
        "not_stopping_llama_cpp": [vocab.token(i) for i in vocab.not_stopping_llama_cpp],
    }


# --------------------------------------------------------------------------------------------------
# model config


@dataclass(frozen=True)
class ModelParams:
    """What llama.cpp needs from config.json (sizes in elements, rope base in its own units)."""

    model_type: str  # config.json model_type
    gguf_arch: str  # llama.cpp architecture name
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_theta: float
    rope_parameters: dict
    rms_norm_eps: float
    vocab_size: int
    tie_word_embeddings: bool


def model_params(model_dir: Path) -> ModelParams:
    """Read and check `model_dir/config.json`. Raises `UserError` (one line) for an architecture, activation,
    sliding window or rope type the llama.cpp graphs written here do not compute."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        hint = ""
        if (model_dir / "adapter_config.json").is_file():
            hint = " It holds a LoRA adapter: merge it into the base model first."
        raise UserError(f"GGUF export: {config_path} is missing; export needs a merged model folder.{hint}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"GGUF export: cannot read {config_path}: {exc}") from exc
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"GGUF export: {config_path} has model_type {model_type!r}; GGUF export supports: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama with SentencePiece or byte-level BPE tokenizers, "
            "mistral without sliding window, qwen2)."
        )

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(
            f"GGUF export: {config_path} has hidden_act {config.hidden_act!r}; llama.cpp's {ARCHITECTURES[model_type]} "
            "graph only computes 'silu'."
        )
    sliding_window = getattr(config, "sliding_window", None)
    if model_type == "qwen2":  # Qwen2 configs carry a window that only applies with use_sliding_window
        sliding_window = sliding_window if getattr(config, "use_sliding_window", False) else None
    if sliding_window is not None and sliding_window < config.max_position_embeddings:
        raise UserError(
            f"GGUF export: {config_path} sets sliding_window={sliding_window}, below "
            f"max_position_embeddings={config.max_position_embeddings}; sliding-window attention is "
            f"not supported (the {ARCHITECTURES[model_type]} GGUF graph attends to the whole context)."
        )
    if model_type in ("llama", "mistral") and getattr(config, "mlp_bias", False):
        raise UserError(f"GGUF export: {config_path} sets mlp_bias=true; llama.cpp's llama graph has no MLP biases.")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope_theta is None:
        rope_theta = 10000.0
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"GGUF export: {config_path} uses rope type {rope_type!r}; supported: default, linear, llama3.")
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return ModelParams(
        model_type=model_type,
        gguf_arch=ARCHITECTURES[model_type],
        context_length=int(config.max_position_embeddings),
        embedding_length=int(config.hidden_size),
        block_count=int(config.num_hidden_layers),
        feed_forward_length=int(config.intermediate_size),
        head_count=int(num_heads),
        head_count_kv=int(num_kv_heads),
        head_dim=int(head_dim),
        rope_theta=float(rope_theta),
        rope_parameters={**rope, "rope_type": rope_type},
        rms_norm_eps=float(config.rms_norm_eps),
        vocab_size=int(config.vocab_size),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _general_name(model_dir: Path) -> str:
    name = model_dir.resolve().name or "model"
    # transformers' GGUF loader turns a llama file whose general.name is exactly "mistral" into a
    # MistralConfig (sliding window 4096 by default); the graph written here is llama's.
    return f"{name}-llama" if name == "mistral" else name


def _add_model_metadata(writer, params: ModelParams, file_type, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(params.context_length)
    writer.add_embedding_length(params.embedding_length)
    writer.add_block_count(params.block_count)
    writer.add_feed_forward_length(params.feed_forward_length)
    writer.add_head_count(params.head_count)
    writer.add_head_count_kv(params.head_count_kv)
    writer.add_rope_dimension_count(params.head_dim)
    if params.head_dim != params.embedding_length // params.head_count:
        writer.add_key_length(params.head_dim)
        writer.add_value_length(params.head_dim)
    writer.add_rope_freq_base(params.rope_theta)
    if params.rope_parameters["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params.rope_parameters["factor"]))
    writer.add_layer_norm_rms_eps(params.rms_norm_eps)
    writer.add_vocab_size(params.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --------------------------------------------------------------------------------------------------
# tensors


@dataclass
class _TensorPlan:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    load: Callable[[], np.ndarray]  # float32 data, already permuted


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if not files:
        raise UserError(
            f"GGUF export: no model.safetensors in {model_dir}; save the merged model with "
            "save_pretrained(..., safe_serialization=True)."
        )
    return files


def _permute_for_llama_cpp(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`, applied to q_proj (n_head, n_head) and k_proj (n_head, n_kv), weights
    (2-D) and biases (1-D) alike."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _choose_qtype(gguf_name: str, shape: tuple[int, ...], outtype: str):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or outtype == "f32":
        return GGMLQuantizationType.F32
    if outtype == "q8_0":
        block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
        if shape[-1] % block_size == 0:
            return GGMLQuantizationType.Q8_0
        logger.warning("%s: rows of %d are not a multiple of %d, written as f16", gguf_name, shape[-1], block_size)
    if outtype == "bf16":
        return GGMLQuantizationType.BF16
    return GGMLQuantizationType.F16


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _plan_tensors(model_dir: Path, params: ModelParams, outtype: str) -> list[_TensorPlan]:
    import gguf
    from safetensors import safe_open

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == params.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, params.block_count)
    plans: list[_TensorPlan] = []
    seen: dict[str, str] = {}
    for path in _safetensors_files(model_dir):
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        for hf_name in keys:
            if hf_name.endswith(_SKIPPED_TENSOR_SUFFIXES):
                continue
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(
                    f"GGUF export: tensor {hf_name!r} in {path.name} has no llama.cpp name; is this a "
                    f"plain {params.model_type} checkpoint (merged, without adapter or extra heads)?"
                )
            if gguf_name == "output.weight" and params.tie_word_embeddings:
                continue  # tied: llama.cpp reuses token_embd; a present output.weight would untie it
            if gguf_name in seen:
                raise UserError(f"GGUF export: tensors {seen[gguf_name]!r} and {hf_name!r} both map to {gguf_name!r}.")
            seen[gguf_name] = hf_name
            shape = shapes[hf_name]
            if params.gguf_arch != "llama":
                permute = None  # qwen2's rotary (NEOX) pairs the two halves of each head, like Hugging Face's
            elif ".attn_q." in gguf_name:
                permute = (params.head_count, params.head_count)
            elif ".attn_k." in gguf_name:
                permute = (params.head_count, params.head_count_kv)
            else:
                permute = None
            qtype = _choose_qtype(gguf_name, shape, outtype)
            plans.append(
                _TensorPlan(
                    name=gguf_name,
                    shape=shape,
                    qtype=qtype,
                    nbytes=_nbytes(shape, qtype),
                    load=_safetensors_loader(path, hf_name, permute),
                )
            )
    if "token_embd.weight" not in seen:
        raise UserError(f"GGUF export: {model_dir} has no model.embed_tokens.weight.")
    if not params.tie_word_embeddings and "output.weight" not in seen:
        raise UserError(
            f"GGUF export: {model_dir}/config.json says tie_word_embeddings=false but there is no lm_head.weight."
        )
    if params.rope_parameters["rope_type"] == "llama3":
        factors = llama3_rope_factors(params.rope_parameters, params.rope_theta, params.head_dim)
        plans.append(
            _TensorPlan(
                name=gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                shape=factors.shape,
                qtype=gguf.GGMLQuantizationType.F32,
                nbytes=factors.nbytes,
                load=lambda factors=factors: factors,
            )
        )
    plans.sort(key=lambda plan: _tensor_order(plan.name))
    return plans


def _tensor_order(name: str) -> tuple:
    if name.startswith("blk."):
        _, block, rest = name.split(".", 2)
        return (1, int(block), rest)
    return (0 if name.startswith(("token_embd", "rope_freqs")) else 2, 0, name)


def _safetensors_loader(path: Path, key: str, permute: tuple[int, int] | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            data = handle.get_tensor(key).to(torch.float32).numpy()
        if permute is not None:
            data = _permute_for_llama_cpp(data, *permute)
        return data

    return load


def llama3_rope_factors(rope: dict, rope_theta: float, head_dim: int) -> np.ndarray:
    """The `rope_freqs.weight` llama.cpp's converter writes for Llama 3.1-style rope scaling.

    llama.cpp divides each rotary frequency by its factor; these reproduce the frequencies
    transformers computes for `rope_type == "llama3"`.
    """
    factor = float(rope.get("factor", 8.0))
    low_freq_factor = float(rope.get("low_freq_factor", 1.0))
    high_freq_factor = float(rope.get("high_freq_factor", 4.0))
    old_context_len = float(rope.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
