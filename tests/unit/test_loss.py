"""The chunked cross-entropy (model.chunked_loss) against the model's own logits: same loss, same gradients."""

import math

import pytest
import torch

from tests.conftest import make_model
from trainer import loss as M
from trainer.config import LoraArgs
from trainer.loss import plain_lm_head, token_loss_sum
from trainer.model import apply_lora


def batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100  # prompt tokens: no target, no logits needed
    labels[2, 30:] = -100  # padding
    pos = torch.arange(40).repeat(3, 1)
    pos[1, 20:] = torch.arange(20)  # a packed row: two samples
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def loss_and_grads(model, b, chunked: bool):
    model.zero_grad(set_to_none=True)
    loss, n = token_loss_sum(model, b, chunked)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), int(n), grads


@pytest.mark.parametrize("tie", [True, False])
def test_full_finetune_same_loss_and_grads(monkeypatch, tie):
    monkeypatch.setattr(M, "CE_CHUNK_BYTES", 4 * 512 * 7)  # 7 rows per chunk: many chunks, a ragged last one
    # float64 weights: what differs is the fp32 log-softmax both paths use (like F.cross_entropy on logits.float())
    model = make_model(512, tie=tie, init_std=0.2).double()
    b = batch(512)
    assert plain_lm_head(model) is not None
    full, n_full, g_full = loss_and_grads(model, b, chunked=False)
    chunk, n_chunk, g_chunk = loss_and_grads(model, b, chunked=True)
    assert n_full == n_chunk == int((b["labels"][:, 1:] != -100).sum())
    assert chunk.item() == pytest.approx(full.item(), rel=1e-7)
    assert g_full.keys() == g_chunk.keys() and len(g_full) > 10
    for k in g_full:
        torch.testing.assert_close(g_chunk[k], g_full[k], rtol=1e-6, atol=1e-5, msg=k)  # gradients reach ~25


def test_lora_same_loss_and_grads_fp32(monkeypatch):
    monkeypatch.setattr(M, "CE_CHUNK_BYTES", 4 * 512 * 5)
    model = apply_lora(make_model(512, init_std=0.2), LoraArgs(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # B starts at zero: give it values so every path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    b = batch(512, seed=1)
    full, _, g_full = loss_and_grads(model, b, chunked=False)
    chunk, _, g_chunk = loss_and_grads(model, b, chunked=True)
    assert chunk.item() == pytest.approx(full.item(), rel=1e-5)
    for k in g_full:
        torch.testing.assert_close(g_chunk[k], g_full[k], rtol=1e-5, atol=5e-5, msg=k)  # fp32 rounding; grads ~17


def test_no_grad_eval_same_loss():
    model = make_model(512, init_std=0.2).eval()
    b = batch(512, seed=2)
    with torch.no_grad():
        full, _ = token_loss_sum(model, b, chunked=False)
        chunk, _ = token_loss_sum(model, b, chunked=True)
    assert chunk.item() == pytest.approx(full.item(), rel=1e-5)


def test_heads_it_must_not_touch_fall_back_to_full_logits():
    """A LoRA-wrapped head, or logits scaled after the head: the model's own logits are used."""
    lora_head = apply_lora(
        make_model(512, tie=False), LoraArgs(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
    )
    assert plain_lm_head(lora_head) is None
    scaled = make_model(512)
    scaled.config.logit_scale = 0.5
    assert plain_lm_head(scaled) is None


def test_chunked_loss_builds_no_full_logits(monkeypatch):
    """The point of it: no (tokens x vocab) tensor. Largest float tensor alive during forward+backward, measured."""
    monkeypatch.setattr(M, "CE_CHUNK_BYTES", 4 * 4096 * 16)
    model = make_model(4096, init_std=0.2)
    b = batch(4096, seed=3)
    full_logits = b["input_ids"][:, 1:].numel() * 4096  # shifted: one position fewer per row

    def largest(chunked):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = token_loss_sum(model, b, chunked)
        loss.backward()
        return max(sizes)

    assert largest(False) >= full_logits
    assert largest(True) <= 4096 * 64 < full_logits  # nothing bigger than the (vocab x hidden) head weight itself


# ----------------------------------------------------------------------------------------------- dataset_loss
@pytest.mark.parametrize("n_rows,world,batch_size", [(1, 2, 8), (3, 2, 1), (5, 4, 2), (7, 3, 2)])
def test_dataset_loss_split_over_ranks_equals_one_process_and_every_rank_runs_as_many_forwards(
    n_rows, world, batch_size
):
    """Rank r takes rows r, r + world, ...; with fewer rows than ranks (1 row, 2 processes) or an uneven split a
    rank runs empty one-token batches, so every rank runs the same number of forward passes (a wrapper that
    communicates in forward never waits on a rank that finished) and the summed loss equals one process's."""
    import datasets

    from trainer.loss import dataset_loss

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_rows):
        ids = torch.randint(3, 256, (5 + 4 * i,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "position_ids": list(range(len(ids)))})
    rows = datasets.Dataset.from_list(rows)
    model = make_model(256, init_std=0.2)
    calls = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    one = dataset_loss(model, rows, batch_size=batch_size, pad_id=0, device="cpu")
    assert len(calls) == math.ceil(n_rows / batch_size)
    parts, counts = [], []
    for rank in range(world):
        calls.clear()
        parts.append(
            dataset_loss(
                model, rows, batch_size=batch_size, pad_id=0, device="cpu", rank=rank, world=world, reduce=None
            )
        )
        counts.append(len(calls))
    assert len(set(counts)) == 1 and counts[0] == math.ceil(math.ceil(n_rows / world) / batch_size)
    tokens = sum(p["tokens"] for p in parts)
    loss = sum(p["loss"] * p["tokens"] for p in parts if p["tokens"]) / tokens
    assert tokens == one["tokens"] and loss == pytest.approx(one["loss"], rel=1e-6)  # fp32, other batch shapes
