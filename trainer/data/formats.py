"""Formats: which layout a dataset has (detected from its columns) and how one row becomes a conversation.

Layouts read (`data.format`, detected when `auto`; `data.columns` maps our names to the user's):
- `messages`: a list of {role, content, ...} turns. `content` may be text or a list of content parts
  (`[{"type": "text", "text": ...}]`, joined); keys beyond role/content (tool_calls, tool_call_id, name,
  reasoning_content, thinking, ...) reach the chat template unchanged.
- `sharegpt`: `conversations`, a list of {from, value} turns; `from` human/gpt/system/tool/function_call/
  observation mapped to roles (a `function_call` holding {name, arguments} JSON becomes a tool call).
- `alpaca`: instruction, optional input, output (or response); optional system.
- `prompt_completion`: prompt and completion (or response), each text or a list of messages (TRL's
  conversational prompt-completion: the prompt messages are the context, the completion messages are trained);
  also detected as question/answer, query/response, input/output; optional system.
- `text`: raw text.

Values are what the user wrote: a field that must be text and holds a number, list or object is an error naming
the column (never its `str()`); a missing value (null, NaN, empty cell) in an optional field is absent, in a
required one an error. Errors raised here do not name the row: the caller prefixes `FILE:LINE: ` / `FILE row N: `.
"""

from __future__ import annotations

import json
import math

from trainer.errors import UserError

ROLES = ("system", "user", "assistant", "tool", "ipython", "developer", "function")
"""Roles accepted in messages; the chat template decides which it renders (and says so when it cannot)."""
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
"""ShareGPT `from` values -> roles (LLaMA-Factory's and FastChat's names)."""
TEXT_PART_TYPES = ("text", "input_text", "output_text")
"""Content part types that hold text (OpenAI chat and responses exports)."""
LEARNABLE_KEYS = ("tool_calls", "function_call", "reasoning_content", "reasoning", "thinking")
"""Keys that give an assistant turn something to learn besides its content."""
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

# (format, {our field: column}) in the order detection tries them; the fields are those a row must have.
CANDIDATES = [
    ("messages", {"messages": "messages"}),
    ("sharegpt", {"conversations": "conversations"}),
    ("alpaca", {"instruction": "instruction", "output": "output"}),
    ("alpaca", {"instruction": "instruction", "output": "response"}),
    ("prompt_completion", {"prompt": "prompt", "completion": "completion"}),
    ("prompt_completion", {"prompt": "prompt", "completion": "response"}),
    ("prompt_completion", {"prompt": "question", "completion": "answer"}),
    ("prompt_completion", {"prompt": "query", "completion": "response"}),
    ("prompt_completion", {"prompt": "input", "completion": "output"}),
    ("text", {"text": "text"}),
]
OPTIONAL = {"alpaca": ("input", "system"), "prompt_completion": ("system",), "sharegpt": ("system",)}
"""Optional fields per format (read when the column exists)."""
ACCEPTED = (
    "messages | conversations (ShareGPT) | instruction+output or +response (Alpaca, optional input) | "
    "prompt+completion or +response | question+answer | query+response | input+output | text"
)
_PROMPT_HINTS = ("prompt", "question", "instruction", "input", "query", "user", "source", "context", "problem")
_REPLY_HINTS = ("answer", "response", "output", "completion", "reply", "assistant", "target", "solution", "label")


def resolve(columns: list[str], fmt: str, mapping: dict) -> tuple[str, dict]:
    """(format, {our field: column}) for a dataset with these columns. `fmt`: `auto` or a format name; `mapping`:
    the user's `data.columns` ({our name: their column}), which wins over the names detection knows.

    Raises UserError when no layout fits: it lists the accepted names and the `data.columns` line that would map
    the columns the data has."""
    have = set(columns)
    tried = [c for c in CANDIDATES if fmt in ("auto", c[0])]
    for name, fields in tried:
        cols = {f: mapping.get(f, c) for f, c in fields.items()}
        if all(c in have for c in cols.values()):
            return name, _with_optional(name, cols, mapping, have)
    if fmt != "auto":
        name, fields = tried[0]
        cols = {f: mapping.get(f, c) for f, c in fields.items()}
        missing = [c for c in cols.values() if c not in have]
        raise UserError(
            f"format {fmt} needs column(s) {', '.join(repr(c) for c in missing)}; the data has {sorted(have)}; "
            f"map yours with {suggest_columns(list(dict.fromkeys(columns)), fmt)}"
        )
    raise UserError(
        f"cannot tell the format from columns {sorted(have)}; accepted: {ACCEPTED}; map yours with "
        f"{suggest_columns(list(dict.fromkeys(columns)))}"
    )


