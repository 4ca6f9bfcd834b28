"""trainer/data/tokenize.py: a conversation -> the ids of its whole render and labels on exactly the replies and
their end-of-turn tokens; raw text; templates that rewrite earlier turns; templates that raise; cases 08 and 14."""

import random

import pytest

from tests.conftest import make_tokenizer, write_jsonl
from tests.families import CASE_LLAMA2_TEMPLATE, CASE_QWEN3_TEMPLATE, case_sp_tokenizer, llama2_tokenizer
from trainer.config import DataArgs
from trainer.data import IGNORE, prepare_data, tokenize_sample
from trainer.errors import UserError

D = DataArgs(path="x")


def trained_pieces(tok, ids, labels) -> list[str]:
    """The trained runs of a sample, decoded (special tokens kept)."""
    out, run = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            run.append(i)
        elif run:
            out.append(tok.decode(run)), run.clear()
    if run:
        out.append(tok.decode(run))
    return out


def one_piece(tok, messages) -> list[int]:
    return tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def test_chatml_labels_token_by_token(tokenizer):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    [(ids, labels)] = tokenize_sample(tokenizer, msgs, D)
    assert ids == one_piece(tokenizer, msgs)
    assert trained_pieces(tokenizer, ids, labels) == ["Hello<|im_end|>\n", "Goodbye<|im_end|>\n"]
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    # The end-of-turn token after each reply is trained although it is also the pad token.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tokenizer.pad_token_id and [t for t in labels if t != IGNORE].count(im_end) == 2


def test_ids_are_the_one_piece_tokenization_on_random_conversations(tokenizer):
    rnd = random.Random(0)
    words = ["the", "capital", " of", "France", "\n", "  ", "Paris", ".", "é", "日本", "<", "|", ">", "?", "123"]
    for _ in range(50):
        msgs = []
        for _ in range(rnd.randint(1, 4)):
            for role in ("user", "assistant"):
                msgs.append({"role": role, "content": "".join(rnd.choice(words) for _ in range(rnd.randint(0, 8)))})
        [(ids, labels)] = tokenize_sample(tokenizer, msgs, D)
        assert ids == one_piece(tokenizer, msgs)
        replies = [m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant"]
        pieces = trained_pieces(tokenizer, ids, labels)
        assert len(pieces) == len(replies)
        for piece, reply in zip(pieces, replies):
            # exactly the reply, plus the prompt's last "\n" when a reply starting with whitespace merges with it
            # into one token (that token is what the model has to emit first)
            assert piece == reply or (piece == "\n" + reply and reply[0].isspace()), (piece, reply)


def test_train_on_all_labels_everything_but_the_first_position(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    [(ids, labels)] = tokenize_sample(tokenizer, msgs, DataArgs(path="x", train_on="all"))
    assert labels == [IGNORE] + ids[1:]


def test_raw_text_without_bos_first_token_has_no_context(tokenizer):
    """ChatML tokenizer adds no BOS: the text's tokens, eos once; position 0 has nothing before it."""
    [(ids, labels)] = tokenize_sample(tokenizer, "plain text", D)
    plain = tokenizer("plain text", add_special_tokens=False)["input_ids"]
    assert ids == plain + [tokenizer.eos_token_id]
    assert labels == [IGNORE] + ids[1:]
    [(again, _)] = tokenize_sample(tokenizer, "plain text<|im_end|>", D)  # eos already there: not twice
    assert again == ids


def test_raw_text_with_bos_first_text_token_is_a_target():
    tok = llama2_tokenizer()
    [(ids, labels)] = tokenize_sample(tok, "Paris is the capital of France.", D)
    assert ids == tok("Paris is the capital of France.")["input_ids"] + [tok.eos_token_id]  # as pre-training saw it
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels[0] == IGNORE and labels[1:] == ids[1:]  # the first text token IS a target


def test_case_08_sentencepiece_reply_has_no_extra_space_token():
    """Case 08: one-piece tokenization, 37 ids, no lone "▁" in front of a reply."""
    tok = case_sp_tokenizer()
    tok.chat_template = CASE_LLAMA2_TEMPLATE
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Peru?"},
        {"role": "assistant", "content": "Lima."},
    ]
    [(ids, labels)] = tokenize_sample(tok, msgs, D)
    assert len(ids) == 37
    assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    trained = tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == ["▁Paris", ".", "▁", "</s>", "▁Lima.", "▁", "</s>"]
    tokens = tok.convert_ids_to_tokens(ids)
    at = tokens.index("▁Paris")
    assert tokens[at - 1 : at + 3] == ["▁[/INST]", "▁Paris", ".", "▁"]  # as the one-piece tokenization has it


CASE_14 = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "<think>2 plus 3 is 5.</think>\n\n5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "<think>4 plus 4 is 8.</think>\n\n8"},
]
CASE_14_RENDER = (
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nAnd 4+4?"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>\n"
)


def test_case_14_reasoning_template_trains_turns_as_rendered():
    """Case 14: the full render, labels on `5<|im_end|>\\n` and on the last reply with its reasoning."""
    tok = make_tokenizer(chat_template=CASE_QWEN3_TEMPLATE)
    [(ids, labels)] = tokenize_sample(tok, CASE_14, D)
    assert tok.decode(ids) == CASE_14_RENDER
    assert ids == tok(CASE_14_RENDER, add_special_tokens=False)["input_ids"]
    assert trained_pieces(tok, ids, labels) == ["5<|im_end|>\n", "<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>\n"]


