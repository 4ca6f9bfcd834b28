"""Does this model keep packed samples apart? Checked on the actual model before training (two tiny forwards).

Packed rows rely on transformers turning `position_ids` that restart at 0 into a block-diagonal causal mask
(`attention_mask=None`, as the loss runs the model). Models whose mask ignores `position_ids` (OPT, BioGPT, XGLM:
their mask is built from the attention mask alone) let a packed sample attend to the one before it; for them the
run falls back to one sample per row (length-grouped), says so in one line, and records it in run_summary.json.

The check, with three random samples a, a', b of the same length n (ids drawn from the vocabulary, seeded):

1. one forward of the packed rows [a | b] and [a' | b] (position ids 0..n-1, 0..n-1);
2. one forward of a and b alone (position ids 0..n-1).

Isolation means b's next-token log-probabilities do not depend on what precedes it in the row: rows [a | b] and
[a' | b] have the same shapes and run the same kernels, so an isolated model gives b the same values to rounding
in any dtype (the masked positions enter with weight exactly 0): `leak` = max |difference| must be <= 1e-4
(log-prob units). And the per-sample mean loss of a and of b packed equals their loss alone within 1e-3 (fp32) or
5e-2 (bf16/fp16: a different sequence length may run differently rounded kernels), which also catches a model
whose positions do not restart. Measured on 2-layer random models (fp32 and bf16, CPU): Llama, Qwen2, Phi-3,
GPT-2, Gemma-2 give exactly 0 for both; OPT leaks 5.9e-2, BioGPT 1.6e-2.
"""

from __future__ import annotations

import contextlib

import torch

SAMPLE_LEN = 16
"""Tokens per probe sample."""
LEAK_TOL = 1e-4
"""Largest |log p(b | a) - log p(b | a')| of an isolated model (same shapes, same kernels: rounding only)."""
LOSS_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
"""Largest |mean loss packed - mean loss alone| per sample, by the dtype the forward computes in."""


def _logprobs(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, k+1] | ids[:, :k+1]) for each row, shape (rows, len - 1), fp32."""
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def packing_isolation(model, autocast=contextlib.nullcontext, seed: int = 0) -> dict:
    """Check that a packed pair of samples gives each sample the loss it has alone (see the module docstring).

    `model`: the unwrapped training model (peft or plain) on its device; `autocast`: the context the training
    forward runs under (accelerator.autocast). Returns {"isolated": bool, "leak": float, "loss_diff": float,
    "dtype": str}. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        a, a2, b = (torch.randint(min(8, vocab - 1), vocab, (SAMPLE_LEN,), generator=g) for _ in range(3))
        n = SAMPLE_LEN
        pos1 = torch.arange(n)
        packed = torch.stack([torch.cat([a, b]), torch.cat([a2, b])]).to(device)
        packed_pos = torch.cat([pos1, pos1]).expand(2, -1).to(device)
        alone = torch.stack([a, b]).to(device)
        alone_pos = pos1.expand(2, -1).to(device)
        with autocast():
            lp_packed = _logprobs(model, packed, packed_pos)  # (2, 2n - 1); b's targets are columns n..2n-2
            lp_alone = _logprobs(model, alone, alone_pos)  # (2, n - 1)
            autocasting = torch.is_autocast_enabled(device.type)
        compute = torch.get_autocast_dtype(device.type) if autocasting else model.get_input_embeddings().weight.dtype
        b_after_a, b_after_a2 = lp_packed[0, n:], lp_packed[1, n:]
        leak = float((b_after_a - b_after_a2).abs().max())
        loss_diff = max(
            abs(float(lp_packed[0, : n - 1].mean() - lp_alone[0].mean())),
            abs(float(b_after_a.mean() - lp_alone[1].mean())),
        )
        tol = LOSS_TOL.get(compute, LOSS_TOL[torch.bfloat16])
        isolated = leak <= LEAK_TOL and loss_diff <= tol
        return {"isolated": isolated, "leak": leak, "loss_diff": loss_diff, "dtype": str(compute).split(".")[-1]}
    finally:
        model.train(was_training)
