"""Write a merged Hugging Face Llama-family model folder as one GGUF file.

The file is what llama.cpp's `convert_hf_to_gguf.py` would write for the same folder (architecture
`llama`), produced with the `gguf` package's `GGUFWriter` so that nothing from llama.cpp has to be
installed:

- metadata under llama.cpp's key names (`llama.context_length`, `llama.attention.head_count_kv`, ...);
- tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output`), with
  `q_proj`/`k_proj` rows permuted the way llama.cpp's converter does (its rotary embedding pairs
  adjacent dimensions, Hugging Face's pairs the two halves of each head); transformers' GGUF loader
  undoes that permutation, so a file written here loads back into transformers unchanged;
- no `output.weight` when the embeddings are tied (llama.cpp, and transformers' loader, read a
  missing `output.weight` as "tied");
- the tokenizer as a byte-level BPE (`tokenizer.ggml.model = "gpt2"`): tokens, token types, merges,
  special token ids, add-BOS/EOS flags and the chat template.

`outtype` is `f16` (2-D matrices in float16) or `q8_0` (2-D matrices quantized to Q8_0 with
`gguf.quants.quantize`). Norms and other 1-D tensors stay float32 either way, as llama.cpp's converter
keeps them. A matrix whose rows are not a multiple of the Q8_0 block (32) falls back to float16, as
the converter does too.

Tensors are streamed: each is read from the safetensors files, converted and written before the next
is read, so exporting needs about one tensor's worth of memory on top of the mapped files.
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

logger = logging.getLogger(__name__)

# config.model_type values this exporter writes. Mistral is the Llama graph under another name (as
# long as it has no sliding window), which is also how llama.cpp converts it: architecture `llama`.
SUPPORTED_ARCHITECTURES = ("llama", "mistral")
OUTTYPES = ("f16", "q8_0")

# Hugging Face tensors llama.cpp's converter drops: buffers recomputed at load time.
_SKIPPED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)

# The pre-tokenizer regex Llama 3 tokenizers split with (llama.cpp calls it `llama-bpe`).
_LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def export_gguf(model_dir: Path, out_path: Path, outtype: str = "f16") -> dict:
    """Write the merged model in `model_dir` to `out_path` as a single GGUF file.

    `model_dir` is a folder written by `save_pretrained` (config.json, *.safetensors, tokenizer.json
    and the other tokenizer files). Returns facts about the written file:
    `{"path", "bytes", "tensor_count", "outtype", "architecture", "tie_word_embeddings",
    "vocab_size", "f16_fallback"}` where `f16_fallback` lists the q8_0 matrices that could not be
    quantized (rows not a multiple of 32) and were written as float16.

    Raises `UserError` for a folder that is not a supported architecture, a tokenizer that is not a
    byte-level BPE, an unknown `outtype`, or missing files.
    """
    import gguf

    model_dir = Path(model_dir)
    out_path = Path(out_path)
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        raise UserError(f"GGUF export: outtype {outtype!r} is not supported; use one of: {', '.join(OUTTYPES)}.")
    if not model_dir.is_dir():
        raise UserError(f"GGUF export: model folder {model_dir} does not exist.")

    params = _model_params(model_dir)
    vocab = _read_vocab(model_dir, params.vocab_size)
    plans = _plan_tensors(model_dir, params, outtype)

    file_type = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp_path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_model_metadata(writer, params, file_type, name=_general_name(model_dir))
        _add_tokenizer_metadata(writer, vocab)
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
        "tie_word_embeddings": params.tie_word_embeddings,
        "vocab_size": params.vocab_size,
        "f16_fallback": [p.name for p in plans if outtype == "q8_0" and p.qtype == gguf.GGMLQuantizationType.F16],
    }
    logger.info("wrote %s (%d bytes, %d tensors, %s)", out_path, facts["bytes"], len(plans), outtype)
    return facts


# --------------------------------------------------------------------------------------------------
# model config


@dataclass(frozen=True)
class _ModelParams:
    model_type: str
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


def _model_params(model_dir: Path) -> _ModelParams:
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
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"GGUF export: {config_path} has model_type {model_type!r}; GGUF export supports only "
            f"Llama-family architectures: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(
            f"GGUF export: {config_path} has hidden_act {config.hidden_act!r}; llama.cpp's llama graph "
            "only computes 'silu'."
        )
    sliding_window = getattr(config, "sliding_window", None)
    if sliding_window is not None and sliding_window < config.max_position_embeddings:
        raise UserError(
            f"GGUF export: {config_path} sets sliding_window={sliding_window}, below "
            f"max_position_embeddings={config.max_position_embeddings}; a sliding-window Mistral is "
            "not supported (the llama GGUF graph attends to the whole context)."
        )
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
    return _ModelParams(
        model_type=model_type,
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


def _add_model_metadata(writer, params: _ModelParams, file_type, name: str) -> None:
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
    """llama.cpp's `LlamaModel.permute`, applied to q_proj (n_head, n_head) and k_proj (n_head, n_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _choose_qtype(gguf_name: str, shape: tuple[int, ...], outtype: str):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return GGMLQuantizationType.F32
    if outtype == "q8_0":
        block_size, _ = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
        if shape[-1] % block_size == 0:
            return GGMLQuantizationType.Q8_0
        logger.warning("%s: rows of %d are not a multiple of %d, written as f16", gguf_name, shape[-1], block_size)
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


