#!/usr/bin/env bash
# One node with 8 GPUs, DeepSpeed ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml: 8 processes, nccl).
#
#   launch/node.sh RECIPE [key.path=value ...] [--resume CKPT | --fresh]
#
# e.g.  launch/node.sh launch/recipes/llama7b_lora_zero2_8gpu.yaml
# is    launch/train.sh accelerate_configs/deepspeed_zero2.yaml launch/recipes/llama7b_lora_zero2_8gpu.yaml
# Another GPU count: launch/train.sh with a copy of that yaml whose num_processes is the count.
# Several nodes: launch/slurm_multinode.sbatch.
set -euo pipefail

[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if command -v nvidia-smi >/dev/null; then
  gpus="$(nvidia-smi -L | grep -c '^GPU ' || true)"
  if [[ "$gpus" != 8 ]]; then
    echo "launch/node.sh: deepspeed_zero2.yaml starts 8 processes, one per GPU, but this node has $gpus GPU(s)" >&2
    exit 2
  fi
fi
exec "$here/train.sh" "$here/../accelerate_configs/deepspeed_zero2.yaml" "$@"
