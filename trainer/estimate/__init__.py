"""Memory planner: will this recipe fit on these GPUs, and if not, what to change.

`estimate(recipe, model_config, gpus=..., gpu_mem_gib=...)` returns an `Estimate` with every component in bytes
per GPU; `format_table(est)` renders it for the CLI and `estimate_to_dict(est)` for JSON. Nothing here touches a
GPU, loads weights or reaches the network: parameters are counted from the config (Llama/Mistral-style decoders:
embed_tokens, per layer q/k/v/o (GQA aware), gate/up/down and two RMSNorms, a final norm, lm_head unless tied).

Modules, in the order the plan uses them:

* `configs`      model configs without the network (`load_model_config`, `KNOWN_CONFIGS`)
* `params`       parameter and LoRA counts from a config (`parameter_table`, `count_parameters`)
* `storage`      bytes rules: NF4 with double quantization, AdamW / 8-bit AdamW states, ZeRO-1/2 partitions
* `activations`  what autograd saves, with and without gradient checkpointing; autocast weight copies
* `plan`         the precision policy, the per-GPU sum and peak, the verdict, suggestions and the table

Architecture facts read from the config (head_dim, KV heads, tied embeddings, ...) and the trainable-parameter
share live in `trainer.arch`, shared with training.
"""

from trainer.estimate.activations import Precision, activation_bytes, autocast_weight_bytes
from trainer.estimate.configs import KNOWN_CONFIGS, load_model_config
from trainer.estimate.params import (
    ModelDims,
    ParamInfo,
    count_parameters,
    lora_parameter_count,
    model_dims,
    parameter_table,
)
from trainer.estimate.plan import CUDA_RESERVE_BYTES, Estimate, GiB, estimate, estimate_to_dict, format_table
from trainer.estimate.storage import adam_state_bytes, nf4_bytes, zero2_grad_partition_numel, zero2_partition_numel

__all__ = [
    "CUDA_RESERVE_BYTES",
    "KNOWN_CONFIGS",
    "Estimate",
    "GiB",
    "ModelDims",
    "ParamInfo",
    "Precision",
    "activation_bytes",
    "adam_state_bytes",
    "autocast_weight_bytes",
    "count_parameters",
    "estimate",
    "estimate_to_dict",
    "format_table",
    "load_model_config",
    "lora_parameter_count",
    "model_dims",
    "nf4_bytes",
    "parameter_table",
    "zero2_grad_partition_numel",
    "zero2_partition_numel",
]
