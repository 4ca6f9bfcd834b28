"""GGUF export: merged model -> GGUF (f16/bf16/f32/q8_0 by us, K-quants by llama.cpp) + Ollama Modelfile,
checked hop by hop in llama.cpp itself.

    writer.py     config + tensors -> GGUF (llama, mistral, qwen2)
    vocab.py      tokenizer.json -> GGUF tokenizer metadata (byte-level BPE, SentencePiece), stop tokens
    quantize.py   llama.cpp's quantizer (llama-cpp-python), fallback report
    modelfile.py  Ollama Modelfile (Go template chosen by rendering, stops, generation settings)
    check.py      the hop-by-hop comparison and report
    run.py        `trainer export RUN_DIR ...`
"""

from trainer.export.run import OUTTYPES, export_run, hop_types, write_gguf
from trainer.export.writer import SUPPORTED_ARCHITECTURES, export_gguf, llama3_rope_factors

__all__ = [
    "OUTTYPES",
    "SUPPORTED_ARCHITECTURES",
    "export_gguf",
    "export_run",
    "hop_types",
    "llama3_rope_factors",
    "write_gguf",
]
