"""Rows -> conversations: content parts, conversational prompt/completion, ShareGPT, extra message fields, roles,
empty assistant turns, the column names users have, and the error for columns we cannot place."""

import json

import pytest

from tests.conftest import make_tokenizer, write_jsonl
from trainer.config import DataArgs
from trainer.data import IGNORE, detect_format, prepare_data, row_to_messages
from trainer.errors import UserError


def prep(tmp_path, tokenizer, path, **kw):
    cfg = DataArgs(path=str(path), **{"max_seq_len": 256, "val_fraction": 0.0, "packing": False, **kw})
    return prepare_data(cfg, tokenizer, cache_root=tmp_path / "cache", log=lambda m: None)


def trained_ids(row) -> list[int]:
    return [t for t, x in zip(row["input_ids"], row["labels"]) if x != IGNORE]


def test_case01_content_parts_are_joined_text(tmp_path, tokenizer):
    """Case 01: content as a list of text parts trains `Cherry.<|im_end|>\\n` (6 tokens), not a Python repr."""
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Name a red fruit."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Cherry."}]},
        ]
    }
    data = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "a_parts.jsonl", [row]))
    assert tokenizer.decode(trained_ids(data.train[0])) == "Cherry.<|im_end|>\n"
    assert len(trained_ids(data.train[0])) == 6
    assert tokenizer.decode(data.train[0]["input_ids"]) == (
        "<|im_start|>user\nName a red fruit.<|im_end|>\n<|im_start|>assistant\nCherry.<|im_end|>\n"
    )
    parts = [{"type": "text", "text": "Two "}, {"type": "input_text", "text": "parts"}]
    msgs = row_to_messages(
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "ok"}]}, "messages"
    )
    assert msgs[0] == {"role": "user", "content": "Two parts"}


def test_non_text_content_part_is_refused_naming_row(tmp_path, tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": "x"}],
                },
                {"role": "assistant", "content": "A cat."},
            ]
        },
    ]
    f = write_jsonl(tmp_path / "img.jsonl", rows)
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value) == (
        f"{f}:2: column 'messages' message 0: content part 1 is of type 'image_url'; only text parts can be trained "
        "(text/input_text/output_text): remove it or turn it into text"
    )


def test_case02_conversational_prompt_completion(tmp_path, tokenizer):
    """Case 02: prompt = [system, user] messages, completion = [assistant]: the system turn is a system turn and
    exactly `Hot.<|im_end|>\\n` is trained."""
    row = {
        "prompt": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Opposite of cold?"},
        ],
        "completion": [{"role": "assistant", "content": "Hot."}],
    }
    data = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "b_convpc.jsonl", [row]))
    assert data.stats["format"] == "prompt_completion"
    assert tokenizer.decode(data.train[0]["input_ids"]) == (
        "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nOpposite of cold?<|im_end|>\n"
        "<|im_start|>assistant\nHot.<|im_end|>\n"
    )
    assert tokenizer.decode(trained_ids(data.train[0])) == "Hot.<|im_end|>\n"


def test_sharegpt_roles_and_function_calls():
    row = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "21 degrees.", "weight": 1},
        ],
    }
    assert detect_format(list(row), DataArgs(path="x")) == "sharegpt"
    assert row_to_messages(row, "sharegpt") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"weight": 1, "role": "assistant", "content": "21 degrees."},
    ]
    with pytest.raises(UserError, match="turn 0 has unknown 'from' value 'robot'; use one of system, human"):
        row_to_messages({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "notjson"}]}
    with pytest.raises(UserError, match=r"turn 1: a function_call value must be a JSON object .*got 'notjson'"):
        row_to_messages(bad, "sharegpt")


TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] }}{% if m.name is defined %}{{ ' ' + m.name }}{% endif %}"
    "{{ '\\n' }}{% if m.reasoning_content is defined %}{{ '(' + m.reasoning_content + ')' }}{% endif %}"
    "{{ m['content'] }}{% if m.tool_calls is defined %}{{ m.tool_calls | tojson }}{% endif %}"
    "{% if m.tool_call_id is defined %}{{ ' #' + m.tool_call_id }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_extra_message_fields_reach_the_template_unchanged(tmp_path):
    """tool_calls, tool_call_id, name, reasoning_content reach the template as written: arguments keep their own keys
    and number types in every row (no 1 -> 1.0, no other rows' keys filled with null)."""
    tok = make_tokenizer(chat_template=TOOL_TEMPLATE)

    def call(args):
        return [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]

    rows = [
        {
            "messages": [
                {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": "Go", "name": "ann"},
                {"role": "assistant", "content": "", "tool_calls": call({"x": 1}), "reasoning_content": "think"},
                {"role": "tool", "content": "ok", "tool_call_id": "c1"},
                {"role": "assistant", "content": "Done."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Go"},
                {"role": "assistant", "content": "", "tool_calls": call({"y": 2.5})},
            ]
        },
    ]
    data = prep(tmp_path, tok, write_jsonl(tmp_path / "tools.jsonl", rows))
    first, second = (tok.decode(r["input_ids"]) for r in data.train)
    assert first == (
        "<|im_start|>developer\nUse tools.<|im_end|>\n<|im_start|>user ann\nGo<|im_end|>\n<|im_start|>assistant\n(think)"
        + json.dumps(call({"x": 1}))
        + "<|im_end|>\n<|im_start|>tool\nok #c1<|im_end|>\n<|im_start|>assistant\nDone.<|im_end|>\n"
    )
    assert second == (
        "<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n" + json.dumps(call({"y": 2.5})) + "<|im_end|>\n"
    )
    assert tok.decode(trained_ids(data.train[1])) == json.dumps(call({"y": 2.5})) + "<|im_end|>\n"


@pytest.mark.parametrize("role", ["tool", "ipython", "developer", "function", "system"])
def test_roles_accepted_and_unknown_refused(role):
    msgs = [{"role": role, "content": "x"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert row_to_messages({"messages": msgs}, "messages")[0] == {"role": role, "content": "x"}
    msgs[0]["role"] = "robot"
    with pytest.raises(UserError, match="message 0 has unknown role 'robot'; use one of system, user, assistant, tool"):
        row_to_messages({"messages": msgs}, "messages")


def test_empty_assistant_turn_is_one_line_naming_the_row(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]}]
    f = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value) == (
        f"{f}:1: message 1 (assistant) is empty, with no tool call: nothing to learn from; remove that turn or give it "
        "a reply"
    )
    with_call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    assert row_to_messages({"messages": [rows[0]["messages"][0], with_call]}, "messages")[1]["content"] == ""


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"instruction": "Say hi.", "response": "Hi!"}, "alpaca"),
        ({"question": "Say hi.", "answer": "Hi!"}, "prompt_completion"),
        ({"query": "Say hi.", "response": "Hi!"}, "prompt_completion"),
        ({"input": "Say hi.", "output": "Hi!"}, "prompt_completion"),
        ({"prompt": "Say hi.", "completion": "Hi!"}, "prompt_completion"),
        ({"prompt": "Say hi.", "response": "Hi!"}, "prompt_completion"),
    ],
)
def test_column_names_users_have(tmp_path, tokenizer, row, fmt):
    data = prep(tmp_path, tokenizer, write_jsonl(tmp_path / "d.jsonl", [row]))
    assert data.stats["format"] == fmt
    assert tokenizer.decode(data.train[0]["input_ids"]) == (
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n"
    )
    assert tokenizer.decode(trained_ids(data.train[0])) == "Hi!<|im_end|>\n"


def test_undetectable_columns_list_accepted_names_and_the_line_that_maps_them(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "user_msg": "Say hi.", "bot_reply": "Hi!"}])
    with pytest.raises(UserError) as err:
        prep(tmp_path, tokenizer, f)
    assert str(err.value) == (
        f"{f}: cannot tell the format from columns ['bot_reply', 'id', 'user_msg']; accepted: messages | "
        "conversations (ShareGPT) | instruction+output or +response (Alpaca, optional input) | prompt+completion or "
        "+response | question+answer | query+response | input+output | text; map yours with "
        "data.columns: {prompt: user_msg, completion: bot_reply}"
    )
    data = prep(tmp_path, tokenizer, f, columns={"prompt": "user_msg", "completion": "bot_reply"})
    assert tokenizer.decode(trained_ids(data.train[0])) == "Hi!<|im_end|>\n"


def test_values_that_are_not_text_are_errors_never_str():
    with pytest.raises(UserError, match=r"column 'output' holds a number \(7\), not text"):
        row_to_messages({"instruction": "a", "output": 7}, "alpaca")
    with pytest.raises(UserError, match="column 'text' holds an object, not text"):
        row_to_messages({"text": {"a": 1}}, "text")
    with pytest.raises(UserError, match="message 0: content is a number"):
        row_to_messages({"messages": [{"role": "user", "content": 3}]}, "messages")
    with pytest.raises(UserError, match="column 'system' holds true/false"):
        row_to_messages({"instruction": "a", "output": "b", "system": True}, "alpaca")
