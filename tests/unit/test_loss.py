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


# ----------------------------------------------------------------------------------------------- token accuracy
def direct_correct(model, b) -> int:
    """The definition: target tokens whose argmax over the model's own full logits is the label. (use_cache=False
    as in training: with a cache transformers does not read position_ids restarts as separate samples.)"""
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[:, :-1]
    targets = b["labels"][:, 1:]
    mask = targets != -100
    return int((logits.argmax(-1) == targets)[mask].sum())


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 10_000])  # one row per chunk, many ragged chunks, one chunk
@pytest.mark.parametrize("chunked", [True, False])
def test_token_accuracy_equals_a_direct_argmax_count(monkeypatch, rows_per_chunk, chunked):
    monkeypatch.setattr(M, "CE_CHUNK_BYTES", 4 * 512 * rows_per_chunk)
    # std 0.2: logits far from flat, so the count is not a handful of near-ties; base and LoRA both checked
    for model in (make_model(512, init_std=0.2), apply_lora(make_model(512, init_std=0.2), LoraArgs(r=4, dropout=0.0))):
        model.eval()
        b = batch(512, seed=4)
        expected = direct_correct(model, b)
        loss, n, correct = M.token_loss_stats(model, b, chunked)
        assert int(correct) == expected and 0 < expected < int(n), (int(correct), expected)
        with torch.no_grad():  # also without autograd (evaluation)
            assert int(M.token_loss_stats(model, b, chunked)[2]) == expected
        assert loss.requires_grad and not correct.requires_grad


def test_token_accuracy_counts_a_trained_row_exactly():
    """A model that predicts every label: accuracy 1.0; with labels shifted by one id: 0.0 (no argmax ties)."""
    model = make_model(512, init_std=0.2).eval()
    b = batch(512, seed=5)
    with torch.no_grad():
        pred = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits.argmax(-1)
    right = {**b, "labels": torch.where(b["labels"] == -100, -100, torch.cat([pred[:, :1], pred[:, :-1]], 1))}
    n_targets = int((right["labels"][:, 1:] != -100).sum())
    for chunked in (True, False):
        assert int(M.token_loss_stats(model, right, chunked)[2]) == n_targets
        wrong = {**right, "labels": torch.where(right["labels"] == -100, -100, (right["labels"] + 1) % 512)}
        assert int(M.token_loss_stats(model, wrong, chunked)[2]) == 0


def test_dataset_loss_reports_token_accuracy(tokenizer):
    """Rows whose every other label is the model's own prediction: dataset_loss's accuracy is the direct count."""
    from datasets import Dataset

    vocab = len(tokenizer)
    model = make_model(vocab, init_std=0.2).eval()
    b = batch(vocab, seed=6)
    b["position_ids"] = torch.arange(40).repeat(3, 1)
    with torch.no_grad():
        pred = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits.argmax(-1)
    labels = b["labels"].clone()
    labels[:, 1::2] = torch.where(labels[:, 1::2] == -100, -100, pred[:, 0:-1:2])  # label t+1 = prediction at t
    b["labels"] = labels
    data = Dataset.from_list(
        [
            {"input_ids": b["input_ids"][i].tolist(), "labels": labels[i].tolist(), "position_ids": list(range(40))}
            for i in range(3)
        ]
    )
    ev = M.dataset_loss(model, data, batch_size=2, pad_id=tokenizer.pad_token_id, device="cpu")
    assert ev["tokens"] == int((labels[:, 1:] != -100).sum())
    assert ev["token_accuracy"] == pytest.approx(direct_correct(model, b) / ev["tokens"], abs=1e-12)
    assert 0.3 < ev["token_accuracy"] < 0.7


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
