"""Facts about the model being trained, defined once for the trainer and the memory planner.

Architecture facts are read from a transformers `PretrainedConfig` (or any object with the same attributes, such as
a `types.SimpleNamespace`): each function takes the top-level config, multimodal wrappers included, and reads the
decoder's text config (`text_config`). `trainable_share` is the one definition of the trainable-parameter share that
`trainer.model` logs at the start of training and `trainer estimate` prints.
"""

from __future__ import annotations


def text_config(cfg):
    """The config of the text decoder: `cfg` itself for a text model, its text sub-config for a multimodal wrapper
    (Llava's, Gemma 3's or Mistral 3's `text_config`).

    A transformers config answers with `PretrainedConfig.get_text_config(decoder=True)` (the sub-config named
    `text_config`, `decoder` or `generator`, else the config itself); another object falls back to its
    `text_config` attribute when it has no `hidden_size` of its own.
    """
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        return get(decoder=True)
    text = getattr(cfg, "text_config", None)
    if getattr(cfg, "hidden_size", None) is None and text is not None:
        return text
    return cfg


def head_dim(cfg) -> int:
    """Features per attention head: `head_dim` when the config sets it (Gemma, Llama 3.2, Qwen 3, ...), else
    hidden_size // num_attention_heads (what LlamaAttention does when it is unset or None)."""
    cfg = text_config(cfg)
    explicit = getattr(cfg, "head_dim", None)
    return int(explicit) if explicit else int(cfg.hidden_size) // int(cfg.num_attention_heads)


def num_kv_heads(cfg) -> int:
    """Key/value heads: `num_key_value_heads` (grouped-query attention), else num_attention_heads (multi-head)."""
    cfg = text_config(cfg)
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def tied_embeddings(cfg) -> bool:
    """Whether lm_head shares the input embedding matrix (`tie_word_embeddings`): the text config's value, else the
    wrapper's (multimodal configs keep it on either), else False."""
    tied = getattr(text_config(cfg), "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(cfg, "tie_word_embeddings", False)
    return bool(tied)


def qkv_bias(cfg) -> bool:
    """Whether q/k/v projections carry a bias without o_proj having one: Qwen2 always does (its config has no
    switch); Llama-style `attention_bias` puts biases on all four projections and is read separately."""
    return getattr(text_config(cfg), "model_type", "") == "qwen2"


def trainable_share(trainable: int, total: int) -> float:
    """Percent of the model's parameters that the optimizer updates: 100 * trainable / total.

    `total` counts every parameter of the model being trained: the base model's (frozen or not) plus the LoRA
    adapters', tied weights once (as `model.parameters()` yields them), and a 4-bit weight by the number of values
    it holds (a bitsandbytes `Params4bit` of uint8 storage packs two per element), not by its storage elements.
    `trainer.model.count_parameters(model)` counts a real model that way and
    `trainer.estimate.count_parameters(config, lora)["total"]` a config. Returns 0.0 for an empty model.
    """
    return 100.0 * trainable / total if total else 0.0
