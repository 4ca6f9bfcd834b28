#!/usr/bin/env bash
# One CUDA GPU, under 8 minutes: the `gpu` tests, then a 7B-shaped Llama (random weights, built from its config:
# nothing downloaded) trained with QLoRA for 20 steps at 2048 tokens through `trainer train`, printing peak memory
# against `trainer estimate` for the same recipe, tokens/s and MFU (bench/gpu_check.py; figures also in
# $OUT_DIR/gpu_check.json).
#
#   bench/gpu_check.sh [gpu_check.py options]       e.g. --steps 20 --seq 2048 --micro-batch 2 --attn sdpa
#
# Environment: WHEELS (folder of wheels to install first, default .whl), OUT_DIR (default runs/gpu_check),
# PYTHON (default python3).
#
# Packages the GPU machine may lack, carried as wheels because it has no package registry (the trainer's own
# dependencies that a stock CUDA PyTorch image does not ship; versions are the ones this code was tested with):
#   bitsandbytes==0.50.2   NF4 quantization, paged 8-bit AdamW (one manylinux wheel with CUDA 11.8-13.2 kernels)
#   datasets==5.2.0        the data pipeline; with its pure-Python needs dill==0.4.1 and multiprocess==0.70.19
#   peft==0.21.2           LoRA (carry it when the machine's peft is older than 0.17)
#   flash-attn             optional: the FlashAttention-2 test and --attn flash_attention_2 run only when installed
# Fetch them where pip reaches PyPI (about 45 MB; Python 3.12 x86-64 shown, match the GPU machine's python):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2
# Already expected there: torch (CUDA build), transformers>=5, accelerate, safetensors, tokenizers, pyarrow, pandas,
# xxhash, fsspec, huggingface-hub, rich, pyyaml, tensorboard, matplotlib, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
OUT_DIR=${OUT_DIR:-runs/gpu_check}
start=$(date +%s)

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" - <<'PY'
import importlib, sys
import torch
missing = [m for m in ("bitsandbytes", "datasets", "peft", "accelerate", "transformers", "safetensors", "yaml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages {missing}: carry them as wheels (see the header of bench/gpu_check.sh)")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      + ", ".join(f"{m} {importlib.import_module(m).__version__}" for m in ("transformers", "peft", "bitsandbytes")))
PY

echo "== gpu tests"
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
echo "== 7B-shaped QLoRA run ($(( $(date +%s) - start )) s so far)"
"$PYTHON" bench/gpu_check.py --out "$OUT_DIR" "$@"
echo "gpu_check: done in $(( $(date +%s) - start )) s"