def _with_optional(fmt: str, cols: dict, mapping: dict, have: set) -> dict:
    for field in OPTIONAL.get(fmt, ()):
        col = mapping.get(field, field)
        if col in have and col not in cols.values():
            cols[field] = col
    return cols


def suggest_columns(columns: list[str], fmt: str = "auto") -> str:
    """The `data.columns` line that would map these columns (a guess from their names, else their order)."""
    if fmt in ("messages", "sharegpt"):
        return f"data.columns: {{{'messages' if fmt == 'messages' else 'conversations'}: {columns[0]}}}"
    if len(columns) == 1 or fmt == "text":
        return f"data.columns: {{text: {columns[0]}}}"
    low = {c: c.lower() for c in columns}
    prompt = next((c for c in columns if any(h in low[c] for h in _PROMPT_HINTS)), None)
    reply = next((c for c in columns if c != prompt and any(h in low[c] for h in _REPLY_HINTS)), None)
    rest = [c for c in columns if c not in (prompt, reply)]
    prompt = prompt or rest.pop(0)
    reply = reply or rest.pop(0)
    if fmt == "alpaca":
        return f"data.columns: {{instruction: {prompt}, output: {reply}}}"
    return f"data.columns: {{prompt: {prompt}, completion: {reply}}}"


def detect_format(columns: list[str], cfg) -> str:
    """The format name of a dataset with these columns (`cfg`: the data section, for `format` and `columns`)."""
    try:
        return resolve(columns, cfg.format, cfg.columns)[0]
    except UserError as err:
        raise UserError(f"data.path: {err}") from None


# ----------------------------------------------------------------------------------------------- row -> sample
def row_to_messages(row: dict, fmt: str, columns: dict | None = None, where: str | None = None) -> list[dict] | str:
    """One row -> a list of chat messages (or a plain string for `text`).

    `columns`: {our field: column} (missing fields: their own name); `where`: prefixed to errors (the driver
    passes none and prefixes them itself). Raises UserError."""
    try:
        return _row_to_sample(row, fmt, columns or {})
    except UserError as err:
        if where:
            raise UserError(f"{where}: {err}") from None
        raise


def _row_to_sample(row: dict, fmt: str, columns: dict):
    def col(field):
        name = columns.get(field, field)
        if field == "output" and "output" not in columns and name not in row and "response" in row:
            name = "response"
        if field == "completion" and "completion" not in columns and name not in row and "response" in row:
            name = "response"
        return name

    def value(field, required=True):
        name = col(field)
        v = row.get(name)
        if _absent(v) or (required and isinstance(v, str) and not v.strip()):
            if required:
                raise UserError(f"missing or empty field '{name}' ({fmt} format)")
            return None
        return v

    if fmt == "text":
        return _text(value("text"), col("text"))
    if fmt == "alpaca":
        user = _text(value("instruction"), col("instruction"))
        extra = value("input", required=False)
        if extra is not None and _text(extra, col("input")).strip():
            user = f"{user}\n\n{_text(extra, col('input'))}"
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(value("output"), col("output"))},
        ]
        return _checked(_system(value("system", required=False), col("system")) + msgs, fmt)
    if fmt == "prompt_completion":
        prompt, completion = value("prompt"), value("completion")
        if isinstance(prompt, list):
            msgs = _messages(prompt, col("prompt"))
        else:
            msgs = [{"role": "user", "content": _text(prompt, col("prompt"))}]
        if not any(m["role"] == "system" for m in msgs):
            msgs = _system(value("system", required=False), col("system")) + msgs
        if isinstance(completion, list):
            reply = _messages(completion, col("completion"))
            if not any(m["role"] == "assistant" for m in reply):
                raise UserError(f"column '{col('completion')}': the completion has no assistant message to learn from")
        else:
            reply = [{"role": "assistant", "content": _text(completion, col("completion"))}]
        return _checked(msgs + reply, fmt)
    if fmt == "sharegpt":
        msgs = _sharegpt(value("conversations"), col("conversations"))
        if not any(m["role"] == "system" for m in msgs):
            msgs = _system(value("system", required=False), col("system")) + msgs
        return _checked(msgs, fmt)
    if fmt == "messages":
        return _checked(_messages(value("messages"), col("messages")), fmt)
    raise UserError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _absent(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _kind(v) -> str:
    if isinstance(v, bool):
        return f"true/false ({v})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _text(v, column: str) -> str:
    if isinstance(v, str):
        return v
    raise UserError(
        f"column '{column}' holds {_kind(v)}, not text; write it as text in the file (e.g. \"7\") or map another column"
    )


def _system(v, column: str) -> list[dict]:
    if v is None:
        return []
    text = _text(v, column)
    return [{"role": "system", "content": text}] if text.strip() else []


def _content(v, where: str) -> str:
    """Message content -> text: a string, or content parts whose text parts are joined (as templates that accept
    parts render them: one after the other). Non-text parts are refused."""
    if _absent(v):
        return ""
    if isinstance(v, str):
        return v
    parts = [v] if isinstance(v, dict) else v
    if not isinstance(parts, list):
        raise UserError(f"{where}: content is {_kind(v)}, not text or a list of text parts")
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PART_TYPES and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict) and kind is None and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            shown = kind if kind else _kind(part)
            raise UserError(
                f"{where}: content part {j} is of type '{shown}'; only text parts can be trained "
                f"({'/'.join(TEXT_PART_TYPES)}): remove it or turn it into text"
            )
    return "".join(texts)


