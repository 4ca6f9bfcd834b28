"""Formats: which layout a dataset has (detected from its columns) and how one row becomes a conversation."""

from __future__ import annotations

from trainer.config import DataArgs
from trainer.errors import UserError

ROLES = ("system", "user", "assistant")


def detect_format(columns: list[str], cfg: DataArgs) -> str:
    names = {
        **{k: k for k in ("messages", "instruction", "input", "output", "prompt", "completion", "response", "text")},
        **cfg.columns,
    }
    have = set(columns)
    if cfg.format != "auto":
        return cfg.format
    if names["messages"] in have:
        return "messages"
    if names["instruction"] in have and names["output"] in have:
        return "alpaca"
    if names["prompt"] in have and (names["completion"] in have or names["response"] in have):
        return "prompt_completion"
    if names["text"] in have:
        return "text"
    raise UserError(
        f"data.path: cannot tell the format from columns {sorted(have)}; expected 'messages', "
        "'instruction'+'output', 'prompt'+'completion' or 'text' (or map yours with data.columns)"
    )


def row_to_messages(row: dict, fmt: str, columns: dict, where: str) -> list[dict] | str:
    """One raw row -> a list of chat messages (or a plain string for `text`). Raises UserError naming the row."""
    col = lambda name: columns.get(name, name)  # noqa: E731

    def need(name):
        value = row.get(col(name))
        if value is None or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{where}: missing or empty field '{col(name)}' ({fmt} format)")
        return value

    if fmt == "text":
        return str(need("text"))
    if fmt == "alpaca":
        user = str(need("instruction"))
        extra = row.get(col("input"))
        if extra:
            user = f"{user}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": str(need("output"))}]
    if fmt == "prompt_completion":
        answer = row.get(col("completion"))
        if answer is None:
            answer = need("response")
        elif not str(answer).strip():
            need("completion")
        return [{"role": "user", "content": str(need("prompt"))}, {"role": "assistant", "content": str(answer)}]
    messages = need("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{col('messages')}' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role '{m['role']}'; use one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": "" if m["content"] is None else str(m["content"])})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: conversation has no assistant turn to learn from")
    return out
