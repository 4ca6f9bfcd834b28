"""Tokenizing: a conversation rendered with the chat template -> input ids and labels (-100 where no loss)."""

from __future__ import annotations

from trainer.config import DataArgs
from trainer.data.formats import row_to_messages
from trainer.errors import UserError

IGNORE = -100
"""Label of a position with no loss (PyTorch's cross-entropy ignore_index)."""


def render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_reply) pieces.

    Each reply is the difference between the conversation rendered up to and including it and the
    conversation up to it with the generation prompt; so the reply's end-of-turn token is in the trained
    piece whatever the template writes.
    """
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError(
                "the tokenizer's chat template does not render conversations as prefixes of each other; "
                "set data.format: text or use a template without lookahead"
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = render(tokenizer, messages, add_generation_prompt=False)[len(done) :]
    if rest:
        pieces.append((rest, False))
    return [p for p in pieces if p[0]]


def tokenize_sample(tokenizer, sample, train_on: str) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels). Pieces are tokenized separately so a label boundary is a token boundary."""
    if isinstance(sample, str):
        pieces = [(sample + (tokenizer.eos_token or ""), True)]
    else:
        pieces = chat_segments(tokenizer, sample)
    ids, labels = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if (trained or train_on == "all") else [IGNORE] * len(piece)
    return ids, labels


def tokenize_rows(ds, tokenizer, cfg: DataArgs, fmt: str, source: str):
    """Raw rows -> tokenized samples (truncated to max_seq_len, samples with no target dropped)."""
    jsonl = source.endswith(".jsonl")

    def one(row, idx):
        where = f"{source}:{idx + 1}" if jsonl else f"{source} row {idx}"
        sample = row_to_messages(row, fmt, cfg.columns, where)
        ids, labels = tokenize_sample(tokenizer, sample, cfg.train_on)
        truncated = len(ids) > cfg.max_seq_len
        ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        # The first token of a sample is never a target: nothing in the sample precedes it. Masking it also
        # stops a packed row's previous sample from "predicting" it across the boundary.
        labels[0] = IGNORE
        return {
            "input_ids": ids,
            "labels": labels,
            "sample_id": idx,
            "length": len(ids),
            "n_target": sum(1 for x in labels if x != IGNORE),
            "truncated": truncated,
        }

    out = ds.map(one, with_indices=True, remove_columns=ds.column_names, desc="tokenizing")
    return out
