"""trainer.lora_dropout: a row's LoRA dropout mask depends on (seed, step, row, module) only, so the same rows give
the same losses and gradients however they are split into micro-batches and processes, padded or ordered."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_model
from trainer import lora_dropout
from trainer.config import LoraArgs
from trainer.data import IGNORE, collate
from trainer.lora_dropout import RowDropout, row_seed
from trainer.model import apply_lora


def test_mask_of_a_row_ignores_its_batch_position_and_padding():
    drop = RowDropout(0.3, key=5)
    wide = drop.mask((3, 12, 16), "cpu", lora_dropout.Rows(7, 2, (40, 11, -1), (9, 12, 0)))
    alone = drop.mask((1, 9, 16), "cpu", lora_dropout.Rows(7, 2, (40,), (9,)))
    swapped = drop.mask((2, 12, 16), "cpu", lora_dropout.Rows(7, 2, (11, 40), (12, 9)))
    assert torch.equal(wide[0, :9], alone[0]) and torch.equal(wide[0, :9], swapped[1, :9])
    assert torch.equal(wide[1], swapped[0])
    assert wide[0, 9:].all() and wide[2].all()  # padding and the empty slot (-1) are kept as they are
    for other in (lora_dropout.Rows(8, 2, (40,), (9,)), lora_dropout.Rows(7, 3, (40,), (9,))):
        assert not torch.equal(drop.mask((1, 9, 16), "cpu", other), alone)  # another seed, another step
    assert not torch.equal(RowDropout(0.3, key=6).mask((1, 9, 16), "cpu", lora_dropout.Rows(7, 2, (40,), (9,))), alone)


def test_distribution_and_scaling_match_nn_dropout():
    drop = RowDropout(0.25, key=0).train()
    x = torch.ones(64, 32, 48, requires_grad=True)
    with lora_dropout.rows(0, 0, range(64), [32] * 64):
        y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 98,304 draws: 0.01 is > 7 standard deviations
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * mask / (1 - p))/dx = mask / (1 - p)
    assert torch.equal(drop.eval()(x), x)
    assert len({row_seed(0, s, r, m) for s in range(20) for r in range(20) for m in range(20)}) == 8000


def test_outside_the_loop_it_is_plain_dropout_on_the_torch_rng():
    drop = RowDropout(0.5, key=0).train()
    torch.manual_seed(3)
    a = drop(torch.ones(4, 5, 6))
    torch.manual_seed(3)
    b = torch.nn.functional.dropout(torch.ones(4, 5, 6), 0.5, training=True)
    assert torch.equal(a, b)
    with (
        lora_dropout.rows(0, 0, [1, 2], [5, 5]),
        pytest.raises(RuntimeError, match="got 4 rows but the loop declared 2"),
    ):
        drop(torch.ones(4, 5, 6))


def _rows(n: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:], "position_ids": list(range(length))})
    return out


def test_loss_and_gradients_do_not_depend_on_the_micro_batch_split():
    """Four rows of different lengths as one micro-batch of 4, or as 2 + 2 in another order with other padding:
    the summed loss and the LoRA gradients are the same (float summation order aside)."""
    from trainer.loss import token_loss_sum

    torch.manual_seed(0)
    model = apply_lora(make_model(128, init_std=0.2), LoraArgs(r=4, alpha=8, dropout=0.3)).train()
    assert sum(isinstance(m, RowDropout) for m in model.modules()) == 14  # 2 layers x 7 linear modules
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the dropout visible in the loss
    rows, ids = _rows(4, 128), [10, 11, 12, 13]

    def run(groups) -> tuple[float, dict]:
        model.zero_grad()
        total = 0.0
        for picked in groups:
            batch = collate([rows[i] for i in picked], pad_id=0)
            with lora_dropout.rows(0, 4, [ids[i] for i in picked], [len(rows[i]["input_ids"]) for i in picked]):
                loss, _ = token_loss_sum(model, batch)
                loss.backward()
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    one_loss, one_grad = run([[0, 1, 2, 3]])
    split_loss, split_grad = run([[3, 1], [2, 0]])
    assert split_loss == pytest.approx(one_loss, rel=1e-6)
    assert max(float((one_grad[n] - split_grad[n]).abs().max()) for n in one_grad) < 1e-5
    with torch.no_grad():
        plain = token_loss_sum(model.eval(), collate(rows, pad_id=0))[0].item()
    assert abs(plain - one_loss) > 1e-3  # the masks really changed the loss
