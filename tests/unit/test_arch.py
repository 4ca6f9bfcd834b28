"""trainer.arch against real transformers models (attention shapes, biases, tied embeddings, multimodal wrappers),
and the trainable-parameter share: what training logs equals what `trainer estimate` prints."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from tests.conftest import ROOT, make_model
from trainer import arch
from trainer import estimate as E
from trainer.config import LoraArgs, ModelArgs, load_recipe

warnings.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")

SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
}


def configs():
    """(name, config, head_dim, kv_heads, tied, q/k/v-only biases): Llama derives head_dim (64 / 4), Gemma sets it
    explicitly to twice that, Qwen2 has q/k/v biases and ties its embeddings."""
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    return [
        ("llama", LlamaConfig(**SHAPE, num_key_value_heads=2, tie_word_embeddings=False), 16, 2, False, False),
        ("gemma", GemmaConfig(**SHAPE, num_key_value_heads=1, head_dim=32), 32, 1, True, False),
        ("qwen2", Qwen2Config(**SHAPE, num_key_value_heads=2, tie_word_embeddings=True), 16, 2, True, True),
    ]


@pytest.mark.parametrize("case", configs(), ids=lambda c: c[0])
def test_arch_facts_match_the_built_model(case):
    from transformers import AutoModelForCausalLM

    _, cfg, head_dim, kv_heads, tied, qkv_bias = case
    assert (arch.head_dim(cfg), arch.num_kv_heads(cfg), arch.tied_embeddings(cfg), arch.qkv_bias(cfg)) == (
        head_dim,
        kv_heads,
        tied,
        qkv_bias,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == cfg.num_attention_heads * arch.head_dim(cfg)
    assert attn.k_proj.out_features == attn.v_proj.out_features == arch.num_kv_heads(cfg) * arch.head_dim(cfg)
    assert (attn.q_proj.bias is not None, attn.o_proj.bias is not None) == (qkv_bias, False)
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same == arch.tied_embeddings(cfg)
    # the planner's parameter count reads these facts: it matches the model's
    assert E.count_parameters(cfg)["base"] == sum(p.numel() for p in model.parameters())


def test_text_config_of_a_multimodal_wrapper_and_of_plain_objects():
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(**SHAPE, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    llava = LlavaConfig(text_config=text)
    assert arch.text_config(llava) is llava.text_config
    assert (arch.head_dim(llava), arch.num_kv_heads(llava), arch.tied_embeddings(llava)) == (8, 2, False)
    assert arch.text_config(text) is text
    # any object with the attributes: no head_dim -> hidden // heads, no num_key_value_heads -> heads
    plain = types.SimpleNamespace(hidden_size=96, num_attention_heads=6)
    assert (arch.head_dim(plain), arch.num_kv_heads(plain), arch.tied_embeddings(plain)) == (16, 6, False)
    wrapped = types.SimpleNamespace(text_config=plain, tie_word_embeddings=True)
    assert arch.text_config(wrapped) is plain and arch.tied_embeddings(wrapped) is True
    assert arch.trainable_share(0, 0) == 0.0


@pytest.mark.parametrize("tied", [True, False])
def test_training_and_the_planner_report_the_same_trainable_share(tmp_path, tied):
    """build_model's log line and `trainer estimate`'s table count the same parameters: LoRA included in the
    total, tied embeddings once. The tiny Llama (64 hidden, 2 layers, vocab 512) with LoRA r=8 on all linears,
    tied: 16,384 of 123,200 = 13.299%, where a total without the adapters would give 15.339%."""
    from trainer.model import build_model, count_parameters

    folder = tmp_path / "tiny"
    make_model(512, tie=tied).save_pretrained(folder)
    lora = LoraArgs(r=8, target_modules="all-linear")
    logged: list[str] = []
    model = build_model(ModelArgs(name_or_path=str(folder), dtype="fp32"), lora, log=logged.append)
    trainable, total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())  # torch yields a tied weight once
    assert (trainable, total) == (16_384, 123_200 if tied else 123_200 + 512 * 64)

    cfg = E.load_model_config(str(folder))
    counts = E.count_parameters(cfg, lora)
    assert (counts["trainable"], counts["total"]) == (trainable, total)
    share = arch.trainable_share(trainable, total)
    assert f"{trainable:,} trainable of {total:,} parameters ({share:.3f}%)" in logged[0]
    recipe = load_recipe(
        ROOT / "launch" / "recipes" / "smollm2_135m_lora_cpu.yaml", [f"model.name_or_path={folder}", "lora.r=8"]
    )
    est = E.estimate(recipe, cfg, gpus=1, gpu_mem_gib=24)
    assert est.trainable_share == share
    assert f"trainable   {trainable:,} params ({share:.2f}%)" in E.format_table(est)


def test_shipped_smollm2_recipe_share_is_the_same_in_training_and_the_planner():
    """launch/recipes/smollm2_135m_lora_cpu.yaml: 4,884,480 LoRA params of 139,399,488 (134,515,008 base + LoRA),
    3.504%; the planner used to divide by the base alone (3.63%). The real model is built on the meta device."""
    from transformers import AutoModelForCausalLM

    from trainer.model import apply_lora, count_parameters

    recipe = load_recipe(ROOT / "launch" / "recipes" / "smollm2_135m_lora_cpu.yaml", [])
    cfg = E.load_model_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    with torch.device("meta"):
        model = apply_lora(AutoModelForCausalLM.from_config(cfg), recipe.lora)
    trainable, total = count_parameters(model)
    assert (trainable, total) == (4_884_480, 139_399_488)
    est = E.estimate(recipe, cfg, gpus=1, gpu_mem_gib=24)
    assert (est.trainable_params, est.total_params + est.lora_params) == (trainable, total)
    assert f"{est.trainable_share:.3f}" == f"{arch.trainable_share(trainable, total):.3f}" == "3.504"
    assert "(3.50%)" in E.format_table(est)
