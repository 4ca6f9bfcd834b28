#!/usr/bin/env bash
# Train on one machine: a recipe (what to train) under an accelerate config (how many processes, DDP or DeepSpeed).
#
#   launch/train.sh ACCEL_CONFIG RECIPE [key.path=value ...] [--resume CKPT | --fresh] [--no-progress]
#
# runs, from the repo root (the ds_configs/ paths in accelerate_configs/*.yaml and the data/output paths in
# launch/recipes/*.yaml are relative to it):
#
#   accelerate launch --config_file ACCEL_CONFIG -m trainer train RECIPE [key.path=value ...]
#
# Examples:
#   launch/train.sh accelerate_configs/single_gpu.yaml launch/recipes/mistral7b_qlora_1gpu.yaml
#   launch/train.sh accelerate_configs/deepspeed_zero2.yaml launch/recipes/llama7b_lora_zero2_8gpu.yaml train.lr=1e-4
#   launch/train.sh accelerate_configs/cpu_gloo_ddp.yaml launch/recipes/smollm2_135m_lora_cpu.yaml  # 2 CPU processes
#
# Every hyperparameter lives in the recipe (or a key.path=value override); this script sets none.
# Rerunning the same command resumes from the newest checkpoint in the recipe's output_dir. On SIGTERM/SIGUSR1 the
# trainer finishes the step, saves a checkpoint and exits with 75 (accelerate launch reports a multi-process run
# that stopped this way as a failure, exit 1); exit 2 is a problem with the recipe or config, told in one line.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
case "$1" in -h|--help) usage ;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Paths given relative to the caller's directory stay valid after the cd below.
abs() { if [[ -e "$1" ]]; then echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; else echo "$1"; fi; }
config="$(abs "$1")"
recipe="$(abs "$2")"
shift 2
cd "$root"
[[ -f "$config" ]] || { echo "launch/train.sh: accelerate config not found: $config" >&2; exit 2; }
[[ -f "$recipe" ]] || { echo "launch/train.sh: recipe not found: $recipe" >&2; exit 2; }

exec accelerate launch --config_file "$config" -m trainer train "$recipe" "$@"
