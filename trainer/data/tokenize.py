"""Tokenizing: one conversation (or raw text) -> token ids and labels (-100 where there is no loss).

The invariant: the ids are the tokenizer's tokenization of the whole conversation as the chat template renders it
(`trainer.tokenizer.encode_chat`: one piece, BOS as the tokenizer adds it, never twice), i.e. what
`apply_chat_template` and serving engines feed; the labels are exactly the assistant replies and the tokens that
end them, found as character spans of the rendered text and mapped to tokens through the tokenizer's offsets.

Span of assistant turn i: with p_i = render(messages[:i], generation prompt) and f_i = render(messages[:i+1]),
when f_i is a prefix of the full render F the reply is f_i[len(common prefix of p_i and f_i):], i.e. everything
the template writes for the turn after the generation prompt: the reply, its end-of-turn token(s), tool calls,
a reasoning block, whatever the template writes.

Templates that render a turn differently once later turns follow (Qwen3 and DeepSeek-R1 drop the reasoning of
earlier turns; Phi-3 closes only the whole conversation with eos): the turn's content is located in F by rendering
F again with that content replaced by a sentinel (the region that changes), extended by the text the template
writes after the content (as far as F agrees with f_i there, whole tokens only). `data.rewritten_turns` decides
what is trained for a turn whose text in F differs from its text as the last turn (reasoning dropped):
`as_rendered` (default) trains it as F shows it, in the one sample of the conversation; `separate` trains it in a
sample of its own, rendered as the last turn (reasoning kept), and not in F.
"""

from __future__ import annotations

from trainer.config import DataArgs
from trainer.errors import UserError
from trainer.tokenizer import common_prefix_len, encode_chat, render_chat

IGNORE = -100
"""Label of a position with no loss (PyTorch's cross-entropy ignore_index)."""

SENTINEL = "\ue000\ue001\ue000"
"""Replaces a reply's content to find where the template puts it (private-use characters: no template trims,
splits on or shares a first or last character with them)."""


def render(tokenizer, messages, add_generation_prompt: bool) -> str:
    """The conversation as the chat template writes it (`trainer.tokenizer.render_chat`)."""
    return render_chat(tokenizer, messages, add_generation_prompt)


def _suffix_len(a: str, b: str, limit: int) -> int:
    i = 0
    while i < limit and a[len(a) - 1 - i] == b[len(b) - 1 - i]:
        i += 1
    return i


def fold_system_turn(messages: list[dict]) -> list[dict]:
    """A leading system turn folded into the first user turn (`system + "\\n\\n" + user`), for templates without
    a system role (`data.fold_system_turn`). Other keys of the messages are kept; a list of content parts gets a
    text part in front."""
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    for m in rest:
        if m.get("role") == "user":
            s, u = system.get("content"), m.get("content")
            if isinstance(s, str) and isinstance(u, (str, type(None))):
                m["content"] = s + ("\n\n" + u if u else "")
            else:
                as_parts = lambda c: c if isinstance(c, list) else [{"type": "text", "text": c or ""}]  # noqa: E731
                m["content"] = as_parts(s) + [{"type": "text", "text": "\n\n"}] + as_parts(u)
            return rest
    return messages


