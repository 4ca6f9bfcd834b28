"""What only a CUDA GPU exercises: QLoRA (NF4) training and merge, bf16 autocast, fused AdamW, paged 8-bit AdamW,
and packed rows under SDPA / FlashAttention-2 (varlen, from position_ids) equal to samples run one by one.

Marked `gpu` and skipped without CUDA; `bench/gpu_check.sh` runs them (`pytest -m gpu tests/gpu`). The device is
`cuda` unless GPU_TEST_DEVICE says otherwise: `GPU_TEST_DEVICE=cpu pytest -m gpu tests/gpu` runs the parts that
exist on CPU (everything but the paged optimizer and FlashAttention), which is how their logic was checked on a
machine without a GPU. Tolerances are for bf16 (8 mantissa bits): relative 1e-2 where a bf16 path meets an fp32
one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_model, tiny_recipe

DEVICE = os.environ.get("GPU_TEST_DEVICE", "cuda")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402  (its tokenizer: the GPU machine has no ../shared data to train the tests' one on)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only")


def chat_rows(n: int) -> list[dict]:
    words = "red green blue river stone cloud north south quick slow light dark".split()
    return [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}: " + " ".join(words[(i + k) % len(words)] for k in range(4))},
                {"role": "assistant", "content": " ".join(words[(2 * i + k) % len(words)] for k in range(6))},
            ]
        }
        for i in range(n)
    ]


def tiny_batch(vocab: int, rows: int = 2, width: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(width).repeat(rows, 1)}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and a BPE tokenizer trained on generated text, saved (what model.name_or_path names)."""
    out = tmp_path_factory.mktemp("gpu-tiny-llama")
    lines = [" ".join(gpu_check.WORDS[(i * 7 + k) % len(gpu_check.WORDS)] for k in range(12)) for i in range(400)]
    tokenizer = gpu_check.train_tokenizer(lines + [r["messages"][0]["content"] for r in chat_rows(40)], 512)
    make_model(len(tokenizer), init_std=0.2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------- QLoRA
def test_qlora_nf4_trains_and_merges(tmp_path, tiny_model_dir):
    """The real CLI on the device: NF4 base + LoRA in bf16 for 4 steps (loss finite, adapter moved), then `trainer
    merge`: merged-model logits equal base + adapter within bf16 rounding."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(40)))
    raw = tiny_recipe(
        tiny_model_dir,
        data,
        tmp_path / "run",
        model={"dtype": "bf16", "quantization": "nf4", "gradient_checkpointing": True},
        train={"max_steps": 4, "lr": 1e-2, "save_every": 4, "eval_every": 4},
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    if DEVICE != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    for args in (["train", str(recipe), "--no-progress"], ["merge", str(tmp_path / "run")]):
        out = subprocess.run(
            [sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    assert summary["device"].startswith(DEVICE)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    report = json.loads((tmp_path / "run" / "merged" / "merge_report.json").read_text())
    # bf16: every merged weight W + BA rounds to 8 bits; logits of 10-20 in this tiny model move by tenths (CPU: 0.25)
    assert report["max_abs_diff_merged_vs_adapter"] < 1.0
    assert report["max_abs_diff_merged_vs_4bit_training_model"] < 5.0  # NF4 error, reported, bounded


def test_nf4_forward_backward_reaches_only_the_adapter(tiny_model_dir):
    from trainer.config import LoraArgs, ModelArgs
    from trainer.model import build_model

    device_map = {"": 0} if DEVICE == "cuda" else {"": "cpu"}
    model = build_model(
        ModelArgs(name_or_path=str(tiny_model_dir), dtype="bf16", quantization="nf4"),
        LoraArgs(r=4, alpha=8, dropout=0.0),
        device_map=device_map,
        log=lambda m: None,
    )
    quantized = [p for p in model.parameters() if p.__class__.__name__ == "Params4bit"]
    assert quantized and all(p.device.type == DEVICE for p in quantized)
    b = {k: v.to(DEVICE) for k, v in tiny_batch(model.config.vocab_size).items()}
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = model(**b).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_B" in n)


# ----------------------------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_matmuls_in_bf16_and_loss_close_to_fp32():
    from trainer.loss import token_loss_sum

    model = make_model(256, init_std=0.2).to(DEVICE)
    b = {k: v.to(DEVICE) for k, v in tiny_batch(256).items()}
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        fp32, n = token_loss_sum(model, b)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            bf16, _ = token_loss_sum(model, b)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert float(bf16 / n) == pytest.approx(float(fp32 / n), rel=1e-2)


# ----------------------------------------------------------------------------------------------- optimizers
def _train_args(optimizer: str):
    from trainer.config import recipe_from_dict

    return recipe_from_dict(
        tiny_recipe(Path("m"), Path("d.json"), Path("o"), train={"optimizer": optimizer, "lr": 1e-3})
    ).train


def test_fused_adamw_is_chosen_on_cuda_and_steps_like_foreach():
    from trainer.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    a = make_model(256).to(DEVICE)
    b = make_model(256).to(DEVICE)
    b.load_state_dict(a.state_dict())
    fused = build_optimizer(a, _train_args("adamw"))
    assert fused.defaults["fused"] is (True if DEVICE == "cuda" else None)
    plain = torch.optim.AdamW(param_groups(b, 0.0), lr=1e-3, foreach=False)  # the reference: one tensor at a time
    batch = {k: v.to(DEVICE) for k, v in tiny_batch(256).items()}
    for _ in range(3):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(**batch).loss.backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@needs_cuda
def test_paged_8bit_adamw_keeps_8bit_states_and_lowers_the_loss():
    from trainer.optim import build_optimizer

    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = make_model(256).to(DEVICE)
    opt = build_optimizer(model, _train_args("paged_adamw_8bit"))
    assert type(opt).__name__ == "PagedAdamW8bit"
    batch = {k: v.to(DEVICE) for k, v in tiny_batch(256).items()}
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    big = [p for p in model.parameters() if p.numel() >= 4096]
    assert big and all(opt.state[p]["state1"].dtype == torch.uint8 for p in big)  # 8-bit blockwise states


# ----------------------------------------------------------------------------------------------- packing
ATTENTION = ["sdpa", "flash_attention_2"]


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_row_equals_samples_one_by_one(attn):
    """Three samples packed in one row with position_ids restarting at each: per-sample losses equal those of
    the samples run alone (SDPA: block-diagonal mask from the restarts; FlashAttention-2: its varlen kernel)."""
    if attn == "flash_attention_2" and (DEVICE != "cuda" or importlib.util.find_spec("flash_attn") is None):
        pytest.skip("flash-attn is not installed (or no CUDA)")
    from trainer.data import collate
    from trainer.loss import token_loss_sum

    torch.manual_seed(0)
    model = make_model(256, init_std=0.3).to(DEVICE, torch.bfloat16).eval()
    model.config._attn_implementation = attn
    g = torch.Generator().manual_seed(1)
    samples = []
    for length in (37, 64, 23):
        ids = torch.randint(3, 256, (length,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": [-100] + ids[1:], "position_ids": list(range(length))})
    packed = {
        k: sum((s[k] for s in samples), []) for k in ("input_ids", "labels", "position_ids")
    }  # one row of 124 tokens
    with torch.no_grad():
        alone = [token_loss_sum(model, {k: v.to(DEVICE) for k, v in collate([s], 0).items()}) for s in samples]
        together, n = token_loss_sum(model, {k: v.to(DEVICE) for k, v in collate([packed], 0).items()})
        leaky = collate([dict(packed, position_ids=list(range(124)))], 0)
        leak, _ = token_loss_sum(model, {k: v.to(DEVICE) for k, v in leaky.items()})
    want = sum(float(x[0]) for x in alone) / sum(int(x[1]) for x in alone)
    assert int(n) == sum(int(x[1]) for x in alone)
    assert float(together / n) == pytest.approx(want, rel=1e-2)
    assert abs(float(leak / n) - want) > 5e-2  # without the restarts the samples attend to each other
