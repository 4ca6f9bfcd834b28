"""Pinned losses (torchtune style): the first training losses of a seeded tiny run, written here as literals.

The run: the tiny Llama and tokenizer fixtures (tests/conftest.py), LoRA r=8 on every linear layer, packing on,
CPU fp32, one process, through the real `trainer.train.run`; lr 1e-2, 2 warmup steps then cosine to 0 at step 5
(the logged rates, pinned too: 5e-3, 1e-2, 1e-2, 7.5e-3, 2.5e-3). Step 1's loss is the base model's (LoRA B starts at zero): it pins the data, the
chat rendering, the label mask, packing and the loss reduction; steps 2-5 add the optimizer and the schedule. A
silent change in any of them moves these numbers by far more than the tolerance.

Tolerance 1e-4 absolute: run to run and between 1 and 2 torch threads the losses were identical to the 6 decimals
metrics.csv keeps (measured); lr 10% higher moved steps 2-5 by 2.4e-4 to 8.5e-2, one more warmup step by 7e-4 to
1.1e-1, so the smallest change worth catching is still above the tolerance.

When it fails ON PURPOSE (you changed masking, packing, the loss, the schedule, the model init, the tokenizer
fixture or the data generator tests/datagen.py): check that the new numbers move the way your change should move
them, re-pin them from the failure message (it prints the measured values), and say in the commit message why
they changed. When it fails and you did not mean to change any of those, it is a regression: find it, do not
re-pin.
"""

import pytest

from tests.conftest import CHAT_MULTI, alpaca_slice, tiny_recipe
from trainer.config import recipe_from_dict
from trainer.tracking import read_metrics

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TOL = 1e-4
LRS = [5e-3, 1e-2, 1e-2, 7.5e-3, 2.5e-3]  # the same for both runs: warmup_steps 2, cosine, max_steps 5
# data -> (max_seq_len, first 5 losses, tokens seen after 5 steps, target tokens seen after 5 steps).
# alpaca: the first 64 rows of tests/datagen.py's Alpaca stream (ALPACA's first 64); chat_multi_turn: CHAT_MULTI,
# 10 conversations of 2-5 exchanges (several replies per sample are trained: the multi-turn label mask).
PINNED = {
    "alpaca": (128, [8.216622, 8.030879, 8.094703, 8.192799, 8.054054], 2402, 1403),
    "chat_multi_turn": (512, [8.271779, 8.178111, 7.889562, 7.784083, 7.377074], 7789, 5304),
}


@pytest.mark.parametrize("name", PINNED)
def test_first_five_losses_are_pinned(name, tmp_path, tiny_model_dir):
    from trainer.train import run

    max_seq_len, losses, tokens, targets = PINNED[name]
    path = alpaca_slice(tmp_path / "alpaca64.json", 64) if name == "alpaca" else CHAT_MULTI
    raw = tiny_recipe(
        tiny_model_dir,
        path,
        tmp_path / "run",
        data={"max_seq_len": max_seq_len, "packing": True, "val_fraction": 0.0},
        train={
            "max_steps": 5,
            "micro_batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-2,
            "scheduler": "cosine",
            "warmup_steps": 2,
            "max_grad_norm": 1.0,
            "log_every": 1,
            "eval_every": 1000,
            "save_every": 1000,
            "seed": 0,
        },
    )
    summary = run(recipe_from_dict(raw), show_progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.csv") if r["loss"]]
    got, lrs = [float(r["loss"]) for r in rows], [float(r["lr"]) for r in rows]
    measured = (
        f"measured: losses {got}, lrs {lrs}, tokens_seen {summary['tokens_seen']}, "
        f"target_tokens_seen {summary['target_tokens_seen']}"
    )
    assert lrs == pytest.approx(LRS, rel=1e-6), measured
    assert (summary["tokens_seen"], summary["target_tokens_seen"]) == (tokens, targets), measured
    assert got == pytest.approx(losses, abs=TOL, rel=0), measured