def prepare_messages(messages: list[dict], data: DataArgs) -> list[dict]:
    """The conversation as the template receives it (after `data.fold_system_turn`); eval prompts use it too."""
    return fold_system_turn(messages) if data.fold_system_turn else messages


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Raw text as pre-training saw it: BOS if the tokenizer adds one, the text's tokens, eos once; every token a
    target except position 0 (nothing precedes it; with BOS, the first text token is a target)."""
    ids = encode_chat(tokenizer, text)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    labels = list(ids)
    if labels:
        labels[0] = IGNORE
    return ids, labels


def _content_region(tokenizer, messages: list[dict], i: int, text: str) -> tuple[int, int] | None:
    """(start, end) of message i's content in `text` = render(messages): where a render with that content
    replaced by SENTINEL differs. None when the content is not in the render at all."""
    content = messages[i].get("content")
    sentinel = [{"type": "text", "text": SENTINEL}] if isinstance(content, list) else SENTINEL
    alt = [*messages[:i], {**messages[i], "content": sentinel}, *messages[i + 1 :]]
    other = render(tokenizer, alt, add_generation_prompt=False)
    if other == text:
        return None
    a = common_prefix_len(text, other)
    b = _suffix_len(text, other, min(len(text), len(other)) - a)
    return a, len(text) - b


def _reply_start(tokenizer, messages: list[dict], i: int, prompt: str, full: str, after: int) -> int:
    """Where assistant turn i's reply starts in `full`: right after the generation prompt.

    Normally the prompt (render(messages[:i]) + generation prompt) is a prefix of `full`, or differs from it only
    inside the generation prompt (a template whose generation prompt differs from how it writes a finished turn);
    then the start is where they part. When the template renders the conversation *before* turn i differently in
    the prompt than in `full`, the start is found after the generation prompt's text, searched from `after` (the
    end of the previous reply)."""
    c = common_prefix_len(prompt, full)
    if c == len(prompt) or not i:
        return c
    history = render(tokenizer, messages[:i], add_generation_prompt=False)
    h = common_prefix_len(prompt, history)  # the generation prompt is prompt[h:]
    if c >= h:
        return c
    gen = prompt[h:]
    pos = full.find(gen, after) if gen else -1
    if pos < 0:
        raise UserError(
            f"cannot locate assistant turn {i} in the chat template's render of this conversation (the template "
            "writes the earlier turns differently once the turn follows, and its generation prompt is not there); "
            "try data.rewritten_turns: separate or another data.chat_template"
        )
    return pos + len(gen)


def reply_spans(tokenizer, messages: list[dict], full: str, rewritten: str):
    """Character spans of the assistant replies in `full` (= render(messages)), and the turns to train apart.

    Returns (spans, separate): spans are (start, content_end, end, whole_tokens_after_content): a token is trained
    when it overlaps [start, content_end), or lies in [content_end, end) (whole tokens only when the flag is set,
    else overlapping); `separate` lists the turns `rewritten="separate"` trains in samples of their own.
    """
    spans, separate, prev_end = [], [], 0
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        turn = full if i == last else render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full.startswith(turn):
            start = min(_reply_start(tokenizer, messages, i, prompt, full, prev_end), len(turn))
            spans.append((start, len(turn), len(turn), False))
            prev_end = len(turn)
            continue
        # Rendered differently once later turns follow: find the content in the full render.
        region = _content_region(tokenizer, messages, i, full)
        if region is None:  # the template does not show this turn once later turns exist
            if rewritten == "separate":
                separate.append(i)
            continue
        a, e = region
        start = min(_reply_start(tokenizer, messages, i, prompt, full, prev_end), a)
        own = _content_region(tokenizer, messages[: i + 1], i, turn)
        own_start = min(_reply_start(tokenizer, messages, i, prompt, turn, 0), own[0] if own else len(turn))
        own_end = own[1] if own is not None else len(turn)
        if rewritten == "separate" and full[start:e] != turn[own_start:own_end]:
            separate.append(i)
            prev_end = e
            continue
        end = e + common_prefix_len(full[e:], turn[own_end:])
        spans.append((start, e, end, True))
        prev_end = end
    for (_, _, prev, _), (start, *_) in zip(spans, spans[1:]):
        if start < prev:
            raise UserError(
                "cannot locate the assistant turns in the chat template's render of this conversation (a reply "
                "overlaps the next one); try data.rewritten_turns: separate or another data.chat_template"
            )
    return spans, separate


def _labels(ids: list[int], offsets: list, spans) -> list[int]:
    """Labels for `ids`: the id where the token lies in a reply span (see `reply_spans`), else IGNORE.

    Token offsets come in text order (non-decreasing starts and ends), so each span's tokens are found by binary
    search. A prepended BOS (offset None) is not in the text and never a target."""
    from bisect import bisect_left, bisect_right

    starts = [o[0] if o is not None else -1 for o in offsets]
    ends = [o[1] if o is not None else -1 for o in offsets]
    labels = [IGNORE] * len(ids)

    def mark(first: int, stop: int, keep=lambda k: True) -> None:
        for k in range(first, stop):
            if offsets[k] is not None and keep(k):
                labels[k] = ids[k]

    for start, content_end, end, whole in spans:
        mark(bisect_right(ends, start), bisect_left(starts, content_end))  # overlaps [start, content_end)
        if whole:  # whole tokens in [content_end, end)
            mark(bisect_left(starts, content_end), bisect_right(ends, end), lambda k, end=end: ends[k] <= end)
        else:  # overlaps [content_end, end)
            mark(bisect_right(ends, content_end), bisect_left(starts, end))
        # zero-width tokens inside the span
        mark(bisect_left(starts, start), bisect_left(starts, end), lambda k: starts[k] == ends[k])
    return labels


def tokenize_chat(tokenizer, messages: list[dict], data: DataArgs) -> list[tuple[list[int], list[int]]]:
    """A conversation -> [(input_ids, labels)]: one sample, plus one per turn trained apart
    (`data.rewritten_turns: separate`). UserError (no row named) when the template refuses the conversation."""
    full = render(tokenizer, messages, add_generation_prompt=False)
    ids, offsets = encode_chat(tokenizer, full, with_offsets=True)
    if data.train_on == "all":
        labels = list(ids)
        labels[0] = IGNORE
        return [(ids, labels)]
    spans, separate = reply_spans(tokenizer, messages, full, data.rewritten_turns)
    out = []
    if spans or not separate:
        labels = _labels(ids, offsets, spans)
        labels[0] = IGNORE  # nothing precedes position 0
        out.append((ids, labels))
    for i in separate:
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        turn = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        t_ids, t_offsets = encode_chat(tokenizer, turn, with_offsets=True)
        start = min(_reply_start(tokenizer, messages, i, prompt, turn, 0), len(turn))
        t_labels = _labels(t_ids, t_offsets, [(start, len(turn), len(turn), False)])
        t_labels[0] = IGNORE
        out.append((t_ids, t_labels))
    return out


def tokenize_sample(tokenizer, sample, data: DataArgs) -> list[tuple[list[int], list[int]]]:
    """One sample -> [(input_ids, labels)] (labels -100 where there is no loss).

    `sample` is a conversation (a list of message dicts; extra keys such as tool_calls or reasoning_content reach
    the template unchanged) or a str of raw text. One (ids, labels) per conversation, more when
    `data.rewritten_turns: separate` trains rewritten turns apart. Raises UserError whose message names no row
    (the caller prefixes the file and row).
    """
    if isinstance(sample, str):
        return [tokenize_text(tokenizer, sample)]
    return tokenize_chat(tokenizer, prepare_messages(sample, data), data)
