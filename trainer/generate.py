"""Generation with the run's chat template and end-of-turn stop tokens: used by eval, chat, the demo and merge.

Every generation we run renders the prompt with the same chat template and stops on the same token ids
(`stop_token_ids`), the ones training taught the model to emit at the end of a reply.
"""

from __future__ import annotations

import threading

import torch


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation so far, rendered with the chat template and the generation prompt (assistant header)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos (the end-of-turn token of the run's template)."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


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
    texts = [render_prompt(tokenizer, p) for p in prompts]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            torch.manual_seed(seed + start)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids(tokenizer),
                **_sampling(do_sample, temperature, top_p),
            )
            replies += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
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

    enc = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    enc = enc.to(next(model.parameters()).device)
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
