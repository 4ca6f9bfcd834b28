"""The memory planner against real objects: parameter/LoRA counts vs transformers + peft, gradient and optimizer
bytes vs a real AdamW step, NF4 bytes vs bitsandbytes, ZeRO-2 partitions vs DeepSpeed's padding rule, activation
terms vs the tensors autograd saves; then sanity checks on 7B recipes. CPU only, a few seconds."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from trainer import estimate as E
from trainer.config import DataArgs, LoraArgs, ModelArgs, Recipe, TrainArgs
from trainer.errors import UserError

warnings.filterwarnings("ignore")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

GiB = 1024**3


def tiny_config(tied: bool = False, layers: int = 2, intermediate: int = 128) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
    )


def make_recipe(
    lora: LoraArgs | None = LoraArgs(r=8, target_modules="all-linear"),
    *,
    dtype="fp32",
    quantization=None,
    ckpt=True,
    mb=1,
    seq=64,
    grad_accum=1,
    optimizer="adamw",
    packing=False,
    name="tiny",
) -> Recipe:
    return Recipe(
        model=ModelArgs(name_or_path=name, dtype=dtype, quantization=quantization, gradient_checkpointing=ckpt),
        lora=lora,
        data=DataArgs(path="data.jsonl", max_seq_len=seq, packing=packing),
        train=TrainArgs(micro_batch_size=mb, grad_accum=grad_accum, optimizer=optimizer),
    )


def tiny_model(cfg: LlamaConfig, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def peft_model(cfg, targets, r=8, dropout=0.05, dtype=torch.float32):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model(cfg, dtype), peft.LoraConfig(r=r, target_modules=targets, lora_dropout=dropout)
    )
    for p in model.parameters():  # what the trainer does: adapters in fp32 over a frozen base in the compute dtype
        if p.requires_grad:
            p.data = p.data.float()
    return model


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_table_matches_the_real_model(tied):
    cfg = tiny_config(tied)
    model = tiny_model(cfg)
    real = [(n, p.numel()) for n, p in model.named_parameters()]
    table = E.parameter_table(cfg)
    assert [(p.name, p.numel) for p in table] == real
    assert E.count_parameters(cfg)["base"] == sum(p.numel() for p in model.parameters())
    assert all(p.trainable for p in table)


def test_parameter_table_handles_biases_and_explicit_head_dim():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    )  # q/k/v biases
    llama = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        attention_bias=True,
        mlp_bias=True,
        head_dim=32,
    )
    for cfg, cls in ((qwen, Qwen2ForCausalLM), (llama, LlamaForCausalLM)):
        torch.manual_seed(0)
        real = [(n, p.numel()) for n, p in cls(cfg).named_parameters()]
        assert [(p.name, p.numel) for p in E.parameter_table(cfg)] == real


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_counts_match_peft(tied, targets):
    cfg = tiny_config(tied)
    model = peft_model(cfg, targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = LoraArgs(r=8, target_modules=targets)
    assert E.count_parameters(cfg, lora)["trainable"] == trainable
    assert E.count_parameters(cfg, lora)["lora"] == trainable
    assert E.lora_parameter_count(cfg, 8, targets) == trainable
    real = [(n.removeprefix("base_model.model."), p.numel(), p.requires_grad) for n, p in model.named_parameters()]
    assert [(p.name, p.numel, p.trainable) for p in E.parameter_table(cfg, lora)] == real


def test_lora_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match="qkv"):
        E.count_parameters(tiny_config(), LoraArgs(r=8, target_modules=["qkv"]))


# ----------------------------------------------------------------------------------------------------------------
# Gradients and optimizer states: exact bytes after a real step
# ----------------------------------------------------------------------------------------------------------------


def _one_step(model, optimizer_cls, **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_cls(params, lr=1e-3, **kw)
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    opt.step()
    return params, opt, grad_bytes


def _adamw_state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )


@pytest.mark.parametrize(
    "lora", [LoraArgs(r=8, target_modules="all-linear"), LoraArgs(r=8, target_modules=["q_proj", "v_proj"]), None]
)
def test_gradient_and_adamw_state_bytes_are_exact(lora):
    cfg = tiny_config()
    model = peft_model(cfg, lora.target_modules) if lora is not None else tiny_model(cfg)
    params, opt, grad_bytes = _one_step(model, torch.optim.AdamW)
    est = E.estimate(make_recipe(lora), cfg, gpus=1, gpu_mem_gib=24)
    n = sum(p.numel() for p in params)
    assert est.trainable_params == n
    assert est.gradients == grad_bytes == 4 * n
    assert est.optimizer_states == _adamw_state_bytes(opt) == 8 * n
    assert est.trainable_weights == sum(p.numel() * p.element_size() for p in params)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert est.weights == frozen


def test_frozen_base_in_bf16_is_counted_in_bf16():
    cfg = tiny_config()
    model = peft_model(cfg, "all-linear", dtype=torch.bfloat16)
    est = E.estimate(make_recipe(dtype="bf16"), cfg, gpus=1, gpu_mem_gib=24)
    assert est.weights == sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert est.trainable_weights == sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)


def test_adamw_8bit_state_bytes_are_exact():
    bnb = pytest.importorskip("bitsandbytes")
    cfg = tiny_config()
    model = tiny_model(cfg)  # full fine-tune: big tensors get 8-bit states, the norms (< 4096) 32-bit ones
    try:
        params, opt, _ = _one_step(model, bnb.optim.AdamW8bit)
    except (RuntimeError, NotImplementedError) as err:  # pragma: no cover - bitsandbytes without CPU kernels
        pytest.skip(f"bitsandbytes 8-bit optimizer unavailable on CPU: {err}")
    storages = {}
    for state in opt.state.values():
        for key, t in state.items():
            if torch.is_tensor(t) and key in ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    est = E.estimate(make_recipe(None, optimizer="adamw_8bit"), cfg, gpus=1, gpu_mem_gib=24)
    assert est.optimizer_states == sum(storages.values())
    assert est.optimizer_states < 0.4 * E.estimate(make_recipe(None), cfg, gpus=1, gpu_mem_gib=24).optimizer_states


def qlora_model(cfg, folder, r=8, dropout=0.05, checkpointing=False):
    """A QLoRA model built the way trainer.model does it: bitsandbytes NF4 + double quant (on CPU),
    peft.prepare_model_for_kbit_training (upcasts non-quantized params to fp32), then LoRA."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model(cfg).save_pretrained(folder)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.uint8,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, quantization_config=quant, device_map={"": "cpu"}
        )
    except (RuntimeError, NotImplementedError, ImportError, ValueError) as err:  # pragma: no cover
        pytest.skip(f"bitsandbytes 4-bit loading unavailable on CPU: {err}")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return peft.get_peft_model(
        model, peft.LoraConfig(r=r, target_modules="all-linear", lora_dropout=dropout, task_type="CAUSAL_LM")
    )


