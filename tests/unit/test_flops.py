"""Model FLOPs per token (trainer.flops) against torch's own FLOP counter, sample lengths, GPU peaks, MFU."""

import json

import pytest
import torch

from tests.conftest import ALPACA, make_model, run_train, tiny_recipe
from trainer import flops as F


def counted_train_flops(model, ids, pos, labels) -> int:
    """Matmul FLOPs of one forward + backward, counted by torch (mm/bmm/addmm; eager attention is bmm/matmul).
    The model's own logits at every position (chunked loss off), as the formula counts."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.loss import token_loss_sum

    with FlopCounterMode(display=False) as counter:
        loss, n = token_loss_sum(model, {"input_ids": ids, "labels": labels, "position_ids": pos}, chunked=False)
        loss.backward()
    return counter.get_total_flops()


def eager(model):
    model.config._attn_implementation = "eager"
    return model


def test_full_finetune_is_6n_plus_attention():
    model = eager(make_model(512))
    fm = F.flops_model(model)
    cfg = model.config
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q, o; k, v (2 KV heads of 16); gate, up, down
    assert fm.matmul_params == cfg.num_hidden_layers * per_layer + 512 * 64  # + the (tied) lm_head, once
    assert fm.trainable_matmul_params == fm.matmul_params
    assert (fm.layers, fm.attn_dim) == (2, 64)
    b, s = 2, 24
    ids = torch.randint(3, 512, (b, s))
    pos = torch.arange(s).expand(b, s)
    counted = counted_train_flops(model, ids, pos, ids.clone())
    assert counted == pytest.approx(fm.for_tokens(b * s, b * s * s), rel=1e-6)
    assert fm.per_token(s) == 6 * fm.matmul_params + 12 * 2 * 64 * s


def test_lora_is_4n_plus_6n_lora_an_upper_bound():
    """Frozen base: no weight gradients; the bound counts activation gradients into layer 0's frozen projections,
    which autograd skips (their input needs no gradient): the real count is a little lower, never higher."""
    from trainer.config import LoraArgs
    from trainer.model import apply_lora

    base = eager(make_model(512))
    n_base = F.flops_model(base).matmul_params
    model = apply_lora(base, LoraArgs(r=4, alpha=8, dropout=0.0))
    fm = F.flops_model(model)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert fm.trainable_matmul_params == n_lora and fm.matmul_params == n_base + n_lora
    assert fm.per_token(0) == 4 * n_base + 6 * n_lora
    b, s = 2, 24
    ids = torch.randint(3, 512, (b, s))
    counted = counted_train_flops(model, ids, torch.arange(s).expand(b, s), ids.clone())
    bound = fm.for_tokens(b * s, b * s * s)
    layer0_skipped = 2 * b * s * (64 * 64 + 2 * 64 * 32 + 2 * 64 * 128)  # q, k, v, gate, up: no input gradient
    assert bound - layer0_skipped <= counted <= bound


def test_packed_rows_count_each_samples_own_attention():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    labels = torch.tensor(
        [
            [-100, 5, 6, -100, 7, -100, -100, -100, -100, -100],  # 3 + 2, then 5 tokens of padding
            [-100, 5, 6, 7, -100, 5, 5, 5, 5, 5],
        ]
    )  # 4 + 6
    assert F.sample_lengths_sq(pos, labels) == 3**2 + 2**2 + 4**2 + 6**2
    meter_batches = [{"position_ids": pos, "labels": labels}, {"position_ids": pos[:1], "labels": labels[:1]}]
    assert F.FlopsMeter.batches_len_sq(meter_batches) == 3**2 + 2**2 + 4**2 + 6**2 + 3**2 + 2**2


def test_gpu_peaks_by_name_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, dtype, peak in [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert F.peak_tflops(dtype, tf32=False) == (name, peak)
    assert F.peak_tflops("fp32", tf32=True)[1] == 156.0  # A100 TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce GTX 1080")
    assert F.peak_tflops("bf16") is None  # unknown card: no MFU
    assert F.mfu(494.5e12, 989.0) == pytest.approx(0.5)
    assert F.mfu(989e12, 989.0, devices=2) == pytest.approx(0.5)
    assert F.mfu(1e12, None) is None


def test_meter_reports_tflops_and_mfu_only_with_a_peak():
    meter = F.FlopsMeter(make_model(512), "fp32", device=torch.device("cpu"))
    assert meter.peak is None
    m = meter.metrics(tokens=1000, len_sq=1000 * 50, seconds=2.0)
    assert set(m) == {"tflops"} and m["tflops"] == pytest.approx(meter.model.for_tokens(1000, 50_000) / 2 / 1e12)
    meter.peak = ("NVIDIA H100 80GB HBM3", 989.0)
    assert meter.metrics(1000, 50_000, 2.0)["mfu"] == pytest.approx(m["tflops"] / 989.0)
    assert meter.summary() == {}  # nothing added yet
    meter.add(1000, 50_000, 2.0)
    s = meter.summary()
    assert s["model_flops_per_token"] == round(meter.model.per_token(50.0))
    assert s["mfu_peak"] == "NVIDIA H100 80GB HBM3: 989 TFLOP/s"


@pytest.mark.slow
def test_run_summary_has_load_times_and_flops(tmp_path, tiny_model_dir):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    run_dir = tmp_path / "run"
    raw = tiny_recipe(
        tiny_model_dir,
        ALPACA,
        run_dir,
        data={"val_fraction": 0.0},
        train={"max_steps": 2, "save_every": 2, "eval_every": 2},
    )
    run_train(raw, tmp_path, name="r.yaml")
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["model_load_s"] > 0 and summary["data_prepare_s"] > 0
    assert summary["model_flops_per_token"] > 0 and summary["tflops"] > 0
    assert ("mfu" in summary) == (torch.cuda.is_available() and F.peak_tflops("fp32") is not None)
