"""K-quants (and the other llama.cpp-only types) from llama.cpp's own quantizer, through llama-cpp-python.

We never quantize to a K-quant ourselves: `export_quantized` writes the merged model as a GGUF in its own
storage precision (bf16 -> bf16, f16 -> f16, else f32: nothing is rounded before llama.cpp sees it), then
calls `llama_model_quantize` with `llama_model_quantize_default_params()` and the file type, exactly what
the `llama-quantize` tool does. llama.cpp picks the per-tensor mix (q4_k_m keeps some attn_v/ffn_down
rows in Q6_K, ...) and, for a matrix whose rows are not a multiple of the type's block (256 for K-quants),
falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, then F16 if even that does not fit
(llama.cpp `src/llama-quant.cpp`, `tensor_type_fallback`). Which tensors fell back is read from the written
file (type per tensor) and llama.cpp's own warnings are kept in the facts.

llama-cpp-python is the optional extra `trainer[gguf]` (it compiles llama.cpp from source when installed).
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from pathlib import Path

from trainer.errors import UserError

# outtype -> llama.cpp `enum llama_ftype` name (include/llama.h)
LLAMA_CPP_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
QUANTIZED_OUTTYPES = tuple(k for k in LLAMA_CPP_FTYPES if k != "q8_0")  # q8_0 is also written by us
K_QUANT_BLOCK = 256  # QK_K: elements per K-quant super-block (ggml/src/ggml-common.h)
_K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
_FALLBACK_LINE = re.compile(
    r"warning:\s+(?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\).*?falling back to\s+(?P<got>\S+)",
    re.DOTALL,
)


def require_llama_cpp(what: str = "this GGUF type"):
    """Import llama_cpp or raise a one-line `UserError` saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"GGUF export: {what} needs llama.cpp's quantizer/runtime: pip install 'trainer[gguf]' "
            "(builds llama-cpp-python from source, a few minutes)."
        ) from None
    return llama_cpp


def intermediate_outtype(model_dir: Path) -> str:
    """The lossless GGUF type for the merged weights: their own storage dtype (bf16, f16), else f32."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "f32"
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def quantize_gguf(src: Path, dst: Path, outtype: str, nthread: int = 0) -> dict:
    """Quantize the GGUF `src` to `dst` with llama.cpp (`llama_model_quantize`, default params, `outtype`).

    Returns `{"path", "bytes", "outtype", "ftype", "seconds", "tensor_types": {type: count},
    "fallback": [{"tensor", "columns", "type"}], "llama_cpp_warnings": [...]}`. `fallback` lists the 2-D
    tensors whose rows are not a multiple of the K-quant block and so got another type (empty for the
    non-K types). Raises `UserError` for an unknown type, a missing llama-cpp-python, or a failed quantize.
    """
    outtype = outtype.lower()
    if outtype not in LLAMA_CPP_FTYPES:
        raise UserError(
            f"GGUF export: {outtype!r} is not a llama.cpp quantization; use one of: {', '.join(LLAMA_CPP_FTYPES)}."
        )
    llama_cpp = require_llama_cpp(outtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[outtype])
    params.nthread = nthread or (os.cpu_count() or 1)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    started = time.perf_counter()
    with _captured_llama_log(llama_cpp) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    seconds = time.perf_counter() - started
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        last = next((line for line in reversed("".join(log).splitlines()) if line.strip()), "")
        raise UserError(f"GGUF export: llama.cpp could not quantize {src} to {outtype} (code {rc}): {last}")
    os.replace(tmp, dst)
    text = "".join(log)
    warnings = [" ".join(m.group(0).split()) for m in _FALLBACK_LINE.finditer(text)]
    types = tensor_types(dst)
    return {
        "path": str(dst),
        "bytes": dst.stat().st_size,
        "outtype": outtype,
        "ftype": (llama_cpp.llama_ftype_name(params.ftype) or b"").decode()
        if hasattr(llama_cpp, "llama_ftype_name")
        else outtype,
        "seconds": round(seconds, 2),
        "tensor_types": _count(types.values()),
        "fallback": fallback_tensors(dst) if outtype in QUANTIZED_OUTTYPES else [],
        "llama_cpp_warnings": warnings,
    }


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> ggml type name (e.g. "Q4_K"), read from the file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def fallback_tensors(path: Path) -> list[dict]:
    """Quantized 2-D tensors of `path` whose row length is not a multiple of 256 (no K-quant fits them), with
    the type llama.cpp gave them instead."""
    import gguf

    out = []
    for t in gguf.GGUFReader(path).tensors:
        columns = int(t.shape[0])  # GGUF shapes are ggml's ne: ne[0] is the row length
        if len(t.shape) < 2 or t.tensor_type.name in ("F32",) or t.tensor_type.name in _K_TYPES:
            continue
        if columns % K_QUANT_BLOCK != 0:
            out.append({"tensor": t.name, "columns": columns, "type": t.tensor_type.name})
    return out


def export_quantized(model_dir: Path, out_path: Path, outtype: str) -> dict:
    """Write `model_dir` as a GGUF quantized by llama.cpp to `outtype` (a K-quant or another llama.cpp type).

    The lossless intermediate file (see `intermediate_outtype`) is written beside `out_path` and deleted
    afterwards. Returns the facts of `quantize_gguf` plus `"source"` (the intermediate's type) and the
    writer's facts about the model and tokenizer.
    """
    from trainer.export.writer import export_gguf

    require_llama_cpp(outtype)
    out_path = Path(out_path)
    source_type = intermediate_outtype(model_dir)
    source = out_path.with_name(out_path.stem + f".{source_type}-source.gguf")
    try:
        written = export_gguf(model_dir, source, source_type)
        facts = quantize_gguf(source, out_path, outtype)
    finally:
        source.unlink(missing_ok=True)
    written = {k: v for k, v in written.items() if k not in ("path", "bytes", "outtype", "f16_fallback")}
    return {**written, **facts, "source": source_type}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


class _captured_llama_log:
    """Route llama.cpp's log lines into a list while the block runs, then restore llama-cpp-python's logger."""

    def __init__(self, llama_cpp):
        self.llama_cpp = llama_cpp
        self.lines: list[str] = []

    def __enter__(self) -> list[str]:
        lines = self.lines

        @self.llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            lines.append(text.decode("utf-8", errors="replace") if text else "")

        self._callback = callback  # keep a reference: ctypes callbacks must outlive their use
        self.llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        return lines

    def __exit__(self, *exc):
        try:
            from llama_cpp import _logger

            self.llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except Exception:  # noqa: BLE001, S110 - an older llama-cpp-python without the module: leave ours silent
            pass
        return False