def _messages(value, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(
            f"column '{column}' must be a non-empty list of {{role, content}} messages, not {_kind(value)}"
            + (
                "; if it holds JSON text, set data.column_types: {" + column + ": json}"
                if isinstance(value, str)
                else ""
            )
        )
    out = []
    for i, m in enumerate(value):
        where = f"column '{column}' message {i}"
        if not isinstance(m, dict):
            raise UserError(f"{where} is {_kind(m)}, not a {{role, content}} object")
        m = {k: v for k, v in m.items() if not _absent(v)}  # keys a table filled with nulls are absent
        role = m.get("role")
        if role is None:
            raise UserError(f"{where} has no 'role' (keys: {sorted(m)})")
        if role not in ROLES:
            raise UserError(f"{where} has unknown role '{role}'; use one of {', '.join(ROLES)}")
        out.append({**m, "content": _content(m.get("content"), where)})
    return out


def _sharegpt(value, column: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"column '{column}' must be a non-empty list of {{from, value}} turns, not {_kind(value)}")
    if all(isinstance(t, dict) and "role" in t and "from" not in t for t in value):
        return _messages(value, column)  # a `conversations` column of {role, content} messages
    out = []
    for i, t in enumerate(value):
        where = f"column '{column}' turn {i}"
        if not isinstance(t, dict):
            raise UserError(f"{where} is {_kind(t)}, not a {{from, value}} object")
        t = {k: v for k, v in t.items() if not _absent(v)}
        speaker = t.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise UserError(f"{where} has unknown 'from' value {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}")
        text = _content(t.get("value"), where)
        extra = {k: v for k, v in t.items() if k not in ("from", "value")}
        msg = {**extra, "role": SHAREGPT_ROLES[speaker], "content": text}
        if speaker == "function_call":
            call = _tool_call(text)
            if call is None:
                shown = text if len(text) <= 40 else text[:37] + "..."
                raise UserError(
                    f'{where}: a function_call value must be a JSON object {{"name": ..., "arguments": ...}} '
                    f"(it becomes a tool call); got {shown!r}. Fix the row, or give it as 'gpt' if it is a reply"
                )
            msg.update(content="", tool_calls=[call])
        out.append(msg)
    return out


def _tool_call(text: str) -> dict | None:
    """A ShareGPT function_call value ({"name": ..., "arguments": ...} as JSON) -> an OpenAI-style tool call."""
    try:
        call = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def _checked(msgs: list[dict], fmt: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"conversation has no assistant turn to learn from ({fmt} format)")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip() and not any(m.get(k) for k in LEARNABLE_KEYS):
            raise UserError(
                f"message {i} (assistant) is empty, with no tool call: nothing to learn from; "
                "remove that turn or give it a reply"
            )
    return msgs