def test_qlora_weight_bytes_follow_bitsandbytes_and_peft(tmp_path):
    cfg = tiny_config()
    model = qlora_model(cfg, tmp_path / "tiny")
    frozen, trainable, quantized = 0, 0, 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        if p.__class__.__name__ == "Params4bit":
            st = p.quant_state
            n += sum(
                t.numel() * t.element_size() for t in (st.absmax, st.code, st.offset, st.state2.absmax, st.state2.code)
            )
            quantized += 1
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    assert quantized == 7 * cfg.num_hidden_layers
    est = E.estimate(make_recipe(dtype="bf16", quantization="nf4"), cfg, gpus=1, gpu_mem_gib=24)
    assert est.weights == frozen  # NF4 Linear weights + constants, fp32 embeddings/norms/lm_head
    assert est.trainable_weights == trainable
    n = 4096 * 4096
    overhead_bits = (E.nf4_bytes(n) - n / 2) * 8 / n
    assert 0.12 < overhead_bits < 0.135  # ~0.127 bit/param: 8/64 + 32/(64*256) + per-tensor constants


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 partitioning
# ----------------------------------------------------------------------------------------------------------------


def _deepspeed_partition(numel: int, dp: int) -> list[int]:
    """What DeepSpeedZeroOptimizer does to one param group: align_dense_tensors(…, 2 * dp), then
    get_data_parallel_partitions (base size + 1 for the first `remaining` ranks)."""
    try:
        from deepspeed.runtime.utils import align_dense_tensors

        flat = sum(t.numel() for t in align_dense_tensors([torch.empty(numel, device="meta")], 2 * dp))
    except ImportError:  # deepspeed is a dependency, but keep this file self-contained
        flat = -(-numel // (2 * dp)) * 2 * dp
    base, remaining = divmod(flat, dp)
    return [base + (1 if rank < remaining else 0) for rank in range(dp)]


@pytest.mark.parametrize("numel", [1, 7, 1000, 1001, 1_310_720, 6_738_415_616])
@pytest.mark.parametrize("dp", [1, 2, 3, 8, 64])
def test_zero2_partition_matches_deepspeed_padding(numel, dp):
    parts = _deepspeed_partition(numel, dp)
    assert len(set(parts)) == 1  # padding to 2*dp makes every rank's slice equal
    assert E.zero2_partition_numel(numel, dp) == parts[0]
    assert E.zero2_partition_numel([numel, numel], dp) == 2 * parts[0]  # one flat buffer per param group


def test_zero2_grad_partition_counts_straddling_params_whole():
    # 30 elements -> padded to 32 for dp=2, 16 per rank; the middle param straddles both slices
    assert E.zero2_grad_partition_numel([10, 10, 10], 2) == 20
    assert E.zero2_grad_partition_numel([4, 4, 4, 4], 2) == 8


def test_zero2_halves_optimizer_master_and_gradients_over_two_ranks():
    cfg = tiny_config()
    recipe = make_recipe(dtype="bf16")
    one = E.estimate(recipe, cfg, gpus=1, gpu_mem_gib=24, zero_stage=2)
    two = E.estimate(recipe, cfg, gpus=2, gpu_mem_gib=24, zero_stage=2)
    n = one.trainable_params
    p2 = E.zero2_partition_numel(n, 2)
    assert two.optimizer_states == 8 * p2 and two.master_weights == 4 * p2
    assert one.optimizer_states == 8 * E.zero2_partition_numel(n, 1)
    assert abs(two.optimizer_states * 2 - one.optimizer_states) <= 8 * 4
    assert two.gradients <= one.gradients // 2 + 2 * max(p.numel for p in E.parameter_table(cfg, recipe.lora))
    assert two.weights == one.weights and two.trainable_weights == one.trainable_weights == 2 * n  # bf16 under DS
    ddp = E.estimate(recipe, cfg, gpus=2, gpu_mem_gib=24)
    assert ddp.optimizer_states == 8 * n and ddp.grad_buffers == 4 * n  # DDP: full states + bucket copies


def test_offload_implies_zero2_and_moves_states_to_cpu():
    cfg = tiny_config()
    implied = E.estimate(make_recipe(dtype="bf16"), cfg, gpus=2, gpu_mem_gib=24, zero_stage=0, offload_optimizer=True)
    assert implied.zero_stage == 2 and any("implies DeepSpeed ZeRO-2" in n for n in implied.notes)
    with pytest.raises(UserError, match="ZeRO-3"):
        E.estimate(make_recipe(), cfg, gpus=2, gpu_mem_gib=24, zero_stage=3)
    est = E.estimate(make_recipe(dtype="bf16"), cfg, gpus=2, gpu_mem_gib=24, zero_stage=2, offload_optimizer=True)
    assert est.total == implied.total
    p = E.zero2_partition_numel(est.trainable_params, 2)
    assert est.optimizer_states == est.master_weights == est.gradients == 0
    assert est.cpu_ram_per_rank >= (4 + 8 + 4) * p
    assert est.cpu_ram_per_node == 2 * est.cpu_ram_per_rank


# ----------------------------------------------------------------------------------------------------------------
# Activations vs what autograd really saves
# ----------------------------------------------------------------------------------------------------------------


def _saved_bytes(model, batch, seq, autocast) -> int:
    """Bytes of the distinct non-parameter storages referenced by the autograd graph of one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    ids = torch.randint(0, 512, (batch, seq))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
    seen, stack, visited = {}, [out.loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except Exception:  # noqa: BLE001 - some saved attributes are not readable
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [fn for fn, _ in node.next_functions]
    return sum(seen.values())


# name, model dtype, LoRA, autocast, Precision(act, res, autocast, lora, base_trainable)
ACTIVATION_CASES = [
    ("fp32 full", torch.float32, None, False, E.Precision(4, 4, False, 4, True)),
    ("bf16 full, DeepSpeed-style", torch.bfloat16, None, False, E.Precision(2, 2, False, 2, True)),
    ("bf16 full, fp32 weights + autocast", torch.float32, None, True, E.Precision(2, 4, True, 4, True)),
    (
        "bf16 LoRA all-linear + dropout, autocast",
        torch.bfloat16,
        LoraArgs(r=8, dropout=0.05),
        True,
        E.Precision(2, 2, True, 4, False),
    ),
    (
        "bf16 LoRA q/v no dropout, autocast",
        torch.bfloat16,
        LoraArgs(r=8, target_modules=["q_proj", "v_proj"], dropout=0.0),
        True,
        E.Precision(2, 2, True, 4, False),
    ),
    (
        "fp32 LoRA all-linear + dropout",
        torch.float32,
        LoraArgs(r=8, dropout=0.05),
        False,
        E.Precision(4, 4, False, 4, False),
    ),
    (
        "QLoRA all-linear + dropout, autocast",
        "nf4",
        LoraArgs(r=8, dropout=0.05),
        True,
        E.Precision(2, 4, True, 4, False, mlp=4),
    ),
]


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=[c[0] for c in ACTIVATION_CASES])
def test_activation_terms_match_saved_tensors(case, tmp_path):
    _, dtype, lora, autocast, precision = case
    batch, seq = 2, 32

    def measured(layers):
        cfg = tiny_config(layers=layers, intermediate=176)
        if dtype == "nf4":
            model = qlora_model(cfg, tmp_path / f"tiny{layers}", r=lora.r, dropout=lora.dropout)
        elif lora is None:
            model = tiny_model(cfg, dtype)
        else:
            model = peft_model(cfg, lora.target_modules, r=lora.r, dropout=lora.dropout, dtype=dtype)
        table = E.parameter_table(cfg, lora, quantization="nf4" if dtype == "nf4" else None)
        copies = E.autocast_weight_bytes(table, precision, frozen_fp32=dtype == "nf4")
        return _saved_bytes(model, batch, seq, autocast) - copies

    cfg = tiny_config(intermediate=176)
    acts = E.activation_bytes(
        cfg, batch=batch, seq=seq, precision=precision, lora=lora, dropout_mask_bytes=4
    )  # CPU dropout keeps a float mask; CUDA a bool one
    two, three = measured(2), measured(3)
    per_layer = three - two
    # LoRA scales by a float64 scalar per adapter: 8 bytes per module that the formula ignores
    assert abs(acts["per_layer"] - per_layer) <= 8 * 7
    head = two - 2 * per_layer
    log_softmax = acts["logits"]  # the fp32 log-softmax cross-entropy keeps for backward
    assert log_softmax == 4 * 512 * batch * seq
    if lora is None:
        assert head == acts["head"] + log_softmax + 4  # + NLL's scalar total_weight
    else:  # layer 0's input needs no grad without checkpointing, so it saves a little less: the formula is an upper bound
        assert 0 <= acts["head"] + log_softmax - head <= acts["per_layer"] // 2


def test_checkpointing_and_flash_attention_shrink_activations():
    cfg = E.load_model_config("mistralai/Mistral-7B-v0.1")
    recipe = make_recipe(LoraArgs(r=16), dtype="bf16", quantization="nf4", ckpt=False, mb=2, seq=2048, packing=True)
    est = E.estimate(recipe, cfg, gpus=1, gpu_mem_gib=24)
    assert est.activations == est.activations_no_checkpointing > 10 * est.activations_checkpointing
    flash = E.estimate(
        Recipe(
            model=ModelArgs(**{**recipe.model.__dict__, "attn_implementation": "flash_attention_2"}),
            lora=recipe.lora,
            data=recipe.data,
            train=recipe.train,
        ),
        cfg,
        gpus=1,
        gpu_mem_gib=24,
    )
    assert flash.activations < est.activations  # no additive mask, no repeated K/V


def test_logits_dominate_small_models_with_big_vocabularies():
    cfg = E.load_model_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    est = E.estimate(make_recipe(LoraArgs(r=16), dtype="bf16", mb=8, seq=2048), cfg, gpus=1, gpu_mem_gib=24)
    tokens, vocab = 8 * 2048, 49152
    assert est.logits == tokens * vocab * 4 and est.logits_grad == tokens * vocab * 8
    assert est.logits + est.logits_grad > est.activations


# ----------------------------------------------------------------------------------------------------------------
# 7B sanity
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mb", [1, 2])
def test_mistral_7b_qlora_fits_on_24gib(mb):
    cfg = E.load_model_config("mistralai/Mistral-7B-v0.1")
    recipe = make_recipe(
        LoraArgs(r=16, target_modules="all-linear"),
        dtype="bf16",
        quantization="nf4",
        mb=mb,
        seq=2048,
        grad_accum=8 // mb,
        packing=True,
        name="mistralai/Mistral-7B-v0.1",
    )
    est = E.estimate(recipe, cfg, gpus=1, gpu_mem_gib=24)
    assert est.fits and est.headroom > 0 and not est.suggestions
    assert 5 * GiB < est.total < 16 * GiB
    assert est.trainable_params == 41_943_040  # r * (in + out) over q,k,v,o,gate,up,down x 32 layers
    # ~6.98 B Linear params in NF4 (~3.3 GiB) + embeddings and lm_head upcast to fp32 (2 x 131 M x 4 B)
    assert 4.0 * GiB < est.weights < 4.6 * GiB


def test_llama2_7b_full_finetune_on_one_24gib_gpu_does_not_fit():
    cfg = E.load_model_config("meta-llama/Llama-2-7b-hf")
    recipe = make_recipe(None, dtype="bf16", ckpt=False, mb=4, seq=2048, grad_accum=4)
    est = E.estimate(recipe, cfg, gpus=1, gpu_mem_gib=24)
    assert not est.fits and est.headroom < 0
    assert est.suggestions
    assert "gradient checkpointing" in est.suggestions[0]
    order = ["gradient checkpointing", "micro_batch_size", "nf4", "ZeRO-2 across", "offload", "max_seq_len"]
    positions = [next((i for i, s in enumerate(est.suggestions) if key in s), None) for key in order]
    found = [p for p in positions if p is not None]
    assert found == sorted(found) and len(found) >= 2
    # 16 B/param of fp32 weights, grads and AdamW states alone
    assert est.trainable_weights + est.gradients + est.optimizer_states == 16 * 6_738_415_616


def test_llama2_7b_full_finetune_zero2_offload_on_8x80gib():
    cfg = E.load_model_config("meta-llama/Llama-2-7b-hf")
    recipe = make_recipe(None, dtype="bf16", mb=4, seq=4096, grad_accum=4)
    est = E.estimate(recipe, cfg, gpus=8, gpu_mem_gib=80, zero_stage=2, offload_optimizer=True)
    table = E.parameter_table(cfg)
    groups = [sum(t.numel for t in table if len(t.shape) == 2), sum(t.numel for t in table if len(t.shape) == 1)]
    assert sum(groups) == 6_738_415_616
    p = E.zero2_partition_numel(groups, 8)  # trainer.optim: decay (2-D) and no-decay (1-D) groups
    assert est.fits
    assert est.trainable_weights == 2 * 6_738_415_616  # bf16 copy on every GPU
    assert est.optimizer_states == 0 and est.cpu_ram_per_rank >= 18 * p
    table = E.format_table(est)
    assert "CPU RAM per rank" in table and "FITS" in table
    no_offload = E.estimate(recipe, cfg, gpus=8, gpu_mem_gib=80, zero_stage=2)
    assert no_offload.optimizer_states == 8 * p and no_offload.master_weights == 4 * p
    assert no_offload.total > est.total


def test_llama2_7b_lora_zero2_on_8x80gib_fits():
    cfg = E.load_model_config("meta-llama/Llama-2-7b-hf")
    est = E.estimate(
        make_recipe(LoraArgs(r=16), dtype="bf16", mb=4, seq=4096, packing=True),
        cfg,
        gpus=8,
        gpu_mem_gib=80,
        zero_stage=2,
    )
    assert est.fits and 10 * GiB < est.total < 60 * GiB


# ----------------------------------------------------------------------------------------------------------------
# Output and model configs
# ----------------------------------------------------------------------------------------------------------------


def test_format_table_and_dict():
    cfg = tiny_config()
    est = E.estimate(make_recipe(ckpt=False, mb=64, seq=256), cfg, gpus=1, gpu_mem_gib=0.5)
    table = E.format_table(est)
    for label, n, _ in est.components():
        assert label in table and f"{n / GiB:.2f}" in table
    assert "DOES NOT FIT" in table and "suggestions" in table
    d = E.estimate_to_dict(est)
    json.dumps(d)
    assert d["total"] == est.total and d["fits"] is False and d["suggestions"] == est.suggestions
    assert d["gib"]["total"] == round(est.total / GiB, 2)


KNOWN_TOTALS = {
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
    "meta-llama/Llama-3.2-1B": 1_235_814_400,
}


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_builtin_configs_give_the_published_parameter_counts(name):
    assert E.count_parameters(E.load_model_config(name))["base"] == KNOWN_TOTALS[name]


def test_load_model_config_from_folder_gguf_and_unknown(tmp_path):
    tiny_config(tied=True).save_pretrained(tmp_path / "model")
    cfg = E.load_model_config(str(tmp_path / "model"))
    assert E.count_parameters(cfg) == E.count_parameters(tiny_config(tied=True))

    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(512)
    writer.add_tensor("token_embd.weight", np.zeros((512, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_gguf = E.load_model_config(str(tmp_path / "tiny.gguf"))
    assert E.count_parameters(from_gguf) == E.count_parameters(tiny_config(tied=True))

    missing_copy = E.load_model_config(str(tmp_path / "models" / "SmolLM2-135M-Instruct"))
    assert E.count_parameters(missing_copy)["base"] == KNOWN_TOTALS["HuggingFaceTB/SmolLM2-135M-Instruct"]
    with pytest.raises(UserError, match="offline table"):
        E.load_model_config("nobody/no-such-model-xyz")
    with pytest.raises(UserError, match="config.json"):
        E.load_model_config(str(tmp_path))