def test_case_14_separate_trains_each_rewritten_turn_once_with_its_reasoning():
    tok = make_tokenizer(chat_template=CASE_QWEN3_TEMPLATE)
    (ids, labels), (ids1, labels1) = tokenize_sample(tok, CASE_14, DataArgs(path="x", rewritten_turns="separate"))
    assert tok.decode(ids) == CASE_14_RENDER
    assert trained_pieces(tok, ids, labels) == ["<think>\n4 plus 4 is 8.\n</think>\n\n8<|im_end|>\n"]
    assert tok.decode(ids1) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>\n2 plus 3 is 5.\n</think>\n\n5"
        "<|im_end|>\n"
    )
    assert trained_pieces(tok, ids1, labels1) == ["<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>\n"]


def test_case_14_rows_train_through_prepare_data(tmp_path):
    """Every multi-turn row keeps training; `separate` gives more samples with their own ids and the same row."""
    tok = make_tokenizer(chat_template=CASE_QWEN3_TEMPLATE)
    f = write_jsonl(tmp_path / "q.jsonl", [{"messages": CASE_14}] * 3)
    cfg = dict(path=str(f), val_fraction=0.0, packing=False)
    data = prepare_data(DataArgs(**cfg), tok, cache_root=tmp_path / "c", log=lambda m: None)
    assert data.stats["train"]["samples"] == 3 and data.stats["samples"] == 3
    sep = prepare_data(DataArgs(**cfg, rewritten_turns="separate"), tok, cache_root=tmp_path / "c", log=print)
    assert sep.train["sample_ids"] == [[0], [1], [2], [3], [4], [5]]
    assert sep.source_rows([s for r in sep.train["sample_ids"] for s in r]) == [0, 0, 1, 1, 2, 2]


def test_extra_message_keys_reach_the_template(tokenizer):
    """tool_calls / reasoning_content pass through unchanged; what the template writes for the turn is trained."""
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m.reasoning_content is defined %}{{ '[r:' + m.reasoning_content + ']' }}{% endif %}"
        "{{ m['content'] or '' }}{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
        "{{ '[call ' + c['name'] + ']' }}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tok = make_tokenizer(chat_template=template)
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather"}], "reasoning_content": "ask"},
        {"role": "tool", "content": "sunny", "name": "get_weather"},
        {"role": "assistant", "content": "Sunny."},
    ]
    [(ids, labels)] = tokenize_sample(tok, msgs, D)
    assert trained_pieces(tok, ids, labels) == ["[r:ask][call get_weather]<|im_end|>\n", "Sunny.<|im_end|>\n"]


def test_template_that_raises_gives_its_message_and_what_to_do():
    tok = llama2_tokenizer()
    from tests.families import MISTRAL_TEMPLATE

    tok.chat_template = MISTRAL_TEMPLATE
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    with pytest.raises(UserError) as err:
        tokenize_sample(tok, msgs, D)
    assert str(err.value) == (
        "the chat template refused this conversation (system, user, assistant): 'Conversation roles must alternate "
        "user/assistant/user/assistant/...'; set data.fold_system_turn: true to fold the system turn into the first "
        "user turn, or fix the conversation or choose another template with data.chat_template"
    )
    [(ids, labels)] = tokenize_sample(tok, msgs, DataArgs(path="x", fold_system_turn=True))
    assert tok.decode(ids) == "<s> [INST] Be brief.\n\nHi [/INST]Yo</s>"
    assert trained_pieces(tok, ids, labels) == ["Yo</s>"]


def test_template_error_names_file_and_line(tmp_path):
    tok = llama2_tokenizer()
    from tests.families import GEMMA_TEMPLATE

    tok.chat_template = GEMMA_TEMPLATE
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    bad = {"messages": [{"role": "system", "content": "S"}, *good["messages"]]}
    f = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
    with pytest.raises(UserError) as err:
        prepare_data(DataArgs(path=str(f), val_fraction=0.0), tok, cache_root=tmp_path / "c", log=lambda m: None)
    assert str(err.value).startswith(f"{f}:3: the chat template refused this conversation (system, user, assistant)")
    assert "'System role not supported'" in str(err.value)
    folded = prepare_data(
        DataArgs(path=str(f), val_fraction=0.0, fold_system_turn=True), tok, cache_root=tmp_path / "c", log=print
    )
    assert folded.stats["train"]["samples"] == 3


def test_turn_closed_by_the_conversation_end_token_phi3_style():
    """A template that closes only the whole conversation with eos: earlier replies end at their <|end|>, the
    last one includes the closing eos (what the template writes after it)."""
    from tests.families import PHI3_TEMPLATE, phi3_tokenizer

    tok = phi3_tokenizer()
    tok.chat_template = PHI3_TEMPLATE
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Lima."},
    ]
    for mode in ("as_rendered", "separate"):  # nothing is rewritten: `separate` gives the same single sample
        [(ids, labels)] = tokenize_sample(tok, msgs, DataArgs(path="x", rewritten_turns=mode))
        assert ids == tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
        tokens = tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != IGNORE])
        assert tokens == ["▁Paris", ".", "<|end|>", "▁Lima", ".", "<|end|>", "<|endoftext|>"], tokens
