"""Generation with the run's chat template and end-of-turn stop tokens: used by eval, chat, the demo and merge.

Every generation we run renders the prompt with the same chat template, encodes it as training encoded
conversations (`trainer.tokenizer.encode_chat`: one piece, BOS as the tokenizer adds it, never twice) and stops on
the same token ids (`stop_token_ids`: the template's end-of-turn tokens and eos), the ones training taught the
model to emit at the end of a reply.
"""

from __future__ import annotations

import threading

import torch

from trainer import tokenizer as tokenizers


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation so far, rendered with the chat template and the generation prompt (assistant header)."""
    return tokenizers.render_chat(tokenizer, messages, add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids a reply to `messages` is generated from: the rendered prompt encoded like training data."""
    return tokenizers.encode_chat(tokenizer, render_prompt(tokenizer, messages))


stop_token_ids = tokenizers.stop_token_ids
"""Token ids that end a reply: the template's end-of-turn tokens, then eos (defined in `trainer.tokenizer`)."""


def left_padded(rows: list[list[int]], pad_id: int, device) -> dict:
    """input_ids and attention_mask of `rows` left-padded to the longest (generation appends on the right)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return {"input_ids": ids, "attention_mask": mask}


def _sampling(do_sample: bool, temperature: float, top_p: float) -> dict:
    return dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[str]:
    """Replies to each conversation in `prompts` (batched, left padding), decoded without special tokens."""
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    stops = stop_token_ids(tokenizer)
    replies = []
    for start in range(0, len(encoded), batch_size):
        enc = left_padded(encoded[start : start + batch_size], tokenizer.pad_token_id, device)
        torch.manual_seed(seed + start)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
            **_sampling(do_sample, temperature, top_p),
        )
        replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [r.strip() for r in replies]


def reply(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_text=None,
) -> str:
    """The assistant's next message (greedy when temperature is 0); `on_text(piece)` streams it as it comes."""
    from transformers import TextIteratorStreamer

    enc = left_padded([prompt_ids(tokenizer, messages)], tokenizer.pad_token_id, next(model.parameters()).device)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        **_sampling(temperature > 0, temperature, top_p),
    )
    if on_text is None:
        with torch.no_grad():
            out = model.generate(**enc, **kwargs)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, kwargs={**enc, **kwargs, "streamer": streamer})
    worker.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        on_text(piece)
    worker.join()
    return "".join(pieces).strip()