def _plan_tensors(model_dir: Path, params: _ModelParams, outtype: str) -> list[_TensorPlan]:
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, params.block_count)
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
                    "plain Llama checkpoint (merged, without adapter or extra heads)?"
                )
            if gguf_name == "output.weight" and params.tie_word_embeddings:
                continue  # tied: llama.cpp reuses token_embd; a present output.weight would untie it
            if gguf_name in seen:
                raise UserError(f"GGUF export: tensors {seen[gguf_name]!r} and {hf_name!r} both map to {gguf_name!r}.")
            seen[gguf_name] = hf_name
            shape = shapes[hf_name]
            if ".attn_q." in gguf_name:
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


# --------------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class _Vocab:
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | list[dict] | None


def _read_vocab(model_dir: Path, vocab_size: int) -> _Vocab:
    import gguf

    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise UserError(
            f"GGUF export: {tokenizer_path} is missing; save the tokenizer with the model "
            "(tokenizer.save_pretrained) so the GGUF can carry it."
        )
    try:
        spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"GGUF export: cannot read {tokenizer_path}: {exc}") from exc

    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else repr(model.get("type"))
        raise UserError(
            f"GGUF export: {tokenizer_path} is a {kind} tokenizer; only byte-level (GPT-2 style) BPE "
            "tokenizers are supported."
        )
    if spec.get("normalizer") is not None:
        raise UserError(
            f"GGUF export: {tokenizer_path} has a normalizer ({spec['normalizer'].get('type')}); llama.cpp's "
            "byte-level BPE applies none, so the GGUF would tokenize differently."
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), tokenizer_path)

    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(entry["id"]): entry for entry in spec.get("added_tokens") or []}
    for token_id, entry in added.items():
        id_to_token[token_id] = entry["content"]
    if id_to_token and max(id_to_token) >= vocab_size:
        raise UserError(
            f"GGUF export: the tokenizer has token id {max(id_to_token)} but the model's vocab_size is "
            f"{vocab_size}; resize the embeddings before saving."
        )
    tokens: list[str] = []
    token_types: list[int] = []
    for token_id in range(vocab_size):
        if token_id not in id_to_token:
            tokens.append(f"[PAD{token_id}]")  # embedding rows past the tokenizer, as llama.cpp writes them
            token_types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(id_to_token[token_id])
            token_types.append(
                gguf.TokenType.CONTROL if added[token_id].get("special") else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(id_to_token[token_id])
            token_types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or []]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without_special = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    eos_id = tokenizer.eos_token_id
    add_bos = bos_id is not None and len(with_special) > len(without_special) and with_special[0] == bos_id
    add_eos = eos_id is not None and len(with_special) > len(without_special) and with_special[-1] == eos_id

    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):
        chat_template = [{"name": name, "template": template} for name, template in chat_template.items()]
    return _Vocab(
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in token_types],
        merges=merges,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        unk_token_id=tokenizer.unk_token_id,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        chat_template=chat_template or None,
    )


def _pre_tokenizer_name(pre_tokenizer: dict | None, tokenizer_path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the splitting this tokenizer.json does.

    llama.cpp's converter recognises a tokenizer by hashing its output on a test text; here the few
    byte-level shapes Llama-family models use are recognised from the tokenizer.json itself.
    """

    def byte_level(step: dict | None, use_regex: bool) -> bool:
        return (
            step is not None
            and step.get("type") == "ByteLevel"
            and bool(step.get("use_regex", True)) == use_regex
            and not step.get("add_prefix_space", False)
        )

    if byte_level(pre_tokenizer, use_regex=True):
        return "gpt2"
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, use_regex=True):
            return "smollm"  # SmolLM / SmolLM2: digits one by one, then GPT-2's split
        if (
            first.get("type") == "Split"
            and (first.get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT_REGEX
            and byte_level(second, use_regex=False)
        ):
            return "llama-bpe"  # Llama 3
    raise UserError(
        f"GGUF export: the pre-tokenizer in {tokenizer_path} ({json.dumps(pre_tokenizer)[:200]}) is not one "
        "llama.cpp's byte-level BPE is known to reproduce (GPT-2, SmolLM or Llama 3 splitting)."
    )


def _add_tokenizer_metadata(writer, vocab: _Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_token_id is not None:
        writer.add_bos_token_id(vocab.bos_token_id)
    if vocab.eos_token_id is not None:
        writer.add_eos_token_id(vocab.eos_token_id)
    if vocab.unk_token_id is not None:
        writer.add_unk_token_id(vocab.unk_token_id)
    if vocab.pad_token_id is not None:
        writer.add_pad_token_id(vocab.pad_token_id)
    writer.add_add_bos_token(vocab.add_bos_token)
    writer.add_add_eos_token(vocab.add_eos_token)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
